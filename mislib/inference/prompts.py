"""What a model is shown for one question: the user text and the picture(s).

Backends receive these through :class:`mislib.inference.protocol.Request` and apply their
model's own chat template and processor; nothing here depends on a model. A 2D question
brings one RGB picture, a 3D question its rendered frame stack in order (passed to models
as a video, every frame, none re-sampled), a text-only question nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mislib.vocabulary import is_missing as _is_missing

#: Input kinds, in the order the stage batches them (similar inputs pad little).
INPUT_KINDS = ("text", "image", "video")


def input_kind(question: Mapping[str, Any]) -> str:
    """``"text"`` (no image), ``"video"`` (a 3D stack folder) or ``"image"`` (a 2D PNG)."""
    path = question.get("image_path")
    if _is_missing(path) or str(path) == "":
        return "text"
    return "video" if str(question.get("dims")) == "3d" else "image"


def load_media(question: Mapping[str, Any], benchmark_dir: Path) -> Any:
    """The picture(s) of one question.

    Returns
    -------
    None for a text-only question; a ``PIL.Image`` (RGB) for a 2D question; for a 3D
    stack a uint8 array ``[n_frames, height, width, 3]`` of its ``frame_*.png`` in order.

    Raises
    ------
    FileNotFoundError
        Naming the missing file or folder (or a stack folder without frames).
    ValueError
        When the frames of a stack differ in size.
    """
    from PIL import Image

    kind = input_kind(question)
    if kind == "text":
        return None
    path = Path(benchmark_dir) / str(question["image_path"])
    if kind == "image":
        if not path.is_file():
            raise FileNotFoundError(f"question {question['question_id']}: image not found: {path}")
        with Image.open(path) as im:
            return im.convert("RGB")
    if not path.is_dir():
        raise FileNotFoundError(f"question {question['question_id']}: stack folder not found: "
                                f"{path}")
    frames = sorted(path.glob("frame_*.png"))
    if not frames:
        raise FileNotFoundError(f"question {question['question_id']}: no frame_*.png in {path}")
    arrays = []
    for frame in frames:
        with Image.open(frame) as im:
            arrays.append(np.asarray(im.convert("RGB")))
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"question {question['question_id']}: frames of {path} differ in size")
    return np.stack(arrays)


def select_frames(frames: np.ndarray, n: int) -> np.ndarray:
    """``n`` frames of a stack ``[n_frames, H, W, 3]``, evenly spaced from the first to the
    last (a model entry's ``frames_per_stack``); the stack as is when it has ``n`` or fewer.

    >>> select_frames(np.zeros((16, 2, 2, 3)), 4).shape
    (4, 2, 2, 3)
    """
    if len(frames) <= int(n):
        return frames
    index = np.round(np.linspace(0, len(frames) - 1, int(n))).astype(int)
    return frames[index]


def question_prompt(question: Mapping[str, Any], instruction: str = "") -> str:
    """The user text: the question, then ``instruction`` with ``{options}`` filled in.

    Stage 03's questions already end with the answer format they expect, so profiles
    leave ``instruction`` empty; a template such as ``"Answer with one of: {options}."``
    serves question tables that do not.
    """
    choices = question.get("choices")
    options = [] if _is_missing(choices) else [str(c) for c in list(choices)]
    text = str(question["text"]).strip()
    if instruction and options:
        text = f"{text}\n{instruction.format(options=', '.join(options))}"
    return text


def conversation(text: str, media: Any, has_video: bool) -> list[dict[str, Any]]:
    """The one-turn chat for a question, in the message shape chat templates take.

    A 3D stack (``media`` an array of frames) is one video where the model's processor has a
    video path, else one image per frame; a 2D image is one image; text-only questions carry
    none. Both local backends build their prompts from this, so they see the same turn.
    """
    content: list[dict[str, Any]] = []
    if isinstance(media, np.ndarray):
        if has_video:
            content.append({"type": "video"})
        else:
            content += [{"type": "image"} for _ in range(len(media))]
    elif media is not None:
        content.append({"type": "image"})
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def question_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    """A parquet row as plain Python values (lists for ``choices``)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out
