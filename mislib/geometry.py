"""Geometry in the world frame RAS+ (millimetres) and the two display conventions.

World axes follow nibabel: +x toward patient Right, +y Anterior, +z Superior. Directions are
written as nibabel axis codes (``"R"``, ``"L"``, ``"A"``, ``"P"``, ``"S"``, ``"I"``).

The display conventions (docs/design.md, "Geometry and the two display conventions") live
in one table, :data:`SCREEN_MAPPINGS`: for each (plane, convention) the world direction that
points to the image's right, the one that points down the image, and the one in which frame
index grows in a 3D stack. The renderer and the question ground truth both read it through
:func:`screen_mapping`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

PLANES = ("axial", "coronal", "sagittal")
CONVENTIONS = ("standard", "storage")

#: World unit vectors of the six axis codes (RAS+).
AXIS_VECTORS: dict[str, np.ndarray] = {
    "R": np.array([1.0, 0.0, 0.0]),
    "L": np.array([-1.0, 0.0, 0.0]),
    "A": np.array([0.0, 1.0, 0.0]),
    "P": np.array([0.0, -1.0, 0.0]),
    "S": np.array([0.0, 0.0, 1.0]),
    "I": np.array([0.0, 0.0, -1.0]),
}
OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}

#: The nibabel axis codes the ``storage`` convention reorients to: index 0 of every axis is
#: its right-, anterior-, superior-most voxel ("origin at the RAS-most voxel").
STORAGE_AXCODES = ("L", "P", "I")


def plane_axes(plane: str) -> tuple[int, tuple[int, int]]:
    """World axis held fixed by ``plane`` and the two in-plane axes (0=x, 1=y, 2=z).

    >>> plane_axes("coronal")
    (1, (0, 2))
    """
    fixed = {"sagittal": 0, "coronal": 1, "axial": 2}
    if plane not in fixed:
        raise ValueError(f"unknown plane {plane!r}; expected one of {PLANES}")
    axis = fixed[plane]
    return axis, tuple(a for a in range(3) if a != axis)


class ScreenMapping(NamedTuple):
    """How world directions appear on screen for one (plane, convention).

    ``right``/``down``: the world direction (axis code) pointing to the image's right / down
    the image; ``frame``: the world direction of increasing frame index in a 3D stack.
    ``left``, ``up`` and ``frame_back`` are their opposites.
    """

    plane: str
    convention: str
    right: str
    down: str
    frame: str

    @property
    def left(self) -> str:
        return OPPOSITE[self.right]

    @property
    def up(self) -> str:
        return OPPOSITE[self.down]

    def vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World unit vectors (3,) of image-right, image-down and frame order."""
        return AXIS_VECTORS[self.right], AXIS_VECTORS[self.down], AXIS_VECTORS[self.frame]


#: (plane, convention) -> (image right, image down, frame order), as world axis codes.
#:
#: standard (radiological): axial seen from the feet (up = A, patient right on image left),
#: coronal seen from the front (up = S, patient right on image left), sagittal with up = S
#: and anterior on the image left. Frames run near -> far: axial I->S, coronal A->P,
#: sagittal L->R.
#: storage: the LPI-reoriented array drawn as indexed (row = first remaining axis, column =
#: second); frames run in increasing array index (axial S->I, coronal A->P, sagittal R->L).
SCREEN_MAPPINGS: dict[tuple[str, str], tuple[str, str, str]] = {
    ("axial", "standard"): ("L", "P", "S"),
    ("coronal", "standard"): ("L", "I", "P"),
    ("sagittal", "standard"): ("P", "I", "R"),
    ("axial", "storage"): ("P", "L", "I"),
    ("coronal", "storage"): ("I", "L", "P"),
    ("sagittal", "storage"): ("I", "P", "L"),
}


def screen_mapping(plane: str, convention: str) -> ScreenMapping:
    """The one mapping from world axes to screen axes for a (plane, convention).

    >>> m = screen_mapping("axial", "standard")
    >>> (m.up, m.left, m.frame)   # anterior up, patient right on the image left, I -> S
    ('A', 'R', 'S')
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; expected one of {CONVENTIONS}")
    plane_axes(plane)  # validates the plane
    return ScreenMapping(plane, convention, *SCREEN_MAPPINGS[(plane, convention)])


def screen_offset(delta_mm: np.ndarray, mapping: ScreenMapping) -> np.ndarray:
    """Project world displacements onto (right, down, frame) screen axes.

    Parameters
    ----------
    delta_mm : array (..., 3)
        World displacements in RAS+ millimetres.

    Returns
    -------
    array (..., 3)
        Components along image-right, image-down and increasing frame index (mm).
    """
    basis = np.stack(mapping.vectors())  # (3 screen axes, 3 world axes)
    return np.asarray(delta_mm, dtype=float) @ basis.T


# ----------------------------------------------------------------------------------------
# World geometry of volumes (stage 01)
# ----------------------------------------------------------------------------------------

COMPONENT_COLUMNS = ("component", "label", "voxels", "volume_mm3",
                     "centroid_x", "centroid_y", "centroid_z",
                     "min_x", "min_y", "min_z", "max_x", "max_y", "max_z")


class GeometryError(ValueError):
    """A volume whose geometry cannot be used (oblique affine, mismatched grids, ...)."""


def is_axis_aligned(affine: np.ndarray, tol: float = 1e-3) -> bool:
    """True when every voxel axis runs along one world axis (no obliquity).

    Parameters
    ----------
    affine : array (4, 4)
        Voxel-to-world (RAS+ mm) affine.
    tol : float
        Largest off-axis component allowed, relative to the axis' length.
    """
    rzs = np.asarray(affine, dtype=float)[:3, :3]
    lengths = np.linalg.norm(rzs, axis=0)
    if np.any(lengths == 0):
        return False
    cosines = np.abs(rzs / lengths)
    # one entry per column close to 1, and a permutation across columns
    return bool(np.all(np.sort(cosines, axis=0)[:2] <= tol)
                and len(set(np.argmax(cosines, axis=0))) == 3)


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (3,) in mm along each array axis."""
    return np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)


def to_canonical(img, name: str = "image"):
    """``img`` reoriented so that array axes grow toward R, A, S (nibabel's RAS+ canonical).

    Uses :func:`nibabel.as_closest_canonical`; an oblique affine is rejected (resampling it
    would change the voxels the masks were drawn on), with ``name`` in the message.
    """
    import nibabel as nib

    if not is_axis_aligned(img.affine):
        codes = "".join(nib.aff2axcodes(img.affine))
        raise GeometryError(
            f"{name}: oblique affine (closest orientation {codes}); resample it to an "
            "axis-aligned grid before preparing")
    return nib.as_closest_canonical(img)


def centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World centroid (3,) in RAS+ mm of the voxel centres where ``mask`` is true.

    >>> m = np.zeros((3, 3, 3), bool); m[2, 1, 0] = True
    >>> centroid_mm(m, np.diag([2.0, 2.0, 2.0, 1.0])).tolist()
    [4.0, 2.0, 0.0]
    """
    import nibabel as nib

    ijk = np.argwhere(mask)
    if len(ijk) == 0:
        raise ValueError("empty mask has no centroid")
    return nib.affines.apply_affine(affine, ijk.mean(axis=0))


def component_stats(labels: np.ndarray, affine: np.ndarray, names: dict[int, str],
                    boxes: list | None = None) -> pd.DataFrame:
    """Per-structure size, world centroid and bounding box of an integer label map.

    Parameters
    ----------
    labels : int array (X, Y, Z)
        0 = background; any storage orientation (the affine decides the world frame).
    affine : array (4, 4)
        Voxel-to-world affine (RAS+ mm); must be axis-aligned.
    names : dict int -> str
        Label value -> structure name. Labels absent from the map are skipped.
    boxes : list, optional
        ``scipy.ndimage.find_objects(labels)``, when the caller already has it.

    Returns
    -------
    DataFrame
        One row per label present, columns :data:`COMPONENT_COLUMNS` (mm, mm³; the bounding
        box spans voxel centres), sorted by label.
    """
    import nibabel as nib
    import pandas as pd
    from scipy import ndimage

    if not is_axis_aligned(affine):
        raise GeometryError("component_stats needs an axis-aligned affine")
    labels = np.asarray(labels)
    voxel_mm3 = float(np.prod(voxel_spacing(affine)))
    if boxes is None:
        boxes = ndimage.find_objects(labels)  # box of label v at index v - 1
    rows = []
    for value in sorted(names):
        if value <= 0 or value > len(boxes) or boxes[value - 1] is None:
            continue
        box = boxes[value - 1]
        ijk = np.argwhere(labels[box] == value) + [s.start for s in box]
        corners = nib.affines.apply_affine(affine, np.array(
            [[s.start for s in box], [s.stop - 1 for s in box]], dtype=float))
        lo, hi = corners.min(axis=0), corners.max(axis=0)
        centroid = nib.affines.apply_affine(affine, ijk.mean(axis=0))
        rows.append((names[value], int(value), len(ijk), len(ijk) * voxel_mm3, *centroid, *lo, *hi))
    return pd.DataFrame(rows, columns=list(COMPONENT_COLUMNS))


def component_table(image_path, labels_path, names: dict[int, str]) -> pd.DataFrame:
    """Component table of an image and its integer label map, in world RAS+ mm.

    Works for any storage orientation: geometry comes from the affine, never from the array
    order. The image is only read for its header (grid and affine must match the labels').

    Parameters
    ----------
    image_path, labels_path : path
        NIfTI files on the same grid.
    names : dict int -> str
        Label value -> structure name.

    Returns
    -------
    DataFrame with columns :data:`COMPONENT_COLUMNS` (see :func:`component_stats`).
    """
    import nibabel as nib

    image = nib.load(image_path)
    labels = nib.load(labels_path)
    check_same_grid(image, labels, str(image_path), str(labels_path))
    data = np.asanyarray(labels.dataobj)
    return component_stats(np.rint(data).astype(np.int32), labels.affine, names)


def check_same_grid(image, labels, image_name: str, labels_name: str,
                    atol: float = 1e-3) -> None:
    """Raise :class:`GeometryError` naming both files unless shapes and affines agree."""
    if tuple(image.shape[:3]) != tuple(labels.shape[:3]):
        raise GeometryError(f"{labels_name}: shape {tuple(labels.shape)} does not match "
                            f"{image_name} shape {tuple(image.shape)}")
    if not np.allclose(image.affine, labels.affine, atol=atol):
        raise GeometryError(f"{labels_name}: affine does not match the affine of {image_name}")
