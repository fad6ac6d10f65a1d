"""The vllm backend on CPU (``.venv-vllm``, built by ``make env-vllm``): it answers text,
image and video questions, gives the hf backend's tokens for every arm with the same seeds,
and a SIGKILLed vllm run resumes with every (question, trial) exactly once.

vLLM is not importable in the test environment, so each check runs it in a subprocess of
``.venv-vllm/bin/python``, in one engine process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with
a 1 GiB KV cache.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import require

from mislib.paths import REPO_ROOT

VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
ARMS = ("greedy", "baseline", "semsam")
DECODE = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "max_new_tokens": 12,
          "mode": "argmax", "k": 32}
# small dummy media for vLLM's memory profiling: the smoke processor's own pixel budgets
ENGINE_OPTIONS = {"max_model_len": 2048, "max_num_seqs": 8,
                  "limit_mm_per_prompt": {
                      "image": {"count": 1, "width": 160, "height": 160},
                      "video": {"count": 1, "num_frames": 4, "width": 96, "height": 96}}}

# each check starts a vLLM engine (about a minute on 2 idle cores, several on a loaded machine)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def vllm_env(root: Path) -> dict[str, str]:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               PYTHONPATH=str(REPO_ROOT), MISGROUND_ROOT=str(root), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("VLLM_USE_V2_MODEL_RUNNER", None)
    return env


def require_vllm() -> None:
    ok = VLLM_PYTHON.is_file() and subprocess.run(
        [str(VLLM_PYTHON), "-c", "import vllm"], capture_output=True).returncode == 0
    require(ok, "the vLLM environment (.venv-vllm with vllm importable)", "make env-vllm")


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    """A project root with the smoke model and a small benchmark of every input kind."""
    from mislib.smoke import smoke_model_dir, write_smoke_benchmark

    require_vllm()
    root = tmp_path_factory.mktemp("vllm_root")
    # the smoke model's SemSam table (minutes to build on 2 cores) is kept in the checkout's
    # cache, as `make reproduce` keeps it, so only the first run on a machine builds it
    shared = REPO_ROOT / ".cache" / "semsam"
    shared.mkdir(parents=True, exist_ok=True)
    (root / ".cache").mkdir()
    (root / ".cache" / "semsam").symlink_to(shared, target_is_directory=True)
    smoke_model_dir(root)
    write_smoke_benchmark(root, n_questions=40, seed=3, image_size=64, n_frames=4)
    return root


@pytest.fixture(scope="module")
def both_backends(bench_root):
    """The same requests through the hf and the vllm backend, each in a fresh process."""
    from mislib.inference.prompts import input_kind, question_dict
    from mislib.inference.registry import load_backend, resolve_model, unload_backend
    from mislib.inference.runner import semsam_table, trial_seed
    from mislib.paths import project_paths
    from mislib.smoke import SMOKE_MODEL_ID

    paths = project_paths(bench_root)
    frame = pd.read_parquet(paths.benchmark / "questions.parquet")
    rows = [question_dict(r) for r in frame.to_dict("records")]
    picked = []
    for kind in ("text", "image", "video"):
        of_kind = [r for r in rows if input_kind(r) == kind]
        assert len(of_kind) >= 2, f"the smoke benchmark has fewer than 2 {kind} questions"
        picked += [{**r, "trial": t, "seed": trial_seed(7, r["question_id"], t)}
                   for r in of_kind[:2] for t in (0, 1)]
    hf = load_backend("hf", SMOKE_MODEL_ID, root=bench_root, device="cpu")
    table, table_path = semsam_table(hf, DECODE["k"], root=bench_root, progress=False)
    unload_backend()
    decode = {**DECODE, "table_path": str(table_path), "table_key": table.key}
    job = {"source": resolve_model(SMOKE_MODEL_ID, bench_root)[0], "model_id": SMOKE_MODEL_ID,
           "benchmark": str(paths.benchmark), "arms": list(ARMS), "decode": decode,
           "options": ENGINE_OPTIONS,
           "questions": [{k: q[k] for k in ("question_id", "trial", "seed", "text", "choices",
                                            "image_path", "dims")} for q in picked]}
    outputs = generate_on_both_backends(job, bench_root, bench_root)
    return picked, outputs["hf"], outputs["vllm"]


def generate_on_both_backends(job: dict, folder: Path, root: Path) -> dict[str, dict]:
    """Run ``job`` through tests/scripts/backend_generate.py on the hf backend (this Python)
    and the vllm backend (``.venv-vllm``'s), each in a fresh process; their outputs by name."""
    job_file = folder / "job.json"
    job_file.write_text(json.dumps(job, default=str))
    outputs = {}
    for backend, python in (("hf", sys.executable), ("vllm", str(VLLM_PYTHON))):
        out_file = folder / f"{backend}_out.json"
        proc = subprocess.run([python, str(REPO_ROOT / "tests/scripts/backend_generate.py"),
                               backend, str(job_file), str(out_file)], env=vllm_env(root),
                              capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-4000:]
        outputs[backend] = json.loads(out_file.read_text())
    return outputs


def test_the_vllm_backend_outside_its_environment_is_a_clear_error():
    import importlib.util

    from mislib.inference.registry import backend_class

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is importable in this environment")
    with pytest.raises(ValueError, match="backend 'vllm' cannot be imported here"):
        backend_class("vllm")


def test_vllm_backend_answers_text_image_and_video_questions(both_backends):
    picked, _, vllm_out = both_backends
    kinds = {}
    from mislib.inference.prompts import input_kind

    for question, generation in zip(picked, vllm_out["arms"]["semsam"], strict=True):
        assert 1 <= generation["n_tokens"] <= DECODE["max_new_tokens"]
        assert generation["n_tokens"] == len(generation["token_ids"])
        kinds.setdefault(input_kind(question), []).append(generation)
    assert sorted(kinds) == ["image", "text", "video"]
    assert vllm_out["settings"]["video_as"] == "video"
    assert vllm_out["settings"]["dtype"] == "float32"
    assert vllm_out["settings"]["engine"]["model_runner"] == "v1"


@pytest.mark.parametrize("arm", ARMS)
def test_hf_and_vllm_give_identical_tokens(both_backends, arm):
    picked, hf_out, vllm_out = both_backends
    hf_tokens = [g["token_ids"] for g in hf_out["arms"][arm]]
    vllm_tokens = [g["token_ids"] for g in vllm_out["arms"][arm]]
    for question, a, b in zip(picked, hf_tokens, vllm_tokens, strict=True):
        assert a == b, (arm, question["question_id"], question["trial"])
    assert [g["text"] for g in hf_out["arms"][arm]] == [g["text"] for g in vllm_out["arms"][arm]]


def test_the_arms_differ_so_identical_tokens_are_not_trivial(both_backends):
    _, hf_out, _ = both_backends
    tokens = {arm: [g["token_ids"] for g in hf_out["arms"][arm]] for arm in ARMS}
    assert tokens["greedy"] != tokens["baseline"]
    # the two trials of a question draw differently in the baseline arm, not in greedy
    assert tokens["baseline"][0] != tokens["baseline"][1]
    assert tokens["greedy"][0] == tokens["greedy"][1]


def kill_test_profile(root: Path) -> Path:
    """The demo profile with a small, many-batch vllm run (2 records per batch)."""
    import tomllib

    from mislib.config import load_profile

    text = (REPO_ROOT / "mislib/profiles/demo.toml").read_text()
    demo = tomllib.loads(text)
    assert "inference" in demo and load_profile("demo")
    lines, out, section = text.splitlines(), [], None
    for line in lines:
        if line.startswith("["):
            section = line.strip("[] ")
        key = line.split("=")[0].strip()
        if section == "inference" and key in ("backend", "n_trials", "batch_size", "limit",
                                              "max_new_tokens", "device", "arms"):
            continue
        out.append(line)
        if line.strip() == "[inference]":
            out += ['backend = "vllm"', "n_trials = 2", "batch_size = 2", "limit = 6",
                    "max_new_tokens = 8", 'device = "cpu"', 'arms = ["semsam"]']
    out.append("\n[inference.vllm]")
    out.append("max_model_len = 2048")
    out.append("max_num_seqs = 8")
    out.append('limit_mm_per_prompt = { image = { count = 1, width = 160, height = 160 }, '
               'video = { count = 1, num_frames = 4, width = 96, height = 96 } }')
    path = root / "vllm_kill.toml"
    path.write_text("\n".join(out) + "\n")
    return path


def test_a_sigkilled_vllm_run_resumes_with_every_record_exactly_once(bench_root):
    from mislib.inference.store import read_shards
    from mislib.paths import project_paths

    profile = kill_test_profile(bench_root)
    results = project_paths(bench_root).results
    command = [str(VLLM_PYTHON), "-m", "mislib", "infer", "--profile", str(profile),
               "--backend", "vllm"]
    env = vllm_env(bench_root)
    log = (bench_root / "killed.log").open("w")
    first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                             cwd=bench_root)
    deadline = time.monotonic() + 900
    written = 0
    while time.monotonic() < deadline and first.poll() is None:
        shards = list(results.glob("*/shards/*.jsonl"))
        written = sum(1 for s in shards for line in s.read_text().splitlines() if line.strip())
        if written:
            first.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    first.wait(timeout=60)
    log.close()
    assert first.returncode == -signal.SIGKILL, (bench_root / "killed.log").read_text()[-3000:]
    run_dirs = [p for p in results.iterdir() if (p / "shards").is_dir()]
    assert len(run_dirs) == 1
    before = len(read_shards(run_dirs[0] / "shards"))
    assert 0 < before < 12  # killed mid-run, with records on disk

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900,
                            cwd=bench_root)
    assert second.returncode == 0, second.stderr[-4000:]
    responses = pd.read_parquet(run_dirs[0] / "responses.parquet")
    keys = list(zip(responses["question_id"], responses["trial"], strict=True))
    assert len(keys) == len(set(keys)) == 12  # 6 questions x 2 trials, each once
    assert (responses["status"] == "ok").all()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
