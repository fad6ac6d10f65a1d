"""Fitting the factor model with nutpie, and the summaries and diagnostics of a fit.

:func:`fit_factor_model` takes what enters the model (:class:`ModelSpec`) and how it is
sampled (:class:`SamplerSettings`), and returns a :class:`FactorFit`: the effects and SDs on
the logit scale with R-hat and ESS, the contrasts and predictive check
(:mod:`mislib.analysis.contrasts`), diagnostics and a small posterior.

>>> from mislib.simulate import simulate_study, scored_table
>>> scored = scored_table(simulate_study(n_questions=300, n_trials=2, seed=3))
>>> fit = fit_factor_model(scored, ModelSpec(groups=("question",)),
...                        SamplerSettings(draws=200, tune=200))      # doctest: +SKIP
>>> fit.diagnostics["rhat_ok"]                                       # doctest: +SKIP
True
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mislib.analysis.contrasts import compute_contrasts, posterior_predictive_check
from mislib.analysis.data import FACTORS, GROUPS, INTERACTIONS, FactorData, prepare_factor_data
from mislib.analysis.model import build_model, resolve_centred
from mislib.vocabulary import interaction_name

#: The largest R-hat a converged fit may have (rank-normalised, split).
RHAT_MAX = 1.01
#: Random intercepts per group whose R-hat and ESS are checked (evenly spaced levels).
DIAG_LEVELS = 500


@dataclass(frozen=True)
class ModelSpec:
    """What enters the factor model.

    Attributes
    ----------
    factors, interactions, groups : model terms; interactions as ``"f1:f2"``.
    centred : random-intercept groups sampled centred, the others non-centred; ``"auto"``
        decides from the trials per level (:func:`~mislib.analysis.resolve_centred`).
    prior_sd, interaction_sd : prior scales of main effects and interactions (logit).
    """

    factors: Sequence[str] = FACTORS
    interactions: Sequence[str] = INTERACTIONS
    groups: Sequence[str] = GROUPS
    centred: str | Sequence[str] = ()
    prior_sd: float = 1.0
    interaction_sd: float = 0.5


@dataclass(frozen=True)
class SamplerSettings:
    """How the factor model is sampled and summarised.

    Attributes
    ----------
    draws, tune, chains : NUTS draws and warm-up per chain, number of chains.
    cores : parallel chains (None: ``min(chains, os.cpu_count())``).
    seed : sampler and predictive-check seed.
    adaptation : nutpie's mass-matrix adaptation (``"diag"`` or ``"low_rank"``).
    contrast_draws, ppc_draws : posterior draws used for contrasts and the predictive check.
    """

    draws: int = 500
    tune: int = 500
    chains: int = 2
    cores: int | None = None
    seed: int = 0
    adaptation: str = "diag"
    contrast_draws: int = 1000
    ppc_draws: int = 200


def settings_from_params(params: Mapping[str, Any]) -> tuple[ModelSpec, SamplerSettings]:
    """The model and sampler settings an ``[analysis]`` profile table names (others default).

    >>> spec, sampler = settings_from_params({"draws": 100, "groups": ["question"]})
    >>> spec.groups, sampler.draws, sampler.tune
    (['question'], 100, 500)
    """
    def pick(cls):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    return pick(ModelSpec), pick(SamplerSettings)


@dataclass
class FactorFit:
    """Everything :func:`fit_factor_model` computed.

    ``posterior`` is the nutpie ``xarray.DataTree`` (groups ``posterior``, ``sample_stats``;
    per-question intercepts dropped after their R-hat was taken); the tables are described
    in :mod:`mislib.analysis`.
    """

    data: FactorData
    posterior: Any
    effects: pd.DataFrame
    sds: pd.DataFrame
    contrasts: pd.DataFrame
    ppc: pd.DataFrame
    diagnostics: dict[str, Any]


def fit_factor_model(scored: pd.DataFrame, spec: ModelSpec = ModelSpec(),
                     sampler: SamplerSettings = SamplerSettings(),
                     progress: bool = True) -> FactorFit:
    """Fit the hierarchical factor model to scored trials with nutpie.

    Parameters
    ----------
    scored : one row per trial (see :func:`~mislib.analysis.prepare_factor_data`).
    spec : the model's terms and priors.
    sampler : draws, chains, seed and the draws the summaries use.
    progress : show nutpie's progress bar.

    Returns
    -------
    FactorFit
    """
    import nutpie
    import xarray as xr

    t0 = time.perf_counter()
    data = prepare_factor_data(scored, spec.factors, spec.interactions, spec.groups)
    model = build_model(data, centred=spec.centred, prior_sd=spec.prior_sd,
                        interaction_sd=spec.interaction_sd)
    t_build = time.perf_counter()
    compiled = nutpie.compile_pymc_model(model, backend="numba")
    t_compile = time.perf_counter()
    cores = sampler.cores or min(sampler.chains, os.cpu_count() or 1)
    trace = nutpie.sample(compiled, draws=sampler.draws, tune=sampler.tune,
                          chains=sampler.chains, cores=cores, seed=sampler.seed,
                          progress_bar=progress, save_warmup=False,
                          adaptation=sampler.adaptation)
    t_sample = time.perf_counter()

    post = trace.posterior
    fixed, terms = _stack_terms(post, data)
    effects = _summarise(fixed, *_diag(fixed), terms)
    sd_names = [f"sd_{g}" for g in data.group_codes]
    sd_arr = np.stack([np.asarray(post[v].values) for v in sd_names], axis=-1)
    sds = _summarise(sd_arr, *_diag(sd_arr), [f"sd[{g}]" for g in data.group_codes])
    random = _random_intercept_diagnostics(post, data)
    contrasts = compute_contrasts(post, data, max_draws=sampler.contrast_draws)
    ppc = posterior_predictive_check(post, data, n_draws=sampler.ppc_draws, seed=sampler.seed)
    keep = [*_fixed_names(data), *sd_names]
    small = trace.copy()
    small["posterior"] = xr.DataTree(post.to_dataset()[keep])
    t_end = time.perf_counter()

    diagnostics = _diagnostics(data, spec, sampler, cores, trace.sample_stats, effects, sds,
                               random, ppc)
    diagnostics["seconds"] = {
        "build": round(t_build - t0, 2), "compile": round(t_compile - t_build, 2),
        "sample": round(t_sample - t_compile, 2), "summaries": round(t_end - t_sample, 2),
        "total": round(t_end - t0, 2)}
    return FactorFit(data=data, posterior=small, effects=effects, sds=sds,
                     contrasts=contrasts, ppc=ppc, diagnostics=diagnostics)


def _evenly(n: int, k: int = DIAG_LEVELS) -> np.ndarray:
    """Up to ``k`` evenly spaced indices of ``range(n)``."""
    return np.unique(np.linspace(0, n - 1, k).astype(int))


def _random_intercept_diagnostics(post, data: FactorData) -> dict[str, Any]:
    """R-hat and ESS of the random intercepts and of their cell means.

    Taken on up to :data:`DIAG_LEVELS` evenly spaced levels per group: ArviZ takes them one
    at a time (~1 ms each) and a paper-scale run has 3.7e4 of them. The cell means
    (``mean_<group>``, the parts sampled with the fixed effects) are checked per cell.
    """
    re_rhat, re_ess = {}, {}
    for g in data.group_codes:
        name = f"u_{g}" if f"u_{g}" in post else f"z_{g}"
        arr = np.asarray(post[name].values)
        arr = arr.reshape(*arr.shape[:2], -1)
        r, e, _ = _diag(arr[..., _evenly(arr.shape[-1])])
        re_rhat[g] = float(np.nanmax(r))
        re_ess[g] = float(np.nanmin(e))
    mean_arr = []
    for g in data.group_codes:
        arr = np.asarray(post[f"mean_{g}"].values)
        mean_arr.append(arr[..., _evenly(arr.shape[-1])])
    mean_rhat, mean_ess, _ = _diag(np.concatenate(mean_arr, axis=-1))
    return {"rhat": re_rhat, "ess": re_ess, "mean_rhat": mean_rhat, "mean_ess": mean_ess}


def _diagnostics(data: FactorData, spec: ModelSpec, sampler: SamplerSettings, cores: int,
                 stats, effects: pd.DataFrame, sds: pd.DataFrame, random: Mapping[str, Any],
                 ppc: pd.DataFrame) -> dict[str, Any]:
    """The ``factor_diagnostics.json`` of a fit (sizes, settings, convergence, dropped terms)."""
    diverging = np.asarray(stats["diverging"].values)
    depth = np.asarray(stats["depth"].values) if "depth" in stats else np.array([np.nan])
    all_rhat = np.concatenate([effects["r_hat"], sds["r_hat"], list(random["rhat"].values()),
                               random["mean_rhat"]])
    return {
        "n_trials": int(data.obs["n"].sum()), "n_obs": len(data.obs),
        "n_questions": len(data.levels["question"]),
        "groups": {g: len(data.levels[g]) for g in data.group_codes},
        "factors": {f: data.levels[f] for f in data.factors},
        "interactions": [interaction_name(a, b) for a, b in data.interactions],
        "dropped": data.dropped, "centred": resolve_centred(data, spec.centred),
        "nested": {g: f for g, f in data.nested.items() if f},
        "draws": sampler.draws, "tune": sampler.tune, "chains": sampler.chains,
        "cores": cores, "seed": sampler.seed, "adaptation": sampler.adaptation,
        "diag_levels_per_group": DIAG_LEVELS,
        "divergences": int(diverging.sum()),
        "max_r_hat_fixed": float(np.nanmax(effects["r_hat"])),
        "max_r_hat": float(np.nanmax(all_rhat)),
        "min_ess_bulk_fixed": float(np.nanmin(effects["ess_bulk"])),
        "min_ess_tail_fixed": float(np.nanmin(effects["ess_tail"])),
        "min_ess_bulk": float(min(np.nanmin(effects["ess_bulk"]), np.nanmin(sds["ess_bulk"]),
                                  *random["ess"].values(), np.nanmin(random["mean_ess"]))),
        "max_r_hat_group_means": float(np.nanmax(random["mean_rhat"])),
        "max_r_hat_random": dict(random["rhat"]),
        "mean_tree_depth": float(np.nanmean(depth)),
        "step_size": float(np.nanmean(np.asarray(stats["step_size"].values)))
        if "step_size" in stats else None,
        "ppc_inside_share": float(ppc["inside"].mean()),
        "rhat_ok": bool(np.nanmax(all_rhat) <= RHAT_MAX),
    }


def _fixed_names(data: FactorData) -> list[str]:
    return ["Intercept", *data.factors, *(interaction_name(a, b) for a, b in data.interactions)]


def _summarise(draws: np.ndarray, rhat: np.ndarray, ess_bulk: np.ndarray,
               ess_tail: np.ndarray, terms: Sequence[str]) -> pd.DataFrame:
    """Rows of ``term, mean, sd, lo95, hi95, r_hat, ess_bulk, ess_tail``.

    ``draws`` is [chain, draw, n_terms]; the diagnostics are [n_terms].
    """
    flat = draws.reshape(-1, draws.shape[-1])
    lo, hi = np.quantile(flat, [0.025, 0.975], axis=0)
    return pd.DataFrame({"term": list(terms), "mean": flat.mean(0), "sd": flat.std(0, ddof=1),
                         "lo95": lo, "hi95": hi, "r_hat": rhat, "ess_bulk": ess_bulk,
                         "ess_tail": ess_tail})


def _diag(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """R-hat, bulk and tail ESS of [chain, draw, n] draws (ArviZ's rank-normalised ones)."""
    import arviz as az

    return (np.asarray(az.rhat(arr, chain_axis=0, draw_axis=1)),
            np.asarray(az.ess(arr, method="bulk", chain_axis=0, draw_axis=1)),
            np.asarray(az.ess(arr, method="tail", prob=0.05, chain_axis=0, draw_axis=1)))


def _stack_terms(post, data: FactorData) -> tuple[np.ndarray, list[str]]:
    """Fixed effects as [chain, draw, n_terms] with their ``factor_effects`` names."""
    cols, terms = [], []
    for name in _fixed_names(data):
        arr = np.asarray(post[name].values)
        if name == "Intercept":
            cols.append(arr[..., None])
            terms.append("Intercept")
        elif ":" in name:
            f1, f2 = name.split(":")
            cols.append(arr.reshape(*arr.shape[:2], -1))
            terms += [f"{f1}[{a}]:{f2}[{b}]" for a in data.levels[f1] for b in data.levels[f2]]
        else:
            cols.append(arr)
            terms += [f"{name}[{lv}]" for lv in data.levels[name]]
    return np.concatenate(cols, axis=-1), terms
