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
# Accuracy is summarised with **Bayes@N** (the `scorio` package; explained below), always
# beside the numbers that give it its meaning: the **raw accuracy** of the same trials, the
# **chance level** of the questions (1 / number of options) and **n** (questions × trials).
# We report it per model × arm, per level of every benchmark factor, and the **paired
# SemSam effect**: SemSam minus baseline on the same questions and trials (the arms share
# per-(question, trial) seeds). Every table has a source line and every figure a stamp
# naming the profile, the models, the runs and the counts.
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
from mislib.plots import accuracy_by_arm, accuracy_by_factor, save_figure
from mislib.provenance import Provenance, caption
from mislib.scoring import read_run_records, score_runs, unparsed_examples

NOTEBOOK = "06_scoring"
tables = score_runs(profile, force=force, credible_level=credible_level, runs=runs)
scored = tables["scored"]
provenance = Provenance.from_scored(scored, profile)
records = read_run_records(run_ids=scored["run_id"].unique())
display(Markdown(caption(provenance)))
records[["run_id", "model", "arm", "simulated"]]

# %% [markdown]
# The runs scored above, and the line that every table and figure below carries: the
# profile, the models, the runs, and how many of the generated questions were asked, with
# how many trials each. With the demo profile the model is the smoke model, a randomly
# initialised tiny Qwen3-VL: its answers are noise, so everything below checks the pipeline,
# not the paper's findings.

# %%
if records["simulated"].any():
    display(Markdown("**These runs are simulated responses (mislib.simulate).**"))
if provenance.smoke:
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
# ## What Bayes@N is
#
# Each question is asked N times (N trials). With a uniform prior on its probability of
# being answered right, a question answered right in k of N trials has the posterior mean
# (k + 1) / (N + 2); Bayes@N (`mu`) is the average of these means over the questions, with
# its posterior standard deviation (`sigma`) and a central credible interval (`lo`–`hi`).
# Written as (k + 1) / (N + 2) = N/(N + 2) · k/N + 2/(N + 2) · 1/2, each question's mean is
# its raw accuracy k/N pulled toward 50 %: **N/(N + 2) is the weight on the data**, the rest
# sits on the prior's 50 %. With 2 trials the data get half the weight: 0 of 2 correct is
# 25 %, 2 of 2 is 75 %, and a model that answers nothing right scores 25 %, not 0 %. So
# with few trials every accuracy is shrunk toward 50 % (the prior's centre, not the chance
# level, which is 1/3 for a three-option question), and only the raw accuracy, the chance
# level and n beside it tell a reader how far the data actually go. With many trials the
# weight on the data approaches 1 and Bayes@N approaches the raw accuracy.

# %%
pd.DataFrame([{"trials N": n, "correct k": k, "raw k/N": k / n,
               "Bayes@N (k+1)/(N+2)": bayes_at_n([[1] * k + [0] * (n - k)])[0],
               "weight on the data N/(N+2)": n / (n + 2)}
              for n, k in [(2, 0), (2, 1), (2, 2), (10, 0), (10, 10), (100, 0)]]).round(3)

# %% [markdown]
# One question per row, computed by `mislib.bayes.bayes_at_n` (scorio): the Bayes@N of a
# single question is its posterior mean (k + 1) / (N + 2).
#
# ## Accuracy per model and arm

# %%
by_factor = tables["bayes_by_factor"]
columns = ["model", "arm", "n_questions", "n_trials", "n_responses", "accuracy", "chance",
           "mu", "lo", "hi", "sigma"]
overall = by_factor[by_factor["factor"] == "all"][columns].reset_index(drop=True)
display(Markdown(caption(provenance)))
overall

# %% [markdown]
# `accuracy` is the raw mean of the trials, `chance` the mean of 1 / (number of options)
# over the cell's questions (what answering at random scores), `n_responses` the questions ×
# trials the cell holds; `mu` is Bayes@N with `sigma` and the `lo`–`hi` credible interval.
# As a check, the first cell recomputed directly with `mislib.bayes.bayes_at_n` (which calls
# `scorio`):

# %%
first = overall.iloc[0]
cell = scored[(scored["model"] == first["model"]) & (scored["arm"] == first["arm"])]
R, _, _ = outcome_matrix(cell)
mu, sigma = bayes_at_n(R)
assert np.isclose(mu, first["mu"]) and np.isclose(sigma, first["sigma"])
pd.Series({"mu": mu, "sigma": sigma, "questions": R.shape[0], "trials": R.shape[1]})

# %%
fig = accuracy_by_arm(by_factor)
save_figure(fig, "accuracy_by_arm", notebook=NOTEBOOK, provenance=provenance)
fig

# %% [markdown]
# The arms side by side for each model: Bayes@N with its credible interval (dot and bar),
# the raw accuracy of the same trials (cross), the chance level (dashed) and n (questions ×
# trials) under each arm. A difference between arms means something only where the
# intervals part and the raw accuracies agree with them.
#
# ## Per level of every factor

# %%
fig = accuracy_by_factor(by_factor)
save_figure(fig, "accuracy_by_factor", notebook=NOTEBOOK, provenance=provenance)
fig

# %% [markdown]
# Each panel is one benchmark factor; each colour one model × arm, drawn as in the figure
# above. Levels a question does not have (no visual prompt on a text-only question, no
# terminology on a plane-naming one) are left out of that factor's panel. The same numbers
# as a table, in percent:

# %%
levels = by_factor[by_factor["factor"] != "all"]
display(Markdown(caption(provenance)))
(levels[["model", "arm", "factor", "level", "n_questions", "n_trials", "accuracy", "chance",
         "mu", "lo", "hi"]]
 .assign(**{c: levels[c] * 100 for c in ("accuracy", "chance", "mu", "lo", "hi")})
 .round(1).reset_index(drop=True))

# %% [markdown]
# ## The paired SemSam effect

# %%
effect = tables["semsam_effect"]
if effect.empty:
    display(Markdown("No model was run in both arms: no paired SemSam effect."))
display(Markdown(caption(provenance)))
effect[["model", "n_questions", "n_trials", "chance", "baseline_accuracy", "semsam_accuracy",
        "baseline_mu", "semsam_mu", "effect_mu", "effect_lo", "effect_hi", "paired_mu",
        "n_fixed", "n_broken"]]

# %% [markdown]
# `baseline_accuracy` and `semsam_accuracy` are the raw accuracies of the shared
# (question, trial) pairs and `chance` their questions' chance level; `effect_mu` is
# SemSam's Bayes@N minus the baseline's on those pairs, with its credible interval;
# `paired_mu` is the Bayes@N of the trial-paired outcome (four categories, scores
# 0/+1/−1/0), which shrinks more with few trials (its weight on the data is N/(N + 4));
# `n_fixed` and `n_broken` count trials SemSam turned right and wrong.
