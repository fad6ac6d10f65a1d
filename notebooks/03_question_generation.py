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
# factors. This stage asks questions about them whose answers are known from geometry:
#
# * **families** — `relation_2d` (where does structure A lie relative to B on this slice,
#   along an in-plane axis), `relation_3d` (along the through-plane axis of a stack, across
#   frames) and `plane` (which slice direction is shown);
# * **forms** — `open` (answer with a direction term or a plane name), `closed_true` (a true
#   statement) and `closed_false` (the same statement with the relation inverted);
# * **terminology** — `anatomical` (patient-relative: superior/inferior, anterior/posterior,
#   the patient's left/right, medial/lateral on a knee) or `colloquial` (screen-relative:
#   above/below, left/right as seen, earlier/later frame);
# * **ablations** — `none` (structures named with their letter, "the liver (A)"), `blank`
#   (the prompts on an empty background, letters only) and `text_only` (no image, names only;
#   colloquial answers then follow the standard display). On the scan without a visual
#   prompt (prompt `none`) no letters are drawn, so structures are named only, "the liver".
#
# Anatomical truth comes from world (RAS+) geometry: the centroids of what is visible on the
# slice for 2D questions, the 3D centroids for stacks and text-only questions. Colloquial
# truth comes from where the renderer drew the structures (pixel centroids) and, for stacks,
# from the frame order — both taken from the one `mislib.geometry.screen_mapping` the
# renderer used, and checked against it. A relation is asked only when the two centroids are
# at least `margin_mm` apart along its axis.

# %%
import matplotlib.pyplot as plt
import pandas as pd
from PIL import Image

from mislib import questions as qgen
from mislib.config import stage_params
from mislib.geometry import CONVENTIONS, PLANES, screen_mapping
from mislib.paths import figure_path, project_paths

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
run_export = True  # write the HF parquet dataset and the VLMEvalKit TSV, and check them

# %%
overrides = dict(margin_mm=margin_mm, families=families, forms=forms,
                 terminologies=terminologies, ablations=ablations,
                 max_pairs_per_unit=max_pairs_per_unit, cells_per_relation=cells_per_relation,
                 terminologies_per_relation=terminologies_per_relation,
                 plane_cells_per_unit=plane_cells_per_unit)
params = stage_params(profile, "questions", **overrides)
paths = project_paths()
paths.figures.mkdir(parents=True, exist_ok=True)
{k: v for k, v in params.items() if k != "profile"}

# %% [markdown]
# ## Screen terms come from the display mapping
#
# The colloquial word for each patient direction, per plane and convention: where a
# structure lying toward the patient's right, anterior or superior side appears on screen.
# In-plane directions become left/right or above/below; the through-plane direction of a
# stack becomes a later or earlier frame. This table is computed from the same mapping the
# renderer draws with.

# %%
pd.DataFrame([{"plane": p, "convention": c,
               **{f"toward {code}": qgen.colloquial_term(code, screen_mapping(p, c))
                  for code in ("R", "A", "S")}}
              for p in PLANES for c in CONVENTIONS]).set_index(["plane", "convention"])

# %% [markdown]
# ## Generate
#
# One call builds every question (skipped when `questions.parquet` exists for the same
# parameters and inputs). Per slice or stack the generator picks `max_pairs_per_unit`
# structure pairs (least-used structures first), asks each pair along every axis that
# clears the margin, in `cells_per_relation` (convention × prompt × ablation) cells and
# `terminologies_per_relation` terminologies, each in all three forms; `plane` questions are
# asked on `plane_cells_per_unit` renders per slice or stack.

# %%
questions = qgen.generate(profile, force=force, **overrides)
components = pd.read_parquet(paths.prepared / "components.parquet")
print(f"{len(questions)} questions on {questions.render_id.nunique()} renders of "
      f"{questions.volume_id.nunique()} volumes; "
      f"{pd.concat([questions.component_a, questions.component_b]).nunique()} structures")
questions.groupby(["source", "modality", "family"]).size().unstack("family", fill_value=0)

# %% [markdown]
# ## Counts per factor cell
#
# Rows: family, ablation and display convention (`—` where the factor does not apply:
# text-only questions have no display, plane questions no terminology). Columns:
# terminology. Every relation is asked in all three forms, so each count is a multiple of 3.

# %%
qgen.factor_counts(questions, rows=("family", "ablation", "convention"),
                   columns=("terminology",))

# %%
qgen.factor_counts(questions, rows=("family", "dims", "prompt"), columns=("modality",))

# %% [markdown]
# ## Balance of the answers
#
# True and False are exactly balanced (each true statement has its inverted twin). For open
# questions, which structure is called A is chosen so that the two direction terms of each
# axis are equally often correct within each factor cell.

# %%
balance = qgen.answer_balance(questions)
closed = questions[questions.form != "open"]
print("closed questions:", closed.answer.value_counts().to_dict())
(balance[balance.form == "open"]
 .pivot_table(index=["family", "terminology"], columns="answer", values="questions",
              fill_value=0))

# %%
factors = ["family", "modality", "plane", "dims", "convention", "prompt", "ablation",
           "terminology", "form"]
fig, axes = plt.subplots(1, len(factors), figsize=(2.1 * len(factors), 2.8), sharey=True)
for ax, factor in zip(axes, factors, strict=True):
    counts = questions[factor].fillna("—").value_counts().sort_index()
    ax.bar(range(len(counts)), counts.to_numpy(), color="#4477AA")
    ax.set_xticks(range(len(counts)), counts.index, rotation=60, ha="right", fontsize=7)
    ax.set_title(factor, fontsize=9)
axes[0].set_ylabel("questions")
fig.tight_layout()
for suffix in (".png", ".pdf"):
    fig.savefig(figure_path("03_question_generation", "factor_counts", suffix=suffix), dpi=150)
plt.show()

# %% [markdown]
# Each panel counts questions per level of one factor; `—` marks questions to which the
# factor does not apply.
#
# ## No relation below the margin
#
# The separation along the asked axis, for every relation question, against the margin.

# %%
rel = questions[questions.family != "plane"]
fig, ax = plt.subplots(figsize=(5, 2.6))
ax.hist(rel.separation_mm, bins=40, color="#228833")
ax.axvline(params["margin_mm"], color="k", ls="--", label=f"margin {params['margin_mm']:g} mm")
ax.set_xlabel("separation along the asked axis (mm)")
ax.set_ylabel("questions")
ax.legend()
fig.tight_layout()
fig.savefig(figure_path("03_question_generation", "separation"), dpi=150)
plt.show()
print(f"smallest separation asked: {rel.separation_mm.min():.1f} mm")

# %% [markdown]
# ## Example questions
#
# One question per family and form, with the rendered image it refers to.

# %%
with_image = questions[questions.ablation != "text_only"]
scan = with_image[with_image.ablation == "none"]
examples = ((scan if len(scan) else with_image)
            .groupby(["family", "form"], sort=True).head(1).reset_index(drop=True))
fig, axes = plt.subplots(1, min(3, len(examples)), figsize=(12, 4.2))
for ax, row in zip(axes, examples[examples.form == "open"].itertuples(), strict=False):
    path = paths.benchmark / row.image_path
    frame = path / f"frame_{row.n_frames // 2:03d}.png" if path.is_dir() else path
    ax.imshow(Image.open(frame))
    terms = "plane name" if pd.isna(row.terminology) else row.terminology
    asked = "" if pd.isna(row.letter_a) else f"{row.letter_a} relative to {row.letter_b}: "
    ax.set_title(f"{row.family}, {terms}, {row.convention}, {row.prompt}\n"
                 f"{asked}{row.answer}", fontsize=9)
    ax.axis("off")
fig.tight_layout()
fig.savefig(figure_path("03_question_generation", "examples"), dpi=120, bbox_inches="tight")
plt.show()
for row in examples.itertuples():
    print(f"--- {row.family} / {row.form} / {row.terminology} / {row.ablation}: "
          f"answer {row.answer}\n{row.text}\n")

# %%
text_only = questions[questions.ablation == "text_only"].head(3)
for row in text_only.itertuples():
    print(f"--- text-only {row.family} / {row.form} / {row.terminology}: answer {row.answer}"
          f"\n{row.text}\n")

# %% [markdown]
# ## Exports
#
# `make export` (or this cell) writes the benchmark as a Hugging Face `datasets` parquet
# dataset, images and stack frames embedded, and as a VLMEvalKit-style TSV with base64
# images; the check loads the parquet back with `datasets.load_dataset("parquet", …)` and
# compares every row and image byte with `questions.parquet` and the rendered files.

# %%
if run_export:
    info = qgen.export(profile)
    print("files:", [p.name for p in info["hf_files"]], info["tsv"].name, info["tsv_text"].name)

# %% [markdown]
# ## Paper scale
#
# The count per slice or stack is pairs × axes × cells × terminologies × 3 forms for the
# relations, plus plane cells × 3. The `paper` profile asks one pair per slice or stack in
# one cell and one terminology (`max_pairs_per_unit = cells_per_relation =
# terminologies_per_relation = plane_cells_per_unit = 1`), which on inputs shaped like the
# paper's (1,160 volumes, two slices each, a 2D image and a 3D stack per slice) gives about
# 34,000 questions (`make bench ONLY=questions` measures it on synthetic inputs of that
# shape); `"all"` in any of those knobs crosses every level instead.
