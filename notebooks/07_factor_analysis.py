# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: MIS-Ground (mislib)
#     language: python
#     name: mis-ground
# ---

# %% [markdown]
# # 07 — Which factor breaks grounding? A hierarchical factor model
#
# Stage 06 gave accuracies per factor level one factor at a time. The benchmark's factors
# are crossed, and the same questions recur across models and decoding arms, so one level's
# raw accuracy mixes in the others. Here every trial enters one logistic model:
#
# $$\operatorname{logit} P(\text{correct}) = \alpha + \sum_f \beta_f[\ell_f]
#   + \sum_{(f,g)} \gamma_{fg}[\ell_f, \ell_g] + u_{\text{question}} + u_{\text{pair}}
#   + u_{\text{volume}}$$
#
# with trials aggregated to binomial counts per (model, arm, question). Each factor's
# levels are sum-to-zero deviations (`ZeroSumNormal`), so $\alpha$ is the logit at the
# average level of every factor and each $\beta$ reads as "this level against the average
# level". The interactions are those the paper's claims rest on: convention ×
# terminology, visual prompt × terminology, ablation × terminology and arm × model.
# Crossed random intercepts absorb what is particular to a question, to the pair of
# structures it names and to the volume. A pair or volume intercept whose levels hold fewer
# than two questions on average cannot be told apart from the question intercept and is
# dropped (listed below). The sampler is nutpie's NUTS with a diagonal mass matrix, which
# cannot follow correlated directions; three exact reparameterisations remove them
# (`mislib.analysis`, and docs/design.md, "The analysis"): the fixed effects are sampled in
# coordinates whitened by a Laplace approximation (unbalanced levels; `dims` is told apart
# from `family` by plane questions only); the means of the random intercepts that a fixed
# effect could stand in for (MRI volumes against modality, the single structures of plane
# questions against `family`, the plane questions' intercepts against `family[plane]`)
# are sampled with the fixed effects; the rest of each intercept is non-centred. What they
# changed at the paper's scale is measured in `bench/RESULTS.md`.
#
# The notebook reads the real scored trials of stage 06 (`data/analysis/scored.parquet`).
# Set `simulated_questions` to analyse a simulated study with known effects instead; it is
# written to `build/sim07/` and every output is labelled as simulated. Every figure carries
# a stamp naming the profile, model(s), runs and counts, and says NOT CONVERGED when the fit
# failed its convergence checks.
#
# The last section is a **recovery study**: effects shaped like the paper's findings are
# planted in a simulated study, the same model is fitted, and the planted values are set
# against the recovered intervals. It is the evidence that the model finds effects that
# are there; the demo's random model has none to find.

# %% tags=["parameters"]
profile = "demo"
force = False
draws = None  # NUTS draws per chain (None: [analysis] draws of the profile)
tune = None  # warm-up per chain
chains = None
centred = None  # groups to sample centred, or "auto" (None: the profile value, no group)
target_accept = None  # NUTS step-size target (None: the profile value)
simulated_questions = None  # e.g. 3000: analyse a simulated study, not the real results
recovery_questions = 600  # size of the recovery study (questions × 2 models × 2 arms)
recovery_trials = 5  # trials per (model, arm, question) of the recovery study
recovery_draws = 2000  # NUTS draws per chain of the recovery fit
recovery_seed = 1

# %%
from IPython.display import Markdown

from mislib.analysis import (
    claim_contrasts,
    convergence_checks,
    convergence_report,
    diagnostics_summary,
    fit_provenance,
    run_factor_analysis,
    run_recovery,
    write_simulated_study,
)
from mislib.paths import project_paths
from mislib.plots import factor_analysis_figures, recovery_figure, save_figure
from mislib.provenance import caption
from mislib.simulate import HEADLINE_TERMS

NOTEBOOK = "07_factor_analysis"
root = write_simulated_study(simulated_questions) if simulated_questions else None
label = (f"SIMULATED study ({int(simulated_questions)} questions, known effects)"
         if simulated_questions else "benchmark results")
fa = run_factor_analysis(profile, root=root, force=force, draws=draws, tune=tune,
                         chains=chains, centred=centred, target_accept=target_accept)
provenance = fit_provenance(fa, profile, root=root)
figures = factor_analysis_figures(fa, label)
saved = {name: save_figure(fig, name, root=root, notebook=NOTEBOOK, provenance=provenance)
         for name, fig in figures.items()}
print("analysing:", label, "—", "read back fresh outputs" if fa.reused else "fitted now",
      "— outputs in", project_paths(root).analysis)
print(caption(provenance))

# %% [markdown]
# ## Did the sampler converge?
#
# Before reading any effect: every chain should agree (rank-normalised split R-hat ≤ 1.01
# for the fixed effects, the random-intercept SDs, every random intercept and their
# means), the bulk and tail effective sample sizes of the fixed effects, SDs and means
# should be at least 100 per chain, and there should be no divergent transitions. The
# verdict below binds: a fit that fails any check is marked NOT CONVERGED here, in
# `factor_diagnostics.json` (`converged`, read by notebook 08's claims) and on every
# figure, with what to change.

# %%
Markdown(convergence_report(fa.diagnostics))

# %%
convergence_checks(fa.diagnostics)

# %%
diagnostics_summary(fa.diagnostics).to_frame()

# %%
figures["diagnostics"]

# %%
figures["traces"]

# %% [markdown]
# The histograms show R-hat and bulk ESS for every fixed effect and SD; the traces should
# look like overlapping noise with no chain stuck apart. What the advice above changes:
# *longer chains* (`tune`, `draws`) when parameters mix slowly; the *centred*
# parameterisation for the group whose SD or intercepts mix slowly when its levels carry
# many trials each (the data then pin each intercept down; the non-centred form suits
# sparsely observed levels); a higher `target_accept` when there are divergences.
#
# ## The factor effects
#
# Each row is one level's deviation from the average level on the logit scale, with its
# 95 % interval; interaction rows are deviations beyond the two main effects.

# %%
figures["forest"]

# %%
fa.effects.round(3)

# %% [markdown]
# ## Does the model reproduce the observed accuracies? (posterior predictive check)
#
# For each level of every benchmark factor — also of a factor the model leaves out — and
# each interaction cell, the fitted model replicates the same trials with *new* question,
# pair and volume intercepts. The check compares the cell's accuracy relative to all
# trials its factor applies to (so the overall level, which every cell shares, cancels),
# observed against replicated, in percentage points, with the replicates' 95 % band. A cell
# outside its band (red) is an effect the model's factors do not explain; about 5 % of
# cells fall outside by chance.

# %%
figures["ppc"]

# %%
outside = fa.ppc[~fa.ppc["inside"]]
print(f"{len(outside)} of {len(fa.ppc)} cells outside their 95 % band "
      f"(about {0.05 * len(fa.ppc):.0f} expected by chance)")
outside[["cell", "in_model", "observed", "residual", "res_lo95", "res_hi95", "p_value",
         "n_trials"]].round(3)

# %% [markdown]
# ## Contrasts on the probability scale
#
# The paper's claims in accuracy points: model-based accuracies per level or cell and their
# differences, with 95 % intervals (names as documented in `mislib.analysis`); `observed`
# is the raw accuracy of the same trials. Notebook 08 puts these beside the paper's numbers.

# %%
claim_contrasts(fa.contrasts).round(3)

# %% [markdown]
# ## Recovery study: does the model find effects that are there?
#
# A simulated study with the benchmark's design (every visual prompt including none, both
# conventions and terminologies, the ablations, two models × two arms) and planted effects
# shaped like the paper's findings: the convention × terminology reversal, box and
# no-prompt × terminology, the text-only prior (anatomical terms answered without the
# image, colloquial ones not), SemSam's gain. The profile's factor model is fitted to it
# and each planted effect is set against its recovered 95 % interval; about 95 % should
# cover it, but one study's share scatters widely (the terms of one factor move together,
# so one unlucky coordinate misses two to four terms). The verdict is the calibration test:
# the squared Mahalanobis distance of the planted effects from the posterior, about χ² on
# the free coordinates when the model recovers them and large when it finds them at the
# wrong size (`mislib.analysis.recovery.calibration`). Written to
# `data/analysis/recovery.parquet`.

# %%
recovery = run_recovery(profile, root=root, force=force, n_questions=recovery_questions,
                        n_trials=recovery_trials, draws=recovery_draws, seed=recovery_seed)
recovery_fig = recovery_figure(recovery.table, headline=HEADLINE_TERMS,
                               title="Recovery study: planted effects (SIMULATED) against "
                               "the factor model's estimates",
                               calibration=recovery.diagnostics["calibration"])
save_figure(recovery_fig, "recovery", root=root, notebook=NOTEBOOK,
            provenance=recovery.provenance(profile))
calibration = recovery.diagnostics["calibration"]
print(f"coverage: {recovery.table['covered'].sum()} of {len(recovery.table)} planted effects "
      f"({recovery.coverage:.0%}) inside their 95 % intervals; calibration: d² "
      f"{calibration['distance2']:.1f} on {calibration['df']} free coordinates, p = "
      f"{calibration['p_value']:.3f} ({'no sign of bias' if recovery.unbiased else 'BIASED'}); "
      f"fit {recovery.diagnostics['seconds']['total']} s")
Markdown(convergence_report(recovery.diagnostics, "the recovery fit"))

# %%
recovery_fig

# %%
recovery.table[~recovery.table["covered"]].round(3)
