"""mislib.bayes: Bayes@N against scorio and the closed form, per factor and paired by arm."""

from __future__ import annotations

import doctest

import numpy as np
import pandas as pd
import pytest
from scorio.eval import bayes as scorio_bayes

from mislib import bayes
from mislib.bayes import (
    bayes_at_n,
    bayes_by,
    bayes_by_factor,
    bayes_interval,
    outcome_matrix,
    semsam_effect,
)
from mislib.scoring import rescore
from mislib.simulate import simulate_study


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


@pytest.fixture(scope="module")
def study():
    return simulate_study(n_questions=240, n_trials=3, seed=3, unparseable_rate=0.1)


@pytest.fixture(scope="module")
def scored(study):
    return rescore(study.responses, study.questions, progress=False)


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


def test_docstring_examples_run():
    assert doctest.testmod(bayes).failed == 0


def test_semsam_effect_pairs_arms_by_model_and_decoder_never_across_them():
    study = simulate_study(n_questions=200, n_trials=2, seed=6, models=("m",),
                           main={"arm": {"baseline": -0.6, "semsam": 0.6}}, interactions={})
    local = rescore(study.responses, study.questions, progress=False)
    # the same model through an endpoint, where every answer is right in both arms
    served = local.assign(backend="openai", correct=True)
    both = pd.concat([local.assign(backend=np.where(local["arm"] == "semsam", "vllm", "hf")),
                      served], ignore_index=True)
    table = semsam_effect(both).set_index("decoder")
    assert list(table.index) == ["local", "openai"]  # hf and vllm pair; openai apart
    assert table.loc["local", "effect_lo"] > 0.05
    assert table.loc["openai", "baseline_accuracy"] == table.loc["openai", "semsam_accuracy"] == 1
    assert table.loc["local", "n_questions"] == table.loc["openai", "n_questions"]


def test_bayes_by_keeps_a_model_decoded_on_an_endpoint_apart_from_its_local_run():
    # stage 06 scores an endpoint's run of a model beside the local one (one answer per
    # model, decoder, arm, question, trial); Bayes@N must not see them as duplicates
    rows = [{"model": "m", "backend": backend, "arm": "baseline", "question_id": q,
             "trial": t, "correct": backend == "openai"}
            for backend in ("hf", "openai") for q in ("q1", "q2") for t in (0, 1)]
    scored = pd.DataFrame(rows)
    table = bayes.bayes_by(scored, ["model", "arm"])
    assert table["model"].tolist() == ["m", "m via openai"]
    assert table["accuracy"].tolist() == [0.0, 1.0]
    pooled = bayes.bayes_by(scored, ["arm"])
    assert pooled["n_questions"].tolist() == [4]


def test_pooled_models_sent_different_numbers_of_trials_all_count():
    """Model a was sent each question twice and b five times. Pooled, Bayes@N needs one N:
    every (model, question) enters on its first N = 2 trials. (a's questions were left out
    as 'incomplete' against b's 5 trials, so a 'pooled' estimate was b's alone.)"""
    rows = [{"model": m, "arm": "baseline", "question_id": f"q{q}", "trial": t,
             "correct": m == "a" or t >= 2}
            for m, n in (("a", 2), ("b", 5)) for q in range(50) for t in range(n)]
    pooled = bayes_by(pd.DataFrame(rows), ["arm"]).iloc[0]
    assert (pooled["n_questions"], pooled["n_trials"], pooled["n_responses"]) == (100, 2, 200)
    assert pooled["n_incomplete"] == 0
    # a right in both of its trials, b wrong in its first two: half the trials counted right
    assert pooled["accuracy"] == pytest.approx(0.5)
    assert pooled["mu"] == pytest.approx((0.75 + 0.25) / 2)
    expected = bayes_interval(np.r_[np.ones((50, 2), int), np.zeros((50, 2), int)])
    assert (pooled["mu"], pooled["sigma"]) == pytest.approx(expected[:2])
    # an unfinished question within one model is still left out, not truncated
    unfinished = pd.DataFrame(rows[:-1])  # b's last question lacks its fifth trial
    again = bayes_by(unfinished, ["arm"]).iloc[0]
    assert (again["n_questions"], again["n_incomplete"]) == (99, 1)
