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
# # 02 · Prompt rendering: planes, display conventions, visual prompts, 3D stacks
#
# Stage 01 chose slices of canonical (RAS+) volumes. This stage turns each chosen slice into
# the images a vision-language model sees, in every cell of the rendering factors:
#
# * **display convention** — `standard` (radiological: axial seen from the feet, patient
#   right on the image left) or `storage` (the array drawn as indexed after reorienting so
#   that index 0 is the right-, anterior-, superior-most voxel);
# * **visual prompt** — `mask` (translucent fill + outline), `box` or `point`, each structure
#   with a colour-blind-safe colour and a letter A–F, shuffled per slice; or `none`, the scan
#   alone without marks or letters (the no-prompt baseline);
# * **background** — the scan, or `blank` (the same prompts, no anatomy; not drawn for
#   `none`, which would be an empty image);
# * **dims** — a single `2d` image, or a `3d` stack of frames through the structures,
#   passed to the model as a video.
#
# Every orientation decision comes from one table, `mislib.geometry.screen_mapping`, which
# the question generator uses for the ground truth too.

# %%
import pandas as pd
from IPython.display import display

from mislib import render
from mislib.config import stage_params
from mislib.geometry import CONVENTIONS, PLANES, screen_mapping
from mislib.paths import project_paths
from mislib.plots import save_figure
from mislib.provenance import Provenance

NOTEBOOK = "02_prompt_rendering"

# %% tags=["parameters"]
profile = "demo"
force = False
# [render] overrides; None keeps the profile's value
planes = None
conventions = None
prompts = None
backgrounds = None
dims = None
image_size = None
frames_3d = None
workers = None

# %%
overrides = dict(planes=planes, conventions=conventions, prompts=prompts,
                 backgrounds=backgrounds, dims=dims, image_size=image_size,
                 frames_3d=frames_3d, workers=workers)
params = stage_params(profile, "render", **overrides)
paths = project_paths()

# %% [markdown]
# ## The six display mappings
#
# For each plane and convention: the world direction (RAS+ axis code) at the top and on the
# left of the image, and the direction in which the frame index of a 3D stack grows.

# %%
pd.DataFrame([{"plane": p, "convention": c, "image up": m.up, "image left": m.left,
               "frames toward": m.frame}
              for p in PLANES for c in CONVENTIONS for m in [screen_mapping(p, c)]])

# %% [markdown]
# ## Render the benchmark
#
# One call renders every chosen slice in every factor cell (skipped when the outputs exist
# for the same configuration and inputs). `renders.parquet` has one row per labelled
# structure of every image or stack; `skipped.parquet` records what was skipped or trimmed.

# %%
renders = render.render_benchmark(profile, force=force, **overrides)
skipped = pd.read_parquet(paths.benchmark / "skipped.parquet")
per_render = renders.drop_duplicates("render_id")
print(f"{per_render.render_id.nunique()} renders of {renders.slice_id.nunique()} slices "
      f"from {renders.volume_id.nunique()} volumes; {int(per_render.n_frames.sum())} PNG files")
# Before inference there is no model or run: the figures' stamp names the profile and counts.
provenance = Provenance.from_profile(profile, {"volumes": renders.volume_id.nunique(),
                                               "slices": renders.slice_id.nunique(),
                                               "renders": per_render.render_id.nunique()})
per_render.groupby(["dims", "convention", "prompt", "background"]).size().unstack("background")

# %%
skipped.groupby(["action", "reason"]).size().rename("count").to_frame()

# %% [markdown]
# ## Contact sheets: a brain MRI, a torso CT and a torso MR, every factor cell
#
# The three planes through the centre of each volume's labels, rendered by the same function
# the stage uses: the brain atlas, the real abdominal CT and the real abdominal MR. Rows:
# plane × convention (the row label names the world directions at the top and on the left).
# Columns: the scan without a prompt, the three visual prompts on the scan, and the mask prompt
# on a blank background.

# %%
volumes = pd.read_parquet(paths.prepared / "volumes.parquet")
sheets = {source: volumes[volumes.source == source].volume_id.iloc[0]
          for source in ("brain_atlas", "torso_ct", "torso_mr")
          if (volumes.source == source).any()} or {"first": volumes.volume_id.iloc[0]}
for source, volume_id in sheets.items():
    fig = render.contact_sheet_for(volume_id, params)
    save_figure(fig, f"contact_sheet_{source}", notebook=NOTEBOOK, provenance=provenance,
                dpi=150)
    display(fig)

# %% [markdown]
# In the standard axial view (first row) the patient's right is on the image left and
# anterior is up — the liver on the image left in the CT and the MR; the storage axial view
# (second row) puts the patient's right at the top and anterior on the left. Letters are the
# same per structure across a row pair, because they are shuffled per slice, not per cell.
# The CT is shown in the soft-tissue window whenever its labelled structures mix tissue
# classes; the MR between percentiles of its foreground.
#
# ## A 3D stack
#
# A stack spans every labelled structure of its slice along the through-plane axis, with an
# even number of frames in the order the convention defines; letters appear on every frame
# where the structure is visible, and `frame_first`/`frame_last` record that span. Eight
# evenly spaced frames, in reading order:

# %%
stacks = per_render[(per_render.dims == "3d") & (per_render.prompt == "mask")
                    & (per_render.background == "scan")]
if len(stacks):
    fig = render.stack_strip(paths.benchmark, renders, stacks.render_id.iloc[0])
    save_figure(fig, "stack_strip", notebook=NOTEBOOK, provenance=provenance, dpi=150)
    display(fig)

# %% [markdown]
# ## Check: patient left is on the viewer's right in the standard axial view
#
# For every left/right twin of the brain atlas labelled on the same standard axial image,
# the `Left_*` structure's pixel centroid lies to the right of its `Right_*` twin's.
# (Structure names in questions are readable ones, `mislib.structures.readable_name`: "left
# thalamus" for `Left_Thalamus_Proper`.)

# %%
axial = renders[(renders.plane == "axial") & (renders.convention == "standard")
                & (renders.dims == "2d") & renders.component.str.startswith(("Left_", "Right_"))]
twins = axial.assign(side=axial.component.str.split("_", n=1).str[0],
                     structure=axial.component.str.split("_", n=1).str[1])
twins = twins.pivot_table(index=["render_id", "structure"], columns="side",
                          values="centroid_col").dropna()
twins["left_on_viewer_right"] = twins["Left"] > twins["Right"]
twins.groupby("structure").left_on_viewer_right.all().to_frame() if len(twins) else twins
