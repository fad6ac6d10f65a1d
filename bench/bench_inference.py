"""Stage-04 throughput: questions per second per backend x arm with the smoke model (CPU, and
CUDA), and SemSam's overhead (semsam / baseline throughput, same run) per backend.

A synthetic benchmark in stage 03's layout (:func:`mislib.smoke.write_smoke_benchmark`:
the real question mix of 2D pictures, 3D stacks passed as video, and text-only questions)
is answered by the tiny Qwen3-VL with the demo profile's decode settings, once per arm (baseline, greedy, semsam), in
a throw-away project root. The model and the SemSam table come from the repository's
``.cache`` (built on first use; the table's one-off build or load time is its own figure),
so the throughput figures time the harness and the decode rule, not the build.

The vllm backend runs the same runs in ``.venv-vllm`` (``make env-vllm``; a subprocess,
``python -m bench.bench_inference ROOT N``), after one untimed request that starts its
engine, so its figures time decoding, not the engine's start-up (a figure of its own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mislib.config import load_profile
from mislib.inference import load_backend, run_inference, semsam_table
from mislib.paths import REPO_ROOT, project_paths
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
            figures += _arm_figures(profile, root, n_questions, device, "hf")
        figures += _vllm_figures(root, n_questions)
    return figures


def _arm_figures(profile: dict, root: Path, n_questions: int, device: str,
                 backend: str) -> list[dict]:
    """questions/s of each arm, then semsam / baseline throughput, for one backend."""
    params = profile["inference"]
    rates, figures = {}, []
    for arm in ("baseline", "greedy", "semsam"):
        result = run_inference(profile, arm=arm, root=root, limit=n_questions, device=device,
                               progress=False, force=True, backend=backend)
        rates[arm] = result.questions_per_s
        figures.append({
            "bench": "inference", "metric": "questions_per_s", "backend": backend, "arm": arm,
            "device": device, "value": round(result.questions_per_s, 3),
            "unit": "(question, trial)/s", "n": result.n_generated,
            "batch_size": params["batch_size"], "max_new_tokens": params["max_new_tokens"],
            "model": SMOKE_MODEL_ID})
    figures.append({"bench": "inference", "metric": "semsam_over_baseline_throughput",
                    "backend": backend, "device": device,
                    "value": round(rates["semsam"] / rates["baseline"], 3), "unit": "ratio"})
    return figures


VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"


def _vllm_figures(root: Path, n_questions: int) -> list[dict]:
    """The vllm backend's figures, measured in ``.venv-vllm`` (one JSON figure per line)."""
    if not VLLM_PYTHON.is_file():
        return [{"bench": "inference", "backend": "vllm", "metric": "skipped",
                 "note": "no .venv-vllm: build it with `make env-vllm`"}]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MISGROUND_ROOT=str(root))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    proc = subprocess.run([str(VLLM_PYTHON), "-m", "bench.bench_inference", str(root),
                           str(n_questions)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:  # keep the hf figures: report the failure as a figure
        print(proc.stderr[-3000:], file=sys.stderr)
        return [{"bench": "inference", "backend": "vllm", "metric": "failed",
                 "note": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr else ""}]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _vllm_child(root: Path, n_questions: int) -> list[dict]:
    """Inside ``.venv-vllm``: start the engine untimed, then time every arm."""
    import torch

    from mislib.inference.registry import unload_backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    profile = load_profile("demo")
    t0 = time.perf_counter()
    run_inference(profile, arm="greedy", root=root, limit=1, device=device, progress=False,
                  force=True, backend="vllm", out=root / "warm-up")
    figures = [{"bench": "inference", "metric": "engine_start_s", "backend": "vllm",
                "device": device, "value": round(time.perf_counter() - t0, 3), "unit": "s",
                "note": "loading, memory profiling and one request"}]
    figures += _arm_figures(profile, root, n_questions, device, "vllm")
    unload_backend()
    return figures


if __name__ == "__main__":  # the vllm child (vLLM starts workers with spawn: guard needed)
    for figure in _vllm_child(Path(sys.argv[1]), int(sys.argv[2])):
        print(json.dumps(figure), flush=True)
