"""mislib.stage: outputs moved in only when complete, the stamp last, kills leave no half state."""

from __future__ import annotations

import json
import os

import pytest

from mislib import config, stage


def _write_outputs(run, text: str, n_files: int = 3) -> None:
    run.path("table.parquet").write_text(text)
    for i in range(n_files):
        run.path(f"images/{i}.png").write_text(f"{text}-{i}")


def test_a_run_moves_every_output_in_and_writes_the_stamp_last(tmp_path):
    outputs = ["table.parquet", "images"]
    with stage.StageRun(tmp_path, "demo_stage", {"x": 1}, outputs) as run:
        _write_outputs(run, "new")
        assert not (tmp_path / "table.parquet").exists()  # nothing in place before the end
        assert config.read_stamp(tmp_path, "demo_stage") is None
    assert (tmp_path / "table.parquet").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["0.png", "1.png", "2.png"]
    assert config.is_fresh(tmp_path, "demo_stage", {"x": 1}, outputs)
    assert not list(tmp_path.glob(".demo_stage.partial*"))


def test_an_error_inside_a_run_keeps_the_old_outputs_and_stamp(tmp_path):
    outputs = ["table.parquet", "images"]
    with stage.StageRun(tmp_path, "demo_stage", {"x": 1}, outputs) as run:
        _write_outputs(run, "old")
    with pytest.raises(RuntimeError, match="boom"), \
            stage.StageRun(tmp_path, "demo_stage", {"x": 2}, outputs) as run:
        _write_outputs(run, "new", n_files=1)
        raise RuntimeError("boom")
    assert (tmp_path / "table.parquet").read_text() == "old"
    assert len(list((tmp_path / "images").iterdir())) == 3
    assert config.is_fresh(tmp_path, "demo_stage", {"x": 1}, outputs)
    assert not list(tmp_path.glob(".demo_stage.partial*"))


def test_a_run_that_forgets_an_output_replaces_nothing(tmp_path):
    with pytest.raises(RuntimeError, match=r"did not write \['images'\]"), \
            stage.StageRun(tmp_path, "demo_stage", {}, ["table.parquet", "images"]) as run:
        run.path("table.parquet").write_text("t")
    assert not (tmp_path / "table.parquet").exists()
    with stage.StageRun(tmp_path, "demo_stage", {}, ["table.parquet"]) as run:
        with pytest.raises(ValueError, match="did not declare output 'other.parquet'"):
            run.path("other.parquet")
        run.path("table.parquet").write_text("t")


def test_a_second_run_of_the_same_stage_and_folder_is_refused(tmp_path):
    with stage.StageRun(tmp_path, "demo_stage", {}, ["t"]) as run:
        run.path("t").write_text("t")
        with pytest.raises(stage.StageBusy, match="already running"):
            stage.StageRun(tmp_path, "demo_stage", {}, ["t"]).__enter__()
        # another stage in the same folder is independent
        with stage.StageRun(tmp_path, "other_stage", {}, ["u"]) as other:
            other.path("u").write_text("u")
    assert (tmp_path / "t").is_file() and (tmp_path / "u").is_file()


def test_replace_path_swaps_a_folder_whole_and_clears_a_killed_swap(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a").write_text("new")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "stale").write_text("old")
    (tmp_path / ".target.old").mkdir()  # what a kill between the two renames leaves
    stage.replace_path(tmp_path / "new", tmp_path / "target")
    assert [p.name for p in (tmp_path / "target").iterdir()] == ["a"]
    assert not (tmp_path / "new").exists() and not (tmp_path / ".target.old").exists()


def test_input_digests_reread_only_changed_files(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("one")
    b.write_text("two")
    first = stage.input_digests([a, b])
    read = []
    real = stage.file_digest
    monkeypatch.setattr(stage, "file_digest", lambda p: read.append(p) or real(p))
    assert stage.input_digests([a, b], previous=first) == first and read == []
    b.write_text("TWO")
    second = stage.input_digests([a, b], previous=first)
    assert read == [str(b)]
    assert stage.digests_only(second)[str(a)] == stage.digests_only(first)[str(a)]
    assert stage.digests_only(second)[str(b)] != stage.digests_only(first)[str(b)]
    assert stage.input_digests([tmp_path / "gone"])[str(tmp_path / "gone")] == {"missing": True}


def test_stamp_records_the_manifest_and_input_files(tmp_path):
    inputs = stage.input_digests([__file__])
    with stage.StageRun(tmp_path, "demo_stage", {"x": 1}, ["images"], inputs) as run:
        run.path("images/0.png").write_bytes(b"12345")
    record = json.loads((tmp_path / ".demo_stage.stage.json").read_text())
    assert record["manifest"] == {"images": {"files": 1, "bytes": 5}}
    assert record["input_files"] == json.loads(json.dumps(inputs))
    os.truncate(tmp_path / "images" / "0.png", 2)
    assert not config.is_fresh(tmp_path, "demo_stage", {"x": 1}, ["images"])
