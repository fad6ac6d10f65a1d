"""The PyMC model of the factor analysis, sampled in whitened coordinates.

``logit P(correct) = Intercept + Σ_f β_f[level] + Σ_(f1,f2) γ_f1,f2[l1, l2] + u_question +
u_pair + u_volume`` on binomial counts (:mod:`mislib.analysis`). The fixed effects and the
random intercepts' cell means are one whitened vector (:func:`mislib.analysis.fixed_design`);
the rest of each random intercept is non-centred by default (``u = σ·z``), or centred for the
groups :func:`resolve_centred` names.

>>> from mislib.analysis import prepare_factor_data
>>> from mislib.simulate import simulate_study, scored_table
>>> data = prepare_factor_data(scored_table(simulate_study(n_questions=200, n_trials=2)))
>>> model = build_model(data)                                  # doctest: +SKIP
>>> sorted(v.name for v in model.free_RVs)[:2]                 # doctest: +SKIP
['fixed_whitened', 'sd_question']
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mislib.analysis.data import GROUPS, FactorData
from mislib.analysis.design import fixed_design


def _dim(name: str, data: FactorData) -> str:
    return name if name in data.group_codes or name == "question" else f"{name}_level"


def resolve_centred(data: FactorData, centred: str | Sequence[str] = "auto",
                    min_trials: float = 250.0) -> list[str]:
    """The random-intercept groups to sample centred.

    ``"auto"`` centres a group when its levels carry on average at least ``min_trials``
    trials each: then the data pin each intercept down and the centred form has no funnel,
    while sparsely observed levels (a question seen 10 times) sample better non-centred.
    The default threshold comes from simulated studies with SDs of 0.2-0.6 on the logit
    scale: volumes with ~200 trials each still left the centred SD mixing slowly, ~300 did
    not (bench/RESULTS.md).
    Otherwise ``centred`` lists the groups.
    """
    if isinstance(centred, str):
        if centred != "auto":
            raise ValueError(f"centred must be 'auto' or a list of groups, got {centred!r}")
        total = float(data.obs["n"].sum())
        return [g for g in data.group_codes if total / len(data.levels[g]) >= min_trials]
    unknown = set(centred) - set(GROUPS)
    if unknown:
        raise ValueError(f"centred names unknown group(s) {sorted(unknown)}; known: {GROUPS}")
    return [g for g in data.group_codes if g in centred]


def build_model(data: FactorData, centred: str | Sequence[str] = (),
                prior_sd: float = 1.0, interaction_sd: float = 0.5,
                group_sd_scale: float = 1.0):
    """The PyMC model of :class:`~mislib.analysis.FactorData` (see :mod:`mislib.analysis`).

    Parameters
    ----------
    centred : random-intercept groups sampled centred (``u ~ Normal(0, σ)``), the others
        non-centred (``u = σ·z``, ``z ~ Normal(0, 1)``); ``"auto"``: :func:`resolve_centred`.
    prior_sd : scale of ``ZeroSumNormal`` main effects and of the intercept (logit).
    interaction_sd : scale of the interaction effects (logit).
    group_sd_scale : scale of the ``HalfNormal`` prior on each random-intercept SD.

    Returns
    -------
    pymc.Model with free variables ``fixed_whitened`` (:class:`~mislib.analysis.FixedDesign`),
    ``sd_<group>`` and ``u_<group>`` (centred) or ``z_<group>``, and deterministics
    ``Intercept``, one per factor and interaction (named ``f`` and ``f1:f2``) and
    ``mean_<group>`` (the block means of the group's intercepts).
    """
    import pymc as pm

    centred = resolve_centred(data, centred)
    # Dimension names get a suffix: PyMC forbids a variable named like a dimension.
    coords = {_dim(name, data): data.levels[name] for name in data.levels}
    # The fixed part of the logit depends only on a row's factor levels, so it is computed
    # once per distinct combination of levels ("pattern", a few hundred) and then gathered:
    # one gather per row instead of one per factor keeps the gradient cheap at 10^5 rows.
    design = fixed_design(data, prior_sd=prior_sd, interaction_sd=interaction_sd)
    coords["fixed_coef"] = design.coef_names
    for g, (cells, _) in design.group_means.items():
        coords[f"{g}_cell"] = cells.labels

    with pm.Model(coords=coords) as model:
        sds = {g: pm.HalfNormal(f"sd_{g}", group_sd_scale) for g in data.group_codes}
        eta_pattern = _fixed_part(data, design, sds)
        u_total = _random_part(data, design, sds, centred)
        _binomial_likelihood(data, eta_pattern[design.pattern_of_row], u_total)
    return model


def _fixed_part(data: FactorData, design, sds):
    """The fixed part of the logit per pattern [n_pattern], with its deterministics.

    Sampled in whitened coordinates (:class:`~mislib.analysis.FixedDesign`): ``theta =
    mode + transform @ w``. The priors ``theta_j ~ Normal(0, scale_j)`` are, for the fixed
    effects, exactly the ``ZeroSumNormal`` ones and, for the cell means, standard normal
    (non-centred). The map is linear (constant Jacobian); ``w``'s own standard normal is
    taken out again.
    """
    import pymc as pm
    import pytensor.tensor as pt

    w = pm.Normal("fixed_whitened", 0.0, 1.0, dims="fixed_coef")
    theta = design.mode + pt.dot(design.transform, w)
    pm.Potential("fixed_prior", -0.5 * pt.sum(pt.sqr(theta / design.scale))
                 + 0.5 * pt.sum(pt.sqr(w)))
    for name, sl, basis, shape in design.blocks:
        value = theta[sl] if basis is None else pt.dot(basis, theta[sl])
        if name == "Intercept":
            pm.Deterministic(name, value[0])
        else:
            dims = tuple(_dim(f, data) for f in name.split(":"))
            pm.Deterministic(name, value.reshape(shape), dims=dims)
    n_fixed = design.n_fixed
    eta_pattern = pt.dot(design.matrix[:, :n_fixed], theta[:n_fixed])
    for g, (cells, sl) in design.group_means.items():
        pm.Deterministic(f"mean_{g}", sds[g] * pt.dot(cells.basis, theta[sl]),
                         dims=f"{g}_cell")
        eta_pattern = eta_pattern + sds[g] * pt.dot(design.matrix[:, sl], theta[sl])
    return eta_pattern


def _random_part(data: FactorData, design, sds, centred: Sequence[str]):
    """Each question's total random intercept [n_questions].

    The random intercepts less their projection on the cells' basis (GroupCells): pair and
    volume intercepts sum to zero within each block, question intercepts sum to zero over
    every level of every question-level factor; the projections are the cell means of
    :func:`_fixed_part`.
    """
    import pymc as pm
    import pytensor.tensor as pt

    u_total = pt.zeros(len(data.levels["question"]))
    for g, gcodes in data.group_codes.items():
        sd = sds[g]
        if g in centred:
            raw = pm.Normal(f"u_{g}", 0.0, sd, dims=g)
        else:
            raw = pm.Normal(f"z_{g}", 0.0, 1.0, dims=g)
        cells = design.group_means[g][0]
        sums = pt.inc_subtensor(pt.zeros(len(cells.sizes))[cells.cell], raw)
        u = raw - pt.dot(cells.basis, pt.dot(cells.basis.T, sums))[cells.cell]
        if g not in centred:
            u = sd * u
        u_total = u_total + (u if g == "question" else u[gcodes])
    return u_total


def _binomial_likelihood(data: FactorData, eta_rows, u_total) -> None:
    """The binomial log-likelihood of the counts (without its constant coefficient)."""
    import pymc as pm
    import pytensor.tensor as pt

    n = data.obs["n"].to_numpy()
    k = data.obs["k"].to_numpy()
    n_q = len(data.levels["question"])
    n_blocks, rem = divmod(len(data.obs), n_q)
    if rem == 0 and np.array_equal(data.question_index, np.tile(np.arange(n_q), n_blocks)):
        # Every (model, arm) answered every question (the paired design): add the question
        # intercepts by broadcasting over a [block, question] grid, whose gradient is a sum,
        # instead of gathering and scattering per row.
        eta = eta_rows.reshape((n_blocks, n_q)) + u_total[None, :]
        k, n = k.reshape(n_blocks, n_q), n.reshape(n_blocks, n_q)
    else:
        eta = eta_rows + u_total[data.question_index]
    pm.Potential("correct", pt.sum(k * eta - n * pt.softplus(eta)))
