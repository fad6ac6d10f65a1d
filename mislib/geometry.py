"""Geometry in the world frame RAS+ (millimetres) and the two display conventions.

World axes follow nibabel: +x toward patient Right, +y Anterior, +z Superior. Directions are
written as nibabel axis codes (``"R"``, ``"L"``, ``"A"``, ``"P"``, ``"S"``, ``"I"``).

The display conventions (DESIGN.md §4) live in one table, :data:`SCREEN_MAPPINGS`: for each
(plane, convention) the world direction that points to the image's right, the one that
points down the image, and the one in which frame index grows in a 3D stack. The renderer
and the question ground truth both read it through :func:`screen_mapping`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

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
