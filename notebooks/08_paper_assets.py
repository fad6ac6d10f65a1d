# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
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
# `paper/numbers.tex`, and `paper/claims.md` sets each headline claim of the paper beside
# this run's estimate, marked *reproduced*, *not reproduced* or *not measurable* with this
# profile.
#
# With the demo profile the model is the randomly initialised smoke model: the numbers test
# the pipeline and are not expected to reproduce the paper.

# %% tags=["parameters"]
profile = "demo"
force = False
claims_arm = None          # e.g. "semsam"; None: as in the profile
semsam_claim_model = None  # e.g. "Qwen3-VL-8B"; None: as in the profile
prompt_baseline = None     # the prompt level meaning no visual prompt; None: as in the profile

# %%
from IPython.display import Image, Markdown, display

from mislib.claims import write_paper_assets
from mislib.plots import make_figures

figures = make_figures(profile, prompt_baseline=prompt_baseline)
assets = write_paper_assets(profile, force=force, claims_arm=claims_arm,
                            semsam_claim_model=semsam_claim_model,
                            prompt_baseline=prompt_baseline)
claims = assets["claims"]
sorted(figures)


# %%
def show(name: str) -> None:
    """Display one saved figure (its PNG) with its file names."""
    png, pdf = figures[name]
    display(Markdown(f"`{png.name}` · `{pdf.name}`"), Image(filename=str(png), width=820))


# %% [markdown]
# ## Accuracy by factor
#
# Bayes@N accuracy with credible intervals for every level of every benchmark factor, one
# colour per model × arm.

# %%
show("accuracy_by_factor")

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
# Stage 07's sum-to-zero deviations on the logit scale with 95 % intervals; hollow points
# mark terms whose R-hat exceeds 1.01.

# %%
show("factor_forest")

# %% [markdown]
# ## The paper's headline claims beside this run
#
# `estimate` is the Bayes@N posterior mean (in the profile's claims arm, models pooled),
# `raw` the plain accuracy of the same trials, `model_estimate` stage 07's
# population-averaged estimate of the same contrast where it has one.

# %%
claims[["claim", "quantity", "paper", "estimate", "lo", "hi", "raw", "model_estimate",
        "status", "note"]].round(2)

# %%
counts = claims["status"].value_counts()
display(Markdown("\n".join(f"- **{status}**: {n} quantities" for status, n in counts.items())))

# %% [markdown]
# The same table, grouped by claim and with notes, is `paper/claims.md`; the files written:

# %%
from mislib.paths import project_paths

root = project_paths().root
sorted(str(p.relative_to(root)) for p in assets["paths"])
