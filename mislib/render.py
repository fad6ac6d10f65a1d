"""Stage 02: render the chosen slices and 3D stacks with visual prompts (DESIGN.md §4–5).

Inputs are stage 01's files under ``data/prepared/`` (canonical RAS+ volumes, ``volumes``,
``components`` and ``slices`` tables); outputs go to ``data/benchmark/``: PNG images
``images/<render_id>.png``, 3D stacks ``stacks/<render_id>/frame_000.png …``,
``renders.parquet`` (one row per (render, label)) and ``skipped.parquet`` (what was skipped
or trimmed, and why). See ``data/README.md`` for the columns.

Everything about orientation comes from :func:`mislib.geometry.screen_mapping`: a canonical
volume is turned into a *display volume* whose axes are (frame, row, column), growing toward
the mapping's (frame, down, right) world directions (:func:`display_volume`). Rows and
columns are then resampled to square pixels on a ``image_size`` square canvas
(:func:`square_grid`), so that the picture, the pixel centroids in ``renders.parquet`` and the
question ground truth all share one mapping.

Per (slice or frame, convention) the *layout* — which structures are visible, where each
one's point and letter go — is computed once and drawn in every (prompt, background) variant,
so factor cells differ only in the factor. The prompt level ``none`` is the no-prompt
baseline: the windowed scan alone, no marks and no letters, one image (or stack) per slice
and convention; its rows in ``renders.parquet`` still list the structures (centroids for the
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
import shutil
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from tqdm import tqdm

from mislib.config import config_hash, file_digest, is_fresh, stage_params, write_stamp
from mislib.geometry import (
    CONVENTIONS,
    PLANES,
    centroid_mm,
    plane_axes,
    screen_mapping,
    to_canonical,
    voxel_spacing,
)
from mislib.paths import project_paths

#: The visual-prompt levels; ``none`` (the scan only) is the no-prompt baseline.
PROMPTS = ("none", "mask", "box", "point")
NO_PROMPT = "none"
BACKGROUNDS = ("scan", "blank")
DIMS = ("2d", "3d")
LETTERS = "ABCDEF"

#: Okabe & Ito's colour-blind-safe palette without black and blue (both vanish on a dark
#: scan); one colour per letter slot, A..F.
PALETTE = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#D55E00", "#CC79A7")

#: CT windows as (width, level) in HU.
CT_WINDOWS = {"soft_tissue": (400.0, 40.0), "lung": (1500.0, -600.0), "bone": (1800.0, 400.0)}
#: Name prefixes (TotalSegmentator / knee names) that pick the lung or bone CT window.
LUNG_PREFIXES = ("lung", "trachea", "bronch")
BONE_PREFIXES = ("vertebra", "rib_", "sternum", "costal_cartilage", "hip_", "sacrum", "femur",
                 "humerus", "scapula", "clavicula", "skull", "tibia", "fibula", "patella")

RENDER_COLUMNS = [
    "render_id", "volume_id", "slice_id", "source", "modality", "plane", "convention", "dims",
    "prompt", "background", "image_path", "n_frames", "width", "height", "pixel_mm", "window",
    "letter", "component", "label", "color", "centroid_col", "centroid_row", "frame_first",
    "frame_last", "visible_x", "visible_y", "visible_z", "visible_area_mm2", "visible_frames",
]
SKIPPED_COLUMNS = ["slice_id", "volume_id", "plane", "dims", "convention", "component", "action",
                   "reason"]
INPUT_FILES = ("volumes.parquet", "components.parquet", "slices.parquet")


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
    """The CT preset for a structure set: the most common category; ties go to soft tissue."""
    counts = {"soft_tissue": 0, "lung": 0, "bone": 0}
    for name in components:
        low = name.lower()
        if low.startswith(LUNG_PREFIXES):
            counts["lung"] += 1
        elif low.startswith(BONE_PREFIXES):
            counts["bone"] += 1
        else:
            counts["soft_tissue"] += 1
    best = max(counts.values())
    return "soft_tissue" if counts["soft_tissue"] == best else max(counts, key=counts.get)


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
    """One structure on one displayed frame: where it is and where its prompt/letter go."""

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
    text_box: tuple[int, int, int, int] = (0, 0, 0, 0)  # (x0, y0, x1, y1) of the letter


def _coarse_distance(mask: np.ndarray, factor: int = 4) -> np.ndarray:
    """Distance (pixels) to the nearest ``mask`` pixel, on a grid ``factor`` times coarser.

    Letter placement only needs "how far from the structure", and the exact transform of
    every mask on every frame would dominate the rendering time.
    """
    n = mask.shape[0]
    m = -(-n // factor) * factor
    padded = np.zeros((m, m), bool)
    padded[:n, :n] = mask
    coarse = padded.reshape(m // factor, factor, m // factor, factor).any(axis=(1, 3))
    return ndimage.distance_transform_edt(~coarse) * factor


def place_letters(marks: list[Mark], size: int) -> None:
    """Give every mark a letter box next to its structure (sets ``Mark.text_box``).

    Hard constraints: inside the image, not overlapping a letter placed before, not covering
    a pixel of its own structure. Among the positions that pass, the one nearest the
    structure wins, with a penalty per covered pixel of another structure (weighted by that
    structure's size, so a small neighbour is never hidden). A structure too crowded for any
    free spot gets the least-bad position that still avoids other letters.
    """
    font, stroke, pad = _letter_style(size)
    tables = [_summed(m.mask) for m in marks]
    placed: list[tuple[int, int, int, int]] = []
    step, margin = (2 if size < 256 else 4), 2  # candidate grid; letters are ~size/20 tall
    for k, m in enumerate(marks):
        x0, y0, x1, y1 = font.getbbox(m.letter, stroke_width=stroke)
        w, h = x1 - x0 + 2 * pad, y1 - y0 + 2 * pad
        ys = np.arange(0, size - h + 1, step)
        xs = np.arange(0, size - w + 1, step)
        own = _rect_sums(tables[k], ys, xs, h, w)
        other_cost = np.zeros(own.shape)
        for j, o in enumerate(marks):
            if j != k:
                other_cost += _rect_sums(tables[j], ys, xs, h, w) * (100.0 / max(o.area_px, 1))
        coarse = _coarse_distance(m.mask)
        near = coarse[np.ix_((ys + h // 2) // 4, (xs + w // 2) // 4)]
        clash = np.zeros(own.shape, bool)
        for px0, py0, px1, py1 in placed:
            clash |= ((ys[:, None] < py1 + margin) & (ys[:, None] + h > py0 - margin)
                      & (xs[None, :] < px1 + margin) & (xs[None, :] + w > px0 - margin))
        cost = near + 20.0 * other_cost
        free = ~clash & (own == 0)
        if free.any():
            cost = np.where(free, cost, np.inf)
        else:
            cost = np.where(clash, np.inf, cost + 50.0 * own)
        iy, ix = np.unravel_index(int(np.argmin(cost)), cost.shape)
        box = (int(xs[ix]), int(ys[iy]), int(xs[ix]) + w, int(ys[iy]) + h)
        m.text_box = box
        placed.append(box)


def frame_marks(label_frame: np.ndarray, structures: dict[str, tuple[str, str]],
                name_to_label: dict[str, int], min_area_px: float) -> list[Mark]:
    """Marks of the chosen structures visible on one displayed frame (size, size).

    A structure counts as visible when it covers at least ``min_area_px`` pixels. Letters are
    placed by :func:`place_letters`; the point prompt sits at the pixel deepest inside the
    structure (largest distance to its border), which lies inside even for a C-shaped one.
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
    place_letters(marks, size)
    return marks


def _rgb(color: str) -> np.ndarray:
    return np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)], np.float32)


def draw(grey: np.ndarray | None, marks: list[Mark], prompt: str, size: int,
         alpha: float = 0.35) -> Image.Image:
    """Draw one frame: the scan (``grey`` (size, size) uint8) or a blank canvas, the prompts
    of ``prompt`` kind and the letters. Returns an RGB image.

    ``prompt="none"`` draws the scan alone: no prompt and no letter (the no-prompt baseline).
    """
    if prompt not in PROMPTS:
        raise ValueError(f"unknown prompt {prompt!r}; expected one of {PROMPTS}")
    base = np.zeros((size, size, 3), np.uint8)
    if grey is not None:
        base[:] = grey[..., None]
    if prompt == NO_PROMPT:
        return Image.fromarray(base, "RGB")
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
    width = max(1, size // 200)
    if prompt == "box":
        for m in marks:
            c0, r0, c1, r1 = m.bbox
            canvas.rectangle((max(c0 - width, 0), max(r0 - width, 0),
                              min(c1 + width, size - 1), min(r1 + width, size - 1)),
                             outline=m.color, width=width)
    elif prompt == "point":
        radius = max(3, size // 90)
        for m in marks:
            c, r = m.point
            canvas.ellipse((c - radius, r - radius, c + radius, r + radius), fill=m.color,
                           outline="#000000", width=1)
    font, stroke, pad = _letter_style(size)
    for m in marks:
        x0, y0, _, _ = font.getbbox(m.letter, stroke_width=stroke)
        bx, by, _, _ = m.text_box
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
    """One rendered image or stack: ``frames`` (PIL images) and one row per label."""

    render_id: str
    frames: list[Image.Image]
    rows: list[dict[str, Any]]


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
                for prompt, background in factor_cells(opts.prompts, opts.backgrounds):
                    rid = render_id(spec.slice_id, "2d", convention, prompt, background)
                    img = draw(grey if background == "scan" else None, marks, prompt, size)
                    shown = prompt != NO_PROMPT  # no letter or colour without a prompt
                    rows = [{**base, "render_id": rid, "convention": convention,
                             "dims": "2d", "prompt": prompt, "background": background,
                             "image_path": f"images/{rid}.png", "n_frames": 1,
                             "pixel_mm": grid.pixel_mm, "letter": m.letter if shown else None,
                             "component": m.component, "label": m.label,
                             "color": m.color if shown else None,
                             "centroid_col": m.centroid[0], "centroid_row": m.centroid[1],
                             "frame_first": None, "frame_last": None,
                             "visible_x": world[m.component][0],
                             "visible_y": world[m.component][1],
                             "visible_z": world[m.component][2],
                             "visible_area_mm2": chosen[m.component],
                             "visible_frames": None} for m in marks]
                    renders.append(Render(rid, [img], rows))
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
    renders = []
    for prompt, background in factor_cells(opts.prompts, opts.backgrounds):
        rid = render_id(spec.slice_id, "3d", convention, prompt, background)
        images = [draw(g if background == "scan" else None, marks, prompt, size)
                  for g, marks in zip(greys, per_frame, strict=True)]
        shown = prompt != NO_PROMPT  # no letter or colour without a prompt
        rows = []
        for comp, hits in sorted(seen.items(), key=lambda kv: kv[1][0][1].letter):
            m0 = hits[0][1]
            rows.append({**base, "render_id": rid, "convention": convention, "dims": "3d",
                         "prompt": prompt, "background": background,
                         "image_path": f"stacks/{rid}/", "n_frames": len(frames),
                         "pixel_mm": grid.pixel_mm, "letter": m0.letter if shown else None,
                         "component": comp, "label": m0.label,
                         "color": m0.color if shown else None,
                         "centroid_col": float(np.mean([m.centroid[0] for _, m in hits])),
                         "centroid_row": float(np.mean([m.centroid[1] for _, m in hits])),
                         "frame_first": hits[0][0], "frame_last": hits[-1][0],
                         "visible_x": centroid3d[comp][0], "visible_y": centroid3d[comp][1],
                         "visible_z": centroid3d[comp][2], "visible_area_mm2": None,
                         "visible_frames": len(hits)})
        renders.append(Render(rid, images, rows))
    return renders


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


def render_volume(task: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """Worker: render every slice of one volume and save the images.

    ``task`` holds ``prepared``, ``benchmark`` (folders), ``volume`` (a volumes.parquet row
    as a dict), ``components`` (that volume's rows), ``slices`` (list of dicts) and
    ``params``. Returns (renders rows, skipped rows); a bad file or slice is recorded as
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
        return rows, skipped
    benchmark = Path(task["benchmark"])
    for s in task["slices"]:
        comps = s.get("components")
        spec = SliceSpec(str(s["slice_id"]), str(s["plane"]), int(s["index"]),
                         None if comps is None else [str(c) for c in comps])
        try:
            for render in render_slice(volume, spec, opts):
                save_render(render, benchmark)
                rows.extend(render.rows)
        except Exception as err:  # noqa: BLE001 - record and go on with the next slice
            _note(opts, spec, volume, f"render failed: {type(err).__name__}: {err}")
    return rows, skipped


def _input_digest(prepared: Path) -> str:
    return config_hash({name: file_digest(prepared / name) for name in INPUT_FILES})


def _read_inputs(prepared: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    tables = []
    for name, needed in (("volumes.parquet", {"volume_id", "source", "modality",
                                              "canonical_image", "canonical_labels"}),
                         ("components.parquet", {"volume_id", "component", "label"}),
                         ("slices.parquet", {"slice_id", "volume_id", "plane", "index"})):
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
        Re-render even when the stamp matches the configuration and inputs.
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
    stamp_params = {**params, "inputs": _input_digest(paths.prepared)}
    stamp_params.pop("workers", None)  # the worker count does not change the outputs
    out = paths.benchmark
    outputs = ["renders.parquet", "skipped.parquet"]
    if not force and is_fresh(out, "render", stamp_params, outputs):
        return pd.read_parquet(out / "renders.parquet")
    _options(params)  # validate before deleting anything
    for folder in ("images", "stacks"):
        shutil.rmtree(out / folder, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

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
    rows, skipped = _run_tasks(tasks, int(params.get("workers", 1)))
    renders = pd.DataFrame(rows, columns=RENDER_COLUMNS)
    renders = renders.sort_values(["render_id", "letter"], kind="stable").reset_index(drop=True)
    for col in ("frame_first", "frame_last", "visible_frames", "n_frames", "label"):
        renders[col] = renders[col].astype("Int64")
    skipped_df = pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)
    renders.to_parquet(out / "renders.parquet", index=False)
    skipped_df.to_parquet(out / "skipped.parquet", index=False)
    write_stamp(out, "render", stamp_params, outputs)
    return renders


def _run_tasks(tasks: list[dict], workers: int) -> tuple[list[dict], list[dict]]:
    rows: list[dict] = []
    skipped: list[dict] = []
    bar = tqdm(total=len(tasks), desc="render volumes", unit="vol")
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            r, s = render_volume(task)
            rows += r
            skipped += s
            bar.update()
    else:
        # spawn: safe inside Jupyter kernels and with threaded BLAS, unlike fork
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx) as pool:
            futures = {pool.submit(render_volume, t): t for t in tasks}
            for fut in as_completed(futures):
                task = futures[fut]
                try:
                    r, s = fut.result()
                except Exception as err:  # noqa: BLE001 - a crashed worker loses one volume
                    r = []
                    s = [{"slice_id": sl["slice_id"], "volume_id": task["volume"]["volume_id"],
                          "plane": sl["plane"], "dims": None, "convention": None,
                          "component": None, "action": "skipped",
                          "reason": f"worker failed: {type(err).__name__}: {err}"}
                         for sl in task["slices"]]
                rows += r
                skipped += s
                bar.update()
    bar.close()
    return rows, skipped


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


def stack_strip(benchmark: str | os.PathLike, renders: pd.DataFrame, render_id: str,
                n_show: int = 8):
    """Every k-th frame of a stored 3D stack in a row, frame numbers and letters' span.

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
    fig, axes = plt.subplots(1, len(picks), figsize=(2.2 * len(picks), 2.6), squeeze=False)
    m = screen_mapping(rows["plane"].iloc[0], rows["convention"].iloc[0])
    for ax, i in zip(axes[0], picks, strict=True):
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
