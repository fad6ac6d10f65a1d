"""Stage 02 speed: renders per second on the demo sources.

Stage 01 prepares the demo sources (the MNI152 brain atlas and the torso-CT / knee-MRI
phantoms; ``--quick``: the brain atlas alone) into a temporary root, then the whole
``[render]`` stage of the demo profile runs there — every slice in every factor cell, 2D
images and 16-frame 3D stacks, PNGs written — once in one process and once in two. A
*render* is one row-group of ``renders.parquet`` (an image or a stack); an *image* is one
PNG file (a 2D image or one stack frame). The demo's render share must stay well under a
minute on 2 cores. ``cpu_ms_per_image`` (one process) is the figure least disturbed by
other load on the machine.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from mislib import render, volumes


def run(quick: bool = False) -> list[dict]:
    sources = ["brain_atlas"] if quick else None
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        volumes.prepare("demo", root=root, sources=sources)
        for workers in (1,) if quick else (1, 2):
            t0, c0 = time.perf_counter(), time.process_time()
            renders = render.render_benchmark("demo", root=root, force=True, workers=workers)
            seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            n_renders = renders.render_id.nunique()
            per_render = renders.drop_duplicates("render_id")
            n_images = int(per_render.n_frames.sum())
            common = {"bench": "render", "workers": workers, "renders": n_renders,
                      "images": n_images, "image_size": int(per_render.width.iloc[0]),
                      "volumes": int(renders.volume_id.nunique())}
            figures += [
                {**common, "metric": "renders_per_s", "value": round(n_renders / seconds, 2),
                 "unit": "render/s"},
                {**common, "metric": "images_per_s", "value": round(n_images / seconds, 1),
                 "unit": "png/s"},
                {**common, "metric": "stage_s", "value": round(seconds, 2), "unit": "s"},
            ]
            if workers == 1:  # CPU time of the one process: robust to a busy machine
                figures.append({**common, "metric": "cpu_ms_per_image",
                                "value": round(1000 * cpu_s / n_images, 1), "unit": "ms"})
    return figures
