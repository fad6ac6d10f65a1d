"""mislib.inference.runner: the stage-04 harness on the tiny Qwen3-VL, on CPU."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from mislib.config import load_profile
from mislib.inference import (
    RESPONSE_COLUMNS,
    current_runs,
    read_shards,
    run_inference,
    run_profile,
    select_questions,
    trial_seed,
)
from mislib.paths import REPO_ROOT
from mislib.smoke import write_smoke_benchmark

N_QUESTIONS = 10


def _profile(**inference):
    """The demo profile with small decode settings, so a test batch takes a second."""
    prof = copy.deepcopy(load_profile("demo"))
    prof["name"] = "test"
    prof["inference"].update({"max_new_tokens": 4, "batch_size": 4, "n_trials": 2,
                              "limit": 0, "instruction": "Answer with one of: {options}.",
                              **inference})
    return prof


def _new_root(base: Path, smoke_root: Path, n_questions: int = N_QUESTIONS) -> Path:
    """A project root with its own benchmark, sharing the session's model and table cache."""
    base.mkdir(parents=True, exist_ok=True)
    (base / ".cache").symlink_to(smoke_root / ".cache", target_is_directory=True)
    write_smoke_benchmark(base, n_questions=n_questions, seed=7, image_size=48, n_frames=4)
    return base


def seed_random_table(root: Path, k: int) -> str:
    """Put a random neighbour table for the smoke model into ``root``'s cache; its key.

    An exact table over Qwen's 151,643 content tokens takes minutes on two cores; these
    tests check the harness, not the table (tests/test_semsam.py checks the builder), so
    the cache gets a random table under the exact key :func:`semsam.cached_neighbor_table`
    looks up, and every run takes the production path to it.
    """
    import torch
    from transformers import AutoTokenizer

    from mislib import semsam
    from mislib.inference.registry import checkpoint_input_embeddings
    from mislib.smoke import smoke_model_dir

    folder = smoke_model_dir(root)
    embeddings = checkpoint_input_embeddings(str(folder), torch.float32)
    mask = semsam.content_token_mask(AutoTokenizer.from_pretrained(folder), len(embeddings))
    key = semsam.table_key(embeddings, mask, k)
    path = root / ".cache" / "semsam" / f"{key}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(0)
        content = mask.nonzero().squeeze(1)
        ids = content[torch.randint(0, len(content), (len(mask), k), generator=gen)]
        ids[:, 0] = torch.arange(len(mask))
        sims = torch.rand(len(mask), k, generator=gen).sort(1, descending=True).values
        sims[:, 0] = 1.0
        semsam.NeighborTable(ids, sims * mask[:, None], mask, key=key).save(path)
    return key


@pytest.fixture(scope="module", autouse=True)
def seeded_table(smoke_root):
    """The session's smoke root with a random neighbour table (:func:`seed_random_table`)."""
    return seed_random_table(smoke_root, load_profile("demo")["semsam"]["k"])


@pytest.fixture(scope="module")
def both_arms(smoke_root, tmp_path_factory):
    """Both arms run once on a small benchmark (module-scoped: the expensive part)."""
    root = _new_root(tmp_path_factory.mktemp("arms"), smoke_root)
    runs = run_profile(_profile(), arms=["baseline", "semsam"], root=root, progress=False)
    assert [(run.run_id.split("-")[-2]) for run in runs] == ["baseline", "semsam"]
    return root, {run.run_id.split("-")[-2]: run for run in runs}


# ------------------------------------------------------------------ pure helpers
def test_trial_seed_depends_on_question_and_trial_only():
    assert trial_seed(1, "q1", 0) == trial_seed(1, "q1", 0)
    seeds = {trial_seed(1, q, t) for q in ("q1", "q2") for t in range(3)}
    assert len(seeds) == 6
    assert trial_seed(2, "q1", 0) != trial_seed(1, "q1", 0)
    assert 0 <= trial_seed(1, "q1", 0) < 2**63


def test_select_questions_ignores_file_order_and_takes_a_prefix():
    table = pd.DataFrame({"question_id": [f"q{i:03d}" for i in range(50)], "x": range(50)})
    first = select_questions(table, 10, seed=3)
    shuffled = select_questions(table.sample(frac=1, random_state=0), 10, seed=3)
    assert first["question_id"].tolist() == shuffled["question_id"].tolist()
    assert select_questions(table, 20, seed=3)["question_id"].tolist()[:10] == \
        first["question_id"].tolist()
    assert len(select_questions(table, 0, seed=3)) == 50
    assert first["question_id"].tolist() != table["question_id"].tolist()[:10]


def test_select_questions_rejects_repeated_ids():
    table = pd.DataFrame({"question_id": ["a", "b", "a"]})
    with pytest.raises(ValueError, match="repeats question_id 'a'"):
        select_questions(table, None, seed=0)


# ------------------------------------------------------------------ the stage, end to end
def test_responses_hold_every_question_and_trial_once_with_contract_columns(both_arms):
    root, runs = both_arms
    for arm, run in runs.items():
        frame = pd.read_parquet(run.responses)
        assert list(frame.columns) == list(RESPONSE_COLUMNS)
        assert len(frame) == N_QUESTIONS * 2 == run.n_records == run.n_generated
        assert not frame.duplicated(["question_id", "trial"]).any()
        assert set(frame["arm"]) == {arm} and set(frame["run_id"]) == {run.run_id}
        assert (frame["status"] == "ok").all()
        assert frame["parse_status"].isin(["ok", "unparseable", "ambiguous"]).all()
        assert frame["n_tokens"].between(1, 4).all()
        assert (frame["latency_s"] > 0).all()
        expected = [trial_seed(20261125, q, t)
                    for q, t in zip(frame["question_id"], frame["trial"], strict=True)]
        assert frame["seed"].tolist() == expected


def test_both_arms_are_paired_on_the_same_questions_and_seeds(both_arms):
    _, runs = both_arms
    base, sem = (pd.read_parquet(runs[a].responses).set_index(["question_id", "trial"])
                 for a in ("baseline", "semsam"))
    assert runs["baseline"].run_id != runs["semsam"].run_id
    assert base.index.equals(sem.index)
    assert base["seed"].equals(sem["seed"])


def test_run_json_records_model_processor_decode_table_and_versions(both_arms, seeded_table):
    _, runs = both_arms
    record = json.loads((runs["semsam"].run_dir / "run.json").read_text())
    assert record["run_id"] == runs["semsam"].run_id
    assert record["model"] == "smoke:tiny-qwen3-vl" and record["revision"]
    assert record["processor"]["image_processor"]["size"]
    assert record["processor"]["video_processor"]["size"]
    assert record["processor"]["do_sample_frames"] is False
    assert record["decode"]["max_new_tokens"] == 4 and record["decode"]["arm"] == "semsam"
    assert record["decode"]["table_key"] == seeded_table
    assert record["semsam_table"]["hash"] == seeded_table
    assert record["semsam_table"]["k"] == 32
    session = record["sessions"][-1]
    assert session["packages"]["torch"] and session["packages"]["transformers"]
    assert "git_commit" in session
    assert record["n_records"] == N_QUESTIONS * 2


def test_current_runs_names_the_latest_run_of_each_arm(both_arms):
    root, runs = both_arms
    found = current_runs(root / "data" / "results")
    assert sorted(found) == sorted(run.run_dir for run in runs.values())


def test_rerun_of_a_finished_run_does_no_work(both_arms):
    root, runs = both_arms
    again = run_inference(_profile(), arm="semsam", root=root, progress=False)
    assert again.run_id == runs["semsam"].run_id
    assert again.n_generated == 0 and again.n_records == N_QUESTIONS * 2


def test_more_trials_resume_the_same_run_and_add_only_the_new_ones(both_arms):
    root, runs = both_arms
    more = run_inference(_profile(n_trials=3), arm="baseline", root=root, progress=False)
    assert more.run_id == runs["baseline"].run_id
    assert more.n_generated == N_QUESTIONS
    frame = pd.read_parquet(more.responses)
    assert len(frame) == N_QUESTIONS * 3 and not frame.duplicated(["question_id", "trial"]).any()


def test_a_run_being_written_by_another_process_is_not_touched(both_arms):
    import fcntl

    root, runs = both_arms
    with (runs["semsam"].run_dir / ".lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="being written by another process"):
            run_inference(_profile(n_trials=3), arm="semsam", root=root, progress=False)
    assert len(pd.read_parquet(runs["semsam"].responses)) == N_QUESTIONS * 2


def test_force_starts_the_run_over(smoke_root, tmp_path):
    root = _new_root(tmp_path / "root", smoke_root, n_questions=3)
    first = run_inference(_profile(), arm="baseline", root=root, progress=False)
    again = run_inference(_profile(), arm="baseline", root=root, progress=False, force=True)
    assert again.run_id == first.run_id and again.n_generated == 6
    assert len(read_shards(again.run_dir / "shards")) == 6


def test_missing_image_and_unknown_family_are_recorded_not_lost(smoke_root, tmp_path):
    root = _new_root(tmp_path / "root", smoke_root, n_questions=6)
    path = root / "data" / "benchmark" / "questions.parquet"
    questions = pd.read_parquet(path)
    pictured = questions.index[questions["image_path"].notna()]
    missing_id = questions.loc[pictured[0], "question_id"]
    questions.loc[pictured[0], "image_path"] = "images/does-not-exist.png"
    odd_id = questions.loc[pictured[1], "question_id"]
    questions.loc[pictured[1], "family"] = "relation_4d"
    questions.to_parquet(path, index=False)

    run = run_inference(_profile(), arm="baseline", root=root, progress=False)
    frame = pd.read_parquet(run.responses).set_index("question_id")
    assert len(frame) == 12
    lost = frame.loc[missing_id]
    assert (lost["status"] == "missing_input").all()
    assert lost["error"].str.contains("does-not-exist.png").all()
    assert lost["raw_text"].isna().all() and not lost["correct"].any()
    odd = frame.loc[odd_id]
    assert (odd["status"] == "unknown_family").all()
    assert odd["raw_text"].notna().all() and odd["error"].str.contains("relation_4d").all()
    others = frame.drop(index=[missing_id, odd_id])
    assert (others["status"] == "ok").all()


def _oom_above(limit):
    """A generate wrapper that runs out of memory on batches larger than ``limit``."""
    import torch

    sizes = []

    def hook(generate):
        def wrapped(requests, decode):
            sizes.append(len(requests))
            if len(requests) > limit:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return generate(requests, decode)
        return wrapped
    return hook, sizes


def test_out_of_memory_halves_the_batch_and_keeps_every_record(smoke_root, tmp_path):
    root = _new_root(tmp_path / "root", smoke_root, n_questions=5)
    hook, sizes = _oom_above(2)
    run = run_inference(_profile(batch_size=8), arm="baseline", root=root, progress=False,
                        generate_hook=hook)
    frame = pd.read_parquet(run.responses)
    assert len(frame) == 10 and (frame["status"] == "ok").all()
    assert frame["batch_size"].max() <= 2
    assert sizes[0] == 8 and 4 in sizes
    # Once halved, later batches start at the smaller size instead of failing again.
    assert sizes.count(8) == 1


def test_out_of_memory_at_batch_size_one_is_recorded(smoke_root, tmp_path):
    root = _new_root(tmp_path / "root", smoke_root, n_questions=2)
    hook, _ = _oom_above(0)
    run = run_inference(_profile(), arm="semsam", root=root, progress=False, generate_hook=hook)
    frame = pd.read_parquet(run.responses)
    assert len(frame) == 4 and (frame["status"] == "oom").all()
    assert frame["error"].str.contains("out of memory").all()


def test_an_error_that_is_not_out_of_memory_stops_the_run(smoke_root, tmp_path):
    root = _new_root(tmp_path / "root", smoke_root, n_questions=2)

    def hook(generate):
        def wrapped(*args):
            raise RuntimeError("shape mismatch")
        return wrapped
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_inference(_profile(), arm="baseline", root=root, progress=False,
                      generate_hook=hook)


def test_unknown_model_id_gives_a_clear_error(smoke_root, tmp_path):
    root = _new_root(tmp_path / "root", smoke_root, n_questions=2)
    with pytest.raises(ValueError, match="no-such-org/no-such-model"):
        run_inference(_profile(), arm="baseline", model="no-such-org/no-such-model",
                      root=root, progress=False)


def test_missing_questions_file_names_the_stage_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="questions.parquet"):
        run_inference(_profile(), arm="baseline", root=tmp_path, progress=False)


def test_unknown_arm_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown arm 'nucleus'"):
        run_inference(_profile(), arm="nucleus", root=tmp_path)


def test_n_trials_below_one_is_an_error_naming_the_profile_key(smoke_root, tmp_path):
    root = _new_root(tmp_path / "root", smoke_root, n_questions=2)
    first = run_inference(_profile(), arm="baseline", root=root, progress=False)
    for bad in (0, -1, "two"):
        with pytest.raises(ValueError, match=r"\[inference\] n_trials = "):
            run_inference(_profile(n_trials=bad), arm="baseline", root=root, progress=False)
    assert len(pd.read_parquet(first.responses)) == 4


def test_the_cli_refuses_a_profile_with_zero_trials_before_touching_results(tmp_path, capsys):
    from mislib.__main__ import main as cli

    text = (REPO_ROOT / "mislib" / "profiles" / "demo.toml").read_text()
    profile = tmp_path / "zero.toml"
    profile.write_text(re.sub(r"(?m)^n_trials = \d+", "n_trials = 0", text))
    assert cli(["infer", "--profile", str(profile), "--out", str(tmp_path / "results")]) == 2
    assert "[inference] n_trials = 0" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_a_limited_run_adds_to_the_run_and_never_shrinks_its_responses(smoke_root, tmp_path):
    root = _new_root(tmp_path / "root", smoke_root, n_questions=5)
    full = run_inference(_profile(), arm="baseline", root=root, progress=False)
    limited = run_inference(_profile(), arm="baseline", root=root, progress=False, limit=2)
    assert limited.run_id == full.run_id and limited.n_generated == 0
    assert len(pd.read_parquet(full.responses)) == 10 == limited.n_records
    assert len(limited.selected()) == 4 == limited.n_selected
    assert current_runs(root / "data" / "results") == [full.run_dir]
    fewer = run_inference(_profile(n_trials=1), arm="baseline", root=root, progress=False)
    assert len(pd.read_parquet(fewer.responses)) == 10 and len(fewer.selected()) == 5


def test_force_with_a_limit_refuses_to_drop_the_records_outside_it(smoke_root, tmp_path):
    root = _new_root(tmp_path / "root", smoke_root, n_questions=3)
    full = run_inference(_profile(), arm="baseline", root=root, progress=False)
    with pytest.raises(RuntimeError, match="force would remove them"):
        run_inference(_profile(), arm="baseline", root=root, progress=False, limit=1,
                      force=True)
    assert len(pd.read_parquet(full.responses)) == 6


def test_greedy_arm_takes_the_most_probable_token_at_every_step(smoke_root, tmp_path):
    import torch

    from mislib.inference import load_backend
    from mislib.inference.protocol import DecodeSettings, Request

    root = _new_root(tmp_path / "root", smoke_root, n_questions=4)
    run = run_inference(_profile(max_new_tokens=6), arm="greedy", root=root, progress=False)
    frame = pd.read_parquet(run.responses)
    assert set(frame["arm"]) == {"greedy"} and len(frame) == 8
    # deterministic: both trials of a question give the same text, whatever their seeds
    assert (frame.groupby("question_id")["raw_text"].nunique() == 1).all()
    record = json.loads((run.run_dir / "run.json").read_text())
    assert "table_key" not in record["decode"]

    backend = load_backend("hf", "smoke:tiny-qwen3-vl", root=root, device="cpu")
    requests = [Request(f"q{i}", 0, seed, text) for i, (seed, text) in
                enumerate([(1, "Is the liver above the spleen?"), (2, "Name the plane.")])]
    table_path = next((smoke_root / ".cache" / "semsam").glob("*.safetensors"))
    decode = DecodeSettings("greedy", 0.7, 20, 0.8, 6, table_path=str(table_path))
    got = backend.generate(requests, decode)
    inputs = backend.prepare(requests)
    with torch.inference_mode():
        plain = backend.model.generate(**inputs, max_new_tokens=6, do_sample=False,
                                       temperature=None, top_k=None, top_p=None,
                                       pad_token_id=backend.tokenizer.pad_token_id)
    for generation, row in zip(got, plain[:, inputs["input_ids"].shape[1]:].tolist(),
                               strict=True):
        assert list(generation.token_ids) == row[:generation.n_tokens]


# ------------------------------------------------------------------ SIGKILL and resume
def _shard_lines(results: Path) -> int:
    return sum(p.read_text().count("\n") for p in results.glob("*/shards/*.jsonl"))


def test_killed_cli_runs_resume_without_loss_or_duplicates(smoke_root, tmp_path):
    """SIGKILL ``python -m mislib infer`` at random moments, rerun: each record once."""
    root = _new_root(tmp_path / "root", smoke_root, n_questions=6)
    text = (REPO_ROOT / "mislib" / "profiles" / "demo.toml").read_text()
    text = re.sub(r"(?m)^batch_size = \d+", "batch_size = 2", text)
    text = re.sub(r"(?m)^max_new_tokens = \d+", "max_new_tokens = 4", text)
    profile = tmp_path / "killtest.toml"
    profile.write_text(text)
    env = {**os.environ, "MISGROUND_ROOT": str(root), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "mislib", "infer", "--profile", str(profile),
           "--arm", "semsam", "--limit", "6"]
    results = root / "data" / "results"
    rng = random.Random(11)
    kills = 0
    for _ in range(3):
        before = _shard_lines(results)
        proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 180
        # Kill once this attempt has written something, after a random extra moment, so
        # the kill lands anywhere in a later batch: mid-decode, mid-write or mid-compaction.
        while proc.poll() is None and _shard_lines(results) == before:
            assert time.monotonic() < deadline, "no record written within 180 s"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        proc.stderr.close()
    assert kills >= 1, "every attempt finished before it could be killed"
    final = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    (run_dir,) = [p for p in results.iterdir() if p.is_dir()]
    frame = pd.read_parquet(run_dir / "responses.parquet")
    assert len(frame) == 12
    assert not frame.duplicated(["question_id", "trial"]).any()
    assert (frame["status"] == "ok").all()
    # The shards themselves never hold a record twice, torn tails aside.
    lines = [ln for p in (run_dir / "shards").glob("*.jsonl") for ln in p.read_text().splitlines()]
    keys = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        keys.append((record["question_id"], record["trial"]))
    assert sorted(keys) == sorted(set(keys)) and len(set(keys)) == 12
