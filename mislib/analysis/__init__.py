"""Stage 07: a hierarchical logistic model of which benchmark factor breaks grounding.

The model
---------
Trials are aggregated to binomial counts, one row per (model, arm, question): ``n`` trials,
``k`` correct. The logit of accuracy is

``Intercept + Σ_f β_f[level] + Σ_(f1,f2) γ_f1,f2[l1, l2] + u_question + u_pair + u_volume``

- ``β_f`` — one vector per factor (:data:`FACTORS`: arm, model, modality, plane, dims,
  convention, prompt, terminology, form, family, ablation), a **sum-to-zero deviation** per
  level (``pm.ZeroSumNormal``), so ``Intercept`` is the logit at the average level of every factor.
  A factor that does not apply to a question (no prompt on a text-only question, no
  terminology on a plane-naming question) is null there and adds nothing.
- ``γ_f1,f2`` — the interactions the paper's claims need (default convention × terminology,
  prompt × terminology, ablation × terminology, arm × model), sum-to-zero along both axes.
- crossed random intercepts ``u_g ~ Normal(0, σ_g)``, iid, for the question, the structure
  pair (the order-free pair of structures a question names) and the volume. Their means are
  not constrained away, so the fixed effects are population effects whose intervals
  include the uncertainty of, say, the mean intercept of the plane questions.

How it is sampled (nutpie: NUTS, diagonal mass matrix, numba backend). A diagonal mass
matrix cannot follow correlated directions, and the plain form of this model has three
kinds of them; each is removed by an exact reparameterisation:

1. *The design.* Levels are unbalanced (a rare ablation level ties to the intercept) and
   ``dims`` is separated from ``family`` by plane questions only (relation questions carry
   the dims their family implies). The fixed effects are therefore one vector ``theta`` in
   orthonormal sum-to-zero coordinates (priors exactly the ``ZeroSumNormal`` ones), sampled
   as ``theta = mode + transform @ w`` with ``transform`` from a Laplace approximation of
   the binomial GLM on the pattern counts (:class:`FixedDesign`).
2. *Random-intercept means against fixed effects.* The mean intercept of a block of pair or
   volume levels that no question links (MRI against CT volumes; single structures of plane
   questions against two-structure pairs: ``family`` is partly nested in ``pair``,
   :func:`~mislib.analysis.data._linked_levels`) trades off against the factor that splits them, and the mean
   question intercept over, say, the plane questions against ``family[plane]``: ridges
   through hundreds to thousands of coordinates. The intercepts are split exactly into
   the part spanned by those means (:class:`GroupCells`: block indicators for pairs and
   volumes, every level of every question-level factor and interaction for questions;
   a few dozen standard-normal coordinates that join ``theta`` and its whitening) and the
   rest, which sums to zero over each of those levels and blocks.
3. *Funnels.* The remaining intercepts are non-centred, ``u = σ·z``, by default; ``centred``
   can name groups to centre, and ``"auto"`` centres a group with >= 250 trials per level.

Measured effects of these reparameterisations at the paper's scale are in
``bench/RESULTS.md``.

A factor or interaction with fewer than two observed levels (``model`` in a one-model run,
``convention`` when only one was rendered) is dropped and listed in the diagnostics, and so
is a pair or volume intercept whose levels hold fewer than two questions on average (a small
run where nearly every question names its own pair): it cannot be told apart from the
question intercept.

The package, in the order the data flows through it
---------------------------------------------------
:mod:`~mislib.analysis.data`
    trials → binomial counts and factor codes (:func:`prepare_factor_data`).
:mod:`~mislib.analysis.design`
    sum-to-zero bases, the random-intercept cells, the whitened fixed-effect design.
:mod:`~mislib.analysis.model`
    the PyMC model (:func:`build_model`).
:mod:`~mislib.analysis.fit`
    sampling with nutpie, summaries and diagnostics (:func:`fit_factor_model`).
:mod:`~mislib.analysis.contrasts`
    probability-scale contrasts and the posterior predictive check.
:mod:`~mislib.analysis.stage`
    stage 07 on disk (:func:`run_factor_analysis`). Its figures are in :mod:`mislib.plots`
    (the section "Notebook 07").
:mod:`~mislib.analysis.recovery`
    the recovery study: planted effects shaped like the paper's, refitted
    (:func:`run_recovery`, ``recovery.parquet``).

Convergence binds
-----------------
A fit is ``converged`` when R-hat <= :data:`RHAT_MAX` (1.01) everywhere, bulk and tail ESS
>= :data:`ESS_MIN_PER_CHAIN` (100) per chain for the fixed effects, SDs and intercept means,
and there is no divergence (:func:`convergence_checks`). The verdict, the failed checks and
what to change (:func:`convergence_advice`) are in ``factor_diagnostics.json``; figures of
a fit that did not converge are stamped NOT CONVERGED.

Outputs (``data/analysis/``)
----------------------------
``factor_effects.parquet``
    One row per fixed effect on the **logit scale**: ``term`` (``Intercept``,
    ``<factor>[<level>]`` or ``<f1>[<l1>]:<f2>[<l2>]``), ``mean, sd, lo95, hi95`` (central
    95 % interval), ``r_hat, ess_bulk``; plus ``ess_tail``.
``factor_sd.parquet``
    The random-intercept standard deviations, ``term`` ``sd[question]`` etc., same columns.
``contrasts.parquet``
    Accuracies on the **probability scale** with 95 % intervals. Columns ``contrast, kind,
    factors, mean, sd, lo95, hi95, observed, n_trials``. Names:

    - ``p[<factor>=<level>]`` (``kind="level"``) and ``p[<f1>=<l1>,<f2>=<l2>]``
      (``kind="cell"``, for each interaction in the model and always for arm × model when
      both vary): the expected accuracy of the benchmark's own trials in that level or cell,
      averaged over *new* draws of the random intercepts (population-averaged; not
      conditional on the fitted question effects). ``observed`` is the raw accuracy of the
      same trials, ``n_trials`` their number. Examples: ``p[family=plane]``,
      ``p[dims=3d]``, ``p[ablation=text_only,terminology=colloquial]``.
    - ``<A> - <B>`` (``kind="difference"``; ``observed`` is the raw difference and
      ``n_trials`` counts both sides) where ``<A>``, ``<B>`` are two of the names
      above that differ in one factor: every pair of levels of each factor, and within each
      level of one factor of an interaction every pair of levels of the other. Examples:
      ``p[arm=semsam,model=<id>] - p[arm=baseline,model=<id>]`` (SemSam's gain per model),
      ``p[convention=standard,terminology=colloquial] -
      p[convention=standard,terminology=anatomical]``,
      ``p[prompt=box,terminology=colloquial] - p[prompt=mask,terminology=colloquial]``,
      ``p[family=relation_3d] - p[family=relation_2d]``, ``p[dims=3d] - p[dims=2d]``.
      The first name is the minuend. Levels are ordered as the benchmark lists them, and a
      pair appears once: ``a - b`` with ``a`` after ``b`` in that order (arm: semsam after
      baseline; dims: 3d after 2d; terminology: colloquial after anatomical; prompt: none,
      mask, box, point; ablation: none, text_only, blank; ...), so read ``-mean`` for the
      other direction.
``ppc.parquet``
    The posterior predictive check per level of every benchmark factor (in the model or
    not) and per cell of the model's and the default interactions: ``cell`` (named like
    the contrasts), ``factors, in_model, observed, n_trials, pp_mean, pp_lo95, pp_hi95``
    (raw and replicated accuracy), and the misfit of the cell's accuracy relative to the
    trials its factor applies to: ``residual`` (observed − mean replicate), ``res_lo95,
    res_hi95`` (the replicates' band around that mean), ``p_value`` (two-sided posterior
    predictive) and ``inside``. Replicates use new random intercepts (a *mixed* predictive
    check), so a cell outside its band means the factor structure misses something (an
    omitted factor or interaction), not that one question is odd.
``factor_diagnostics.json``
    ``converged`` (bool), ``convergence_problems`` (the failed checks, one sentence each),
    ``advice`` (what to change in ``[analysis]``), ``thresholds``; divergences, R-hat and
    bulk/tail ESS per part (``parts``: fixed effects, each SD, each group's intercepts and
    their means ``mean_<group>`` per cell of :class:`GroupCells`), sampling settings, sizes,
    timings, dropped terms, ``ppc_outside`` (the cells outside their band).
``factor_posterior.zarr``
    The posterior of the fixed effects and SDs (no per-question intercepts) with sample
    stats, for trace and rank plots.

>>> from mislib.simulate import simulate_study, scored_table
>>> scored = scored_table(simulate_study(n_questions=300, n_trials=2, seed=3))
>>> data = prepare_factor_data(scored)
>>> data.factors[:3], int(data.obs["n"].sum()) == len(scored)
(['arm', 'model', 'modality'], True)
"""

from mislib.analysis.contrasts import check_cells, compute_contrasts, posterior_predictive_check
from mislib.analysis.data import (
    FACTORS,
    GROUPS,
    INTERACTIONS,
    MIN_QUESTIONS_PER_LEVEL,
    FactorData,
    aggregate_trials,
    prepare_factor_data,
)
from mislib.analysis.design import (
    FixedDesign,
    GroupCells,
    fixed_design,
    group_cells,
    sum_to_zero_basis,
)
from mislib.analysis.fit import (
    DIAG_LEVELS,
    ESS_MIN_PER_CHAIN,
    RHAT_MAX,
    FactorFit,
    ModelSpec,
    SamplerSettings,
    convergence_advice,
    convergence_checks,
    fit_factor_model,
    settings_from_params,
)
from mislib.analysis.model import build_model, resolve_centred
from mislib.analysis.recovery import Recovery, recovery_table, run_recovery
from mislib.analysis.stage import (
    OUTPUTS,
    FactorAnalysis,
    claim_contrasts,
    convergence_report,
    diagnostics_summary,
    fit_provenance,
    load_scored,
    read_convergence,
    read_diagnostics,
    read_outputs,
    run_factor_analysis,
    stamp_params,
    write_outputs,
    write_simulated_study,
)
from mislib.vocabulary import LEVEL_ORDER, structure_pair

__all__ = [
    "DIAG_LEVELS", "ESS_MIN_PER_CHAIN", "FACTORS", "GROUPS", "INTERACTIONS", "LEVEL_ORDER",
    "MIN_QUESTIONS_PER_LEVEL", "OUTPUTS", "RHAT_MAX", "FactorAnalysis", "FactorData",
    "FactorFit", "FixedDesign", "GroupCells", "ModelSpec", "Recovery", "SamplerSettings",
    "aggregate_trials", "build_model", "check_cells", "claim_contrasts", "compute_contrasts",
    "convergence_advice", "convergence_checks", "convergence_report", "diagnostics_summary",
    "fit_factor_model",
    "fit_provenance", "fixed_design", "group_cells", "load_scored",
    "posterior_predictive_check", "prepare_factor_data", "read_convergence",
    "read_diagnostics", "read_outputs",
    "recovery_table", "resolve_centred", "run_factor_analysis", "run_recovery",
    "settings_from_params", "stamp_params", "structure_pair", "sum_to_zero_basis",
    "write_outputs", "write_simulated_study",
]
