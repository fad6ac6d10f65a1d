"""Contrasts on the probability scale and the posterior predictive check.

Both read the posterior of the fixed effects and the random-intercept SDs. Contrasts are the
expected accuracy of the benchmark's own trials in each factor level and interaction cell,
averaged over *new* draws of the random intercepts (population-averaged), and the
differences of two such cells that differ in one factor; names come from
:func:`mislib.vocabulary.cell_name` and :func:`mislib.vocabulary.difference_name`.

>>> from mislib.analysis import FactorData
>>> data = FactorData(obs=None, factors=["dims"], levels={"dims": ["2d", "3d"]},
...                   interactions=[], codes={}, question_index=None, group_codes={})
>>> [name for name, _, _ in _cells(data)]
['p[dims=2d]', 'p[dims=3d]']
>>> [name for name, *_ in _differences(data, _cells(data))]
['p[dims=3d] - p[dims=2d]']
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from mislib.analysis.data import FactorData, patterns
from mislib.vocabulary import cell_name, difference_name, interaction_name, ordered


def _flat_draws(post, name: str) -> np.ndarray:
    arr = np.asarray(post[name].values)
    return arr.reshape(-1, *arr.shape[2:])


def _eta_fixed(post, data: FactorData, pattern_codes: np.ndarray,
               draw_index: np.ndarray) -> np.ndarray:
    """Fixed-effect logit [n_draw, n_pattern] for factor codes [n_pattern, n_factor]."""
    col = {f: j for j, f in enumerate(data.factors)}
    eta = _flat_draws(post, "Intercept")[draw_index][:, None] + np.zeros(len(pattern_codes))
    for f in data.factors:
        beta = _flat_draws(post, f)[draw_index]
        beta = np.concatenate([beta, np.zeros((len(beta), 1))], axis=1)
        eta += beta[:, pattern_codes[:, col[f]]]
    for f1, f2 in data.interactions:
        g = _flat_draws(post, interaction_name(f1, f2))[draw_index]
        g = np.pad(g, ((0, 0), (0, 1), (0, 1)))
        eta += g[:, pattern_codes[:, col[f1]], pattern_codes[:, col[f2]]]
    return eta


def _total_sd(post, data: FactorData, draw_index: np.ndarray) -> np.ndarray:
    var = np.zeros(len(draw_index))
    for g in data.group_codes:
        var += _flat_draws(post, f"sd_{g}")[draw_index] ** 2
    return np.sqrt(var)


def _marginal_p(eta: np.ndarray, sd: np.ndarray, n_nodes: int = 24) -> np.ndarray:
    """E[invlogit(eta + u)], u ~ Normal(0, sd²) per draw (Gauss–Hermite), same shape as eta."""
    x, w = np.polynomial.hermite_e.hermegauss(n_nodes)
    w = w / w.sum()
    out = np.zeros_like(eta)
    for xj, wj in zip(x, w, strict=True):
        out += wj / (1.0 + np.exp(-(eta + xj * sd[:, None])))
    return out


def _cells(data: FactorData) -> list[tuple[str, tuple[str, ...], dict[str, int]]]:
    """(name, factors, {factor: level code}) of every level and interaction cell."""
    out = []
    for f in data.factors:
        for i, lv in enumerate(data.levels[f]):
            out.append((cell_name(**{f: lv}), (f,), {f: i}))
    pairs = list(data.interactions)
    if "arm" in data.factors and "model" in data.factors and ("arm", "model") not in pairs:
        pairs.append(("arm", "model"))
    for f1, f2 in pairs:
        for i, a in enumerate(data.levels[f1]):
            for j, b in enumerate(data.levels[f2]):
                out.append((cell_name(**{f1: a, f2: b}), (f1, f2), {f1: i, f2: j}))
    return out


def _differences(data: FactorData, cells) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(name, minuend, subtrahend, factors): every pair of levels differing in one factor."""
    by_name = {name: (factors, assign) for name, factors, assign in cells}
    out = []
    for name_a, (factors, assign_a) in by_name.items():
        for name_b, (factors_b, assign_b) in by_name.items():
            if factors != factors_b:
                continue
            differ = [f for f in factors if assign_a[f] != assign_b[f]]
            if len(differ) == 1 and assign_a[differ[0]] > assign_b[differ[0]]:
                out.append((difference_name(name_a, name_b), name_a, name_b, factors))
    return out


def _interval(x: np.ndarray) -> tuple[float, float, float, float]:
    lo, hi = np.quantile(x, [0.025, 0.975])
    return float(x.mean()), float(x.std(ddof=1)), float(lo), float(hi)


def compute_contrasts(post, data: FactorData, max_draws: int = 1000) -> pd.DataFrame:
    """Levels, cells and their differences on the probability scale.

    Parameters
    ----------
    post : the posterior group of a fit (``Intercept``, one variable per factor and
        interaction, ``sd_<group>``).
    data : the coded data the model was fitted to.
    max_draws : posterior draws used (evenly thinned).

    Returns
    -------
    DataFrame ``contrast, kind`` (``level``, ``cell`` or ``difference``), ``factors, mean,
    sd, lo95, hi95, observed, n_trials`` (see :mod:`mislib.analysis`, ``contrasts.parquet``).
    """
    n_total = _flat_draws(post, "Intercept").shape[0]
    draw_index = np.unique(np.linspace(0, n_total - 1, min(max_draws, n_total)).astype(int))
    codes, _, counts = patterns(data)
    p = _marginal_p(_eta_fixed(post, data, codes, draw_index), _total_sd(post, data, draw_index))
    col = {f: j for j, f in enumerate(data.factors)}
    weights = counts["n"].to_numpy()
    rows, values, observed, n_trials = [], {}, {}, {}
    cells = _cells(data)
    for name, factors, assign in cells:
        mask = np.all([codes[:, col[f]] == c for f, c in assign.items()], axis=0)
        n_cell = weights[mask].sum()
        if n_cell == 0:
            continue  # a cell no trial is in (e.g. a prompt on a text-only question)
        values[name] = p[:, mask] @ weights[mask] / n_cell
        observed[name] = float(counts["k"].to_numpy()[mask].sum() / n_cell)
        n_trials[name] = int(n_cell)
        rows.append({"contrast": name, "kind": "cell" if len(factors) > 1 else "level",
                     "factors": ":".join(factors),
                     **dict(zip(("mean", "sd", "lo95", "hi95"), _interval(values[name]),
                                strict=True)),
                     "observed": observed[name], "n_trials": n_trials[name]})
    for name, a, b, factors in _differences(data, cells):
        if a in values and b in values:
            rows.append({"contrast": name, "kind": "difference", "factors": ":".join(factors),
                         **dict(zip(("mean", "sd", "lo95", "hi95"),
                                    _interval(values[a] - values[b]), strict=True)),
                         "observed": observed[a] - observed[b],
                         "n_trials": n_trials[a] + n_trials[b]})
    return pd.DataFrame(rows)


def check_cells(check: pd.DataFrame, interactions: Sequence[str | tuple[str, str]] = ()
                ) -> list[tuple[str, str, np.ndarray]]:
    """The cells a predictive check compares: ``(name, factors, mask over rows)``.

    Every level of every column of ``check`` with two or more observed levels, and every
    cell of the ``interactions`` (``"f1:f2"``) whose two columns are there; a row where a
    factor is null (it does not apply) is in none of that factor's cells.

    >>> check = pd.DataFrame({"dims": ["2d", "3d", "3d"], "form": ["open"] * 3})
    >>> [(name, int(mask.sum())) for name, _, mask in check_cells(check)]
    [('p[dims=2d]', 1), ('p[dims=3d]', 2)]
    """
    cols = {c: check[c].astype(object).where(check[c].notna()) for c in check.columns}
    levels = {c: ordered(c, v) for c, v in cols.items()}
    out = []
    for c, lv in levels.items():
        if len(lv) < 2:
            continue
        for level in lv:
            out.append((cell_name(**{c: level}), c, (cols[c] == level).to_numpy()))
    for item in interactions:
        f1, f2 = item.split(":") if isinstance(item, str) else item
        if f1 not in cols or f2 not in cols or min(len(levels[f1]), len(levels[f2])) < 2:
            continue
        for a in levels[f1]:
            for b in levels[f2]:
                mask = ((cols[f1] == a) & (cols[f2] == b)).to_numpy()
                if mask.any():
                    out.append((cell_name(**{f1: a, f2: b}), interaction_name(f1, f2), mask))
    return out


def posterior_predictive_check(post, data: FactorData, n_draws: int = 200, seed: int = 0,
                               check: pd.DataFrame | None = None,
                               interactions: Sequence[str | tuple[str, str]] | None = None,
                               ) -> pd.DataFrame:
    """Observed accuracy per factor level and cell against mixed posterior replicates.

    For each of ``n_draws`` thinned posterior draws: new random intercepts for every
    question, pair and volume from their fitted SDs, then ``k_rep ~ Binomial(n, p)`` per
    (model, arm, question) row, aggregated to each cell's accuracy. The cells come from
    ``check`` (one row per row of ``data.obs``, one column per factor to check; default:
    the model's factors), so a factor the model leaves out is checked too: its levels'
    replicates all share one accuracy, and an effect the model omits shows as misfit.

    The test quantity is a cell's accuracy **relative to its scope**, the trials where the
    cell's factor(s) apply (for ``p[terminology=colloquial]``: every trial with a
    terminology): a shift common to every cell — the uncertain intercept, the mean of new
    volume intercepts — cancels from it, so the band measures what the factor structure
    leaves unexplained instead of the overall level. ``residual`` is the observed relative
    accuracy minus the replicates' mean, ``res_lo95, res_hi95`` the replicates' central
    95 % band around that mean, ``p_value`` the two-sided posterior predictive p-value
    ``2·min(P(rep ≥ obs), P(rep ≤ obs))`` (capped at 1; ties count on both sides), and
    ``inside`` whether the residual lies in its band.

    Parameters
    ----------
    interactions : cells of these pairs of ``check`` columns are checked too (default: the
        model's interactions and arm × model).

    Returns
    -------
    DataFrame ``cell, factors, in_model, observed, n_trials, pp_mean, pp_lo95, pp_hi95,
    residual, res_lo95, res_hi95, p_value, inside``: ``observed`` and ``pp_*`` are the
    cell's raw and replicated accuracies (for reading); ``in_model`` says whether the cell's
    factor (or interaction) is a term of the model.
    """
    rng = np.random.default_rng(seed)
    n_total = _flat_draws(post, "Intercept").shape[0]
    draw_index = np.unique(np.linspace(0, n_total - 1, min(n_draws, n_total)).astype(int))
    codes, inverse, _ = patterns(data)
    eta_pattern = _eta_fixed(post, data, codes, draw_index)
    n = data.obs["n"].to_numpy()
    k = data.obs["k"].to_numpy()
    if check is None:
        check = data.obs[data.factors]
    if len(check) != len(data.obs):
        raise ValueError(f"check has {len(check)} rows, the data {len(data.obs)}: one row "
                         "per (model, arm, question) row of data.obs")
    if interactions is None:
        interactions = [*data.interactions, ("arm", "model")]
    check = check.reset_index(drop=True)
    cells = [(name, factors, mask) for name, factors, mask in
             check_cells(check, interactions) if n[mask].sum() > 0]
    if not cells:
        raise ValueError("no factor in the check has two observed levels: nothing to check")
    applies = {c: check[c].notna().to_numpy() for c in check.columns}
    scopes = [np.all([applies[f] for f in factors.split(":")], axis=0)
              for _, factors, _ in cells]
    onehot = np.stack([m for _, _, m in cells], axis=1).astype(float)  # [n_obs, n_cell]
    scope = np.stack(scopes, axis=1).astype(float)
    sds = {g: _flat_draws(post, f"sd_{g}")[draw_index] for g in data.group_codes}
    rep = np.empty((len(draw_index), onehot.shape[1]))
    rep_scope = np.empty_like(rep)
    for s in range(len(draw_index)):
        eta = eta_pattern[s, inverse].copy()
        u_q = np.zeros(len(data.levels["question"]))
        for g, gcodes in data.group_codes.items():
            u_q += rng.normal(0.0, sds[g][s], len(data.levels[g]))[gcodes]
        eta += u_q[data.question_index]
        k_rep = rng.binomial(n, 1.0 / (1.0 + np.exp(-eta)))
        rep[s] = (k_rep @ onehot) / (n @ onehot)
        rep_scope[s] = (k_rep @ scope) / (n @ scope)
    observed = (k @ onehot) / (n @ onehot)
    obs_rel = observed - (k @ scope) / (n @ scope)
    rep_rel = rep - rep_scope
    centre = rep_rel.mean(0)
    lo, hi = np.quantile(rep_rel, [0.025, 0.975], axis=0)
    p_value = np.minimum(1.0, 2.0 * np.minimum((rep_rel >= obs_rel - 1e-12).mean(0),
                                               (rep_rel <= obs_rel + 1e-12).mean(0)))
    pp_lo, pp_hi = np.quantile(rep, [0.025, 0.975], axis=0)
    terms = {*data.factors, *(interaction_name(a, b) for a, b in data.interactions)}
    return pd.DataFrame({
        "cell": [c[0] for c in cells], "factors": [c[1] for c in cells],
        "in_model": [c[1] in terms for c in cells],
        "observed": observed, "n_trials": (n @ onehot).astype(int), "pp_mean": rep.mean(0),
        "pp_lo95": pp_lo, "pp_hi95": pp_hi, "residual": obs_rel - centre,
        "res_lo95": lo - centre, "res_hi95": hi - centre, "p_value": p_value,
        "inside": (obs_rel >= lo) & (obs_rel <= hi)})
