"""Stage 02: render the chosen slices and 3D stacks with visual prompts (docs/design.md).

Inputs are stage 01's files under ``data/prepared/`` (canonical RAS+ volumes, ``volumes``,
``components`` and ``slices`` tables); outputs go to ``data/benchmark/``: PNG images
``images/<render_id>.png``, 3D stacks ``stacks/<render_id>/frame_000.png …``,
``renders.parquet`` (one row per (render, label)), ``letters.parquet`` (one row per letter
drawn on each frame) and ``skipped.parquet`` (what was skipped or trimmed, and why). See
``data/README.md`` for the columns.

Everything about orientation comes from :func:`mislib.geometry.screen_mapping`: a canonical
volume is turned into a *display volume* whose axes are (frame, row, column), growing toward
the mapping's (frame, down, right) world directions (:func:`display_volume`). Rows and
columns are then resampled to square pixels on a ``image_size`` square canvas
(:func:`square_grid`), so that the picture, the pixel centroids in ``renders.parquet`` and the
question ground truth all share one mapping.

Per (slice or frame, convention) the *marks* — which structures are visible, where each
one's dot and box go — are computed once and drawn in every (prompt, background) variant,
so factor cells differ only in the factor. Letters sit next to their own mark, which differs
by prompt (beside the dot, at the box's corner, at the mask's edge), so they are laid out per
prompt (:func:`layout_letters`) and shared by both backgrounds; every letter is nearer its
own mark's anchor than any other mark, and one that had to move away is joined to its anchor
by a leader line. ``letters.parquet`` records every letter on every frame.

The prompt level ``none`` is the no-prompt baseline: the windowed scan alone, no marks and
no letters, one image (or stack) per slice and convention; its rows in ``renders.parquet`` still list the structures (centroids for the
ground truth) but with null ``letter`` and ``color``. A blank background without prompts
would show nothing, so (``none``, ``blank``) is not rendered.

>>> rows = render_benchmark("demo", workers=1)            # doctest: +SKIP
>>> rows.groupby(["dims", "prompt"]).render_id.nunique()  # doctest: +SKIP
"""

from __future__ import annotations

import io
import multiprocessing
import os
import re
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from scipy.spatial import cKDTree
from tqdm import tqdm

from mislib.config import config_hash, read_stamp, stage_params
from mislib.geometry import (
    CONVENTIONS,
    PLANES,
    centroid_mm,
    plane_axes,
    screen_mapping,
    to_canonical,
    voxel_spacing,
)
from mislib.paths import (
    COMPONENTS_FILE,
    LETTERS_FILE,
    RENDERS_FILE,
    SKIPPED_FILE,
    SLICES_FILE,
    VOLUMES_FILE,
    project_paths,
)
from mislib.stage import StageRun, digests_only, input_digests
from mislib.vocabulary import BACKGROUNDS, DIMS, NO_PROMPT, PROMPTS

LETTERS = "ABCDEF"

#: Okabe & Ito's colour-blind-safe palette without black and blue (both vanish on a dark
#: scan); one colour per letter slot, A..F.
PALETTE = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#D55E00", "#CC79A7")

#: CT windows as (width, level) in HU.
CT_WINDOWS = {"soft_tissue": (400.0, 40.0), "lung": (1500.0, -600.0), "bone": (1800.0, 400.0)}

RENDER_COLUMNS = [
    "render_id", "volume_id", "slice_id", "source", "modality", "plane", "convention", "dims",
    "prompt", "background", "image_path", "n_frames", "width", "height", "pixel_mm", "window",
    "letter", "component", "label", "color", "centroid_col", "centroid_row", "frame_first",
    "frame_last", "visible_x", "visible_y", "visible_z", "visible_area_mm2", "visible_frames",
    "centroid_frame", "letter_col", "letter_row", "anchor_col", "anchor_row", "leader",
    "letter_frame",
]
#: letters.parquet: every letter as drawn, one row per (render, frame, letter); 2D renders
#: have frame 0. Pixel coordinates as in renders.parquet.
LETTER_COLUMNS = ["render_id", "frame", "letter", "component", "letter_col", "letter_row",
                  "anchor_col", "anchor_row", "leader"]
SKIPPED_COLUMNS = ["slice_id", "volume_id", "plane", "dims", "convention", "component", "action",
                   "reason"]
INPUT_FILES = (VOLUMES_FILE, COMPONENTS_FILE, SLICES_FILE)


# --------------------------------------------------------------------------- volumes


@dataclass
class Volume:
    """A canonical (RAS+) volume with its label map, as rendering needs it.

    ``image`` and ``labels`` have shape (X, Y, Z) with index growing toward R, A, S;
    ``affine`` (4, 4) maps voxel indices to world millimetres; ``names`` maps label values to
    component names; ``window`` is (low, high) display intensities for MRI (None for CT,
    whose window is chosen per structure set).
    """

    volume_id: str
    source: str
    modality: str
    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    names: dict[int, str]
    window: tuple[float, float] | None = None
    _centroids: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def centroid(self, label: int) -> np.ndarray:
        """World centroid (3,) in mm of a label's voxels (cached: stacks reuse it)."""
        if label not in self._centroids:
            self._centroids[label] = centroid_mm(self.labels == label, self.affine)
        return self._centroids[label]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along x, y, z (mm), shape (3,)."""
        return voxel_spacing(self.affine)

    def world(self, ijk: np.ndarray) -> np.ndarray:
        """World RAS+ mm of voxel indices ``ijk`` (..., 3)."""
        return nib.affines.apply_affine(self.affine, ijk)


def _canonical(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise FileNotFoundError(f"missing volume file {path}")
    # stage 01 stores RAS+ already; this is a no-op then, and a guard against obliquity
    return to_canonical(nib.load(str(path)), str(path))


def mri_window(image: np.ndarray, percentiles: Sequence[float] = (1.0, 99.0)) -> tuple[float, float]:
    """Percentile window (low, high) over the foreground of an MRI volume.

    The foreground is every voxel above the volume's minimum (skull-stripped templates and
    phantoms have a constant background that would otherwise pull the low end down).
    """
    values = image[np.isfinite(image)]
    foreground = values[values > values.min()] if values.size else values
    if foreground.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(foreground, percentiles)
    return float(low), float(max(high, low + 1e-6))


def load_volume(prepared: Path, volume: pd.Series, components: pd.DataFrame,
                percentiles: Sequence[float] = (1.0, 99.0)) -> Volume:
    """Load one prepared volume (a ``volumes.parquet`` row) and its component names."""
    image = _canonical(prepared / str(volume["canonical_image"]))
    labels = _canonical(prepared / str(volume["canonical_labels"]))
    if image.shape[:3] != labels.shape[:3] or not np.allclose(image.affine, labels.affine,
                                                                 atol=1e-3):
        raise ValueError(f"{volume['canonical_labels']}: label grid differs from the image's")
    data = image.get_fdata(dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"{volume['canonical_image']}: expected a 3D image, got {data.shape}")
    mine = components[components["volume_id"] == volume["volume_id"]]
    names = {int(lab): str(comp) for lab, comp in zip(mine["label"], mine["component"],
                                                       strict=True)}
    modality = str(volume["modality"])
    return Volume(
        volume_id=str(volume["volume_id"]), source=str(volume["source"]), modality=modality,
        image=data, labels=np.asarray(labels.dataobj).astype(np.int32, copy=False),
        affine=image.affine.copy(), names=names,
        window=None if modality == "CT" else mri_window(data, percentiles))


# --------------------------------------------------------------------------- geometry


def display_ornt(plane: str, convention: str) -> np.ndarray:
    """nibabel orientation (3, 2) taking a RAS+ array to display axes (frame, row, column).

    The display axes grow toward the world directions ``screen_mapping(plane,
    convention)`` names for frame order, image-down and image-right.
    """
    m = screen_mapping(plane, convention)
    return nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                           nib.orientations.axcodes2ornt((m.frame, m.down,
                                                                          m.right)))


def display_volume(array: np.ndarray, spacing: Sequence[float], plane: str,
                   convention: str) -> tuple[np.ndarray, np.ndarray]:
    """A RAS+ array (X, Y, Z) as seen in ``(plane, convention)``: (frames, rows, columns).

    Returns the reoriented view and its voxel size (3,) in mm along (frame, row, column).
    """
    ornt = display_ornt(plane, convention)
    out = nib.orientations.apply_orientation(array, ornt)
    out_spacing = np.empty(3)
    out_spacing[ornt[:, 0].astype(int)] = np.asarray(spacing, dtype=float)
    return out, out_spacing


def frame_index(index: int, n: int, plane: str, convention: str) -> int:
    """Display frame of canonical slice ``index`` (of ``n``) along the plane's fixed axis."""
    fixed, _ = plane_axes(plane)
    flip = display_ornt(plane, convention)[fixed, 1] < 0
    return n - 1 - index if flip else index


@dataclass(frozen=True)
class SquareGrid:
    """Sampling positions of a ``size`` × ``size`` canvas of square pixels.

    ``rows``/``cols`` (size,) are fractional voxel indices of the display frame at the pixel
    centres; ``valid_rows``/``valid_cols`` mark pixels inside the frame (the rest is padding,
    the frame being centred on the canvas); ``pixel_mm`` is the pixel edge in mm.
    """

    rows: np.ndarray
    cols: np.ndarray
    valid_rows: np.ndarray
    valid_cols: np.ndarray
    pixel_mm: float

    @property
    def size(self) -> int:
        return len(self.rows)


def square_grid(shape: Sequence[int], spacing: Sequence[float], size: int) -> SquareGrid:
    """Fit a frame of ``shape`` (rows, cols) voxels of ``spacing`` (mm) into a square canvas.

    The longer side fills the canvas; pixels are square, so anisotropic voxels are stretched
    to their true aspect ratio.
    """
    extent = np.asarray(shape, float) * np.asarray(spacing, float)
    pixel_mm = float(extent.max() / size)
    axes = []
    for n, step, ext in zip(shape, spacing, extent, strict=True):
        offset = (size * pixel_mm - ext) / 2.0
        coord = ((np.arange(size) + 0.5) * pixel_mm - offset) / step - 0.5
        axes.append((coord, (coord >= -0.5) & (coord <= n - 0.5)))
    (rows, vr), (cols, vc) = axes
    return SquareGrid(rows, cols, vr, vc, pixel_mm)


def resample_labels(frame: np.ndarray, grid: SquareGrid) -> np.ndarray:
    """Nearest-neighbour label frame (size, size); padding is background 0."""
    ri = np.clip(np.floor(grid.rows + 0.5).astype(int), 0, frame.shape[0] - 1)
    ci = np.clip(np.floor(grid.cols + 0.5).astype(int), 0, frame.shape[1] - 1)
    out = frame[np.ix_(ri, ci)]
    return np.where(np.outer(grid.valid_rows, grid.valid_cols), out, 0)


def resample_image(frame: np.ndarray, grid: SquareGrid) -> np.ndarray:
    """Linearly interpolated intensity frame (size, size); padding is NaN."""
    rr, cc = np.meshgrid(grid.rows, grid.cols, indexing="ij")
    out = ndimage.map_coordinates(np.asarray(frame, np.float32), [rr, cc], order=1,
                                  mode="nearest")
    return np.where(np.outer(grid.valid_rows, grid.valid_cols), out, np.nan)


def apply_window(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Intensities to uint8 grey through a (low, high) window; NaN (padding) becomes black."""
    low, high = window
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0)
    return np.nan_to_num(scaled * 255.0, nan=0.0).round().astype(np.uint8)


def ct_window_name(components: Iterable[str]) -> str:
    """The CT preset for a structure set: the lung or bone window only when every structure
    is of that tissue class (:func:`mislib.structures.common_tissue_class`), soft tissue when
    they mix, so that no labelled structure is washed out by another class's window."""
    from mislib.structures import common_tissue_class

    return {"air": "lung", "bone": "bone"}.get(common_tissue_class(components), "soft_tissue")


def window_for(volume: Volume, components: Iterable[str]) -> tuple[str, tuple[float, float]]:
    """(name, (low, high)) display window: CT preset per structure set, MRI percentiles."""
    if volume.modality == "CT":
        name = ct_window_name(components)
        width, level = CT_WINDOWS[name]
        return name, (level - width / 2.0, level + width / 2.0)
    return "mri_percentile", volume.window or mri_window(volume.image)


# --------------------------------------------------------------------------- letters, layout


def assign_letters(components: Sequence[str], seed: int, key: str) -> dict[str, tuple[str, str]]:
    """Shuffle letters A.. over ``components``: {component: (letter, hex colour)}.

    The permutation depends only on ``seed`` and ``key`` (the slice id), so every factor cell
    of a slice shows the same letter and colour for a structure, and letter A is not tied to
    any anatomical order.
    """
    if len(components) > len(LETTERS):
        raise ValueError(f"{len(components)} structures; at most {len(LETTERS)} letters")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode())])
    order = rng.permutation(len(components))
    return {components[i]: (LETTERS[slot], PALETTE[slot]) for slot, i in enumerate(order)}


@lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    # DejaVu Sans ships with matplotlib, so glyphs (and PNG bytes) do not depend on the host.
    path = Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans-Bold.ttf")
    return ImageFont.truetype(str(path), px)


def _letter_style(size: int) -> tuple[ImageFont.FreeTypeFont, int, int]:
    px = max(10, round(size * 0.05))
    return _font(px), max(1, px // 10), max(1, px // 8)  # font, stroke, padding


def _rect_sums(table: np.ndarray, ys: np.ndarray, xs: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pixel sums of every h × w rectangle with top-left (ys[i], xs[j]) from a summed table."""
    y0, x0 = ys[:, None], xs[None, :]
    return table[y0 + h, x0 + w] - table[y0, x0 + w] - table[y0 + h, x0] + table[y0, x0]


def _summed(mask: np.ndarray) -> np.ndarray:
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    table[1:, 1:] = mask.cumsum(0).cumsum(1)
    return table


@dataclass
class Mark:
    """One structure on one displayed frame: where it is and where its prompt goes.

    Where its *letter* goes depends on the prompt (beside the dot, at the box's corner, at
    the mask's edge) and is computed by :func:`layout_letters`.
    """

    component: str
    label: int
    letter: str
    color: str
    mask: np.ndarray          # (size, size) bool
    edge: np.ndarray          # (size, size) bool, the mask's outline
    area_px: int
    centroid: tuple[float, float]   # (col, row), pixel centres at integer coordinates
    bbox: tuple[int, int, int, int]  # (col0, row0, col1, row1), inclusive
    point: tuple[int, int]    # (col, row) deepest pixel inside the structure
    _mask_table: np.ndarray | None = field(default=None, repr=False)

    def mask_table(self) -> np.ndarray:
        """Summed-area table of ``mask`` (cached: every prompt's layout reads it)."""
        if self._mask_table is None:
            self._mask_table = _summed(self.mask)
        return self._mask_table


@dataclass(frozen=True)
class LetterPlacement:
    """Where one letter is drawn and which point of its mark it labels.

    ``text_box`` (x0, y0, x1, y1) is the glyph's box in pixels (x1, y1 exclusive);
    ``centre`` (col, row) its centre; ``anchor`` (col, row) the point of the mark the letter
    belongs to (the dot's centre, the box corner, the mask pixel nearest the letter);
    ``leader`` whether a line joins the letter to its anchor (drawn when the letter had to
    move away from its mark to avoid overlap).
    """

    text_box: tuple[int, int, int, int]
    centre: tuple[float, float]
    anchor: tuple[float, float]
    leader: bool


#: A letter's distance to its own anchor must not exceed this fraction of its distance to
#: any other mark, so that the letter reads as belonging to its own mark.
OWN_MARK_RATIO = 0.8


def _dot_radius(size: int) -> int:
    return max(3, size // 90)


def _line_width(size: int) -> int:
    return max(1, size // 200)


def _box_outline(m: Mark, size: int) -> tuple[int, int, int, int]:
    """The box prompt's rectangle (x0, y0, x1, y1), inclusive, as :func:`draw` draws it."""
    c0, r0, c1, r1 = m.bbox
    w = _line_width(size)
    return max(c0 - w, 0), max(r0 - w, 0), min(c1 + w, size - 1), min(r1 + w, size - 1)


class MarkShape(NamedTuple):
    """What a reader sees of one mark under one prompt (pixel (col, row) coordinates).

    ``anchors`` (n, 2): the points a letter may attach to (the dot's centre; the box's four
    corners; the mask's edge pixels). ``body`` (k, 2): the points of the drawn mark another
    letter must stay clear of (the dot's centre, the box's outline, the mask's edge).
    ``kind`` and ``extent`` say which pixels the mark covers, which its own letter must not
    hide: ``"point"`` a disk (col, row, radius), ``"box"`` an outline band (x0, y0, x1, y1,
    width), ``"mask"`` the structure's mask.
    """

    kind: str
    anchors: np.ndarray
    body: np.ndarray
    extent: tuple


def mark_geometry(m: Mark, prompt: str, size: int) -> MarkShape:
    """The :class:`MarkShape` of ``m`` as :func:`draw` draws it under ``prompt``.

    The scan without a prompt has no marks; its structures are measured like masks.
    """
    if prompt == "point":
        c, r = m.point
        anchors = np.array([[c, r]], float)
        return MarkShape("point", anchors, anchors, (c, r, _dot_radius(size) + 1))
    if prompt == "box":
        x0, y0, x1, y1 = _box_outline(m, size)
        xs, ys = np.arange(x0, x1 + 1), np.arange(y0, y1 + 1)
        body = np.concatenate([np.c_[xs, np.full_like(xs, y0)], np.c_[xs, np.full_like(xs, y1)],
                               np.c_[np.full_like(ys, x0), ys], np.c_[np.full_like(ys, x1), ys]])
        anchors = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], float)
        return MarkShape("box", anchors, body.astype(float),
                         (x0, y0, x1, y1, _line_width(size) + 1))
    rows, cols = np.nonzero(m.mask & ~ndimage.binary_erosion(m.mask))
    edge = np.c_[cols, rows].astype(float)
    return MarkShape("mask", edge, edge, ())


def _covers(shape: MarkShape, m: Mark, xs: np.ndarray, ys: np.ndarray, w: int,
            h: int) -> np.ndarray:
    """Pixels of the mark hidden by a w × h letter box at each top-left (ys[i], xs[j]).

    Returns (len(ys), len(xs)) float: the mask pixels covered (mask), or 1 where the box
    touches the dot or the outline band (point, box).
    """
    if shape.kind == "mask":
        return _rect_sums(m.mask_table(), ys, xs, h, w).astype(float)
    y0, x0 = ys[:, None].astype(float), xs[None, :].astype(float)
    y1, x1 = y0 + h - 1, x0 + w - 1  # inclusive
    if shape.kind == "point":
        c, r, radius = shape.extent
        dx = np.maximum(np.maximum(x0 - c, c - x1), 0.0)
        dy = np.maximum(np.maximum(y0 - r, r - y1), 0.0)
        return (np.hypot(dx, dy) <= radius).astype(float)
    bx0, by0, bx1, by1, band = shape.extent
    touches = (x0 <= bx1) & (x1 >= bx0) & (y0 <= by1) & (y1 >= by0)
    inside = (x0 >= bx0 + band) & (x1 <= bx1 - band) & (y0 >= by0 + band) & (y1 <= by1 - band)
    return (touches & ~inside).astype(float)


def _box_gap(centres: np.ndarray, half: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance (px) from each point to the box of half-size ``half`` around each centre."""
    d = np.maximum(np.abs(points - centres) - half, 0.0)
    return np.hypot(d[:, 0], d[:, 1])


def layout_letters(marks: list[Mark], prompt: str, size: int) -> list[LetterPlacement]:
    """Place every mark's letter next to its own mark under ``prompt``; one per mark, in order.

    Each letter goes where it is nearest its anchor (beside the dot, at a box corner, at the
    mask's edge), subject to hard constraints: inside the image, clear of the letters placed
    before, not hiding its own mark (nor any dot), and nearer its own anchor than
    :data:`OWN_MARK_RATIO` times the distance to any other mark — the rule that makes a
    letter read as its own mark's. Among those positions the cost is the gap to the anchor
    plus a penalty for hiding other structures (weighted by their size, so a small
    neighbour is never covered) and other marks. A letter that ends up more than half its
    height from its anchor gets a leader line. When a crowded frame leaves no position that
    keeps the ratio, the letter still goes nearer its own anchor than any other mark
    (ratio 1); where marks overlap (nested boxes), nearer its own anchor than any other
    mark's anchor (the rule :func:`mislib.validity.check_letters_on_marks` checks); as a
    last resort, to the position with the best ratio.
    """
    if prompt not in PROMPTS:
        raise ValueError(f"unknown prompt {prompt!r}; expected one of {PROMPTS}")
    font, stroke, pad = _letter_style(size)
    kind = "mask" if prompt == NO_PROMPT else prompt
    shapes = [mark_geometry(m, kind, size) for m in marks]
    clearance = {"point": _dot_radius(size) + 1, "box": _line_width(size) + 1, "mask": 1}[kind]
    step = 2 if size < 256 else 4
    placed: list[tuple[int, int, int, int]] = []
    out: list[LetterPlacement] = []
    for k, m in enumerate(marks):
        x0, y0, x1, y1 = font.getbbox(m.letter, stroke_width=stroke)
        w, h = x1 - x0 + 2 * pad, y1 - y0 + 2 * pad
        anchors = shapes[k].anchors
        reach = 3 * max(w, h) + clearance
        near = (np.maximum(anchors.min(axis=0) - reach, 0).astype(int),
                np.minimum(anchors.max(axis=0) + reach, size).astype(int))
        best = None
        for lo, hi in (near, (np.array([0, 0]), np.array([size, size]))):
            xs = np.arange(max(lo[0] - w // 2, 0), min(hi[0], size - w) + 1, step)
            ys = np.arange(max(lo[1] - h // 2, 0), min(hi[1], size - h) + 1, step)
            if len(xs) and len(ys):
                best = _best_position(k, marks, shapes, placed, xs, ys, w, h)
            if best is not None:
                break
        if best is None:
            raise RuntimeError(f"no room for letter {m.letter} of {m.component} on a "
                               f"{size} px image")
        bx, by, anchor = best
        box = (bx, by, bx + w, by + h)
        centre = (bx + (w - 1) / 2.0, by + (h - 1) / 2.0)
        gap = float(_box_gap(np.array([centre]), np.array([w / 2.0, h / 2.0]),
                             np.array([anchor]))[0])
        placed.append(box)
        out.append(LetterPlacement(box, centre, (float(anchor[0]), float(anchor[1])),
                                   gap > clearance + h / 2.0))
    return out


def _best_position(k: int, marks: list[Mark], shapes: list[MarkShape],
                   placed: list[tuple[int, int, int, int]], xs: np.ndarray, ys: np.ndarray,
                   w: int, h: int, margin: int = 2) -> tuple[int, int, np.ndarray] | None:
    """The cheapest top-left (x, y) of letter ``k`` on the candidate grid, and its anchor.

    Returns ``(x, y, anchor (2,))`` or None when every candidate clashes with a letter
    placed before. See :func:`layout_letters` for the constraints and the cost.
    """
    gx, gy = np.meshgrid(xs, ys)
    centres = np.c_[gx.ravel() + (w - 1) / 2.0, gy.ravel() + (h - 1) / 2.0]
    half = np.array([w / 2.0, h / 2.0])
    d_own, idx = cKDTree(shapes[k].anchors).query(centres)
    own_anchor = shapes[k].anchors[idx]
    others = [j for j in range(len(marks)) if j != k]
    d_other = np.full(len(centres), np.inf)  # to the nearest other mark
    d_anchor = np.full(len(centres), np.inf)  # to the nearest anchor of another mark
    if others:
        d_other = cKDTree(np.concatenate([shapes[j].body for j in others])).query(centres)[0]
        d_anchor = cKDTree(np.concatenate([shapes[j].anchors for j in others])).query(centres)[0]
    covers_own = _covers(shapes[k], marks[k], xs, ys, w, h).ravel() > 0
    covers_dot = np.zeros(len(centres), bool)
    hidden = np.zeros(len(centres))
    for j in others:
        o = marks[j]
        if shapes[j].kind != "mask":
            touched = _covers(shapes[j], o, xs, ys, w, h).ravel()
            hidden += 5.0 * touched
            if shapes[j].kind == "point":
                covers_dot |= touched > 0
        hidden += _rect_sums(o.mask_table(), ys, xs, h, w).ravel() * (100.0 / max(o.area_px, 1))
    clash = np.zeros(len(centres), bool)
    for px0, py0, px1, py1 in placed:
        clash |= ((gy.ravel() < py1 + margin) & (gy.ravel() + h > py0 - margin)
                  & (gx.ravel() < px1 + margin) & (gx.ravel() + w > px0 - margin))
    cost = _box_gap(centres, half, own_anchor) + 20.0 * hidden
    ratio = d_own / np.maximum(d_other, 1e-9)
    ratio_anchor = d_own / np.maximum(d_anchor, 1e-9)
    free = ~clash & ~covers_dot
    tiers = (free & ~covers_own & (ratio <= OWN_MARK_RATIO),
             free & (ratio < 1.0),
             free & ~covers_own & (ratio_anchor <= OWN_MARK_RATIO),
             free & (ratio_anchor < 1.0),
             ~clash & (ratio_anchor < 1.0))
    for ok in tiers:
        if ok.any():
            i = int(np.argmin(np.where(ok, cost, np.inf)))
            break
    else:
        if clash.all():
            return None
        i = int(np.argmin(np.where(~clash, ratio_anchor, np.inf)))
    iy, ix = divmod(i, len(xs))
    return int(xs[ix]), int(ys[iy]), own_anchor[i]


def frame_marks(label_frame: np.ndarray, structures: dict[str, tuple[str, str]],
                name_to_label: dict[str, int], min_area_px: float) -> list[Mark]:
    """Marks of the chosen structures visible on one displayed frame (size, size).

    A structure counts as visible when it covers at least ``min_area_px`` pixels. The point
    prompt sits at the pixel deepest inside the structure (largest distance to its border),
    which lies inside even for a C-shaped one. Letters are placed per prompt by
    :func:`layout_letters`.
    """
    size = label_frame.shape[0]
    thickness = max(1, size // 300)
    marks = []
    for comp, (letter, color) in sorted(structures.items(), key=lambda kv: kv[1][0]):
        mask = label_frame == name_to_label[comp]
        area = int(mask.sum())
        if area == 0 or area < min_area_px:
            continue
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1], cols[0], cols[-1]
        # work on the bounding box (+1 pixel of background) instead of the whole canvas
        crop = np.pad(mask[r0:r1 + 1, c0:c1 + 1], 1)
        depth = ndimage.distance_transform_edt(crop)
        pr, pc = np.unravel_index(int(np.argmax(depth)), depth.shape)
        edge = np.zeros_like(mask)
        edge[r0:r1 + 1, c0:c1 + 1] = (crop & ~ndimage.binary_erosion(
            crop, iterations=thickness))[1:-1, 1:-1]
        rr, cc = np.nonzero(crop)
        marks.append(Mark(comp, name_to_label[comp], letter, color, mask, edge, area,
                          (float(cc.mean() - 1 + c0), float(rr.mean() - 1 + r0)),
                          (int(c0), int(r0), int(c1), int(r1)),
                          (int(pc - 1 + c0), int(pr - 1 + r0))))
    return marks


def _rgb(color: str) -> np.ndarray:
    return np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)], np.float32)


def draw(grey: np.ndarray | None, marks: list[Mark], prompt: str, size: int,
         placements: Sequence[LetterPlacement] | None = None,
         alpha: float = 0.35) -> Image.Image:
    """Draw one frame: the scan (``grey`` (size, size) uint8) or a blank canvas, the prompts
    of ``prompt`` kind, the letters and their leader lines. Returns an RGB image.

    ``placements`` (one per mark, from :func:`layout_letters` for this prompt) are computed
    when not given. ``prompt="none"`` draws the scan alone: no prompt and no letter (the
    no-prompt baseline).
    """
    if prompt not in PROMPTS:
        raise ValueError(f"unknown prompt {prompt!r}; expected one of {PROMPTS}")
    base = np.zeros((size, size, 3), np.uint8)
    if grey is not None:
        base[:] = grey[..., None]
    if prompt == NO_PROMPT:
        return Image.fromarray(base, "RGB")
    if placements is None:
        placements = layout_letters(marks, prompt, size)
    if len(placements) != len(marks):
        raise ValueError(f"{len(placements)} letter placements for {len(marks)} marks")
    if prompt == "mask":
        for m in marks:
            c0, r0, c1, r1 = m.bbox
            box = base[r0:r1 + 1, c0:c1 + 1]  # a view: edit the bounding box only
            inside = m.mask[r0:r1 + 1, c0:c1 + 1]
            tinted = (1 - alpha) * box[inside] + alpha * _rgb(m.color)
            box[inside] = tinted.round().astype(np.uint8)
            box[m.edge[r0:r1 + 1, c0:c1 + 1]] = _rgb(m.color).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    canvas = ImageDraw.Draw(img)
    width = _line_width(size)
    if prompt == "box":
        for m in marks:
            canvas.rectangle(_box_outline(m, size), outline=m.color, width=width)
    elif prompt == "point":
        radius = _dot_radius(size)
        for m in marks:
            c, r = m.point
            canvas.ellipse((c - radius, r - radius, c + radius, r + radius), fill=m.color,
                           outline="#000000", width=1)
    for m, p in zip(marks, placements, strict=True):
        if p.leader:  # a thin line from the anchor to the nearest point of the letter's box
            x0, y0, x1, y1 = p.text_box
            ax, ay = p.anchor
            end = (min(max(ax, x0), x1 - 1), min(max(ay, y0), y1 - 1))
            canvas.line((ax, ay, *end), fill="#000000", width=width + 2)
            canvas.line((ax, ay, *end), fill=m.color, width=width)
    font, stroke, pad = _letter_style(size)
    for m, p in zip(marks, placements, strict=True):
        x0, y0, _, _ = font.getbbox(m.letter, stroke_width=stroke)
        bx, by, _, _ = p.text_box
        canvas.text((bx + pad - x0, by + pad - y0), m.letter, font=font, fill=m.color,
                    stroke_width=stroke, stroke_fill="#000000")
    return img


def png_bytes(img: Image.Image) -> bytes:
    """Deterministic PNG encoding (Pillow writes no time stamp)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# --------------------------------------------------------------------------- rendering


@dataclass
class Render:
    """One rendered image or stack: ``frames`` (PIL images), one row per label and one
    ``letters`` record per letter drawn on each frame (see :data:`LETTER_COLUMNS`)."""

    render_id: str
    frames: list[Image.Image]
    rows: list[dict[str, Any]]
    letters: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SliceSpec:
    slice_id: str
    plane: str
    index: int
    components: list[str] | None = None  # stage 01's visible list; None: any labelled


@dataclass
class RenderOptions:
    conventions: Sequence[str] = CONVENTIONS
    prompts: Sequence[str] = PROMPTS
    backgrounds: Sequence[str] = BACKGROUNDS
    dims: Sequence[str] = DIMS
    image_size: int = 448
    frames_3d: int = 16
    max_labels: int = 6
    min_visible_area_mm2: float = 30.0
    min_frame_area_mm2: float = 5.0
    seed: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        for name, values, allowed in (("conventions", self.conventions, CONVENTIONS),
                                      ("prompts", self.prompts, PROMPTS),
                                      ("backgrounds", self.backgrounds, BACKGROUNDS),
                                      ("dims", self.dims, DIMS)):
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(f"[render] {name}: unknown {bad}; expected some of {allowed}")
        if not 1 <= int(self.max_labels) <= len(LETTERS):
            raise ValueError(f"[render] max_labels must be 1..{len(LETTERS)}, "
                             f"got {self.max_labels}")
        if int(self.image_size) < 64:
            raise ValueError(f"[render] image_size must be >= 64, got {self.image_size}")


def safe_id(text: str) -> str:
    """A file-name-safe id (letters, digits, ``-``, ``_``, ``.``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def render_id(slice_id: str, dims: str, convention: str, prompt: str, background: str) -> str:
    return safe_id(f"{slice_id}_{dims}_{convention}_{prompt}_{background}")


def factor_cells(prompts: Sequence[str], backgrounds: Sequence[str]) -> list[tuple[str, str]]:
    """The (prompt, background) variants drawn per slice and convention.

    Every pair, except the no-prompt level on a blank background (an empty image).
    """
    return [(p, b) for p in prompts for b in backgrounds
            if not (p == NO_PROMPT and b == "blank")]


def _note(opts: RenderOptions, spec: SliceSpec, volume: Volume, reason: str, *, dims=None,
          convention=None, component=None, action="skipped") -> None:
    opts.skipped.append({"slice_id": spec.slice_id, "volume_id": volume.volume_id,
                         "plane": spec.plane, "dims": dims, "convention": convention,
                         "component": component, "action": action, "reason": reason})


def choose_structures(volume: Volume, spec: SliceSpec, opts: RenderOptions) -> dict[str, float]:
    """Structures to label on a slice: {component: visible area mm²}, at most ``max_labels``.

    Candidates are the slice's stage-01 components (or every named label) whose area on the
    canonical slice is at least ``min_visible_area_mm2``; when more remain than
    ``max_labels``, the largest are kept. Drops and trims are recorded in ``opts.skipped``.
    """
    fixed, inplane = plane_axes(spec.plane)
    if not 0 <= spec.index < volume.labels.shape[fixed]:
        raise ValueError(f"slice {spec.slice_id}: index {spec.index} outside 0..."
                         f"{volume.labels.shape[fixed] - 1} along the {spec.plane} axis")
    plane = np.take(volume.labels, spec.index, axis=fixed)
    pixel_mm2 = float(np.prod(volume.spacing[list(inplane)]))
    labs, counts = np.unique(plane[plane != 0], return_counts=True)
    area = {volume.names[int(lab)]: float(c) * pixel_mm2
            for lab, c in zip(labs, counts, strict=True) if int(lab) in volume.names}
    wanted = area.keys() if spec.components is None else spec.components
    visible = {}
    for comp in sorted(wanted):
        a = area.get(comp, 0.0)
        if a < opts.min_visible_area_mm2:
            _note(opts, spec, volume, f"visible area {a:.1f} mm2 < min_visible_area_mm2 "
                  f"{opts.min_visible_area_mm2}", component=comp, action="dropped")
        else:
            visible[comp] = a
    if len(visible) > opts.max_labels:
        keep = sorted(visible, key=lambda c: (-visible[c], c))[:opts.max_labels]
        for comp in sorted(set(visible) - set(keep)):
            _note(opts, spec, volume, f"{len(visible)} candidates > max_labels "
                  f"{opts.max_labels}; kept the largest", component=comp, action="trimmed")
        visible = {c: visible[c] for c in keep}
    return visible


def _visible_world(volume: Volume, spec: SliceSpec, labels: Iterable[int]) -> dict[int, np.ndarray]:
    """World centroid (3,) of each label's voxels on the canonical slice: {label: xyz}."""
    fixed, _ = plane_axes(spec.plane)
    plane = np.take(volume.labels, spec.index, axis=fixed)
    out = {}
    for label in labels:
        ijk = np.argwhere(plane == label).astype(float)
        out[label] = volume.world(np.insert(ijk, fixed, spec.index, axis=1).mean(axis=0))
    return out


def _stack_frames(disp_labels: np.ndarray, labels: Sequence[int], n_frames: int) -> np.ndarray:
    """``n_frames`` display-frame indices spanning every chosen structure, in frame order."""
    present = np.isin(disp_labels, list(labels)).any(axis=(1, 2))
    hit = np.nonzero(present)[0]
    lo, hi = int(hit.min()), int(hit.max())
    total = disp_labels.shape[0]
    if hi - lo + 1 < n_frames:  # widen a thin span so that frames are distinct slices
        lo = max(0, min(lo - (n_frames - (hi - lo + 1)) // 2, total - n_frames))
        hi = min(total - 1, lo + n_frames - 1)
    return np.round(np.linspace(lo, hi, n_frames)).astype(int)


def render_slice(volume: Volume, spec: SliceSpec, opts: RenderOptions) -> list[Render]:
    """Every requested factor cell of one slice: 2D images and 3D stacks.

    Returns the renders (images in memory); skips and trims go to ``opts.skipped``.
    """
    if spec.plane not in PLANES:
        raise ValueError(f"slice {spec.slice_id}: unknown plane {spec.plane!r}")
    chosen = choose_structures(volume, spec, opts)
    if len(chosen) < 2:
        _note(opts, spec, volume, f"fewer than two structures visible with at least "
              f"{opts.min_visible_area_mm2} mm2 ({sorted(chosen) or 'none'})")
        return []
    letters = assign_letters(sorted(chosen), opts.seed, spec.slice_id)
    name_to_label = {v: k for k, v in volume.names.items()}
    window_name, window = window_for(volume, chosen)
    size = int(opts.image_size)
    n_frames = int(opts.frames_3d)
    if "3d" in opts.dims and n_frames % 2:
        _note(opts, spec, volume, f"frames_3d={n_frames} is odd; using {n_frames - 1}",
              dims="3d", action="trimmed")
        n_frames -= 1
    base = {"volume_id": volume.volume_id, "slice_id": spec.slice_id, "source": volume.source,
            "modality": volume.modality, "plane": spec.plane, "window": window_name,
            "width": size, "height": size}
    renders: list[Render] = []
    for convention in opts.conventions:
        disp_img, sp = display_volume(volume.image, volume.spacing, spec.plane, convention)
        disp_lab, _ = display_volume(volume.labels, volume.spacing, spec.plane, convention)
        grid = square_grid(disp_img.shape[1:], sp[1:], size)
        px_mm2 = grid.pixel_mm ** 2
        if "2d" in opts.dims:
            f = frame_index(spec.index, disp_img.shape[0], spec.plane, convention)
            lab2d = resample_labels(disp_lab[f], grid)
            marks = frame_marks(lab2d, letters, name_to_label, 1)
            missing = sorted(set(chosen) - {m.component for m in marks})
            for comp in missing:
                _note(opts, spec, volume, f"no pixel left at {grid.pixel_mm:.2f} mm/pixel",
                      dims="2d", convention=convention, component=comp, action="dropped")
            if len(marks) < 2:
                _note(opts, spec, volume, "fewer than two structures left after resampling",
                      dims="2d", convention=convention)
            else:
                grey = apply_window(resample_image(disp_img[f], grid), window)
                by_label = _visible_world(volume, spec, [m.label for m in marks])
                world = {m.component: by_label[m.label] for m in marks}
                layouts = {p: layout_letters(marks, p, size) for p in opts.prompts
                           if p != NO_PROMPT}
                for prompt, background in factor_cells(opts.prompts, opts.backgrounds):
                    rid = render_id(spec.slice_id, "2d", convention, prompt, background)
                    placed = layouts.get(prompt)
                    img = draw(grey if background == "scan" else None, marks, prompt, size,
                               placed)
                    shown = prompt != NO_PROMPT  # no letter or colour without a prompt
                    rows = [{**base, "render_id": rid, "convention": convention,
                             "dims": "2d", "prompt": prompt, "background": background,
                             "image_path": f"images/{rid}.png", "n_frames": 1,
                             "pixel_mm": grid.pixel_mm, "letter": m.letter if shown else None,
                             "component": m.component, "label": m.label,
                             "color": m.color if shown else None,
                             "centroid_col": m.centroid[0], "centroid_row": m.centroid[1],
                             "centroid_frame": None,
                             "frame_first": None, "frame_last": None,
                             "visible_x": world[m.component][0],
                             "visible_y": world[m.component][1],
                             "visible_z": world[m.component][2],
                             "visible_area_mm2": chosen[m.component],
                             "visible_frames": None,
                             **_letter_columns(placed[i] if shown else None, None)}
                            for i, m in enumerate(marks)]
                    letters_drawn = ([] if placed is None else
                                     [_letter_record(rid, 0, m, p)
                                      for m, p in zip(marks, placed, strict=True)])
                    renders.append(Render(rid, [img], rows, letters_drawn))
        if "3d" in opts.dims and n_frames >= 2:
            renders += _render_stack(volume, spec, opts, convention, disp_img, disp_lab, grid,
                                     letters, name_to_label, window, n_frames, base,
                                     min_px=opts.min_frame_area_mm2 / px_mm2)
        elif "3d" in opts.dims:
            _note(opts, spec, volume, f"frames_3d={opts.frames_3d}: a stack needs at least 2",
                  dims="3d", convention=convention)
    return renders


def _render_stack(volume, spec, opts, convention, disp_img, disp_lab, grid, letters,
                  name_to_label, window, n_frames, base, min_px) -> list[Render]:
    labels = [name_to_label[c] for c in letters]
    frames = _stack_frames(disp_lab, labels, n_frames)
    size = grid.size
    per_frame = [frame_marks(resample_labels(disp_lab[f], grid), letters, name_to_label, min_px)
                 for f in frames]
    seen: dict[str, list[tuple[int, Mark]]] = {}
    for i, marks in enumerate(per_frame):
        for m in marks:
            seen.setdefault(m.component, []).append((i, m))
    if len(seen) < 2:
        _note(opts, spec, volume, "fewer than two structures visible on the stack's frames",
              dims="3d", convention=convention)
        return []
    greys = [apply_window(resample_image(disp_img[f], grid), window) for f in frames]
    centroid3d = {c: volume.centroid(name_to_label[c]) for c in seen}
    # The frame where each structure shows largest: its renders.parquet row records the
    # letter there (letters.parquet has every frame).
    ref_frame = {c: max(hits, key=lambda h: (h[1].area_px, -h[0]))[0] for c, hits in seen.items()}
    layouts = {p: [layout_letters(marks, p, size) for marks in per_frame]
               for p in opts.prompts if p != NO_PROMPT}
    renders = []
    for prompt, background in factor_cells(opts.prompts, opts.backgrounds):
        rid = render_id(spec.slice_id, "3d", convention, prompt, background)
        placed = layouts.get(prompt)
        images = [draw(g if background == "scan" else None, marks, prompt, size,
                       None if placed is None else placed[i])
                  for i, (g, marks) in enumerate(zip(greys, per_frame, strict=True))]
        shown = prompt != NO_PROMPT  # no letter or colour without a prompt
        letters_drawn = [] if placed is None else [
            _letter_record(rid, i, m, p) for i, marks in enumerate(per_frame)
            for m, p in zip(marks, placed[i], strict=True)]
        rows = []
        for comp, hits in sorted(seen.items(), key=lambda kv: kv[1][0][1].letter):
            m0 = hits[0][1]
            f_ref = ref_frame[comp]
            at_ref = None
            if shown:
                marks = per_frame[f_ref]
                at_ref = placed[f_ref][next(i for i, m in enumerate(marks)
                                            if m.component == comp)]
            areas = np.array([m.area_px for _, m in hits], float)
            rows.append({**base, "render_id": rid, "convention": convention, "dims": "3d",
                         "prompt": prompt, "background": background,
                         "image_path": f"stacks/{rid}/", "n_frames": len(frames),
                         "pixel_mm": grid.pixel_mm, "letter": m0.letter if shown else None,
                         "component": comp, "label": m0.label,
                         "color": m0.color if shown else None,
                         "centroid_col": float(np.mean([m.centroid[0] for _, m in hits])),
                         "centroid_row": float(np.mean([m.centroid[1] for _, m in hits])),
                         "centroid_frame": float(np.average([f for f, _ in hits],
                                                            weights=areas)),
                         "frame_first": hits[0][0], "frame_last": hits[-1][0],
                         "visible_x": centroid3d[comp][0], "visible_y": centroid3d[comp][1],
                         "visible_z": centroid3d[comp][2], "visible_area_mm2": None,
                         "visible_frames": len(hits),
                         **_letter_columns(at_ref, f_ref if shown else None)})
        renders.append(Render(rid, images, rows, letters_drawn))
    return renders


def _letter_columns(p: LetterPlacement | None, frame: int | None) -> dict[str, Any]:
    """The letter columns of a renders.parquet row (null without a prompt)."""
    if p is None:
        return {"letter_col": None, "letter_row": None, "anchor_col": None,
                "anchor_row": None, "leader": None, "letter_frame": None}
    return {"letter_col": p.centre[0], "letter_row": p.centre[1], "anchor_col": p.anchor[0],
            "anchor_row": p.anchor[1], "leader": p.leader, "letter_frame": frame}


def _letter_record(rid: str, frame: int, m: Mark, p: LetterPlacement) -> dict[str, Any]:
    """One letters.parquet row: a letter as drawn on one frame."""
    return {"render_id": rid, "frame": frame, "letter": m.letter, "component": m.component,
            "letter_col": p.centre[0], "letter_row": p.centre[1], "anchor_col": p.anchor[0],
            "anchor_row": p.anchor[1], "leader": p.leader}


# --------------------------------------------------------------------------- the stage


def _options(params: dict[str, Any], skipped: list | None = None) -> RenderOptions:
    return RenderOptions(
        conventions=params["conventions"], prompts=params["prompts"],
        backgrounds=params["backgrounds"], dims=params.get("dims", DIMS),
        image_size=params["image_size"], frames_3d=params["frames_3d"],
        max_labels=params["max_labels"], min_visible_area_mm2=params["min_visible_area_mm2"],
        min_frame_area_mm2=params.get("min_frame_area_mm2", 5.0), seed=params["seed"],
        skipped=[] if skipped is None else skipped)


def save_render(render: Render, benchmark: Path) -> None:
    """Write a render's PNG (2D) or its folder of frames (3D) under ``benchmark``."""
    path = benchmark / render.rows[0]["image_path"]
    if render.rows[0]["dims"] == "2d":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(render.frames[0]))
    else:
        path.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(render.frames):
            (path / f"frame_{i:03d}.png").write_bytes(png_bytes(frame))


def render_volume(task: dict[str, Any]) -> tuple[list[dict], list[dict], list[dict]]:
    """Worker: render every slice of one volume and save the images.

    ``task`` holds ``prepared``, ``benchmark`` (folders), ``volume`` (a volumes.parquet row
    as a dict), ``components`` (that volume's rows), ``slices`` (list of dicts) and
    ``params``. Returns (renders rows, skipped rows, letters rows); a bad file or slice is recorded as
    skipped, never raised, so one broken input does not lose the run.
    """
    params = task["params"]
    skipped: list[dict] = []
    opts = _options(params, skipped)
    rows: list[dict] = []
    vol_row = pd.Series(task["volume"])
    try:
        volume = load_volume(Path(task["prepared"]), vol_row, pd.DataFrame(task["components"]),
                             params.get("mri_window_percentiles", (1.0, 99.0)))
    except Exception as err:  # noqa: BLE001 - any unreadable volume is skipped, named
        for s in task["slices"]:
            skipped.append({"slice_id": s["slice_id"], "volume_id": task["volume"]["volume_id"],
                            "plane": s["plane"], "dims": None, "convention": None,
                            "component": None, "action": "skipped",
                            "reason": f"cannot load volume: {err}"})
        return rows, skipped, []
    letters: list[dict] = []
    benchmark = Path(task["benchmark"])
    for s in task["slices"]:
        comps = s.get("components")
        spec = SliceSpec(str(s["slice_id"]), str(s["plane"]), int(s["index"]),
                         None if comps is None else [str(c) for c in comps])
        try:
            for render in render_slice(volume, spec, opts):
                save_render(render, benchmark)
                rows.extend(render.rows)
                letters.extend(render.letters)
        except Exception as err:  # noqa: BLE001 - record and go on with the next slice
            _note(opts, spec, volume, f"render failed: {type(err).__name__}: {err}")
    return rows, skipped, letters


def _input_files(prepared: Path, volumes: pd.DataFrame, slices: pd.DataFrame,
                 planes: Iterable[str]) -> dict[str, Path]:
    """Every stage-01 file a render reads, by its name in ``volumes.parquet`` (relative to
    ``prepared``): the three tables, and the canonical image and label map of each volume
    that has a slice in ``planes`` (those volumes are loaded)."""
    used = set(slices.loc[slices["plane"].isin(list(planes)), "volume_id"])
    rows = volumes[volumes["volume_id"].isin(used)]
    names = [*INPUT_FILES, *map(str, rows["canonical_image"]), *map(str, rows["canonical_labels"])]
    return {name: prepared / name for name in names}


def _read_inputs(prepared: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    tables = []
    for name, needed in ((VOLUMES_FILE, {"volume_id", "source", "modality",
                                              "canonical_image", "canonical_labels"}),
                         (COMPONENTS_FILE, {"volume_id", "component", "label"}),
                         (SLICES_FILE, {"slice_id", "volume_id", "plane", "index"})):
        path = prepared / name
        if not path.is_file():
            raise FileNotFoundError(f"missing stage-01 output {path}; run stage 01 "
                                    "(python -m mislib prepare) first")
        table = pd.read_parquet(path)
        missing = needed - set(table.columns)
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        tables.append(table)
    return tuple(tables)


def render_benchmark(profile: str = "demo", root: str | os.PathLike | None = None,
                     force: bool = False, **overrides: Any) -> pd.DataFrame:
    """Stage 02: render every chosen slice in every factor cell; return ``renders.parquet``.

    Parameters
    ----------
    profile : str
        Profile name or TOML path; its ``[render]`` table holds the knobs.
    root : path, optional
        Project root (default: the repository); reads ``data/prepared``, writes
        ``data/benchmark``.
    force : bool
        Re-render even when the stamp matches the configuration and inputs. The inputs are
        stage 01's tables and the canonical volumes the chosen slices come from: editing or
        removing one of them makes the stage stale.
    **overrides
        ``[render]`` keys, e.g. ``prompts=["mask"]``, ``workers=1``.

    Returns
    -------
    pandas.DataFrame
        One row per (render, label); see ``data/README.md``.
    """
    paths = project_paths(root)
    params = stage_params(profile, "render", **overrides)
    volumes, components, slices = _read_inputs(paths.prepared)
    out = paths.benchmark
    # the tables and the canonical volumes: a volume edited or removed after this stage ran
    # makes its renders stale (digests re-read only for files whose size or mtime changed)
    previous = (read_stamp(out, "render") or {}).get("input_files")
    files = _input_files(paths.prepared, volumes, slices, params["planes"])
    inputs = input_digests(files.values(), previous, int(params.get("workers", 1)))
    digests = digests_only(inputs)
    # keyed by the name under data/prepared, so a moved project keeps its stamp
    stamp_params = {**params, "inputs": config_hash({name: digests[str(path)]
                                                      for name, path in files.items()})}
    stamp_params.pop("workers", None)  # the worker count does not change the outputs
    outputs = [RENDERS_FILE, SKIPPED_FILE, LETTERS_FILE, "images", "stacks"]
    run = StageRun(out, "render", stamp_params, outputs, inputs)
    if not force and run.fresh():
        return pd.read_parquet(out / RENDERS_FILE)
    _options(params)  # validate before writing anything
    # images, stacks and tables are written aside and moved in together (mislib.stage)
    with run:
        renders = _render_into(run, paths, params, volumes, components, slices)
    return renders


def _render_into(run: StageRun, paths, params: dict[str, Any], volumes: pd.DataFrame,
                 components: pd.DataFrame, slices: pd.DataFrame) -> pd.DataFrame:
    """Render every chosen slice into the run's staging folder; write its tables there."""
    out = run.staging
    for folder in ("images", "stacks"):
        (out / folder).mkdir(exist_ok=True)
    chosen = slices[slices["plane"].isin(params["planes"])]
    tasks = []
    for vid, group in chosen.groupby("volume_id", sort=True):
        vrow = volumes[volumes["volume_id"] == vid]
        slice_rows = [{k: (list(v) if k == "components" and v is not None else v)
                       for k, v in r.items()} for r in group.sort_values("slice_id")
                      .to_dict("records")]
        if vrow.empty:
            raise ValueError(f"slices.parquet names volume {vid!r} that volumes.parquet lacks")
        tasks.append({"prepared": str(paths.prepared), "benchmark": str(out),
                      "volume": vrow.iloc[0].to_dict(), "slices": slice_rows,
                      "components": components[components["volume_id"] == vid]
                      .to_dict("list"), "params": params})
    rows, skipped, letters = _run_tasks(tasks, int(params.get("workers", 1)))
    renders = pd.DataFrame(rows, columns=RENDER_COLUMNS)
    renders = renders.sort_values(["render_id", "letter"], kind="stable").reset_index(drop=True)
    for col in ("frame_first", "frame_last", "visible_frames", "n_frames", "label",
                "letter_frame"):
        renders[col] = renders[col].astype("Int64")
    renders["leader"] = renders["leader"].astype("boolean")
    for col in ("centroid_frame", "letter_col", "letter_row", "anchor_col", "anchor_row"):
        renders[col] = renders[col].astype(float)
    letters_df = (pd.DataFrame(letters, columns=LETTER_COLUMNS)
                  .astype({"frame": "int64", "leader": bool})
                  .sort_values(["render_id", "frame", "letter"], kind="stable")
                  .reset_index(drop=True))
    skipped_df = pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)
    renders.to_parquet(run.path(RENDERS_FILE), index=False)
    skipped_df.to_parquet(run.path(SKIPPED_FILE), index=False)
    letters_df.to_parquet(run.path(LETTERS_FILE), index=False)
    return renders


def _run_tasks(tasks: list[dict], workers: int) -> tuple[list[dict], list[dict], list[dict]]:
    rows: list[dict] = []
    skipped: list[dict] = []
    letters: list[dict] = []
    bar = tqdm(total=len(tasks), desc="render volumes", unit="vol")
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            r, s, lt = render_volume(task)
            rows += r
            skipped += s
            letters += lt
            bar.update()
    else:
        # spawn: safe inside Jupyter kernels and with threaded BLAS, unlike fork
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx) as pool:
            futures = {pool.submit(render_volume, t): t for t in tasks}
            for fut in as_completed(futures):
                task = futures[fut]
                try:
                    r, s, lt = fut.result()
                except Exception as err:  # noqa: BLE001 - a crashed worker loses one volume
                    r, lt = [], []
                    s = [{"slice_id": sl["slice_id"], "volume_id": task["volume"]["volume_id"],
                          "plane": sl["plane"], "dims": None, "convention": None,
                          "component": None, "action": "skipped",
                          "reason": f"worker failed: {type(err).__name__}: {err}"}
                         for sl in task["slices"]]
                rows += r
                skipped += s
                letters += lt
                bar.update()
    bar.close()
    return rows, skipped, letters


# --------------------------------------------------------------------------- figures


def load_prepared_volume(volume_id: str, root: str | os.PathLike | None = None,
                         percentiles: Sequence[float] = (1.0, 99.0)) -> Volume:
    """One prepared volume of stage 01 by id (for notebooks and figures)."""
    prepared = project_paths(root).prepared
    volumes, components, _ = _read_inputs(prepared)
    row = volumes[volumes["volume_id"] == volume_id]
    if row.empty:
        raise ValueError(f"{prepared / 'volumes.parquet'}: no volume {volume_id!r}")
    return load_volume(prepared, row.iloc[0], components, percentiles)


def contact_sheet(volume: Volume, ijk: Sequence[int], opts: RenderOptions | None = None):
    """The factors on one page: the three planes through voxel ``ijk`` × two conventions
    (rows) × the scan without a prompt, the three prompts on the scan and the mask prompt
    on a blank background (columns). Rendered in memory by :func:`render_slice`, exactly as the stage renders.

    Returns a matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    base = opts or RenderOptions()
    cells = [(p, "scan") for p in PROMPTS] + [("mask", "blank")]
    rows = [(plane, conv) for plane in PLANES for conv in CONVENTIONS]
    fig, axes = plt.subplots(len(rows), len(cells), figsize=(2.3 * len(cells), 2.3 * len(rows)),
                             squeeze=False)
    for r, (plane, convention) in enumerate(rows):
        fixed, _ = plane_axes(plane)
        spec = SliceSpec(f"{volume.volume_id}-{plane}-{int(ijk[fixed]):04d}", plane,
                         int(ijk[fixed]))
        o = RenderOptions(conventions=[convention], prompts=PROMPTS, backgrounds=BACKGROUNDS,
                          dims=["2d"], image_size=base.image_size, max_labels=base.max_labels,
                          min_visible_area_mm2=base.min_visible_area_mm2, seed=base.seed)
        found = {(x.rows[0]["prompt"], x.rows[0]["background"]): x
                 for x in render_slice(volume, spec, o)}
        m = screen_mapping(plane, convention)
        for c, cell in enumerate(cells):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if cell in found:
                ax.imshow(found[cell].frames[0])
            else:
                ax.text(0.5, 0.5, "skipped", ha="center", va="center", transform=ax.transAxes)
            if r == 0:
                ax.set_title(f"{cell[0]} on {cell[1]}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{plane}\n{convention}\nup {m.up}, left {m.left}", fontsize=8)
    fig.tight_layout()
    return fig


def contact_sheet_for(volume_id: str, params: dict[str, Any],
                      root: str | os.PathLike | None = None):
    """:func:`contact_sheet` of one prepared volume through the mean of its structures'
    centres (each structure counts once, so a large one such as the cerebellum does not pull
    the planes away from the small deep ones), with the ``[render]`` parameters ``params``
    (image size, labels, areas, seed, MRI percentiles) — the figure notebook 02 shows per
    source. Returns a matplotlib Figure."""
    from scipy import ndimage

    volume = load_prepared_volume(volume_id, root=root,
                                  percentiles=params.get("mri_window_percentiles", (1.0, 99.0)))
    present = [v for v in sorted(volume.names) if (volume.labels == v).any()]
    centres = ndimage.center_of_mass(np.ones(volume.labels.shape), volume.labels, present)
    centre = np.round(np.mean(centres, axis=0)).astype(int)
    opts = RenderOptions(image_size=params["image_size"], max_labels=params["max_labels"],
                         min_visible_area_mm2=params["min_visible_area_mm2"],
                         seed=params["seed"])
    fig = contact_sheet(volume, centre, opts)
    fig.suptitle(f"{volume_id} ({volume.modality})", fontsize=10)
    fig.tight_layout()
    return fig


def stack_strip(benchmark: str | os.PathLike, renders: pd.DataFrame, render_id: str,
                n_show: int = 8, columns: int = 4, width: float = 7.5):
    """``n_show`` evenly spaced frames of a stored 3D stack, frame numbers and letters' span.

    The frames are laid out in reading order as a grid of ``columns`` a row, ``width``
    inches wide (a page), so the letters stay readable at page width.

    Returns a matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    rows = renders[renders["render_id"] == render_id]
    if rows.empty or rows["dims"].iloc[0] != "3d":
        raise ValueError(f"{render_id!r} is not a 3D render in renders.parquet")
    folder = Path(benchmark) / rows["image_path"].iloc[0]
    frames = sorted(folder.glob("frame_*.png"))
    picks = np.unique(np.round(np.linspace(0, len(frames) - 1, min(n_show, len(frames))))
                      .astype(int))
    columns = max(1, min(columns, len(picks)))
    n_rows = -(-len(picks) // columns)
    panel = width / columns
    fig, axes = plt.subplots(n_rows, columns, figsize=(width, (panel + 0.3) * n_rows + 0.6),
                             squeeze=False)
    for ax in axes.flat[len(picks):]:
        ax.set_visible(False)
    m = screen_mapping(rows["plane"].iloc[0], rows["convention"].iloc[0])
    for ax, i in zip(axes.flat, picks, strict=False):
        with Image.open(frames[i]) as img:
            ax.imshow(np.asarray(img))
        ax.set_title(f"frame {i}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    spans = "; ".join(f"{'' if pd.isna(r.letter) else r.letter + ' '}{r.component} "
                      f"{r.frame_first}-{r.frame_last}"
                      for r in rows.sort_values(["letter", "component"]).itertuples())
    fig.suptitle(f"{render_id}: frames run toward {m.frame}\n{spans}", fontsize=8)
    fig.tight_layout()
    return fig
