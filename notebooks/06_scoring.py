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
# # 06 · Scoring: parse, score, Bayes@N
#
# Stage 04 stored every model output verbatim (`raw_text`). Here each output is **parsed
# again** with the current parser (`mislib.answers.parse_answer`): reasoning blocks are
# stripped, the last declared answer is taken, and only the question's own options count
# (True/False with yes/no synonyms, the direction terms of its terminology, plane names,
# letters A–F only as whole tokens in an answer context). An output naming no valid option
# is `unparseable`, one naming two different options is `ambiguous`; both score as wrong and
# are reported on their own.
#
# Accuracy is summarised with **Bayes@N** (the `scorio` package): per question a uniform
# Dirichlet prior updated by its N trials; the posterior mean and standard deviation of the
# average over questions, with a central credible interval. We report it per model × arm,
# per level of every benchmark factor, and the **paired SemSam effect**: SemSam minus
# baseline on the same questions and trials (the two arms share per-(question, trial) seeds).
#
# Inputs: `data/benchmark/questions.parquet` (stage 03), `data/results/*/responses.parquet`
# (stage 04). Outputs: `data/analysis/{scored,bayes_by_factor,semsam_effect,unparseable}.parquet`.

# %% tags=["parameters"]
profile = "demo"
force = False
credible_level = None  # e.g. 0.9; None: as in the profile
runs = None            # a list of run ids; None: as in the profile (empty: every run)

# %%
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from mislib.bayes import bayes_at_n, outcome_matrix
from mislib.plots import accuracy_by_factor, save_figure
from mislib.scoring import read_run_records, score_runs, unparsed_examples

NOTEBOOK = "06_scoring"
tables = score_runs(profile, force=force, credible_level=credible_level, runs=runs)
scored = tables["scored"]
records = read_run_records(run_ids=scored["run_id"].unique())
records[["run_id", "model", "arm", "simulated"]]

# %% [markdown]
# The runs scored above. With the demo profile the model is the smoke model, a randomly
# initialised tiny Qwen3-VL: its answers are noise, so everything below checks the pipeline,
# not the paper's findings.

# %%
if records["simulated"].any():
    display(Markdown("**These runs are simulated responses (mislib.simulate).**"))
if scored["model"].astype(str).str.startswith("smoke:").any():
    display(Markdown("**Smoke model: answers are noise; accuracies test the pipeline only.**"))
tables["unparseable"]

# %% [markdown]
# ## Parse outcomes
#
# The table above counts, per model and arm, the outputs the parser read (`ok`), could not
# read (`unparseable`) and found contradictory (`ambiguous`), and how many re-parses differ
# from what stage 04 stored (a newer parser). Examples of what was not read:

# %%
unparsed_examples(scored)

# %% [markdown]
# ## Bayes@N accuracy per model and arm

# %%
by_factor = tables["bayes_by_factor"]
overall = by_factor[by_factor["factor"] == "all"].drop(columns=["factor", "level"])
overall

# %% [markdown]
# `accuracy` is the plain mean of the trials; `mu` the Bayes@N posterior mean, which pulls
# each question towards 50 % by N/(N+2) for N trials, with `sigma` and the `lo`–`hi` credible
# interval. As a check, the first cell recomputed directly with `mislib.bayes.bayes_at_n`
# (which calls `scorio`):

# %%
first = overall.iloc[0]
cell = scored[(scored["model"] == first["model"]) & (scored["arm"] == first["arm"])]
R, _, _ = outcome_matrix(cell)
mu, sigma = bayes_at_n(R)
assert np.isclose(mu, first["mu"]) and np.isclose(sigma, first["sigma"])
pd.Series({"mu": mu, "sigma": sigma, "questions": R.shape[0], "trials": R.shape[1]})

# %% [markdown]
# ## Per level of every factor

# %%
fig = accuracy_by_factor(by_factor)
save_figure(fig, "accuracy_by_factor", notebook=NOTEBOOK)
fig

# %% [markdown]
# Each panel is one benchmark factor; each colour one model × arm. Levels a question does
# not have (no visual prompt on a text-only question, no terminology on a plane-naming one)
# are left out of that factor's panel.
#
# ## The paired SemSam effect

# %%
effect = tables["semsam_effect"]
if effect.empty:
    display(Markdown("No model was run in both arms: no paired SemSam effect."))
effect

# %% [markdown]
# `effect_mu` is SemSam's accuracy minus the baseline's on the shared (question, trial)
# pairs, with its credible interval; `paired_mu` is the Bayes@N of the trial-paired outcome
# (four categories, scores 0/+1/−1/0), which shrinks more with few trials; `n_fixed` and
# `n_broken` count trials SemSam turned right and wrong.
