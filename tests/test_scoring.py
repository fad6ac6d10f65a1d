"""mislib.scoring: re-scoring raw outputs, parse-outcome counts and stage 06."""

from __future__ import annotations

import pandas as pd
import pytest

from mislib.scoring import (
    bayes_by,
    find_runs,
    rescore,
    score_runs,
    unparseable_rates,
    unparsed_examples,
)
from mislib.simulate import simulate_study, write_study

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


def test_score_runs_is_redone_when_the_estimates_code_changes(tmp_root, study, monkeypatch):
    """Stage 06's tables are Bayes@N estimates (mislib.bayes): a change there must redo
    them, as a change to the parser does (only answers.py and scoring.py were hashed)."""
    from pathlib import Path

    import mislib.bayes

    write_study(study, tmp_root)
    score_runs("demo", root=tmp_root, progress=False)
    stamp = tmp_root / "data" / "analysis" / ".scoring.stage.json"
    mtime = stamp.stat().st_mtime_ns
    changed = tmp_root / "bayes.py"
    changed.write_text(Path(mislib.bayes.__file__).read_text() + "\n# changed\n")
    monkeypatch.setattr(mislib.bayes, "__file__", str(changed))
    score_runs("demo", root=tmp_root, progress=False)
    assert stamp.stat().st_mtime_ns != mtime


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


def test_unparsed_examples_lists_a_few_outputs_per_status_cut_to_width(scored):
    out = unparsed_examples(scored, per_group=2, width=10)
    assert set(out["parse_status"]) <= {"unparseable", "ambiguous"} and len(out) > 0
    assert out.groupby(["model", "arm", "parse_status"]).size().max() <= 2
    assert out["raw_text"].str.len().max() <= 10


# ---------------------------------------------------------------- numbers with their context
def test_rescore_gives_each_response_its_questions_number_of_options(study, scored):
    plane = scored[(scored["family"] == "plane") & (scored["form"] == "open")]
    closed = scored[scored["form"].astype(str).str.startswith("closed")]
    assert len(plane) and len(closed)
    assert (plane["n_options"] == 3).all()  # axial, coronal, sagittal
    assert (closed["n_options"] == 2).all()  # True, False


def test_stage_06_tables_carry_raw_accuracy_chance_and_n(tmp_root, study):
    write_study(study, tmp_root)
    tables = score_runs("demo", root=tmp_root, progress=False)
    scored = tables["scored"]
    by_factor = tables["bayes_by_factor"]
    assert {"accuracy", "chance", "n_questions", "n_trials", "n_responses",
            "mu", "lo", "hi"} <= set(by_factor)
    assert (by_factor["n_responses"] == by_factor["n_questions"] * by_factor["n_trials"]).all()
    # a cell's chance is the mean of 1 / options: closed questions 1/2, open plane ones 1/3
    form = by_factor[by_factor["factor"] == "form"].set_index("level")
    assert form.loc["closed_true", "chance"].unique() == pytest.approx([1 / 2])
    cells = bayes_by(scored, ["family", "form"])
    open_plane = cells[(cells["family"] == "plane") & (cells["form"] == "open")]
    assert open_plane["chance"].tolist() == pytest.approx([1 / 3])
    # overall: the mean of 1/n_options over the cell's questions, and the raw mean
    first = by_factor[by_factor["factor"] == "all"].iloc[0]
    cell = scored[(scored["model"] == first["model"]) & (scored["arm"] == first["arm"])]
    per_question = cell.drop_duplicates("question_id")["n_options"]
    assert first["chance"] == pytest.approx((1 / per_question).mean())
    assert first["accuracy"] == pytest.approx(cell["correct"].mean())
    effect = tables["semsam_effect"]
    assert {"chance", "n_responses", "baseline_accuracy", "semsam_accuracy"} <= set(effect)
    assert effect["chance"].between(1 / 3, 1 / 2).all()
