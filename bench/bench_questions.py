"""Stage 03: questions generated per second, at the paper's input shape.

Synthetic stage-01/02 tables shaped like the paper's benchmark input (1,160 volumes, two
slices each, every slice rendered as a 2D image and a 3D stack in 2 conventions × (3 prompts
× 2 backgrounds + the scan without a prompt), six labelled structures per render) are built
in memory; their pixel centroids and frame ranges follow
:func:`mislib.geometry.screen_mapping`, as the renderer's do. :func:`mislib.questions.build_questions` then runs with the ``paper`` and the ``demo``
profile's knobs. Figures: questions per second, seconds, and the question count (the paper
profile's count is the one to compare with the paper's 33,864).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from mislib.config import stage_params
from mislib.geometry import PLANES, plane_axes, screen_mapping, screen_offset
from mislib.questions import build_questions

PAPER_VOLUMES = 1_160


def synthetic_inputs(n_volumes: int, seed: int = 0, labels: int = 6, ct_share: float = 0.84
                     ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(renders, volumes, components)`` for ``n_volumes`` volumes with two slices each."""
    rng = np.random.default_rng(seed)
    vids = [f"v{i:05d}" for i in range(n_volumes)]
    ct = rng.random(n_volumes) < ct_share
    volumes = pd.DataFrame({
        "volume_id": vids, "source": np.where(ct, "totalsegmentator", "knee_mri"),
        "modality": np.where(ct, "CT", "MRI"),
        "laterality": np.where(ct, None, rng.choice(["left", "right"], n_volumes)).astype(object)})
    names = np.array([f"structure_{j:02d}" for j in range(77)])
    comp_rows = []
    cols: dict[str, list] = {k: [] for k in (
        "render_id", "volume_id", "slice_id", "plane", "convention", "dims", "prompt",
        "background", "image_path", "n_frames", "letter", "component", "centroid_col",
        "centroid_row", "frame_first", "frame_last", "centroid_frame", "visible_x",
        "visible_y", "visible_z")}
    letters = list("ABCDEF"[:labels])
    for vid in vids:
        comps = [str(c) for c in rng.choice(names, labels, replace=False)]
        xyz = rng.uniform(-120, 120, (labels, 3))
        comp_rows += [(vid, c, *p) for c, p in zip(comps, xyz, strict=True)]
        for plane in rng.choice(PLANES, 2, replace=False):
            fixed, _ = plane_axes(plane)
            for dims in ("2d", "3d"):
                world = xyz.copy()
                if dims == "2d":  # the visible part lies on the slice
                    world[:, fixed] = xyz[:, fixed].mean()
                for convention in ("standard", "storage"):
                    off = screen_offset(world, screen_mapping(plane, convention))
                    mid = 8 + off[:, 2] / 10.0
                    for prompt in ("none", "mask", "box", "point"):
                        for background in ("scan", "blank"):
                            if prompt == "none" and background == "blank":
                                continue  # an empty image: stage 02 does not draw it
                            rid = f"{vid}-{plane}-{dims}-{convention}-{prompt}-{background}"
                            same = {"render_id": rid, "volume_id": vid,
                                    "slice_id": f"{vid}-{plane}", "plane": plane,
                                    "convention": convention, "dims": dims, "prompt": prompt,
                                    "background": background,
                                    "image_path": f"images/{rid}.png" if dims == "2d"
                                    else f"stacks/{rid}/",
                                    "n_frames": 1 if dims == "2d" else 16}
                            for k, v in same.items():
                                cols[k] += [v] * labels
                            cols["letter"] += [None] * labels if prompt == "none" else letters
                            cols["component"] += comps
                            cols["centroid_col"] += list(224 + off[:, 0])
                            cols["centroid_row"] += list(224 + off[:, 1])
                            nan = [np.nan] * labels
                            cols["frame_first"] += nan if dims == "2d" else list(mid - 2)
                            cols["frame_last"] += nan if dims == "2d" else list(mid + 2)
                            cols["centroid_frame"] += nan if dims == "2d" else list(mid)
                            for a, k in enumerate(("visible_x", "visible_y", "visible_z")):
                                cols[k] += list(world[:, a])
    components = pd.DataFrame(comp_rows, columns=["volume_id", "component", "centroid_x",
                                                  "centroid_y", "centroid_z"])
    return pd.DataFrame(cols), volumes, components


def run(quick: bool = False) -> list[dict]:
    n_volumes = 20 if quick else PAPER_VOLUMES
    t0 = time.perf_counter()
    renders, volumes, components = synthetic_inputs(n_volumes)
    build_s = time.perf_counter() - t0
    figures = [{"bench": "questions", "metric": "synthetic_input_rows", "value": len(renders),
                "unit": "render labels", "volumes": n_volumes, "build_s": round(build_s, 2)}]
    for profile in ("paper", "demo"):
        params = stage_params(profile, "questions")
        t0 = time.perf_counter()
        q = build_questions(renders, volumes, components, params, progress=False)
        seconds = time.perf_counter() - t0
        figures += [
            {"bench": "questions", "metric": "questions_per_s", "value": round(len(q) / seconds),
             "unit": "questions/s", "knobs": profile, "volumes": n_volumes},
            {"bench": "questions", "metric": "generate_s", "value": round(seconds, 2),
             "unit": "s", "knobs": profile, "volumes": n_volumes},
            {"bench": "questions", "metric": "questions", "value": len(q), "unit": "questions",
             "knobs": profile, "volumes": n_volumes,
             "ct_share": round(float((q["modality"] == "CT").mean()), 3),
             "by_family": {k: int(v) for k, v in q["family"].value_counts().items()}},
        ]
    return figures
