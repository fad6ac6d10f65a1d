"""mislib.inference.store: shards, compaction, run identity and discovery (no model)."""

from __future__ import annotations

import json
import multiprocessing
import os

import pandas as pd
import pytest

from mislib.inference.store import (
    RESPONSE_COLUMNS,
    ShardWriter,
    compact,
    compact_run,
    current_runs,
    done_keys,
    list_runs,
    make_record,
    open_run,
    pending_runs,
    process_tag,
    read_sessions,
    read_shards,
    worker_lock,
    write_session,
)


def _rec(qid, trial, **kw):
    base = dict.fromkeys(RESPONSE_COLUMNS)
    base.update(question_id=qid, trial=trial, seed=1, batch_size=1, status="ok", **kw)
    return base


def _write(run_dir, records, tag=None):
    writer = ShardWriter(run_dir / "shards", tag)
    writer.write(records)
    writer.close()
    return writer.path


def test_read_shards_skips_a_torn_last_line_and_repeated_keys(tmp_path):
    shards = tmp_path / "shards"
    path = _write(tmp_path, [_rec("q1", 0), _rec("q1", 1, raw_text="first")], tag="a")
    with path.open("a") as fh:  # a writer killed in the middle of a line
        fh.write(json.dumps(_rec("q2", 0))[:25])
    (shards / "b.jsonl").write_text(json.dumps(_rec("q1", 1, raw_text="again")) + "\n")
    records = read_shards(shards)
    keys = sorted((r["question_id"], r["trial"]) for r in records)
    assert keys == [("q1", 0), ("q1", 1)]
    assert next(r for r in records if r["trial"] == 1)["raw_text"] == "first"


def test_compact_writes_every_record_once_sorted_by_key(tmp_path):
    _write(tmp_path, [_rec("q2", 0), _rec("q1", 1), _rec("q3", 0)], tag="a")
    _write(tmp_path, [_rec("q1", 0), _rec("q2", 0)], tag="b")
    frame = compact(tmp_path)
    keys = list(zip(frame["question_id"], frame["trial"], strict=True))
    assert keys == [("q1", 0), ("q1", 1), ("q2", 0), ("q3", 0)]
    assert list(frame.columns) == list(RESPONSE_COLUMNS)
    assert pd.read_parquet(tmp_path / "responses.parquet").equals(frame)


def test_compact_never_replaces_a_fuller_responses_file_with_a_smaller_one(tmp_path):
    first = _write(tmp_path, [_rec("q1", 0), _rec("q2", 0)], tag="a")
    compact(tmp_path)
    first.unlink()  # records lost by hand: the shards now hold fewer than the parquet
    _write(tmp_path, [_rec("q1", 0)], tag="b")
    with pytest.raises(RuntimeError, match="1 records that the shards no longer have"):
        compact(tmp_path)
    assert len(pd.read_parquet(tmp_path / "responses.parquet")) == 2


def test_make_record_rejects_a_field_outside_the_contract():
    with pytest.raises(ValueError, match="unknown record fields"):
        make_record(("q", 0), "run", "m", "baseline", 1, colour="red")


def test_process_tag_names_host_worker_and_process():
    tag = process_tag(2, 5)
    assert "-w2of5-" in tag and f"-{os.getpid()}-" in tag


def _open_in_child(results, identity, queue):
    open_run(results, "run-a", identity)
    queue.put(json.loads((results / "run-a" / "run.json").read_text())["who"])


def test_run_json_is_written_once_by_the_first_process(tmp_path):
    open_run(tmp_path, "run-a", {"model": "m", "arm": "greedy", "who": "first"})
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_open_in_child,
                        args=(tmp_path, {"model": "m", "arm": "greedy", "who": "second"}, queue))
    child.start()
    child.join(30)
    assert queue.get(timeout=5) == "first"
    assert not list((tmp_path / "run-a").glob(".run.json.*"))


def test_two_processes_in_one_worker_slot_are_refused_but_two_slots_are_not(tmp_path):
    run_dir = open_run(tmp_path, "run-a", {"model": "m", "arm": "baseline"})
    with worker_lock(run_dir, 0, 2):
        with worker_lock(run_dir, 1, 2):
            pass
        ctx = multiprocessing.get_context("spawn")
        child = ctx.Process(target=_lock_slot, args=(run_dir, 0, 2))
        child.start()
        child.join(30)
        assert child.exitcode == 3


def _lock_slot(run_dir, worker, workers):
    try:
        with worker_lock(run_dir, worker, workers):
            os._exit(0)
    except RuntimeError:
        os._exit(3)


def test_compact_run_gathers_sessions_counts_and_marks_the_run_current(tmp_path):
    run_dir = open_run(tmp_path, "m-baseline-abc", {"model": "org/M", "arm": "baseline"})
    for worker in (0, 1):
        tag = process_tag(worker, 2)
        _write(run_dir, [_rec(f"q{worker}", 0)], tag=tag)
        write_session(run_dir, tag, {"started": f"2026-01-0{worker + 1}", "worker": worker,
                                     "workers": 2, "n_generated": 1, "wall_s": 1.0,
                                     "request": {"model": "org/M", "arm": "baseline"}})
    assert pending_runs(tmp_path) == [run_dir]
    frame = compact_run(run_dir)
    assert len(frame) == 2 and done_keys(run_dir) == {("q0", 0), ("q1", 0)}
    record = json.loads((run_dir / "run.json").read_text())
    assert record["n_records"] == 2 and record["status_counts"] == {"ok": 2}
    assert [s["worker"] for s in record["sessions"]] == [0, 1]
    assert current_runs(tmp_path) == [run_dir]
    assert pending_runs(tmp_path) == []
    runs = list_runs(tmp_path)
    assert runs.to_dict("records") == [{"run_id": "m-baseline-abc", "model": "org/M",
                                        "arm": "baseline", "backend": None, "n_records": 2,
                                        "compacted": True, "current": True}]
    assert len(read_sessions(run_dir)) == 2


def test_compact_run_names_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        compact_run(tmp_path)
