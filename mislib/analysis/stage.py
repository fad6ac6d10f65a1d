"""Stage 07 on disk: read the scored trials, fit, write ``data/analysis/``, reuse when fresh.

:func:`run_factor_analysis` is what notebook 07 calls. It reads stage 06's
``scored.parquet`` (or scores the raw results itself when stage 06 has not run), fits the
model with the profile's ``[analysis]`` settings, writes the tables, diagnostics and a small
posterior, and stamps them; a second call with the same settings and input reads them back.

>>> fa = run_factor_analysis("demo")                               # doctest: +SKIP
>>> fa.reused, fa.diagnostics["rhat_ok"]                           # doctest: +SKIP
(True, True)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mislib.analysis.data import FACTORS, FactorData, prepare_factor_data
from mislib.analysis.fit import FactorFit, fit_factor_model, settings_from_params
from mislib.config import file_digest, stage_params
from mislib.paths import (
    CONTRASTS_FILE,
    FACTOR_DIAGNOSTICS_FILE,
    FACTOR_EFFECTS_FILE,
    FACTOR_POSTERIOR_FILE,
    FACTOR_SD_FILE,
    PPC_FILE,
    QUESTIONS_FILE,
    SCORED_FILE,
    project_paths,
)
from mislib.stage import StageRun
from mislib.vocabulary import TRIAL_FACTORS

log = logging.getLogger(__name__)

#: What stage 07 writes under ``data/analysis/``.
OUTPUTS = (FACTOR_EFFECTS_FILE, FACTOR_SD_FILE, CONTRASTS_FILE, PPC_FILE,
           FACTOR_DIAGNOSTICS_FILE, FACTOR_POSTERIOR_FILE)
#: Bumped when the outputs' contents change (2: convergence verdict in the diagnostics,
#: misfit scale in ppc.parquet), so outputs of an older mislib are refitted, not read.
OUTPUTS_VERSION = 2
#: The interactions and factors whose contrasts carry the paper's claims.
CLAIM_CONTRAST_FACTORS = ("arm:model", "convention:terminology", "prompt:terminology",
                          "ablation:terminology", "dims", "family")


def load_scored(root: str | os.PathLike | None = None,
                runs: Sequence[str] | None = None) -> pd.DataFrame:
    """Scored trials with their question factors, as stage 06 left them.

    Reads ``data/analysis/scored.parquet``; question columns it lacks are joined from
    ``data/benchmark/questions.parquet``. Without a scored table, the runs stage 06 would
    score (:func:`mislib.scoring.find_runs`: the named ``runs``, else the store's current
    run of each (model, arm), never a superseded one) are scored with :mod:`mislib.scoring`.
    """
    paths = project_paths(root)
    scored_path = paths.analysis / SCORED_FILE
    if scored_path.is_file():
        scored = pd.read_parquet(scored_path)
        source = scored_path
    else:
        scored = _score_results(paths, runs)
        source = paths.results
    question_cols = {*FACTORS, "component_a", "component_b", "volume_id"} - set(TRIAL_FACTORS)
    missing = sorted(question_cols - set(scored.columns))
    if missing:
        qpath = paths.benchmark / QUESTIONS_FILE
        if not qpath.is_file():
            raise FileNotFoundError(f"{source} lacks {missing} and there is no {qpath} to "
                                    "join them from")
        questions = pd.read_parquet(qpath, columns=["question_id", *missing])
        scored = scored.merge(questions, on="question_id", how="left", validate="many_to_one")
        unmatched = int(scored[missing[0]].isna().all()) if len(scored) else 0
        if unmatched:
            raise ValueError(f"no question of {source} is in {qpath}")
    return scored


def result_files(paths, runs: Sequence[str] | None = None) -> list[Path]:
    """The ``responses.parquet`` stage 06 reads (:func:`mislib.scoring.find_runs`); [] if none.

    Stage 07 reads results through this one function, so its fallback scoring and its
    freshness stamp see the same runs as stage 06: the store's current runs.
    """
    from mislib.scoring import find_runs

    try:
        return find_runs(paths.root, runs)
    except FileNotFoundError:
        return []


def _score_results(paths, runs: Sequence[str] | None = None) -> pd.DataFrame:
    """Score the runs stage 06 would score with its parser (nothing written)."""
    from mislib import scoring

    files = result_files(paths, runs)
    qpath = paths.benchmark / QUESTIONS_FILE
    if not files or not qpath.is_file():
        raise FileNotFoundError(
            f"nothing to analyse: no {paths.analysis / SCORED_FILE} (stage 06) and no "
            f"{paths.results}/*/responses.parquet with {qpath} (stages 03-04); run notebooks "
            "04 and 06 first")
    log.warning("no %s: scoring %d run(s) under %s with mislib.scoring",
                paths.analysis / SCORED_FILE, len(files), paths.results)
    rescored = scoring.rescore(scoring.load_responses(files), pd.read_parquet(qpath))
    # As stage 06 does: only records the model answered are scored.
    if "answered" in rescored:
        rescored = rescored[rescored["answered"]].reset_index(drop=True)
    return rescored


def write_outputs(fit: FactorFit, out_dir: str | os.PathLike) -> list[Path]:
    """Write the tables, diagnostics and the small posterior of a fit to ``out_dir``."""
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["term", "mean", "sd", "lo95", "hi95", "r_hat", "ess_bulk", "ess_tail"]
    fit.effects[cols].to_parquet(out / FACTOR_EFFECTS_FILE, index=False)
    fit.sds[cols].to_parquet(out / FACTOR_SD_FILE, index=False)
    fit.contrasts.to_parquet(out / CONTRASTS_FILE, index=False)
    fit.ppc.to_parquet(out / PPC_FILE, index=False)
    (out / FACTOR_DIAGNOSTICS_FILE).write_text(json.dumps(fit.diagnostics, indent=2,
                                                            default=str))
    zpath = out / FACTOR_POSTERIOR_FILE
    if zpath.exists():
        shutil.rmtree(zpath)
    fit.posterior.to_zarr(zpath, consolidated=False)
    return [out / name for name in OUTPUTS]


@dataclass
class FactorAnalysis:
    """What notebook 07 shows: the tables, diagnostics, posterior and coded data."""

    effects: pd.DataFrame
    sds: pd.DataFrame
    contrasts: pd.DataFrame
    ppc: pd.DataFrame
    diagnostics: dict[str, Any]
    posterior: Any
    data: FactorData
    params: dict[str, Any]
    reused: bool

    @property
    def converged(self) -> bool:
        """Whether the fit passed every convergence check (``factor_diagnostics.json``)."""
        return bool(self.diagnostics["converged"])


def stamp_params(params: Mapping[str, Any], paths,
                 runs: Sequence[str] | None = None) -> dict[str, Any]:
    """The stage parameters plus a digest of the input, so re-scored trials are refitted."""
    scored_path = paths.analysis / SCORED_FILE
    if scored_path.is_file():
        digest = file_digest(scored_path)
    else:
        digest = "|".join(f"{p.relative_to(paths.results)}:{file_digest(p)}"
                          for p in result_files(paths, runs))
    return dict(params, input=digest, outputs_version=OUTPUTS_VERSION)


def run_factor_analysis(profile: str | Mapping[str, Any] = "demo",
                        root: str | os.PathLike | None = None, force: bool = False,
                        progress: bool = True, **overrides: Any) -> FactorAnalysis:
    """Stage 07: fit the factor model to ``scored.parquet`` and write ``data/analysis/``.

    Parameters
    ----------
    profile : profile name or mapping; its ``[analysis]`` table sets the model and sampler.
    root : project root (default: the repository, or ``$MISGROUND_ROOT``).
    force : refit even when the outputs exist for the same parameters and input.
    progress : show the sampler's progress bar.
    **overrides : single ``[analysis]`` keys (``None`` keeps the profile's value).

    Returns
    -------
    FactorAnalysis; ``reused`` says whether the outputs on disk were fresh and read back.
    """
    params = stage_params(profile, "analysis", **overrides)
    paths = project_paths(root)
    runs = stage_params(profile, "scoring").get("runs")  # stage 06's choice of runs
    scored = load_scored(paths.root, runs)
    stamp = stamp_params(params, paths, runs)
    out = paths.analysis
    spec, sampler = settings_from_params(params)
    run = StageRun(out, "analysis", stamp, OUTPUTS)  # mislib.stage
    if not force and run.fresh():
        data = prepare_factor_data(scored, spec.factors, spec.interactions, spec.groups)
        return read_outputs(out, data, params)
    fit = fit_factor_model(scored, spec, sampler, progress=progress)
    with run:  # tables, diagnostics and posterior moved in together, the stamp last
        write_outputs(fit, run.staging)
    if fit.converged:
        log.info("factor model converged: %d divergences, max R-hat %.4f, min bulk ESS %.0f",
                 fit.diagnostics["divergences"], fit.diagnostics["max_r_hat"],
                 fit.diagnostics["min_ess_bulk"])
    else:
        log.warning("factor model NOT CONVERGED: %s. What to change: %s (%s)",
                    "; ".join(fit.diagnostics["convergence_problems"]),
                    "; ".join(fit.diagnostics["advice"]),
                    paths.analysis / FACTOR_DIAGNOSTICS_FILE)
    return FactorAnalysis(effects=fit.effects, sds=fit.sds, contrasts=fit.contrasts,
                          ppc=fit.ppc, diagnostics=fit.diagnostics, posterior=fit.posterior,
                          data=fit.data, params=params, reused=False)


def read_outputs(out_dir: str | os.PathLike, data: FactorData,
                 params: Mapping[str, Any]) -> FactorAnalysis:
    """The outputs :func:`write_outputs` wrote to ``out_dir``, as a reused FactorAnalysis."""
    import xarray as xr

    out = Path(out_dir)
    posterior = xr.open_datatree(out / FACTOR_POSTERIOR_FILE, engine="zarr",
                                 consolidated=False).load()
    return FactorAnalysis(
        effects=pd.read_parquet(out / FACTOR_EFFECTS_FILE),
        sds=pd.read_parquet(out / FACTOR_SD_FILE),
        contrasts=pd.read_parquet(out / CONTRASTS_FILE),
        ppc=pd.read_parquet(out / PPC_FILE),
        diagnostics=read_diagnostics(out / FACTOR_DIAGNOSTICS_FILE),
        posterior=posterior, data=data, params=dict(params), reused=True)



def diagnostics_summary(diagnostics: Mapping[str, Any]) -> pd.Series:
    """The convergence figures a reader checks before any effect, as one labelled column.

    >>> d = {"n_trials": 10, "n_obs": 4, "n_questions": 2, "groups": {"question": 2},
    ...      "centred": [], "chains": 2, "draws": 100, "tune": 50, "divergences": 0,
    ...      "max_r_hat": 1.0041, "max_r_hat_fixed": 1.002, "min_ess_bulk": 812.3,
    ...      "min_ess_tail": 301.0, "mean_tree_depth": 3.14, "seconds": {"total": 9.5},
    ...      "dropped": {}, "converged": True, "convergence_problems": [],
    ...      "target_accept": 0.8}
    >>> s = diagnostics_summary(d)
    >>> s["chains × draws"], s["converged"]
    ('2 × 100 (+50 warm-up)', 'yes')
    """
    d = diagnostics
    return pd.Series({
        "converged": "yes" if d["converged"] else
        "NO: " + "; ".join(d["convergence_problems"]),
        "trials": d["n_trials"], "(model, arm, question) rows": d["n_obs"],
        "questions": d["n_questions"],
        **{f"levels of {g}": n for g, n in d["groups"].items()},
        "centred groups": ", ".join(d["centred"]) or "none",
        "chains × draws": f"{d['chains']} × {d['draws']} (+{d['tune']} warm-up)",
        "target_accept": d["target_accept"],
        "divergences": d["divergences"], "max R-hat (all)": round(d["max_r_hat"], 4),
        "max R-hat (fixed effects)": round(d["max_r_hat_fixed"], 4),
        "min bulk ESS": round(d["min_ess_bulk"]), "min tail ESS": round(d["min_ess_tail"]),
        "mean tree depth": round(d["mean_tree_depth"], 2),
        "fit seconds": d["seconds"]["total"], "dropped terms": d["dropped"] or "none",
    }, name="value")


def convergence_report(diagnostics: Mapping[str, Any], what: str = "the factor model") -> str:
    """The verdict on a fit as Markdown: converged, or the failed checks and what to change.

    >>> print(convergence_report({"converged": True, "chains": 2, "draws": 500,
    ...                           "max_r_hat": 1.004, "min_ess_bulk": 612.0,
    ...                           "min_ess_tail": 420.0, "divergences": 0}))
    **Converged**: the factor model's 2 chains × 500 draws agree (max R-hat 1.004, min bulk ESS 612, min tail ESS 420, no divergences).
    """
    d = diagnostics
    if d["converged"]:
        return (f"**Converged**: {what}'s {d['chains']} chains × {d['draws']} draws agree "
                f"(max R-hat {d['max_r_hat']:.3f}, min bulk ESS {d['min_ess_bulk']:.0f}, "
                f"min tail ESS {d['min_ess_tail']:.0f}, no divergences).")
    lines = [f"**NOT CONVERGED**: {what}'s effects, contrasts and predictive check below "
             "are not to be trusted, and its figures are stamped NOT CONVERGED. Failed "
             "checks:", ""]
    lines += [f"- {problem}" for problem in d["convergence_problems"]]
    lines += ["", "What to change (profile `[analysis]`, or this notebook's parameters), "
              "then rerun:", ""]
    lines += [f"- {item}" for item in d["advice"]]
    return "\n".join(lines)


def read_diagnostics(path: str | os.PathLike) -> dict[str, Any]:
    """A fit's diagnostics as stage 07 wrote them: ``factor_diagnostics.json`` of the fit, or
    ``recovery_diagnostics.json`` of the recovery study.

    The one reader of these files (stage 07's reuse, the recovery study's, stage 08's
    claims), so every reader takes the same ``converged`` verdict from them.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        When it is not a JSON object, or has no ``converged`` verdict (written by a mislib
        before the convergence checks: rerun stage 07); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run stage 07 (07_factor_analysis)")
    try:
        diag = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rerun stage 07 "
                         "(07_factor_analysis)") from None
    if not isinstance(diag, dict):
        raise ValueError(f"{path} holds a {type(diag).__name__}, not the diagnostics object; "
                         "rerun stage 07 (07_factor_analysis)")
    if not isinstance(diag.get("converged"), bool):
        raise ValueError(f"{path} has no 'converged' verdict (true or false): it predates the "
                         "convergence checks; rerun stage 07 (07_factor_analysis)")
    return diag


def read_convergence(root: str | os.PathLike | None = None,
                     name: str = FACTOR_DIAGNOSTICS_FILE) -> dict[str, Any] | None:
    """Stage 07's verdict on a fit: ``converged``, ``convergence_problems``, ``advice``,
    ``thresholds`` (those the file has besides ``converged``).

    Read with :func:`read_diagnostics` from ``data/analysis/<name>``: the fit's
    ``factor_diagnostics.json`` (what stage 08 and the claims read to mark the factor-model
    columns) or the recovery study's ``recovery_diagnostics.json``; None when the file is
    absent (stage 07, or its recovery study, has not run).

    Raises
    ------
    ValueError
        As :func:`read_diagnostics` (the file was written by a mislib without the verdict:
        rerun stage 07).
    """
    path = project_paths(root).analysis / name
    if not path.is_file():
        return None
    diag = read_diagnostics(path)
    return {k: diag[k] for k in ("converged", "convergence_problems", "advice", "thresholds")
            if k in diag}


def fit_provenance(fa: FactorAnalysis, profile: str | Mapping[str, Any],
                   root: str | os.PathLike | None = None):
    """The :class:`~mislib.provenance.Provenance` of a fit's figures (runs, counts, and
    ``converged``), from the scored trials it was fitted to."""
    from mislib.provenance import Provenance

    runs = stage_params(profile, "scoring").get("runs")
    return Provenance.from_scored(load_scored(root, runs), profile, root=root,
                                  converged=fa.converged)


def claim_contrasts(contrasts: pd.DataFrame) -> pd.DataFrame:
    """The contrasts of the factors and interactions the paper's claims rest on."""
    return contrasts[contrasts["factors"].isin(CLAIM_CONTRAST_FACTORS)]


def write_simulated_study(n_questions: int, root: str | os.PathLike | None = None,
                          seed: int = 7, n_trials: int = 5) -> Path:
    """Write a simulated study with known effects under ``build/sim07/``; its project root.

    The study (:func:`mislib.simulate.simulate_study`) is laid out as stages 03, 04 and 06
    would leave it, so :func:`run_factor_analysis` with ``root=`` the returned folder
    analyses it instead of the real results.
    """
    from mislib.simulate import simulate_study, write_study

    sim_root = project_paths(root).build / "sim07"
    study = simulate_study(n_questions=int(n_questions), n_trials=n_trials, seed=seed)
    write_study(study, root=sim_root, scored=True)
    return sim_root
