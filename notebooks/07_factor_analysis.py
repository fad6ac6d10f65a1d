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
# written to `build/sim07/` and every output is labelled as simulated.

# %% tags=["parameters"]
profile = "demo"
force = False
draws = None  # NUTS draws per chain (None: [analysis] draws of the profile)
tune = None  # warm-up per chain
chains = None
centred = None  # groups to sample centred, or "auto" (None: the profile value, no group)
simulated_questions = None  # e.g. 3000: analyse a simulated study, not the real results

# %%
from mislib.analysis import (
    claim_contrasts,
    diagnostics_summary,
    run_factor_analysis,
    write_simulated_study,
)
from mislib.paths import project_paths
from mislib.plots import factor_analysis_figures, save_figure

NOTEBOOK = "07_factor_analysis"
root = write_simulated_study(simulated_questions) if simulated_questions else None
label = (f"SIMULATED study ({int(simulated_questions)} questions, known effects)"
         if simulated_questions else "benchmark results")
fa = run_factor_analysis(profile, root=root, force=force, draws=draws, tune=tune,
                         chains=chains, centred=centred)
figures = factor_analysis_figures(fa, label)
saved = {name: save_figure(fig, name, root=root, notebook=NOTEBOOK)
         for name, fig in figures.items()}
print("analysing:", label, "—", "read back fresh outputs" if fa.reused else "fitted now",
      "— outputs in", project_paths(root).analysis)

# %% [markdown]
# ## Did the sampler converge?
#
# Before reading any effect: every chain should agree (rank-normalised split R-hat ≤ 1.01
# for the fixed effects, the random-intercept SDs and every random intercept), there should
# be no divergent transitions, and the effective sample sizes should be in the hundreds.

# %%
diagnostics_summary(fa.diagnostics).to_frame()

# %%
figures["diagnostics"]

# %%
figures["traces"]

# %% [markdown]
# The histograms show R-hat and bulk ESS for every fixed effect and SD; the traces should
# look like overlapping noise with no chain stuck apart. If `max R-hat` exceeds 1.01 or
# there are divergences, the effects below are not to be trusted: rerun with more `tune`
# and `draws`.
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
# For each factor level and interaction cell: the observed accuracy (dot) against the 95 %
# band of accuracies the fitted model predicts for the same trials with *new* question,
# pair and volume intercepts. Red dots fall outside their band.

# %%
figures["ppc"]

# %%
print(f"{fa.ppc['inside'].mean():.0%} of {len(fa.ppc)} cells inside their 95 % band")

# %% [markdown]
# ## Contrasts on the probability scale
#
# The paper's claims in accuracy points: model-based accuracies per level or cell and their
# differences, with 95 % intervals (names as documented in `mislib.analysis`); `observed`
# is the raw accuracy of the same trials. Notebook 08 puts these beside the paper's numbers.

# %%
claim_contrasts(fa.contrasts).round(3)
