"""mislib.render: display orientation, square pixels, prompts, letters, stacks, bad input.

Most tests share one small synthetic prepared dataset (stage 01's file layout, built in code)
rendered once per module at a small image size.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mislib import render
from mislib.geometry import CONVENTIONS, PLANES, screen_mapping, screen_offset
from mislib.validity import check_letters_on_marks

SIZE = 128
FRAMES = 6
FAST = {"image_size": SIZE, "frames_3d": FRAMES, "workers": 1}


# ----------------------------------------------------------------- a prepared dataset in code


def _sphere(shape, affine, centre_mm, radius_mm):
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = nib.affines.apply_affine(affine, ijk)
    return (np.linalg.norm(xyz - centre_mm, axis=1) <= radius_mm).reshape(shape)


def _write_volume(prepared: Path, volume_id, source, modality, image, labels, affine, names,
                  write=True):
    folder = prepared / "volumes" / volume_id
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / "image.nii.gz")
        nib.save(nib.Nifti1Image(labels.astype(np.int16), affine), folder / "labels.nii.gz")
    spacing = np.abs(np.diag(affine)[:3])
    vol = {"volume_id": volume_id, "source": source, "modality": modality, "case": volume_id,
           "image_path": "", "labels_path": "", "storage_axcodes": "RAS",
           "shape_x": image.shape[0], "shape_y": image.shape[1], "shape_z": image.shape[2],
           "spacing_x": spacing[0], "spacing_y": spacing[1], "spacing_z": spacing[2],
           "canonical_image": f"volumes/{volume_id}/image.nii.gz",
           "canonical_labels": f"volumes/{volume_id}/labels.nii.gz", "laterality": None,
           "n_components": len(names)}
    comps = [{"volume_id": volume_id, "source": source, "modality": modality, "component": n,
              "label": lab} for lab, n in names.items()]
    return vol, comps


#: The torso CT: (name, centre mm, radius mm). Liver on the patient's right, spleen left,
#: vertebra posterior, stomach anterior, heart superior, bladder inferior, an adrenal too
#: small to label.
CT_STRUCTURES = [
    ("liver", (10.0, 0.0, 0.0), 7.0),
    ("spleen", (-12.0, -3.0, 0.0), 5.0),
    ("vertebrae_L1", (0.0, -12.0, 0.0), 4.0),
    ("stomach", (-4.0, 11.0, 0.0), 5.0),
    ("heart", (0.0, 5.0, 20.0), 6.0),
    ("urinary_bladder", (0.0, 5.0, -20.0), 6.0),
    ("adrenal_gland_right", (5.0, -5.0, 0.0), 1.0),
]


def build_prepared(root: Path) -> Path:
    """Stage 01's outputs for three volumes: an anisotropic CT, a crowded MRI, a missing one."""
    prepared = root / "data" / "prepared"
    volumes, components, slices = [], [], []

    affine = np.diag([0.9, 1.1, 2.5, 1.0])
    affine[:3, 3] = (-20.0, -20.0, -30.0)
    shape = (48, 40, 24)
    image = np.full(shape, -1000.0)
    image[_sphere(shape, affine, (0, 0, 0), 40.0)] = 40.0
    labels = np.zeros(shape, np.int16)
    names = {}
    for lab, (name, centre, radius) in enumerate(CT_STRUCTURES, start=1):
        labels[_sphere(shape, affine, np.array(centre), radius)] = lab
        image[labels == lab] = 60.0 + 10 * lab
        names[lab] = name
    vol, comps = _write_volume(prepared, "synth-ct", "totalsegmentator", "CT", image, labels,
                               affine, names)
    volumes.append(vol)
    components += comps
    everything = [n for n, _, _ in CT_STRUCTURES]
    slices += [
        {"slice_id": "synth-ct-axial", "volume_id": "synth-ct", "plane": "axial", "index": 12,
         "position_mm": 0.0, "components": everything},
        {"slice_id": "synth-ct-coronal", "volume_id": "synth-ct", "plane": "coronal",
         "index": 23, "position_mm": 5.3, "components": everything},
        {"slice_id": "synth-ct-sagittal", "volume_id": "synth-ct", "plane": "sagittal",
         "index": 22, "position_mm": -0.2, "components": everything},
        {"slice_id": "synth-ct-lonely", "volume_id": "synth-ct", "plane": "axial", "index": 20,
         "position_mm": 20.0, "components": everything},
    ]

    # eight cubes on one axial slice of an MRI: more candidates than letters
    shape = (40, 40, 10)
    affine = np.eye(4)
    image = np.zeros(shape)
    labels = np.zeros(shape, np.int16)
    names = {}
    for n in range(8):
        r, c = divmod(n, 4)
        labels[3 + 9 * c: 9 + 9 * c + (n % 3), 5 + 16 * r: 12 + 16 * r, 3:7] = n + 1
        names[n + 1] = f"part_{n + 1}"
    image[labels > 0] = 100.0 + labels[labels > 0]
    vol, comps = _write_volume(prepared, "synth-crowded", "knee_mri", "MRI", image, labels,
                               affine, names)
    volumes.append(vol)
    components += comps
    slices.append({"slice_id": "synth-crowded-axial", "volume_id": "synth-crowded",
                   "plane": "axial", "index": 5, "position_mm": 5.0,
                   "components": list(names.values())})

    vol, comps = _write_volume(prepared, "synth-missing", "knee_mri", "MRI", image, labels,
                               affine, names, write=False)
    volumes.append(vol)
    components += comps
    slices.append({"slice_id": "synth-missing-axial", "volume_id": "synth-missing",
                   "plane": "axial", "index": 5, "position_mm": 5.0,
                   "components": list(names.values())})

    pd.DataFrame(volumes).to_parquet(prepared / "volumes.parquet")
    pd.DataFrame(components).to_parquet(prepared / "components.parquet")
    pd.DataFrame(slices).to_parquet(prepared / "slices.parquet")
    return prepared


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("render")
    build_prepared(root)
    return root


@pytest.fixture(scope="module")
def rendered(synth_root):
    renders = render.render_benchmark("demo", root=synth_root, **FAST)
    skipped = pd.read_parquet(synth_root / "data" / "benchmark" / "skipped.parquet")
    return renders, skipped


@pytest.fixture(scope="module")
def ct_volume(synth_root):
    prepared = synth_root / "data" / "prepared"
    vols = pd.read_parquet(prepared / "volumes.parquet")
    return render.load_volume(prepared, vols[vols.volume_id == "synth-ct"].iloc[0],
                              pd.read_parquet(prepared / "components.parquet"))


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.png"))}


# ----------------------------------------------------------------- orientation and pixels


@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_display_volume_moves_voxels_as_the_screen_mapping_says(plane, convention):
    mapping = screen_mapping(plane, convention)
    for axis in range(3):
        arr = np.zeros((5, 6, 7))
        start = np.array([2, 3, 3])
        arr[tuple(start)] = 1
        step = start.copy()
        step[axis] += 1
        arr[tuple(step)] = 2
        disp, _ = render.display_volume(arr, (1, 1, 1), plane, convention)
        moved = np.argwhere(disp == 2)[0] - np.argwhere(disp == 1)[0]  # (frame, row, col)
        world = np.zeros(3)
        world[axis] = 1.0
        right, down, frame = screen_offset(world, mapping)
        assert (moved[2], moved[1], moved[0]) == (right, down, frame)


def test_frame_index_follows_the_mapping_frame_direction():
    # axial frames run I->S in standard (index kept) and S->I in storage (index reversed)
    assert render.frame_index(3, 10, "axial", "standard") == 3
    assert render.frame_index(3, 10, "axial", "storage") == 6


def test_anisotropic_voxels_become_square_pixels():
    affine = np.diag([0.5, 1.0, 3.0, 1.0])
    shape = (80, 40, 14)
    ball = _sphere(shape, affine, np.array([20.0, 20.0, 20.0]), 9.0).astype(int)
    for plane in PLANES:
        disp, sp = render.display_volume(ball, np.diag(affine)[:3], plane, "standard")
        grid = render.square_grid(disp.shape[1:], sp[1:], 200)
        frame = np.argmax(disp.sum(axis=(1, 2)))
        rows, cols = np.nonzero(render.resample_labels(disp[frame], grid))
        height = (rows.max() - rows.min() + 1) * grid.pixel_mm
        width = (cols.max() - cols.min() + 1) * grid.pixel_mm
        assert abs(height - width) <= 3.0 + 2 * grid.pixel_mm, plane  # a circle, not an ellipse


def test_square_grid_centres_the_slice_and_pads_the_short_side():
    grid = render.square_grid((10, 20), (1.0, 1.0), 40)
    assert grid.pixel_mm == pytest.approx(0.5)
    assert grid.valid_cols.all()
    assert grid.valid_rows.sum() == 20 and not grid.valid_rows[:10].any()


# ----------------------------------------------------------------- windowing


LUNGS = ["lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
         "lung_lower_lobe_right", "lung_middle_lobe_right"]


def test_ct_window_is_the_tissue_class_every_structure_shares():
    assert render.ct_window_name(LUNGS + ["trachea"]) == "lung"
    assert render.ct_window_name(["vertebrae_L1", "rib_left_3", "sacrum"]) == "bone"
    assert render.ct_window_name(["liver", "aorta", "kidney_left"]) == "soft_tissue"


def test_ct_window_is_soft_tissue_when_tissue_classes_mix_whatever_the_majority():
    # four lung lobes must not out-vote the one abdominal structure (the IVC would wash out)
    assert render.ct_window_name(LUNGS[:4] + ["inferior_vena_cava"]) == "soft_tissue"
    assert render.ct_window_name(["vertebrae_L1", "vertebrae_L2", "rib_left_3", "aorta"]) \
        == "soft_tissue"
    assert render.ct_window_name(["lung_upper_lobe_left", "vertebrae_T5"]) == "soft_tissue"
    assert render.ct_window_name([]) == "soft_tissue"


def test_window_for_gives_the_preset_of_the_chosen_class(ct_volume):
    name, (low, high) = render.window_for(ct_volume, LUNGS[:2])
    width, level = render.CT_WINDOWS["lung"]
    assert name == "lung" and (low, high) == pytest.approx((level - width / 2, level + width / 2))
    assert render.window_for(ct_volume, LUNGS[:2] + ["liver"])[0] == "soft_tissue"


def test_mri_window_uses_foreground_percentiles():
    image = np.zeros((20, 20, 20))
    image[5:15, 5:15, 5:15] = np.linspace(100, 200, 1000).reshape(10, 10, 10)
    low, high = render.mri_window(image, (0.0, 100.0))
    assert (low, high) == pytest.approx((100.0, 200.0))  # the zero background is ignored


def test_scan_is_windowed_and_blank_has_no_scan(ct_volume):
    opts = render.RenderOptions(image_size=SIZE, dims=["2d"], conventions=["standard"],
                                prompts=["box"])
    spec = render.SliceSpec("t", "axial", 12)
    scan, blank = render.render_slice(ct_volume, spec, opts)
    assert scan.rows[0]["window"] == "soft_tissue"
    scan_px = np.asarray(scan.frames[0])
    blank_px = np.asarray(blank.frames[0])
    # body at 40 HU in a 400/40 window is mid grey (a corner far from every structure);
    # on the blank variant the same pixels are black, and only the prompts are drawn
    ref = scan_px[SIZE - 8, SIZE - 8]
    assert 100 < ref[0] < 160 and ref[0] == ref[1] == ref[2]
    body = np.all(scan_px == ref, axis=-1)
    assert body.mean() > 0.3 and (blank_px[body] == 0).all()
    drawn = np.any(blank_px != 0, axis=-1)
    assert 0 < drawn.mean() < np.any(scan_px != 0, axis=-1).mean()


# ----------------------------------------------------------------- prompts and letters


def test_no_prompt_image_is_the_windowed_scan_alone(ct_volume):
    opts = render.RenderOptions(image_size=SIZE, dims=["2d"], conventions=["standard"],
                                prompts=["none", "box"])
    spec = render.SliceSpec("t", "axial", 12)
    found = {(r.rows[0]["prompt"], r.rows[0]["background"]): r
             for r in render.render_slice(ct_volume, spec, opts)}
    # no (none, blank): a blank background without prompts would be an empty image
    assert set(found) == {("none", "scan"), ("box", "scan"), ("box", "blank")}
    bare = np.asarray(found[("none", "scan")].frames[0])
    disp, sp = render.display_volume(ct_volume.image, ct_volume.spacing, "axial", "standard")
    grid = render.square_grid(disp.shape[1:], sp[1:], SIZE)
    frame = disp[render.frame_index(12, disp.shape[0], "axial", "standard")]
    _, window = render.window_for(ct_volume, [r["component"] for r in found[("none",
                                                                             "scan")].rows])
    grey = render.apply_window(render.resample_image(frame, grid), window)
    assert np.array_equal(bare, np.repeat(grey[..., None], 3, axis=-1))  # no mark, no letter
    boxed = np.asarray(found[("box", "scan")].frames[0])
    assert (boxed != bare).any(axis=-1).sum() > 50  # the same scan, plus boxes and letters
    rows = found[("none", "scan")].rows
    assert len(rows) >= 2 and all(r["letter"] is None and r["color"] is None for r in rows)


def test_no_prompt_stack_frames_are_grey(ct_volume):
    opts = render.RenderOptions(image_size=SIZE, dims=["3d"], conventions=["storage"],
                                prompts=["none", "mask"], backgrounds=["scan"], frames_3d=6)
    bare, mask = render.render_slice(ct_volume, render.SliceSpec("t", "axial", 12), opts)
    assert bare.rows[0]["prompt"] == "none" and mask.rows[0]["prompt"] == "mask"
    for frame in bare.frames:
        px = np.asarray(frame)
        assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()
    coloured = [np.asarray(f) for f in mask.frames]
    assert any((px[..., 0] != px[..., 2]).any() for px in coloured)


def test_point_lies_inside_a_c_shaped_structure_whose_centroid_does_not():
    frame = np.zeros((64, 64), int)
    yy, xx = np.mgrid[:64, :64]
    ring = (np.hypot(yy - 32, xx - 32) < 20) & (np.hypot(yy - 32, xx - 32) > 12) & (xx < 40)
    frame[ring] = 1
    frame[5:12, 50:60] = 2
    marks = render.frame_marks(frame, {"ring": ("A", "#E69F00"), "box": ("B", "#56B4E9")},
                               {"ring": 1, "box": 2}, 1)
    ring_mark = marks[0]
    c, r = ring_mark.point
    assert frame[r, c] == 1
    cc, cr = ring_mark.centroid
    assert frame[round(cr), round(cc)] != 1


def test_letters_are_shuffled_deterministically():
    comps = [f"s{i}" for i in range(5)]
    a = render.assign_letters(comps, 7, "slice-1")
    assert a == render.assign_letters(comps, 7, "slice-1")
    assert sorted(v[0] for v in a.values()) == list("ABCDE")
    assert len({v[1] for v in a.values()}) == 5
    # across slices, letter A lands on different structures (not always the first / top one)
    firsts = {next(c for c, v in render.assign_letters(comps, 7, f"slice-{k}").items()
                   if v[0] == "A") for k in range(20)}
    assert len(firsts) >= 3


def _crowded_marks(synth_root, convention):
    """The six marks of the crowded MRI slice (eight touching cubes) as rendered."""
    opts = render.RenderOptions(image_size=SIZE)
    prepared = synth_root / "data" / "prepared"
    vols = pd.read_parquet(prepared / "volumes.parquet")
    volume = render.load_volume(prepared, vols[vols.volume_id == "synth-crowded"].iloc[0],
                                pd.read_parquet(prepared / "components.parquet"))
    disp, sp = render.display_volume(volume.labels, volume.spacing, "axial", convention)
    grid = render.square_grid(disp.shape[1:], sp[1:], SIZE)
    lab = render.resample_labels(disp[render.frame_index(5, disp.shape[0], "axial",
                                                         convention)], grid)
    chosen = render.choose_structures(volume, render.SliceSpec("x", "axial", 5), opts)
    letters = render.assign_letters(sorted(chosen), 0, "x")
    return render.frame_marks(lab, letters, {v: k for k, v in volume.names.items()}, 1)


@pytest.mark.parametrize("prompt", ["mask", "box", "point"])
def test_letter_boxes_stay_inside_apart_and_off_their_own_mark(synth_root, prompt):
    for convention in CONVENTIONS:
        marks = _crowded_marks(synth_root, convention)
        assert len(marks) == 6
        placements = render.layout_letters(marks, prompt, SIZE)
        boxes = [p.text_box for p in placements]
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            if prompt == "mask":
                assert not marks[i].mask[y0:y1, x0:x1].any()
            if prompt == "point":  # no letter hides a dot
                for m in marks:
                    c, r = m.point
                    assert not (x0 <= c < x1 and y0 <= r < y1)
            for bx0, by0, bx1, by1 in boxes[i + 1:]:
                assert x1 <= bx0 or bx1 <= x0 or y1 <= by0 or by1 <= y0


def _two_dots(gap):
    """Two small squares ``gap`` pixels apart on a 128-pixel frame: (marks, frame)."""
    frame = np.zeros((SIZE, SIZE), int)
    frame[60:66, 40:46] = 1
    frame[60:66, 40 + gap:46 + gap] = 2
    marks = render.frame_marks(frame, {"a": ("A", "#E69F00"), "b": ("B", "#56B4E9")},
                               {"a": 1, "b": 2}, 1)
    return marks, frame


def test_point_letter_sits_beside_its_dot_with_the_dot_centre_as_anchor():
    marks, _ = _two_dots(50)
    for m, p in zip(marks, render.layout_letters(marks, "point", SIZE), strict=True):
        assert p.anchor == tuple(float(v) for v in m.point)
        assert not p.leader
        x0, y0, x1, y1 = p.text_box
        gap = np.hypot(max(x0 - m.point[0], m.point[0] - (x1 - 1), 0),
                       max(y0 - m.point[1], m.point[1] - (y1 - 1), 0))
        assert gap <= render._dot_radius(SIZE) + 3


def test_box_letter_is_anchored_on_a_corner_of_its_box():
    marks, _ = _two_dots(50)
    for m, p in zip(marks, render.layout_letters(marks, "box", SIZE), strict=True):
        x0, y0, x1, y1 = render._box_outline(m, SIZE)
        assert p.anchor in {(x0, y0), (x1, y0), (x0, y1), (x1, y1)}
        assert not p.leader


def test_mask_letter_is_anchored_on_an_edge_pixel_of_its_mask():
    marks, frame = _two_dots(50)
    for m, p in zip(marks, render.layout_letters(marks, "mask", SIZE), strict=True):
        c, r = (int(v) for v in p.anchor)
        assert m.mask[r, c]
        assert not m.mask[r - 1:r + 2, c - 1:c + 2].all()  # on the edge, not inside


def test_letters_of_nearby_dots_stay_nearer_their_own_dot():
    # dots 12 px apart: each letter must sit on its own dot's far side
    marks, _ = _two_dots(12)
    placements = render.layout_letters(marks, "point", SIZE)
    for k, p in enumerate(placements):
        own = np.hypot(*np.subtract(p.centre, marks[k].point))
        other = np.hypot(*np.subtract(p.centre, marks[1 - k].point))
        assert own <= render.OWN_MARK_RATIO * other


def test_a_letter_moved_away_from_its_dot_is_joined_to_it_by_a_leader_line():
    # a small structure in the hole of a large one: beside its dot the letter would hide
    # the large structure, so it moves out of it and a leader joins it to the dot
    frame = np.zeros((SIZE, SIZE), int)
    frame[30:98, 30:98] = 2
    frame[62:66, 62:66] = 1
    marks = render.frame_marks(frame, {"small": ("A", render.PALETTE[0]),
                                       "large": ("B", render.PALETTE[1])},
                               {"small": 1, "large": 2}, 1)
    placements = render.layout_letters(marks, "point", SIZE)
    centre = placements[0]
    assert centre.leader and not placements[1].leader
    assert centre.anchor == (63.0, 63.0)
    img = np.asarray(render.draw(None, marks, "point", SIZE, placements)).astype(int)
    colour = np.array([int(render.PALETTE[0][i:i + 2], 16) for i in (1, 3, 5)])
    x0, y0, x1, y1 = centre.text_box
    ax, ay = centre.anchor
    end = (min(max(ax, x0), x1 - 1), min(max(ay, y0), y1 - 1))
    mid = (round((ax + end[0]) / 2), round((ay + end[1]) / 2))
    patch = img[mid[1] - 1:mid[1] + 2, mid[0] - 1:mid[0] + 2].reshape(-1, 3)
    assert (np.abs(patch - colour).max(axis=1) <= 1).any()  # the leader passes there


def test_letter_centre_column_is_where_the_glyph_is_drawn(ct_volume):
    opts = render.RenderOptions(image_size=SIZE, dims=["2d"], conventions=["standard"],
                                prompts=["point"], backgrounds=["blank"])
    (rend,) = render.render_slice(ct_volume, render.SliceSpec("t", "axial", 12), opts)
    px = np.asarray(rend.frames[0]).astype(int)
    for row in rend.rows:
        colour = np.array([int(row["color"][i:i + 2], 16) for i in (1, 3, 5)])
        hits = np.argwhere(np.abs(px - colour).max(axis=2) <= 1)
        # the glyph's coloured pixels: those farther from the dot than its radius
        far = hits[np.hypot(hits[:, 1] - row["anchor_col"], hits[:, 0] - row["anchor_row"])
                   > render._dot_radius(SIZE) + 1]
        assert len(far) > 0
        assert far[:, 1].mean() == pytest.approx(row["letter_col"], abs=3)
        assert far[:, 0].mean() == pytest.approx(row["letter_row"], abs=3)


def test_every_letter_is_nearer_its_own_anchor_in_every_render_and_frame(rendered,
                                                                        synth_root):
    letters = pd.read_parquet(synth_root / "data" / "benchmark" / "letters.parquet")
    renders, _ = rendered
    prompted = renders[renders.prompt != "none"]
    assert set(letters.render_id) == set(prompted.render_id)
    assert (letters[letters.render_id.str.contains("_3d_")].frame > 0).any()
    checked, bad = check_letters_on_marks(letters)
    assert checked == len(letters) > 0
    assert bad.empty, bad.head().to_string()


def test_letter_checker_flags_a_letter_nearer_another_structures_anchor():
    letters = pd.DataFrame({
        "render_id": ["r", "r", "r"], "frame": [0, 0, 0], "letter": ["A", "B", "C"],
        "component": ["a", "b", "c"],
        "letter_col": [10.0, 52.0, 90.0], "letter_row": [10.0, 10.0, 10.0],
        "anchor_col": [14.0, 80.0, 120.0], "anchor_row": [10.0, 10.0, 10.0],
        "leader": [False, True, False]})
    checked, bad = check_letters_on_marks(letters)
    # B's letter (col 52) is 28 px from its anchor, 38 px from A's: fine.
    # C's letter (col 90) is 30 px from its own anchor and 10 px from B's: flagged.
    assert checked == 3
    assert bad.letter.tolist() == ["C"] and bad.nearer.tolist() == ["B"]


def test_renders_rows_record_the_letter_and_its_anchor_on_the_reference_frame(rendered,
                                                                              synth_root):
    renders, _ = rendered
    letters = pd.read_parquet(synth_root / "data" / "benchmark" / "letters.parquet")
    prompted = renders[renders.prompt != "none"]
    cols = ["letter_col", "letter_row", "anchor_col", "anchor_row", "leader"]
    assert prompted[cols].notna().all(axis=None)
    assert renders[renders.prompt == "none"][cols + ["letter_frame"]].isna().all(axis=None)
    two = prompted[prompted.dims == "2d"]
    assert two.letter_frame.isna().all()
    stacks = prompted[prompted.dims == "3d"]
    assert stacks.letter_frame.between(stacks.frame_first, stacks.frame_last).all()
    merged = stacks.merge(letters, left_on=["render_id", "letter_frame", "letter"],
                          right_on=["render_id", "frame", "letter"], suffixes=("", "_f"))
    assert len(merged) == len(stacks)
    for c in cols:
        assert (merged[c].astype(float) == merged[c + "_f"].astype(float)).all(), c


def test_mask_prompt_tints_the_structure_in_its_colour(ct_volume):
    opts = render.RenderOptions(image_size=SIZE, dims=["2d"], conventions=["standard"],
                                prompts=["mask"], backgrounds=["blank"])
    (mask_render,) = render.render_slice(ct_volume, render.SliceSpec("t", "axial", 12), opts)
    px = np.asarray(mask_render.frames[0]).astype(int)
    for row in mask_render.rows:
        colour = np.array([int(row["color"][i:i + 2], 16) for i in (1, 3, 5)])
        centre = px[round(row["centroid_row"]), round(row["centroid_col"])]
        assert np.abs(centre - np.round(0.35 * colour)).max() <= 1, row["component"]


# ----------------------------------------------------------------- the stage outputs


def test_renders_table_has_the_contract_columns_and_every_factor_cell(rendered):
    renders, _ = rendered
    assert list(renders.columns) == render.RENDER_COLUMNS
    ct = renders[renders.volume_id == "synth-ct"]
    cells = ct.groupby(["slice_id", "dims", "convention", "prompt", "background"]).render_id
    assert cells.nunique().eq(1).all()
    # 3 slices x dims x conventions x (3 prompts x 2 backgrounds + the scan without a prompt)
    assert len(cells) == 3 * 2 * 2 * (3 * 2 + 1)
    bare = renders[renders.prompt == "none"]
    assert set(bare.background) == {"scan"}
    assert bare.letter.isna().all() and bare.color.isna().all()
    prompted = renders[renders.prompt != "none"]
    assert prompted.letter.notna().all()
    assert not prompted.duplicated(["render_id", "letter"]).any()
    assert not renders.duplicated(["render_id", "component"]).any()


def test_no_prompt_render_lists_the_same_structures_and_centroids_as_a_prompted_one(rendered):
    renders, _ = rendered
    cols = ["slice_id", "dims", "convention", "component", "centroid_col", "centroid_row",
            "frame_first", "frame_last", "visible_x", "visible_y", "visible_z"]
    scan = renders[renders.background == "scan"]
    bare = scan[scan.prompt == "none"][cols].sort_values(cols[:4]).reset_index(drop=True)
    box = scan[scan.prompt == "box"][cols].sort_values(cols[:4]).reset_index(drop=True)
    assert len(bare) > 0
    pd.testing.assert_frame_equal(bare, box)


def test_every_image_file_exists_with_the_declared_size(rendered, synth_root):
    renders, _ = rendered
    bench = synth_root / "data" / "benchmark"
    for row in renders.drop_duplicates("render_id").itertuples():
        if row.dims == "2d":
            files = [bench / row.image_path]
        else:
            files = sorted((bench / row.image_path).glob("frame_*.png"))
            assert len(files) == row.n_frames == FRAMES
        with Image.open(files[0]) as img:
            assert img.size == (row.width, row.height) == (SIZE, SIZE)


def test_pixel_centroids_agree_with_world_centroids_through_the_mapping(rendered):
    """Renderer and ground truth share the mapping: screen order = projected world order."""
    renders, _ = rendered
    checked = 0
    for (_, plane, convention), group in renders[renders.dims == "2d"].groupby(
            ["render_id", "plane", "convention"]):
        mapping = screen_mapping(plane, convention)
        xyz = group[["visible_x", "visible_y", "visible_z"]].to_numpy()
        px = group[["centroid_col", "centroid_row"]].to_numpy()
        pixel_mm = group.pixel_mm.iloc[0]
        for i in range(len(group)):
            for j in range(len(group)):
                right, down, _ = screen_offset(xyz[j] - xyz[i], mapping)
                assert (px[j, 0] - px[i, 0]) * pixel_mm == pytest.approx(right, abs=1.5)
                assert (px[j, 1] - px[i, 1]) * pixel_mm == pytest.approx(down, abs=1.5)
                checked += 1
    assert checked > 100


def test_standard_axial_shows_the_patient_right_liver_on_the_image_left(rendered):
    renders, _ = rendered
    for convention, liver_left in (("standard", True), ("storage", None)):
        sel = renders[(renders.slice_id == "synth-ct-axial") & (renders.dims == "2d")
                      & (renders.convention == convention)]
        col = sel.groupby("component").centroid_col.mean()
        if liver_left:
            assert col["liver"] < col["spleen"]
        row = sel.groupby("component").centroid_row.mean()
        if convention == "standard":  # anterior up
            assert row["stomach"] < row["vertebrae_L1"]
        else:  # storage axial: patient right at the top, anterior on the left
            assert row["liver"] < row["spleen"]
            assert col["stomach"] < col["vertebrae_L1"]


def test_storage_coronal_puts_the_superior_heart_left_of_the_bladder(rendered):
    renders, _ = rendered
    sel = renders[(renders.slice_id == "synth-ct-coronal") & (renders.dims == "2d")]
    storage = sel[sel.convention == "storage"].groupby("component").centroid_col.mean()
    standard = sel[sel.convention == "standard"].groupby("component").centroid_row.mean()
    assert storage["heart"] < storage["urinary_bladder"]
    assert standard["heart"] < standard["urinary_bladder"]  # superior up


def test_stacks_hold_an_even_number_of_frames_and_count_visible_frames(rendered):
    renders, _ = rendered
    stacks = renders[renders.dims == "3d"]
    assert set(stacks.n_frames) == {FRAMES}
    assert (stacks.frame_first <= stacks.frame_last).all()
    assert (stacks.visible_frames >= 1).all()
    assert (stacks.visible_frames <= stacks.frame_last - stacks.frame_first + 1).all()
    assert stacks.visible_area_mm2.isna().all() and stacks.image_path.str.startswith("stacks/").all()


def test_stack_frame_order_follows_the_convention(ct_volume):
    # sagittal stack: frames run left -> right in standard, right -> left in storage; the
    # stomach (x = -4 mm, patient left) comes before the vertebra (x = 0) only in standard
    opts = render.RenderOptions(image_size=SIZE, dims=["3d"], prompts=["box"],
                                backgrounds=["blank"], frames_3d=16)
    stacks = render.render_slice(ct_volume, render.SliceSpec("t", "sagittal", 22), opts)
    assert len(stacks) == 2
    for stack in stacks:
        assert len(stack.frames) == 16
        rows = {r["component"]: r for r in stack.rows}
        mid = {c: (r["frame_first"] + r["frame_last"]) / 2 for c, r in rows.items()}
        if rows["stomach"]["convention"] == "standard":
            assert mid["stomach"] < mid["vertebrae_L1"]
        else:
            assert mid["stomach"] > mid["vertebrae_L1"]
    # and in the axial direction, the display frame index grows toward superior in standard
    # and toward inferior in storage (the heart, label 5, sits high in the volume)
    z_heart = np.nonzero((ct_volume.labels == 5).any(axis=(0, 1)))[0]
    for convention, expected in (("standard", z_heart),
                                 ("storage", ct_volume.labels.shape[2] - 1 - z_heart[::-1])):
        disp, _ = render.display_volume(ct_volume.labels, ct_volume.spacing, "axial",
                                        convention)
        assert np.array_equal(np.nonzero((disp == 5).any(axis=(1, 2)))[0], expected)


def test_rendering_is_deterministic_and_parallel_gives_the_same_bytes(rendered, synth_root,
                                                                      tmp_path):
    build_prepared(tmp_path)
    again = render.render_benchmark("demo", root=tmp_path, **{**FAST, "workers": 2})
    renders, _ = rendered
    pd.testing.assert_frame_equal(renders, again)
    first = _tree_digest(synth_root / "data" / "benchmark")
    assert first and first == _tree_digest(tmp_path / "data" / "benchmark")


def test_stage_skips_when_fresh_and_redoes_with_force(rendered, synth_root):
    bench = synth_root / "data" / "benchmark"
    png = next((bench / "images").glob("*.png"))
    before = png.stat().st_mtime_ns
    render.render_benchmark("demo", root=synth_root, **FAST)
    assert png.stat().st_mtime_ns == before
    render.render_benchmark("demo", root=synth_root, force=True, **FAST)
    assert png.stat().st_mtime_ns != before


# ----------------------------------------------------------------- bad input


def test_slice_with_fewer_than_two_structures_is_skipped_with_a_reason(rendered):
    renders, skipped = rendered
    assert "synth-ct-lonely" not in set(renders.slice_id)
    reason = skipped[(skipped.slice_id == "synth-ct-lonely") & (skipped.action == "skipped")]
    assert reason.reason.str.contains("fewer than two structures").any()


def test_structure_below_the_minimum_area_is_dropped_with_a_reason(rendered):
    renders, skipped = rendered
    assert "adrenal_gland_right" not in set(renders.component)
    dropped = skipped[(skipped.component == "adrenal_gland_right")
                      & (skipped.slice_id == "synth-ct-axial")]
    assert dropped.action.eq("dropped").all() and len(dropped) == 1
    assert "min_visible_area_mm2" in dropped.reason.iloc[0]


def test_more_than_six_candidates_are_trimmed_to_six_with_reasons(rendered):
    renders, skipped = rendered
    crowded = renders[renders.slice_id == "synth-crowded-axial"]
    assert crowded.groupby("render_id").size().eq(6).all()
    assert set(crowded.letter.dropna()) == set("ABCDEF")
    trimmed = skipped[(skipped.slice_id == "synth-crowded-axial")
                      & (skipped.action == "trimmed") & skipped.component.notna()]
    assert len(trimmed) == 2 and trimmed.reason.str.contains("max_labels").all()
    assert not set(trimmed.component) & set(crowded.component)


def test_odd_frame_count_is_trimmed_to_even_with_a_reason(ct_volume):
    opts = render.RenderOptions(image_size=SIZE, dims=["3d"], conventions=["standard"],
                                prompts=["point"], backgrounds=["scan"], frames_3d=7)
    (stack,) = render.render_slice(ct_volume, render.SliceSpec("t", "axial", 12), opts)
    assert len(stack.frames) == 6 and stack.rows[0]["n_frames"] == 6
    assert any("odd" in s["reason"] and s["action"] == "trimmed" for s in opts.skipped)


def test_missing_volume_file_is_skipped_naming_it_and_the_rest_renders(rendered):
    renders, skipped = rendered
    missing = skipped[skipped.volume_id == "synth-missing"]
    assert len(missing) == 1 and "synth-missing/image.nii.gz" in missing.reason.iloc[0]
    assert {"synth-ct", "synth-crowded"} <= set(renders.volume_id)


def test_contact_sheet_of_a_real_ct_puts_the_liver_on_the_viewers_left(tmp_path):
    """The notebook-02 figure of the real abdominal CT: every plane x convention row rendered,
    and in the standard axial row the liver (patient right) on the image's left half."""
    import matplotlib

    from mislib import volumes
    from mislib.config import stage_params

    matplotlib.use("Agg")
    volumes.prepare("demo", root=tmp_path, sources=["torso_ct"], workers=1)
    params = stage_params("demo", "render", image_size=128)
    fig = render.contact_sheet_for("torso_ct-abdomen_3mm", params, root=tmp_path)
    assert "torso_ct-abdomen_3mm (CT)" in fig.texts[0].get_text()
    assert len(fig.axes) == 6 * 5 and not any(t.get_text() == "skipped"
                                              for a in fig.axes for t in a.texts)
    volume = render.load_prepared_volume("torso_ct-abdomen_3mm", root=tmp_path)
    centre = np.round(np.argwhere(volume.labels > 0).mean(axis=0)).astype(int)
    spec = render.SliceSpec("t", "axial", int(centre[2]))
    opts = render.RenderOptions(image_size=128, dims=["2d"], conventions=["standard"],
                                prompts=["mask"], backgrounds=["scan"])
    (image,) = render.render_slice(volume, spec, opts)
    liver = [r for r in image.rows if r["component"] == "liver"]
    assert liver and liver[0]["centroid_col"] < 64
    assert image.rows[0]["window"] == "soft_tissue"


def test_unknown_factor_level_is_rejected_before_rendering(synth_root):
    with pytest.raises(ValueError, match=r"\[render\] prompts = \[.arrow.\]: item .arrow."):
        render.render_benchmark("demo", root=synth_root, prompts=["arrow"], **FAST)


# ----------------------------------------------------------------- the real brain atlas


@pytest.fixture(scope="session")
def atlas_rendered(tmp_path_factory):
    """Stage 01 on the real MNI152 + neuromorphometrics atlas (two slices per plane; every
    label, not the curated list, so that many twins are checked), then stage 02 in 2D with the
    mask prompt on the scan."""
    from mislib import volumes

    root = tmp_path_factory.mktemp("atlas_render")
    volumes.prepare("demo", root=root, sources=["brain_atlas"], slices_per_volume=6, workers=1,
                    structure_lists={}, max_slice_components=0)
    renders = render.render_benchmark("demo", root=root, dims=["2d"], prompts=["mask"],
                                      backgrounds=["scan"], workers=1)
    prepared = root / "data" / "prepared"
    volume = render.load_prepared_volume(
        pd.read_parquet(prepared / "volumes.parquet").volume_id.iloc[0], root=root)
    index = pd.read_parquet(prepared / "slices.parquet").set_index("slice_id")["index"]
    return renders, volume, index.astype(int).to_dict()


def _twins(components):
    names = set(components)
    return [(n, "Right_" + n[len("Left_"):]) for n in sorted(names)
            if n.startswith("Left_") and "Right_" + n[len("Left_"):] in names]


def _all_marks(volume, plane, index, convention, size=448):
    """Pixel centroids {component: (col, row)} of every named structure on a slice."""
    disp, sp = render.display_volume(volume.labels, volume.spacing, plane, convention)
    grid = render.square_grid(disp.shape[1:], sp[1:], size)
    frame = render.resample_labels(disp[render.frame_index(index, disp.shape[0], plane,
                                                           convention)], grid)
    out = {}
    for lab in np.unique(frame[frame > 0]):
        rows, cols = np.nonzero(frame == lab)
        out[volume.names[int(lab)]] = (cols.mean(), rows.mean())
    return out


def test_real_atlas_standard_axial_shows_every_left_structure_right_of_its_twin(
        atlas_rendered):
    renders, volume, slice_index = atlas_rendered
    axial = renders[(renders.plane == "axial") & (renders.convention == "standard")]
    assert axial.slice_id.nunique() >= 1
    pairs = 0
    for _, group in axial.groupby("render_id"):
        col = dict(zip(group.component, group.centroid_col, strict=True))
        for left, right in _twins(col):
            assert col[left] > col[right], (left, right)
            pairs += 1
    assert pairs >= 1
    # every twin on those slices, labelled or not, obeys the same rule
    for sid in axial.slice_id.unique():
        index = slice_index[sid]
        marks = _all_marks(volume, "axial", index, "standard")
        twins = _twins(marks)
        assert len(twins) >= 10
        for left, right in twins:
            assert marks[left][0] > marks[right][0], (index, left, right)


def test_real_atlas_storage_coronal_puts_the_more_superior_structure_further_left(
        atlas_rendered):
    renders, volume, slice_index = atlas_rendered
    coronal = renders[(renders.plane == "coronal") & (renders.convention == "storage")]
    assert coronal.slice_id.nunique() >= 1
    pairs = 0
    for _, group in coronal.groupby("render_id"):
        z = group.visible_z.to_numpy()
        col = group.centroid_col.to_numpy()
        for i in range(len(group)):
            for j in range(len(group)):
                if z[i] - z[j] >= 10.0:  # i clearly superior to j
                    assert col[i] < col[j]
                    pairs += 1
    assert pairs >= 1
    # every structure pair on those slices, using the atlas's own world centroids
    for sid in coronal.slice_id.unique():
        index = slice_index[sid]
        marks = _all_marks(volume, "coronal", index, "storage")
        zs = {}
        for name in marks:
            lab = {v: k for k, v in volume.names.items()}[name]
            ijk = np.argwhere(volume.labels[:, index, :] == lab)
            zs[name] = volume.world(np.insert(ijk, 1, index, axis=1).mean(axis=0))[2]
        checked = 0
        for a in marks:
            for b in marks:
                if zs[a] - zs[b] >= 10.0:
                    assert marks[a][0] < marks[b][0], (sid, a, b)
                    checked += 1
        assert checked >= 20


# ----------------------------------------------------------------- crash safety (mislib.stage)


def test_a_forced_render_that_fails_keeps_the_old_images_and_their_stamp(tmp_path, monkeypatch):
    """An error after rendering started (here: in the worker loop) replaces nothing: the old
    images, stacks and tables stay, and a rerun without force finds them complete."""
    root = tmp_path / "root"
    build_prepared(root)
    first = render.render_benchmark("demo", root=root, **FAST)
    bench = root / "data" / "benchmark"
    before = _tree_digest(bench)

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(render, "_run_tasks", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        render.render_benchmark("demo", root=root, force=True, **FAST)
    monkeypatch.undo()
    assert _tree_digest(bench) == before
    again = render.render_benchmark("demo", root=root, **FAST)  # fresh: read back
    pd.testing.assert_frame_equal(again, first)
    assert _tree_digest(bench) == before


def _volume_renders(bench: Path, volume_id: str) -> dict[str, str]:
    """Digests of the PNGs rendered from ``volume_id`` (its slice ids start with it)."""
    return {k: v for k, v in _tree_digest(bench).items()
            if k.split("/")[1].startswith(volume_id + "-")}


def test_an_edited_canonical_volume_makes_the_render_stale_and_is_rendered_again(tmp_path):
    """Stage 02 reads stage 01's canonical volumes (``volumes/<id>/image.nii.gz``): its stamp
    holds their digests, so an edited one is rendered again without ``force``, and only the
    tables and images that depend on it change."""
    root = tmp_path / "root"
    prepared = build_prepared(root)
    bench = root / "data" / "benchmark"
    render.render_benchmark("demo", root=root, **FAST)
    ct_before = _volume_renders(bench, "synth-ct")
    mri_before = _volume_renders(bench, "synth-crowded")
    assert ct_before and mri_before
    path = prepared / "volumes" / "synth-ct" / "image.nii.gz"
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj) + 300.0, img.affine), path)
    render.render_benchmark("demo", root=root, **FAST)
    ct_after = _volume_renders(bench, "synth-ct")
    assert sorted(ct_after) == sorted(ct_before)
    changed = [k for k in ct_before if ct_after[k] != ct_before[k]]
    assert changed, "the edited CT volume was not rendered again"
    assert _volume_renders(bench, "synth-crowded") == mri_before


def test_a_deleted_canonical_volume_makes_the_render_stale(tmp_path):
    """A canonical volume removed after stage 02 ran is not vouched for by the old stamp:
    the next run renders again and records the volume as skipped (it cannot be loaded)."""
    root = tmp_path / "root"
    prepared = build_prepared(root)
    bench = root / "data" / "benchmark"
    first = render.render_benchmark("demo", root=root, **FAST)
    assert (first.volume_id == "synth-crowded").any()
    (prepared / "volumes" / "synth-crowded" / "labels.nii.gz").unlink()
    again = render.render_benchmark("demo", root=root, **FAST)
    assert not (again.volume_id == "synth-crowded").any()
    assert _volume_renders(bench, "synth-crowded") == {}
    skipped = pd.read_parquet(bench / "skipped.parquet")
    crowded = skipped[skipped.volume_id == "synth-crowded"]
    assert crowded.reason.str.contains("cannot load volume").all() and len(crowded)


def test_stack_strip_lays_the_frames_out_as_a_grid_of_rows(rendered, synth_root):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    renders, _ = rendered
    stack = renders[renders.dims == "3d"].render_id.iloc[0]
    fig = render.stack_strip(synth_root / "data" / "benchmark", renders, stack, n_show=6,
                             columns=4)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == [f"frame {i}" for i in range(FRAMES)]
    rows = {round(ax.get_position().y0, 3) for ax in shown}
    assert len(rows) == 2  # 6 frames, 4 a row
    assert fig.get_size_inches()[0] == pytest.approx(7.5)  # page width
    plt.close(fig)
