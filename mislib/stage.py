"""Crash-safe stage runs: outputs staged beside their place, moved in, the stamp written last.

Every stage (01-03, 06-08, and the export of ``make export``) writes its outputs through
:class:`StageRun`, so that a kill or an error at any moment leaves either the old outputs with
their old stamp, or the new outputs with the new stamp, or no stamp at all (and the next run
redoes the work):

1. outputs are written under a fresh staging folder ``<out_dir>/.<stage>.partial-<random>/``
   by the same relative names they have in ``out_dir`` (a kill here leaves the old outputs
   untouched; a worker process orphaned by the kill can only write into its own run's
   staging folder, never into the next run's);
2. on success, the stage's stamp is removed, *then* each output is moved onto its place
   (:func:`replace_path`: ``os.replace`` for a file, two renames for a folder);
3. the stamp is written last, with the outputs' manifest (:func:`mislib.config.output_manifest`),
   so a stamp whose outputs later lose files no longer counts as fresh.

An error inside the ``with`` block drops the staging folder and leaves the old outputs and
stamp as they were. One run per stage and folder at a time: a second one is refused (an
advisory ``flock`` on ``<out_dir>/.<stage>.lock``, released by the kernel when a process
dies), so leftover staging folders can only be killed runs' and are removed.

This guards against a killed process; it does not ``fsync``, so a power cut can still lose
what the operating system had not yet written.

>>> run = StageRun(out_dir, "volumes", params, ["volumes.parquet"])  # doctest: +SKIP
>>> if force or not run.fresh():                                      # doctest: +SKIP
...     with run:
...         table.to_parquet(run.path("volumes.parquet"))
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mislib.config import file_digest, is_fresh, remove_stamp, write_stamp


class StageBusy(RuntimeError):
    """Another process is running the same stage into the same folder."""


def replace_path(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move ``new`` (a file or a folder) onto ``target``, replacing whatever is there.

    A file is replaced atomically (``os.replace``). A folder cannot be swapped in one call:
    the old one is renamed aside (``.<name>.old``), the new one renamed in, the old one
    removed; a kill between the renames leaves ``target`` absent, never a mix of both.
    Callers that keep a stamp remove it first (:class:`StageRun` does).
    """
    new, target = Path(new), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if new.is_dir():
        aside = target.with_name(f".{target.name}.old")
        shutil.rmtree(aside, ignore_errors=True)  # a killed swap's leftover
        if target.is_dir() and not target.is_symlink():
            target.rename(aside)
        elif target.exists() or target.is_symlink():
            target.unlink()
        new.rename(target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(new, target)


def input_digests(files: Iterable[str | os.PathLike],
                  previous: Mapping[str, Any] | None = None,
                  workers: int = 4) -> dict[str, dict[str, Any]]:
    """Content digests of a stage's input files, reusing ``previous`` ones for unchanged files.

    Parameters
    ----------
    files : the input files (a missing one is recorded as ``{"missing": True}``).
    previous : this function's result recorded in the last stamp (``StageRun(inputs=...)``);
        a file whose size and modification time (ns) match its entry there keeps its
        digest instead of being read again (as ``git`` and ``make`` trust a file's stat).
    workers : threads hashing files (``hashlib`` releases the GIL on large blocks).

    Returns
    -------
    dict path -> {"bytes", "mtime_ns", "digest"}
        Put :func:`digests_only` of it into the stage's configuration hash.
    """
    previous = dict(previous or {})
    paths = sorted({str(f) for f in files})

    def one(name: str) -> tuple[str, dict[str, Any]]:
        try:
            st = os.stat(name)
        except FileNotFoundError:
            return name, {"missing": True}
        old = previous.get(name) or {}
        if old.get("bytes") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns \
                and old.get("digest"):
            return name, old
        return name, {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                      "digest": file_digest(name)}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return dict(pool.map(one, paths))


def digests_only(inputs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{path: digest}`` of :func:`input_digests`: what a configuration hash should see
    (a file touched without a change of content keeps its digest)."""
    return {name: entry.get("digest", "missing") for name, entry in inputs.items()}


class StageRun:
    """One run of a stage that moves its outputs into ``out_dir`` only when all are written.

    Parameters
    ----------
    out_dir : the stage's output folder (the stamp ``.<stage>.stage.json`` lives there).
    stage : the stage's name (``"volumes"``, ``"render"``, ...).
    params : what the outputs depend on (its hash goes into the stamp).
    outputs : file and folder names relative to ``out_dir``, each written under
        :attr:`staging` by the same name (:meth:`path`). All must be there at the end.
    inputs : the input files' entries (:func:`input_digests`), kept in the stamp so the next
        run can skip re-reading unchanged files.

    Use it as a context manager; the outputs are committed when the block ends without an
    exception (see the module docstring for the order of the steps).
    """

    def __init__(self, out_dir: str | os.PathLike, stage: str, params: Mapping[str, Any],
                 outputs: Iterable[str], inputs: Mapping[str, Any] | None = None):
        self.out_dir = Path(out_dir)
        self.stage = stage
        self.params = dict(params)
        self.outputs = [str(o) for o in outputs]
        self.inputs = None if inputs is None else dict(inputs)
        self.staging = self.out_dir / f".{stage}.partial"  # the real name is set on entry
        self._lock = None

    def fresh(self) -> bool:
        """True when the stamp matches ``params`` and the outputs are as it recorded them
        (:func:`mislib.config.is_fresh`); then a killed run's staging folders are removed
        (unless a run holds the lock), since no run will come to clear them."""
        if not is_fresh(self.out_dir, self.stage, self.params, self.outputs):
            return False
        try:
            with self._locked():
                self._clear_leftovers()
        except StageBusy:
            pass
        return True

    def path(self, name: str | os.PathLike) -> Path:
        """Where to write the output ``name`` (a declared output, or a file inside one)."""
        name = Path(name).as_posix()
        if not any(name == o or name.startswith(o.rstrip("/") + "/") for o in self.outputs):
            raise ValueError(f"stage {self.stage!r} did not declare output {name!r}; "
                             f"outputs: {self.outputs}")
        path = self.staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def _locked(self):
        """Hold the stage's lock in ``out_dir``, or raise :class:`StageBusy`."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f".{self.stage}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StageBusy(f"stage {self.stage!r} is already running into {self.out_dir} "
                                "(another process holds its lock); wait for it to finish"
                                ) from None
            yield  # closing the file releases the lock (so does the kernel when a process dies)

    def _clear_leftovers(self) -> None:
        for old in self.out_dir.glob(f".{self.stage}.partial*"):
            shutil.rmtree(old, ignore_errors=True)  # only a killed run leaves one

    def __enter__(self) -> StageRun:
        self._lock = self._locked()
        self._lock.__enter__()
        self._clear_leftovers()
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.stage}.partial-", dir=self.out_dir))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
            lock, self._lock = self._lock, None
            lock.__exit__(None, None, None)

    def commit(self) -> None:
        """Remove the stamp, move every staged output onto its place, write the stamp."""
        missing = [o for o in self.outputs if not (self.staging / o).exists()]
        if missing:
            raise RuntimeError(f"stage {self.stage!r} did not write {missing} "
                               f"(under {self.staging}); nothing was replaced")
        remove_stamp(self.out_dir, self.stage)
        for name in self.outputs:
            replace_path(self.staging / name, self.out_dir / name)
        extra = {} if self.inputs is None else {"input_files": self.inputs}
        write_stamp(self.out_dir, self.stage, self.params, self.outputs, extra=extra)
