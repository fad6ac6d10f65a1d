"""mislib.stage: outputs moved in only when complete, the stamp last, kills leave no half state."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
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


def test_a_fresh_check_clears_a_killed_runs_staging_folder(tmp_path):
    run = stage.StageRun(tmp_path, "demo_stage", {"x": 1}, ["t"])
    with run:
        run.path("t").write_text("t")
    (tmp_path / ".demo_stage.partial-killed").mkdir()  # what a kill leaves behind
    assert stage.StageRun(tmp_path, "demo_stage", {"x": 1}, ["t"]).fresh()
    assert not list(tmp_path.glob(".demo_stage.partial*"))
    assert not stage.StageRun(tmp_path, "demo_stage", {"x": 2}, ["t"]).fresh()


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


# ---- kills at random points of stages 01-03, then a rerun without force -------------------

REPO = Path(stage.__file__).resolve().parents[1]
#: stages 01-03 on two small label-map cases, cheap enough to run many times
CHAIN = {
    "volumes": {"sources": ["generic"], "workers": 1},
    "render": {"planes": ["axial", "coronal"], "conventions": ["standard"],
               "prompts": ["mask"], "backgrounds": ["scan"], "dims": ["2d", "3d"],
               "image_size": 64, "frames_3d": 4, "workers": 1},
    "questions": {},
}
#: what one chain run does; ``k`` (argv[2]) > 0 ends the process like SIGKILL (no cleanup,
#: no ``finally``) just before the k-th write: a table, a volume, an image, a stamp, a move
CHAIN_SCRIPT = r"""
import json, os, sys
import nibabel, pandas as pd
from mislib import render, questions, stage, volumes
root, k, config = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
writes = []
def deadly(fn, kind):
    def wrapped(*args, **kwargs):
        writes.append(kind)
        if len(writes) == k:
            os._exit(137)
        return fn(*args, **kwargs)
    return wrapped
for owner, name in ((stage, "replace_path"), (stage, "remove_stamp"), (stage, "write_stamp"),
                    (pd.DataFrame, "to_parquet"), (nibabel, "save"), (render, "save_render")):
    setattr(owner, name, deadly(getattr(owner, name), name))  # k = 0: list the writes only
force = config.pop("force", False)
volumes.prepare("demo", root=root, force=force, **config["volumes"])
render.render_benchmark("demo", root=root, force=force, **config["render"])
questions.generate("demo", root=root, force=force, **config["questions"])
print(json.dumps(writes))
"""


def _chain_config(raw: Path, slices: int, force: bool = False) -> dict:
    config_ = {name: dict(values) for name, values in CHAIN.items()}
    config_["volumes"].update(generic_root=str(raw), slices_per_volume=slices)
    config_["force"] = force
    return config_


def _run_chain(root: Path, config_: dict, k: int = 0, kill_after: float | None = None):
    """Run the chain in a fresh Python process; return (returncode, stdout)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", CHAIN_SCRIPT, str(root), str(k),
                             json.dumps(config_)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode in (0, 137, -signal.SIGKILL), err[-2000:]
    return proc.returncode, out


def _raw_cases(raw: Path) -> None:
    """Two label-map cases with three box structures each, a few millimetres apart."""
    rng = np.random.default_rng(5)
    for case, shift in (("a", 0), ("b", 3)):
        folder = raw / case
        folder.mkdir(parents=True)
        labels = np.zeros((30, 28, 26), np.int16)
        labels[3 + shift:11 + shift, 4:12, 5:13] = 1
        labels[16:24, 14:22, 6 + shift:14 + shift] = 2
        labels[8:18, 18:26, 15:23] = 3
        image = rng.normal(100, 10, labels.shape).astype(np.float32) + 50 * labels
        affine = np.diag([-1.0, 1.0, 1.5, 1.0])
        nib.save(nib.Nifti1Image(image, affine), folder / "image.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), folder / "labels.nii.gz")
        (folder / "labels.csv").write_text("index,name\n1,liver\n2,spleen\n3,stomach\n")


def _snapshot(root: Path) -> dict[str, object]:
    """Every output of stages 01-03, paths made relative to ``root``: tables and file bytes."""
    data = root / "data"
    snap: dict[str, object] = {}
    for path in sorted(data.rglob("*")):
        rel = str(path.relative_to(data))
        if path.is_dir() or rel.startswith("raw/") or path.name.startswith("."):
            continue
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
            for col in table.columns:
                if table[col].dtype == object:
                    table[col] = table[col].map(
                        lambda v: v.replace(str(root), "<root>") if isinstance(v, str) else v)
            snap[rel] = table
        elif path.name.endswith(".nii.gz"):
            img = nib.load(path)
            snap[rel] = hashlib.sha256(np.asarray(img.dataobj).tobytes()
                                       + img.affine.tobytes()).hexdigest()
        else:
            snap[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return snap


def _assert_same_outputs(root: Path, reference: dict[str, object], note: str) -> None:
    snap = _snapshot(root)
    assert sorted(snap) == sorted(reference), note
    for rel, value in reference.items():
        if isinstance(value, pd.DataFrame):
            pd.testing.assert_frame_equal(snap[rel], value, obj=f"{rel} ({note})")
        else:
            assert snap[rel] == value, f"{rel} differs ({note})"
    for folder in ("prepared", "benchmark"):
        leftovers = [p.name for p in (root / "data" / folder).iterdir()
                     if ".partial" in p.name or p.name.endswith(".old")]
        assert leftovers == [], note


@pytest.fixture(scope="module")
def chain_reference(tmp_path_factory):
    """Raw cases, the outputs of two clean chain runs (1 and 2 slices per volume), the kinds
    of each run's writes in order, and the duration of a run (s)."""
    base = tmp_path_factory.mktemp("chain")
    _raw_cases(base / "raw")
    refs, writes = {}, {}
    for slices in (1, 2):
        root = base / f"ref{slices}"
        t0 = time.perf_counter()
        code, out = _run_chain(root, _chain_config(base / "raw", slices))
        assert code == 0
        refs[slices] = _snapshot(root)
        writes[slices] = json.loads(out.strip().splitlines()[-1])  # each write's kind, in order
    seconds = time.perf_counter() - t0  # a whole run, for the random kill moments
    assert any(k.startswith("benchmark/images/") for k in refs[2])
    assert any(k.startswith("benchmark/stacks/") for k in refs[2])
    assert any(k.startswith("prepared/volumes/") for k in refs[2])
    return base, refs, writes, seconds


def _rerun_in_process(root: Path, config_: dict) -> None:
    """The rerun after a kill: the same chain, in this process, without force."""
    from mislib import questions, render, volumes

    volumes.prepare("demo", root=root, **config_["volumes"])
    render.render_benchmark("demo", root=root, **config_["render"])
    questions.generate("demo", root=root, **config_["questions"])


@pytest.mark.slow
def test_a_kill_before_any_write_of_a_forced_rerun_leaves_outputs_a_rerun_completes(
        chain_reference, tmp_path):
    """Over complete outputs of one configuration, kill a forced run (of the same or another
    configuration) just before its k-th write, for write points spread over all three
    stages (tables, volumes, images, stamps, moves); rerun without force; the outputs equal
    a clean run's, with no leftovers."""
    base, refs, writes, _ = chain_reference
    rng = random.Random(20261201)
    # the forced run in the same configuration (1 slice): killed between stage 01's parquet
    # writes (volumes.parquet new, the others not) and before its very last write; in a new
    # configuration (2 slices): before one random write of each kind
    same = [i + 1 for i, w in enumerate(writes[1]) if w == "to_parquet"][1]
    points = [(1, same), (1, len(writes[1]))] + [
        (2, rng.choice([i + 1 for i, w in enumerate(writes[2]) if w == kind]))
        for kind in sorted(set(writes[2]))]
    for slices, k in points:
        root = tmp_path / f"s{slices}k{k}"
        shutil.copytree(base / "ref1", root)  # complete outputs, one slice per volume
        code, _ = _run_chain(root, _chain_config(base / "raw", slices, force=True), k=k)
        note = f"killed before write {k} of {len(writes[slices])} ({writes[slices][k - 1]})"
        assert code in (137, -signal.SIGKILL), f"not reached: {note}"
        _rerun_in_process(root, _chain_config(base / "raw", slices))
        _assert_same_outputs(root, refs[slices], note)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_a_rerun_gives_complete_outputs(chain_reference,
                                                                       tmp_path):
    base, refs, _, seconds = chain_reference
    rng = random.Random(7)
    for attempt, delay in enumerate(rng.uniform(0.5, seconds) for _ in range(2)):
        root = tmp_path / f"attempt{attempt}"
        shutil.copytree(base / "ref1", root)
        _run_chain(root, _chain_config(base / "raw", 2, force=True), kill_after=delay)
        _rerun_in_process(root, _chain_config(base / "raw", 2))
        _assert_same_outputs(root, refs[2], f"SIGKILL after {delay:.1f} s")


def test_a_stage_01_input_changed_after_its_run_is_seen_by_the_next_run(tmp_path):
    from mislib import volumes

    raw = tmp_path / "raw"
    _raw_cases(raw)
    params = _chain_config(raw, 1)["volumes"]
    volumes.prepare("demo", root=tmp_path, **params)
    (raw / "b" / "labels.csv").write_text("index,name\n1,liver\n2,spleen\n3,pancreas\n")
    volumes.prepare("demo", root=tmp_path, **params)
    comps = pd.read_parquet(tmp_path / "data" / "prepared" / "components.parquet")
    assert set(comps.loc[comps["volume_id"].str.endswith("-b"), "component"]) == {
        "liver", "spleen", "pancreas"}


def test_a_canonical_volume_deleted_after_stage_02_is_prepared_and_rendered_again(tmp_path):
    """Stage 01 owns the canonical volumes, stage 02 reads them: a deleted one makes stage 01
    stale (its manifest), and stage 02's stamp (the volumes' digests) makes its renders follow
    what stage 01 wrote again, ending as a clean run's outputs."""
    from mislib import render, volumes

    raw = tmp_path / "raw"
    _raw_cases(raw)
    config_ = _chain_config(raw, 1)
    root = tmp_path / "root"
    volumes.prepare("demo", root=root, **config_["volumes"])
    render.render_benchmark("demo", root=root, **config_["render"])
    reference = _snapshot(root)
    canonical = sorted((root / "data" / "prepared" / "volumes").rglob("image.nii.gz"))[0]
    canonical.unlink()
    vid = canonical.parent.name
    alone = render.render_benchmark("demo", root=root, **config_["render"])  # stage 02 alone
    assert vid not in set(alone["volume_id"]) and len(alone)
    volumes.prepare("demo", root=root, **config_["volumes"])
    assert canonical.is_file()
    again = render.render_benchmark("demo", root=root, **config_["render"])
    assert vid in set(again["volume_id"])
    _assert_same_outputs(root, reference, "a canonical volume deleted, stages 01-02 rerun")


# ---- stages 06 and 08 (scoring, paper tables): the same kills over a simulated study -------

LATE_SCRIPT = r"""
import json, os, sys
import pandas as pd
from mislib import claims, scoring, stage
root, k, force = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
writes = []
def deadly(fn, kind):
    def wrapped(*args, **kwargs):
        writes.append(kind)
        if len(writes) == k:
            os._exit(137)
        return fn(*args, **kwargs)
    return wrapped
for owner, name in ((stage, "replace_path"), (stage, "remove_stamp"), (stage, "write_stamp"),
                    (pd.DataFrame, "to_parquet"), (claims, "latex_table"),
                    (claims, "claims_markdown")):
    setattr(owner, name, deadly(getattr(owner, name), name))  # k = 0: list the writes only
scoring.score_runs("demo", root=root, force=force, progress=False)
claims.write_paper_assets("demo", root=root, force=force)
print(json.dumps(writes))
"""


def _late_outputs(root: Path) -> dict[str, object]:
    """Stage 06's tables and stage 08's text files, as comparable values."""
    snap: dict[str, object] = {}
    for name in ("scored", "bayes_by_factor", "semsam_effect", "unparseable"):
        snap[name] = pd.read_parquet(root / "data" / "analysis" / f"{name}.parquet")
    for path in sorted((root / "paper").rglob("*")):
        if path.is_file() and not path.name.startswith(".paper."):
            snap[str(path.relative_to(root))] = path.read_text().replace(str(root), "<root>")
    return snap


@pytest.fixture(scope="module")
def late_reference(tmp_path_factory):
    """A clean run of stages 06 and 08 over a simulated study (stage 07's outputs faked):
    its root, its outputs, and the kinds of its writes in order."""
    from mislib.simulate import simulate_study, write_study

    base = tmp_path_factory.mktemp("late")
    study = simulate_study(n_questions=120, n_trials=2, seed=3, models=("sim-a",))
    root = base / "ref"
    write_study(study, root)
    (root / "data" / "analysis").mkdir(parents=True)
    truth = study.truth.rename(columns={"value": "mean"})
    truth.assign(sd=0.1, lo95=truth["mean"] - 0.2, hi95=truth["mean"] + 0.2, r_hat=1.0,
                 ess_bulk=500.0).to_parquet(root / "data/analysis/factor_effects.parquet")
    pd.DataFrame({"contrast": ["p[family=plane]"], "kind": ["level"], "factors": ["family"],
                  "mean": [0.7], "sd": [0.01], "lo95": [0.68], "hi95": [0.72],
                  "observed": [0.7], "n_trials": [10]}).to_parquet(
        root / "data/analysis/contrasts.parquet")
    out = subprocess.run([sys.executable, "-c", LATE_SCRIPT, str(root), "0", "0"], text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return root, _late_outputs(root), json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_kills_in_stages_06_and_08_then_a_rerun_gives_complete_outputs(late_reference,
                                                                        tmp_path):
    complete, reference, writes = late_reference
    rng = random.Random(6)
    at = {kind: [i + 1 for i, w in enumerate(writes) if w == kind] for kind in set(writes)}
    # between stage 06's tables, one random move, stage 08's claims.md, the last write
    points = sorted({at["to_parquet"][1], rng.choice(at["replace_path"]),
                     at["claims_markdown"][0], len(writes)})
    for k in points:
        root = tmp_path / f"k{k}"
        shutil.copytree(complete, root)  # complete outputs, then a forced run killed
        killed = subprocess.run([sys.executable, "-c", LATE_SCRIPT, str(root), str(k), "1"],
                                env={**os.environ, "PYTHONPATH": str(REPO)},
                                capture_output=True)
        note = f"killed before write {k} of {len(writes)} ({writes[k - 1]})"
        assert killed.returncode == 137, note
        from mislib import claims, scoring

        scoring.score_runs("demo", root=root, progress=False)
        claims.write_paper_assets("demo", root=root)
        snap = _late_outputs(root)
        assert sorted(snap) == sorted(reference), note
        for key, value in reference.items():
            if isinstance(value, pd.DataFrame):
                pd.testing.assert_frame_equal(snap[key], value, obj=f"{key} ({note})")
            else:
                assert snap[key] == value, f"{key}: {note}"
        leftovers = [p for p in root.rglob("*") if ".partial" in p.name]
        assert leftovers == [], note
