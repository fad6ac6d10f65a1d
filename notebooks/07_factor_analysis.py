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
# (`mislib.analysis`, module docstring): the fixed effects are sampled in coordinates
# whitened by a Laplace approximation (unbalanced levels; `dims` is told apart from
# `family` by plane questions only); the means of the random intercepts that a fixed
# effect could stand in for (MRI volumes against modality, the single structures of plane
# questions against `family`, the plane questions' intercepts against `family[plane]`)
# are sampled with the fixed effects; the rest of each intercept is non-centred. On a
# simulated study of the paper's size this took the slowest fixed effect from bulk ESS 34
# to ~300 of 1,000 draws (`bench/bench_analysis.py`).
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
import matplotlib.pyplot as plt
import pandas as pd

from mislib.analysis import plot_diagnostics, plot_ppc, plot_traces, run_factor_analysis
from mislib.paths import figure_path, project_paths
from mislib.plots import factor_forest

NOTEBOOK = "07_factor_analysis"
root = None
label = "benchmark results"
if simulated_questions:
    from mislib.simulate import simulate_study, write_study

    root = project_paths().build / "sim07"
    study = simulate_study(n_questions=int(simulated_questions), n_trials=5, seed=7)
    write_study(study, root=root, scored=True)
    label = f"SIMULATED study ({int(simulated_questions)} questions, known effects)"
print("analysing:", label)

fa = run_factor_analysis(profile, root=root, force=force, draws=draws, tune=tune,
                         chains=chains, centred=centred)
print("read back fresh outputs" if fa.reused else "fitted now",
      "— outputs in", project_paths(root).analysis)


def save(fig, name):
    for suffix in (".png", ".pdf"):
        path = figure_path(NOTEBOOK, name, root=root, suffix=suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight", dpi=200)


# %% [markdown]
# ## Did the sampler converge?
#
# Before reading any effect: every chain should agree (rank-normalised split R-hat ≤ 1.01
# for the fixed effects, the random-intercept SDs and every random intercept), there should
# be no divergent transitions, and the effective sample sizes should be in the hundreds.

# %%
d = fa.diagnostics
summary = pd.Series({
    "trials": d["n_trials"], "(model, arm, question) rows": d["n_obs"],
    "questions": d["n_questions"], **{f"levels of {g}": n for g, n in d["groups"].items()},
    "centred groups": ", ".join(d["centred"]) or "none",
    "chains × draws": f"{d['chains']} × {d['draws']} (+{d['tune']} warm-up)",
    "divergences": d["divergences"], "max R-hat (all)": round(d["max_r_hat"], 4),
    "max R-hat (fixed effects)": round(d["max_r_hat_fixed"], 4),
    "min bulk ESS": round(d["min_ess_bulk"]), "mean tree depth": round(d["mean_tree_depth"], 2),
    "fit seconds": d["seconds"]["total"], "dropped terms": d["dropped"] or "none",
}, name="value")
summary.to_frame()

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
plot_diagnostics(fa.effects, fa.sds, axes=axes)
fig.suptitle(f"Sampler diagnostics — {label}", fontsize=9)
save(fig, "diagnostics")

# %%
axes = plot_traces(fa.posterior)
axes[0].figure.suptitle(f"Traces of the intercept and random-intercept SDs — {label}",
                        fontsize=9)
save(axes[0].figure, "traces")

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
fig = factor_forest(fa.effects)
fig.axes[0].set_title(f"Factor effects — {label}", fontsize=9)
save(fig, "forest")

# %%
fa.effects.round(3)

# %% [markdown]
# ## Does the model reproduce the observed accuracies? (posterior predictive check)
#
# For each factor level and interaction cell: the observed accuracy (dot) against the 95 %
# band of accuracies the fitted model predicts for the same trials with *new* question,
# pair and volume intercepts. Red dots fall outside their band.

# %%
ax = plot_ppc(fa.ppc)
ax.set_title(f"Posterior predictive check — {label}", fontsize=9)
save(ax.figure, "ppc")
print(f"{fa.ppc['inside'].mean():.0%} of {len(fa.ppc)} cells inside their 95 % band")

# %% [markdown]
# ## Contrasts on the probability scale
#
# The paper's claims in accuracy points: model-based accuracies per level or cell and their
# differences, with 95 % intervals (names as documented in `mislib.analysis`); `observed`
# is the raw accuracy of the same trials. Notebook 08 puts these beside the paper's numbers.

# %%
claims = fa.contrasts[fa.contrasts["factors"].isin(
    ["arm:model", "convention:terminology", "prompt:terminology", "ablation:terminology",
     "dims", "family"])]
claims.round(3)
