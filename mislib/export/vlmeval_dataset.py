"""VLMEvalKit dataset classes for MIS-Ground's 3D questions: a slice stack reaches the model as a video.

Shipped by ``make export`` as ``export/vlmevalkit/mis_ground_vlmeval.py`` and used inside a
VLMEvalKit checkout (this file imports ``vlmeval``; mislib is not needed there).

VLMEvalKit stores a stack as a JSON list of base64 frames in the ``image`` column; its stock
classes would hand the frames to the model as separate images. Its model wrappers accept a
video only as ``{"type": "video", "value": <file>}`` (``BaseModel.generate`` resolves each
message value as one file, so a list of frame paths is rejected), so these classes write the
frames of each stack once, losslessly (PNG frames in an AVI container at ``FPS`` frames per
second), and put that file in the message. Qwen3-VL's wrapper (``Qwen3VLChat``) samples a
video file at its own ``fps`` (2 unless configured otherwise), or, with ``fps=None``, takes
``nframes`` = the file's frame count; either way ``qwen_vl_utils`` then reads every frame of a
2-fps file, in frame order. The message carries neither key: the wrapper adds one, and
``qwen_vl_utils`` refuses a video with both. The text and the scoring are the stock
classes' (``CustomMCQDataset``: option letters, ``can_infer``; ``ImageYORNDataset``:
``Yes``/``No``).

Importing the module adds the classes to ``vlmeval.dataset``, where VLMEvalKit's ``run.py``
looks up the ``class`` named in a ``--config`` file; ``run_mis_ground.py`` beside this file
imports it and then runs ``run.py``.
"""

from __future__ import annotations

import os
import os.path as osp

import vlmeval.dataset
from vlmeval.dataset.image_mcq import CustomMCQDataset
from vlmeval.dataset.image_yorn import ImageYORNDataset

#: Frame rate the stacks are written at: the sampling rate of VLMEvalKit's Qwen3-VL wrapper,
#: which therefore keeps every frame.
FPS = 2.0


def frames_to_video(frame_paths: list[str], target: str, fps: float = FPS) -> str:
    """Write PNG frames, in order, as a lossless video (PNG codec in AVI); return ``target``.

    An existing, non-empty ``target`` is reused: the same stack is asked about many times.
    """
    import cv2
    import numpy as np
    from PIL import Image

    if osp.isfile(target) and osp.getsize(target) > 0:
        return target
    if not frame_paths:
        raise ValueError(f"{target}: a stack without frames")

    def read(path: str):
        # PIL, not cv2.imread: OpenCV's libpng can clash with another zlib loaded in-process
        with Image.open(path) as image:
            return cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)

    first = read(frame_paths[0])
    height, width = first.shape[:2]
    os.makedirs(osp.dirname(target), exist_ok=True)
    tmp = target + ".tmp.avi"
    writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"png "), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {tmp} with the PNG codec")
    try:
        for path in frame_paths:
            frame = read(path)
            if frame.shape[:2] != (height, width):
                raise ValueError(f"frame {path} is not {width}x{height}")
            writer.write(frame)
    finally:
        writer.release()
    os.replace(tmp, target)
    return target


class _StackAsVideo:
    """Turns the stock prompt's frame images into one video message (mixed into a dataset)."""

    # VLMEvalKit's inference uses the dataset's prompt, never a model's own, when this is set.
    force_use_dataset_prompt = True

    def build_prompt(self, line):
        if isinstance(line, int):
            line = self.data.iloc[line]
        msgs = super().build_prompt(line)  # dumps the frames as PNGs, adds the question text
        frames = [m["value"] for m in msgs if m["type"] == "image"]
        rest = [m for m in msgs if m["type"] != "image"]
        key = line["render_id"] if "render_id" in line and isinstance(line["render_id"], str) \
            else str(line["index"])
        video = frames_to_video(frames, osp.join(self.img_root, "video", f"{key}.avi"))
        return [dict(type="video", value=video), *rest]


class MISGroundVideoMCQ(_StackAsVideo, CustomMCQDataset):
    """Open 3D questions: multiple choice (option columns ``A``, ``B``, ...), stack as video."""


class MISGroundVideoYORN(_StackAsVideo, ImageYORNDataset):
    """Closed 3D questions: ``Yes``/``No`` answers, stack as video."""


vlmeval.dataset.MISGroundVideoMCQ = MISGroundVideoMCQ
vlmeval.dataset.MISGroundVideoYORN = MISGroundVideoYORN
