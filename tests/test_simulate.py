"""mislib.simulate: questions and responses in the stage-03/04 schemas from known effects."""

import json

import numpy as np
import pandas as pd
import pytest

from mislib.answers import parse_answer
from mislib.simulate import (
    LEVELS,
    scored_table,
    simulate_questions,
    simulate_study,
    write_study,
)

QUESTION_COLUMNS = [
    "question_id", "render_id", "volume_id", "source", "modality", "plane", "dims",
    "convention", "prompt", "background", "terminology", "form", "family", "ablation",
    "component_a", "component_b", "letter_a", "letter_b", "direction", "text", "answer",
    "choices", "axis", "separation_mm", "image_path", "n_frames",
]
RESPONSE_COLUMNS = ["run_id", "model", "arm", "question_id", "trial", "seed", "raw_text",
                    "parsed", "parse_status", "correct", "n_tokens", "latency_s"]


@pytest.fixture(scope="module")
def study():
    return simulate_study(n_questions=400, n_trials=3, seed=5)


def test_questions_have_the_stage03_columns_and_valid_levels():
    q = simulate_questions(500, seed=2)
    assert set(QUESTION_COLUMNS) <= set(q.columns)
    assert q["question_id"].is_unique
    for factor, levels in LEVELS.items():
        assert set(q[factor].dropna()) <= set(levels), factor
    assert set(q["modality"]) == {"CT", "MRI"}


def test_questions_null_the_factors_that_do_not_apply():
    q = simulate_questions(800, seed=3)
    text_only = q["ablation"] == "text_only"
    assert text_only.any()
    assert q.loc[text_only, ["render_id", "image_path", "convention", "prompt",
                             "background"]].isna().all().all()
    assert q.loc[~text_only, ["render_id", "image_path", "convention", "prompt",
                              "background"]].notna().all().all()
    plane = q["family"] == "plane"
    assert q.loc[plane, "terminology"].isna().all()
    assert q.loc[plane, "component_b"].isna().all()
    assert q.loc[~plane, "terminology"].notna().all()
    assert (q.loc[q["family"] == "relation_3d", "dims"] == "3d").all()
    assert (q.loc[q["family"] == "relation_2d", "dims"] == "2d").all()
    assert (q.loc[q["ablation"] == "blank", "background"] == "blank").all()


def test_answers_are_one_of_their_choices_and_closed_forms_match():
    q = simulate_questions(300, seed=4)
    assert all(a in list(c) for a, c in zip(q["answer"], q["choices"], strict=True))
    assert (q.loc[q["form"] == "closed_true", "answer"] == "True").all()
    assert (q.loc[q["form"] == "closed_false", "answer"] == "False").all()
    assert (q.loc[q["component_b"].notna(), "component_a"]
            != q.loc[q["component_b"].notna(), "component_b"]).all()


def test_same_seed_gives_the_same_study_and_another_seed_does_not():
    a = simulate_study(n_questions=150, n_trials=2, seed=9)
    b = simulate_study(n_questions=150, n_trials=2, seed=9)
    c = simulate_study(n_questions=150, n_trials=2, seed=10)
    pd.testing.assert_frame_equal(a.responses, b.responses)
    pd.testing.assert_frame_equal(a.questions, b.questions)
    assert not a.responses["correct"].equals(c.responses["correct"])


def test_responses_have_the_stage04_columns_one_row_per_trial(study):
    r = study.responses
    assert set(RESPONSE_COLUMNS) <= set(r.columns)
    n_q = len(study.questions)
    assert len(r) == n_q * 3 * 2 * 2  # trials x arms x models
    assert not r.duplicated(["model", "arm", "question_id", "trial"]).any()
    assert r["correct"].dtype == bool


def test_raw_text_parses_back_to_the_recorded_answer(study):
    q = study.questions.set_index("question_id")
    sample = study.responses.sample(400, random_state=0)
    for row in sample.itertuples():
        value, status = parse_answer(row.raw_text, q.loc[row.question_id].to_dict())
        assert status == row.parse_status
        if status == "ok":
            assert value == row.parsed
            assert (value == q.loc[row.question_id, "answer"]) == row.correct


def test_unparseable_answers_are_scored_wrong(study):
    r = study.responses
    bad = r["parse_status"] == "unparseable"
    assert bad.any()
    assert not r.loc[bad, "correct"].any()
    assert r.loc[bad, "parsed"].isna().all()


def test_truth_is_sum_to_zero_per_factor_and_interaction(study):
    truth = study.truth.set_index("term")["value"]
    assert truth.index.is_unique
    for factor in ("arm", "model", "convention", "prompt", "family", "ablation"):
        rows = truth[truth.index.str.match(rf"^{factor}\[[^\]]+\]$")]
        assert len(rows) >= 2
        assert abs(rows.sum()) < 1e-12, factor
    grid = truth[truth.index.str.startswith("convention[")
                 & truth.index.str.contains(":terminology[", regex=False)]
    assert len(grid) == 4
    table = grid.to_numpy().reshape(2, 2)
    np.testing.assert_allclose(table.sum(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(table.sum(axis=1), 0, atol=1e-12)


def test_effects_move_the_accuracy_they_name():
    big = {"arm": {"baseline": -1.5, "semsam": 1.5}}
    s = simulate_study(n_questions=400, n_trials=2, seed=1, main=big, interactions={},
                       sd={"question": 0.0, "pair": 0.0, "volume": 0.0}, unparseable_rate=0.0)
    acc = s.responses.groupby("arm")["correct"].mean()
    expected = 1 / (1 + np.exp(-(0.4 + np.array([-1.5, 1.5]))))
    np.testing.assert_allclose(acc[["baseline", "semsam"]].to_numpy(), expected, atol=0.04)


def test_scored_table_joins_question_factors(study):
    scored = scored_table(study)
    assert len(scored) == len(study.responses)
    for col in ("convention", "terminology", "volume_id", "component_a", "family"):
        assert col in scored
    one = scored.iloc[0]
    q = study.questions.set_index("question_id").loc[one["question_id"]]
    assert one["family"] == q["family"]


def test_write_study_lays_out_results_per_run(tmp_root, study):
    written = write_study(study, root=tmp_root, scored=True)
    runs = sorted(p.parent.name for p in written["responses"])
    assert runs == sorted(study.responses["run_id"].unique())
    for path in written["responses"]:
        meta = json.loads((path.parent / "run.json").read_text())
        rows = pd.read_parquet(path)
        assert set(rows["run_id"]) == {meta["run_id"]} == {path.parent.name}
    assert (tmp_root / "data" / "benchmark" / "questions.parquet").is_file()
    scored = pd.read_parquet(written["scored"][0])
    assert len(scored) == len(study.responses)


def test_every_visual_prompt_is_drawn_the_none_prompt_without_letters_or_blank_background():
    from mislib.vocabulary import NO_PROMPT, PROMPTS

    q = simulate_questions(800, seed=3)
    assert set(q["prompt"].dropna()) == set(PROMPTS)
    bare = q["prompt"] == NO_PROMPT
    assert q.loc[bare, "letter_a"].isna().all() and q.loc[bare, "letter_b"].isna().all()
    assert not (bare & (q["ablation"] == "blank")).any()  # stage 02 renders none on scans only
    assert q.loc[q["prompt"] == "box", "letter_a"].notna().all()


def test_default_effects_are_shaped_like_the_papers_findings(study):
    from mislib.simulate import HEADLINE_TERMS

    truth = study.truth.set_index("term")["value"]
    assert set(HEADLINE_TERMS) <= set(truth.index)
    assert truth["arm[semsam]"] > 0  # SemSam helps
    # convention x terminology reverses: anatomical wins in the standard view, loses in storage
    assert truth["convention[standard]:terminology[anatomical]"] > 0
    assert truth["convention[storage]:terminology[anatomical]"] < 0
    # no prompt: anatomical far ahead; a box narrows the gap (helps colloquial terms)
    assert truth["prompt[none]:terminology[anatomical]"] > 0
    assert truth["prompt[box]:terminology[colloquial]"] > 0
    # the text-only prior: anatomical terms answered without the image, colloquial ones not
    assert truth["ablation[text_only]:terminology[anatomical]"] > 0
    assert truth["family[plane]"] > truth["family[relation_2d]"] > truth["family[relation_3d]"]


def test_the_planted_reversal_shows_in_the_simulated_accuracies():
    s = simulate_study(n_questions=3000, n_trials=2, seed=9)
    scored = scored_table(s)
    acc = scored.groupby(["convention", "terminology"])["correct"].mean()
    assert acc["standard", "anatomical"] > acc["standard", "colloquial"]
    assert acc["storage", "anatomical"] < acc["storage", "colloquial"]
    nobox = scored[scored["prompt"] == "none"].groupby("terminology")["correct"].mean()
    assert nobox["anatomical"] - nobox["colloquial"] > 0.1
