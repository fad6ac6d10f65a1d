"""What the three exports share: reading ``questions.parquet``, the render bytes, the input path.

Every export reads stage 03's ``questions.parquet`` and the renders it names. Columns are
taken as they come (other stages add columns such as ``answer_in_name``): only the few an
export cannot do without are required, and :func:`read_questions` names the file and the
missing columns when they are absent.
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mislib.paths import QUESTIONS_FILE, project_paths

#: Columns every export needs; everything else in ``questions.parquet`` is carried along.
REQUIRED_COLUMNS = ("question_id", "family", "form", "dims", "ablation", "text", "answer",
                    "choices", "image_path", "n_frames")
#: The three ways a question reaches a model: one image, a stack played as a video, text alone.
INPUTS = ("image", "video", "text")


def none(value: Any) -> Any:
    """``None`` for a missing value (None, NaN, pandas NA), the value otherwise."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def read_questions(root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Stage 03's ``questions.parquet``, checked for the columns the exports need.

    Raises
    ------
    FileNotFoundError
        When the file is absent (names the stage to run).
    ValueError
        When a required column is missing (names the file and the columns).
    """
    qfile = project_paths(root).benchmark / QUESTIONS_FILE
    if not qfile.is_file():
        raise FileNotFoundError(f"no {qfile}: run stage 03 (`python -m mislib questions`) first")
    questions = pd.read_parquet(qfile)
    missing = [c for c in REQUIRED_COLUMNS if c not in questions.columns]
    if missing:
        raise ValueError(f"{qfile}: lacks columns {missing} that the exports need")
    return questions.reset_index(drop=True)


def input_kind(row: Mapping[str, Any]) -> str:
    """``"text"`` without an image, ``"video"`` for a 3D stack, ``"image"`` for a 2D render."""
    if none(row.get("image_path")) is None:
        return "text"
    return "video" if row.get("dims") == "3d" else "image"


def slug(value: Any) -> str:
    """A name part safe in file, config and task names: lower case, ``[a-z0-9_]`` only."""
    text = re.sub(r"[^a-z0-9]+", "_", str(value).lower()).strip("_")
    return text or "none"


class ImageCache:
    """PNG bytes of renders, read once each (a small LRU: rows come grouped by render)."""

    def __init__(self, benchmark_dir: Path, size: int = 64):
        self.dir = Path(benchmark_dir)
        self.size = size
        self._cache: OrderedDict[str, list[bytes]] = OrderedDict()

    def frames(self, image_path: str, n_frames: int) -> list[bytes]:
        """The PNG bytes of a 2D image (one item) or of a stack's frames, in frame order.

        Raises
        ------
        FileNotFoundError, ValueError
            When the render is missing, or a stack holds another number of frames than
            ``questions.parquet`` says.
        """
        if image_path in self._cache:
            self._cache.move_to_end(image_path)
            return self._cache[image_path]
        path = self.dir / image_path
        if path.is_dir():
            files = sorted(path.glob("frame_*.png"))
            if len(files) != n_frames:
                raise ValueError(f"{path}: {len(files)} frames on disk, questions.parquet "
                                 f"says n_frames={n_frames}")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"questions.parquet names image {image_path!r}, but {path} "
                                    "does not exist")
        data = [f.read_bytes() for f in files]
        self._cache[image_path] = data
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return data

    def of_row(self, row: Mapping[str, Any]) -> list[bytes]:
        """The render bytes of one question (empty for a text-only question)."""
        path = none(row.get("image_path"))
        if path is None:
            return []
        return self.frames(str(path), int(row["n_frames"]))
