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
# # 08 · Paper assets: figures, tables, numbers and the claims check
#
# Everything the manuscript (`paper/main.tex`) shows is regenerated here from the tables of
# stages 06 (Bayes@N accuracies, the paired SemSam effect, parse outcomes) and 07 (the
# hierarchical factor model): the figures go to `figures/08_*.png|pdf`, the tables to
# `paper/tables/*.tex` (booktabs) and `*.md`, the headline numbers to LaTeX macros in
# `paper/numbers.tex` (with the profile and the counts), and `paper/claims.md` puts each
# headline claim of the paper to a reproduction test: *reproduced* when this run's credible
# interval lies inside the paper's value ± the profile's `[paper] tolerance_points`,
# *contradicted* when it lies outside, *inconclusive* when it is wider or overlaps the edge,
# *not assessed* for the smoke model or a cell with fewer than `[paper] min_questions`
# questions, *not measurable* when this run has no such questions (the rules in full:
# `mislib.claims`).
#
# With the demo profile the model is the randomly initialised smoke model: its answers are
# noise, so no claim is assessed and every figure and table says so.

# %% tags=["parameters"]
profile = "demo"
force = False
claims_arm = None          # e.g. "semsam"; None: as in the profile
semsam_claim_model = None  # e.g. "Qwen3-VL-8B"; None: as in the profile
prompt_baseline = None     # the prompt level meaning no visual prompt; None: as in the profile
tolerance_points = None    # the reproduction test's band, ± points; None: as in the profile
min_questions = None       # fewest questions a claim is assessed on; None: as in the profile

# %%
from IPython.display import Image, Markdown, display

from mislib.claims import write_paper_assets
from mislib.claims_figure import save_claims_figure
from mislib.plots import make_figures

figures = make_figures(profile, prompt_baseline=prompt_baseline)
assets = write_paper_assets(profile, force=force, claims_arm=claims_arm,
                            semsam_claim_model=semsam_claim_model,
                            prompt_baseline=prompt_baseline,
                            tolerance_points=tolerance_points, min_questions=min_questions)
claims = assets["claims"]
figures["claims_vs_paper"] = save_claims_figure(claims, assets["provenance"])
print(assets["provenance"].label())
sorted(figures)


# %%
def show(name: str) -> None:
    """Display one saved figure (its PNG) with its file names."""
    png, pdf = figures[name]
    display(Markdown(f"`{png.name}` · `{pdf.name}`"), Image(filename=str(png), width=820))


# %% [markdown]
# ## Accuracy against model size
#
# The figure a reader looks for first: each model's overall accuracy (Bayes@N with its
# interval, raw accuracy beside it) against its size in parameters (`params_b` in the
# profile's model registry), one line per arm. A model of unknown size, such as a hosted
# reference, is a horizontal line in its arm's colour; the demo's smoke model has no size.

# %%
show("accuracy_by_size")

# %% [markdown]
# ## Accuracy by factor
#
# Notebook 06's figure, reused: Bayes@N accuracy with credible intervals for every level of
# every benchmark factor, raw accuracy, chance and n beside it.

# %%
show("accuracy_by_factor")

# %% [markdown]
# ## Accuracy per decoding arm
#
# Each model's accuracy in each arm (notebook 06's figure): Bayes@N with its interval, raw
# accuracy, chance and n.

# %%
show("accuracy_by_arm")

# %% [markdown]
# ## Display convention × terminology
#
# The paper's central interaction: anatomical terms (patient-relative) should win in the
# standard radiological view and lose in the storage view, where screen-relative
# (colloquial) terms follow the array order.

# %%
show("convention_terminology")

# %% [markdown]
# ## Visual prompts against the no-prompt baseline
#
# Each prompt's accuracy minus the no-prompt level's, per terminology, when the benchmark
# has a no-prompt level; otherwise the prompts' accuracies (the title says which).

# %%
show("visual_prompt")

# %% [markdown]
# ## 2D slices vs 3D stacks, in-plane vs cross-slice relations

# %%
show("dims_2d_3d")

# %% [markdown]
# ## Text-only and blank ablations
#
# Without the image the colloquial (screen-relative) questions have nothing to refer to;
# on a blank background only the letters remain.

# %%
show("ablations")

# %% [markdown]
# ## SemSam against baseline decoding, per model

# %%
if "semsam_by_model" in figures:
    show("semsam_by_model")
else:
    display(Markdown("No model was run in both arms: no SemSam figure."))

# %% [markdown]
# ## The factor model's fixed effects
#
# Notebook 07's figure, reused: sum-to-zero deviations on the logit scale with 95 %
# intervals; it says *not converged* when the fit did not converge.

# %%
show("factor_forest")

# %% [markdown]
# ## The paper's headline claims against this run
#
# One row per claim quantity: the paper's value (diamond) in its tolerance band (grey), this
# run's Bayes@N estimate and credible interval coloured by the test's status, the raw
# accuracy (cross) and chance (tick). The SemSam rows are per model: the paper's numbers
# are Qwen3-VL-32B's, so another model's accuracies are not assessed and its SemSam gain is
# tested for the sign only.

# %%
show("claims_vs_paper")

# %% [markdown]
# The table behind it: `estimate` is the Bayes@N posterior mean (each question's
# (k + 1) / (N + 2) for k of N trials correct, averaged; with few trials pulled towards
# 50 %), `raw` the plain accuracy of the same trials, `chance` the accuracy of guessing,
# `n_questions` × `n_trials` the trials behind them (for a difference, those of its first
# side, and `minus_n_questions` × `minus_n_trials` those of the subtracted side), `factor_*`
# stage 07's estimate of the same contrast (`factor_converged` False: that fit did not
# converge, do not read it), and `reason` why the status was given.

# %%
claims[["claim", "quantity", "models", "paper", "estimate", "lo", "hi", "raw", "chance",
        "n_questions", "n_trials", "minus_n_questions", "minus_n_trials", "factor_estimate",
        "factor_converged", "status", "reason"]].round(2)

# %%
counts = claims["status"].value_counts()
display(Markdown("\n".join(f"- **{status}**: {n} quantities" for status, n in counts.items())))

# %% [markdown]
# The same table, grouped by claim with the paper's sources, is `paper/claims.md`; the files
# written:

# %%
from mislib.paths import project_paths

root = project_paths().root
sorted(str(p.relative_to(root)) for p in assets["paths"])
