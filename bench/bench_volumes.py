"""Stage 01 speed: seconds to prepare one realistic CT case in TotalSegmentator layout.

The case is generated on the fly: a 512 x 512 x 400 int16 CT (0.8 x 0.8 x 1.5 mm, stored LPS
as DICOM-derived CT is) and 67 binary masks ``segmentations/<class>.nii.gz`` under
TotalSegmentator class names, each an ellipsoid of organ size. Target: <= 15 s per volume
on a 2-core machine, for reading the CT and the 67 masks, reorienting, measuring the
components, choosing slices and writing the canonical volumes.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from mislib import volumes

N_STRUCTURES = 67
TARGET_S = 15.0


def write_case(case: Path, shape=(512, 512, 400), n_structures=N_STRUCTURES, seed=0) -> None:
    """A synthetic CT + masks in TotalSegmentator layout (LPS storage)."""
    rng = np.random.default_rng(seed)
    spacing = np.array([0.8, 0.8, 1.5])
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # L, P, S
    ct = rng.normal(40, 15, shape).astype(np.int16)
    (case / "segmentations").mkdir(parents=True)
    names = list(volumes.totalsegmentator_classes().values())[:n_structures]
    for name in names:
        radii = rng.uniform(8, 40, 3) / spacing
        centre = rng.uniform(radii, np.array(shape) - radii)
        lo = np.maximum(np.floor(centre - radii).astype(int), 0)
        hi = np.minimum(np.ceil(centre + radii).astype(int) + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        grid = np.ogrid[box]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1
        mask = np.zeros(shape, np.uint8)
        mask[box] = inside
        ct[mask > 0] = 300
        nib.save(nib.Nifti1Image(mask, affine), case / "segmentations" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(ct, affine), case / "ct.nii.gz")


def run(quick: bool = False) -> list[dict]:
    shape = (256, 256, 200) if quick else (512, 512, 400)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_case(root / "ts" / "s0001", shape=shape)
        setup_s = time.perf_counter() - t0
        case = volumes.totalsegmentator_cases(root / "ts")[0]
        params = {"seed": 0, "slices_per_volume": 2, "min_component_area_mm2": 50.0}
        t0 = time.perf_counter()
        result = volumes.prepare_case(case, root / "prepared", params)
        seconds = time.perf_counter() - t0
    if result.volume is None:
        raise RuntimeError(f"benchmark case was rejected: {result.rejected}")
    return [
        {"bench": "prepare_totalsegmentator_case", "metric": "seconds_per_volume",
         "value": round(seconds, 2), "unit": "s", "target": TARGET_S,
         "meets_target": seconds <= TARGET_S, "shape": list(shape),
         "n_masks": N_STRUCTURES, "n_components": int(result.volume["n_components"]),
         "setup_s": round(setup_s, 1)},
    ]
