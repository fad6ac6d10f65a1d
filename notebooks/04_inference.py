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
# # 04 · Inference: each model answers the benchmark, with and without SemSam
#
# Every question of stage 03 is put to each model of the profile through the model's own
# processor and chat template: a 2D question with its rendered picture, a 3D question with
# its frame stack passed as a **video** (every frame we rendered, in order, none
# re-sampled), a text-only question with no picture. Each question is asked `n_trials`
# times in **arms** that differ only in how the next token is chosen:
#
# - **baseline**: the default rule, a draw from the top-k / top-p candidates;
# - **greedy**: the most probable candidate (the control: deterministic, no re-scoring);
# - **semsam**: MIS-SemSam re-scores the candidates by the probability mass of their
#   neighbourhoods in the input-embedding space (notebook 05 explains the rule).
#
# Every arm runs the same code (the SemSam rule, with re-scoring off outside the semsam
# arm) with the same seed for each (question, trial), so every difference between the arms
# is the selection rule's, draw for draw.
#
# Every finished (question, trial) is appended to a JSONL shard as soon as its batch ends,
# so a run that is interrupted resumes where it stopped. Inputs:
# `data/benchmark/questions.parquet` and its pictures. Outputs, per (model, arm):
# `data/results/<run_id>/run.json`, `shards/*.jsonl`, `responses.parquet`.

# %% tags=["parameters"]
profile = "demo"
force = False
models = None          # list of model ids; None: as in the profile
arms = None            # e.g. ["baseline"]; None: as in the profile
limit = None           # at most this many questions (0: all; None: as in the profile)
n_trials = None        # None: as in the profile
batch_size = None      # None: as in the profile
max_new_tokens = None  # None: as in the profile

# %%
import json

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from mislib.inference import run_profile, summarise_runs
from mislib.plots import save_figure
from mislib.provenance import Provenance, caption

NOTEBOOK = "04_inference"

runs = run_profile(profile, models=models, arms=arms, limit=limit, force=force,
                   n_trials=n_trials, batch_size=batch_size, max_new_tokens=max_new_tokens)
summary = summarise_runs(run.run_dir for run in runs)
summary

# %% [markdown]
# One row per (model, arm): how many (question, trial) records the run holds, how many the
# answer parser could read (`n_parsed`) or not, the raw accuracy (stage 06 re-scores with
# credible intervals), and the throughput over every session that produced records.

# %%
if summary["model"].str.startswith("smoke:").any():
    display(Markdown(
        "**The demo model is a randomly initialised tiny Qwen3-VL (`smoke:tiny-qwen3-vl`): "
        "its answers are noise.** This notebook shows that the pipeline runs end to end "
        "(loading, processors, every arm, the store), not any finding of the paper."))
record = json.loads((runs[0].run_dir / "run.json").read_text())
pd.Series({"model": record["model"], "revision": record["revision"],
           "device": record["processor"]["device"], "dtype": record["processor"]["dtype"],
           "image pixels": record["processor"]["image_processor"].get("size"),
           "video pixels": record["processor"]["video_processor"].get("size"),
           "stack frames passed as": record["processor"]["video_as"],
           "decode": {k: record["decode"][k] for k in ("temperature", "top_k", "top_p", "mode",
                                                       "max_new_tokens")},
           "SemSam table": record.get("semsam_table"),
           "git commit": (record.get("sessions") or [{}])[-1].get("git_commit")},
          name="run.json").to_frame()

# %% [markdown]
# What `run.json` records for the first run: the model's revision, the pixel budgets of its
# processors, the decode rule and the hash of the SemSam neighbour table; the package
# versions and git commit of every session are in the file too.
#
# ## Outputs side by side
#
# The same questions and trials in every arm (same seeds):

# %%
responses = pd.concat([run.selected() for run in runs], ignore_index=True)
# these records are what this call sent (a limited run's view): count them, not whole runs
provenance = Provenance.from_scored(responses, profile, sent=responses)
display(Markdown(caption(provenance)))
side = (responses.pivot_table(index=["model", "question_id", "trial"], columns="arm",
                              values="raw_text", aggfunc="first")
        .head(8))
side.apply(lambda col: col.astype(str).str.slice(0, 60))

# %% [markdown]
# ## Throughput and parse outcomes

# %%
fig, (ax_rate, ax_parse) = plt.subplots(1, 2, figsize=(10, 3.6))
# one model: the arms on the axis, the model in the stamp; several: model (short) and arm
several = summary["model"].nunique() > 1
short = lambda m: m.rsplit("/", 1)[-1].removeprefix("smoke:")  # noqa: E731
labels = [f"{short(m)}\n{a}" if several else a
          for m, a in zip(summary["model"], summary["arm"], strict=True)]
arm_colours = {"baseline": "#4c72b0", "greedy": "#55a868", "semsam": "#dd8452"}
ax_rate.bar(labels, summary["questions_per_s"], color=summary["arm"].map(arm_colours))
ax_rate.set_ylabel("(question, trial) per second")
ax_rate.set_title(f"throughput ({summary['device'].iloc[0]})")
counts = (responses.assign(outcome=responses["parse_status"].fillna(responses["status"]))
          .groupby(["model", "arm", "outcome"]).size().unstack("outcome", fill_value=0))
counts.index = [f"{short(m)}\n{a}" if several else a for m, a in counts.index]
counts.plot.bar(stacked=True, ax=ax_parse, rot=0)
ax_parse.set_ylabel("records")
ax_parse.set_title("parse outcome per arm")
fig.tight_layout()
save_figure(fig, "throughput", notebook=NOTEBOOK, provenance=provenance, dpi=150)
fig

# %% [markdown]
# Left: records per second of generation for each arm, over the sessions that produced
# them (on a shared machine this moves with the load; `make bench` times the arms back
# to back on the same questions). Right:
# how many outputs the parser read as one valid option (`ok`), as none (`unparseable`) or
# as several (`ambiguous`); records the harness could not produce normally keep their own
# status (`missing_input`, `unknown_family`, `oom`) instead of disappearing. With the smoke
# model nearly every output is unparseable: random weights write random tokens.
