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

#: The largest R-hat a converged fit may have (rank-normalised, split), over every fixed
#: effect, SD, checked random intercept and intercept mean (Vehtari et al. 2021).
RHAT_MAX = 1.01
#: The smallest bulk and tail ESS per chain of a converged fit (Vehtari et al. 2021: 100 per
#: chain), for the fixed effects, the SDs and the random intercepts' means.
ESS_MIN_PER_CHAIN = 100
#: Trials per level from which a slowly mixing group is better sampled centred (the default
#: of :func:`~mislib.analysis.resolve_centred`'s ``"auto"``).
CENTRE_MIN_TRIALS = 250.0
#: Fewer levels than this leave a group's SD weakly identified (slow mixing in any form).
FEW_LEVELS = 30
#: What R-hat and ESS are checked on: (part of the posterior, statistic) pairs.
CONVERGENCE_STATS = ("max R-hat", "min bulk ESS", "min tail ESS")
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
    target_accept : the step size's target acceptance rate (raise it towards 0.95-0.99
        when a fit diverges: smaller steps follow sharper curvature).
    contrast_draws, ppc_draws : posterior draws used for contrasts and the predictive check.
    """

    draws: int = 500
    tune: int = 500
    chains: int = 2
    cores: int | None = None
    seed: int = 0
    adaptation: str = "diag"
    target_accept: float = 0.8
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

    @property
    def converged(self) -> bool:
        """Whether the fit passed every check of :func:`convergence_checks`."""
        return bool(self.diagnostics["converged"])


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
                          adaptation=sampler.adaptation, target_accept=sampler.target_accept)
    t_sample = time.perf_counter()

    post = trace.posterior
    fixed, terms = _stack_terms(post, data)
    effects = _summarise(fixed, *_diag(fixed), terms)
    sd_names = [f"sd_{g}" for g in data.group_codes]
    sd_arr = np.stack([np.asarray(post[v].values) for v in sd_names], axis=-1)
    sds = _summarise(sd_arr, *_diag(sd_arr), [f"sd[{g}]" for g in data.group_codes])
    random = _random_intercept_diagnostics(post, data)
    contrasts = compute_contrasts(post, data, max_draws=sampler.contrast_draws)
    ppc = posterior_predictive_check(post, data, n_draws=sampler.ppc_draws, seed=sampler.seed,
                                     check=check_frame(scored, data),
                                     interactions=check_interactions(spec, data))
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


def check_frame(scored: pd.DataFrame, data: FactorData) -> pd.DataFrame:
    """The factor levels the predictive check groups by, one row per row of ``data.obs``.

    Every benchmark factor (:data:`~mislib.analysis.FACTORS`) the scored table has, whether
    the model includes it or not: an effect of a factor the model leaves out then shows as
    misfit in that factor's levels.
    """
    out = data.obs[["model", "arm", "question_id"]].copy()
    question_cols = [f for f in FACTORS if f in scored.columns and f not in ("model", "arm")]
    first = scored.drop_duplicates("question_id")
    per_q = first[question_cols].set_axis(first["question_id"].astype(str), axis=0)
    out = out.join(per_q, on="question_id")
    return out[[f for f in FACTORS if f in out.columns]].reset_index(drop=True)


def check_interactions(spec: ModelSpec, data: FactorData) -> list[tuple[str, str]]:
    """The interaction cells the predictive check compares: the model's, the default ones
    (:data:`~mislib.analysis.INTERACTIONS`) and arm × model."""
    pairs = [*data.interactions, *(tuple(i.split(":")) for i in (*spec.interactions,
                                                                  *INTERACTIONS)),
             ("arm", "model")]
    return list(dict.fromkeys(tuple(p) for p in pairs))


def _evenly(n: int, k: int = DIAG_LEVELS) -> np.ndarray:
    """Up to ``k`` evenly spaced indices of ``range(n)``."""
    return np.unique(np.linspace(0, n - 1, k).astype(int))


def _random_intercept_diagnostics(post, data: FactorData) -> dict[str, dict[str, Any]]:
    """R-hat and bulk/tail ESS of each group's random intercepts and of their cell means.

    Taken on up to :data:`DIAG_LEVELS` evenly spaced levels per group: ArviZ takes them one
    at a time (~1 ms each) and a paper-scale run has 3.7e4 of them. The cell means
    (``mean_<group>``, the parts sampled with the fixed effects) are checked per cell.

    Returns ``{"intercepts[<g>]": {...}, "intercept means[<g>]": {...}}`` with ``max R-hat,
    min bulk ESS, min tail ESS`` and the ``worst`` level (largest R-hat) of each.
    """
    out = {}
    for g in data.group_codes:
        name = f"u_{g}" if f"u_{g}" in post else f"z_{g}"
        for part, var, labels in ((f"intercepts[{g}]", name, data.levels[g]),
                                  (f"intercept means[{g}]", f"mean_{g}", None)):
            arr = np.asarray(post[var].values)
            arr = arr.reshape(*arr.shape[:2], -1)
            idx = _evenly(arr.shape[-1])
            r, e_bulk, e_tail = _diag(arr[..., idx])
            worst = int(idx[np.nanargmax(r)]) if np.isfinite(r).any() else int(idx[0])
            out[part] = {"max R-hat": float(np.nanmax(r)),
                         "min bulk ESS": float(np.nanmin(e_bulk)),
                         "min tail ESS": float(np.nanmin(e_tail)),
                         "worst": f"{g}[{labels[worst]}]" if labels is not None
                         else f"mean_{g}[{worst}]"}
    return out


def _part_stats(table: pd.DataFrame) -> dict[str, Any]:
    """The convergence statistics of rows ``term, r_hat, ess_bulk, ess_tail``."""
    worst = table.loc[table["r_hat"].fillna(np.inf).idxmax(), "term"] if len(table) else ""
    return {"max R-hat": float(np.nanmax(table["r_hat"])),
            "min bulk ESS": float(np.nanmin(table["ess_bulk"])),
            "min tail ESS": float(np.nanmin(table["ess_tail"])), "worst": str(worst)}


def convergence_checks(diagnostics: Mapping[str, Any]) -> pd.DataFrame:
    """Every convergence check of a fit and whether it passed, one row each.

    R-hat is checked on every part of the posterior (``parts`` of ``factor_diagnostics.json``:
    the fixed effects, each SD, each group's random intercepts and their means), bulk and
    tail ESS on the fixed effects, the SDs and the intercepts' means (what the tables
    report; single questions' intercepts are nuisance parameters), and divergences over
    the whole run.

    Returns
    -------
    DataFrame ``part, statistic, value, bound, ok, worst`` (``worst``: the parameter with
    the largest R-hat of that part).

    >>> d = {"divergences": 0, "chains": 2, "parts": {"fixed effects": {
    ...     "max R-hat": 1.02, "min bulk ESS": 900.0, "min tail ESS": 150.0,
    ...     "worst": "family[plane]"}}}
    >>> convergence_checks(d)[["statistic", "ok"]].values.tolist()
    [['max R-hat', False], ['min bulk ESS', True], ['min tail ESS', False], ['divergences', True]]
    """
    ess_min = ESS_MIN_PER_CHAIN * int(diagnostics["chains"])
    rows = []
    for part, stats in diagnostics["parts"].items():
        checked = CONVERGENCE_STATS if not part.startswith("intercepts[") else ("max R-hat",)
        for stat in checked:
            value = float(stats[stat])
            bound = RHAT_MAX if stat == "max R-hat" else float(ess_min)
            ok = value <= bound if stat == "max R-hat" else value >= bound
            rows.append({"part": part, "statistic": stat, "value": value, "bound": bound,
                         "ok": bool(ok and np.isfinite(value)), "worst": stats["worst"]})
    rows.append({"part": "sampler", "statistic": "divergences",
                 "value": float(diagnostics["divergences"]), "bound": 0.0,
                 "ok": int(diagnostics["divergences"]) == 0, "worst": ""})
    return pd.DataFrame(rows, columns=["part", "statistic", "value", "bound", "ok", "worst"])


def convergence_problems(checks: pd.DataFrame) -> list[str]:
    """The failed checks of :func:`convergence_checks`, one sentence each."""
    out = []
    for row in checks[~checks["ok"]].itertuples():
        if row.statistic == "divergences":
            out.append(f"{int(row.value)} divergent transitions (must be 0)")
        elif row.statistic == "max R-hat":
            worst = f" ({row.worst})" if row.worst and row.worst != row.part else ""
            out.append(f"R-hat {row.value:.4f} > {row.bound} in {row.part}{worst}")
        else:
            out.append(f"{row.statistic} {row.value:.0f} < {row.bound:.0f} in {row.part}")
    return out


def convergence_advice(diagnostics: Mapping[str, Any]) -> list[str]:
    """What to change in ``[analysis]`` when a fit did not converge (empty when it did).

    The advice follows where the problem is: divergences call for a higher
    ``target_accept``; a random-intercept group whose SD, intercepts or means mix badly for
    the other parameterisation of that group (centred when its levels carry many trials, so
    the data pin each intercept down; non-centred when they carry few); slow mixing of the
    fixed effects for longer chains.
    """
    checks = convergence_checks(diagnostics)
    failed = checks[~checks["ok"]]
    if failed.empty:
        return []
    advice = []
    if (failed["statistic"] == "divergences").any():
        ta = float(diagnostics.get("target_accept", 0.8))
        advice.append(f"divergences: raise target_accept (now {ta}) to "
                      f"{0.95 if ta < 0.95 else 0.99} in [analysis] (smaller steps)")
    centred = set(diagnostics.get("centred", []))
    per_level = diagnostics.get("trials_per_level", {})
    bad_groups = dict.fromkeys(
        g for part in failed["part"] for g in diagnostics.get("groups", {})
        if part in (f"sd[{g}]", f"intercepts[{g}]", f"intercept means[{g}]"))
    for g in bad_groups:
        n = per_level.get(g)
        many = f"{n:.0f} trials per level" if n is not None else "its levels"
        n_levels = diagnostics.get("groups", {}).get(g)
        few_levels = (f"; its SD rests on only {n_levels} levels, so it mixes slowly in "
                      "either form" if n_levels is not None and n_levels < FEW_LEVELS else "")
        if g in centred and (n is None or n < CENTRE_MIN_TRIALS):
            advice.append(f"group {g} ({many}) is centred with few trials per level: sample "
                          f"it non-centred (drop {g!r} from [analysis] centred){few_levels}")
        elif g in centred:
            advice.append(f"group {g} ({many}) is centred, which suits its levels: keep it, "
                          f"and lengthen the chains{few_levels}")
        elif n is not None and n >= CENTRE_MIN_TRIALS:
            advice.append(f"group {g} ({many}) mixes slowly non-centred: sample it centred "
                          f"([analysis] centred = [{g!r}]); with this many trials per level "
                          f"the data pin each intercept down{few_levels}")
        else:
            advice.append(f"group {g} ({many}) mixes slowly; non-centred suits so few trials "
                          f"per level (centre it only past ~{CENTRE_MIN_TRIALS:.0f}), so "
                          f"lengthen the chains{few_levels}")
    tune, draws = int(diagnostics["tune"]), int(diagnostics["draws"])
    advice.append(f"longer chains: [analysis] tune = {max(2 * tune, 1000)}, draws = "
                  f"{max(2 * draws, 1000)} (now {tune}, {draws}); R-hat and ESS improve with "
                  "length when the chains only mix slowly")
    return advice


def _diagnostics(data: FactorData, spec: ModelSpec, sampler: SamplerSettings, cores: int,
                 stats, effects: pd.DataFrame, sds: pd.DataFrame,
                 random: Mapping[str, Mapping[str, Any]], ppc: pd.DataFrame) -> dict[str, Any]:
    """The ``factor_diagnostics.json`` of a fit (sizes, settings, convergence, dropped terms)."""
    diverging = np.asarray(stats["diverging"].values)
    depth = np.asarray(stats["depth"].values) if "depth" in stats else np.array([np.nan])
    parts = {"fixed effects": _part_stats(effects),
             **{row.term: _part_stats(sds[sds["term"] == row.term]) for row in sds.itertuples()},
             **random}
    n_trials = int(data.obs["n"].sum())
    diag = {
        "n_trials": n_trials, "n_obs": len(data.obs),
        "n_questions": len(data.levels["question"]),
        "groups": {g: len(data.levels[g]) for g in data.group_codes},
        "trials_per_level": {g: n_trials / len(data.levels[g]) for g in data.group_codes},
        "factors": {f: data.levels[f] for f in data.factors},
        "interactions": [interaction_name(a, b) for a, b in data.interactions],
        "dropped": data.dropped, "centred": resolve_centred(data, spec.centred),
        "nested": {g: f for g, f in data.nested.items() if f},
        "draws": sampler.draws, "tune": sampler.tune, "chains": sampler.chains,
        "cores": cores, "seed": sampler.seed, "adaptation": sampler.adaptation,
        "target_accept": sampler.target_accept,
        "diag_levels_per_group": DIAG_LEVELS,
        "divergences": int(diverging.sum()),
        "max_r_hat_fixed": parts["fixed effects"]["max R-hat"],
        "max_r_hat": float(max(p["max R-hat"] for p in parts.values())),
        "min_ess_bulk_fixed": parts["fixed effects"]["min bulk ESS"],
        "min_ess_tail_fixed": parts["fixed effects"]["min tail ESS"],
        # the parts the ESS checks read (single random intercepts are checked by R-hat only)
        "min_ess_bulk": float(min(p["min bulk ESS"] for part, p in parts.items()
                                  if not part.startswith("intercepts["))),
        "min_ess_tail": float(min(p["min tail ESS"] for part, p in parts.items()
                                  if not part.startswith("intercepts["))),
        "max_r_hat_group_means": float(max(p["max R-hat"] for part, p in parts.items()
                                           if part.startswith("intercept means["))
                                       if data.group_codes else float("nan")),
        "max_r_hat_random": {g: parts[f"intercepts[{g}]"]["max R-hat"]
                             for g in data.group_codes},
        "parts": parts,
        "mean_tree_depth": float(np.nanmean(depth)),
        "step_size": float(np.nanmean(np.asarray(stats["step_size"].values)))
        if "step_size" in stats else None,
        "ppc_inside_share": float(ppc["inside"].mean()),
        "ppc_outside": ppc.loc[~ppc["inside"], "cell"].tolist(),
    }
    diag["thresholds"] = {"r_hat_max": RHAT_MAX, "ess_bulk_min": ESS_MIN_PER_CHAIN * sampler.chains,
                          "ess_tail_min": ESS_MIN_PER_CHAIN * sampler.chains,
                          "divergences_max": 0}
    problems = convergence_problems(convergence_checks(diag))
    diag["converged"] = not problems
    diag["convergence_problems"] = problems
    diag["advice"] = convergence_advice(diag)
    diag["rhat_ok"] = bool(diag["max_r_hat"] <= RHAT_MAX)
    return diag


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
