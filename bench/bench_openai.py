"""The openai backend against a local vLLM server: requests per second at 1, 8 and 32
requests in flight.

``python -m mislib serve``'s server (``.venv-vllm``; vLLM's OpenAI server with SemSam's
processor, here without the neighbour table, which the arms timed do not need) serves the
tiny Qwen3-VL on 127.0.0.1, on CPU. A synthetic benchmark in stage 03's layout
(:func:`mislib.smoke.write_smoke_benchmark`: 2D pictures as PNG data URLs, 3D stacks as one
video, text-only questions) is answered through stage 04 (:func:`run_inference`, backend
``openai``) in the ``baseline`` arm, decoded by the processor with the demo profile's
settings, once per concurrency, after one untimed run that warms the server. The figures
time the whole path: media encoding, HTTP, the server's scheduling and decoding, and the
store's append of every record. Without ``.venv-vllm`` the module reports that and no figure.
"""

from __future__ import annotations

import copy
import socket
import tempfile
import time
from pathlib import Path

from mislib.config import load_profile
from mislib.inference import run_inference
from mislib.paths import project_paths
from mislib.serve import VLLM_PYTHON, server_command, start_server, stop_server
from mislib.smoke import SMOKE_MODEL_ID, smoke_model_dir, write_smoke_benchmark

CONCURRENCY = (1, 8, 32)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(quick: bool = False) -> list[dict]:
    if not VLLM_PYTHON.is_file():
        return [{"bench": "openai", "metric": "skipped", "value": 0,
                 "note": "no .venv-vllm: build it with `make env-vllm`"}]
    n_questions = 16 if quick else 64
    profile = copy.deepcopy(load_profile("demo"))
    params = profile["inference"]
    params.update(backend="openai", models=[SMOKE_MODEL_ID], n_trials=2,
                  vllm={"max_model_len": 4096, "max_num_seqs": max(CONCURRENCY),
                        "limit_mm_per_prompt": {
                            "image": {"count": 1, "width": 128, "height": 128},
                            "video": {"count": 1, "num_frames": 4, "width": 128,
                                      "height": 128}}})
    repo_cache = project_paths().cache
    repo_cache.mkdir(parents=True, exist_ok=True)
    figures = []
    with tempfile.TemporaryDirectory(prefix="bench-openai-") as tmp:
        root = Path(tmp)
        (root / ".cache").symlink_to(repo_cache, target_is_directory=True)
        smoke_model_dir(root)
        write_smoke_benchmark(root, n_questions=n_questions, seed=1, image_size=128,
                              n_frames=4)
        port = _free_port()
        url = f"http://127.0.0.1:{port}/v1"
        argv, env = server_command(profile, model=SMOKE_MODEL_ID, port=port, device="cpu",
                                   root=root, table=False, progress=False)
        env = dict(env, VLLM_CPU_KVCACHE_SPACE="2", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", MISGROUND_ROOT=str(root))
        t0 = time.perf_counter()
        server = start_server(argv, env, root / "server.log", url)
        figures.append({"bench": "openai", "metric": "server_start_s", "device": "cpu",
                        "value": round(time.perf_counter() - t0, 1), "unit": "s",
                        "model": SMOKE_MODEL_ID})
        try:
            run_inference(profile, arm="baseline", root=root, limit=4, progress=False,
                          force=True, openai={"base_url": url, "stack_as": "video",
                                              "max_concurrency": 4})  # warm-up, untimed
            for concurrency in CONCURRENCY:
                result = run_inference(profile, arm="baseline", root=root, progress=False,
                                       force=True, limit=n_questions,
                                       openai={"base_url": url, "stack_as": "video",
                                               "max_concurrency": concurrency})
                figures.append({
                    "bench": "openai", "metric": "requests_per_s", "arm": "baseline",
                    "concurrency": concurrency, "value": round(result.questions_per_s, 3),
                    "unit": "requests/s", "n": result.n_generated, "device": "cpu",
                    "max_new_tokens": params["max_new_tokens"], "model": SMOKE_MODEL_ID,
                    "server": "mislib serve (vLLM OpenAI server, SemSam processor)"})
        finally:
            stop_server(server)
    return figures
