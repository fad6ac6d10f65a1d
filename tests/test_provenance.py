"""mislib.provenance: every figure and table says what profile, models, runs and counts."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from mislib import plots
from mislib.provenance import (
    STAMP_GID,
    Provenance,
    caption,
    is_smoke_model,
    stamp,
)


def _scored(models=("smoke:tiny-qwen3-vl",), n_questions=3, n_trials=2):
    rows = [{"run_id": f"{m.split(':')[-1]}-{arm}-abc", "model": m, "arm": arm,
             "question_id": f"q{q}", "trial": t, "correct": False}
            for m in models for arm in ("baseline", "semsam")
            for q in range(n_questions) for t in range(n_trials)]
    return pd.DataFrame(rows)


def _from_scored(scored, *args, **kwargs):
    """Provenance.from_scored with ``scored`` as the records sent (no run files on disk)."""
    return Provenance.from_scored(scored, *args, sent=scored, **kwargs)


def _stamp_texts(fig):
    return [t.get_text() for t in fig.texts if t.get_gid() == STAMP_GID]


def _write_runs(root, records):
    for run_id, rows in records.groupby("run_id"):
        folder = root / "data" / "results" / run_id
        folder.mkdir(parents=True)
        rows.to_parquet(folder / "responses.parquet", index=False)


def test_asked_counts_the_questions_sent_even_one_whose_every_trial_failed(tmp_root):
    """scored.parquet holds answered records only; q2 failed in every trial of every run
    (error status) and was asked all the same."""
    records = _scored(models=("m",), n_questions=3, n_trials=2).assign(status="ok")
    records.loc[records["question_id"] == "q2", "status"] = "error"
    _write_runs(tmp_root, records)
    scored = records[records["status"] == "ok"]
    prov = Provenance.from_scored(scored, "demo", root=tmp_root, n_questions_generated=10)
    assert (prov.n_questions_asked, prov.n_questions_answered, prov.n_trials) == (3, 2, 2)
    assert "3 of 10 questions (2 answered) × 2 trials" in prov.label()
    # stage 04's records themselves (notebook 04) give the same counts
    again = Provenance.from_scored(records, "demo", root=tmp_root, n_questions_generated=10)
    assert (again.n_questions_asked, again.n_questions_answered) == (3, 2)
    every = Provenance.from_scored(records.assign(status="ok"), "demo", root=tmp_root,
                                   n_questions_generated=10)
    assert every.n_questions_answered is None and "answered" not in every.label()


def test_asked_counts_what_stage_06_left_out_of_the_scored_table(tmp_root):
    """End to end through stage 06: a question whose every record is an error is not in
    scored.parquet, and is counted as asked (and not as answered)."""
    from mislib.scoring import score_runs
    from mislib.simulate import simulate_study, write_study

    study = simulate_study(n_questions=40, n_trials=2, seed=3, models=("m",))
    failed = study.responses["question_id"] == study.questions["question_id"].iat[0]
    study.responses["status"] = "ok"
    study.responses.loc[failed, "status"] = "error"
    write_study(study, tmp_root)
    scored = score_runs("demo", root=tmp_root, progress=False)["scored"]
    assert scored["question_id"].nunique() == 39
    prov = Provenance.from_scored(scored, "demo", root=tmp_root)
    assert (prov.n_questions_asked, prov.n_questions_answered) == (40, 39)
    assert prov.n_questions_generated == 40


def test_a_run_whose_every_record_failed_is_counted_as_asked_to_its_model(tmp_root):
    """End to end through stage 06: model n's runs failed in every record (e.g. out of
    memory), so no row of theirs is in scored.parquet; they were sent 40 questions all the
    same (model m 30 of them), and n is one of the models asked."""
    from mislib.scoring import score_runs
    from mislib.simulate import simulate_study, write_study

    study = simulate_study(n_questions=40, n_trials=2, seed=3, models=("m", "n"))
    late = study.questions["question_id"].iloc[30:]
    responses = study.responses
    responses = responses[~((responses["model"] == "m")
                            & responses["question_id"].isin(late))].copy()
    responses["status"] = "ok"
    responses.loc[responses["model"] == "n", "status"] = "error"
    study.responses = responses
    write_study(study, tmp_root)
    scored = score_runs("demo", root=tmp_root, progress=False)["scored"]
    assert set(scored["model"]) == {"m"} and scored["question_id"].nunique() == 30
    prov = Provenance.from_scored(scored, "demo", root=tmp_root)
    assert prov.models == ("m", "n")
    assert set(prov.run_ids) == set(responses["run_id"])
    assert (prov.n_questions_asked, prov.n_questions_answered) == (40, 30)
    assert "models m, n" in prov.label() and "40 of 40 questions (30 answered)" in prov.label()


def test_asked_needs_the_runs_records_and_names_a_missing_one(tmp_root):
    with pytest.raises(FileNotFoundError, match="responses.parquet"):
        Provenance.from_scored(_scored(), "demo", root=tmp_root, n_questions_generated=1)


def test_is_smoke_model_is_true_for_smoke_ids_only():
    assert is_smoke_model("smoke:tiny-qwen3-vl")
    assert not is_smoke_model("Qwen/Qwen3-VL-2B-Instruct")
    assert not is_smoke_model("my-smoke:model")


def test_from_scored_counts_models_runs_questions_and_trials():
    prov = _from_scored(_scored(n_questions=3, n_trials=2), "demo",
                                  n_questions_generated=1446)
    assert prov.models == ("smoke:tiny-qwen3-vl",)
    assert prov.run_ids == ("tiny-qwen3-vl-baseline-abc", "tiny-qwen3-vl-semsam-abc")
    assert (prov.n_questions_generated, prov.n_questions_asked, prov.n_trials) == (1446, 3, 2)
    assert prov.smoke and prov.converged is None


def test_from_scored_reads_the_generated_count_from_stage_03(tmp_root):
    bench = tmp_root / "data" / "benchmark"
    bench.mkdir(parents=True)
    pd.DataFrame({"question_id": [f"q{i}" for i in range(11)]}).to_parquet(
        bench / "questions.parquet")
    prov = _from_scored(_scored(), {"name": "custom-profile"}, root=tmp_root)
    assert prov.n_questions_generated == 11
    assert prov.profile == "custom-profile"


def test_from_scored_without_stage_03_names_the_missing_file(tmp_root):
    with pytest.raises(FileNotFoundError, match="questions.parquet"):
        _from_scored(_scored(), "demo", root=tmp_root)


def test_from_scored_rejects_a_table_without_run_ids():
    with pytest.raises(ValueError, match="run_id"):
        _from_scored(_scored().drop(columns="run_id"), "demo",
                               n_questions_generated=1)


def test_from_scored_notes_simulated_runs(tmp_root):
    scored = _scored(models=("m-small",))
    for run_id in scored["run_id"].unique():
        folder = tmp_root / "data" / "results" / run_id
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"run_id": run_id, "simulated": True}))
    prov = _from_scored(scored, "demo", root=tmp_root, n_questions_generated=5)
    assert prov.simulated and not prov.smoke
    assert "simulated" in prov.label()


def test_label_names_profile_models_runs_and_counts_and_says_smoke():
    prov = _from_scored(_scored(n_questions=96, n_trials=2), "demo",
                                  n_questions_generated=1446)
    label = prov.label()
    assert "profile demo" in label
    assert "smoke:tiny-qwen3-vl (random weights: answers are noise)" in label
    assert "runs tiny-qwen3-vl-baseline-abc, tiny-qwen3-vl-semsam-abc" in label
    assert "96 of 1,446 questions × 2 trials" in label
    assert "\n" not in label


def test_label_of_a_real_model_does_not_say_noise():
    prov = _from_scored(_scored(models=("Qwen/Qwen3-VL-2B-Instruct",)), "paper",
                                  n_questions_generated=10)
    assert not prov.smoke
    assert "noise" not in prov.label()
    assert "model Qwen/Qwen3-VL-2B-Instruct" in prov.label()


def test_a_stage_before_inference_says_profile_and_counts_only():
    prov = Provenance.from_profile("demo", {"volumes": 3, "slices": 1200})
    assert prov.label() == "profile demo · 3 volumes · 1,200 slices"
    prov = Provenance.from_profile("demo", n_questions_generated=1446)
    assert prov.label() == "profile demo · 1,446 questions generated"


def test_caption_is_the_label_on_one_line():
    prov = Provenance.from_profile("demo", {"volumes": 3})
    assert caption(prov) == "Source: profile demo · 3 volumes."


def test_stamp_draws_the_label_on_the_figure():
    prov = _from_scored(_scored(), "demo", n_questions_generated=20)
    fig, ax = plt.subplots(figsize=(8, 3))
    stamp(fig, prov)
    texts = _stamp_texts(fig)
    assert len(texts) == 1
    assert texts[0].replace("\n", " ") == prov.label()
    assert not any("NOT CONVERGED" in t for t in texts)
    plt.close(fig)


def test_stamp_wraps_a_long_label_to_the_figure_width():
    prov = _from_scored(_scored(models=[f"org/model-{i}" for i in range(8)]), "demo",
                                  n_questions_generated=20)
    fig, ax = plt.subplots(figsize=(3, 3))
    stamp(fig, prov)
    (text,) = _stamp_texts(fig)
    assert text.count("\n") >= 2
    plt.close(fig)


def test_stamp_says_not_converged_when_the_fit_did_not_converge():
    prov = Provenance.from_profile("demo").replace(converged=False)
    fig, ax = plt.subplots()
    stamp(fig, prov)
    texts = _stamp_texts(fig)
    assert "NOT CONVERGED" in texts
    assert any("factor model NOT CONVERGED" in t for t in texts)
    plt.close(fig)


def test_stamping_twice_keeps_one_stamp():
    fig, ax = plt.subplots()
    stamp(fig, Provenance.from_profile("a"))
    stamp(fig, Provenance.from_profile("b"))
    assert _stamp_texts(fig) == ["profile b"]
    plt.close(fig)


def test_save_figure_stamps_when_given_a_provenance(tmp_root, monkeypatch):
    seen = []
    monkeypatch.setattr(plt, "close", lambda fig: seen.append(_stamp_texts(fig)))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    prov = Provenance.from_profile("demo", {"volumes": 2})
    paths = plots.save_figure(fig, "stamped", tmp_root, provenance=prov)
    assert seen == [["profile demo · 2 volumes"]]
    assert all(p.is_file() for p in paths)
    fig2, _ = plt.subplots()
    plots.save_figure(fig2, "unstamped", tmp_root)
    assert seen[-1] == []


def test_stamp_works_on_a_figure_made_without_pyplot():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3))
    fig.add_subplot().plot([0, 1], [0, 1])
    stamp(fig, Provenance.from_profile("demo", {"volumes": 1}))
    assert _stamp_texts(fig) == ["profile demo · 1 volume"]


def test_trials_that_differ_between_models_are_given_as_their_range():
    """Model a was sent each question twice, model b five times: '× 5 trials' (the most)
    said b's count of a's questions; the label and numbers.tex give the range."""
    from mislib import claims as C
    from mislib.bayes import bayes_by_factor

    scored = pd.concat([_scored(models=("a",), n_trials=2), _scored(models=("b",), n_trials=5)],
                       ignore_index=True)
    prov = _from_scored(scored, "demo", n_questions_generated=10)
    assert (prov.n_trials, prov.n_trials_min) == (5, 2)
    assert "3 of 10 questions × 2–5 trials" in prov.label()
    same = _from_scored(_scored(models=("a", "b"), n_trials=2), "demo", n_questions_generated=10)
    assert same.n_trials_min is None and "× 2 trials" in same.label()
    tables = {"scored": scored,
              "bayes_by_factor_pooled": bayes_by_factor(scored, per_model=False)}
    numbers = C.numbers_tex(C.evaluate_claims(scored), tables, prov)
    assert "\\newcommand{\\misNTrials}{2--5}" in numbers


def test_notebook_04_counts_the_records_its_call_sent():
    """Notebook 04 stamps the records this call asked for (``run.selected()``, a limited
    run's view): it passes them as ``sent``; by default from_scored reads whole runs (and
    every run stage 06 reads), which counts questions this call did not send."""
    import ast

    from mislib.paths import REPO_ROOT

    tree = ast.parse((REPO_ROOT / "notebooks" / "04_inference.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "attr", "") == "from_scored"]
    assert calls
    for call in calls:
        sent = {k.arg: k.value for k in call.keywords}.get("sent")
        assert isinstance(sent, ast.Name) and sent.id == call.args[0].id
