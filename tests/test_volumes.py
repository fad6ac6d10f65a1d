"""Stage 01 (mislib.volumes, mislib.geometry): reading, reorienting, measuring, rejecting."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from mislib import demo_cases, geometry, phantoms, structures, volumes

# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def atlas_case(tmp_path_factory):
    """The real MNI152 template + neuromorphometrics atlas, written as a label-map case."""
    return phantoms.write_brain_atlas(tmp_path_factory.mktemp("atlas") / "mni152")


@pytest.fixture(scope="session")
def atlas_names(atlas_case):
    return volumes.read_label_names(atlas_case / "labels.csv")


DEMO_SOURCES = ["brain_atlas", "torso_ct", "torso_mr", "torso_ct_dicom", "knee_mri_phantom"]


@pytest.fixture(scope="module")
def sdist():
    """The pinned totalsegmentator sdist (downloaded once into the repository's .cache/)."""
    return demo_cases.fetch_sdist()


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory, sdist):
    """Stage 01 run once on the demo profile's sources plus the torso phantom (kept for tests),
    all written to data/raw/demo/ in their real layouts."""
    root = tmp_path_factory.mktemp("demo")
    volumes.prepare("demo", root=root, workers=1, sources=DEMO_SOURCES + ["torso_ct_phantom"])
    return root


def _components(root, volume_id):
    comps = pd.read_parquet(root / "data" / "prepared" / "components.parquet")
    table = comps[comps["volume_id"] == volume_id].set_index("component")
    assert len(table), volume_id
    return table


def _restore(src, dst, axcodes):
    """Re-store a NIfTI file in another orientation (same voxels, same world geometry)."""
    img = nib.load(src)
    ornt = ornt_transform(io_orientation(img.affine), axcodes2ornt(tuple(axcodes)))
    nib.save(img.as_reoriented(ornt), dst)


def _labelmap_case(folder, image, labels, affine, names, label_affine=None):
    """Write a generic label-map case: image.nii.gz, labels.nii.gz, labels.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), folder / "image.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine if label_affine is None else label_affine),
             folder / "labels.nii.gz")
    pd.DataFrame({"index": list(names), "name": list(names.values())}).to_csv(
        folder / "labels.csv", index=False)
    return folder


def _two_blobs(shape=(24, 20, 16)):
    labels = np.zeros(shape, np.int16)
    labels[2:8, 3:9, 4:10] = 1
    labels[14:20, 10:16, 6:12] = 2
    image = np.random.default_rng(0).normal(100, 10, shape).astype(np.float32)
    return image, labels


# ---- geometry ----------------------------------------------------------------------------


def test_component_stats_matches_brute_force_in_any_storage_order():
    image, labels = _two_blobs()
    affine = np.array([[0, 0, -2.5, 40], [1.5, 0, 0, -10], [0, -1.0, 0, 7], [0, 0, 0, 1]])
    table = geometry.component_stats(labels, affine, {1: "a", 2: "b"}).set_index("component")
    for value, name in ((1, "a"), (2, "b")):
        world = nib.affines.apply_affine(affine, np.argwhere(labels == value))
        row = table.loc[name]
        np.testing.assert_allclose(row[["centroid_x", "centroid_y", "centroid_z"]],
                                   world.mean(axis=0))
        np.testing.assert_allclose(row[["min_x", "min_y", "min_z"]], world.min(axis=0))
        np.testing.assert_allclose(row[["max_x", "max_y", "max_z"]], world.max(axis=0))
        assert row["voxels"] == (labels == value).sum()
        assert row["volume_mm3"] == pytest.approx(row["voxels"] * 2.5 * 1.5 * 1.0)


def test_oblique_affine_is_rejected_with_the_file_name():
    rot = np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot
    assert not geometry.is_axis_aligned(affine)
    with pytest.raises(geometry.GeometryError, match="scan.nii.gz: oblique affine"):
        geometry.to_canonical(nib.Nifti1Image(np.zeros((4, 4, 4)), affine), "scan.nii.gz")


# ---- the real brain atlas ----------------------------------------------------------------


def _twins(table):
    left = [n for n in table.index if n.startswith("Left_")]
    return [(n, "Right_" + n[len("Left_"):]) for n in left if "Right_" + n[len("Left_"):] in table.index]


@pytest.mark.parametrize("axcodes", ["LAS", "RAS", "PIR", "ILP"])
def test_atlas_left_structures_lie_left_of_their_right_twins_in_every_storage(
        atlas_case, atlas_names, tmp_path, axcodes):
    image, labels = tmp_path / "image.nii.gz", tmp_path / "labels.nii.gz"
    _restore(atlas_case / "image.nii.gz", image, axcodes)
    _restore(atlas_case / "labels.nii.gz", labels, axcodes)
    assert "".join(nib.aff2axcodes(nib.load(labels).affine)) == axcodes
    table = geometry.component_table(image, labels, atlas_names).set_index("component")
    twins = _twins(table)
    assert len(twins) >= 50
    for left, right in twins:
        # RAS+: patient left has the smaller x
        assert table.loc[left, "centroid_x"] < table.loc[right, "centroid_x"], (left, right)
    for side in ("Left", "Right"):
        assert (table.loc[f"{side}_Thalamus_Proper", "centroid_z"]
                > table.loc["Brain_Stem", "centroid_z"] + 20)
    # the cerebellum lies behind the thalami
    assert (table.loc["Left_Cerebellum_Exterior", "centroid_y"]
            < table.loc["Left_Thalamus_Proper", "centroid_y"] - 20)


def test_atlas_component_table_is_the_same_in_every_storage(atlas_case, atlas_names, tmp_path):
    reference = geometry.component_table(atlas_case / "image.nii.gz",
                                         atlas_case / "labels.nii.gz", atlas_names)
    _restore(atlas_case / "image.nii.gz", tmp_path / "i.nii.gz", "SPR")
    _restore(atlas_case / "labels.nii.gz", tmp_path / "l.nii.gz", "SPR")
    restored = geometry.component_table(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz",
                                        atlas_names)
    pd.testing.assert_frame_equal(reference, restored, atol=1e-6)


# ---- the demo run ------------------------------------------------------------------------


def test_demo_profile_lists_the_real_ct_and_mr_sources_beside_atlas_and_knee():
    from mislib.config import stage_params

    assert stage_params("demo", "volumes")["sources"] == DEMO_SOURCES


def test_demo_prepares_every_source(demo_root):
    prepared = demo_root / "data" / "prepared"
    vols = pd.read_parquet(prepared / "volumes.parquet")
    assert set(vols["source"]) == set(DEMO_SOURCES) | {"torso_ct_phantom"}
    assert set(vols["storage_axcodes"]) >= {"LAS", "LPS", "RAS"}
    # TotalSegmentator writes a file per class, present or not: empty ones are notes, and a
    # case whose segmentations/ lacks some classes' files (the phantoms, the sdist's aorta
    # case) gets one note with the count; no case is lost
    rejected = pd.read_parquet(prepared / "rejected.parquet")
    missing = rejected["reason"].str.contains("TotalSegmentator classes have no mask file")
    assert (rejected["reason"].str.endswith(": empty mask") | missing).all(), \
        rejected["reason"].tolist()
    assert set(rejected["source"]) <= {"torso_ct", "torso_ct_phantom"}
    assert set(rejected["case"]) <= set(vols["case"])
    for row in vols.itertuples():
        img = nib.load(prepared / row.canonical_image)
        lab = nib.load(prepared / row.canonical_labels)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert img.shape == lab.shape == (row.shape_x, row.shape_y, row.shape_z)
        np.testing.assert_allclose(img.affine, lab.affine)


def test_torso_phantom_anatomy_survives_lps_storage(demo_root):
    prepared = demo_root / "data" / "prepared"
    vols = pd.read_parquet(prepared / "volumes.parquet").set_index("volume_id")
    comps = pd.read_parquet(prepared / "components.parquet")
    torso = vols.index[vols["source"] == "torso_ct_phantom"]
    assert "LPS" in set(vols.loc[torso, "storage_axcodes"])
    for vid in torso:
        t = comps[comps["volume_id"] == vid].set_index("component")
        assert t.loc["liver", "centroid_x"] > 0 > t.loc["spleen", "centroid_x"]  # patient right
        assert t.loc["heart", "centroid_z"] > t.loc["liver", "centroid_z"] > \
            t.loc["urinary_bladder", "centroid_z"]
        assert t.loc["kidney_left", "centroid_y"] < t.loc["small_bowel", "centroid_y"]
        assert set(t.index) <= set(volumes.totalsegmentator_classes().values())


def test_torso_phantom_has_fat_muscle_and_corticated_bone(tmp_path):
    from scipy import ndimage

    case = phantoms.write_torso_ct_phantom(tmp_path / "s", seed=5, storage_axcodes="LPS")
    ct = nib.as_closest_canonical(nib.load(case / "ct.nii.gz"))
    hu = np.asarray(ct.dataobj).astype(float)

    def mask(name):
        img = nib.as_closest_canonical(nib.load(case / "segmentations" / f"{name}.nii.gz"))
        return np.asarray(img.dataobj) > 0

    vertebra = mask("vertebrae_L3")
    core = ndimage.binary_erosion(vertebra, iterations=2)
    assert np.median(hu[vertebra & ~ndimage.binary_erosion(vertebra)]) > 700   # cortex
    assert 150 < np.median(hu[core]) < 400                                     # cancellous
    assert 20 < np.median(hu[mask("autochthon_left")]) < 80                    # muscle
    # from the skin inward along the patient's left-right axis at the L3 level:
    # subcutaneous fat, the muscular wall, then visceral fat
    i, j, k = np.round(nib.affines.apply_affine(np.linalg.inv(ct.affine), [0, 0, 15])).astype(int)
    profile = ndimage.median_filter(hu[:, j, k], size=3)
    x = nib.affines.apply_affine(ct.affine, np.c_[np.arange(hu.shape[0]), np.full(hu.shape[0], j),
                                                  np.full(hu.shape[0], k)])[:, 0]
    at = {mm: profile[np.argmin(np.abs(x - mm))] for mm in (165, 152, 141)}
    assert at[165] < -50 and 20 < at[152] < 80 and at[141] < -50, at


def test_knee_phantom_menisci_are_c_shaped_wedges_at_the_rim(tmp_path):
    for side in ("right", "left"):
        case = phantoms.write_knee_mri_phantom(tmp_path / side, seed=2, laterality=side,
                                               storage_axcodes="PIR")
        img = nib.as_closest_canonical(nib.load(case / "labels.nii.gz"))
        labels = np.asarray(img.dataobj)
        names = volumes.read_label_names(case / "labels.csv")
        value = {n: v for v, n in names.items()}
        tibia_x = np.argwhere(labels == value["tibia"])[:, 0].mean()
        lateral = 1 if side == "right" else -1  # +x is the patient's right
        for name, sign in (("medial_meniscus", -lateral), ("lateral_meniscus", lateral)):
            ijk = np.argwhere(labels == value[name])
            assert len(ijk) > 300
            assert (np.sign(ijk[:, 0] - tibia_x) == sign).all(), (side, name)  # its own side
            ci, cj = ijk[:, 0].mean(), ijk[:, 1].mean()
            r = np.hypot((ijk[:, 0] - ci) / np.ptp(ijk[:, 0]), (ijk[:, 1] - cj) / np.ptp(ijk[:, 1]))
            # a ring, not a disc: nothing at the centre of its footprint
            assert r.min() > 0.15, (side, name)
            # a wedge: taller at the rim than at the inner edge
            column = {}
            for i, j, k in ijk:
                column.setdefault((i, j), []).append(k)
            height = {key: len(ks) for key, ks in column.items()}
            rim = [h for (i, j), h in height.items()
                   if np.hypot((i - ci) / np.ptp(ijk[:, 0]), (j - cj) / np.ptp(ijk[:, 1])) > 0.42]
            inner = [h for (i, j), h in height.items()
                     if np.hypot((i - ci) / np.ptp(ijk[:, 0]), (j - cj) / np.ptp(ijk[:, 1])) < 0.35]
            assert np.mean(rim) > np.mean(inner), (side, name)
            # open toward the intercondylar notch: the footprint's midline side has a gap
            notch_side = ijk[np.sign(ijk[:, 0] - ci) == -sign]
            assert np.abs(notch_side[:, 1] - cj).min() > 2, (side, name)


def test_knee_phantoms_record_side_and_put_the_fibula_laterally(demo_root):
    prepared = demo_root / "data" / "prepared"
    vols = pd.read_parquet(prepared / "volumes.parquet").set_index("volume_id")
    comps = pd.read_parquet(prepared / "components.parquet")
    knees = vols[vols["source"] == "knee_mri_phantom"]
    assert set(knees["laterality"]) == {"left", "right"}
    for vid, side in knees["laterality"].items():
        t = comps[comps["volume_id"] == vid].set_index("component")
        lateral = np.sign(t.loc["fibula", "centroid_x"] - t.loc["tibia", "centroid_x"])
        assert lateral == (1 if side == "right" else -1)
        assert t.loc["patella", "centroid_y"] > t.loc["femur", "centroid_y"]


def test_chosen_slices_show_at_least_two_structures_and_match_the_labels(demo_root):
    prepared = demo_root / "data" / "prepared"
    vols = pd.read_parquet(prepared / "volumes.parquet").set_index("volume_id")
    comps = pd.read_parquet(prepared / "components.parquet")
    slices = pd.read_parquet(prepared / "slices.parquet")
    assert (slices.groupby("volume_id").size() == 2).all()
    assert slices["slice_id"].is_unique
    for s in slices.itertuples():
        assert s.n_components == len(s.components) >= 2
        lab = nib.load(prepared / vols.loc[s.volume_id, "canonical_labels"])
        fixed, _ = geometry.plane_axes(s.plane)
        plane = np.asarray(lab.dataobj).take(s.index, axis=fixed)
        value = comps[comps["volume_id"] == s.volume_id].set_index("component")["label"]
        for name in s.components:
            assert (plane == value[name]).any(), (s.slice_id, name)
        position = np.zeros(3)
        position[fixed] = s.index
        # the saved affine is float32: agree to a micrometre
        assert nib.affines.apply_affine(lab.affine, position)[fixed] == pytest.approx(
            s.position_mm, abs=1e-3)


def test_slice_selection_is_deterministic_from_the_seed():
    _, labels = _two_blobs((30, 30, 30))
    labels[5:25, 5:25, 20:24] = 3
    a = volumes.select_slices(labels, np.eye(4), {1: "a", 2: "b", 3: "c"}, 3, 1.0, seed=7)
    b = volumes.select_slices(labels, np.eye(4), {1: "a", 2: "b", 3: "c"}, 3, 1.0, seed=7)
    assert a == b and len(a) == 3


def test_balanced_components_take_small_medium_and_large_and_new_before_shown():
    values = np.arange(1, 10)
    sizes = np.array([10, 20, 30, 400, 500, 600, 7000, 8000, 9000], float)
    rng = np.random.default_rng(0)
    picked = volumes.balanced_components(values, sizes, np.zeros(9, bool), 3, rng)
    assert len(picked) == 3
    assert [int(np.digitize(sizes[v - 1], [100, 1000])) for v in picked] == [0, 1, 2]
    used = np.array([True, True, False, True, False, True, True, True, False])
    picked = volumes.balanced_components(values, sizes, used, 3, rng)
    assert list(picked) == [3, 5, 9]  # the one structure of each stratum not shown yet
    assert list(volumes.balanced_components(values[:2], sizes[:2], used[:2], 3, rng)) == [1, 2]


def test_slices_list_small_structures_when_more_are_visible_than_the_cap():
    labels = np.zeros((40, 40, 40), np.int16)
    labels[2:38, 2:38, 10:30] = 1                       # a large organ
    for value, (x, y, r) in enumerate([(5, 5, 1), (12, 5, 2), (20, 5, 3), (28, 8, 4),
                                       (8, 20, 5), (22, 24, 6)], start=2):
        labels[x - r:x + r + 1, y - r:y + r + 1, 12:28] = value  # smaller ones inside it
    names = {v: f"s{v}" for v in range(1, 8)}
    chosen = volumes.select_slices(labels, np.eye(4), names, 3, 1.0, seed=3, max_components=3)
    assert chosen and all(c["n_components"] <= 3 for c in chosen)
    shown = {c for s in chosen for c in s["components"]}
    assert "s2" in shown           # the smallest structure, 3 x 3 voxels across
    first = chosen[0]["components"]
    assert len(set(first)) == 3 and "s1" in first  # one per size stratum, the organ included
    # without a cap every visible structure stays listed, as before
    uncapped = volumes.select_slices(labels, np.eye(4), names, 3, 1.0, seed=3)
    assert max(c["n_components"] for c in uncapped) == 7  # the axial slice shows them all


def test_thin_slabs_are_sliced_only_across_their_thin_axis():
    labels = np.zeros((60, 60, 6), np.int16)  # a 60 x 60 x 6 mm slab
    for value, x in enumerate((10, 25, 40, 52), start=1):
        labels[x - 4:x + 4, 10:50, :] = value
    names = {v: f"s{v}" for v in range(1, 5)}
    allowed = volumes.select_slices(labels, np.eye(4), names, 4, 1.0, seed=1)
    assert {c["plane"] for c in allowed} - {"axial"}  # without the rule, strips are chosen
    chosen = volumes.select_slices(labels, np.eye(4), names, 4, 1.0, seed=1,
                                   min_plane_aspect=0.25)
    assert chosen and {c["plane"] for c in chosen} == {"axial"}


def test_label_map_stored_in_another_orientation_of_the_same_grid_is_accepted(tmp_path):
    image, labels = _two_blobs()
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])  # LPS storage
    folder = _labelmap_case(tmp_path / "raw" / "case", image, labels, affine, {1: "a", 2: "b"})
    reference = volumes.prepare("demo", root=tmp_path / "ref", sources=["generic"], workers=1,
                                generic_root=str(tmp_path / "raw"))
    ref = pd.read_parquet(tmp_path / "ref" / "data" / "prepared" / "components.parquet")
    _restore(folder / "labels.nii.gz", folder / "labels.nii.gz", "LAS")
    assert nib.aff2axcodes(nib.load(folder / "labels.nii.gz").affine) == ("L", "A", "S")
    volumes.prepare("demo", root=tmp_path / "las", sources=["generic"], workers=1,
                    generic_root=str(tmp_path / "raw"))
    las = pd.read_parquet(tmp_path / "las" / "data" / "prepared" / "components.parquet")
    assert len(reference) == 1
    pd.testing.assert_frame_equal(ref, las)


def test_second_run_with_same_config_skips_and_force_or_new_config_redoes(tmp_path):
    image, labels = _two_blobs()
    _labelmap_case(tmp_path / "raw" / "one", image, labels, np.eye(4), {1: "a", 2: "b"})
    params = {"sources": ["generic"], "generic_root": str(tmp_path / "raw"), "workers": 1}
    out = tmp_path / "data" / "prepared" / "slices.parquet"
    volumes.prepare("demo", root=tmp_path, **params)
    before = out.stat().st_mtime_ns
    volumes.prepare("demo", root=tmp_path, **params)
    assert out.stat().st_mtime_ns == before
    volumes.prepare("demo", root=tmp_path, force=True, **params)
    assert out.stat().st_mtime_ns > before
    volumes.prepare("demo", root=tmp_path, slices_per_volume=1, **params)
    assert len(pd.read_parquet(out)) == 1


# ---- bad input: each volume is rejected with the file named; the others are prepared ------


def _bad_cases(root):
    """One good case and one case per kind of bad input, in the generic layout."""
    image, labels = _two_blobs()
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    names = {1: "a", 2: "b"}
    _labelmap_case(root / "good", image, labels, affine, names)
    bad = {}

    case = _labelmap_case(root / "truncated", image, labels, affine, names)
    blob = (case / "image.nii.gz").read_bytes()
    (case / "image.nii.gz").write_bytes(blob[: len(blob) // 2])
    bad["truncated"] = "truncated/image.nii.gz: unreadable"

    case = _labelmap_case(root / "notgzip", image, labels, affine, names)
    (case / "labels.nii.gz").write_bytes(b"this is not a gzip file" * 10)
    bad["notgzip"] = "notgzip/labels.nii.gz: unreadable"

    _labelmap_case(root / "shape", image, labels[:, :, :8], affine, names)
    bad["shape"] = "shape/labels.nii.gz: shape"

    shifted = affine.copy()
    shifted[0, 3] = 12.0
    _labelmap_case(root / "affine", image, labels, affine, names, label_affine=shifted)
    bad["affine"] = "affine/labels.nii.gz: affine does not match"

    _labelmap_case(root / "empty", image, np.zeros_like(labels), affine, names)
    bad["empty"] = "empty/labels.nii.gz: no labelled voxels"

    _labelmap_case(root / "fourd", np.stack([image, image], axis=-1), labels, affine, names)
    bad["fourd"] = "fourd/image.nii.gz: 4D image"

    nan_image = image.copy()
    nan_image[3, 3, 3] = np.nan
    nan_image[4, 4, 4] = np.inf
    _labelmap_case(root / "nan", nan_image, labels, affine, names)
    bad["nan"] = "nan/image.nii.gz: 2 non-finite intensities"

    _labelmap_case(root / "unnamed", image, labels, affine, {1: "a"})
    bad["unnamed"] = r"unnamed/labels.nii.gz: label value\(s\) \[2\] have no name"

    rot = affine.copy()
    rot[:3, :3] = [[1.3, -0.75, 0], [0.75, 1.3, 0], [0, 0, 3.0]]
    _labelmap_case(root / "oblique", image, labels, rot, names)
    bad["oblique"] = "oblique/image.nii.gz: oblique affine"
    return bad


def test_every_bad_input_is_rejected_naming_its_file_and_the_good_volume_survives(tmp_path):
    bad = _bad_cases(tmp_path / "raw")
    vols = volumes.prepare("demo", root=tmp_path, sources=["generic"], workers=2,
                           generic_root=str(tmp_path / "raw"))
    assert list(vols["case"]) == ["good"]
    rejected = pd.read_parquet(tmp_path / "data" / "prepared" / "rejected.parquet")
    assert sorted(rejected["case"]) == sorted(bad)
    for case, pattern in bad.items():
        reason = rejected.loc[rejected["case"] == case, "reason"].item()
        assert re.search(pattern, reason), (case, reason)


def test_totalsegmentator_reads_only_asked_masks_and_notes_empty_ones(tmp_path):
    image, labels = _two_blobs()
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])  # LPS storage
    case = tmp_path / "ts" / "s0001"
    (case / "segmentations").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.rint(image).astype(np.int16), affine), case / "ct.nii.gz")
    for value, name in ((1, "liver"), (2, "spleen")):
        nib.save(nib.Nifti1Image((labels == value).astype(np.uint8), affine),
                 case / "segmentations" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros_like(labels, np.uint8), affine),
             case / "segmentations" / "heart.nii.gz")
    # a corrupt mask that is not asked for must not be read
    (case / "segmentations" / "stomach.nii.gz").write_bytes(gzip.compress(b"garbage"))
    (tmp_path / "ts" / "s0002").mkdir()  # a case without ct.nii.gz

    params = {"sources": ["totalsegmentator"], "totalsegmentator_root": str(tmp_path / "ts"),
              "structures": ["liver", "spleen", "heart"], "workers": 1}
    vols = volumes.prepare("paper", root=tmp_path, **params)
    assert list(vols["case"]) == ["s0001"]
    comps = pd.read_parquet(tmp_path / "data" / "prepared" / "components.parquet")
    classes = {v: k for k, v in volumes.totalsegmentator_classes().items()}
    assert dict(zip(comps["component"], comps["label"], strict=True)) == {
        "liver": classes["liver"], "spleen": classes["spleen"]}
    rejected = pd.read_parquet(tmp_path / "data" / "prepared" / "rejected.parquet")
    reasons = " | ".join(rejected["reason"])
    assert "heart.nii.gz: empty mask" in reasons
    assert "s0002/ct.nii.gz: file not found" in reasons
    assert "stomach" not in reasons


def test_label_table_errors_name_the_file(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("value,label\n1,a\n")
    with pytest.raises(volumes.VolumeError, match="labels.csv: label table lacks column"):
        volumes.read_label_names(path)
    path.write_text("index,name\n1,a\n1,b\n")
    with pytest.raises(volumes.VolumeError, match=r"labels.csv: label index \[1\] listed twice"):
        volumes.read_label_names(path)


def test_demo_marker_makes_phantoms_reusable(demo_root):
    marker = demo_root / "data" / "raw" / "demo" / "totalsegmentator" / ".demo.json"
    assert json.loads(marker.read_text())["spec"]["source"] == "torso_ct_phantom"


# ---- the real CT and MR cases of the totalsegmentator sdist -------------------------------


def test_sdist_is_the_pinned_version_and_hash(sdist):
    assert sdist.name == f"totalsegmentator-{demo_cases.TOTALSEGMENTATOR_VERSION}.tar.gz"
    assert demo_cases.sha256(sdist) == demo_cases.TOTALSEGMENTATOR_SDIST_SHA256
    assert "data" not in sdist.relative_to(demo_cases.REPO_ROOT).parts  # cached outside data/


def test_a_cached_sdist_with_another_hash_is_refused(tmp_path):
    (tmp_path / demo_cases.TOTALSEGMENTATOR_SDIST).write_bytes(b"not the sdist")
    with pytest.raises(demo_cases.DemoDataError, match="SHA-256 .* is not the pinned"):
        demo_cases.fetch_sdist(tmp_path)


def test_unreachable_registry_gives_an_error_naming_the_pip_command(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        return demo_cases.subprocess.CompletedProcess(
            args[0], 1, "", "ERROR: Could not find a version that satisfies the requirement")

    monkeypatch.setattr(demo_cases.subprocess, "run", offline)
    with pytest.raises(demo_cases.DemoDataError) as err:
        demo_cases.fetch_sdist(tmp_path)
    message = str(err.value)
    assert "python -m pip download --no-deps --no-binary :all: totalsegmentator==2.18.0" \
        in message
    assert str(tmp_path) in message and "Could not find a version" in message
    assert not (tmp_path / demo_cases.TOTALSEGMENTATOR_SDIST).exists()


def test_real_cases_are_read_by_the_data_set_readers(demo_root):
    raw = demo_root / "data" / "raw" / "demo"
    vols = pd.read_parquet(demo_root / "data" / "prepared" / "volumes.parquet")
    layout = dict(zip(vols["volume_id"], vols["layout"], strict=True))
    assert layout["torso_ct-abdomen_3mm"] == layout["torso_ct-aorta_1p5mm"] == "totalsegmentator"
    assert layout["torso_mr-abdomen"] == layout["torso_ct_dicom-abdomen"] == "labelmap"
    assert (raw / "torso_ct" / "abdomen_3mm" / "segmentations" / "liver.nii.gz").is_file()
    assert (raw / "torso_ct" / "aorta_1p5mm" / "ct.nii.gz").is_file()
    assert (raw / "torso_mr" / "abdomen" / "labels.csv").is_file()
    assert len(list((raw / "torso_ct_dicom" / "abdomen" / "image").iterdir())) == 20
    spacing = vols.set_index("volume_id")[["spacing_x", "spacing_y", "spacing_z"]]
    np.testing.assert_allclose(spacing.loc["torso_ct-abdomen_3mm"], 3.0)
    np.testing.assert_allclose(spacing.loc["torso_ct-aorta_1p5mm"], 1.5)
    np.testing.assert_allclose(spacing.loc["torso_ct_dicom-abdomen"], [0.9765625, 0.9765625, 2])
    modality = dict(zip(vols["volume_id"], vols["modality"], strict=True))
    assert modality["torso_mr-abdomen"] == "MRI" and modality["torso_ct_dicom-abdomen"] == "CT"


def test_mr_labels_are_named_by_totalsegmentators_mr_class_map(demo_root):
    from totalsegmentator.map_to_binary import class_map

    table = _components(demo_root, "torso_mr-abdomen")
    mr = {name: value for value, name in class_map["total_mr"].items()}
    assert len(table) >= 15
    for name, row in table.iterrows():
        assert mr[name] == row["label"], name
    assert set(table.index) <= set(structures.curated("torso_mr"))


def test_sources_keep_only_their_curated_structures_in_every_output(demo_root):
    prepared = demo_root / "data" / "prepared"
    vols = pd.read_parquet(prepared / "volumes.parquet").set_index("volume_id")
    lists = {"brain_atlas": "brain", "torso_ct": "torso_ct", "torso_ct_dicom": "torso_ct",
             "torso_mr": "torso_mr", "knee_mri_phantom": "knee"}
    slices = pd.read_parquet(prepared / "slices.parquet")
    for vid, row in vols.iterrows():
        keep = set(structures.curated(lists.get(row["source"], "torso_ct")))
        table = _components(demo_root, vid)
        assert set(table.index) <= keep, vid
        labels = np.asarray(nib.load(prepared / row["canonical_labels"]).dataobj)
        assert set(np.unique(labels)) - {0} == set(table["label"]), vid
        for comps in slices.loc[slices["volume_id"] == vid, "components"]:
            assert set(comps) <= keep
    brain = _components(demo_root, "brain_atlas-mni152")
    assert set(brain.index) == set(structures.curated("brain"))


def test_real_ct_reproduces_textbook_anatomy(demo_root):
    """Facts every anatomy textbook states, re-derived from components.parquet (RAS+ mm)."""
    ct = _components(demo_root, "torso_ct-abdomen_3mm")
    x, y, z = (ct[f"centroid_{a}"] for a in "xyz")
    assert x["liver"] > x["spleen"]                      # liver on the patient's right
    assert x["inferior_vena_cava"] > x["aorta"]          # aorta left of the IVC
    assert x["gallbladder"] > x["stomach"]
    assert z["vertebrae_T12"] > z["vertebrae_L1"] > z["vertebrae_L2"]  # spine counts downward
    assert z["liver"] > z["kidney_right"] and z["liver"] > z["kidney_left"]
    assert y["aorta"] > y["vertebrae_L1"] and y["aorta"] > y["spinal_cord"]  # aorta anterior
    assert y["gallbladder"] > y["kidney_right"]          # kidneys are retroperitoneal
    arch = _components(demo_root, "torso_ct-aorta_1p5mm")
    ax, az = arch["centroid_x"], arch["centroid_z"]
    # the arch's branches from the patient's right: brachiocephalic trunk, left carotid, left
    # subclavian; all far above T12
    assert ax["brachiocephalic_trunk"] > ax["common_carotid_artery_left"] \
        > ax["subclavian_artery_left"]
    assert az["brachiocephalic_trunk"] > az["vertebrae_T12"] + 100
    dicom = _components(demo_root, "torso_ct_dicom-abdomen")
    assert dicom.loc["liver", "centroid_x"] > dicom.loc["spleen", "centroid_x"]
    assert dicom.loc["inferior_vena_cava", "centroid_x"] > dicom.loc["aorta", "centroid_x"]
    assert dicom.loc["vertebrae_T11", "centroid_z"] > dicom.loc["vertebrae_T12", "centroid_z"]
    mr = _components(demo_root, "torso_mr-abdomen")
    assert mr.loc["liver", "centroid_x"] > mr.loc["spleen", "centroid_x"]
    assert mr.loc["aorta", "centroid_y"] > mr.loc["spinal_cord", "centroid_y"]


def test_anatomy_checks_report_each_fact_and_twin_and_flag_a_violation():
    def row(vid, name, x, y, z):
        return {"volume_id": vid, "component": name, "centroid_x": x, "centroid_y": y,
                "centroid_z": z}

    comps = pd.DataFrame([row("ok", "liver", 80, 0, 0), row("ok", "spleen", -90, 0, 0),
                          row("ok", "kidney_left", -70, 0, -40),
                          row("ok", "kidney_right", 60, 0, -50),
                          row("flipped", "liver", -80, 0, 0), row("flipped", "spleen", 90, 0, 0)])
    checks = volumes.anatomy_checks(comps).set_index(["volume_id", "fact"])
    assert checks.loc[("ok", "liver right of the spleen"), "separation_mm"] == 170
    assert checks.loc[("ok", "liver superior to the right kidney"), "holds"]
    assert checks.loc[("ok", "left kidney left of the right kidney"), "holds"]
    assert not checks.loc[("flipped", "liver right of the spleen"), "holds"]
    assert len(checks) == 4  # facts whose structures a volume lacks are not listed


def test_real_cases_pass_every_textbook_check(demo_root):
    comps = pd.read_parquet(demo_root / "data" / "prepared" / "components.parquet")
    checks = volumes.anatomy_checks(comps)
    real = checks[checks["volume_id"].str.startswith(("torso_ct-", "torso_mr-",
                                                      "torso_ct_dicom-", "brain_atlas-"))]
    assert len(real) >= 30 and real["holds"].all(), real[~real["holds"]]


def test_notebook_01_figures_show_every_volume_and_every_slice(demo_root):
    import matplotlib

    matplotlib.use("Agg")
    prepared = demo_root / "data" / "prepared"
    vols = pd.read_parquet(prepared / "volumes.parquet")
    slices = pd.read_parquet(prepared / "slices.parquet")
    fig = volumes.orientation_figure(vols, prepared)
    assert len(fig.axes) == 2 * len(vols)
    assert {t.get_text().split("\n")[0] for t in (a.title for a in fig.axes[::2])} \
        == set(vols["volume_id"])
    fig = volumes.slices_figure(vols, slices, prepared, columns=4)
    titled = [a for a in fig.axes if a.get_title()]
    assert len(titled) == len(slices) and len(fig.axes) % 4 == 0
    assert len(slices) > 4 and len({round(a.get_position().y0, 3) for a in titled}) > 1
    assert fig.get_size_inches()[0] == pytest.approx(7.5)  # a grid at page width


def test_dicom_series_and_its_las_label_map_land_on_the_same_voxels(demo_root):
    """The series is stored LPS and its label map LAS; were the map not re-stored like the
    image, bone would fall on soft tissue."""
    prepared = demo_root / "data" / "prepared"
    row = pd.read_parquet(prepared / "volumes.parquet").set_index("volume_id").loc[
        "torso_ct_dicom-abdomen"]
    assert row["storage_axcodes"] == "LPS"
    assert nib.aff2axcodes(nib.load(row["labels_path"]).affine) == ("L", "A", "S")
    hu = np.asarray(nib.load(prepared / row["canonical_image"]).dataobj)
    labels = np.asarray(nib.load(prepared / row["canonical_labels"]).dataobj)
    table = _components(demo_root, "torso_ct_dicom-abdomen")["label"]
    assert np.median(hu[labels == table["vertebrae_T12"]]) > 150       # bone
    assert 20 < np.median(hu[labels == table["liver"]]) < 200           # parenchyma
    assert np.median(hu[labels == table["aorta"]]) > 20


def test_dicom_reader_matches_the_series_geometry(demo_root):
    folder = demo_root / "data" / "raw" / "demo" / "torso_ct_dicom" / "abdomen" / "image"
    img = volumes.read_dicom_series(folder)
    assert img.shape == (512, 512, 20)
    assert np.asanyarray(img.dataobj).min() == -1024                    # rescaled to HU
    np.testing.assert_allclose(geometry.voxel_spacing(img.affine), [0.9765625, 0.9765625, 2.0])
    # DICOM's LPS origin (-249.51, -437.51, -804.5) is RAS (249.51, 437.51, -804.5)
    np.testing.assert_allclose(img.affine[:3, 3], [249.51171875, 437.51171875, -804.5])


def test_dicom_series_with_a_missing_slice_or_no_series_is_rejected_naming_the_folder(
        demo_root, tmp_path):
    import SimpleITK as sitk

    source = demo_root / "data" / "raw" / "demo" / "torso_ct_dicom" / "abdomen" / "image"
    ordered = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(source))  # by position
    gap = tmp_path / "gap"
    gap.mkdir()
    for i, f in enumerate(ordered):
        if i != 10:
            (gap / Path(f).name).write_bytes(Path(f).read_bytes())
    with pytest.raises(volumes.VolumeError, match="gap: slices are not evenly spaced"):
        volumes.read_dicom_series(gap)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no dicom here")
    with pytest.raises(volumes.VolumeError, match="empty: no DICOM series found"):
        volumes.read_dicom_series(empty)


def test_visible_areas_equal_a_full_histogram_of_every_slice():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, size=(9, 7, 5)).astype(np.int16)
    spacing = np.array([0.5, 2.0, 3.0])
    areas = volumes.visible_areas(labels, spacing, int(labels.max()))
    for plane in geometry.PLANES:
        fixed, (a, b) = geometry.plane_axes(plane)
        brute = np.stack([np.bincount(labels.take(i, axis=fixed).ravel(), minlength=5)
                          for i in range(labels.shape[fixed])]) * spacing[a] * spacing[b]
        np.testing.assert_allclose(areas[plane][:, 1:], brute[:, 1:])


def test_gzip_reader_matches_nibabel_for_plain_scaled_and_multi_member_files(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = np.diag([-1.0, 2.0, 3.0, 1.0])
    plain = tmp_path / "plain.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), plain)
    scaled_img = nib.Nifti1Image(data, affine)
    scaled_img.header.set_slope_inter(0.5, -3.0)
    scaled = tmp_path / "scaled.nii.gz"
    nib.save(scaled_img, scaled)
    raw = gzip.decompress(plain.read_bytes())
    multi = tmp_path / "multi.nii.gz"  # two gzip members, as bgzip-style writers make
    multi.write_bytes(gzip.compress(raw[:200]) + gzip.compress(raw[200:]))
    for path in (plain, scaled, multi):
        img, voxels = volumes._read_nii_gz(path)
        reference = nib.load(path)
        np.testing.assert_array_equal(voxels, reference.get_fdata())
        np.testing.assert_allclose(img.affine, reference.affine)


# ---- readers: any NIfTI, no surfaces, the file at fault named ------------------------------

NIBABEL_DATA = __import__("pathlib").Path(nib.__file__).parent / "tests" / "data"
GIFTI_DATA = __import__("pathlib").Path(nib.__file__).parent / "gifti" / "tests" / "data"


def _prepare_generic(tmp_path, workers=1, **overrides):
    """Stage 01 on the generic cases under tmp_path/raw; (volumes, rejected) tables."""
    vols = volumes.prepare("demo", root=tmp_path, sources=["generic"], workers=workers,
                           generic_root=str(tmp_path / "raw"), **overrides)
    rejected = pd.read_parquet(tmp_path / "data" / "prepared" / "rejected.parquet")
    return vols, rejected.set_index("case")


def test_nifti2_volumes_are_prepared_like_nifti1(tmp_path):
    image, labels = _two_blobs()
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    for name, suffix in (("gz", ".nii.gz"), ("plain", ".nii")):
        case = _labelmap_case(tmp_path / "raw" / name, image, labels, affine, {1: "a", 2: "b"})
        if suffix == ".nii":  # uncompressed NIfTI-2 goes through nibabel.load
            nib.save(nib.Nifti2Image(image, affine), tmp_path / "img2.nii")
            (case / "image.nii.gz").write_bytes(gzip.compress((tmp_path / "img2.nii")
                                                              .read_bytes()))
        else:
            nib.save(nib.Nifti2Image(image, affine), case / "image.nii.gz")
        nib.save(nib.Nifti2Image(labels, affine), case / "labels.nii.gz")
    vols, rejected = _prepare_generic(tmp_path)
    assert rejected.empty, rejected["reason"].tolist()
    assert sorted(vols["case"]) == ["gz", "plain"]
    assert (vols["n_components"] == 2).all()
    # the real NIfTI-2 file nibabel ships (4D) is read, then refused for its shape only
    with pytest.raises(volumes.VolumeError, match=r"4D image of shape \(32, 20, 12, 2\)"):
        volumes._load(NIBABEL_DATA / "example_nifti2.nii.gz")


def test_cifti_and_surface_files_are_rejected_by_name(tmp_path):
    image, labels = _two_blobs()
    affine = np.eye(4)
    cifti = (NIBABEL_DATA / "row_major.dconn.nii").read_bytes()
    case = _labelmap_case(tmp_path / "raw" / "cifti", image, labels, affine, {1: "a", 2: "b"})
    (case / "image.nii.gz").write_bytes(gzip.compress(cifti))
    case = _labelmap_case(tmp_path / "raw" / "gifti", image, labels, affine, {1: "a", 2: "b"})
    (case / "labels.nii.gz").write_bytes(gzip.compress((GIFTI_DATA / "ascii.gii").read_bytes()))
    _labelmap_case(tmp_path / "raw" / "good", image, labels, affine, {1: "a", 2: "b"})
    vols, rejected = _prepare_generic(tmp_path)
    assert list(vols["case"]) == ["good"]
    assert rejected.loc["cifti", "path"].endswith("cifti/image.nii.gz")
    assert "CIFTI, not a volume" in rejected.loc["cifti", "reason"]
    assert rejected.loc["gifti", "path"].endswith("gifti/labels.nii.gz")
    assert "GIFTI surface or surface-data file, not a volume" in rejected.loc["gifti", "reason"]
    # the uncompressed originals, through nibabel's own loader
    with pytest.raises(volumes.VolumeError, match="CIFTI, not a volume"):
        volumes._load(NIBABEL_DATA / "row_major.dconn.nii")
    with pytest.raises(volumes.VolumeError, match="GIFTI surface or surface-data file"):
        volumes._load(GIFTI_DATA / "ascii.gii")


def test_the_path_column_and_reason_name_the_label_map_or_table_at_fault(tmp_path):
    image, labels = _two_blobs()
    affine = np.eye(4)
    case = _labelmap_case(tmp_path / "raw" / "csv", image, labels, affine, {1: "a", 2: "b"})
    (case / "labels.csv").write_text("index,name\n1,a\nthree,b\n")
    _labelmap_case(tmp_path / "raw" / "shape", image, labels[:, :, :8], affine, {1: "a", 2: "b"})
    vols, rejected = _prepare_generic(tmp_path)
    assert vols.empty
    assert rejected.loc["csv", "path"].endswith("csv/labels.csv")
    assert re.search(r"csv/labels.csv: label index \['three'\] is not an integer on line\(s\) \[3\]",
                     rejected.loc["csv", "reason"])
    assert rejected.loc["shape", "path"].endswith("shape/labels.nii.gz")


def test_label_table_with_a_name_twice_is_rejected(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("index,name\n1,tibia\n2,femur\n3,tibia\n")
    with pytest.raises(volumes.VolumeError,
                       match=r"labels.csv: structure name \['tibia'\] listed twice on line\(s\) \[2, 4\]"):
        volumes.read_label_names(path)
    path.write_text("index,name\n1.5,tibia\n")
    with pytest.raises(volumes.VolumeError, match=r"label index \['1.5'\] is not an integer"):
        volumes.read_label_names(path)
    path.write_text("index,name\n40000,tibia\n")
    with pytest.raises(volumes.VolumeError, match=r"label index \['40000'\] outside 0..32767"):
        volumes.read_label_names(path)


def test_label_value_too_large_for_int16_is_reported_as_written(tmp_path):
    image, labels = _two_blobs()
    big = labels.astype(np.uint16)
    big[big == 2] = 40000
    _labelmap_case(tmp_path / "raw" / "big", image, big, np.eye(4), {1: "a", 40000: "b"})
    vols, rejected = _prepare_generic(tmp_path)
    assert vols.empty
    reason = rejected.loc["big", "reason"]
    assert "[40000] outside 0..32767" in reason and "-25536" not in reason
    assert rejected.loc["big", "path"].endswith("big/labels.nii.gz")


def test_a_reason_stays_short_enough_to_read(tmp_path):
    image, _ = _two_blobs()
    many = np.arange(image.size, dtype=np.int16).reshape(image.shape) % 7000 + 1
    _labelmap_case(tmp_path / "raw" / "many", image, many, np.eye(4), {1: "a"})
    _, rejected = _prepare_generic(tmp_path)
    reason = rejected.loc["many", "reason"]
    assert len(reason) <= volumes.MAX_REASON_CHARS
    assert "[2, 3, 4, 5, 6, ... (6999 values)] have no name" in reason


@pytest.mark.parametrize("meta, expected", [
    ("{not json", "not valid JSON"),
    ('["left"]', "expected a JSON object"),
    ('{"laterality": "up"}', r"laterality 'up' is not one of \['left', 'right'\]"),
])
def test_a_bad_meta_json_rejects_its_case_only_and_is_named(tmp_path, meta, expected):
    image, labels = _two_blobs()
    case = _labelmap_case(tmp_path / "raw" / "bad", image, labels, np.eye(4), {1: "a", 2: "b"})
    (case / "meta.json").write_text(meta)
    good = _labelmap_case(tmp_path / "raw" / "good", image, labels, np.eye(4), {1: "a", 2: "b"})
    (good / "meta.json").write_text('{"laterality": "left", "note": "kept"}')
    vols, rejected = _prepare_generic(tmp_path)
    assert list(vols["case"]) == ["good"] and list(vols["laterality"]) == ["left"]
    assert rejected.loc["bad", "path"].endswith("bad/meta.json")
    assert re.search(expected, rejected.loc["bad", "reason"])


def test_totalsegmentator_case_missing_class_masks_gets_a_note_and_is_prepared(tmp_path):
    image, labels = _two_blobs()
    affine = np.eye(4)
    case = tmp_path / "ts" / "s0001"
    (case / "segmentations").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.rint(image).astype(np.int16), affine), case / "ct.nii.gz")
    for value, name in ((1, "liver"), (2, "spleen")):
        nib.save(nib.Nifti1Image((labels == value).astype(np.uint8), affine),
                 case / "segmentations" / f"{name}.nii.gz")
    vols = volumes.prepare("demo", root=tmp_path, sources=["totalsegmentator"], workers=1,
                           totalsegmentator_root=str(tmp_path / "ts"), structures=[])
    assert list(vols["case"]) == ["s0001"] and vols["n_components"].item() == 2
    rejected = pd.read_parquet(tmp_path / "data" / "prepared" / "rejected.parquet")
    n_classes = len(volumes.totalsegmentator_classes())
    assert len(rejected) == 1 and rejected["path"].item().endswith("s0001/segmentations")
    assert (f"{n_classes - 2} of the {n_classes} TotalSegmentator classes have no mask file"
            in rejected["reason"].item())


def test_fewer_phantoms_leave_no_old_phantom_folder(tmp_path):
    params = {"seed": 3, "n_knee_phantoms": 2}
    folder = volumes.ensure_demo_source("knee_mri_phantom", params, tmp_path)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["k0000", "k0001"]
    volumes.ensure_demo_source("knee_mri_phantom", {**params, "n_knee_phantoms": 1}, tmp_path)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["k0000"]
    assert not list(folder.parent.glob(".*partial*"))


def test_changed_input_file_makes_stage_01_redo_without_force(tmp_path):
    image, labels = _two_blobs()
    case = _labelmap_case(tmp_path / "raw" / "one", image, labels, np.eye(4), {1: "a", 2: "b"})
    _prepare_generic(tmp_path)
    (case / "labels.csv").write_text("index,name\n1,alpha\n2,beta\n")
    _prepare_generic(tmp_path)
    comps = pd.read_parquet(tmp_path / "data" / "prepared" / "components.parquet")
    assert sorted(comps["component"]) == ["alpha", "beta"]
