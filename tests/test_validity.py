"""mislib.validity: each checker passes the generator's questions and flags a broken one.

The question set comes from the synthetic stage-01/02 tables of ``test_questions``; each test
breaks one rule in a copy of one question (or render row) and checks that exactly the
checker of that rule flags it. (The letters checker is tested in ``test_render``.)
"""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from test_questions import MARGIN, _params, make_inputs

from mislib import validity
from mislib.geometry import centroid_mm
from mislib.questions import build_questions


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    renders, volumes, components = make_inputs(tmp_path_factory.mktemp("validity"),
                                               write_images=False)
    questions = build_questions(renders, volumes, components,
                                _params(cells_per_relation="all",
                                        terminologies_per_relation="all",
                                        max_pairs_per_unit="all"), progress=False)
    return questions, renders, volumes, components


def _one(questions, mask) -> pd.DataFrame:
    """A copy of the questions with the first row matching ``mask`` kept apart: (all, index)."""
    hits = questions[mask]
    assert len(hits), "no question to break"
    return questions.copy(), hits.index[0]


def test_generated_questions_pass_every_checker(tables):
    questions, renders, volumes, components = tables
    report = validity.validity_report(questions, renders, components, volumes,
                                      margin_mm=MARGIN)
    assert report.violations.sum() == 0, report.to_string()


def test_blank_anatomical_question_without_a_display_statement_is_flagged(tables):
    questions, renders, volumes, _ = tables
    q, i = _one(questions, (questions.background == "blank")
                & (questions.terminology == "anatomical") & (questions.family != "plane"))
    text = q.loc[i, "text"]
    statement = re.search(r" It is an? \w+ (slice|series of slices) shown in [^.]*\.", text)
    q.loc[i, "text"] = text.replace(statement.group(0), "")
    _, bad = validity.check_blank_terms(q, renders, volumes)
    assert bad.index.tolist() == [i]


def test_blank_statement_of_the_wrong_convention_is_flagged(tables):
    questions, renders, volumes, _ = tables
    q, i = _one(questions, (questions.background == "blank")
                & (questions.terminology == "anatomical") & (questions.dims == "2d")
                & (questions.plane == "coronal") & (questions.convention == "standard"))
    q.loc[i, "convention"] = "storage"  # the text still states the standard display
    _, bad = validity.check_blank_terms(q, renders, volumes)
    assert bad.index.tolist() == [i]


def test_plane_question_on_the_blank_background_is_flagged(tables):
    questions, renders, _, _ = tables
    blank_render = renders[renders.background == "blank"].render_id.iloc[0]
    q, i = _one(questions, questions.family == "plane")
    q.loc[i, "render_id"] = blank_render
    _, bad = validity.check_no_plane_on_blank(q, renders)
    assert bad.index.tolist() == [i]


def test_text_only_screen_terms_without_the_standard_convention_are_flagged(tables):
    questions, _, volumes, _ = tables
    q, i = _one(questions, (questions.ablation == "text_only")
                & (questions.terminology == "colloquial"))
    q.loc[i, "text"] = re.sub(r", shown as [^.]*\.", ".", q.loc[i, "text"])
    _, bad = validity.check_text_only(q, volumes)
    assert bad.index.tolist() == [i]


def test_text_only_question_with_an_image_is_flagged(tables):
    questions, _, volumes, _ = tables
    q, i = _one(questions, (questions.ablation == "text_only")
                & (questions.terminology == "anatomical"))
    q.loc[i, "image_path"] = "images/x.png"
    _, bad = validity.check_text_only(q, volumes)
    assert bad.index.tolist() == [i]


def test_twins_named_in_the_text_are_flagged_when_unmarked_and_when_not_excluded(tables):
    questions, _, volumes, _ = tables
    q, i = _one(questions, (questions.axis == "R/L") & (questions.ablation == "none")
                & questions.component_a.str.contains("Hippocampus")
                & ~questions.component_b.str.contains("Hippocampus"))
    # rename B into A's twin: "left hippocampus" vs "right hippocampus", asked left/right
    twin = q.loc[i, "name_a"].replace("left", "RIGHT").replace("right", "left").replace(
        "RIGHT", "right")
    q.loc[i, "text"] = q.loc[i, "text"].replace(q.loc[i, "name_b"], twin)
    q.loc[i, "name_b"] = twin
    rules = validity.check_answer_in_name(q, volumes, excluded=True)
    assert rules["answer_in_name_flag"][1].index.tolist() == [i]
    assert rules["answer_in_name_excluded"][1].index.tolist() == [i]
    q.loc[i, "answer_in_name"] = True
    rules = validity.check_answer_in_name(q, volumes, excluded=False)
    assert rules["answer_in_name_flag"][1].empty and "answer_in_name_excluded" not in rules


def test_names_give_the_answer_only_when_both_are_in_the_text():
    row = {"family": "relation_2d", "name_a": "left kidney", "name_b": "right kidney",
           "axis": "R/L", "text": "Is the left kidney (A) left of the right kidney (B)?"}
    assert validity.names_give_answer(row)
    assert not validity.names_give_answer({**row, "text": "Is structure A left of B?"})
    assert not validity.names_give_answer({**row, "axis": "S/I"})
    knee = {**row, "name_a": "medial meniscus", "name_b": "lateral meniscus",
            "text": "the medial meniscus and the lateral meniscus"}
    assert validity.names_give_answer(knee, "left") and not validity.names_give_answer(knee)


def test_stack_question_whose_frames_disagree_with_the_centroids_is_flagged(tables):
    questions, renders, _, _ = tables
    q, i = _one(questions, (questions.family == "relation_3d") & questions.render_id.notna())
    r = renders.copy()
    row = q.loc[i]
    a = (r.render_id == row.render_id) & (r.component == row.component_a)
    b = (r.render_id == row.render_id) & (r.component == row.component_b)
    r.loc[a, "centroid_frame"], r.loc[b, "centroid_frame"] = (
        r.loc[b, "centroid_frame"].to_numpy(), r.loc[a, "centroid_frame"].to_numpy())
    _, bad = validity.check_frame_order(q, r)
    assert i in bad.index
    assert set(bad.render_id) == {row.render_id}


def test_a_flipped_answer_and_a_relation_below_the_margin_are_flagged(tables):
    questions, renders, volumes, components = tables
    q, i = _one(questions, (questions.form == "open") & (questions.family == "relation_2d"))
    j = q[(q.form == "closed_false") & (q.family == "relation_3d")].index[0]
    q.loc[i, "answer"] = {"superior": "inferior", "inferior": "superior", "anterior": "posterior",
                          "posterior": "anterior", "left": "right", "right": "left",
                          "medial": "lateral", "lateral": "medial", "above": "below",
                          "below": "above"}[q.loc[i, "answer"]]
    q.loc[j, "answer"] = "True"
    rules = validity.check_ground_truth(q, renders, components, volumes, margin_mm=MARGIN)
    assert rules["ground_truth"][1].index.tolist() == sorted([i, j])
    assert rules["margin"][1].empty
    near = validity.check_ground_truth(questions, renders, components, volumes,
                                       margin_mm=questions.separation_mm.max() + 1)
    assert len(near["margin"][1]) == (questions.family != "plane").sum()


def test_report_counts_violations_per_rule(tables):
    questions, renders, volumes, components = tables
    q = questions.copy()
    plane = q[q.family == "plane"].index[:2]
    q.loc[plane, "render_id"] = renders[renders.background == "blank"].render_id.iloc[0]
    letters = pd.DataFrame({"render_id": ["r", "r"], "frame": [0, 0], "letter": ["A", "B"],
                            "letter_col": [0.0, 9.0], "letter_row": [0.0, 0.0],
                            "anchor_col": [10.0, 20.0], "anchor_row": [0.0, 0.0]})
    report = validity.validity_report(q, renders, components, volumes, letters=letters,
                                      margin_mm=MARGIN).set_index("rule")
    assert report.loc["no_plane_on_blank", "violations"] == 2
    assert report.loc["letters_on_marks", ["checked", "violations"]].tolist() == [2, 1]
    assert report.loc["margin", "violations"] == 0


# ---- on rendered stacks: the report with letters, and the gallery -------------------------

@pytest.fixture(scope="module")
def rendered_root(tmp_path_factory):
    from test_render import FAST, build_prepared

    from mislib.questions import generate
    from mislib.render import render_benchmark

    root = tmp_path_factory.mktemp("validity_rendered")
    prepared = build_prepared(root)
    # stage 01's 3D centroids, which text-only questions rest on
    comps = pd.read_parquet(prepared / "components.parquet")
    vols = pd.read_parquet(prepared / "volumes.parquet").set_index("volume_id")
    xyz = []
    for row in comps.itertuples():
        path = prepared / vols.loc[row.volume_id, "canonical_labels"]
        img = nib.load(path) if path.is_file() else None
        xyz.append(np.full(3, np.nan) if img is None else
                   centroid_mm(np.asarray(img.dataobj) == row.label, img.affine))
    comps[["centroid_x", "centroid_y", "centroid_z"]] = np.array(xyz)
    comps.to_parquet(prepared / "components.parquet")
    render_benchmark("demo", root=root, **FAST)
    # a 4-mm margin: the synthetic organs lie 5 mm apart across the coronal stack
    generate("demo", root=root, force=True, margin_mm=4.0)
    return root


def test_stage_03_reports_every_rule_with_no_violation_on_rendered_images(rendered_root):
    report = validity.read_report(rendered_root).set_index("rule")
    assert list(report.index) == list(validity.RULES)
    assert report.loc["letters_on_marks", "checked"] > 0
    assert report.violations.sum() == 0, report.to_string()


def test_gallery_shows_a_stack_question_on_a_frame_where_both_structures_show(rendered_root):
    bench = rendered_root / "data" / "benchmark"
    questions = pd.read_parquet(bench / "questions.parquet")
    renders = pd.read_parquet(bench / "renders.parquet")
    examples = validity.pick_examples(questions, per_source=3)
    assert (examples.form == "open").all() and examples.render_id.notna().all()
    stacks = questions[(questions.family == "relation_3d") & (questions.form == "open")
                       & questions.render_id.notna()]
    stack = stacks.iloc[0]
    image, caption = validity.example_image(stack, renders, bench)
    frames = [int(f) for f in re.findall(r"frame (\d+)", caption)]
    rows = renders[renders.render_id == stack.render_id].set_index("component")
    a, b = rows.loc[stack.component_a], rows.loc[stack.component_b]
    if len(frames) == 1:  # one frame inside both ranges
        assert a.frame_first <= frames[0] <= a.frame_last
        assert b.frame_first <= frames[0] <= b.frame_last
        assert image.shape[:2] == (a.height, a.width)
    else:  # ranges apart: each structure's own frame, side by side
        assert a.frame_last < b.frame_first or b.frame_last < a.frame_first
        assert image.shape[1] == 2 * a.width
    fig = validity.example_gallery(questions, renders, bench, per_source=3)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any(f"Answer: {examples.answer.iloc[0]}" in t for t in texts)
    assert len([ax for ax in fig.axes if ax.images]) == len(examples)
