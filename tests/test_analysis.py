"""mislib.analysis: data coding, the factor model's recovery of known effects, the stage files.

One model is compiled and sampled for the whole module (``fitted``): a simulated study of
600 questions x 2 models x 2 arms x 5 trials written in the stage-04 layout, analysed by
:func:`run_factor_analysis` exactly as notebook 07 does.
"""

import json
import re

import numpy as np
import pandas as pd
import pytest

from mislib.analysis import (
    FactorData,
    fixed_design,
    group_cells,
    load_scored,
    prepare_factor_data,
    resolve_centred,
    run_factor_analysis,
    stamp_params,
    structure_pair,
)
from mislib.paths import project_paths
from mislib.simulate import scored_table, simulate_questions, simulate_study, write_study

MODELS = ("sim-vlm-a", "sim-vlm-b")
TERM_RE = re.compile(r"^(Intercept|\w+\[[^\]]+\](:\w+\[[^\]]+\])?)$")
# Share of true effects that must lie inside their 95 % intervals. Nominal is 0.95; with
# about 50 correlated effects the rate of one fit scatters, so the bar is set lower.
MIN_COVERAGE = 0.85
# Long enough that the R-hat <= 1.01 check is not at the edge of its own noise (max
# fixed-effect R-hat 1.004-1.006 over three seeds at this length).
FIT = {"draws": 3000, "tune": 1000, "chains": 2}
#: The recovery study's settings in notebook 07's parameters cell (the demo runs these).
NOTEBOOK_RECOVERY = {"n_questions": 600, "n_trials": 5, "draws": 2000, "seed": 1}


@pytest.fixture(scope="module")
def study():
    # As at the paper's scale (2,256 pairs of ~15 questions, 1,160 volumes of ~29), every
    # pair and volume holds several questions: 12 CT and 4 MRI structures give ~90 pairs,
    # and 60 volumes (~10 MRI) pin down the between-volume modality effect.
    questions = simulate_questions(600, seed=11, n_volumes=60, n_structures=(12, 4))
    return simulate_study(n_trials=5, models=MODELS, seed=11, questions=questions)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, study):
    root = tmp_path_factory.mktemp("fa")
    write_study(study, root=root, scored=True)
    result = run_factor_analysis("demo", root=root, progress=False, **FIT)
    return root, result


# ---- coding the data (no sampling) ---------------------------------------------------------
def test_counts_aggregate_trials_per_model_arm_question(study):
    scored = scored_table(study)
    data = prepare_factor_data(scored)
    assert len(data.obs) == scored[["model", "arm", "question_id"]].drop_duplicates().shape[0]
    assert int(data.obs["n"].sum()) == len(scored)
    assert int(data.obs["k"].sum()) == int(scored["correct"].sum())
    one = data.obs.iloc[7]
    rows = scored[(scored["model"] == one["model"]) & (scored["arm"] == one["arm"])
                  & (scored["question_id"] == one["question_id"])]
    assert (one["n"], one["k"]) == (len(rows), rows["correct"].sum())


def test_codes_are_minus_one_where_a_factor_does_not_apply(study):
    data = prepare_factor_data(scored_table(study))
    text_only = (data.obs["ablation"] == "text_only").to_numpy()
    assert (data.codes["prompt"][text_only] == -1).all()
    assert (data.codes["prompt"][~text_only] >= 0).all()
    plane = (data.obs["family"] == "plane").to_numpy()
    assert (data.codes["terminology"][plane] == -1).all()
    assert data.levels["arm"] == ["baseline", "semsam"]
    assert data.levels["dims"] == ["2d", "3d"]


def test_single_level_factors_and_their_interactions_are_dropped(study):
    scored = scored_table(study)
    one_model = scored[scored["model"] == MODELS[0]]
    data = prepare_factor_data(one_model)
    assert "model" not in data.factors
    assert ("arm", "model") not in data.interactions
    assert "model" in data.dropped and "arm:model" in data.dropped


def test_bad_input_is_named():
    scored = scored_table(simulate_study(n_questions=80, n_trials=1, seed=2))
    with pytest.raises(ValueError, match="convention"):
        prepare_factor_data(scored.drop(columns="convention"))
    broken = scored.copy()
    broken["correct"] = broken["correct"].astype(object)
    broken.loc[3, "correct"] = None
    with pytest.raises(ValueError, match="'correct'"):
        prepare_factor_data(broken)
    mixed = scored.copy()
    first = mixed["question_id"] == mixed["question_id"].iat[0]
    mixed.loc[first.idxmax(), "plane"] = "axial" if mixed.loc[first.idxmax(), "plane"] != \
        "axial" else "coronal"
    with pytest.raises(ValueError, match="plane"):
        prepare_factor_data(mixed)


def test_a_pair_intercept_with_one_question_per_pair_is_dropped():
    sparse = simulate_study(n_questions=300, n_trials=1, seed=3)  # 2,256 possible pairs
    data = prepare_factor_data(scored_table(sparse))
    assert "pair" not in data.group_codes and "pair" in data.dropped
    assert "volume" in data.group_codes


def test_volumes_and_pairs_are_found_nested_in_modality(study):
    data = prepare_factor_data(scored_table(study))
    assert data.nested["volume"] == ["modality"] and data.nested["pair"][0] == "modality"
    assert data.nested["question"] == []
    first = data.obs.drop_duplicates("question_id").set_index("question_id")
    vol_modality = first.groupby("volume_id")["modality"].first()
    blocks = pd.Series(data.group_blocks["volume"], index=data.levels["volume"])
    # one block per modality, and every volume in its modality's block
    assert blocks.groupby(vol_modality.loc[blocks.index].to_numpy()).nunique().eq(1).all()
    assert blocks.nunique() == 2
    assert (data.group_blocks["question"] == 0).all()


def test_pairs_split_into_single_structures_of_plane_questions_and_relation_pairs(study):
    # family is only partly nested in pair: the single structures of plane questions form
    # pairs of their own, which no relation question shares
    data = prepare_factor_data(scored_table(study))
    assert "family" in data.nested["pair"]
    single = np.array(["|" not in p for p in data.levels["pair"]])
    blocks = data.group_blocks["pair"]
    assert len(set(blocks[single]) & set(blocks[~single])) == 0
    assert len(data.block_labels["pair"]) == 4  # {CT, MRI} x {single, pair}
    assert all("family=plane" in data.block_labels["pair"][b] for b in set(blocks[single]))


def test_fixed_design_reproduces_the_zero_sum_effects_and_block_means(study):
    data = prepare_factor_data(scored_table(study))
    design = fixed_design(data)
    theta = np.random.default_rng(0).normal(size=design.matrix.shape[1])
    terms = {name: (theta[sl] if basis is None else basis @ theta[sl]).reshape(shape)
             for name, sl, basis, shape in design.blocks}
    assert abs(terms["family"].sum()) < 1e-12
    assert np.allclose(terms["convention:terminology"].sum(axis=0), 0)
    assert np.allclose(terms["convention:terminology"].sum(axis=1), 0)
    # the logit of a pattern is the sum of its levels' effects and its blocks' means
    pattern = design.pattern_of_row[0]
    row = data.obs.iloc[0]
    expect = terms["Intercept"] + sum(
        terms[f][data.levels[f].index(row[f])] for f in data.factors if pd.notna(row[f]))
    expect += sum(
        terms[f"{a}:{b}"][data.levels[a].index(row[a]), data.levels[b].index(row[b])]
        for a, b in data.interactions if pd.notna(row[a]) and pd.notna(row[b]))
    q = data.question_index[0]
    for g, (cells, sl) in design.group_means.items():
        # x sd_g in the model
        expect += cells.basis[cells.cell[data.group_codes[g][q]]] @ theta[sl]
    assert design.matrix[pattern] @ theta == pytest.approx(float(expect))
    # pair blocks: the basis is the block indicator over sqrt(levels)
    cells, _ = design.group_means["pair"]
    assert np.allclose(cells.basis, np.diag(1 / np.sqrt(cells.sizes)))
    # the transform's covariance is the inverse Hessian of the approximation
    cov = design.transform @ design.transform.T
    assert np.all(np.linalg.eigvalsh(cov) > 0)


def test_question_cells_span_every_question_level_factor_level_orthonormally(study):
    data = prepare_factor_data(scored_table(study))
    cells = group_cells(data, "question")
    v = cells.basis[cells.cell]  # [n_questions, n_dirs]
    assert np.allclose(v.T @ v, np.eye(v.shape[1]))
    # the indicator of a factor level (family=plane) lies in the span, so intercepts with
    # the projection removed sum to zero over the plane questions
    first = data.obs.drop_duplicates("question_id").set_index("question_id")
    plane = (first.loc[data.levels["question"], "family"] == "plane").to_numpy(float)
    assert np.allclose(v @ (v.T @ plane), plane)
    z = np.random.default_rng(1).normal(size=len(plane))
    assert abs(plane @ (z - v @ (v.T @ z))) < 1e-9


def test_structure_pair_ignores_order_and_keeps_single_structures():
    a = pd.Series(["liver", "spleen", "femur"])
    b = pd.Series(["spleen", "liver", None])
    assert structure_pair(a, b).tolist() == ["liver|spleen", "liver|spleen", "femur"]


def test_auto_centring_follows_trials_per_level(study):
    data = prepare_factor_data(scored_table(study))
    assert isinstance(data, FactorData)
    total = data.obs["n"].sum()
    per_level = {g: total / len(data.levels[g]) for g in data.group_codes}
    assert per_level["question"] == 20  # 2 models x 2 arms x 5 trials
    assert per_level["volume"] > 100
    assert resolve_centred(data, "auto", min_trials=21) == [
        g for g in data.group_codes if per_level[g] >= 21]
    assert "question" not in resolve_centred(data, "auto", min_trials=21)
    assert "question" in resolve_centred(data, "auto", min_trials=20)
    assert resolve_centred(data, ["volume"]) == ["volume"]
    with pytest.raises(ValueError, match="unknown group"):
        resolve_centred(data, ["questions"])


def test_load_scored_joins_question_columns(tmp_root, study):
    write_study(study, root=tmp_root, scored=False)
    paths = project_paths(tmp_root)
    paths.analysis.mkdir(parents=True)
    study.responses.to_parquet(paths.analysis / "scored.parquet")  # no factor columns
    scored = load_scored(tmp_root)
    assert len(scored) == len(study.responses)
    assert scored["convention"].notna().any() and "volume_id" in scored


def test_load_scored_scores_raw_results_when_stage06_has_not_run(tmp_root):
    small = simulate_study(n_questions=40, n_trials=1, seed=4)
    write_study(small, root=tmp_root, scored=False)
    scored = load_scored(tmp_root)
    assert len(scored) == len(small.responses)
    merged = scored.merge(small.responses, on=["model", "arm", "question_id", "trial"],
                          suffixes=("", "_sim"))
    assert (merged["correct"] == merged["correct_sim"]).all()
    assert not (project_paths(tmp_root).analysis / "scored.parquet").exists()


def test_stages_06_and_07_read_the_current_runs_and_skip_a_superseded_one(tmp_root):
    """A changed configuration leaves the old run folder on disk; stage 06 (scoring) and
    stage 07's fallback both read only the run the store marks current."""
    from mislib import scoring
    from mislib.analysis.stage import result_files
    from mislib.config import write_stamp
    from mislib.inference.store import stage_name

    small = simulate_study(n_questions=40, n_trials=1, seed=4)
    write_study(small, root=tmp_root, scored=False)
    paths = project_paths(tmp_root)
    current = sorted(p.name for p in paths.results.iterdir() if p.is_dir())
    # the superseded run of the first (model, arm): every answer flipped
    first = small.responses[small.responses["run_id"] == current[0]]
    old = paths.results / "superseded-run"
    old.mkdir()
    first.assign(run_id="superseded-run", correct=~first["correct"]).to_parquet(
        old / "responses.parquet", index=False)
    (old / "run.json").write_text((paths.results / current[0] / "run.json").read_text())
    for run_id in current:
        rows = small.responses[small.responses["run_id"] == run_id]
        write_stamp(paths.results, stage_name(rows["model"].iat[0], rows["arm"].iat[0]),
                    {"run": run_id}, [f"{run_id}/responses.parquet"])
    expected = [paths.results / r / "responses.parquet" for r in current]
    assert sorted(scoring.find_runs(tmp_root)) == expected
    assert sorted(result_files(paths)) == expected
    scored = load_scored(tmp_root)
    assert "superseded-run" not in set(scored["run_id"])
    assert len(scored) == len(small.responses)
    merged = scored.merge(small.responses, on=["model", "arm", "question_id", "trial"],
                          suffixes=("", "_sim"))
    assert (merged["correct"] == merged["correct_sim"]).all()
    # the freshness stamp digests the same files: the superseded run changes nothing
    before = stamp_params({"draws": 1}, paths)
    (old / "responses.parquet").write_bytes(b"changed")
    assert stamp_params({"draws": 1}, paths) == before


def test_missing_inputs_raise_naming_the_stage(tmp_root):
    with pytest.raises(FileNotFoundError, match="scored.parquet"):
        load_scored(tmp_root)


# ---- the fit ---------------------------------------------------------------------------------
def test_recovery_95_intervals_cover_the_true_effects(fitted, study):
    root, result = fitted
    truth = study.truth.set_index("term")["value"]
    est = result.effects.set_index("term").join(truth, how="inner")
    assert len(est) == len(result.effects)  # every fitted term has a true value
    inside = (est["lo95"] <= est["value"]) & (est["value"] <= est["hi95"])
    print(f"recovery: {inside.sum()}/{len(est)} = {inside.mean():.1%} of true effects inside "
          "their 95 % intervals")
    assert inside.mean() >= MIN_COVERAGE, est[~inside]
    # and the estimates track the truth, not just wide intervals
    assert np.corrcoef(est["mean"], est["value"])[0, 1] > 0.9
    assert (est["hi95"] - est["lo95"]).median() < 0.6
    sds = result.sds.set_index("term")
    for group, true_sd in study.sd.items():
        row = sds.loc[f"sd[{group}]"]
        assert row["lo95"] - 0.1 <= true_sd <= row["hi95"] + 0.1, (group, row)


def test_sampler_diagnostics_are_clean(fitted):
    _, result = fitted
    diag = result.diagnostics
    worst = result.effects.sort_values("r_hat").tail(3)[["term", "r_hat", "ess_bulk"]]
    report = f"{diag}\n{worst}\n{result.sds}"
    assert diag["divergences"] == 0, report
    assert diag["max_r_hat_fixed"] <= 1.01, report
    assert diag["max_r_hat"] <= 1.05, report
    assert diag["min_ess_bulk_fixed"] > 100, report


def test_factor_effects_file_has_the_contract_columns_and_term_names(fitted):
    root, result = fitted
    effects = pd.read_parquet(project_paths(root).analysis / "factor_effects.parquet")
    for col in ("term", "mean", "sd", "lo95", "hi95", "r_hat", "ess_bulk"):
        assert col in effects
    assert effects["term"].is_unique
    assert all(TERM_RE.match(t) for t in effects["term"]), effects["term"].tolist()
    terms = set(effects["term"])
    assert {"Intercept", "arm[semsam]", "dims[3d]", "family[plane]",
            "convention[storage]:terminology[colloquial]", "prompt[box]:terminology[anatomical]",
            f"arm[semsam]:model[{MODELS[1]}]"} <= terms
    assert (effects["lo95"] <= effects["mean"]).all() and (effects["mean"] <= effects["hi95"]).all()
    # sum-to-zero deviations: the levels of a factor cancel in every draw, so in the mean
    conv = effects[effects["term"].str.match(r"^convention\[[a-z]+\]$")]
    assert abs(conv["mean"].sum()) < 1e-8


def test_contrasts_name_the_claims_and_match_raw_accuracy(fitted, study):
    root, result = fitted
    contrasts = pd.read_parquet(project_paths(root).analysis / "contrasts.parquet")
    c = contrasts.set_index("contrast")
    for model in MODELS:
        gain = c.loc[f"p[arm=semsam,model={model}] - p[arm=baseline,model={model}]"]
        assert gain["kind"] == "difference" and gain["lo95"] <= gain["mean"] <= gain["hi95"]
    for name in ("p[convention=standard,terminology=colloquial] - "
                 "p[convention=standard,terminology=anatomical]",
                 "p[convention=storage,terminology=colloquial] - "
                 "p[convention=storage,terminology=anatomical]",
                 "p[prompt=box,terminology=colloquial] - p[prompt=mask,terminology=colloquial]",
                 "p[family=relation_3d] - p[family=relation_2d]", "p[dims=3d] - p[dims=2d]",
                 "p[ablation=text_only,terminology=anatomical]", "p[family=plane]"):
        assert name in c.index, name
    probs = c[c["kind"] != "difference"]
    assert probs[["mean", "lo95", "hi95"]].apply(lambda s: s.between(0, 1)).all().all()
    scored = scored_table(study)
    raw = scored.loc[scored["terminology"] == "colloquial", "correct"].mean()
    assert c.loc["p[terminology=colloquial]", "observed"] == pytest.approx(raw)
    assert c.loc["p[terminology=colloquial]", "n_trials"] == (
        scored["terminology"] == "colloquial").sum()
    # the model-based accuracy sits close to the raw one on data drawn from the model
    assert (probs["mean"] - probs["observed"]).abs().max() < 0.06


def test_posterior_predictive_check_covers_observed_cells(fitted):
    root, result = fitted
    ppc = pd.read_parquet(project_paths(root).analysis / "ppc.parquet")
    assert {"cell", "observed", "pp_lo95", "pp_hi95", "inside"} <= set(ppc.columns)
    assert ppc["inside"].mean() >= 0.85
    assert (ppc["pp_lo95"] <= ppc["pp_hi95"]).all()


def test_second_run_reuses_fresh_outputs_and_a_new_input_is_not_fresh(fitted):
    root, result = fitted
    again = run_factor_analysis("demo", root=root, progress=False, **FIT)
    assert again.reused and not result.reused
    pd.testing.assert_frame_equal(again.effects.reset_index(drop=True),
                                  result.effects.reset_index(drop=True), check_dtype=False)
    assert "Intercept" in again.posterior.posterior
    diag = json.loads((project_paths(root).analysis / "factor_diagnostics.json").read_text())
    assert diag["divergences"] == result.diagnostics["divergences"]
    paths = project_paths(root)
    before = stamp_params(result.params, paths)
    scored = pd.read_parquet(paths.analysis / "scored.parquet")
    scored.iloc[:-1].to_parquet(paths.analysis / "scored.parquet")
    assert stamp_params(result.params, paths) != before


def test_aggregate_trials_names_a_question_column_that_varies_between_trials():
    from mislib.analysis import aggregate_trials

    trials = pd.DataFrame({"model": "m", "arm": "baseline", "question_id": ["q1", "q1"],
                           "correct": [True, False], "family": ["plane", "relation_2d"]})
    with pytest.raises(ValueError, match="family"):
        aggregate_trials(trials, ["family"], with_pair=False)


def test_an_endpoint_decoded_model_is_not_pooled_with_its_local_runs():
    from mislib.analysis import aggregate_trials

    trials = pd.DataFrame({"model": "m", "arm": "baseline", "question_id": "q1",
                           "correct": [True, False, False, False],
                           "backend": ["hf", "vllm", "openai", "openai"], "family": "plane"})
    obs = aggregate_trials(trials, ["family"], with_pair=False).set_index("model")
    assert obs.loc["m", ["n", "k"]].tolist() == [2, 1]
    assert obs.loc["m via openai", ["n", "k"]].tolist() == [2, 0]


def test_settings_from_params_splits_the_profile_table_and_ignores_other_keys():
    from mislib.analysis import ModelSpec, SamplerSettings, settings_from_params

    spec, sampler = settings_from_params({"profile": "demo", "draws": 10, "centred": "auto",
                                          "prior_sd": 2.0, "seed": 3})
    assert spec == ModelSpec(centred="auto", prior_sd=2.0)
    assert sampler == SamplerSettings(draws=10, seed=3)


@pytest.mark.parametrize("module", ["data", "design", "model", "fit", "contrasts", "stage",
                                    "recovery"])
def test_docstring_examples_of_the_analysis_package_run(module):
    import doctest
    import importlib

    import mislib.analysis

    assert doctest.testmod(importlib.import_module(f"mislib.analysis.{module}")).failed == 0
    assert doctest.testmod(mislib.analysis).failed == 0


def test_a_forced_refit_that_fails_while_writing_keeps_the_old_outputs_fresh(
        fitted, tmp_path, monkeypatch):
    """Stage 07 writes through mislib.stage: an error at any write of a forced rerun (here
    between the tables, or in the posterior) replaces nothing, and the old outputs stay
    fresh for their stamp."""
    import dataclasses
    import shutil

    import xarray as xr

    from mislib.analysis import stage as analysis_stage

    source, result = fitted
    root = tmp_path / "root"
    shutil.copytree(source, root)
    monkeypatch.setattr(analysis_stage, "fit_factor_model", lambda *a, **k: result)
    run_factor_analysis("demo", root=root, progress=False, force=True, **FIT)
    out = project_paths(root).analysis

    def state():
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
                if p.is_file() and not p.name.startswith(".analysis.")}

    before = state()
    # the forced reruns "fit" other numbers, so a table written in place would show
    other = dataclasses.replace(result, effects=result.effects.assign(
        mean=result.effects["mean"] + 1.0))
    monkeypatch.setattr(analysis_stage, "fit_factor_model", lambda *a, **k: other)
    real_parquet, real_zarr = pd.DataFrame.to_parquet, xr.DataTree.to_zarr
    for owner, name, real, fail_at in ((pd.DataFrame, "to_parquet", real_parquet, 2),
                                       (pd.DataFrame, "to_parquet", real_parquet, 4),
                                       (xr.DataTree, "to_zarr", real_zarr, 1)):
        calls = []

        def failing(*args, _real=real, _at=fail_at, _calls=calls, **kwargs):
            _calls.append(1)
            if len(_calls) == _at:
                raise OSError("disk full")
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, failing)
        with pytest.raises(OSError, match="disk full"):
            run_factor_analysis("demo", root=root, progress=False, force=True, **FIT)
        monkeypatch.setattr(owner, name, real)
        assert state() == before, f"{name} failing at call {fail_at}"
        assert run_factor_analysis("demo", root=root, progress=False, **FIT).reused


# ---- diagnostics that bind ------------------------------------------------------------------
def _diag(**changes):
    """A fit's diagnostics with every check passing, then ``changes``."""
    ok = {"max R-hat": 1.002, "min bulk ESS": 900.0, "min tail ESS": 700.0, "worst": "x"}
    d = {"divergences": 0, "chains": 2, "tune": 500, "draws": 500, "target_accept": 0.8,
         "centred": [], "groups": {"question": 600, "volume": 60},
         "trials_per_level": {"question": 20.0, "volume": 400.0},
         "parts": {"fixed effects": dict(ok), "sd[question]": dict(ok), "sd[volume]": dict(ok),
                   "intercepts[question]": dict(ok), "intercepts[volume]": dict(ok),
                   "intercept means[volume]": dict(ok)}}
    for key, value in changes.items():
        if key in d["parts"]:
            d["parts"][key] = {**d["parts"][key], **value}
        else:
            d[key] = value
    return d


def test_convergence_checks_fail_on_r_hat_ess_or_divergences_and_say_where():
    from mislib.analysis import ESS_MIN_PER_CHAIN, RHAT_MAX, convergence_checks
    from mislib.analysis.fit import convergence_problems

    assert convergence_checks(_diag())["ok"].all()
    bad = {"R-hat": _diag(**{"sd[volume]": {"max R-hat": RHAT_MAX + 0.005}}),
           "bulk ESS": _diag(**{"fixed effects": {"min bulk ESS": 2 * ESS_MIN_PER_CHAIN - 1}}),
           "tail ESS": _diag(**{"intercept means[volume]": {"min tail ESS": 50.0}}),
           "divergent": _diag(divergences=3)}
    for word, diag in bad.items():
        problems = convergence_problems(convergence_checks(diag))
        assert len(problems) == 1 and word in problems[0], (word, problems)
    # the bound scales with the chains (100 per chain); single intercepts' ESS is not bound
    assert not convergence_checks(_diag(chains=4, **{"fixed effects": {"min bulk ESS": 300.0}})
                                  )["ok"].all()
    assert convergence_checks(_diag(**{"intercepts[question]": {"min bulk ESS": 5.0}}))["ok"].all()


def test_convergence_advice_names_target_accept_the_group_and_longer_chains():
    from mislib.analysis import convergence_advice

    assert convergence_advice(_diag()) == []
    divergent = " ".join(convergence_advice(_diag(divergences=4)))
    assert "target_accept" in divergent and "0.95" in divergent
    volume = convergence_advice(_diag(**{"sd[volume]": {"max R-hat": 1.03}}))
    assert any("group volume" in a and "centred = ['volume']" in a for a in volume), volume
    assert any("tune = 1000" in a and "draws = 1000" in a for a in volume), volume
    # a centred group with many trials per level stays centred (no advice to flip back)
    already = convergence_advice(_diag(centred=["volume"], **{"intercepts[volume]": {
        "max R-hat": 1.03}}))
    assert any("keep it" in a for a in already) and not any("drop" in a for a in already)
    sparse = convergence_advice(_diag(centred=["question"], **{"sd[question]": {
        "max R-hat": 1.03}}))
    assert any("drop 'question'" in a for a in sparse), sparse
    few = convergence_advice(_diag(groups={"question": 600, "volume": 10},
                                   **{"sd[volume]": {"max R-hat": 1.03}}))
    assert any("only 10 levels" in a for a in few), few
    # a group of few trials per level is not sent to the centred form
    few = convergence_advice(_diag(**{"sd[question]": {"max R-hat": 1.03}}))
    assert not any("centred = ['question']" in a for a in few), few
    assert any("group question" in a and "lengthen" in a for a in few), few


@pytest.fixture(scope="module")
def unconverged(tmp_path_factory):
    """Stage 07 on a study sampled far too briefly (30 draws): it cannot pass its checks."""
    root = tmp_path_factory.mktemp("short")
    small = simulate_study(n_questions=150, n_trials=2, seed=5)
    write_study(small, root=root, scored=True)
    return root, run_factor_analysis("demo", root=root, progress=False, draws=30, tune=30,
                                     groups=["question"])


def test_a_fit_that_did_not_converge_is_flagged_on_disk_with_reasons_and_advice(unconverged):
    from mislib.analysis import read_convergence

    root, fa = unconverged
    assert fa.converged is False
    verdict = read_convergence(root)
    assert verdict["converged"] is False and verdict["convergence_problems"]
    assert any("ESS" in p for p in verdict["convergence_problems"])
    assert any("draws" in a for a in verdict["advice"])
    assert verdict["thresholds"]["ess_bulk_min"] == 200 and verdict["thresholds"]["r_hat_max"] == 1.01
    # read back, the verdict is the same
    again = run_factor_analysis("demo", root=root, progress=False, draws=30, tune=30,
                                groups=["question"])
    assert again.reused and again.converged is False
    assert read_convergence(root.parent / "nothing-here") is None


def test_figures_of_a_fit_that_did_not_converge_are_stamped_not_converged(unconverged):
    from mislib.analysis import convergence_report, fit_provenance
    from mislib.plots import factor_analysis_figures, save_figure

    root, fa = unconverged
    prov = fit_provenance(fa, "demo", root=root)
    assert prov.converged is False and prov.simulated
    fig = factor_analysis_figures(fa, "short")["forest"]
    save_figure(fig, "forest", root=root, notebook="07_factor_analysis", provenance=prov)
    assert any(t.get_text() == "NOT CONVERGED" for t in fig.texts)
    assert (root / "figures").rglob("07_forest.png")
    report = convergence_report(fa.diagnostics)
    assert report.startswith("**NOT CONVERGED**") and "What to change" in report


def test_the_well_specified_fit_passes_its_convergence_checks(fitted):
    from mislib.analysis import convergence_checks

    _, result = fitted
    checks = convergence_checks(result.diagnostics)
    assert result.converged, checks[~checks["ok"]]
    assert result.diagnostics["convergence_problems"] == []
    # the summary's minima are those of what the checks read: a converged fit reports none
    # below its bounds
    thresholds = result.diagnostics["thresholds"]
    assert result.diagnostics["min_ess_bulk"] >= thresholds["ess_bulk_min"]
    assert result.diagnostics["min_ess_tail"] >= thresholds["ess_tail_min"]


# ---- a predictive check that can fail ----------------------------------------------------
@pytest.fixture(scope="module")
def reversal():
    """A study with a strong convention × terminology reversal, fitted by a model with the
    interaction and by one without it (everything else the same)."""
    from mislib.analysis import ModelSpec, SamplerSettings, fit_factor_model

    effects = {("convention", "terminology"): {("standard", "anatomical"): 0.6,
                                               ("standard", "colloquial"): -0.6,
                                               ("storage", "anatomical"): -0.6,
                                               ("storage", "colloquial"): 0.6}}
    study = simulate_study(n_questions=400, n_trials=3, seed=8, interactions=effects)
    scored = scored_table(study)
    sampler = SamplerSettings(draws=400, tune=400, seed=1)
    fits = {}
    for name, inter in (("with", ["convention:terminology"]), ("without", [])):
        spec = ModelSpec(interactions=inter, groups=("question",))
        fits[name] = fit_factor_model(scored, spec, sampler, progress=False)
    return fits


def test_the_predictive_check_flags_an_interaction_the_model_omits(reversal):
    ppc = reversal["without"].ppc.set_index("cell")
    cells = ppc[ppc["factors"] == "convention:terminology"]
    assert len(cells) == 4 and not cells["in_model"].any()  # checked though not in the model
    assert not cells["inside"].any(), cells
    assert (cells["p_value"] < 0.05).all()
    assert cells.loc["p[convention=standard,terminology=anatomical]", "residual"] > 0.05
    assert cells.loc["p[convention=storage,terminology=anatomical]", "residual"] < -0.05
    assert set(cells.index) <= set(reversal["without"].diagnostics["ppc_outside"])


def test_the_predictive_check_passes_the_model_with_the_interaction(reversal):
    ppc = reversal["with"].ppc
    cells = ppc[ppc["factors"] == "convention:terminology"]
    assert cells["in_model"].all() and cells["inside"].all(), cells
    assert (~ppc["inside"]).mean() <= 0.1, ppc[~ppc["inside"]]
    # the residual's band is centred on the replicates' mean; inside means within it
    assert ((ppc["res_lo95"] <= 0) & (0 <= ppc["res_hi95"])).all()
    within = (ppc["res_lo95"] <= ppc["residual"]) & (ppc["residual"] <= ppc["res_hi95"])
    assert (within == ppc["inside"]).all()
    assert ((ppc["pp_lo95"] <= ppc["pp_mean"]) & (ppc["pp_mean"] <= ppc["pp_hi95"])).all()


def test_check_cells_cover_every_level_and_skip_null_rows():
    from mislib.analysis import check_cells

    check = pd.DataFrame({"terminology": ["anatomical", None, "colloquial"],
                          "convention": ["standard", "storage", "storage"]})
    cells = {name: mask.tolist() for name, _, mask in
             check_cells(check, ["convention:terminology"])}
    assert cells["p[terminology=anatomical]"] == [True, False, False]
    assert cells["p[convention=storage,terminology=colloquial]"] == [False, False, True]
    assert "p[convention=storage,terminology=anatomical]" not in cells  # no such row


# ---- the recovery study --------------------------------------------------------------------
@pytest.fixture(scope="module")
def recovery(tmp_path_factory):
    """The recovery study exactly as notebook 07 runs it in the demo."""
    from mislib.analysis import run_recovery

    root = tmp_path_factory.mktemp("recovery")
    return root, run_recovery("demo", root=root, progress=False, **NOTEBOOK_RECOVERY)


def test_the_recovery_study_finds_the_planted_effects_without_bias(recovery):
    """The verdict is the calibration test (planted effects as a whole where the posterior
    puts them), which a biased recovery fails; the coverage of one fit is shown, not judged:
    it scatters with the seed (88-100 % over seeds 1-8, bench/RESULTS.md)."""
    root, rec = recovery
    table = pd.read_parquet(project_paths(root).analysis / "recovery.parquet")
    assert list(table.columns[:5]) == ["term", "planted", "mean", "lo95", "hi95"]
    cal = rec.diagnostics["calibration"]
    print(f"recovery study: {int(table['covered'].sum())}/{len(table)} = "
          f"{table['covered'].mean():.1%} of planted effects inside their 95 % intervals; "
          f"calibration d² {cal['distance2']:.1f} on {cal['df']} df, p {cal['p_value']:.3f}; "
          f"fit {rec.diagnostics['seconds']}; converged {rec.converged}")
    assert rec.unbiased and cal["p_value"] >= cal["alpha"] == 0.001, cal
    # the free coordinates: the intercept, k - 1 per factor of k levels and (k1 - 1)(k2 - 1)
    # per interaction (25 of the 51 terms at the notebook's study)
    levels: dict[str, set] = {}
    for term in table["term"]:
        for part in term.split(":"):
            if "[" in part:
                factor, level = part[:-1].split("[")
                levels.setdefault(factor, set()).add(level)
    interactions = {tuple(p.split("[")[0] for p in t.split(":")) for t in table["term"]
                    if ":" in t}
    expected_df = 1 + sum(len(v) - 1 for v in levels.values()) + sum(
        (len(levels[a]) - 1) * (len(levels[b]) - 1) for a, b in interactions)
    assert cal["df"] == expected_df < len(table), (cal["df"], expected_df)
    assert rec.coverage == pytest.approx(table["covered"].mean())
    # The issue's acceptance, for the study notebook 07 runs (its seed): >= 90 % covered. One
    # study's coverage scatters with the seed (45-51 of 51 over seeds 1-8, bench/RESULTS.md),
    # so the bias verdict is the calibration test above, not this count.
    assert rec.coverage >= 0.9, table[~table["covered"]]
    assert np.corrcoef(table["mean"], table["planted"])[0, 1] > 0.9  # not just wide intervals
    planted = table.set_index("term")["planted"]
    # the paper's findings are planted, the no-prompt level among them
    assert planted["convention[standard]:terminology[anatomical]"] > 0
    assert planted["convention[storage]:terminology[anatomical]"] < 0
    assert planted["prompt[none]:terminology[anatomical]"] > 0
    assert planted["prompt[box]:terminology[anatomical]"] < 0
    assert planted["ablation[text_only]:terminology[anatomical]"] > 0
    assert planted["arm[semsam]"] > 0
    assert rec.converged, rec.diagnostics["convergence_problems"]


def _sum_to_zero_posterior(n_draws=4000, seed=0):
    """Draws of two sum-to-zero factors (3 and 2 levels) and an intercept, like the fit's:
    correlated, with zero variance along each factor's sum."""
    rng = np.random.default_rng(seed)
    truth = np.array([0.4, 0.3, -0.1, -0.2, 0.25, -0.25])
    free = rng.normal(0.0, 1.0, (n_draws, 4)) @ np.array(
        [[0.08, 0.0, 0.0, 0.0], [0.0, 0.06, 0.03, 0.0], [0.0, 0.0, 0.05, 0.0],
         [0.02, 0.0, 0.0, 0.04]])
    f3 = np.array([[1, 0], [-0.5, np.sqrt(3) / 2], [-0.5, -np.sqrt(3) / 2]]) * np.sqrt(2 / 3)
    draws = np.column_stack([free[:, 0], free[:, 1:3] @ f3.T,
                             free[:, 3:4] * np.array([[1.0, -1.0]]) / np.sqrt(2)])
    return draws + truth, truth


def test_calibration_accepts_an_unbiased_posterior_and_rejects_biased_ones():
    from mislib.analysis.recovery import calibration

    draws, truth = _sum_to_zero_posterior()
    # posterior mean a typical sampling error away from the truth: accepted
    rng = np.random.default_rng(1)
    spread = draws - draws.mean(0)
    planted = truth + spread[rng.integers(len(draws))]
    ok = calibration(draws, planted)
    assert ok["df"] == 4 and ok["unbiased"]
    # recovered at 60 % of the planted sizes, or one effect found 6 SDs off: rejected
    shrunk = calibration(draws, np.r_[truth[0], truth[1:] / 0.6])
    assert not shrunk["unbiased"] and shrunk["p_value"] < 0.001
    off = planted.copy()
    off[4:] += np.array([1.0, -1.0]) * 6 * spread[:, 4].std()
    assert not calibration(draws, off)["unbiased"]
    # a planted vector not centred like the model's breaks a constraint: infinitely far
    uncentred = calibration(draws, truth + np.r_[0, 0.1, 0.1, 0.1, 0, 0])
    assert uncentred["distance2"] == np.inf and not uncentred["unbiased"]
    with pytest.raises(ValueError, match="n_terms"):
        calibration(draws, truth[:3])


def test_the_recovery_study_is_reused_when_fresh_and_drawn_with_its_coverage(recovery):
    from mislib.analysis import run_recovery
    from mislib.plots import recovery_figure
    from mislib.simulate import HEADLINE_TERMS

    root, rec = recovery
    again = run_recovery("demo", root=root, progress=False, **NOTEBOOK_RECOVERY)
    assert again.reused and again.coverage == rec.coverage
    assert again.unbiased == rec.unbiased
    fig = recovery_figure(again.table, headline=HEADLINE_TERMS,
                          calibration=again.diagnostics["calibration"])
    n_in = int(again.table["covered"].sum())
    assert f"{n_in} of {len(again.table)}" in fig._suptitle.get_text()
    assert "calibration d²" in fig._suptitle.get_text()
    assert ("no sign of bias" if rec.unbiased else "BIASED") in fig._suptitle.get_text()
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == list(HEADLINE_TERMS)
    prov = again.provenance("demo")
    assert prov.simulated and prov.converged == rec.converged
    assert prov.n_questions_asked == NOTEBOOK_RECOVERY["n_questions"]


def test_the_recovery_settings_tested_are_the_notebooks_and_the_defaults():
    from mislib.analysis.recovery import DEFAULTS
    from mislib.paths import REPO_ROOT

    text = (REPO_ROOT / "notebooks" / "07_factor_analysis.py").read_text()
    names = {"n_questions": "recovery_questions", "n_trials": "recovery_trials",
             "draws": "recovery_draws", "seed": "recovery_seed"}
    for key, name in names.items():
        found = re.search(rf"^{name} = (\d+)", text, re.MULTILINE)
        assert found and int(found.group(1)) == NOTEBOOK_RECOVERY[key] == DEFAULTS[key], name


def test_every_figure_notebook_07_saves_carries_the_provenance_stamp():
    """Notebook 07 saves figures only through plots.save_figure, each with provenance= (the
    stamp names the runs and says NOT CONVERGED for a fit that did not converge)."""
    import ast

    from mislib.paths import REPO_ROOT

    tree = ast.parse((REPO_ROOT / "notebooks" / "07_factor_analysis.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    name = lambda c: getattr(c.func, "attr", getattr(c.func, "id", ""))  # noqa: E731
    assert not [c for c in calls if name(c) in ("savefig", "figure_path")]
    saves = [c for c in calls if name(c) == "save_figure"]
    assert len(saves) == 2  # the fit's figures and the recovery figure
    assert all("provenance" in {k.arg for k in c.keywords} for c in saves)


def test_recovery_table_names_a_term_with_no_planted_value():
    from mislib.analysis import recovery_table

    truth = pd.DataFrame({"term": ["Intercept"], "value": [0.4]})
    effects = pd.DataFrame({"term": ["Intercept", "dims[2d]"], "mean": [0.3, 0.0],
                            "lo95": [0.1, -0.1], "hi95": [0.5, 0.1]})
    with pytest.raises(ValueError, match=r"dims\[2d\]"):
        recovery_table(truth, effects)


def test_the_recovery_study_is_redone_when_its_planted_effects_change(tmp_path, monkeypatch):
    """The planted effects (mislib.simulate's defaults) are the study's input: a study
    fitted to other effects is not read back as fresh (the stamp held only the sizes and
    the model, so recovery.parquet kept the old planted values)."""
    import mislib.simulate
    from mislib.analysis import run_recovery

    small = {"n_questions": 200, "n_trials": 2, "draws": 40, "tune": 40, "chains": 1}
    first = run_recovery("demo", root=tmp_path, progress=False, **small)
    assert run_recovery("demo", root=tmp_path, progress=False, **small).reused
    main = {k: dict(v) for k, v in mislib.simulate.DEFAULT_MAIN.items()}
    main["convention"] = {"standard": 0.5, "storage": -0.5}
    monkeypatch.setattr(mislib.simulate, "DEFAULT_MAIN", main)
    again = run_recovery("demo", root=tmp_path, progress=False, **small)
    assert not again.reused
    planted = again.table.set_index("term")["planted"]
    assert planted["convention[standard]"] == pytest.approx(0.5)
    assert first.table.set_index("term")["planted"]["convention[standard]"] != 0.5
