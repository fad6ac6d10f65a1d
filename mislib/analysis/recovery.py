"""The recovery study: does the factor model find effects that are there?

A random model's answers (the demo) carry no effect, so a fit to them cannot show that the
model finds one. Here a simulated study (:func:`mislib.simulate.simulate_study`) plants
effects shaped like the paper's findings (:data:`mislib.simulate.DEFAULT_MAIN` and
:data:`~mislib.simulate.DEFAULT_INTERACTIONS`: the convention × terminology reversal, box and
no-prompt × terminology, the text-only prior, SemSam's gain, every visual prompt including
``none``), the profile's factor model (the same terms, priors and parameterisation as stage
07's fit) is fitted to it, and every fixed effect's 95 % interval is set against the value
planted. About 95 % of them should cover it.

The verdict is not that share. One fit's coverage scatters far more than 51 independent
intervals would: the terms of one sum-to-zero factor or interaction move together (the four
convention × terminology terms are one number), so one unlucky coordinate costs two to four
terms at once, and a seed can fall below 90 % with nothing wrong (the coverage over seeds, and
which terms missed, are in bench/RESULTS.md). What a faulty recovery changes is where the
planted effects lie in the posterior *as a whole*: :func:`calibration` takes the squared
Mahalanobis distance of the planted vector from the posterior mean under the posterior
covariance, ``d² = (m - planted)ᵀ Σ⁺ (m - planted)``, over the free coordinates of the fixed
effects (those with posterior variance; the sum-to-zero directions have none, and a planted
vector that is not centred like the model's is off by an infinite distance). With the
posterior close to normal, ``d²`` is about χ² with that many degrees of freedom when the model
recovers the effects, and large when it finds them at the wrong size or sign. The study
passes when ``P(χ² >= d²) >=`` :data:`CALIBRATION_ALPHA`. How ``p`` falls over seeds, and
how it falls when the recovery is made biased on purpose, is in bench/RESULTS.md.

Outputs (``data/analysis/``):

``recovery.parquet``
    One row per fixed effect of the model: ``term`` (named as in ``factor_effects.parquet``),
    ``planted`` (the simulated value, logit scale), the fitted ``mean, lo95, hi95`` and
    ``covered`` (``lo95 <= planted <= hi95``).
``recovery_diagnostics.json``
    The recovery fit's ``factor_diagnostics`` fields (``converged``, ...) plus ``coverage``,
    ``calibration`` (:func:`calibration`: ``distance2, df, p_value, alpha, unbiased``) and the
    study's size.

>>> truth = pd.DataFrame({"term": ["Intercept", "dims[2d]"], "value": [0.4, 0.1]})
>>> effects = pd.DataFrame({"term": ["Intercept", "dims[2d]"], "mean": [0.35, 0.3],
...                         "lo95": [0.2, 0.2], "hi95": [0.5, 0.4]})
>>> recovery_table(truth, effects)["covered"].tolist()
[True, False]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mislib.analysis.fit import (
    SamplerSettings,
    _stack_terms,
    fit_factor_model,
    settings_from_params,
)
from mislib.analysis.stage import read_diagnostics
from mislib.config import stage_params
from mislib.paths import RECOVERY_DIAGNOSTICS_FILE, RECOVERY_FILE, project_paths
from mislib.stage import StageRun

#: What the recovery study writes under ``data/analysis/``.
OUTPUTS = (RECOVERY_FILE, RECOVERY_DIAGNOSTICS_FILE)
#: The simulated models (two, so SemSam's gain per model, arm × model, is planted too).
MODELS = ("sim-vlm-a", "sim-vlm-b")
#: The study's default size and sampling (notebook 07's): 600 questions × 2 models × 2 arms
#: × 5 trials (every pair and volume holding several questions, as at the paper's scale),
#: 2 chains of 1,000 warm-up and 2,000 draws: the volume SD (0.2 over 60 volumes) mixes
#: slowly, and shorter chains often fail R-hat <= 1.01 there. Fit times and the coverage
#: over seeds are in bench/RESULTS.md.
DEFAULTS: dict[str, Any] = {"n_questions": 600, "n_trials": 5, "draws": 2000, "tune": 1000,
                            "chains": 2, "seed": 1}
#: The calibration test's level: a study whose planted effects lie further from the
#: posterior than this share of χ² draws would is judged biased.
CALIBRATION_ALPHA = 0.001
#: Eigenvalues of the posterior covariance below this share of the largest are the
#: sum-to-zero constraints (no variance), not free coordinates.
_RANK_TOL = 1e-9
#: A planted vector further than this (logit) from the free coordinates breaks a constraint.
_CONSTRAINT_TOL = 1e-6


def calibration(draws: np.ndarray, planted: np.ndarray,
                alpha: float = CALIBRATION_ALPHA) -> dict[str, Any]:
    """Whether the planted effects lie where the posterior puts them, as a whole.

    Parameters
    ----------
    draws : ndarray, shape (n_draws, n_terms) — posterior draws of the fixed effects, logit.
    planted : ndarray, shape (n_terms,) — the planted values of the same terms.
    alpha : the test's level.

    Returns
    -------
    dict with ``distance2`` (squared Mahalanobis distance of ``planted`` from the posterior
    mean over the free coordinates; inf when ``planted`` breaks a constraint the draws
    keep, e.g. is not centred like them), ``df`` (free coordinates), ``p_value``
    (``P(χ²_df >= distance2)``), ``alpha`` and ``unbiased`` (``p_value >= alpha``).

    >>> rng = np.random.default_rng(0)
    >>> draws = rng.normal(0.0, 0.1, (4000, 3))
    >>> calibration(draws, np.zeros(3))["unbiased"], calibration(draws, np.full(3, 0.5))["unbiased"]
    (True, False)
    """
    from scipy.stats import chi2

    draws = np.asarray(draws, float)
    planted = np.asarray(planted, float)
    if draws.ndim != 2 or planted.shape != draws.shape[1:]:
        raise ValueError(f"draws must be (n_draws, n_terms) and planted (n_terms,), got "
                         f"{draws.shape} and {planted.shape}")
    values, vectors = np.linalg.eigh(np.cov(draws, rowvar=False))
    free = values > _RANK_TOL * values.max()
    offset = draws.mean(axis=0) - planted
    along = vectors[:, free].T @ offset
    off_constraints = float(np.linalg.norm(vectors[:, ~free].T @ offset))
    distance2 = (float(np.sum(along**2 / values[free])) if off_constraints <= _CONSTRAINT_TOL
                 else math.inf)
    df = int(free.sum())
    p_value = float(chi2.sf(distance2, df))
    return {"distance2": distance2, "df": df, "p_value": p_value, "alpha": alpha,
            "unbiased": bool(p_value >= alpha)}


def _frames_digest(*frames: pd.DataFrame) -> str:
    """A digest of the frames' contents (values and column names, not the index)."""
    h = hashlib.sha256()
    for frame in frames:
        h.update("\x1f".join(map(str, frame.columns)).encode())
        h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def recovery_table(truth: pd.DataFrame, effects: pd.DataFrame) -> pd.DataFrame:
    """Planted against fitted effects: ``term, planted, mean, lo95, hi95, covered``.

    ``truth`` is :attr:`~mislib.simulate.SimulatedStudy.truth` (``term, value``), ``effects``
    a fit's ``factor_effects`` table. Every fitted term must have a planted value (a term
    the simulation did not set is planted at zero only when it is one of the model's, so
    a misnamed term is an error, not a silent zero).

    Raises
    ------
    ValueError
        When a fitted term is not in the truth table.
    """
    planted = truth.set_index("term")["value"]
    missing = sorted(set(effects["term"]) - set(planted.index))
    if missing:
        raise ValueError(f"fitted terms with no planted value: {missing[:5]} "
                         f"({len(missing)} in all); the truth table names {len(planted)} terms")
    table = effects[["term", "mean", "lo95", "hi95"]].copy()
    table.insert(1, "planted", planted.loc[table["term"]].to_numpy(float))
    table["covered"] = (table["lo95"] <= table["planted"]) & (table["planted"] <= table["hi95"])
    return table.reset_index(drop=True)


@dataclass
class Recovery:
    """A recovery study's table, coverage and the diagnostics of its fit."""

    table: pd.DataFrame
    diagnostics: dict[str, Any]
    reused: bool

    @property
    def coverage(self) -> float:
        """Share of planted effects inside their fitted 95 % intervals."""
        return float(self.table["covered"].mean())

    @property
    def converged(self) -> bool:
        return bool(self.diagnostics["converged"])

    @property
    def unbiased(self) -> bool:
        """The verdict of :func:`calibration`: the planted effects, as a whole, lie where
        the fit puts them."""
        return bool(self.diagnostics["calibration"]["unbiased"])

    def provenance(self, profile: str | Mapping[str, Any]):
        """The stamp of the recovery figure: simulated responses, their counts, convergence."""
        from mislib.provenance import Provenance, profile_name

        d = self.diagnostics
        return Provenance(profile=profile_name(profile), models=tuple(d["models"]),
                          run_ids=(), n_questions_generated=int(d["n_questions"]),
                          n_questions_asked=int(d["n_questions"]),
                          n_trials=int(d["study_trials"]), smoke=False,
                          converged=self.converged, simulated=True)


def simulate_recovery_study(n_questions: int, n_trials: int, seed: int):
    """The simulated study of the recovery (default, paper-shaped effects, :data:`MODELS`).

    Structures and volumes are fewer than the paper's so that, as at the paper's scale,
    every structure pair and volume holds several questions (the pair and volume
    intercepts are then identified, not dropped).
    """
    from mislib.simulate import simulate_questions, simulate_study

    questions = simulate_questions(n_questions, seed=seed, n_volumes=max(20, n_questions // 10),
                                   n_structures=(12, 4))
    return simulate_study(n_trials=n_trials, models=MODELS, seed=seed, questions=questions)


def run_recovery(profile: str | Mapping[str, Any] = "demo",
                 root: str | os.PathLike | None = None, force: bool = False,
                 progress: bool = True, **settings: Any) -> Recovery:
    """Simulate, fit with the profile's factor model, and write ``recovery.parquet``.

    Parameters
    ----------
    profile : its ``[analysis]`` table gives the model (terms, priors, centring); the
        sampling of the recovery fit is its own (``settings``, NUTS defaults otherwise).
    root : project root; outputs go to its ``data/analysis/``.
    force : refit even when the outputs are fresh for these settings.
    progress : show the sampler's progress bar.
    **settings : ``n_questions, n_trials, draws, tune, chains, seed`` (None or absent: the
        value of :data:`DEFAULTS`).

    Returns
    -------
    Recovery; ``reused`` when fresh outputs were read back.
    """
    from mislib.simulate import scored_table

    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown recovery setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    chosen = {k: int(DEFAULTS[k] if settings.get(k) is None else settings[k]) for k in DEFAULTS}
    spec, _ = settings_from_params(stage_params(profile, "analysis"))
    # The model is the profile's; the sampling is the study's own (NUTS defaults otherwise),
    # so the coverage and timings measured for these settings hold whatever the profile's
    # sampler settings are (bench/RESULTS.md).
    sampler = SamplerSettings(draws=chosen["draws"], tune=chosen["tune"],
                              chains=chosen["chains"], seed=chosen["seed"])
    out = project_paths(root).analysis
    # The simulated study is the input (under a second to draw): its digest in the stamp,
    # so other planted effects or another simulation are fitted, not read back.
    study = simulate_recovery_study(chosen["n_questions"], chosen["n_trials"], chosen["seed"])
    scored = scored_table(study)
    # version 2: the calibration test in the diagnostics
    stamp = {"model": dataclasses.asdict(spec), "study": chosen, "version": 2,
             "input": _frames_digest(study.truth, scored)}
    run = StageRun(out, "recovery", stamp, OUTPUTS)  # mislib.stage
    if not force and run.fresh():
        return Recovery(table=pd.read_parquet(out / RECOVERY_FILE),
                        diagnostics=read_diagnostics(out / RECOVERY_DIAGNOSTICS_FILE),
                        reused=True)
    fit = fit_factor_model(scored, spec, sampler, progress=progress)
    table = recovery_table(study.truth, fit.effects)
    draws, terms = _stack_terms(fit.posterior["posterior"], fit.data)
    planted = table.set_index("term").loc[terms, "planted"].to_numpy(float)
    diagnostics = {**fit.diagnostics, "coverage": float(table["covered"].mean()),
                   "calibration": calibration(draws.reshape(-1, draws.shape[-1]), planted),
                   "n_effects": len(table), "models": list(MODELS),
                   "study_trials": chosen["n_trials"], "study": chosen}
    with run:  # table and diagnostics moved in together, the stamp last
        table.to_parquet(run.path(RECOVERY_FILE), index=False)
        run.path(RECOVERY_DIAGNOSTICS_FILE).write_text(json.dumps(diagnostics, indent=2,
                                                                  default=str))
    return Recovery(table=table, diagnostics=diagnostics, reused=False)
