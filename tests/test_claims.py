"""mislib.claims: the claims table's structure, its statuses, and the paper assets on disk."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from mislib import claims as C
from mislib.scoring import score_runs
from mislib.simulate import simulate_study, write_study

# The paper's headline numbers as issue 7 lists them.
ISSUE_NUMBERS = {53.4, 66.5, 69.4, 57.8, 59.85, 50.2, 77.6, 68.0, 71.7, 56.9, 58.8, 8.23, 45.1,
                 -13.33, 75.3, 69.3, 74.0, 40.4}


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
                              "run_id": f"run-{model}-{arm}"})
        frames.append(frame.assign(**levels))
    return pd.concat(frames, ignore_index=True)


def _row(table, claim_id):
    return table.set_index("id").loc[claim_id]


def test_claims_list_every_headline_number_of_the_paper():
    papers = {round(c.paper, 2) for c in C.CLAIMS if c.kind == "level"}
    gains = {round(c.paper, 2) for c in C.CLAIMS if c.id.startswith("box_")}
    assert ISSUE_NUMBERS <= papers | gains
    assert len({c.id for c in C.CLAIMS}) == len(C.CLAIMS)
    for c in C.CLAIMS:
        assert re.fullmatch(r"[a-z_0-9]+", c.id)


def test_claims_table_has_one_row_per_quantity_and_a_known_status(study_scored):
    table = C.evaluate_claims(study_scored)
    assert list(table.columns) == list(C.CLAIM_COLUMNS)
    assert list(table["id"]) == [c.id for c in C.CLAIMS]
    assert set(table["status"]) <= set(C.STATUSES)
    measured = table[table["status"] != "not measurable"]
    assert (measured["lo"] <= measured["estimate"]).all()
    assert (measured["estimate"] <= measured["hi"]).all()
    assert table[table["status"] == "not measurable"]["note"].str.len().gt(0).all()


def test_level_claim_is_reproduced_when_the_paper_value_is_inside_the_interval():
    # Bayes@N's posterior mean of a question is (k + 1) / (N + 2): aim it at 77.6 %.
    n_trials = 4
    target = (0.776 * (n_trials + 2) - 1) / n_trials
    near = _scored([({"family": "plane", "ablation": "none"}, target)], n_trials=n_trials)
    far = _scored([({"family": "plane", "ablation": "none"}, 0.40)])
    assert _row(C.evaluate_claims(near), "plane_naming")["status"] == "reproduced"
    row = _row(C.evaluate_claims(far), "plane_naming")
    assert row["status"] == "not reproduced"
    assert row["estimate"] == pytest.approx(100 * (0.4 * 4 + 1) / 6, abs=3)
    assert row["raw"] == pytest.approx(40, abs=3)


def test_difference_claim_needs_the_paper_sign_and_an_interval_excluding_zero():
    def table(anatomical, colloquial):
        return C.evaluate_claims(_scored([
            ({"convention": "standard", "terminology": "anatomical", "ablation": "none"},
             anatomical),
            ({"convention": "standard", "terminology": "colloquial", "ablation": "none"},
             colloquial)], n_questions=600))
    assert _row(table(0.75, 0.55), "std_gap")["status"] == "reproduced"
    assert _row(table(0.55, 0.75), "std_gap")["status"] == "not reproduced"  # reversed
    flat = _row(table(0.60, 0.60), "std_gap")
    assert flat["lo"] < 0 < flat["hi"]
    assert flat["status"] == "not reproduced"


def test_claims_measure_only_the_claims_arm():
    scored = pd.concat([
        _scored([({"family": "plane", "ablation": "none"}, 0.3)], arm="baseline"),
        _scored([({"family": "plane", "ablation": "none"}, 0.9)], arm="semsam")])
    assert _row(C.evaluate_claims(scored, arm="baseline"), "plane_naming")["raw"] < 40
    assert _row(C.evaluate_claims(scored, arm="semsam"), "plane_naming")["raw"] > 80


def test_box_claims_are_not_measurable_without_a_no_prompt_level():
    cells = [({"prompt": p, "terminology": t, "ablation": "none"}, 0.6)
             for p in ("mask", "box") for t in ("anatomical", "colloquial")]
    table = C.evaluate_claims(_scored(cells, n_questions=50))
    for cid in ("nobox_colloquial", "box_colloquial_gain", "box_anatomical_gain"):
        assert _row(table, cid)["status"] == "not measurable"
        assert "no-prompt" in _row(table, cid)["note"]


def test_box_claims_are_measured_against_the_profile_baseline_level():
    cells = [({"prompt": "bare", "terminology": "colloquial", "ablation": "none"}, 0.45),
             ({"prompt": "box", "terminology": "colloquial", "ablation": "none"}, 0.60)]
    table = C.evaluate_claims(_scored(cells, n_questions=600), prompt_baseline="bare")
    gain = _row(table, "box_colloquial_gain")
    assert gain["estimate"] == pytest.approx(15 * 4 / 6, abs=3)  # Bayes@N shrinks by N/(N+2)
    assert gain["raw"] == pytest.approx(15, abs=4)
    assert gain["status"] == "reproduced"


def test_box_claims_are_evaluated_against_the_none_level_per_terminology():
    # the paper's pattern: a box helps colloquial and hurts anatomical questions
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
    table = C.evaluate_claims(_scored(cells, n_questions=600), contrasts=contrasts)
    for cid in ("nobox_colloquial", "box_colloquial_gain", "nobox_anatomical",
                "box_anatomical_gain"):
        assert _row(table, cid)["status"] != "not measurable", cid
    assert _row(table, "box_colloquial_gain")["raw"] == pytest.approx(15, abs=4)
    assert _row(table, "box_anatomical_gain")["raw"] == pytest.approx(-15, abs=4)
    assert _row(table, "box_colloquial_gain")["status"] == "reproduced"
    assert _row(table, "box_anatomical_gain")["status"] == "reproduced"
    # only questions with the image count: the blank cell is not part of the baseline
    assert _row(table, "nobox_colloquial")["raw"] == pytest.approx(45, abs=4)
    assert _row(table, "nobox_colloquial")["n_questions"] == 600
    # stage 07's contrast of the same difference, with the profile's baseline level named
    assert _row(table, "box_colloquial_gain")["model_estimate"] == pytest.approx(10.0)
    assert _row(table, "nobox_colloquial")["model_estimate"] == pytest.approx(46.0)
    assert np.isnan(_row(table, "box_anatomical_gain")["model_estimate"])


def test_semsam_claim_reads_the_matching_model_of_the_paired_effect():
    effect = pd.DataFrame({"model": ["Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-32B-Instruct"],
                           "n_questions": [100, 100],
                           "baseline_mu": [0.4, 0.53], "baseline_lo": [0.38, 0.51],
                           "baseline_hi": [0.42, 0.55], "semsam_mu": [0.5, 0.66],
                           "semsam_lo": [0.48, 0.64], "semsam_hi": [0.52, 0.68],
                           "effect_mu": [0.1, 0.13], "effect_lo": [0.07, 0.10],
                           "effect_hi": [0.13, 0.16], "baseline_accuracy": [0.4, 0.52],
                           "semsam_accuracy": [0.5, 0.68]})
    table = C.evaluate_claims(_scored([({"family": "plane"}, 0.5)], n_questions=5), effect)
    assert _row(table, "semsam_gain")["estimate"] == pytest.approx(13.0)
    assert _row(table, "semsam_gain")["raw"] == pytest.approx(16.0)
    assert _row(table, "semsam_gain")["status"] == "reproduced"
    assert _row(table, "semsam_baseline")["status"] == "reproduced"  # 53.4 in [51, 55]
    assert "32B" in _row(table, "semsam_with")["note"]
    other = C.evaluate_claims(_scored([({"family": "plane"}, 0.5)], n_questions=5),
                              effect.iloc[:1])
    assert _row(other, "semsam_gain")["status"] == "not measurable"
    assert "not in this run" in _row(other, "semsam_gain")["note"]


def test_factor_model_contrasts_fill_the_model_columns_with_the_claim_direction():
    contrasts = pd.DataFrame({
        "contrast": ["p[convention=standard,terminology=colloquial] - "
                     "p[convention=standard,terminology=anatomical]", "p[family=plane]"],
        "mean": [-0.1, 0.7], "lo95": [-0.15, 0.65], "hi95": [-0.05, 0.75]})
    table = C.evaluate_claims(_scored([({"family": "plane"}, 0.5)], n_questions=5),
                              contrasts=contrasts)
    gap = _row(table, "std_gap")  # anatomical - colloquial: the contrast turned round
    assert (gap["model_estimate"], gap["model_lo"], gap["model_hi"]) == pytest.approx(
        (10.0, 5.0, 15.0))
    assert _row(table, "plane_naming")["model_estimate"] == pytest.approx(70.0)
    assert np.isnan(_row(table, "dims_gap")["model_estimate"])


def test_macro_names_are_letters_only():
    assert C.macro_name("std_gap", "run") == "StdGapRun"
    assert C.macro_name("dims_3d") == "DimsThreed"
    for c in C.CLAIMS:
        assert re.fullmatch(r"[A-Za-z]+", C.macro_name(c.id))


def test_latex_escape_protects_special_characters():
    assert C.latex_escape("a_b & 5% #1") == r"a\_b \& 5\% \#1"
    assert C.latex_escape(float("nan")) == ""


@pytest.fixture(scope="module")
def study():
    return simulate_study(n_questions=300, n_trials=2, seed=11,
                          models=("sim-a", "Qwen3-VL-32B-Instruct"))


@pytest.fixture(scope="module")
def study_scored(study):
    from mislib.scoring import rescore

    return rescore(study.responses, study.questions, progress=False)


def _stage_07_outputs(root, study):
    truth = study.truth.rename(columns={"value": "mean"})
    truth.assign(sd=0.1, lo95=truth["mean"] - 0.2, hi95=truth["mean"] + 0.2, r_hat=1.0,
                 ess_bulk=500.0).to_parquet(root / "data/analysis/factor_effects.parquet")
    pd.DataFrame({"contrast": ["p[family=plane]"], "kind": ["level"], "factors": ["family"],
                  "mean": [0.7], "sd": [0.01], "lo95": [0.68], "hi95": [0.72],
                  "observed": [0.7], "n_trials": [10]}).to_parquet(
        root / "data/analysis/contrasts.parquet")


def test_write_paper_assets_writes_tables_macros_and_claims(tmp_root, study):
    write_study(study, tmp_root)
    score_runs("demo", root=tmp_root, progress=False)
    _stage_07_outputs(tmp_root, study)
    result = C.write_paper_assets("demo", tmp_root)
    paper = tmp_root / "paper"
    for name in C.TABLES:
        tex = (paper / "tables" / f"{name}.tex").read_text()
        assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex, name
        assert f"\\label{{tab:{name}}}" in tex
        md = (paper / "tables" / f"{name}.md").read_text()
        assert re.search(r"^\|---", md, re.MULTILINE), name
    numbers = (paper / "numbers.tex").read_text()
    macros = re.findall(r"\\newcommand\{\\([^}]*)\}", numbers)
    assert all(re.fullmatch(r"[A-Za-z]+", m) for m in macros)
    assert len(macros) == len(set(macros))
    assert "misPlaneNamingPaper" in macros and "misNQuestions" in macros
    claims_md = (paper / "claims.md").read_text()
    for c in C.CLAIMS:
        assert c.claim in claims_md
    assert "Simulated responses" in claims_md
    table = result["claims"]
    assert _row(table, "semsam_gain")["status"] != "not measurable"  # the 32B model ran
    assert _row(table, "plane_naming")["model_estimate"] == pytest.approx(70.0)
    # fresh: nothing is rewritten, and the same claims come back
    stamp = paper / ".paper.stage.json"
    mtime = stamp.stat().st_mtime_ns
    again = C.write_paper_assets("demo", tmp_root)
    assert stamp.stat().st_mtime_ns == mtime
    assert list(again["claims"]["status"]) == list(table["status"])
    assert {p.name for p in again["paths"]} >= {"claims.md", "numbers.tex", "claims.tex"}


def test_write_paper_assets_names_a_missing_stage_07_output(tmp_root, study):
    write_study(study, tmp_root)
    score_runs("demo", root=tmp_root, progress=False)
    with pytest.raises(FileNotFoundError, match="07"):
        C.write_paper_assets("demo", tmp_root)
