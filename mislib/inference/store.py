"""The result store of stage 04: run identity, JSONL shards, compaction, run discovery.

This is the one module later stages read results through. A run lives in
``data/results/<run_id>/``:

- ``run.json`` — the run identity, written once by whichever process opens the run first
  (model id and revision, backend and processor settings, decode settings, SemSam table
  hash, questions file hash); compaction adds the record counts and every session;
- ``sessions/<host>-w<i>of<n>-<pid>-<time>.json`` — one file per process that added records
  (worker, package versions, git commit, records produced, wall time), written only by
  that process;
- ``shards/<host>-w<i>of<n>-<pid>-<time>.jsonl`` — one JSON object per finished
  (question, trial), appended and fsynced after every batch, one file per process, so
  workers on many hosts never write the same file. A killed process leaves at most a torn
  last line, which readers skip;
- ``responses.parquet`` — every record of the shards, one row per (question, trial)
  (columns :data:`RESPONSE_COLUMNS`), written by :func:`compact_run` once the writers are
  done. It only grows: compaction refuses to replace it with fewer rows, so a limited run
  (``--limit``) or one with fewer trials adds to a run and never shrinks it.

``run_id`` is a hash of what the answers depend on, so a rerun with the same configuration
(more trials, more questions, another worker) finds and extends the same folder. The
results folder also holds one stamp ``.inference-<model>-<arm>.stage.json`` per (model, arm)
naming the run that was compacted last: :func:`current_runs` reads them.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mislib.config import config_hash, write_stamp
from mislib.paths import REPO_ROOT, RESPONSES_FILE, RUN_FILE, project_paths
from mislib.vocabulary import RECORD_STATUSES, decoder_of  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

#: Columns of ``responses.parquet``, in order.
RESPONSE_COLUMNS = ("run_id", "model", "arm", "question_id", "trial", "seed", "raw_text",
                    "parsed", "parse_status", "correct", "n_tokens", "latency_s", "status",
                    "error", "batch_size", "thinking_tokens", "answer_tokens",
                    "forced_answer", "backend", "prompt_tokens", "completion_tokens",
                    "cost_usd")
#: Packages whose versions go into each session record.
RECORDED_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas",
                     "pillow", "vllm", "ray", "mislib")


# ----------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------
def slug(model_id: str) -> str:
    """A model id as a file-name part: ``Qwen/Qwen3-VL-2B-Instruct`` -> ``qwen3-vl-2b-instruct``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", model_id.rsplit("/", 1)[-1]).strip("-").lower()


def run_id_for(model_id: str, arm: str, identity: Mapping[str, Any]) -> str:
    """``<model slug>-<arm>-<hash of the identity>``."""
    return f"{slug(model_id)}-{arm}-{config_hash(identity)[:10]}"


def stage_name(model_id: str, arm: str, backend: str | None = None) -> str:
    """The stamp name of one (model, arm, backend): ``inference-<model slug>-<arm>``, with
    ``-openai`` appended for an endpoint's run.

    The local backends (``hf``, ``vllm``) give the same tokens for the same seeds, so their
    runs of a model share a stamp; an endpoint decodes on its own server, so its runs of
    the same model id are current beside them and scored as another (model, backend).
    """
    suffix = "" if decoder_of(backend) == "local" else f"-{backend}"
    return f"inference-{slug(model_id)}-{arm}{suffix}"


def process_tag(worker: int = 0, workers: int = 1) -> str:
    """``<host>-w<i>of<n>-<pid>-<UTC time>``: unique per host, worker and process."""
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", socket.gethostname()) or "host"
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"{host}-w{int(worker)}of{int(workers)}-{os.getpid()}-{stamp}"


# ----------------------------------------------------------------------------------------
# Records and shards
# ----------------------------------------------------------------------------------------
def make_record(key: tuple[str, int], run_id: str, model_id: str, arm: str, seed: int,
                **fields: Any) -> dict[str, Any]:
    """One row of ``responses.parquet`` with defaults for the fields not given."""
    base = {"run_id": run_id, "model": model_id, "arm": arm, "question_id": key[0],
            "trial": key[1], "seed": seed, "raw_text": None, "parsed": None,
            "parse_status": None, "correct": False, "n_tokens": None, "latency_s": None,
            "status": "ok", "error": None, "batch_size": 0, "thinking_tokens": None,
            "answer_tokens": None, "forced_answer": None, "backend": None,
            "prompt_tokens": None, "completion_tokens": None, "cost_usd": None}
    unknown = set(fields) - set(base)
    if unknown:
        raise ValueError(f"unknown record fields {sorted(unknown)}")
    base.update(fields)
    return base


def read_shards(shard_dir: Path) -> list[dict[str, Any]]:
    """Every complete record in ``shard_dir/*.jsonl``, first occurrence of each key kept.

    A line that does not parse (the torn tail of a killed writer) is skipped with a
    warning naming the shard; so is a record without ``question_id``/``trial``.
    """
    records: dict[tuple[str, int], dict[str, Any]] = {}
    for shard in sorted(Path(shard_dir).glob("*.jsonl")):
        with shard.open("r", encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    key = (str(record["question_id"]), int(record["trial"]))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    log.warning("%s line %d: incomplete record skipped", shard, number)
                    continue
                records.setdefault(key, record)
    return list(records.values())


def done_keys(run_dir: Path) -> set[tuple[str, int]]:
    """The (question, trial) keys with a complete record in the run's shards."""
    return {(str(r["question_id"]), int(r["trial"])) for r in read_shards(run_dir / "shards")}


class ShardWriter:
    """Appends records to one new shard file; each batch is flushed and fsynced.

    Parameters
    ----------
    shard_dir : the run's ``shards`` folder.
    tag : the file's name without suffix (:func:`process_tag`), unique per process.
    """

    def __init__(self, shard_dir: Path, tag: str | None = None):
        shard_dir.mkdir(parents=True, exist_ok=True)
        self.path = shard_dir / f"{tag or process_tag()}.jsonl"
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        # One write call per batch, so a kill leaves at most the batch's last line torn.
        blob = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n"
                       for r in records)
        self._fh.write(blob)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()
        if self.path.stat().st_size == 0:
            self.path.unlink()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# Run folders: identity, sessions, locks
# ----------------------------------------------------------------------------------------
def open_run(results_dir: Path, run_id: str, identity: Mapping[str, Any]) -> Path:
    """The run's folder with its ``run.json``, created by the first process to get here.

    ``run.json`` is written to a temporary file and hard-linked into place, so of several
    workers starting together exactly one creates it and none overwrites it.
    """
    run_dir = Path(results_dir) / run_id
    (run_dir / "shards").mkdir(parents=True, exist_ok=True)
    (run_dir / "sessions").mkdir(exist_ok=True)
    target = run_dir / RUN_FILE
    if not target.is_file():
        tmp = run_dir / f".run.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"run_id": run_id, **identity}, indent=2, default=str))
        with contextlib.suppress(FileExistsError):
            os.link(tmp, target)
        tmp.unlink()
    return run_dir


def write_session(run_dir: Path, tag: str, session: Mapping[str, Any]) -> Path:
    """Write this process's session record (only this process ever writes this file)."""
    path = run_dir / "sessions" / f"{tag}.json"
    atomic_write_text(path, json.dumps(dict(session), indent=2, default=str))
    return path


def read_sessions(run_dir: Path) -> list[dict[str, Any]]:
    """The run's session records, oldest first (unreadable ones skipped with a warning)."""
    sessions = []
    for path in sorted((run_dir / "sessions").glob("*.json")):
        try:
            sessions.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            log.warning("%s: session record skipped (%s)", path, error)
    return sorted(sessions, key=lambda s: s.get("started", ""))


@contextlib.contextmanager
def worker_lock(run_dir: Path, worker: int = 0, workers: int = 1) -> Iterator[None]:
    """Held while a process appends records to ``run_dir``.

    A shared ``flock`` on ``run_dir/.lock`` (any number of workers; refused while someone
    holds it exclusively) and an exclusive one on ``.lock-w<i>of<n>`` (one process per
    worker slot). The kernel releases both when the holder exits, however it exits, so a
    killed run never leaves a stale lock behind.
    """
    with _flock(run_dir / ".lock", fcntl.LOCK_SH), \
            _flock(run_dir / f".lock-w{int(worker)}of{int(workers)}", fcntl.LOCK_EX):
        yield


@contextlib.contextmanager
def exclusive_lock(run_dir: Path) -> Iterator[None]:
    """Held while a process removes a run's records (``force``): no worker may be active."""
    with _flock(run_dir / ".lock", fcntl.LOCK_EX):
        yield


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{path.parent} is being written by another process right now; "
                               "wait for it to finish or stop it") from None
        yield


def remove_records(run_dir: Path) -> None:
    """Delete a run's shards, sessions and ``responses.parquet`` (the caller holds
    :func:`exclusive_lock`); ``run.json``'s identity stays."""
    for folder in ("shards", "sessions"):
        for path in (run_dir / folder).glob("*"):
            path.unlink()
    (run_dir / RESPONSES_FILE).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------
# Compaction
# ----------------------------------------------------------------------------------------
def records_frame(records: list[Mapping[str, Any]]) -> pd.DataFrame:
    """Records as a frame with the contract's columns and dtypes, sorted by key."""
    frame = pd.DataFrame.from_records(records, columns=list(RESPONSE_COLUMNS))
    frame = frame.astype({"trial": "int64", "seed": "int64", "batch_size": "int64"})
    frame["correct"] = frame["correct"].astype("boolean")
    # budget forcing's and an endpoint's columns: null where they do not apply and in
    # records written before the columns existed (old shards read as before)
    for column in ("n_tokens", "thinking_tokens", "answer_tokens", "prompt_tokens",
                   "completion_tokens"):
        frame[column] = frame[column].astype("Int64")
    frame["forced_answer"] = frame["forced_answer"].astype("boolean")
    frame["cost_usd"] = frame["cost_usd"].astype("Float64")
    return frame.sort_values(["question_id", "trial"], kind="stable").reset_index(drop=True)


def compact(run_dir: Path) -> pd.DataFrame:
    """Write ``responses.parquet`` from every record of the shards, atomically.

    Raises
    ------
    RuntimeError
        When the shards hold fewer records than the existing ``responses.parquet`` (shards
        removed by hand): a fuller result is never replaced by a smaller one.
    """
    run_dir = Path(run_dir)
    with _compaction_lock(run_dir):
        for stale in run_dir.glob(".responses.*.parquet"):  # left by a compaction killed midway
            stale.unlink(missing_ok=True)
        frame = records_frame(read_shards(run_dir / "shards"))
        target = run_dir / RESPONSES_FILE
        if target.is_file():
            before = pd.read_parquet(target, columns=["question_id", "trial"])
            kept = set(zip(frame["question_id"], frame["trial"], strict=True))
            lost = [k for k in zip(before["question_id"], before["trial"], strict=True)
                    if k not in kept]
            if lost:
                raise RuntimeError(
                    f"{target} holds {len(lost)} records that the shards no longer have "
                    f"(e.g. {lost[0]}); not replacing it with {len(frame)} records")
        tmp = run_dir / f".responses.{os.getpid()}.parquet"
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, target)
    return frame


@contextlib.contextmanager
def _compaction_lock(run_dir: Path) -> Iterator[None]:
    with (run_dir / ".compact.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocking: compactions take turns
        yield


def compact_run(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Join a run's shards into ``responses.parquet``, record its sessions and counts in
    ``run.json``, and mark it the current run of its (model, arm).

    Called by the last process of a one-process run, and once by ``python -m mislib
    compact`` (or the launcher) after the workers of a data-parallel run have finished.

    Returns
    -------
    pandas.DataFrame
        ``responses.parquet``'s rows.
    """
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no run.json)")
    frame = compact(run_dir)
    record = json.loads((run_dir / RUN_FILE).read_text())
    sessions = read_sessions(run_dir)
    record["sessions"] = sessions
    record["n_records"] = len(frame)
    record["status_counts"] = {str(k): int(v) for k, v in
                               frame["status"].value_counts().items()}
    atomic_write_text(run_dir / RUN_FILE, json.dumps(record, indent=2, default=str))
    requests = [s["request"] for s in sessions if s.get("request")]
    if requests:
        write_stamp(run_dir.parent, stage_name(record["model"], record["arm"],
                                               record.get("backend")), requests[-1],
                    [f"{run_dir.name}/responses.parquet"])
    return frame


def pending_runs(results_dir: str | os.PathLike) -> list[Path]:
    """Run folders whose shards hold records that ``responses.parquet`` does not show yet."""
    pending = []
    for run_json in sorted(Path(results_dir).glob("*/run.json")):
        run_dir = run_json.parent
        shards = list((run_dir / "shards").glob("*.jsonl"))
        if not shards:
            continue
        responses = run_dir / RESPONSES_FILE
        if not responses.is_file() or max(p.stat().st_mtime for p in shards) > \
                responses.stat().st_mtime:
            pending.append(run_dir)
    return pending


# ----------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------
def package_versions() -> dict[str, str | None]:
    """Python's and :data:`RECORDED_PACKAGES`' versions (None when not installed)."""
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """``HEAD`` of the repository mislib runs from, with ``-dirty`` if files changed."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"], check=True, capture_output=True,
                               text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


# ----------------------------------------------------------------------------------------
# Run discovery
# ----------------------------------------------------------------------------------------
def current_runs(results_dir: str | os.PathLike | None = None) -> list[Path]:
    """The run folder compacted last for each (model, arm).

    Every configuration change (model revision, decode settings, questions) starts a new
    ``<run_id>`` folder and leaves the old one in place; the stamps
    ``.inference-<model>-<arm>.stage.json`` name the current one. Later stages that
    should see one run per (model, arm) read these instead of globbing every folder.
    """
    folder = Path(results_dir) if results_dir is not None else project_paths().results
    runs = []
    for stamp in sorted(folder.glob(".inference-*.stage.json")):
        try:
            outputs = json.loads(stamp.read_text()).get("outputs") or []
        except (OSError, json.JSONDecodeError) as error:
            log.warning("%s: unreadable stamp skipped (%s)", stamp, error)
            continue
        if outputs and (folder / outputs[0]).is_file():
            runs.append((folder / outputs[0]).parent)
    return runs


def list_runs(results_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Every run folder under ``results_dir``: ``run_id, model, arm, backend, n_records,
    compacted, current`` (one row per folder with a ``run.json``)."""
    folder = Path(results_dir) if results_dir is not None else project_paths().results
    current = {p.name for p in current_runs(folder)}
    rows = []
    for run_json in sorted(folder.glob("*/run.json")):
        record = json.loads(run_json.read_text())
        responses = run_json.parent / RESPONSES_FILE
        rows.append({"run_id": run_json.parent.name, "model": record.get("model"),
                     "arm": record.get("arm"), "backend": record.get("backend"),
                     "n_records": record.get("n_records"), "compacted": responses.is_file(),
                     "current": run_json.parent.name in current})
    return pd.DataFrame(rows, columns=["run_id", "model", "arm", "backend", "n_records",
                                       "compacted", "current"])


def summarise_runs(run_dirs: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per run: model, arm, records, statuses and throughput over all its sessions.

    ``questions_per_s`` is records produced per second of generation, summed over the
    sessions in ``run.json`` (every process that added records, workers included: with
    ``n`` workers running at once this is the per-worker rate; ``n_workers`` says how many
    worker slots produced records).
    """
    rows = []
    for run_dir in map(Path, run_dirs):
        record = json.loads((run_dir / RUN_FILE).read_text())
        frame = pd.read_parquet(run_dir / RESPONSES_FILE,
                                columns=["status", "parse_status", "correct", "n_tokens"])
        sessions = [s for s in record.get("sessions", []) if s.get("n_generated")]
        generated = sum(s["n_generated"] for s in sessions)
        wall = sum(s.get("wall_s") or 0.0 for s in sessions)
        rows.append({
            "run_id": record["run_id"], "model": record["model"], "arm": record["arm"],
            "backend": record.get("backend"),
            "device": record.get("processor", {}).get("device"),
            "n_records": len(frame), "n_ok": int((frame["status"] == "ok").sum()),
            "n_parsed": int((frame["parse_status"] == "ok").sum()),
            "n_unparseable": int((frame["parse_status"] == "unparseable").sum()),
            "n_ambiguous": int((frame["parse_status"] == "ambiguous").sum()),
            "accuracy": float(frame["correct"].fillna(False).astype(bool).mean()),
            "mean_tokens": float(frame["n_tokens"].astype(float).mean()),
            "questions_per_s": generated / wall if wall > 0 else float("nan"),
            "n_workers": len({(s.get("worker"), s.get("workers")) for s in sessions}),
        })
    return pd.DataFrame(rows)
