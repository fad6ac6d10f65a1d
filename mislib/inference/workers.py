"""Data-parallel stage 04: one worker per GPU on a node, or per GPU of a Ray cluster.

Every worker runs :func:`mislib.inference.runner.run_profile` with its index ``i`` of ``n``:
it takes the (question, trial) keys that hash to ``i`` (:func:`~mislib.inference.runner.worker_of`),
writes them to its own shard and session files (named per host and worker), and never
touches another worker's files. When all have finished, each run is compacted once
(:func:`mislib.inference.store.compact_run`). A worker that dies is simply started again:
it skips what its shard already holds.

- :func:`launch_local`: ``n`` processes of ``python -m mislib infer --worker i --workers n``
  on this machine, each seeing one GPU (``CUDA_VISIBLE_DEVICES``); on a machine without
  GPUs, ``n`` CPU processes sharing the cores.
- :func:`launch_ray`: the same workers as Ray actors (one GPU each) across the nodes of a
  Ray cluster; the project root must be on storage every node sees.

>>> launch_local("paper")                 # every GPU of this node  # doctest: +SKIP
>>> launch_ray("paper", address="auto")   # every GPU of the cluster  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mislib.config import load_profile
from mislib.inference import store
from mislib.paths import REPO_ROOT, project_paths

log = logging.getLogger(__name__)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries.

    ``CUDA_VISIBLE_DEVICES`` when it is set (an empty value means none), else every device
    CUDA reports (torch is imported only in that case).
    """
    declared = os.environ.get("CUDA_VISIBLE_DEVICES")
    if declared is not None:
        return [d.strip() for d in declared.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []


def gpu_groups(gpus: Sequence[str], workers: int | None = None,
               gpus_per_worker: int = 1) -> list[list[str]]:
    """The GPUs each worker sees: consecutive groups of ``gpus_per_worker``.

    ``workers`` defaults to as many whole groups as there are GPUs; without GPUs every
    worker gets an empty group (CPU). A backend that splits a model over GPUs (tensor
    parallel) needs ``gpus_per_worker`` > 1.

    >>> gpu_groups(["0", "1", "2", "3"], gpus_per_worker=2)
    [['0', '1'], ['2', '3']]
    >>> gpu_groups([], workers=2)
    [[], []]
    """
    per = int(gpus_per_worker)
    if per < 1:
        raise ValueError(f"gpus_per_worker must be >= 1, got {gpus_per_worker!r}")
    if not gpus:
        return [[] for _ in range(int(workers or 1))]
    n = int(workers or len(gpus) // per)
    if n < 1 or n * per > len(gpus):
        raise ValueError(f"{n or 1} workers x {per} GPUs each need {(n or 1) * per} GPUs; "
                         f"{len(gpus)} visible ({','.join(gpus)})")
    return [list(gpus[i * per:(i + 1) * per]) for i in range(n)]


def _profile_arg(profile: str | os.PathLike | Mapping[str, Any]) -> str:
    if isinstance(profile, Mapping):
        raise TypeError("launch_local starts processes, which take a profile name or TOML path; "
                        "write the profile to a file first")
    return str(profile)


def launch_local(profile: str | os.PathLike = "demo", workers: int | None = None,
                 models: Sequence[str] | None = None, arms: Sequence[str] | None = None,
                 limit: int | None = None, out: str | os.PathLike | None = None,
                 root: str | os.PathLike | None = None, gpus_per_worker: int = 1,
                 poll_s: float = 1.0, backend: str | None = None) -> list[Path]:
    """Run the profile's models and arms with ``workers`` processes on this machine.

    Parameters
    ----------
    profile : profile name or TOML path (passed to each worker's command line).
    workers : number of processes (default: one per ``gpus_per_worker`` visible GPUs; 1
        without GPUs). With GPUs, each worker sees its own group (:func:`gpu_groups`);
        without, each gets an equal share of the CPU threads (``OMP_NUM_THREADS``).
    models, arms, limit, out : as for ``python -m mislib infer``.
    root : project root (``$MISGROUND_ROOT`` for the workers).
    gpus_per_worker : GPUs per worker process (more than 1 for tensor parallel models).
    poll_s : how often the launcher checks on its workers.
    backend : the inference backend of every worker (default: the profile's). The workers
        run under this launcher's Python, so launch a ``vllm`` run from the vLLM environment
        (``.venv-vllm/bin/python -m mislib launch --backend vllm``).

    Returns
    -------
    list of Path
        The run folders compacted at the end.

    Raises
    ------
    RuntimeError
        When a worker exits with an error, naming it and its log file (the others are
        stopped; rerun to resume, nothing finished is lost).
    """
    groups = gpu_groups(visible_gpus(), workers, gpus_per_worker)
    n = len(groups)
    paths = project_paths(root)
    results = Path(out) if out is not None else paths.results
    logs = results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // n)
    procs = []
    for i in range(n):
        cmd = [sys.executable, "-m", "mislib", "infer", "--profile", _profile_arg(profile),
               "--worker", str(i), "--workers", str(n)]
        for model in models or []:
            cmd += ["--model", model]
        for arm in arms or []:
            cmd += ["--arm", arm]
        if limit is not None:
            cmd += ["--limit", str(int(limit))]
        if backend is not None:
            cmd += ["--backend", backend]
        cmd += ["--out", str(results)]
        env = {**os.environ, "MISGROUND_ROOT": str(paths.root), "TQDM_DISABLE": "1"}
        if groups[i]:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(groups[i])
        else:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        log_path = logs / f"{store.process_tag(i, n)}.log"
        handle = log_path.open("w")
        procs.append((i, subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=handle,
                                          stderr=subprocess.STDOUT), handle, log_path))
    try:
        while any(p.poll() is None for _, p, _, _ in procs):
            failed = [(i, p, path) for i, p, _, path in procs if p.returncode not in (None, 0)]
            if failed:
                i, p, path = failed[0]
                raise RuntimeError(f"worker {i} of {n} exited with {p.returncode}; see {path}")
            time.sleep(poll_s)
        failed = [(i, p, path) for i, p, _, path in procs if p.returncode != 0]
        if failed:
            i, p, path = failed[0]
            raise RuntimeError(f"worker {i} of {n} exited with {p.returncode}; see {path}")
    finally:
        for _, p, handle, _ in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=60)
            handle.close()
    return compact_pending(results)


def compact_pending(results_dir: str | os.PathLike) -> list[Path]:
    """Compact every run under ``results_dir`` whose shards hold new records."""
    runs = store.pending_runs(results_dir)
    for run_dir in runs:
        store.compact_run(run_dir)
    return runs


class _RayWorker:
    """One worker as a Ray actor: runs its share of every (model, arm), then returns."""

    def run(self, profile: Mapping[str, Any], worker: int, workers: int,
            kwargs: Mapping[str, Any]) -> list[str]:
        from mislib.inference.runner import run_profile

        runs = run_profile(dict(profile), worker=worker, workers=workers, compact=False,
                           progress=False, **kwargs)
        return [str(run.run_dir) for run in runs]


def launch_ray(profile: str | os.PathLike | Mapping[str, Any] = "demo",
               workers: int | None = None, models: Sequence[str] | None = None,
               arms: Sequence[str] | None = None, limit: int | None = None,
               out: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
               address: str | None = None, gpus_per_worker: float | None = None,
               cpus_per_worker: float = 1, backend: str | None = None,
               **init_kwargs: Any) -> list[Path]:
    """Run the profile's models and arms as ``workers`` Ray actors, then compact.

    Parameters
    ----------
    profile : profile name, TOML path or mapping (sent to the actors as a mapping, so
        nodes need not have the file).
    workers : number of actors (default: the cluster's GPUs, else 1).
    models, arms, limit : as for ``python -m mislib infer``.
    out, root : results folder and project root; both must be on storage that every node
        mounts at the same path (shards and session files are per host and worker, so
        nodes never write the same file).
    address : the cluster to join (``"auto"`` for the one this node belongs to; None
        starts a local one unless Ray is already initialised).
    gpus_per_worker : GPUs per actor (default 1 when the cluster has GPUs, else 0); more
        than 1 for a backend that shards a model over GPUs (tensor parallel).
    cpus_per_worker : CPUs reserved per actor.
    backend : the inference backend of every actor (default: the profile's).
    **init_kwargs : passed to ``ray.init`` (e.g. ``num_cpus`` for a local cluster).

    Returns
    -------
    list of Path
        The run folders compacted at the end.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, **init_kwargs)
    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus_per_worker is None:
        gpus_per_worker = 1 if cluster_gpus else 0
    n = int(workers or (cluster_gpus // max(1, int(gpus_per_worker or 1)) if cluster_gpus
                        else 1))
    prof = load_profile(profile) if not isinstance(profile, Mapping) else dict(profile)
    paths = project_paths(root)
    results = Path(out) if out is not None else paths.results
    kwargs = {"models": models, "arms": arms, "limit": limit, "out": str(results),
              "root": str(paths.root), "backend": backend}
    actor = ray.remote(num_gpus=gpus_per_worker, num_cpus=cpus_per_worker)(_RayWorker)
    actors = [actor.remote() for _ in range(n)]
    try:
        ray.get([a.run.remote(prof, i, n, kwargs) for i, a in enumerate(actors)])
    finally:
        for a in actors:
            ray.kill(a)
    return compact_pending(results)
