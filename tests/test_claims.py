"""mislib.claims: the reproduction test, the claims table, and the paper assets on disk."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mislib import claims as C
from mislib.scoring import score_runs
from mislib.simulate import simulate_study, write_study
from tests.conftest import require

# The paper's headline numbers as issue 7 lists them.
ISSUE_NUMBERS = {53.4, 66.5, 69.4, 57.8, 59.85, 50.2, 77.6, 68.0, 71.7, 56.9, 58.8, 8.23, 45.1,
                 -13.33, 75.3, 69.3, 74.0, 40.4}
SMOKE = "smoke:tiny-qwen3-vl"


def _scored(cells, n_questions=400, n_trials=4, seed=0, model="m", arm="baseline"):
    """Scored rows: for each (levels, accuracy) cell, questions answered at that accuracy."""
    rng = np.random.default_rng(seed)
    frames = []
    for i, (levels, accuracy) in enumerate(cells):
        qids = [f"q{i}-{j}" for j in range(n_questions)]
        correct = rng.random((n_questions, n_trials)) < accuracy
        frame = pd.DataFrame({"question_id": np.repeat(qids, n_trials),
                              "trial": np.tile(np.arange(n_trials), n_questions),
                              "correct": correct.ravel(), "model": model, "arm": arm,
                              "run_id": f"run-{model}-{arm}", "n_options": 2})
        frames.append(frame.assign(**levels))
    return pd.concat(frames, ignore_index=True)


def _target(paper, n_trials):
    """The per-trial accuracy whose Bayes@N posterior mean (k + 1) / (N + 2) is ``paper``%."""
    return (paper / 100 * (n_trials + 2) - 1) / n_trials


def _row(table, claim_id, model=None):
    rows = table[table["id"] == claim_id]
    if model is not None:
        rows = rows[rows["models"] == model]
    assert len(rows) == 1, (claim_id, model, rows)
    return rows.iloc[0]


PLANE = {"family": "plane", "ablation": "none"}


# ---- the rules ------------------------------------------------------------------------------

def test_claims_list_every_headline_number_of_the_paper():
    papers = {round(c.paper, 2) for c in (*C.CLAIMS, *C.ARM_CLAIMS) if c.kind == "level"}
    gains = {round(c.paper, 2) for c in C.CLAIMS if c.id.startswith("box_")}
    assert ISSUE_NUMBERS <= papers | gains
    ids = [c.id for c in (*C.ARM_CLAIMS, *C.CLAIMS)]
    assert len(set(ids)) == len(ids)
    for c in (*C.ARM_CLAIMS, *C.CLAIMS):
        assert re.fullmatch(r"[a-z_0-9]+", c.id)
        assert c.source, c.id


def test_a_level_is_reproduced_only_when_its_interval_lies_inside_the_band():
    assert C.claim_status("level", 69.4, 65.0, 74.0, 5.0) == "reproduced"
    assert C.claim_status("level", 69.4, 64.4, 74.4, 5.0) == "reproduced"  # edges count
    # a wide interval around the paper's value is not a reproduction
    assert C.claim_status("level", 69.4, 50.0, 90.0, 5.0) == "inconclusive"
    assert C.claim_status("level", 69.4, 62.0, 70.0, 5.0) == "inconclusive"  # over the edge
    assert C.claim_status("level", 69.4, 20.0, 60.0, 5.0) == "contradicted"
    assert C.claim_status("level", 40.4, 46.0, 52.0, 5.0) == "contradicted"


def test_a_difference_needs_the_band_the_paper_sign_and_an_interval_excluding_zero():
    assert C.claim_status("difference", 11.6, 8.0, 14.0, 5.0) == "reproduced"
    # inside the band but holding zero: the sign is not shown
    assert C.claim_status("difference", 1.9, -0.5, 4.0, 5.0) == "inconclusive"
    # inside the band with the wrong sign
    assert C.claim_status("difference", -1.9, 0.4, 2.0, 5.0) == "contradicted"
    # the right sign but far from the paper's size
    assert C.claim_status("difference", 11.6, 25.0, 30.0, 5.0) == "contradicted"
    assert C.claim_status("difference", -13.33, -30.0, 5.0, 5.0) == "inconclusive"


def test_a_direction_only_claim_is_tested_for_its_side_of_zero():
    nan = float("nan")
    assert C.claim_status("difference", nan, 0.5, 3.0, 5.0, sign=+1) == "reproduced"
    assert C.claim_status("difference", nan, -3.0, -0.5, 5.0, sign=+1) == "contradicted"
    assert C.claim_status("difference", nan, -3.0, 3.0, 5.0, sign=+1) == "inconclusive"


@pytest.mark.parametrize("args, match", [
    (("level", 50.0, 40.0, 60.0, 0.0), "tolerance"),
    (("level", 50.0, 60.0, 40.0, 5.0), "reversed"),
    (("level", float("nan"), 40.0, 60.0, 5.0), "paper's value"),
    (("ratio", 50.0, 40.0, 60.0, 5.0), "kind"),
])
def test_claim_status_rejects_what_it_cannot_decide(args, match):
    with pytest.raises(ValueError, match=match):
        C.claim_status(*args)


@pytest.mark.parametrize("diagnostics, verdict", [
    ({"converged": False, "rhat_ok": True, "divergences": 0}, False),  # the verdict decides
    ({"converged": True, "convergence_problems": []}, True),
])
def test_the_claims_take_stage_07s_verdict_from_its_one_reader(tmp_root, diagnostics, verdict):
    from mislib.analysis import read_convergence

    path = tmp_root / "data" / "analysis" / "factor_diagnostics.json"
    path.parent.mkdir(parents=True)
    assert C.read_converged(tmp_root) is None  # stage 07 has not run
    path.write_text(json.dumps(diagnostics))
    assert C.read_converged(tmp_root) is verdict
    assert read_convergence(tmp_root)["converged"] is verdict


@pytest.mark.parametrize("text", [
    json.dumps({"rhat_ok": True, "divergences": 0, "min_ess_bulk": 900.0, "chains": 2}),
    json.dumps({"converged": "yes"}), "[1, 2]", "{not json",
])
def test_a_diagnostics_file_without_a_verdict_is_refused_alike_by_claims_and_stage_07(
        tmp_root, text):
    """A file without a true/false ``converged`` is an error naming the file for every
    reader (the claims once judged an old file by a rule of their own, stage 07 refused it)."""
    from mislib.analysis import read_convergence

    path = tmp_root / "data" / "analysis" / "factor_diagnostics.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    for read in (C.read_converged, read_convergence):
        with pytest.raises(ValueError, match="factor_diagnostics.json.*rerun stage 07"):
            read(tmp_root)


# ---- the claims table -----------------------------------------------------------------------

def test_claims_table_has_its_columns_and_known_statuses(study_scored):
    table = C.evaluate_claims(study_scored)
    assert list(table.columns) == list(C.CLAIM_COLUMNS)
    assert set(table["status"]) <= set(C.STATUSES)
    assert [i for i in dict.fromkeys(table["id"])] == [c.id for c in (*C.ARM_CLAIMS,
                                                                      *C.CLAIMS)]
    measured = table[table["status"] != "not measurable"]
    assert (measured["lo"] <= measured["estimate"]).all()
    assert (measured["estimate"] <= measured["hi"]).all()
    assert (measured["n_questions"] > 0).all() and (measured["n_trials"] == 2).all()
    assert table["reason"].str.len().gt(0).all()


def test_a_level_at_the_paper_value_with_many_questions_is_reproduced():
    n_trials = 4
    near = _scored([(PLANE, _target(77.6, n_trials))], n_questions=1500, n_trials=n_trials)
    row = _row(C.evaluate_claims(near), "plane_naming")
    assert row["status"] == "reproduced", row["reason"]
    assert row["hi"] - row["lo"] < 10
    assert row["chance"] == pytest.approx(50.0)
    assert row["n_questions"] == 1500 and row["n_trials"] == n_trials


def test_a_wide_interval_around_the_paper_value_is_not_reproduced():
    # 30 questions × 4 trials: the interval covers 77.6 but is wider than the ±5 band
    few = _scored([(PLANE, _target(77.6, 4))], n_questions=30, n_trials=4, seed=2)
    row = _row(C.evaluate_claims(few, min_questions=30), "plane_naming")
    assert row["lo"] < 77.6 < row["hi"] and row["hi"] - row["lo"] > 10
    assert row["status"] == "inconclusive", row["reason"]


def test_a_level_far_from_the_paper_is_contradicted_with_its_raw_accuracy_beside():
    far = _scored([(PLANE, 0.40)], n_questions=1500)
    row = _row(C.evaluate_claims(far), "plane_naming")
    assert row["status"] == "contradicted"
    assert row["estimate"] == pytest.approx(100 * (0.4 * 4 + 1) / 6, abs=2)
    assert row["raw"] == pytest.approx(40, abs=2)


def test_the_smoke_model_and_thin_cells_are_not_assessed():
    at_paper = _target(77.6, 4)
    smoke = _scored([(PLANE, at_paper)], n_questions=1500, model=SMOKE)
    row = _row(C.evaluate_claims(smoke), "plane_naming")
    assert row["status"] == "not assessed" and "smoke" in row["reason"]
    thin = _scored([(PLANE, at_paper)], n_questions=12)
    row = _row(C.evaluate_claims(thin, min_questions=30), "plane_naming")
    assert row["status"] == "not assessed" and "min_questions" in row["reason"]
    assert row["n_questions"] == 12  # measured and shown, just not judged
    # pooling models does not make a thin cell thick: the same 12 questions × 3 models
    pooled = pd.concat([_scored([(PLANE, at_paper)], n_questions=12, model=m, seed=i)
                        for i, m in enumerate(("a", "b", "c"))])
    row = _row(C.evaluate_claims(pooled, min_questions=30), "plane_naming")
    assert row["n_questions"] == 36 and row["status"] == "not assessed"


def test_differences_with_the_wrong_sign_or_an_interval_holding_zero_are_not_reproduced():
    def gap(anatomical, colloquial, n=1500):
        return _row(C.evaluate_claims(_scored([
            ({"convention": "standard", "terminology": "anatomical", "ablation": "none"},
             anatomical),
            ({"convention": "standard", "terminology": "colloquial", "ablation": "none"},
             colloquial)], n_questions=n)), "std_gap")
    # Bayes@N with 4 trials shrinks a difference by 4/6: aim 0.174 raw for 11.6 points
    assert gap(0.70, 0.526)["status"] == "reproduced"
    reversed_ = gap(0.526, 0.70)
    assert reversed_["hi"] < 0 and reversed_["status"] == "contradicted"
    flat = gap(0.60, 0.60, n=200)
    assert flat["lo"] < 0 < flat["hi"]
    assert flat["status"] != "reproduced"


def test_a_difference_reports_each_sides_own_questions_and_trials():
    """n of a difference is each side's responses, not (both sides' questions) × (the larger
    trial count): 640 × 4 anatomical against 410 × 2 colloquial is 3,380 responses, not
    1,050 × 4 = 4,200."""
    std = {"convention": "standard", "ablation": "none"}
    anatomical = _scored([({**std, "terminology": "anatomical"}, 0.7)], n_questions=640,
                         n_trials=4)
    colloquial = _scored([({**std, "terminology": "colloquial"}, 0.55)], n_questions=410,
                         n_trials=2, seed=1).assign(question_id=lambda f: "c" + f["question_id"])
    table = C.evaluate_claims(pd.concat([anatomical, colloquial], ignore_index=True))
    gap = _row(table, "std_gap")
    assert (gap["n_questions"], gap["n_trials"]) == (640, 4)
    assert (gap["minus_n_questions"], gap["minus_n_trials"]) == (410, 2)
    assert C.claims_display(table[table["id"] == "std_gap"])["n"].iat[0] == "640 × 4 vs 410 × 2"
    level = _row(table, "std_colloquial")
    assert (level["n_questions"], level["n_trials"], level["minus_n_questions"]) == (410, 2, 0)
    assert C.claims_display(table[table["id"] == "std_colloquial"])["n"].iat[0] == "410 × 2"


def test_a_paired_arm_difference_reports_the_shared_questions_and_trials_of_each_arm(
        study_scored):
    table = C.evaluate_claims(study_scored)
    gain = table[(table["id"] == "semsam_gain") & (table["status"] != "not measurable")]
    assert len(gain)
    assert (gain["n_questions"] == gain["minus_n_questions"]).all()
    assert (gain["n_trials"] == gain["minus_n_trials"]).all()
    assert C.claims_display(gain)["n"].str.endswith("× 2 each side").all()


def test_claims_measure_only_the_claims_arm():
    scored = pd.concat([_scored([(PLANE, 0.3)], arm="baseline"),
                        _scored([(PLANE, 0.9)], arm="semsam")])
    assert _row(C.evaluate_claims(scored, arm="baseline"), "plane_naming")["raw"] < 40
    assert _row(C.evaluate_claims(scored, arm="semsam"), "plane_naming")["raw"] > 80


def test_box_claims_are_not_measurable_without_a_no_prompt_level():
    cells = [({"prompt": p, "terminology": t, "ablation": "none"}, 0.6)
             for p in ("mask", "box") for t in ("anatomical", "colloquial")]
    table = C.evaluate_claims(_scored(cells, n_questions=50))
    for cid in ("nobox_colloquial", "box_colloquial_gain", "box_anatomical_gain"):
        assert _row(table, cid)["status"] == "not measurable"
        assert "no-prompt" in _row(table, cid)["note"]


def test_box_claims_are_evaluated_against_the_profile_no_prompt_level():
    cells = [({"prompt": "none", "terminology": "colloquial", "ablation": "none"}, 0.45),
             ({"prompt": "box", "terminology": "colloquial", "ablation": "none"}, 0.60),
             ({"prompt": "none", "terminology": "anatomical", "ablation": "none"}, 0.75),
             ({"prompt": "box", "terminology": "anatomical", "ablation": "none"}, 0.60),
             ({"prompt": "none", "terminology": "colloquial", "ablation": "blank"}, 0.99)]
    contrasts = pd.DataFrame({
        "contrast": ["p[prompt=none,terminology=colloquial]",
                     "p[prompt=box,terminology=colloquial] - "
                     "p[prompt=none,terminology=colloquial]"],
        "mean": [0.46, 0.1], "lo95": [0.40, 0.05], "hi95": [0.52, 0.15]})
    table = C.evaluate_claims(_scored(cells, n_questions=600), contrasts, converged=True)
    assert _row(table, "box_colloquial_gain")["raw"] == pytest.approx(15, abs=4)
    assert _row(table, "box_anatomical_gain")["raw"] == pytest.approx(-15, abs=4)
    assert _row(table, "box_colloquial_gain")["status"] == "reproduced"
    # only questions with the image count: the blank cell is not part of the baseline
    assert _row(table, "nobox_colloquial")["raw"] == pytest.approx(45, abs=4)
    assert _row(table, "nobox_colloquial")["n_questions"] == 600
    assert _row(table, "box_colloquial_gain")["factor_estimate"] == pytest.approx(10.0)
    assert _row(table, "nobox_colloquial")["factor_estimate"] == pytest.approx(46.0)
    assert _row(table, "nobox_colloquial")["factor_converged"] is True
    assert np.isnan(_row(table, "box_anatomical_gain")["factor_estimate"])
    other = C.evaluate_claims(_scored(cells, n_questions=600), prompt_baseline="mask")
    assert _row(other, "nobox_colloquial")["status"] == "not measurable"


def test_factor_model_columns_say_not_converged_when_the_fit_did_not_converge():
    contrasts = pd.DataFrame({
        "contrast": ["p[convention=standard,terminology=colloquial] - "
                     "p[convention=standard,terminology=anatomical]", "p[family=plane]"],
        "mean": [-0.1, 0.7], "lo95": [-0.15, 0.65], "hi95": [-0.05, 0.75]})
    scored = _scored([(PLANE, 0.5)], n_questions=5)
    table = C.evaluate_claims(scored, contrasts, converged=False)
    gap = _row(table, "std_gap")  # anatomical - colloquial: the contrast turned round
    assert (gap["factor_estimate"], gap["factor_lo"], gap["factor_hi"]) == pytest.approx(
        (10.0, 5.0, 15.0))
    shown = C.claims_display(table).set_index(table["id"])
    assert shown.loc["plane_naming", "factor model"] == "not converged"
    assert "70.0" not in shown.loc["plane_naming", "factor model"]
    fine = C.claims_display(C.evaluate_claims(scored, contrasts, converged=True))
    assert fine.set_index(table["id"]).loc["plane_naming", "factor model"].startswith("70.0")


# ---- the decoding claims: every model that ran both arms, and the greedy control ----------

@pytest.fixture(scope="module")
def three_arms():
    from mislib.scoring import rescore

    study = simulate_study(n_questions=600, n_trials=3, seed=5,
                           models=("sim-a", "Qwen3-VL-32B-Instruct"),
                           arms=("baseline", "greedy", "semsam"))
    return rescore(study.responses, study.questions, progress=False)


def test_semsam_claims_are_evaluated_for_every_model_that_ran_both_arms(three_arms):
    table = C.evaluate_claims(three_arms)
    for cid in ("semsam_baseline", "semsam_with", "semsam_gain"):
        rows = table[table["id"] == cid]
        assert set(rows["models"]) == {"sim-a", "Qwen3-VL-32B-Instruct"}, cid
        assert (rows["paper_model"] == "Qwen3-VL-32B").all()
        assert (rows["status"] != "not measurable").all()
    # the paper's accuracy is its model's: another model's is shown but not assessed
    other = _row(table, "semsam_baseline", "sim-a")
    assert other["status"] == "not assessed" and "Qwen3-VL-32B" in other["reason"]
    assert _row(table, "semsam_baseline", "Qwen3-VL-32B-Instruct")["status"] in (
        "reproduced", "contradicted", "inconclusive")
    # another model's gain is tested for the paper's direction only
    gain = _row(table, "semsam_gain", "sim-a")
    assert gain["status"] in ("reproduced", "contradicted", "inconclusive")
    assert "sign only" in gain["note"]


def test_three_arm_contrasts_come_from_the_greedy_arm(three_arms):
    table = C.evaluate_claims(three_arms)
    for model in ("sim-a", "Qwen3-VL-32B-Instruct"):
        vs_greedy = _row(table, "semsam_minus_greedy", model)
        control = _row(table, "greedy_minus_baseline", model)
        gain = _row(table, "semsam_gain", model)
        # the two paired steps add up to the whole (same questions and trials)
        assert vs_greedy["raw"] + control["raw"] == pytest.approx(gain["raw"], abs=1e-9)
        assert vs_greedy["status"] in ("reproduced", "contradicted", "inconclusive")
        assert control["status"] == "not assessed"  # the paper claims nothing about greedy
    two_arms = three_arms[three_arms["arm"] != "greedy"]
    table = C.evaluate_claims(two_arms)
    assert _row(table, "semsam_minus_greedy")["status"] == "not measurable"
    assert "greedy" in _row(table, "semsam_minus_greedy")["note"]


def test_a_clear_semsam_gain_of_the_paper_size_is_reproduced_and_a_loss_contradicted():
    n_trials = 5
    base = _scored([(PLANE, _target(53.4, n_trials))], n_questions=3000, n_trials=n_trials,
                   model="Qwen/Qwen3-VL-32B-Instruct", arm="baseline", seed=1)
    better = _scored([(PLANE, _target(66.46, n_trials))], n_questions=3000, n_trials=n_trials,
                     model="Qwen/Qwen3-VL-32B-Instruct", arm="semsam", seed=2)
    worse = _scored([(PLANE, _target(45.0, n_trials))], n_questions=3000, n_trials=n_trials,
                    model="Qwen/Qwen3-VL-32B-Instruct", arm="semsam", seed=3)
    gain = _row(C.evaluate_claims(pd.concat([base, better])), "semsam_gain")
    assert gain["status"] == "reproduced", gain["reason"]
    loss = _row(C.evaluate_claims(pd.concat([base, worse])), "semsam_gain")
    assert loss["status"] == "contradicted", loss["reason"]


def test_no_model_in_both_arms_leaves_the_semsam_claims_not_measurable():
    table = C.evaluate_claims(_scored([(PLANE, 0.5)], n_questions=50))
    assert _row(table, "semsam_gain")["status"] == "not measurable"
    assert "both" in _row(table, "semsam_gain")["note"]


def test_macro_names_are_letters_only():
    assert C.macro_name("std_gap", "run") == "StdGapRun"
    assert C.macro_name("dims_3d") == "DimsThreed"
    for c in (*C.CLAIMS, *C.ARM_CLAIMS):
        assert re.fullmatch(r"[A-Za-z]+", C.macro_name(c.id))


def test_latex_escape_protects_special_characters():
    assert C.latex_escape("a_b & 5% #1") == r"a\_b \& 5\% \#1"
    assert C.latex_escape(float("nan")) == ""
    assert C.latex_escape("48 × 2 ± 5") == r"48 $\times$ 2 $\pm$ 5"


# ---- the assets on disk -------------------------------------------------------------------

@pytest.fixture(scope="module")
def study():
    return simulate_study(n_questions=300, n_trials=2, seed=11,
                          models=("sim-a", "Qwen3-VL-32B-Instruct"))


@pytest.fixture(scope="module")
def study_scored(study):
    from mislib.scoring import rescore

    return rescore(study.responses, study.questions, progress=False)


def _stage_07_outputs(root, study, diagnostics=None):
    truth = study.truth.rename(columns={"value": "mean"})
    truth.assign(sd=0.1, lo95=truth["mean"] - 0.2, hi95=truth["mean"] + 0.2, r_hat=1.0,
                 ess_bulk=500.0).to_parquet(root / "data/analysis/factor_effects.parquet")
    pd.DataFrame({"contrast": ["p[family=plane]"], "kind": ["level"], "factors": ["family"],
                  "mean": [0.7], "sd": [0.01], "lo95": [0.68], "hi95": [0.72],
                  "observed": [0.7], "n_trials": [10]}).to_parquet(
        root / "data/analysis/contrasts.parquet")
    if diagnostics is not None:
        (root / "data/analysis/factor_diagnostics.json").write_text(json.dumps(diagnostics))


def _recovery_outputs(root, covered=9, terms=10, converged=True, p_value=None):
    """Stage 07's recovery study as notebook 07 leaves it (``covered`` of ``terms``; with
    ``p_value``, its calibration test)."""
    flags = [True] * covered + [False] * (terms - covered)
    pd.DataFrame({"term": [f"t{i}" for i in range(terms)], "planted": 0.1, "mean": 0.1,
                  "lo95": 0.0, "hi95": 0.2, "covered": flags}).to_parquet(
        root / "data/analysis/recovery.parquet")
    diagnostics = {"converged": converged, "coverage": covered / terms}
    if p_value is not None:
        diagnostics["calibration"] = {"distance2": 20.0, "df": 8, "p_value": p_value,
                                      "alpha": 0.001, "unbiased": p_value >= 0.001}
    (root / "data/analysis/recovery_diagnostics.json").write_text(json.dumps(diagnostics))


def _paper_assets(root, study, diagnostics=None, recovery=False):
    write_study(study, root)
    score_runs("demo", root=root, progress=False)
    _stage_07_outputs(root, study, diagnostics)
    if recovery:
        _recovery_outputs(root, p_value=0.62)
    return C.write_paper_assets("demo", root)


def test_write_paper_assets_writes_tables_macros_and_claims_with_provenance(tmp_root, study):
    result = _paper_assets(tmp_root, study, {"converged": False, "divergences": 2,
                                             "min_ess_bulk": 40.0}, recovery=True)
    paper = tmp_root / "paper"
    for name in C.TABLES:
        tex = (paper / "tables" / f"{name}.tex").read_text()
        assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex, name
        assert f"\\label{{tab:{name}}}" in tex
        assert "Source: profile demo" in tex and "run " in tex or "runs " in tex, name
        md = (paper / "tables" / f"{name}.md").read_text()
        assert re.search(r"^\|---", md, re.MULTILINE), name
        assert re.search(r"^Source: profile demo · models .*simulated", md, re.MULTILINE), name
    for name in ("claims", "accuracy_by_model_arm", "accuracy_by_factor", "semsam_effect"):
        head = (paper / "tables" / f"{name}.md").read_text().split("\n|---")[0]
        for column in ("raw", "chance", "| n |"):
            assert column in head, (name, column)
    numbers = (paper / "numbers.tex").read_text()
    macros = re.findall(r"\\newcommand\{\\([^}]*)\}", numbers)
    assert all(re.fullmatch(r"[A-Za-z]+", m) for m in macros)
    assert len(macros) == len(set(macros))
    values = dict(re.findall(r"\\newcommand\{\\([^}]*)\}\{(.*)\}", numbers))
    assert values["misProfile"] == "demo"
    assert values["misNQuestionsGenerated"] == "300"
    assert values["misNQuestionsAsked"] == "300" and values["misNTrials"] == "2"
    assert values["misNModels"] == "2"
    assert "\\misdemofalse" in numbers and "\\missimulatedtrue" in numbers
    assert "\\misconvergedfalse" in numbers
    assert "Source: profile demo" in numbers  # the provenance line
    assert (values["misRecoveryCovered"], values["misRecoveryTerms"],
            values["misRecoveryCoverage"]) == ("9", "10", "90")
    assert "\\misrecoverytrue" in numbers and "\\misrecoveryconvergedtrue" in numbers
    claims_md = (paper / "claims.md").read_text()
    for c in (*C.CLAIMS, *C.ARM_CLAIMS):
        assert c.claim in claims_md
    assert "Simulated responses" in claims_md and "did not converge" in claims_md
    assert "(k + 1) / (N + 2)" in claims_md and "25 %" in claims_md
    assert "tolerance ± 5" in claims_md
    assert "covered 9 of 10 planted effects (90 %)" in claims_md
    assert "(calibration test p = 0.62): no sign of bias" in claims_md
    assert "\\misrecoverycalibratedtrue" in numbers and "\\misrecoveryunbiasedtrue" in numbers
    assert values["misRecoveryCalibrationP"] == "= 0.62"
    table = result["claims"]
    assert (table[table["id"] == "semsam_gain"]["status"] != "not measurable").all()
    plane = _row(table, "plane_naming")
    assert plane["factor_estimate"] == pytest.approx(70.0)
    assert plane["factor_converged"] is False and plane["chance"] > 0
    assert "not converged" in (paper / "tables" / "claims.md").read_text()
    assert "NOT CONVERGED" in (paper / "tables" / "factor_effects.md").read_text()
    # fresh: nothing is rewritten, and the same claims and provenance come back
    stamp = paper / ".paper.stage.json"
    mtime = stamp.stat().st_mtime_ns
    again = C.write_paper_assets("demo", tmp_root)
    assert stamp.stat().st_mtime_ns == mtime
    assert list(again["claims"]["status"]) == list(table["status"])
    assert again["provenance"] == result["provenance"]
    assert {p.name for p in again["paths"]} >= {"claims.md", "numbers.tex", "claims.tex"}


@pytest.fixture(scope="module")
def smoke_assets(tmp_path_factory):
    """Stage 08's assets of a run answered by the smoke model (the demo's situation)."""
    root = tmp_path_factory.mktemp("smoke_assets")
    study = simulate_study(n_questions=400, n_trials=2, seed=4, models=(SMOKE,))
    study.responses["model"] = SMOKE
    write_study(study, root)
    for run_json in (root / "data" / "results").glob("*/run.json"):
        record = json.loads(run_json.read_text())
        record.pop("simulated")  # as a real inference run records it
        run_json.write_text(json.dumps(record))
    score_runs("demo", root=root, progress=False)
    _stage_07_outputs(root, study, {"converged": True, "divergences": 0,
                                    "min_ess_bulk": 900.0})
    _recovery_outputs(root, covered=19, terms=20, converged=False, p_value=2e-5)
    return root, C.write_paper_assets("demo", root)


def test_the_smoke_model_reproduces_no_claim_and_every_output_says_so(smoke_assets):
    root, result = smoke_assets
    statuses = set(result["claims"]["status"])
    assert statuses <= {"not assessed", "not measurable"}
    assert "not assessed" in statuses
    assert result["provenance"].smoke
    paper = root / "paper"
    assert "\\misdemotrue" in (paper / "numbers.tex").read_text()
    claims_md = (paper / "claims.md").read_text()
    assert "random weights" in claims_md and "Summary: 0 reproduced" in claims_md
    assert "covered 19 of 20 planted effects (95 %) (its fit did not converge)" in claims_md
    assert "No recovery study was run" in C._recovery_sentence(None)
    numbers = (paper / "numbers.tex").read_text()
    assert "\\misrecoverycalibratedtrue" in numbers and "\\misrecoveryunbiasedfalse" in numbers
    assert "(calibration test p = 2e-05): the recovery is BIASED" in claims_md
    biased = {"covered": 50, "terms": 51, "coverage": 50 / 51, "converged": True,
              "calibration": {"p_value": 1e-6, "unbiased": False}}
    assert "the recovery is BIASED" in C._recovery_sentence(biased)
    for name in C.TABLES:
        assert "random weights: answers are noise" in (
            paper / "tables" / f"{name}.md").read_text(), name


def test_write_paper_assets_names_a_missing_stage_07_output(tmp_root, study):
    write_study(study, tmp_root)
    score_runs("demo", root=tmp_root, progress=False)
    with pytest.raises(FileNotFoundError, match="07"):
        C.write_paper_assets("demo", tmp_root)


def test_claims_figure_draws_paper_band_and_run_per_claim(three_arms, tmp_root):
    from mislib.claims_figure import FIGURE_NAME, STATUS_COLOURS, claims_figure
    from mislib.plots import save_figure
    from mislib.provenance import STAMP_GID, Provenance

    table = C.evaluate_claims(three_arms)
    fig = claims_figure(table)
    levels, diffs = fig.axes[:2]
    assert len(levels.get_yticks()) == int((table["kind"] == "level").sum())
    assert len(diffs.get_yticks()) == int((table["kind"] == "difference").sum())
    labels = [t.get_text() for t in levels.get_yticklabels()]
    assert "accuracy with SemSam · sim-a" in labels  # a decoding claim names its model
    assert "plane-naming questions" in labels  # a factor claim pools the models
    chance_ticks = [line for line in levels.get_lines() if line.get_marker() == "|"]
    assert len(chance_ticks) == int((table["kind"] == "level").sum())
    colours = {line.get_color() for ax in fig.axes for line in ax.get_lines()}
    for status in set(table["status"]) - {"not measurable"}:
        assert STATUS_COLOURS[status] in colours, status
    prov = Provenance(profile="demo", models=("sim-a",), run_ids=("r1",),
                      n_questions_generated=600, n_questions_asked=600, n_trials=3,
                      smoke=False, simulated=True)
    paths = save_figure(fig, FIGURE_NAME, root=tmp_root, provenance=prov)
    assert [p.name for p in paths] == ["08_claims_vs_paper.png", "08_claims_vs_paper.pdf"]
    assert any(t.get_gid() == STAMP_GID for t in fig.texts)
    with pytest.raises(ValueError, match="lacks columns"):
        claims_figure(table.drop(columns=["status"]))


# ---- the manuscript compiles ---------------------------------------------------------------

def test_main_tex_compiles_and_its_abstract_says_it_is_the_demo(smoke_assets, tmp_path):
    require(shutil.which("pdflatex") is not None and shutil.which("pdftotext") is not None,
            "pdflatex and pdftotext (TeX Live, poppler)",
            "apt-get install --no-install-recommends texlive-latex-base "
            "texlive-latex-recommended lmodern poppler-utils")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mislib.claims_figure import save_claims_figure

    root, result = smoke_assets
    work = tmp_path / "build"
    shutil.copytree(root / "paper", work / "paper")
    main = (C.project_paths().paper / "main.tex").read_text()
    (work / "paper" / "main.tex").write_text(main)
    figures = work / "figures"
    save_claims_figure(result["claims"], result["provenance"], root=work)
    # the other figures are drawn by notebooks 06-08 from stages this test does not run:
    # stand-ins with the same names keep the test on what it checks (the text, macros and
    # tables of stage 08)
    for name in re.findall(r"\\includegraphics(?:\[[^]]*\])?\{([^}]+)\}", main):
        if not (figures / name).exists():
            fig, ax = plt.subplots(figsize=(3, 2))
            ax.text(0.5, 0.5, name, ha="center")
            fig.savefig(figures / name)
            plt.close(fig)
    for _ in range(2):  # twice: references
        out = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error",
                              "main.tex"], cwd=work / "paper", capture_output=True, text=True,
                             timeout=240)
        assert out.returncode == 0, out.stdout[-3000:]
    log = (work / "paper" / "main.log").read_text(errors="replace")
    assert "Undefined control sequence" not in log
    assert "There were undefined references" not in log
    text = subprocess.run(["pdftotext", "-layout", "main.pdf", "-"], cwd=work / "paper",
                          capture_output=True, text=True, check=True).stdout
    abstract = re.sub(r"\s+", " ", text.split("Abstract", 1)[1].split("1 Introduction", 1)[0])
    assert "This is the demo build (profile demo)" in abstract
    assert "random weights whose answers are noise" in abstract
    # every status is counted, so the counts add up to the claims
    assert re.search(r"\d+ not assessed and \d+ not measurable", abstract)
    assert "generated 400 questions and asked 400 of them 2 times" in abstract
    assert "Baseline decoding reaches" not in abstract  # the demo's accuracies are not results
    assert "0 are reproduced" in abstract
    assert ("its 95 % intervals covered 19 of 20 planted effects (95 %), from a fit that "
            "did not converge") in re.sub(r"\s+", " ", text)
    assert ("Taken together, the planted effects lie further from the fit than chance allows: "
            "the recovery is biased (calibration test, p < 0.001).") in re.sub(r"\s+", " ", text)


def test_semsam_table_names_a_model_decoded_on_an_endpoint():
    # bayes.semsam_effect pairs arms by (model, decoder): the same model decoded locally
    # and on an endpoint are two rows of the table, told apart by name
    from mislib.bayes import bayes_by_factor, semsam_effect

    scored = pd.concat([_scored([({}, 0.5)], n_questions=5, n_trials=2, arm=arm)
                        .assign(backend=backend)
                        for arm in ("baseline", "semsam") for backend in ("hf", "openai")],
                       ignore_index=True)
    tables = {"bayes_by_factor": bayes_by_factor(scored, ()),
              "bayes_by_factor_pooled": bayes_by_factor(scored, (), per_model=False),
              "semsam_effect": semsam_effect(scored),
              "unparseable": pd.DataFrame({"model": ["m"], "arm": ["baseline"],
                                           "n_responses": [10], "unparseable_rate": [0.0],
                                           "ambiguous_rate": [0.0]})}
    table, _ = C.format_tables(tables, C.evaluate_claims(scored))["semsam_effect"]
    assert table["model"].tolist() == ["m", "m via openai"]


def test_claims_md_gives_an_unbiased_calibration_p_as_numbers_tex_does():
    """An unbiased p below 0.005 read 'p = 0.00' in claims.md (two decimals) while
    numbers.tex gave '= 0.0023'; a p of 0.00 next to 'no sign of bias' contradicts itself."""
    recovery = {"covered": 50, "terms": 51, "coverage": 50 / 51, "converged": True,
                "calibration": {"p_value": 0.0023, "unbiased": True}}
    sentence = C._recovery_sentence(recovery)
    assert "(calibration test p = 0.0023): no sign of bias" in sentence
    assert "p = 0.00)" not in sentence


def test_paper_assets_are_redone_when_what_they_count_from_changes(tmp_root, study,
                                                                   monkeypatch):
    """The stamp holds every input stage 08 reads: the runs' records (the questions asked
    are counted from them) and the code that counts and estimates (mislib.provenance,
    mislib.bayes), not only stage 06/07's tables and mislib.claims."""
    import mislib.provenance as provenance

    _paper_assets(tmp_root, study, {"converged": True})
    stamp = tmp_root / "paper" / ".paper.stage.json"

    def rewritten() -> bool:
        before = stamp.stat().st_mtime_ns
        C.write_paper_assets("demo", tmp_root)
        return stamp.stat().st_mtime_ns != before

    assert not rewritten()
    # a run's records gain a question whose every trial failed; scored.parquet is as it was
    responses = next((tmp_root / "data" / "results").glob("*/responses.parquet"))
    records = pd.read_parquet(responses)
    failed = records.iloc[:1].assign(question_id="q-failed", status="error")
    pd.concat([records, failed], ignore_index=True).to_parquet(responses, index=False)
    assert rewritten()
    values = dict(re.findall(r"\\newcommand\{\\([^}]*)\}\{(.*)\}",
                             (tmp_root / "paper" / "numbers.tex").read_text()))
    assert values["misNQuestionsAsked"] == "301"
    assert not rewritten()
    # a run whose every record failed (no scored row) joins the runs stage 06 reads
    failed_run = tmp_root / "data" / "results" / "failed-run"
    failed_run.mkdir()
    records.assign(run_id="failed-run", model="failed-model", status="error").to_parquet(
        failed_run / "responses.parquet", index=False)
    assert rewritten()
    values = dict(re.findall(r"\\newcommand\{\\([^}]*)\}\{(.*)\}",
                             (tmp_root / "paper" / "numbers.tex").read_text()))
    assert values["misNModels"] == "3"
    assert not rewritten()
    # the counting code changes (a copy of mislib.provenance with one more line)
    changed = tmp_root / "provenance.py"
    changed.write_text(Path(provenance.__file__).read_text() + "\n# changed\n")
    monkeypatch.setattr(provenance, "__file__", str(changed))
    assert rewritten()
