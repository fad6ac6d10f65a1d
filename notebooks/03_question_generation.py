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
# # 03 · Question generation: the factorial MIS-Ground benchmark
#
# Stage 02 rendered every chosen slice as images and 3D stacks in each cell of the rendering
# factors. This stage asks questions about them whose answers are known from geometry, and
# **every question must be answerable from its input** — otherwise a low score would point at
# the generator, not at a factor:
#
# * **families** — `relation_2d` (where structure A lies relative to B on this slice, along
#   an in-plane axis), `relation_3d` (along the through-plane axis of a stack, across frames)
#   and `plane` (which slice direction is shown);
# * **forms** — `open`, `closed_true` and `closed_false` (the same statement inverted);
# * **terminology** — `anatomical` (patient-relative: superior/inferior, anterior/posterior,
#   the patient's left/right, medial/lateral on a knee) or `colloquial` (screen-relative:
#   above/below, left/right as seen, earlier/later frame);
# * **ablations** — `none` (structures named with their letter, "the liver (A)"), `blank`
#   (the prompts on an empty background, letters only) and `text_only` (no image, names
#   only). On the scan without a visual prompt (prompt `none`) structures are named only.
#
# The validity rules: on the blank background nothing shows which way is anterior, so
# anatomical questions there state the plane and the display convention ("up in the image is
# anterior, left in the image is the patient's right"), and no plane is asked there; text-only
# questions ask anatomy, or screen terms under the stated standard convention; questions whose
# names give the answer away ("left kidney" vs "right kidney" asked left/right) are marked
# `answer_in_name` and left out unless the profile keeps them; a stack relation is asked only
# when its frame order agrees with the 3D centroids; every relation clears `margin_mm`.

# %%
import pandas as pd

from mislib import questions as qgen
from mislib import validity
from mislib.config import stage_params
from mislib.paths import project_paths
from mislib.plots import save_figure
from mislib.provenance import Provenance

NOTEBOOK = "03_question_generation"

# %% tags=["parameters"]
profile = "demo"
force = False
# [questions] overrides; None keeps the profile's value
margin_mm = None
families = None
forms = None
terminologies = None
ablations = None
max_pairs_per_unit = None
cells_per_relation = None
terminologies_per_relation = None
plane_cells_per_unit = None
exclude_answer_in_name = None
examples_per_source = 3
run_export = True  # write the HF dataset, the lmms-eval task and the VLMEvalKit TSVs; check them

# %%
overrides = dict(margin_mm=margin_mm, families=families, forms=forms,
                 terminologies=terminologies, ablations=ablations,
                 max_pairs_per_unit=max_pairs_per_unit, cells_per_relation=cells_per_relation,
                 terminologies_per_relation=terminologies_per_relation,
                 plane_cells_per_unit=plane_cells_per_unit,
                 exclude_answer_in_name=exclude_answer_in_name)
params = stage_params(profile, "questions", **overrides)
paths = project_paths()
{k: v for k, v in params.items() if k != "profile"}

# %% [markdown]
# ## Generate
#
# One call builds every question and checks it (skipped when `questions.parquet` and
# `validity.parquet` exist for the same parameters and inputs). Per slice or stack the
# generator picks `max_pairs_per_unit` structure pairs (least-used structures first), asks
# each pair along every axis that clears the margin, in `cells_per_relation` (convention ×
# prompt × ablation) cells and `terminologies_per_relation` terminologies, each in all three
# forms; `plane` questions are asked on `plane_cells_per_unit` renders on the scan.

# %%
questions = qgen.generate(profile, force=force, **overrides)
# Before inference there is no model or run: the figures' stamp names the profile and counts.
provenance = Provenance.from_profile(profile, {"renders": questions.render_id.nunique()},
                                     n_questions_generated=len(questions))
qgen.factor_counts(questions, rows=("source", "family"), columns=("ablation",))

# %% [markdown]
# Questions per source, family and ablation (`—`: the factor does not apply).
#
# ## Validity report
#
# Each rule is checked by `mislib.validity`, which re-derives it from the written tables —
# the letters as drawn (`letters.parquet`), the renders, the question texts and the
# geometry — never from a flag the generator set.

# %%
validity.read_report()

# %% [markdown]
# `checked` counts the questions (letters, for `letters_on_marks`) each rule looked at;
# `violations` must be 0 — a nonzero count is a generator defect to fix, not to filter.
#
# ## Examples as a model sees them
#
# Per source, a few questions drawn with the image they refer to (for a stack, the frame
# where both structures show), the full question text and the answer.

# %%
renders = pd.read_parquet(paths.benchmark / "renders.parquet")
fig = validity.example_gallery(questions, renders, paths.benchmark,
                               per_source=examples_per_source)
save_figure(fig, "examples", notebook=NOTEBOOK, provenance=provenance, dpi=110)
fig

# %% [markdown]
# Each letter sits on its own mark; blank-background questions in anatomical terms carry
# the sentence that states the plane and the display convention.
#
# ## Balance
#
# True and False are exactly balanced (each true statement has its inverted twin); for open
# questions, which structure is called A is chosen so that the two direction terms of each
# axis are equally often correct within each factor cell.

# %%
qgen.answer_balance(questions).pivot_table(
    index=["family", "terminology", "form"], columns="answer", values="questions",
    fill_value=0)

# %%
fig = qgen.factor_figure(questions)
save_figure(fig, "factor_counts", notebook=NOTEBOOK, provenance=provenance, dpi=150)
fig

# %% [markdown]
# Questions per level of each factor.
#
# ## No relation below the margin

# %%
fig = qgen.separation_figure(questions, params["margin_mm"])
save_figure(fig, "separation", notebook=NOTEBOOK, provenance=provenance, dpi=150)
fig

# %% [markdown]
# The separation along the asked axis of every relation question; none lies left of the
# dashed margin.
#
# ## Exports
#
# `make export` (or this cell) writes the benchmark for the evaluation harnesses: a Hugging Face
# `datasets` folder with one config per ablation × dims (images and stack frames embedded), an
# lmms-eval task group `mis_ground` scored with mislib's parser, and VLMEvalKit TSVs in its
# stock multiple-choice and yes/no formats (data/README.md says what each needs); the check
# loads them back and compares every row and image with the sources.

# %%
if run_export:
    info = qgen.export(profile, force=force)

# %% [markdown]
# ## Paper scale
#
# The count per slice or stack is pairs × axes × cells × terminologies × 3 forms for the
# relations, plus plane cells × 3. The `paper` profile asks one pair per slice or stack in
# one cell and one terminology, which on inputs shaped like the paper's (1,160 volumes, two
# slices each, a 2D image and a 3D stack per slice) gives about 34,000 questions
# (`make bench ONLY=questions` measures it on synthetic inputs of that shape).
