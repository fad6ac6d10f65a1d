"""mislib.inference.workers and worker shares: data-parallel runs on CPU (processes, Ray)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import require
from test_inference import _new_root, _profile, seeded_table  # noqa: F401  (fixture)

from mislib.__main__ import main as cli
from mislib.inference import run_inference, worker_of, worker_share
from mislib.inference.store import compact_run, current_runs, done_keys
from mislib.inference.workers import gpu_groups, launch_local, launch_ray, visible_gpus
from mislib.paths import REPO_ROOT

KEYS = [(f"q{i:03d}", t) for i in range(200) for t in range(3)]


def _shard_keys(run_dir: Path) -> dict[str, set[tuple[str, int]]]:
    """Keys per shard file, by the worker slot its name carries."""
    out: dict[str, set] = {}
    for shard in (run_dir / "shards").glob("*.jsonl"):
        slot = re.search(r"-w(\d+of\d+)-", shard.name).group(1)
        keys = {(r["question_id"], r["trial"]) for r in map(json.loads, shard.read_text().split("\n")[:-1])}
        out.setdefault(slot, set()).update(keys)
    return out


def _expected_keys(root: Path, n_trials: int = 2) -> set[tuple[str, int]]:
    questions = pd.read_parquet(root / "data" / "benchmark" / "questions.parquet")
    return {(q, t) for q in questions["question_id"] for t in range(n_trials)}


# ------------------------------------------------------------------ shares
def test_worker_shares_are_disjoint_and_cover_every_key():
    shares = [set(worker_share(KEYS, i, 3)) for i in range(3)]
    assert sum(map(len, shares)) == len(KEYS) and set().union(*shares) == set(KEYS)
    assert all(len(s) > 150 for s in shares)  # roughly even: 600 keys over 3 workers
    assert worker_share(KEYS, 0, 1) == KEYS


def test_a_key_keeps_its_worker_when_the_selection_grows():
    small = worker_share(KEYS[:90], 1, 4)
    assert small == [k for k in worker_share(KEYS, 1, 4) if k in set(KEYS[:90])]
    assert all(worker_of(q, t, 4) == 1 for q, t in small)


@pytest.mark.parametrize(("worker", "workers"), [(2, 2), (-1, 2), (0, 0)])
def test_a_worker_index_outside_the_count_is_rejected(worker, workers):
    with pytest.raises(ValueError, match="worker"):
        worker_share(KEYS, worker, workers)


def test_no_gpu_is_visible_when_cuda_visible_devices_is_empty(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpus() == ["2", "5"]


def test_each_worker_sees_its_own_group_of_gpus():
    gpus = ["0", "1", "2", "3", "5"]
    assert gpu_groups(gpus) == [["0"], ["1"], ["2"], ["3"], ["5"]]
    assert gpu_groups(gpus, gpus_per_worker=2) == [["0", "1"], ["2", "3"]]
    assert gpu_groups(gpus, workers=2) == [["0"], ["1"]]
    assert gpu_groups([], workers=3) == [[], [], []]
    with pytest.raises(ValueError, match=r"3 workers x 2 GPUs each need 6 GPUs; 5 visible"):
        gpu_groups(gpus, workers=3, gpus_per_worker=2)


# ------------------------------------------------------------------ workers on one run
def test_two_workers_on_one_run_write_disjoint_shards_whose_union_is_complete(smoke_root,
                                                                               tmp_path):
    root = _new_root(tmp_path / "root", smoke_root, n_questions=6)
    runs = [run_inference(_profile(), arm="baseline", root=root, progress=False,
                          worker=i, workers=2) for i in (0, 1)]
    run_dir = runs[0].run_dir
    assert runs[1].run_dir == run_dir
    assert not (run_dir / "responses.parquet").exists()  # workers leave compaction alone
    by_slot = _shard_keys(run_dir)
    assert set(by_slot) == {"0of2", "1of2"}
    assert not by_slot["0of2"] & by_slot["1of2"]
    assert by_slot["0of2"] | by_slot["1of2"] == _expected_keys(root)
    assert sorted(p.name.split("-w")[1][:4] for p in (run_dir / "sessions").glob("*.json")) \
        == ["0of2", "1of2"]

    assert cli(["compact", "--out", str(root / "data" / "results")]) == 0
    frame = pd.read_parquet(run_dir / "responses.parquet")
    assert len(frame) == 12 and not frame.duplicated(["question_id", "trial"]).any()
    assert current_runs(root / "data" / "results") == [run_dir]
    again = run_inference(_profile(), arm="baseline", root=root, progress=False, worker=0,
                          workers=2)
    assert again.n_generated == 0


def test_force_with_several_workers_is_refused(tmp_path):
    with pytest.raises(ValueError, match="force with several workers"):
        run_inference(_profile(), arm="baseline", root=tmp_path, force=True, worker=0,
                      workers=2)


def _write_profile(tmp_path: Path) -> Path:
    text = (REPO_ROOT / "mislib" / "profiles" / "demo.toml").read_text()
    for key, value in (("batch_size", 2), ("max_new_tokens", 3), ("limit", 0), ("n_trials", 2)):
        text = re.sub(rf"(?m)^{key} = \d+", f"{key} = {value}", text)
    text = re.sub(r'(?m)^arms = .*$', 'arms = ["greedy"]', text)
    path = tmp_path / "workers.toml"
    path.write_text(text)
    return path


def test_the_launcher_runs_two_cpu_processes_and_compacts_once(smoke_root, tmp_path,
                                                               monkeypatch):
    root = _new_root(tmp_path / "root", smoke_root, n_questions=4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    runs = launch_local(_write_profile(tmp_path), workers=2, root=root)
    (run_dir,) = runs
    frame = pd.read_parquet(run_dir / "responses.parquet")
    assert set(zip(frame["question_id"], frame["trial"], strict=True)) == _expected_keys(root)
    assert len(frame) == 8 and set(frame["arm"]) == {"greedy"}
    assert set(_shard_keys(run_dir)) <= {"0of2", "1of2"}
    assert len(list((root / "data" / "results" / "logs").glob("*-w*of2-*.log"))) == 2


def test_a_failing_worker_is_named_with_its_log(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(RuntimeError, match=r"worker \d of 2 exited with [1-9]\d*; see .*\.log"):
        launch_local(tmp_path / "no-such-profile.toml", workers=2, root=tmp_path)


def test_the_launcher_gives_its_backend_to_every_worker(smoke_root, tmp_path, monkeypatch):
    root = _new_root(tmp_path / "root", smoke_root, n_questions=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(RuntimeError, match=r"worker \d of 2 exited"):
        launch_local(_write_profile(tmp_path), workers=2, root=root, backend="no-such-backend")
    # the first worker to fail stops the other, which may not have got as far
    logs = sorted((root / "data" / "results" / "logs").glob("*-w*of2-*.log"))
    assert any("no-such-backend" in log.read_text() for log in logs)


def _start_local_ray(ray, attempts: int = 2) -> None:
    """A local two-CPU cluster (not local mode: actors are processes). Ray's Python side
    gives its node 30 s to register, which a loaded two-core machine can miss once."""
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
            return
        except Exception:  # ray raises a bare Exception for a node that timed out
            ray.shutdown()
            if attempt == attempts - 1:
                raise


def test_a_two_worker_ray_run_on_a_local_cluster_completes(smoke_root, tmp_path, monkeypatch):
    require(importlib.util.find_spec("ray") is not None, "the ray package", "make env")
    import ray

    # Ray's own start-up waits (15 s for its agents) are too short on a loaded 2-core machine.
    monkeypatch.setenv("RAY_agent_register_timeout_ms", "180000")
    monkeypatch.setenv("RAY_raylet_start_wait_time_s", "180")

    root = _new_root(tmp_path / "root", smoke_root, n_questions=4)
    profile = _profile(n_trials=2, batch_size=2, max_new_tokens=3)
    try:
        _start_local_ray(ray)
        runs = launch_ray(profile, workers=2, arms=["semsam"], root=root)
    finally:
        ray.shutdown()
    (run_dir,) = runs
    frame = pd.read_parquet(run_dir / "responses.parquet")
    assert len(frame) == 8 and not frame.duplicated(["question_id", "trial"]).any()
    assert done_keys(run_dir) == _expected_keys(root)
    slots = _shard_keys(run_dir)
    assert set(slots) == {"0of2", "1of2"} and not slots["0of2"] & slots["1of2"]
    record = json.loads((run_dir / "run.json").read_text())
    assert {s["worker"] for s in record["sessions"]} == {0, 1}
    assert compact_run(run_dir).equals(frame)  # compacting again changes nothing
