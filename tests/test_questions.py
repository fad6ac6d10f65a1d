"""mislib.questions: the factorial question set and its ground truth.

Small synthetic stage-01/02 tables are built in code: three volumes (a brain MRI, a torso CT
and a right knee), one slice per plane, 2D renders in both conventions, two prompts and both
backgrounds and the scan without a prompt (``none``: no letters), plus 3D stacks; pixel centroids and frame ranges follow the geometry mapping
as a renderer would draw them. The truths are then recomputed here from the inputs.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mislib.config import stage_params
from mislib.geometry import screen_mapping, screen_offset
from mislib.questions import (
    FORMS,
    QUESTION_COLUMNS,
    GroundTruthMismatch,
    Label,
    UnitKey,
    View,
    anatomical_term,
    build_questions,
    colloquial_term,
    display_name,
    display_statement,
    frame_order_agrees,
    generate,
    names_decide,
)
from mislib.scoring import is_correct, parse_answer
from mislib.validity import validity_report

MARGIN = 10.0
# volume -> (source, modality, laterality, {component: 3D centroid (mm)})
VOLUMES = {
    "brain-1": ("brain_atlas", "MRI", None, {
        "Left_Hippocampus": (-25.0, -20.0, -12.0), "Right_Hippocampus": (26.0, -21.0, -11.0),
        "Left_Putamen": (-24.0, 2.0, 1.0), "3rd_Ventricle": (0.0, -12.0, 2.0)}),
    "ct-1": ("totalsegmentator", "CT", None, {
        "liver": (-60.0, 10.0, 40.0), "spleen": (70.0, -30.0, 50.0),
        "kidney_left": (55.0, -45.0, 5.0), "stomach": (35.0, 0.0, 46.0)}),  # 6 mm over spleen
    "knee-1": ("knee_mri", "MRI", "right", {
        "femur": (0.0, 0.0, 40.0), "tibia": (2.0, -3.0, -40.0), "fibula": (30.0, -15.0, -50.0),
        "patella": (5.0, 35.0, 20.0)}),
}
PIXEL_MM = 0.5
IMAGE_SIZE = 8


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_inputs(root, conventions=("standard", "storage"), prompts=("none", "mask", "box"),
                write_images=True):
    """Write volumes/components/renders parquet files (and tiny images) under ``root``."""
    prepared, bench = root / "data" / "prepared", root / "data" / "benchmark"
    prepared.mkdir(parents=True, exist_ok=True)
    bench.mkdir(parents=True, exist_ok=True)
    vols, comps, renders = [], [], []
    for v, (source, modality, laterality, structures) in VOLUMES.items():
        vols.append({"volume_id": v, "source": source, "modality": modality, "case": v,
                     "laterality": laterality, "n_components": len(structures)})
        for label, (name, c) in enumerate(structures.items(), start=1):
            comps.append({"volume_id": v, "source": source, "modality": modality,
                          "component": name, "label": label, "voxels": 100,
                          "centroid_x": c[0], "centroid_y": c[1], "centroid_z": c[2]})
        centre = np.mean(list(structures.values()), axis=0)
        for plane, fixed in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
            slice_id = f"{v}-{plane}"
            for dims in ("2d", "3d"):
                for convention in conventions:
                    m = screen_mapping(plane, convention)
                    for prompt in prompts:
                        for background in ("scan", "blank"):
                            if prompt == "none" and background == "blank":
                                continue  # stage 02 draws no empty image
                            rid = f"{slice_id}-{dims}-{convention}-{prompt}-{background}"
                            n_frames = 1 if dims == "2d" else 4
                            image_path = (f"images/{rid}.png" if dims == "2d"
                                          else f"stacks/{rid}/")
                            if write_images:
                                value = len(renders) % 250
                                if dims == "2d":
                                    (bench / image_path).parent.mkdir(exist_ok=True)
                                    (bench / image_path).write_bytes(_png(value))
                                else:
                                    (bench / image_path).mkdir(parents=True, exist_ok=True)
                                    for f in range(n_frames):
                                        (bench / image_path / f"frame_{f:03d}.png").write_bytes(
                                            _png((value + f) % 250))
                            for k, (name, c) in enumerate(structures.items()):
                                world = np.array(c, float)
                                if dims == "2d":  # visible part: on the slice plane
                                    world[fixed] = centre[fixed]
                                right, down, frame = screen_offset(world - centre, m)
                                first = last = mid = None
                                if dims == "3d":  # a 10-mm-per-frame stack, 4 frames wide
                                    mid = 20 + frame / 10.0
                                    first, last = mid - 1.5, mid + 1.5
                                renders.append({
                                    "render_id": rid, "volume_id": v, "slice_id": slice_id,
                                    "plane": plane, "convention": convention, "dims": dims,
                                    "prompt": prompt, "background": background,
                                    "image_path": image_path, "n_frames": n_frames,
                                    "width": IMAGE_SIZE, "height": IMAGE_SIZE,
                                    "pixel_mm": PIXEL_MM,
                                    "letter": None if prompt == "none" else "ABCDEF"[k],
                                    "component": name,
                                    "color": None if prompt == "none" else "#ff0000",
                                    "centroid_col": 200 + right / PIXEL_MM,
                                    "centroid_row": 200 + down / PIXEL_MM,
                                    "frame_first": first, "frame_last": last,
                                    "centroid_frame": None if dims == "2d" else mid,
                                    "visible_x": world[0], "visible_y": world[1],
                                    "visible_z": world[2],
                                    "visible_area_mm2": 50.0 if dims == "2d" else None,
                                    "visible_frames": None if dims == "2d" else 4})
    volumes, components = pd.DataFrame(vols), pd.DataFrame(comps)
    render_df = pd.DataFrame(renders)
    volumes.to_parquet(prepared / "volumes.parquet", index=False)
    components.to_parquet(prepared / "components.parquet", index=False)
    render_df.to_parquet(bench / "renders.parquet", index=False)
    return render_df, volumes, components


def _params(**overrides):
    return stage_params("demo", "questions", **overrides)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("questions")
    renders, volumes, components = make_inputs(root, write_images=False)
    return root, renders, volumes, components


@pytest.fixture(scope="module")
def full(inputs):
    """Every cell of every relation (the full factorial), so each check sees all of them."""
    _, renders, volumes, components = inputs
    return build_questions(renders, volumes, components,
                           _params(cells_per_relation="all", terminologies_per_relation="all",
                                   plane_cells_per_unit="all", max_pairs_per_unit="all"),
                           progress=False)


def _world(renders, components, q, comp):
    """The world centroid (3,) the truth of question ``q`` rests on, looked up in the inputs."""
    if pd.isna(q["render_id"]):
        table, key, cols = components, (q["volume_id"], comp), ["centroid_x", "centroid_y",
                                                                 "centroid_z"]
        names = ["volume_id", "component"]
    else:
        table, key, cols = renders, (q["render_id"], comp), ["visible_x", "visible_y",
                                                              "visible_z"]
        names = ["render_id", "component"]
    lookup = table.attrs.get("lookup")
    if lookup is None:
        lookup = table.attrs["lookup"] = {
            k: np.array(v, float)
            for k, v in zip(zip(*(table[n] for n in names), strict=True),
                            table[cols].itertuples(index=False, name=None), strict=True)}
    return lookup[key]


# ---- direction terms -------------------------------------------------------------------

def test_anatomical_terms_are_patient_relative_and_medial_lateral_on_a_limb():
    assert [anatomical_term(c) for c in "RLAPSI"] == [
        "right", "left", "anterior", "posterior", "superior", "inferior"]
    assert anatomical_term("R", "right") == "lateral" and anatomical_term("L", "right") == "medial"
    assert anatomical_term("R", "left") == "medial" and anatomical_term("S", "left") == "superior"


@pytest.mark.parametrize(("plane", "convention", "expected"), [
    # world code -> screen term; standard views: anterior/superior up, patient right on the left
    ("axial", "standard", {"R": "left", "A": "above", "S": "later"}),
    ("coronal", "standard", {"R": "left", "S": "above", "A": "earlier"}),
    ("sagittal", "standard", {"A": "left", "S": "above", "R": "later"}),
    ("axial", "storage", {"R": "above", "A": "left", "S": "earlier"}),
    ("coronal", "storage", {"R": "above", "S": "left", "A": "earlier"}),
    ("sagittal", "storage", {"A": "above", "S": "left", "R": "earlier"}),
])
def test_colloquial_terms_follow_the_screen_mapping(plane, convention, expected):
    m = screen_mapping(plane, convention)
    for code, term in expected.items():
        assert colloquial_term(code, m) == term


def test_display_names_read_naturally():
    assert display_name("kidney_left") == "left kidney"
    assert display_name("Left_Hippocampus") == "left hippocampus"
    assert display_name("vertebrae_L1") == "L1 vertebra"


# ---- the question table ----------------------------------------------------------------

def test_questions_cover_every_source_family_and_form(full):
    assert list(full.columns) == list(QUESTION_COLUMNS)
    assert set(full["source"]) == {"brain_atlas", "totalsegmentator", "knee_mri"}
    assert set(full["family"]) == {"relation_2d", "relation_3d", "plane"}
    assert set(full["form"]) == set(FORMS)
    assert set(full["ablation"]) == {"none", "blank", "text_only"}
    assert full["question_id"].is_unique


def test_true_and_false_are_exactly_balanced(full):
    closed = full[full.form != "open"]
    assert (closed["answer"] == "True").sum() == (closed["answer"] == "False").sum()
    for _, cell in closed.groupby(["family", "ablation"], dropna=False):
        assert (cell["answer"] == "True").sum() == (cell["answer"] == "False").sum()


def test_open_answers_are_balanced_across_direction_terms(full):
    rel = full[(full.form == "open") & (full.family != "plane")].copy()
    rel["options"] = rel["choices"].map(lambda c: tuple(sorted(c)))
    keys = ["family", "terminology", "ablation", "convention", "options"]
    for key, cell in rel.groupby(keys, dropna=False):
        counts = cell["answer"].value_counts()
        assert set(counts.index) <= set(key[-1])
        assert counts.max() - counts.reindex(list(key[-1]), fill_value=0).min() <= 1, key


def test_every_closed_false_inverts_its_closed_true(full):
    opposite = {"superior": "inferior", "anterior": "posterior", "left": "right",
                "medial": "lateral", "above": "below", "earlier": "later"}
    opposite.update({v: k for k, v in opposite.items()})
    rel = full[full.family != "plane"]
    by_form = {f: g.set_index("relation_id") for f, g in rel.groupby("form")}
    t, f, o = by_form["closed_true"], by_form["closed_false"], by_form["open"]
    assert len(t) == len(f) == len(o) == rel.relation_id.nunique()
    f, o = f.loc[t.index], o.loc[t.index]
    assert (t.answer == "True").all() and (f.answer == "False").all()
    assert (f.direction == t.direction.map(opposite)).all() and (o.answer == t.direction).all()
    assert (t.component_a == f.component_a).all() and (t.component_b == f.component_b).all()
    plane = full[full.family == "plane"].set_index(["relation_id", "form"])["direction"]
    for rid in plane.index.get_level_values(0).unique():
        assert plane[(rid, "closed_false")] != plane[(rid, "closed_true")] == plane[(rid, "open")]


def test_no_relation_below_the_margin_is_asked(inputs, full):
    _, renders, _, components = inputs
    axis_index = {"R/L": 0, "A/P": 1, "S/I": 2}
    rel = full[full.family != "plane"]
    assert (rel["separation_mm"] >= MARGIN).all()
    for q in rel.drop_duplicates("relation_id").to_dict("records"):
        a = _world(renders, components, q, q["component_a"])
        b = _world(renders, components, q, q["component_b"])
        assert abs(a - b)[axis_index[q["axis"]]] >= MARGIN, q["question_id"]
    # stomach and spleen are 6 mm apart along S/I: never asked along it
    close = ["stomach", "spleen"]
    pair = rel[rel.component_a.isin(close) & rel.component_b.isin(close)]
    assert not (pair["axis"] == "S/I").any()


def test_anatomical_truth_comes_from_world_geometry(inputs, full):
    _, renders, _, components = inputs
    codes = {"R/L": (0, "R", "L"), "A/P": (1, "A", "P"), "S/I": (2, "S", "I")}
    rel = full[(full.family != "plane") & (full.terminology == "anatomical")
               & (full.form == "open")]
    assert len(rel) > 20
    for q in rel.to_dict("records"):
        axis, pos, neg = codes[q["axis"]]
        d = (_world(renders, components, q, q["component_a"])
             - _world(renders, components, q, q["component_b"]))[axis]
        lat = "right" if q["source"] == "knee_mri" else None
        assert q["answer"] == anatomical_term(pos if d > 0 else neg, lat)
    knee_x = rel[(rel.source == "knee_mri") & (rel.axis == "R/L")]
    assert set(knee_x["answer"]) <= {"medial", "lateral"} and len(knee_x)


def test_colloquial_truth_comes_from_pixels_and_frame_order(inputs, full):
    _, renders, _, _ = inputs
    r = {(row.render_id, row.component): row for row in renders.itertuples()}
    rel = full[(full.terminology == "colloquial") & (full.form == "open")
               & full.render_id.notna()]
    assert len(rel) > 100
    for q in rel.to_dict("records"):
        a, b = r[(q["render_id"], q["component_a"])], r[(q["render_id"], q["component_b"])]
        if q["family"] == "relation_2d":
            # the screen axis the asked world axis lands on, then the sign from the pixels
            unit = np.eye(3)[{"R/L": 0, "A/P": 1, "S/I": 2}[q["axis"]]]
            m = screen_mapping(q["plane"], q["convention"])
            right, down, _ = np.abs(screen_offset(unit, m))
            if right:
                expected = "right" if a.centroid_col > b.centroid_col else "left"
            else:
                assert down
                expected = "below" if a.centroid_row > b.centroid_row else "above"
        else:
            expected = "later" if a.frame_first > b.frame_first else "earlier"
        assert q["answer"] == expected, q["question_id"]


def test_text_only_questions_have_no_image_and_follow_the_standard_convention(inputs, full):
    _, _, _, components = inputs
    text = full[full.ablation == "text_only"]
    assert len(text) and text["render_id"].isna().all() and text["convention"].isna().all()
    assert text["letter_a"].isna().all() and (text["n_frames"] == 0).all()
    assert not text["text"].str.contains(r"\([A-F]\)").any()
    codes = {"R/L": ("R", "L", 0), "A/P": ("A", "P", 1), "S/I": ("S", "I", 2)}
    coll = text[(text.terminology == "colloquial") & (text.form == "open")]
    assert len(coll)
    for q in coll.to_dict("records"):
        pos, neg, axis = codes[q["axis"]]
        d = (_world(None, components, q, q["component_a"])
             - _world(None, components, q, q["component_b"]))[axis]
        m = screen_mapping(q["plane"], "standard")
        assert q["answer"] == colloquial_term(pos if d > 0 else neg, m)
        assert "standard" in q["text"]


def test_blank_questions_name_structures_by_letter_only(full):
    blank = full[(full.ablation == "blank") & (full.family != "plane")]
    assert len(blank)
    for q in blank.head(50).to_dict("records"):
        assert re.search(rf"\b[Ss]tructure {q['letter_a']}\b", q["text"])
        assert q["name_a"] not in q["text"].lower()
    named = full[(full.ablation == "none") & (full.family != "plane")].iloc[0]
    reference = rf"\b[Tt]he {re.escape(named['name_a'])} \({named['letter_a']}\)"
    assert re.search(reference, named["text"])


def test_no_prompt_questions_name_structures_without_letters(full):
    bare = full[full.prompt == "none"]
    assert set(bare["ablation"]) == {"none"} and set(bare["background"]) == {"scan"}
    assert set(bare["family"]) == {"relation_2d", "relation_3d", "plane"}
    assert bare["letter_a"].isna().all() and bare["letter_b"].isna().all()
    assert not bare["text"].str.contains(r"\([A-F]\)|[Ss]tructure [A-F]\b|labelled").any()
    relations = bare[bare.family != "plane"]
    for q in relations.to_dict("records"):
        assert re.search(rf"\b[Tt]he {re.escape(q['name_a'])}\b", q["text"])
        assert re.search(rf"\b[Tt]he {re.escape(q['name_b'])}\b", q["text"])
    assert bare["question_id"].is_unique and not bare["question_id"].isin(
        full.loc[full.prompt != "none", "question_id"]).any()


def test_no_prompt_truth_is_the_prompted_truth_of_the_same_view(full):
    """The prompt changes the picture, not the geometry: open answers on the bare scan
    equal those on the boxed scan of the same slice, convention and terminology."""
    opposite = {"superior": "inferior", "anterior": "posterior", "left": "right",
                "medial": "lateral", "above": "below", "earlier": "later"}
    opposite.update({v: k for k, v in opposite.items()})
    rel = full[(full.family != "plane") & (full.form == "open")
               & full.prompt.isin(["none", "box"]) & (full.ablation == "none")]
    keys = ["slice_id", "dims", "convention", "terminology", "axis"]
    truth = {}
    for q in rel[rel.prompt == "box"].to_dict("records"):
        truth[(*[q[k] for k in keys], q["component_a"], q["component_b"])] = q["answer"]
        truth[(*[q[k] for k in keys], q["component_b"], q["component_a"])] = \
            opposite[q["answer"]]
    bare = rel[rel.prompt == "none"].to_dict("records")
    assert len(bare) > 20
    for q in bare:
        assert truth[(*[q[k] for k in keys], q["component_a"], q["component_b"])] \
            == q["answer"], q["question_id"]


def test_the_scorer_reads_every_ground_truth_answer(full):
    for q in full.to_dict("records"):
        value, status = parse_answer(f"Let me look.\nAnswer: {q['answer']}", q)
        assert status == "ok" and is_correct(value, status, q), (q["question_id"], q["answer"])
        assert q["answer"] in q["choices"] and q["direction"] is not None
        assert "Answer:" in q["text"]
        if q["form"] == "open":
            assert all(c in q["text"] for c in q["choices"])


def test_sampled_design_balances_cells_and_components(inputs):
    _, renders, volumes, components = inputs
    q = build_questions(renders, volumes, components,
                        _params(cells_per_relation=1, terminologies_per_relation=1,
                                plane_cells_per_unit=1, max_pairs_per_unit=2), progress=False)
    for family in ("relation_2d", "relation_3d"):
        trip = q[(q.family == family) & (q.form == "open")]
        cells = trip.fillna("-").groupby(["ablation", "convention", "prompt"]).size()
        # 2 conventions x (2 prompts x 2 backgrounds + no prompt) + text-only
        assert len(cells) == 11
        assert cells.max() - cells.min() <= 1, cells
        terms = trip.groupby(["terminology"]).size()
        assert terms.max() - terms.min() <= 1
    pairs = q[q.family == "relation_2d"].drop_duplicates(["slice_id", "component_a", "component_b"])
    used = pd.concat([pairs.component_a, pairs.component_b]).value_counts()
    assert used.max() - used.min() <= 2
    assert len(q) < len(build_questions(renders, volumes, components, _params(
        cells_per_relation="all"), progress=False))


def test_pixel_centroids_that_contradict_the_mapping_stop_the_stage(inputs):
    _, renders, volumes, components = inputs
    bad = renders.copy()
    rid = "ct-1-axial-2d-standard-mask-scan"
    sel = (bad.render_id == rid) & (bad.component == "liver")
    bad.loc[sel, "centroid_col"] = 2 * 200 - bad.loc[sel, "centroid_col"]  # mirrored
    with pytest.raises(GroundTruthMismatch, match=rid):
        build_questions(bad, volumes, components, _params(cells_per_relation="all"),
                        progress=False)


def test_bad_inputs_get_errors_naming_the_file_and_field(inputs):
    _, renders, volumes, components = inputs
    with pytest.raises(ValueError, match=r"renders.parquet: missing columns \['centroid_col'\]"):
        build_questions(renders.drop(columns="centroid_col"), volumes, components, _params())
    odd = renders.assign(plane=renders.plane.replace("axial", "oblique"))
    with pytest.raises(ValueError, match="renders.parquet: column 'plane'.*oblique"):
        build_questions(odd, volumes, components, _params())
    with pytest.raises(ValueError, match="cells_per_relation"):
        build_questions(renders, volumes, components, _params(cells_per_relation="some"))
    bare_blank = renders.assign(background=renders.background.where(
        renders.prompt != "none", "blank"))
    with pytest.raises(ValueError, match="prompt 'none' on a blank background"):
        build_questions(bare_blank, volumes, components, _params())
    unlettered = renders.assign(letter=None)
    with pytest.raises(ValueError, match="no letter on a prompted render"):
        build_questions(unlettered, volumes, components, _params())


def test_generate_is_deterministic_and_skips_fresh_work(inputs):
    root = inputs[0]
    first = generate("demo", root=root, force=True)
    target = root / "data" / "benchmark" / "questions.parquet"
    blob, mtime = target.read_bytes(), target.stat().st_mtime_ns
    again = generate("demo", root=root)  # fresh: read back, not rewritten
    assert target.stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(first, again)
    generate("demo", root=root, force=True)
    assert target.read_bytes() == blob  # a second run gives identical bytes
    changed = generate("demo", root=root, margin_mm=40.0)
    assert len(changed) < len(first) and target.read_bytes() != blob


def test_generate_without_upstream_outputs_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="renders.parquet"):
        generate("demo", root=tmp_path)


# ---- the real brain atlas (stages 01-02 run on the MNI152 template + neuromorphometrics) ----

# Where the patient's LEFT lands on screen (docs/design.md, "Geometry and the two display
# conventions"): the standard axial and coronal views put patient right on the image left;
# the storage convention draws the LPI array as indexed, so the x axis (L) runs down the
# image in axial and coronal slices.
PATIENT_LEFT_ON_SCREEN = {("axial", "standard"): "right", ("coronal", "standard"): "right",
                          ("axial", "storage"): "below", ("coronal", "storage"): "below"}


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    from mislib.render import render_benchmark
    from mislib.volumes import prepare

    root = tmp_path_factory.mktemp("brain")
    prepare(profile="demo", root=root, sources=["brain_atlas"], workers=1)
    render_benchmark(profile="demo", root=root, prompts=["mask"], workers=1)
    return root


def test_real_atlas_left_right_twins_follow_the_patient_and_the_mapping(brain):
    from mislib.questions import load_inputs

    renders, volumes, components = load_inputs(brain)
    # twins asked left/right give the answer in their names: kept here to check the geometry
    q = build_questions(renders, volumes, components,
                        _params(max_pairs_per_unit="all", cells_per_relation="all",
                                exclude_answer_in_name=False), progress=False)
    side = {"Left": "left", "Right": "right"}
    a_side = q["component_a"].str.split("_").str[0].map(side)
    b_side = q["component_b"].str.split("_").str[0].map(side)
    twins = q[a_side.notna() & b_side.notna() & (a_side != b_side)
              & (q["component_a"].str.split("_", n=1).str[1]
                 == q["component_b"].str.split("_", n=1).str[1])
              & (q["axis"] == "R/L") & (q["form"] == "open")]
    anat = twins[twins.terminology == "anatomical"]
    coll = twins[twins.terminology == "colloquial"]
    assert len(anat) >= 4 and len(coll) >= 4
    for row in anat.itertuples():
        assert row.answer == side[row.component_a.split("_")[0]], row.question_id
    for row in coll.itertuples():
        convention = row.convention if isinstance(row.convention, str) else "standard"
        left_on_screen = PATIENT_LEFT_ON_SCREEN[(row.plane, convention)]
        expected = left_on_screen if row.component_a.startswith("Left_") else \
            {"right": "left", "below": "above"}[left_on_screen]
        assert row.answer == expected, (row.question_id, row.plane, convention)
    assert set(coll["convention"].dropna()) == {"standard", "storage"}


def test_real_atlas_questions_are_written_balanced_and_exportable(brain):
    from mislib.export import check_export
    from mislib.questions import export

    q = generate("demo", root=brain, force=True)
    assert set(q["family"]) == {"relation_2d", "relation_3d", "plane"}
    closed = q[q.form != "open"]
    assert (closed.answer == "True").sum() == (closed.answer == "False").sum() > 0
    assert (q.loc[q.family != "plane", "separation_mm"] >= MARGIN).all()
    for row in q.to_dict("records"):
        assert parse_answer(f"Answer: {row['answer']}", row) == (row["answer"], "ok")
    export("demo", root=brain)
    summary = check_export(brain)
    assert summary["rows"] == len(q) and summary["stack_frames"] > 0


def test_knee_phantoms_ask_medial_lateral_by_the_limb_side(tmp_path_factory):
    """On both a right and a left knee the fibula and lateral meniscus lie lateral and the
    medial meniscus medial to the other structures: the limb side turns R/L into M/L."""
    from mislib.questions import load_inputs
    from mislib.render import render_benchmark
    from mislib.volumes import prepare

    root = tmp_path_factory.mktemp("knee")
    prepare(profile="demo", root=root, sources=["knee_mri_phantom"], workers=1)
    render_benchmark(profile="demo", root=root, prompts=["mask"], backgrounds=["scan"],
                     workers=1)
    renders, volumes, components = load_inputs(root)
    assert set(volumes["laterality"]) == {"left", "right"}
    q = build_questions(renders, volumes, components,
                        _params(max_pairs_per_unit="all", cells_per_relation="all"), progress=False)
    knee = q[(q.axis == "R/L") & (q.terminology == "anatomical") & (q.form == "open")]
    assert set(knee["answer"]) == {"medial", "lateral"}
    lateral, medial = {"fibula", "lateral_meniscus"}, {"medial_meniscus"}
    checked = set()
    for row in knee.itertuples():
        for mine, other, flip in ((row.component_a, row.component_b, False),
                                  (row.component_b, row.component_a, True)):
            if mine in lateral | medial and other not in lateral | medial:
                expected = "lateral" if mine in lateral else "medial"
                if flip:
                    expected = {"lateral": "medial", "medial": "lateral"}[expected]
                assert row.answer == expected, (row.volume_id, row.component_a, row.component_b)
                checked.add(row.volume_id)
    assert checked == set(volumes["volume_id"])


def test_zero_knobs_switch_a_family_off_and_all_crosses_every_level(inputs):
    _, renders, volumes, components = inputs
    only_plane = build_questions(renders, volumes, components, _params(max_pairs_per_unit=0),
                                 progress=False)
    assert set(only_plane["family"]) == {"plane"}
    no_plane = build_questions(renders, volumes, components,
                               _params(plane_cells_per_unit=0, families=["relation_2d"]),
                               progress=False)
    assert set(no_plane["family"]) == {"relation_2d"}
    every = build_questions(renders, volumes, components,
                            _params(plane_cells_per_unit="all", families=["plane"]),
                            progress=False)
    n_renders = renders[renders.background == "scan"].render_id.nunique()
    assert len(every) == 3 * n_renders  # every render on the scan asked, in three forms


# ---- answerable by construction ------------------------------------------------------------

def test_blank_anatomical_questions_state_the_plane_and_convention_of_the_view(inputs, full):
    _, _, volumes, _ = inputs
    side = {v: (None if pd.isna(s) else s) for v, s in zip(volumes.volume_id,
                                                             volumes.laterality, strict=True)}
    blank = full[(full.background == "blank") & (full.family != "plane")]
    anatomical = blank[blank.terminology == "anatomical"]
    assert len(anatomical) and (blank.terminology == "colloquial").any()
    for q in anatomical.to_dict("records"):
        statement = display_statement(q["plane"], q["convention"], q["dims"],
                                      side[q["volume_id"]])
        assert f"{q['plane']} {'series of slices' if q['dims'] == '3d' else 'slice'} shown " \
               f"{statement}." in q["text"], q["text"]
    assert not blank[blank.terminology == "colloquial"].text.str.contains(
        "display convention").any()


def test_display_statement_says_where_the_patient_directions_appear():
    assert display_statement("coronal", "storage", "2d") == (
        "in the storage display convention: up in the image is the patient's right, "
        "left in the image is superior")
    assert display_statement("axial", "standard", "3d", "right").endswith(
        "left in the image is lateral, and frames run from inferior to superior")


def test_no_plane_question_is_asked_on_the_blank_background(full):
    plane = full[full.family == "plane"]
    assert len(plane) and set(plane.background) == {"scan"}


def test_text_only_colloquial_questions_state_the_standard_convention(inputs, full):
    _, _, volumes, _ = inputs
    side = {v: (None if pd.isna(s) else s) for v, s in zip(volumes.volume_id,
                                                             volumes.laterality, strict=True)}
    text = full[(full.ablation == "text_only") & (full.terminology == "colloquial")]
    assert len(text)
    for q in text.to_dict("records"):
        assert display_statement(q["plane"], "standard", q["dims"],
                                 side[q["volume_id"]]) in q["text"]
    anatomical = full[(full.ablation == "text_only") & (full.terminology == "anatomical")]
    assert len(anatomical) and not anatomical.text.str.contains("display convention").any()


@pytest.mark.parametrize(("a", "b", "axis", "laterality", "decided"), [
    ("left kidney", "right kidney", 0, None, True),
    ("right hippocampus", "left putamen", 0, None, True),
    ("left kidney", "left adrenal gland", 0, None, False),
    ("left kidney", "liver", 0, None, False),
    ("left kidney", "right kidney", 2, None, False),        # twins asked along z
    ("left upper lobe of lung", "left lower lobe of lung", 2, None, True),
    ("medial meniscus", "lateral meniscus", 0, "right", True),
    ("medial meniscus", "lateral meniscus", 0, None, False),  # no limb: x is left/right
    ("medial meniscus", "tibia", 0, "left", False),
    ("anterior cruciate ligament", "posterior cruciate ligament", 1, "left", True),
])
def test_names_decide_when_they_carry_opposite_words_for_the_asked_axis(a, b, axis, laterality,
                                                                        decided):
    assert names_decide(a, b, axis, laterality) is decided


def test_questions_whose_names_give_the_answer_are_excluded_by_default(inputs):
    _, renders, volumes, components = inputs
    twins = {"Left_Hippocampus", "Right_Hippocampus"}
    knobs = dict(cells_per_relation="all", terminologies_per_relation="all",
                 max_pairs_per_unit="all")
    default = build_questions(renders, volumes, components, _params(**knobs), progress=False)
    kept = build_questions(renders, volumes, components,
                           _params(exclude_answer_in_name=False, **knobs), progress=False)

    def twin_rl(q):
        return q[q.component_a.isin(twins) & q.component_b.isin(twins) & (q.axis == "R/L")]

    assert not default.answer_in_name.any()
    assert set(twin_rl(default).background.dropna()) == {"blank"}  # letters only: still asked
    flagged = twin_rl(kept)
    assert flagged.answer_in_name.any()
    assert (flagged.answer_in_name == (flagged.background != "blank")).all()
    assert not kept[kept.answer_in_name].question_id.isin(default.question_id).any()


def test_stack_relations_are_asked_only_where_frame_order_agrees_with_the_centroids(inputs):
    _, renders, volumes, components = inputs
    knobs = _params(cells_per_relation="all", terminologies_per_relation="all",
                    max_pairs_per_unit="all", families=["relation_3d"],
                    ablations=["none", "blank"])
    before = build_questions(renders, volumes, components, knobs, progress=False)
    # the femur's mean frame mirrored about the tibia's: the frames now order the two
    # against their 3D centroids (in either convention's frame direction)
    bent = renders.copy()
    stacks = (bent.volume_id == "knee-1") & (bent.dims == "3d") & (bent.plane == "axial")
    tibia = bent[stacks & (bent.component == "tibia")].set_index("render_id").centroid_frame
    femur = stacks & (bent.component == "femur")
    bent.loc[femur, "centroid_frame"] = (2 * bent.loc[femur, "render_id"].map(tibia)
                                         - bent.loc[femur, "centroid_frame"])
    after = build_questions(bent, volumes, components, knobs, progress=False)

    def femur_tibia(q):
        return q[(q.volume_id == "knee-1") & (q.plane == "axial")
                 & q.component_a.isin(["femur", "tibia"]) & q.component_b.isin(["femur", "tibia"])]

    assert len(femur_tibia(before)) > 0 and len(femur_tibia(after)) == 0
    assert len(after) < len(before)


def test_frame_order_agreement_needs_both_the_mean_frames_and_the_range_midpoints():
    m = screen_mapping("axial", "standard")  # frames run I -> S
    xyz = np.zeros(3)

    def view(mean_a, span_a, mean_b, span_b):
        labels = {"a": Label("A", 0, 0, *span_a, mean_a, xyz),
                  "b": Label("B", 0, 0, *span_b, mean_b, xyz)}
        return View("r", UnitKey("v", "3d", "axial", "s"), "axial", "standard", "3d", "box",
                    "none", "stacks/r/", 8, labels)

    assert frame_order_agrees(view(6.0, (5, 7), 2.0, (1, 3)), "a", "b", "S", m)
    assert not frame_order_agrees(view(6.0, (5, 7), 2.0, (1, 3)), "a", "b", "I", m)
    assert not frame_order_agrees(view(3.5, (0, 7), 4.0, (3, 5)), "a", "b", "S", m)  # means
    assert not frame_order_agrees(view(6.0, (0, 7), 2.0, (1, 7)), "a", "b", "S", m)  # ranges


def test_generated_questions_break_no_validity_rule(inputs, full):
    _, renders, volumes, components = inputs
    report = validity_report(full, renders, components, volumes, margin_mm=MARGIN)
    assert set(report.rule) >= {"blank_terms", "no_plane_on_blank", "text_only",
                                "answer_in_name_flag", "answer_in_name_excluded",
                                "frame_order_3d", "ground_truth", "margin"}
    counted = report[report.rule != "letters_on_marks"]  # no letters.parquet here
    assert (counted.checked > 0).all(), report.to_string()
    assert report.violations.sum() == 0, report.to_string()


def test_generate_writes_the_validity_report_beside_the_questions(inputs):
    root, _, _, _ = inputs
    generate("demo", root=root, force=True)
    report = pd.read_parquet(root / "data" / "benchmark" / "validity.parquet")
    assert list(report.columns) == ["rule", "checked", "violations", "description"]
    assert report.set_index("rule").loc["ground_truth", "checked"] > 0
    assert report.violations.sum() == 0, report.to_string()


def test_factor_figure_is_a_grid_of_one_panel_per_factor():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mislib.questions import FIGURE_FACTORS, factor_figure

    rng = np.random.default_rng(0)
    questions = pd.DataFrame({f: rng.choice(["a", "b", None], 30) for f in FIGURE_FACTORS})
    questions["prompt"] = ["point", "none", "mask", None, "box"] * 6
    fig = factor_figure(questions, columns=4)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == list(FIGURE_FACTORS)
    rows = {round(ax.get_position().y0, 3) for ax in shown}
    assert len(rows) == -(-len(FIGURE_FACTORS) // 4) > 1
    assert sum(bar.get_height() for bar in shown[0].patches) == 30  # every question counted
    prompt = shown[list(FIGURE_FACTORS).index("prompt")]
    assert [t.get_text() for t in prompt.get_xticklabels()] == ["none", "mask", "box", "point",
                                                                "—"]  # the benchmark's order
    plt.close(fig)
