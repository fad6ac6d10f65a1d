"""Stage-04 throughput: questions per second per arm with the smoke model (CPU, and CUDA).

A synthetic benchmark in stage 03's layout (:func:`mislib.smoke.write_smoke_benchmark`:
the real question mix of 2D pictures, 3D stacks passed as video, and text-only questions)
is answered by the tiny Qwen3-VL with the demo profile's decode settings, once per arm (baseline, greedy, semsam), in
a throw-away project root. The model and the SemSam table come from the repository's
``.cache`` (built on first use; the table's one-off build or load time is its own figure),
so the throughput figures time the harness and the decode rule, not the build.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from mislib.config import load_profile
from mislib.inference import load_backend, run_inference, semsam_table
from mislib.paths import project_paths
from mislib.smoke import SMOKE_MODEL_ID, write_smoke_benchmark


def _devices() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(quick: bool = False) -> list[dict]:
    profile = load_profile("demo")
    params = profile["inference"]
    n_questions = 8 if quick else 48
    repo_cache = project_paths().cache
    repo_cache.mkdir(parents=True, exist_ok=True)
    figures = []
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        root = Path(tmp)
        (root / ".cache").symlink_to(repo_cache, target_is_directory=True)
        write_smoke_benchmark(root, n_questions=n_questions, seed=1, image_size=448,
                              n_frames=profile["render"]["frames_3d"])
        t0 = time.perf_counter()
        backend = load_backend(params["backend"], SMOKE_MODEL_ID, root=root, device="cpu")
        figures.append({"bench": "inference", "metric": "model_load_s", "device": "cpu",
                        "value": round(time.perf_counter() - t0, 3), "unit": "s"})
        t0 = time.perf_counter()
        table, _ = semsam_table(backend, profile["semsam"]["k"], root=root, progress=False)
        figures.append({"bench": "inference", "metric": "semsam_table_ready_s",
                        "value": round(time.perf_counter() - t0, 3), "unit": "s",
                        "rows": table.num_embeddings, "k": table.k,
                        "note": "a cache hit after the first build on this machine"})
        for device in _devices():
            rates = {}
            for arm in ("baseline", "greedy", "semsam"):
                result = run_inference(profile, arm=arm, root=root, limit=n_questions,
                                       device=device, progress=False, force=True)
                rates[arm] = result.questions_per_s
                figures.append({
                    "bench": "inference", "metric": "questions_per_s", "arm": arm,
                    "device": device, "value": round(result.questions_per_s, 3),
                    "unit": "(question, trial)/s", "n": result.n_generated,
                    "batch_size": params["batch_size"],
                    "max_new_tokens": params["max_new_tokens"], "model": SMOKE_MODEL_ID})
            figures.append({"bench": "inference", "metric": "semsam_over_baseline_throughput",
                            "device": device,
                            "value": round(rates["semsam"] / rates["baseline"], 3),
                            "unit": "ratio"})
    return figures
