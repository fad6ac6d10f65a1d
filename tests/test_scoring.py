"""mislib.scoring: the answer parser on adversarial outputs, re-scoring, Bayes@N, stage 06."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scorio.eval import bayes as scorio_bayes

from mislib.scoring import (
    bayes_at_n,
    bayes_by,
    bayes_by_factor,
    bayes_interval,
    find_runs,
    is_correct,
    outcome_matrix,
    parse_answer,
    rescore,
    score_runs,
    semsam_effect,
    unparseable_rates,
)
from mislib.simulate import simulate_study, write_study

ANATOMICAL = {"question_id": "q-ana", "family": "relation_2d", "form": "open",
              "terminology": "anatomical", "choices": ["superior", "inferior"],
              "answer": "superior", "letter_a": "A", "letter_b": "B",
              "component_a": "liver", "component_b": "kidney_left"}
COLLOQUIAL = {"question_id": "q-col", "family": "relation_2d", "form": "open",
              "terminology": "colloquial", "choices": ["to the left", "to the right"],
              "answer": "to the left", "letter_a": "C", "letter_b": "D"}
THROUGH = {"question_id": "q-3d", "family": "relation_3d", "form": "open",
           "terminology": "colloquial", "choices": ["in an earlier frame", "in a later frame"],
           "answer": "in a later frame"}
CLOSED = {"question_id": "q-tf", "family": "relation_2d", "form": "closed_true",
          "terminology": "anatomical", "choices": ["True", "False"], "answer": "True"}
PLANE = {"question_id": "q-pl", "family": "plane", "form": "open", "terminology": None,
         "choices": ["axial", "coronal", "sagittal"], "answer": "axial"}
LETTERS = {"question_id": "q-let", "family": "relation_2d", "form": "open",
           "terminology": "anatomical", "choices": ["A", "B", "C"], "answer": "A"}

# (question, model output, expected value, expected status)
CASES = [
    # plain and declared answers
    (ANATOMICAL, "superior", "superior", "ok"),
    (ANATOMICAL, "Superior.", "superior", "ok"),
    (ANATOMICAL, "ANSWER: INFERIOR", "inferior", "ok"),
    (ANATOMICAL, "Answer = inferior", "inferior", "ok"),
    (ANATOMICAL, "Answer:\n\nSuperior", "superior", "ok"),
    (ANATOMICAL, "Answer: cranial", "superior", "ok"),
    (ANATOMICAL, "Answer: it lies caudally", "inferior", "ok"),
    # the last declared answer wins; explanations after it do not count
    (ANATOMICAL, "Answer: superior\nAnswer: inferior", "inferior", "ok"),
    (ANATOMICAL, "The answer is inferior. Wait, actually the answer is superior.",
     "superior", "ok"),
    (ANATOMICAL, "Answer: inferior\n\nExplanation: it is not superior.", "inferior", "ok"),
    (ANATOMICAL, "Answer: superior.\n\nNote: some might say inferior.", "superior", "ok"),
    # negations
    (ANATOMICAL, "It is not inferior; it is superior.", "superior", "ok"),
    (ANATOMICAL, "The answer is superior, not inferior.", "superior", "ok"),
    (ANATOMICAL, "I think that it is inferior to B, rather than superior.", "inferior", "ok"),
    (ANATOMICAL, "The liver isn't superior to the kidney.", None, "unparseable"),
    (ANATOMICAL, "Answer: Neither superior nor inferior", None, "unparseable"),
    (CLOSED, "Answer: not true", "False", "ok"),
    (CLOSED, "Answer: Not correct", "False", "ok"),
    (CLOSED, "No, it is not.", "False", "ok"),
    (PLANE, "It's not axial, it's coronal.", "coronal", "ok"),
    (PLANE, "This is a coronal slice, not sagittal.", "coronal", "ok"),
    (COLLOQUIAL, "Answer: right, not left", "to the right", "ok"),
    # both options named
    (ANATOMICAL, "Answer: superior or inferior", None, "ambiguous"),
    (CLOSED, "Answer: True or False", None, "ambiguous"),
    (CLOSED, "Answer: yes and no", None, "ambiguous"),
    (PLANE, "Axial or coronal", None, "ambiguous"),
    (LETTERS, "Answer: A and B", None, "ambiguous"),
    # the relation stated with B as subject is turned round
    (ANATOMICAL, "Answer: B is inferior to A", "superior", "ok"),
    (ANATOMICAL, "A is superior to B, i.e. B is inferior to A.", "superior", "ok"),
    (ANATOMICAL, "Answer: kidney_left is inferior to liver", "superior", "ok"),
    # markdown, tags, reasoning blocks
    (ANATOMICAL, "**Answer:** *Inferior*", "inferior", "ok"),
    (ANATOMICAL, "## Final Answer\nSuperior", "superior", "ok"),
    (ANATOMICAL, "- **Answer**: inferior\n- Explanation: the liver is above, superior...",
     "inferior", "ok"),
    (ANATOMICAL, "| structure | position |\n|---|---|\n| liver | superior |", "superior", "ok"),
    (ANATOMICAL, "\\boxed{inferior}", "inferior", "ok"),
    (ANATOMICAL, "<answer>superior</answer>", "superior", "ok"),
    (ANATOMICAL, "<think>superior, surely</think>\nAnswer: inferior", "inferior", "ok"),
    (ANATOMICAL, "Hmm, superior.</think>\n\nInferior.", "inferior", "ok"),
    (ANATOMICAL, "<think>\nLet me think. It could be superior.\n", None, "unparseable"),
    (ANATOMICAL, "<|im_start|>assistant\nsuperior<|im_end|>", "superior", "ok"),
    (CLOSED, "**False**", "False", "ok"),
    (LETTERS, "Answer: **B**", "B", "ok"),
    # other languages and their punctuation
    (ANATOMICAL, "Réponse : inferior", "inferior", "ok"),
    (ANATOMICAL, "Respuesta: superior", "superior", "ok"),
    (ANATOMICAL, "Antwort: superior", "superior", "ok"),
    (ANATOMICAL, "答案：superior", "superior", "ok"),
    (ANATOMICAL, "答案是inferior", "inferior", "ok"),
    (ANATOMICAL, "Answer：inferior。", "inferior", "ok"),
    (ANATOMICAL, "Answer: «inférieur»", None, "unparseable"),
    (CLOSED, "答案：正确", "True", "ok"),
    (CLOSED, "答案：不正确", "False", "ok"),
    (CLOSED, "Respuesta: Verdadero", "True", "ok"),
    (CLOSED, "Réponse : faux", "False", "ok"),
    (CLOSED, "Answer：False", "False", "ok"),
    # truth words and their synonyms
    (CLOSED, "Yes.", "True", "ok"),
    (CLOSED, "No", "False", "ok"),
    (CLOSED, "Nope", "False", "ok"),
    (CLOSED, "That is incorrect.", "False", "ok"),
    (CLOSED, "No doubt, true", "True", "ok"),
    (CLOSED, "Answer: The statement is false because A is inferior to B.", "False", "ok"),
    # colloquial terms, frames and planes with synonyms
    (COLLOQUIAL, "Answer: left", "to the left", "ok"),
    (COLLOQUIAL, "It is on the right side.", "to the right", "ok"),
    (COLLOQUIAL, "Answer: Right-hand side", "to the right", "ok"),
    (THROUGH, "Answer: later", "in a later frame", "ok"),
    (THROUGH, "Answer: earlier frame", "in an earlier frame", "ok"),
    (THROUGH, "It appears in a later frame.", "in a later frame", "ok"),
    (PLANE, "This is a transverse slice.", "axial", "ok"),
    (PLANE, "Answer: frontal", "coronal", "ok"),
    (PLANE, "Answer: parasagittal", "sagittal", "ok"),
    # the other terminology's words are not this question's options
    (ANATOMICAL, "Answer: above", None, "unparseable"),
    (COLLOQUIAL, "Answer: anterior", None, "unparseable"),
    # letters only as whole upper-case tokens in an answer context, never the article
    (LETTERS, "Answer: A", "A", "ok"),
    (LETTERS, "The answer is B.", "B", "ok"),
    (LETTERS, "Answer: (C)", "C", "ok"),
    (LETTERS, "Answer: option C", "C", "ok"),
    (LETTERS, "(B)", "B", "ok"),
    (LETTERS, "A", "A", "ok"),
    (LETTERS, "Answer: a", None, "unparseable"),
    (LETTERS, "A structure is visible near the top.", None, "unparseable"),
    (LETTERS, "Answer: A structure", None, "unparseable"),
    (LETTERS, "Final answer: D", None, "unparseable"),
    # an echoed instruction quotes the answer format: an example, not an answer
    (CLOSED, "Is it true? End your reply with a line 'Answer: True' or 'Answer: False'.",
     None, "ambiguous"),
    (ANATOMICAL, "Options: superior, inferior.\nEnd your reply with a line 'Answer: <option>' "
     "naming one option.", None, "ambiguous"),
    (CLOSED, "End your reply with a line 'Answer: True' or 'Answer: False'.\n\nFalse",
     "False", "ok"),
    (ANATOMICAL, "'Answer: superior'", "superior", "ok"),
    # empty and very long output
    (ANATOMICAL, "", None, "unparseable"),
    (ANATOMICAL, "   \n\t ", None, "unparseable"),
    (ANATOMICAL, None, None, "unparseable"),
    (ANATOMICAL, float("nan"), None, "unparseable"),
    (ANATOMICAL, "I don't know", None, "unparseable"),
    (ANATOMICAL, "blah " * 20_000 + "Answer: inferior", "inferior", "ok"),
    (ANATOMICAL, "superior " * 5_000, "superior", "ok"),
    (ANATOMICAL, ("The image is hard to read. " * 3_000) + "\nsuperior", "superior", "ok"),
]


@pytest.mark.parametrize(("question", "text", "value", "status"), CASES,
                         ids=[f"{i:02d}" for i in range(len(CASES))])
def test_parse_answer_reads_adversarial_outputs(question, text, value, status):
    assert parse_answer(text, question) == (value, status)


def test_parse_answer_returns_the_question_spelling_of_the_option():
    value, status = parse_answer("Answer: LEFT", COLLOQUIAL)
    assert (value, status) == ("to the left", "ok")
    assert value in COLLOQUIAL["choices"]


def test_parse_answer_rejects_a_question_of_unknown_family():
    with pytest.raises(ValueError, match="unknown family"):
        parse_answer("superior", {**ANATOMICAL, "family": "volume_3d"})


def test_parse_answer_falls_back_to_the_default_options_without_choices():
    question = {k: v for k, v in CLOSED.items() if k != "choices"}
    assert parse_answer("Yes", question) == ("True", "ok")


def test_is_correct_counts_only_ok_parses_naming_the_answer():
    assert is_correct("superior", "ok", ANATOMICAL)
    assert not is_correct("inferior", "ok", ANATOMICAL)
    assert not is_correct("superior", "ambiguous", ANATOMICAL)
    assert not is_correct(None, "unparseable", ANATOMICAL)
    assert is_correct("to the left", "ok", {**COLLOQUIAL, "answer": "To the left"})


# ---------------------------------------------------------------------------- Bayes@N


def test_bayes_at_n_agrees_with_scorio_on_random_matrices():
    rng = np.random.default_rng(0)
    for m, n in [(1, 1), (7, 3), (250, 5), (40, 16)]:
        R = (rng.random((m, n)) < rng.random((m, 1))).astype(int)
        assert bayes_at_n(R) == pytest.approx(scorio_bayes(R), rel=1e-12, abs=1e-15)


def test_bayes_at_n_agrees_with_scorio_for_weighted_categories():
    rng = np.random.default_rng(1)
    R = rng.integers(0, 4, size=(30, 5))
    w = np.array([0.0, 1.0, -1.0, 0.0])
    assert bayes_at_n(R, w) == pytest.approx(scorio_bayes(R, w), rel=1e-12, abs=1e-15)


def test_bayes_at_n_matches_the_closed_form():
    # Binary Bayes@N: per question a Beta(1 + k, 1 + N - k) posterior.
    R = np.array([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    k, n = R.sum(axis=1), R.shape[1]
    p = (k + 1) / (n + 2)
    var = p * (1 - p) / (n + 3)
    mu, sigma = bayes_at_n(R.astype(bool))
    assert mu == pytest.approx(p.mean())
    assert sigma == pytest.approx(np.sqrt(var.sum()) / len(k))


def test_bayes_at_n_rejects_a_matrix_that_is_not_two_dimensional():
    with pytest.raises(ValueError, match="matrix"):
        bayes_at_n(np.array([1, 0, 1]))
    with pytest.raises(ValueError, match="matrix"):
        bayes_at_n(np.zeros((0, 3), dtype=int))


def test_bayes_interval_is_central_and_clipped_to_the_unit_interval():
    R = np.ones((3, 2), dtype=int)
    mu, sigma, lo, hi = bayes_interval(R, level=0.95)
    assert lo < mu <= hi <= 1.0
    assert hi - mu <= mu - lo + 1e-12  # clipped only above
    mu2, sigma2, lo2, hi2 = bayes_interval(np.array([[0, 1]] * 50), level=0.5)
    assert lo2 < mu2 < hi2
    assert mu2 - lo2 == pytest.approx(hi2 - mu2)
    assert (hi2 - lo2) == pytest.approx(2 * 0.6744897501960817 * sigma2)


def test_outcome_matrix_drops_questions_missing_trials():
    rows = pd.DataFrame({"question_id": ["a", "a", "b", "c", "c"],
                         "trial": [0, 1, 0, 0, 1], "correct": [1, 0, 1, 1, 1]})
    R, qids, n_incomplete = outcome_matrix(rows)
    assert R.shape == (2, 2)
    assert list(qids) == ["a", "c"]
    assert n_incomplete == 1


def test_outcome_matrix_rejects_duplicated_trials():
    rows = pd.DataFrame({"question_id": ["a", "a"], "trial": [0, 0], "correct": [1, 0]})
    with pytest.raises(ValueError, match="duplicated"):
        outcome_matrix(rows)


# ---------------------------------------------------------------------------- re-scoring


@pytest.fixture(scope="module")
def study():
    return simulate_study(n_questions=240, n_trials=3, seed=3, unparseable_rate=0.1)


@pytest.fixture(scope="module")
def scored(study):
    return rescore(study.responses, study.questions, progress=False)


def test_rescore_reproduces_the_stored_scores_of_simulated_text(study, scored):
    assert len(scored) == len(study.responses)
    assert (scored["correct"] == scored["correct_at_inference"]).all()
    assert (scored["parse_status"] == scored["parse_status_at_inference"]).all()
    assert not scored["reparsed_differently"].any()
    assert {"modality", "plane", "convention", "terminology", "ablation"} <= set(scored)


def test_rescore_uses_the_new_parser_over_stored_fields(study):
    responses = study.responses[study.responses["parse_status"] == "ok"].head(6).copy()
    responses["parse_status"] = "unparseable"  # what an older parser might have stored
    responses["correct"] = False
    out = rescore(responses, study.questions, progress=False)
    assert out["reparsed_differently"].all()
    assert (out["parse_status"] == "ok").all()


def test_a_question_without_letters_is_read_by_the_names_its_text_uses():
    # the scan without a visual prompt names structures only: "the left kidney", not "(B)"
    bare = {**ANATOMICAL, "letter_a": None, "letter_b": None, "name_a": "liver",
            "name_b": "left kidney", "prompt": "none"}
    turned = "Answer: the left kidney is inferior to the liver"
    assert parse_answer(turned, bare) == ("superior", "ok")
    assert parse_answer("Answer: the liver lies superior to the left kidney", bare) == \
        ("superior", "ok")
    questions = pd.DataFrame([{**bare, "choices": list(bare["choices"])}])
    responses = pd.DataFrame([{"run_id": "r", "model": "m", "arm": "baseline",
                               "question_id": bare["question_id"], "trial": 0,
                               "raw_text": turned}])
    out = rescore(responses, questions, progress=False)  # re-scoring sees the names too
    assert out["parsed"].tolist() == ["superior"] and out["correct"].tolist() == [True]


def test_rescore_names_responses_to_unknown_questions(study):
    responses = study.responses.head(3).copy()
    responses.loc[responses.index[0], "question_id"] = "no-such-question"
    with pytest.raises(ValueError, match="no-such-question"):
        rescore(responses, study.questions, progress=False)


def test_rescore_keeps_records_stage_04_could_not_answer_out_of_the_scores(study):
    responses = study.responses.head(8).copy()
    responses["status"] = ["ok"] * 6 + ["missing_input", "oom"]
    responses.loc[responses.index[6:], "raw_text"] = None
    out = rescore(responses, study.questions, progress=False)
    assert list(out["answered"]) == [True] * 6 + [False] * 2
    assert out["parse_status"].iloc[6:].isna().all()
    assert not out["correct"].iloc[6:].any()
    table = unparseable_rates(out)
    assert table["n_responses"].sum() == 6
    assert table["n_not_answered"].sum() == 2
    assert any("missing_input" in s for s in table["not_answered"])


def test_rescore_does_not_score_questions_of_an_unknown_family(study):
    questions = study.questions.copy()
    target = study.responses["question_id"].iat[0]
    questions.loc[questions["question_id"] == target, "family"] = "volume_4d"
    responses = study.responses[study.responses["question_id"].isin(
        questions["question_id"].head(3))]
    with pytest.warns(UserWarning, match="unknown family"):
        out = rescore(responses, questions, progress=False)
    unknown = out["question_id"] == target
    assert (out.loc[unknown, "status"] == "unknown_family").all()
    assert not out.loc[unknown, "answered"].any()
    assert out.loc[~unknown, "answered"].all()


def test_bayes_by_factor_covers_every_factor_level_per_model_and_arm(study, scored):
    table = bayes_by_factor(scored)
    cells = scored.groupby(["model", "arm"]).ngroups
    assert len(table.query("factor == 'all'")) == cells
    for factor in ("modality", "plane", "dims", "convention", "prompt", "terminology", "form",
                   "family", "ablation"):
        levels = set(scored[factor].dropna().astype(str))
        got = table.query("factor == @factor")
        assert set(got["level"]) == levels
        assert len(got) == cells * len(levels)
    assert ((table["lo"] <= table["mu"]) & (table["mu"] <= table["hi"])).all()


def test_bayes_by_factor_rows_equal_scorio_on_their_subset(scored):
    table = bayes_by(scored, ["model", "arm", "terminology"])
    row = table.iloc[0]
    subset = scored[(scored["model"] == row["model"]) & (scored["arm"] == row["arm"])
                    & (scored["terminology"] == row["terminology"])]
    R = subset.pivot(index="question_id", columns="trial", values="correct").to_numpy(int)
    mu, sigma = scorio_bayes(R)
    assert (row["mu"], row["sigma"]) == pytest.approx((mu, sigma))
    assert row["accuracy"] == pytest.approx(R.mean())


def test_semsam_effect_is_the_difference_of_the_arms_on_shared_trials(scored):
    table = semsam_effect(scored)
    assert set(table["model"]) == set(scored["model"])
    for row in table.itertuples():
        assert row.effect_mu == pytest.approx(row.semsam_mu - row.baseline_mu)
        assert row.effect_lo < row.effect_mu < row.effect_hi
        assert np.sign(row.paired_mu) == np.sign(row.effect_mu)
        assert abs(row.paired_mu) < abs(row.effect_mu)  # the stronger joint prior


def test_semsam_effect_finds_a_planted_gain():
    study = simulate_study(n_questions=300, n_trials=2, seed=5, models=("m",),
                           main={"arm": {"baseline": -0.6, "semsam": 0.6}}, interactions={})
    table = semsam_effect(rescore(study.responses, study.questions, progress=False))
    assert table.loc[0, "effect_lo"] > 0.05


def test_semsam_effect_skips_models_seen_in_one_arm(scored):
    one_arm = scored[~((scored["model"] == "sim-vlm-small") & (scored["arm"] == "semsam"))]
    assert list(semsam_effect(one_arm)["model"]) == ["sim-vlm-large"]


def test_unparseable_rates_count_each_status(scored):
    table = unparseable_rates(scored)
    for row in table.itertuples():
        cell = scored[(scored["model"] == row.model) & (scored["arm"] == row.arm)]
        assert row.n_responses == len(cell)
        assert row.n_ok + row.n_unparseable + row.n_ambiguous == len(cell)
        assert row.unparseable_rate == pytest.approx((cell["parse_status"] == "unparseable")
                                                     .mean())
    assert table["n_unparseable"].sum() > 0


# ---------------------------------------------------------------------------- stage 06


def test_score_runs_writes_the_stage_outputs_and_skips_when_fresh(tmp_root, study):
    write_study(study, tmp_root)
    out = score_runs("demo", root=tmp_root, progress=False)
    analysis = tmp_root / "data" / "analysis"
    for name in ("scored", "bayes_by_factor", "semsam_effect", "unparseable"):
        assert (analysis / f"{name}.parquet").is_file()
        assert len(out[name]) > 0
    assert out["scored"]["answered"].all()
    stamp = analysis / ".scoring.stage.json"
    mtime = stamp.stat().st_mtime_ns
    again = score_runs("demo", root=tmp_root, progress=False)
    assert stamp.stat().st_mtime_ns == mtime  # fresh: nothing recomputed
    pd.testing.assert_frame_equal(again["semsam_effect"], out["semsam_effect"])


def test_score_runs_scores_only_the_named_runs(tmp_root, study):
    write_study(study, tmp_root)
    run = sorted(study.responses["run_id"].unique())[0]
    out = score_runs("demo", root=tmp_root, progress=False, runs=[run])
    assert set(out["scored"]["run_id"]) == {run}
    assert out["semsam_effect"].empty


def test_score_runs_without_results_says_to_run_stage_04(tmp_root):
    with pytest.raises(FileNotFoundError, match="stage 04"):
        score_runs("demo", root=tmp_root, progress=False)


def test_score_runs_names_a_responses_file_lacking_columns(tmp_root, study):
    write_study(study, tmp_root)
    run_dir = next((tmp_root / "data" / "results").iterdir())
    pd.read_parquet(run_dir / "responses.parquet").drop(columns="raw_text").to_parquet(
        run_dir / "responses.parquet")
    with pytest.raises(ValueError, match=r"responses\.parquet.*raw_text"):
        score_runs("demo", root=tmp_root, progress=False)


def test_bayes_by_pools_models_as_separate_questions(scored):
    pooled = bayes_by(scored[scored["arm"] == "baseline"], ["terminology"])
    per_model = bayes_by(scored[scored["arm"] == "baseline"], ["model", "terminology"])
    for row in pooled.itertuples():
        parts = per_model[per_model["terminology"] == row.terminology]
        assert row.n_questions == parts["n_questions"].sum()
        weights = parts["n_questions"] / parts["n_questions"].sum()
        assert row.mu == pytest.approx((parts["mu"] * weights).sum())


def test_bayes_by_factor_pools_models_on_request(scored):
    table = bayes_by_factor(scored, factors=("dims",), per_model=False)
    assert set(table["model"]) == {"all models"}
    overall = table.query("factor == 'all'")
    assert sorted(overall["arm"]) == ["baseline", "semsam"]
    assert (overall["n_questions"] == 2 * scored["question_id"].nunique()).all()


def test_find_runs_takes_the_current_run_of_each_model_and_arm_over_stale_ones(tmp_path):
    from mislib.config import write_stamp
    from mislib.paths import project_paths

    results = project_paths(tmp_path).results
    for run in ("m-baseline-old", "m-baseline-new", "m-semsam-new"):
        (results / run).mkdir(parents=True)
        (results / run / "responses.parquet").write_bytes(b"")
    assert len(find_runs(tmp_path)) == 3  # no stamps: every run
    write_stamp(results, "inference-m-baseline", {}, ["m-baseline-new/responses.parquet"])
    write_stamp(results, "inference-m-semsam", {}, ["m-semsam-new/responses.parquet"])
    assert sorted(p.parent.name for p in find_runs(tmp_path)) == ["m-baseline-new",
                                                                 "m-semsam-new"]


@pytest.mark.parametrize(("text", "expected"), [
    ("Answer: The left cerebral white matter lies to the right of the right putamen.",
     "to the right"),
    ("Left_Cerebral_White_Matter (A) is left of Right_Putamen (B). Answer: to the left",
     "to the left"),
])
def test_direction_words_inside_structure_names_are_not_answers(text, expected):
    question = {"question_id": "q-names", "family": "relation_2d", "form": "open",
                "terminology": "colloquial", "choices": ["to the left", "to the right"],
                "component_a": "Left_Cerebral_White_Matter", "component_b": "Right_Putamen",
                "name_a": "left cerebral white matter", "name_b": "right putamen",
                "letter_a": "A", "letter_b": "B"}
    assert parse_answer(text, question) == (expected, "ok")
