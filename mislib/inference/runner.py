"""Stage 04: answer the benchmark with each model of a profile, in each arm.

:func:`run_inference` runs one (model, arm): it selects the questions, takes this worker's
share of the (question, trial) keys, skips those the result store already holds, asks the
backend in batches (halving a batch that runs out of memory) and appends every record to
its shard as soon as its batch ends; a one-process run then compacts the store.
:func:`run_profile` is the model x arm loop that notebook 04 and ``python -m mislib infer``
both call. Data-parallel runs (``worker``/``workers``) are started by
:mod:`mislib.inference.workers`.

Records that could not be produced normally keep their own ``status`` instead of being
lost: ``missing_input`` (image or stack file absent; no generation), ``unknown_family``
(generated, kept raw, not parsed), ``oom`` (out of memory even at batch size 1).

>>> runs = run_profile("demo", arms=["baseline", "semsam"])   # doctest: +SKIP
>>> summarise_runs(run.run_dir for run in runs)                # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from mislib.answers import is_correct, parse_answer
from mislib.config import file_digest, is_fresh, load_profile, read_stamp, stage_params
from mislib.inference import store
from mislib.inference.models import (
    ModelEntry,
    endpoint_options,
    local_backend_options,
    model_entry,
    model_identity,
)
from mislib.inference.prompts import (
    INPUT_KINDS,
    input_kind,
    load_media,
    question_dict,
    question_prompt,
    select_frames,
)
from mislib.inference.protocol import ARMS, DecodeSettings, Generation, Request
from mislib.inference.registry import load_backend
from mislib.paths import QUESTIONS_FILE, RESPONSES_FILE, project_paths
from mislib.vocabulary import FAMILIES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceRun:
    """Where one (model, arm) run lives and what this call did.

    Attributes
    ----------
    run_id : the folder name under ``data/results``.
    run_dir : ``data/results/<run_id>``.
    responses : ``run_dir / "responses.parquet"`` (written by compaction).
    n_records : records the run holds (rows of ``responses.parquet`` once compacted; for a
        worker that did not compact, the records in the shards).
    n_selected : (question, trial) keys this call was asked for (its worker share).
    n_generated : records this call produced (0 when everything was already done).
    wall_s : seconds spent producing them.
    keys : the (question, trial) keys of ``n_selected``.
    """

    run_id: str
    run_dir: Path
    responses: Path
    n_records: int
    n_selected: int
    n_generated: int
    wall_s: float
    keys: tuple[tuple[str, int], ...] = ()

    @property
    def questions_per_s(self) -> float:
        """Records (question, trial pairs) produced per second by this call."""
        return self.n_generated / self.wall_s if self.wall_s > 0 else float("nan")

    def selected(self) -> pd.DataFrame:
        """The rows of ``responses.parquet`` this call asked for (a limited run's view)."""
        frame = pd.read_parquet(self.responses)
        keys = set(self.keys)
        mask = [k in keys for k in zip(frame["question_id"], frame["trial"], strict=True)]
        return frame[mask].reset_index(drop=True)


# ----------------------------------------------------------------------------------------
# Questions, seeds and worker shares
# ----------------------------------------------------------------------------------------
def trial_seed(base_seed: int, question_id: str, trial: int) -> int:
    """The seed of one (question, trial): the same in every arm and for every model.

    A hash, not a counter, so it does not depend on which questions are selected, on the
    batch a record lands in, on the worker that produces it, or on how often the run was
    resumed.
    """
    digest = hashlib.sha256(f"{int(base_seed)}:{question_id}:{int(trial)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def select_questions(questions: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """The first ``limit`` questions in a seeded, file-order-independent shuffle.

    ``limit`` of None or 0 keeps all. Stage 03 balances factor cells over the whole table,
    so a head of the file would not be a fair sample; a hash of each id is.
    """
    if "question_id" not in questions.columns:
        raise ValueError("questions table has no 'question_id' column")
    duplicated = questions["question_id"][questions["question_id"].duplicated()]
    if len(duplicated):
        raise ValueError(f"questions table repeats question_id {duplicated.iloc[0]!r}")
    order = np.argsort([trial_seed(seed, qid, -1) for qid in questions["question_id"]],
                       kind="stable")
    picked = questions.iloc[order]
    if limit:
        picked = picked.iloc[: int(limit)]
    return picked.reset_index(drop=True)


def worker_of(question_id: str, trial: int, workers: int) -> int:
    """The worker (``0 .. workers-1``) that owns one (question, trial) key.

    A hash of the key, so shares are deterministic, disjoint, cover every key, and do not
    move when the selection grows (more questions or trials keep the old keys' owners).
    """
    digest = hashlib.sha256(f"share:{question_id}:{int(trial)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % int(workers)


def worker_share(keys: Sequence[tuple[str, int]], worker: int,
                 workers: int) -> list[tuple[str, int]]:
    """The keys of ``worker`` out of ``workers`` (see :func:`worker_of`), in order."""
    check_worker(worker, workers)
    if workers == 1:
        return list(keys)
    return [key for key in keys if worker_of(key[0], key[1], workers) == worker]


def check_worker(worker: int, workers: int) -> None:
    """Reject a worker index outside ``0 .. workers-1``."""
    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if not (isinstance(worker, int) and 0 <= worker < workers):
        raise ValueError(f"worker must be an integer in 0..{workers - 1}, got {worker!r}")


def _decode_settings(arm: str, entry: ModelEntry, semsam_params: Mapping[str, Any],
                     table: Any = None, table_path: Path | None = None) -> DecodeSettings:
    """The decode settings of one (model, arm): the model entry's values (which default to
    the profile's ``[inference]`` / ``[semsam]`` ones, :func:`model_entry`)."""
    budget = int(entry.reasoning_budget) if entry.thinks else 0
    return DecodeSettings(arm=arm, temperature=float(entry.temperature),
                          top_k=int(entry.top_k), top_p=float(entry.top_p),
                          max_new_tokens=int(entry.max_new_tokens),
                          mode=str(entry.semsam_mode), k=int(semsam_params["k"]),
                          table_path=None if table_path is None else str(table_path),
                          table_key=None if table is None else table.key,
                          reasoning_budget=budget,
                          forced_answer_tokens=int(entry.forced_answer_tokens))


def semsam_table(backend: Any, k: int, root: str | os.PathLike | None = None,
                 progress: bool = True) -> tuple[Any, Path]:
    """The model's neighbour table, built once and cached under ``.cache/semsam``, and its
    file (backends load it by path, so worker processes of a backend can too)."""
    from mislib import semsam

    embeddings = backend.input_embeddings().detach()
    mask = semsam.content_token_mask(backend.tokenizer, embeddings.shape[0])
    cache_dir = project_paths(root).cache / "semsam"
    table = semsam.cached_neighbor_table(embeddings, mask, int(k), cache_dir=cache_dir,
                                         progress=progress)
    return table, cache_dir / f"{table.key}.safetensors"


# ----------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------
def run_inference(profile: str | Mapping[str, Any] = "demo", arm: str = "baseline",
                  model: str | None = None, limit: int | None = None,
                  out: str | os.PathLike | None = None, force: bool = False,
                  root: str | os.PathLike | None = None, progress: bool = True,
                  generate_hook: Callable | None = None, worker: int = 0, workers: int = 1,
                  compact: bool | None = None, **overrides: Any) -> InferenceRun:
    """Answer the benchmark's questions with one model in one arm; resumable.

    Parameters
    ----------
    profile : profile name, TOML path or loaded mapping; its ``[inference]`` and
        ``[semsam]`` tables set the knobs.
    arm : one of :data:`mislib.inference.protocol.ARMS`.
    model : model id (default: the profile's first ``models`` entry).
    limit : at most this many questions (default: the profile's ``limit``; 0 = all). A
        limited run adds its records to the run of the same configuration and never
        removes others: ``responses.parquet`` keeps every record, and
        :meth:`InferenceRun.selected` is this call's view.
    out : results folder (default ``<root>/data/results``).
    force : start this run's records over instead of resuming (one process only; refused
        when the run holds records outside this call's selection).
    root : project root (default: the repository or ``$MISGROUND_ROOT``).
    progress : show a tqdm bar (records per second).
    generate_hook : test seam; wraps the backend's ``generate`` (e.g. to inject an
        out-of-memory error). ``None`` in normal use.
    worker, workers : this process's share of the keys (:func:`worker_of`); shards and
        session records are named per host and worker.
    compact : write ``responses.parquet`` at the end (default: only when ``workers == 1``;
        data-parallel runs compact once after every worker finished).
    **overrides : other ``[inference]`` keys (``n_trials``, ``batch_size``,
        ``max_new_tokens``, ``device``, ...).

    Raises
    ------
    FileNotFoundError
        When ``questions.parquet`` is absent (run stage 03 first).
    ValueError
        Unknown arm, backend or model id; a profile value outside the schema
        (``n_trials`` below 1, ...), naming the table and key.
    RuntimeError
        Another process writes the same run slot; ``force`` would drop records.
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms: {ARMS}")
    check_worker(worker, workers)
    if force and workers > 1:
        raise ValueError("force with several workers would let each worker remove the "
                         "others' records; remove the run folder instead, then start them")
    compact = (workers == 1) if compact is None else compact
    prof = load_profile(profile) if not isinstance(profile, Mapping) else profile
    # the profile schema (mislib.config) rejects n_trials < 1 and other bad values here
    params = stage_params(prof, "inference", limit=limit, **overrides)
    semsam_params = stage_params(prof, "semsam")
    # the model's registry entry (or a plain id's defaults); a key given to this call
    # (--backend, --max-new-tokens) wins over the entry, the entry over the profile's tables
    entry = model_entry(prof, model or params["models"][0])
    entry = entry.model_copy(update={key: overrides[key] for key in ("backend", "max_new_tokens")
                                     if overrides.get(key) is not None})
    model_id = entry.name
    backend_name = str(entry.backend)
    model_settings = model_identity(entry)
    paths = project_paths(root)
    questions_file = paths.benchmark / QUESTIONS_FILE
    if not questions_file.is_file():
        raise FileNotFoundError(f"{questions_file} not found: run stage 03 "
                                "(notebooks/03_question_generation) first")
    results_dir = Path(out) if out is not None else paths.results
    request = {"model": model_id, "arm": arm, "backend": backend_name,
               "device": params.get("device", "auto"), "video_fps": params.get("video_fps", 1.0),
               "n_trials": int(params["n_trials"]), "limit": int(params["limit"] or 0),
               "batch_size": int(params["batch_size"]),
               "decode": _decode_settings(arm, entry, semsam_params).identity(),
               "instruction": str(params.get("instruction", "")), "seed": int(params["seed"]),
               "questions_sha": file_digest(questions_file)}
    if model_settings:
        request["model_settings"] = model_settings
    questions = select_questions(pd.read_parquet(questions_file), request["limit"],
                                 request["seed"])
    keys = [(str(q), t) for q in questions["question_id"] for t in range(request["n_trials"])]
    share = worker_share(keys, worker, workers)

    stage = store.stage_name(model_id, arm, request["backend"])
    recorded = read_stamp(results_dir, stage)
    fresh = bool(not force and recorded and is_fresh(results_dir, stage, request,
                                                     recorded.get("outputs", [])))
    stored_id = recorded["outputs"][0].split("/")[0] if fresh else None

    def stored_run() -> InferenceRun:
        run_dir = results_dir / stored_id
        n = len(pd.read_parquet(run_dir / RESPONSES_FILE, columns=["trial"]))
        return InferenceRun(run_dir.name, run_dir, run_dir / RESPONSES_FILE, n,
                            len(share), 0, 0.0, tuple(share))

    # a local model's stored run is current without loading it; an endpoint's server is
    # part of what answers and may have changed behind the same URL, so it is asked first
    # (below) and the stored run is current only if it is this server's run
    if fresh and backend_name != "openai":
        return stored_run()

    # the model entry's weights and processor settings (local backends), then the
    # profile's [inference.<backend>] table (e.g. vllm's tensor_parallel_size), which
    # changes how the model runs, not what it answers. An endpoint's settings: the
    # profile's [inference.openai] table, the entry's over it, this call's (--base-url) last
    if backend_name == "openai":
        # None in a table (a notebook's parameters cell) means "the value below it"
        options = {key: value for key, value in
                   {**dict((prof.get("inference") or {}).get("openai") or {}),
                    **endpoint_options(entry)}.items() if value is not None}
        options.update({key: value for key, value in dict(overrides.get("openai") or {}).items()
                        if value is not None})
    else:
        options = {**local_backend_options(entry), **dict(params.get(backend_name) or {})}
    try:
        backend = load_backend(backend_name, entry.id, root=root, device=request["device"],
                               video_fps=request["video_fps"], **options)
    except (RuntimeError, ValueError) as error:
        # an endpoint that cannot be reached, refuses the key, or whose key is not set
        if not fresh:
            raise
        # offline (make reproduce): the stored run is kept, and the log says it is unchecked
        log.warning("%s: the stored run %s is kept unchecked: its server could not be asked "
                    "whether it still is the one that answered (%s)", stage, stored_id, error)
        return stored_run()
    if arm not in backend.capabilities.arms:
        note = backend.capabilities.extras.get("arms_note")
        raise ValueError(f"backend {backend_name!r} cannot decode the {arm!r} arm; it "
                         f"supports {backend.capabilities.arms}" + (f": {note}" if note else ""))
    table = table_path = None
    if backend.capabilities.embeddings:
        table, table_path = semsam_table(backend, semsam_params["k"], root=root,
                                         progress=progress)
    elif arm == "semsam" and not backend.capabilities.extras.get("semsam_on_server"):
        raise ValueError(f"backend {backend_name!r} exposes no input embeddings, so the "
                         "semsam arm's neighbour table cannot be built")
    decode = _decode_settings(arm, entry, semsam_params, table, table_path)
    identity = {"model": model_id, "revision": backend.revision, "arm": arm,
                "backend": backend_name, "processor": backend.settings(),
                "decode": decode.identity(), "seed": request["seed"],
                "instruction": request["instruction"],
                "questions_sha": request["questions_sha"],
                "questions_file": str(questions_file.relative_to(paths.root))
                if questions_file.is_relative_to(paths.root) else str(questions_file)}
    if model_settings:
        identity["model_settings"] = model_settings
    if table is not None:
        identity["semsam_table"] = {"hash": table.key, "k": decode.k}
    run_id = store.run_id_for(model_id, arm, identity)
    if fresh and stored_id == run_id:
        return stored_run()  # the same server answers: the stored run is current
    if fresh:
        log.info("%s: the stored run %s has another identity than a run on the server at %s "
                 "now (another server: weights, decoder or vLLM version; or other endpoint "
                 "settings: served model, stack_as): this is run %s", stage, stored_id,
                 options.get("base_url"), run_id)
    run_dir = store.open_run(results_dir, run_id, identity)
    if force:
        with store.exclusive_lock(run_dir):
            outside = store.done_keys(run_dir) - set(keys)
            if outside:
                raise RuntimeError(
                    f"{run_dir} holds {len(outside)} records outside this call's selection "
                    f"(e.g. {sorted(outside)[0]}); force would remove them. Run without "
                    "--limit, or remove the folder by hand")
            store.remove_records(run_dir)
    with store.worker_lock(run_dir, worker, workers):
        n_generated, wall = _generate_share(run_dir, run_id, share, questions, request,
                                            decode, backend, paths.benchmark, model_id, arm,
                                            worker, workers, generate_hook, progress)
    missing = set(share) - store.done_keys(run_dir)
    if missing:
        raise RuntimeError(f"{run_dir}: {len(missing)} records of this worker's share missing "
                           f"after the run, e.g. {sorted(missing)[0]}")
    if compact:
        n_records = len(store.compact_run(run_dir))
    else:
        n_records = len(store.done_keys(run_dir))
    return InferenceRun(run_id, run_dir, run_dir / RESPONSES_FILE, n_records, len(share),
                        n_generated, wall, tuple(share))


def _generate_share(run_dir: Path, run_id: str, share: Sequence[tuple[str, int]],
                    questions: pd.DataFrame, request: Mapping[str, Any],
                    decode: DecodeSettings, backend: Any, benchmark: Path, model_id: str,
                    arm: str, worker: int, workers: int, generate_hook: Callable | None,
                    progress: bool) -> tuple[int, float]:
    """Produce the records of ``share`` the store lacks; returns (records, seconds)."""
    done = store.done_keys(run_dir)
    todo = [key for key in share if key not in done]
    by_id = {str(row["question_id"]): question_dict(row)
             for row in questions.to_dict(orient="records")}
    # Same input kind together (text / image / video), so batches pad little.
    todo.sort(key=lambda key: INPUT_KINDS.index(input_kind(by_id[key[0]])))
    tag = store.process_tag(worker, workers)
    session = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "worker": worker, "workers": workers, "tag": tag,
               "git_commit": store.git_commit(), "packages": store.package_versions(),
               "n_selected": len(share), "n_todo": len(todo), "request": dict(request)}
    if callable(getattr(backend, "session_info", None)):
        # where this session's answers came from, beyond the run identity (an endpoint's URL)
        session["backend"] = backend.session_info()
    store.write_session(run_dir, tag, session)

    generate = backend.generate if generate_hook is None else generate_hook(backend.generate)
    batch_size = max(1, request["batch_size"])
    if backend.capabilities.max_batch:
        batch_size = min(batch_size, int(backend.capabilities.max_batch))
    state = {"batch_size": batch_size}
    t0 = time.perf_counter()
    n_generated = 0
    if todo:
        writer = store.ShardWriter(run_dir / "shards", tag)
        label = f"{store.slug(model_id)} {arm}" + (f" w{worker}/{workers}" if workers > 1 else "")
        bar = tqdm(total=len(todo), unit="q", desc=label, disable=not progress,
                   dynamic_ncols=True)
        try:
            if callable(getattr(backend, "stream", None)) and generate_hook is None:
                batches = _stream(todo, by_id, benchmark, backend, decode, request, run_id,
                                  model_id, arm)
            else:
                batches = _batches(todo, by_id, benchmark, generate, decode, request, run_id,
                                   model_id, arm, state)
            for records in batches:
                for record in records:
                    record["backend"] = request["backend"]
                writer.write(records)
                n_generated += len(records)
                bar.update(len(records))
        finally:
            bar.close()
            writer.close()
    wall = time.perf_counter() - t0
    session.update(finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   n_generated=n_generated, wall_s=round(wall, 3))
    store.write_session(run_dir, tag, session)
    return n_generated, wall


def _batches(todo: Sequence[tuple[str, int]], by_id: Mapping[str, dict], benchmark: Path,
             generate: Callable, decode: DecodeSettings, request: Mapping[str, Any],
             run_id: str, model_id: str, arm: str,
             state: dict[str, int]) -> Iterator[list[dict[str, Any]]]:
    """The records of ``todo``, one list per batch of ``state["batch_size"]`` keys."""
    position = 0
    while position < len(todo):
        chunk = todo[position: position + state["batch_size"]]
        position += len(chunk)
        yield _run_batch(chunk, by_id, benchmark, generate, decode, request, run_id, model_id,
                         arm, state)


def _stream(todo: Sequence[tuple[str, int]], by_id: Mapping[str, dict], benchmark: Path,
            backend: Any, decode: DecodeSettings, request: Mapping[str, Any], run_id: str,
            model_id: str, arm: str) -> Iterator[list[dict[str, Any]]]:
    """The records of ``todo`` from a streaming backend, each as soon as it is finished.

    Requests are built lazily as the backend takes them (media read from disk only for the
    ones in flight); a key whose input is missing is recorded without a request.
    """
    skipped: queue.SimpleQueue = queue.SimpleQueue()  # filled from the backend's thread

    def requests() -> Iterator[Request]:
        for key in todo:
            built = _request(key, by_id[key[0]], benchmark, request, run_id, model_id, arm)
            if isinstance(built, Request):
                yield built
            else:
                skipped.put(built)

    def drain() -> list[dict[str, Any]]:
        out = []
        while not skipped.empty():
            out.append(skipped.get())
        return out

    for req, generation in backend.stream(requests(), decode):
        yield drain() + [_record(req, generation, by_id[req.question_id], run_id, model_id,
                                 arm, latency=generation.usage.get("latency_s"), batch_size=1)]
    last = drain()
    if last:
        yield last


def _request(key: tuple[str, int], question: Mapping[str, Any], benchmark: Path,
             request: Mapping[str, Any], run_id: str, model_id: str,
             arm: str) -> Request | dict[str, Any]:
    """The :class:`Request` of one key, or its ``missing_input`` record."""
    seed = trial_seed(request["seed"], key[0], key[1])
    frames = request.get("model_settings", {}).get("frames_per_stack")
    try:
        media = load_media(question, benchmark)
        if frames and isinstance(media, np.ndarray):
            media = select_frames(media, frames)
    except (FileNotFoundError, ValueError, OSError) as error:
        log.warning("%s", error)
        return store.make_record(key, run_id, model_id, arm, seed, status="missing_input",
                                 error=str(error))
    return Request(key[0], key[1], seed, question_prompt(question, request["instruction"]),
                   media)


def _run_batch(chunk: Sequence[tuple[str, int]], by_id: Mapping[str, dict], benchmark: Path,
               generate: Callable, decode: DecodeSettings, request: Mapping[str, Any],
               run_id: str, model_id: str, arm: str,
               state: dict[str, int]) -> list[dict[str, Any]]:
    """Records for one batch of keys, none lost: inputs that fail get their own status."""
    records: list[dict[str, Any]] = []
    ready: list[Request] = []
    for key in chunk:
        built = _request(key, by_id[key[0]], benchmark, request, run_id, model_id, arm)
        if isinstance(built, Request):
            ready.append(built)
        else:
            records.append(built)
    records += _generate_halving(ready, by_id, generate, decode, run_id, model_id, arm, state)
    return records


def _is_oom(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError | MemoryError) and (
        "out of memory" in text or "can't allocate memory" in text)


def _free_memory() -> None:
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _generate_halving(ready: list[Request], by_id: Mapping[str, dict], generate: Callable,
                      decode: DecodeSettings, run_id: str, model_id: str, arm: str,
                      state: dict[str, int]) -> list[dict[str, Any]]:
    """Generate for ``ready``; on out-of-memory halve the batch (and later ones) and retry."""
    if not ready:
        return []
    t0 = time.perf_counter()
    try:
        outputs = generate(ready, decode)
    except Exception as error:
        if not _is_oom(error):
            raise
        _free_memory()
        if len(ready) == 1:
            log.warning("question %s trial %d: out of memory at batch size 1", *ready[0].key)
            return [store.make_record(ready[0].key, run_id, model_id, arm, ready[0].seed,
                                      status="oom", error=str(error)[:500], batch_size=1)]
        half = len(ready) // 2
        state["batch_size"] = max(1, min(state["batch_size"], half))
        log.warning("out of memory at batch size %d: retrying in halves", len(ready))
        return (_generate_halving(ready[:half], by_id, generate, decode, run_id, model_id,
                                  arm, state)
                + _generate_halving(ready[half:], by_id, generate, decode, run_id, model_id,
                                    arm, state))
    latency = time.perf_counter() - t0
    if len(outputs) != len(ready):
        raise RuntimeError(f"backend returned {len(outputs)} generations for {len(ready)} "
                           "requests")
    return [_record(req, generation, by_id[req.question_id], run_id, model_id, arm, latency,
                    len(ready)) for req, generation in zip(ready, outputs, strict=True)]


def _record(req: Request, generation: Generation, question: Mapping[str, Any], run_id: str,
            model_id: str, arm: str, latency: float | None,
            batch_size: int) -> dict[str, Any]:
    """The record of one generation: parsed and scored, or kept with its failure status."""
    usage = {k: v for k, v in generation.usage.items() if k != "latency_s"}
    fields: dict[str, Any] = {"raw_text": generation.text, "n_tokens": int(generation.n_tokens),
                              "latency_s": latency, "batch_size": batch_size,
                              "thinking_tokens": generation.thinking_tokens,
                              "answer_tokens": generation.answer_tokens,
                              "forced_answer": generation.forced_answer, **usage}
    if generation.status != "ok":
        fields.update(status=generation.status, error=generation.error)
    elif question.get("family") not in FAMILIES:
        fields.update(status="unknown_family",
                      error=f"question {req.question_id}: unknown family "
                            f"{question.get('family')!r}; expected one of {FAMILIES}")
    else:
        value, status = parse_answer(generation.text, question)
        fields.update(parsed=value, parse_status=status,
                      correct=bool(is_correct(value, status, question)))
    return store.make_record(req.key, run_id, model_id, arm, req.seed, **fields)


def run_profile(profile: str | Mapping[str, Any] = "demo", models: Sequence[str] | None = None,
                arms: Sequence[str] | None = None, **kwargs: Any) -> list[InferenceRun]:
    """Every (model, arm) of the profile, models outermost so each loads once.

    Parameters
    ----------
    profile : as in :func:`run_inference`.
    models, arms : subsets to run (default: the profile's ``models`` and ``arms``). A model
        whose registry entry lists its own ``arms`` runs only those of ``arms`` (a hosted
        endpoint: baseline); a model left with none of them is an error.
    **kwargs : passed to :func:`run_inference` (``limit``, ``force``, ``worker``,
        ``workers``, ``root``, overrides such as ``n_trials``; None values mean "the
        profile's").

    Returns
    -------
    list of InferenceRun, in (model, arm) order.
    """
    prof = load_profile(profile) if not isinstance(profile, Mapping) else profile
    params = stage_params(prof, "inference")
    models = list(models or params["models"])
    arms = list(arms or params["arms"])
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm {unknown[0]!r}; arms: {ARMS}")
    plan = []
    for model in models:
        own = model_entry(prof, model).arms
        model_arms = arms if own is None else [a for a in arms if a in own]
        if not model_arms:
            raise ValueError(f"model {model!r} runs the arms {own} (its [models] entry), "
                             f"none of those asked: {arms}")
        skipped = [a for a in arms if a not in model_arms]
        if skipped:
            log.info("model %s: arms %s skipped (its entry runs %s)", model, skipped, own)
        plan += [(model, arm) for arm in model_arms]
    return [run_inference(prof, arm=arm, model=model, **kwargs) for model, arm in plan]
