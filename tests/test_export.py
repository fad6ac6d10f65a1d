"""mislib.export: the HF dataset with configs, the lmms-eval task folder, the VLMEvalKit TSVs."""

from __future__ import annotations

import ast
import base64
import json
import string

import datasets
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from test_questions import make_inputs

from mislib.export import check_export, export_paths
from mislib.export import lmms_eval as lm
from mislib.export.hf import DEFAULT_CONFIG, config_name
from mislib.export.vlmevalkit import (
    FILES,
    option_tokens,
    options_and_answer,
    read_tsv,
    resolve_images,
    rewrite_question,
)
from mislib.questions import export, generate
from mislib.scoring import bayes_at_n, bayes_interval, is_correct, parse_answer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    make_inputs(root, conventions=("standard", "storage"), prompts=("none", "mask"))
    questions = generate("demo", root=root, force=True)
    info = export("demo", root=root)
    return root, questions, info


def _load(root, name):
    return datasets.load_dataset(str(export_paths(root)["hf"]), name, split="test",
                                 cache_dir=str(root / "hf-cache"))


# ----------------------------------------------------------------------------------------
# Hugging Face dataset
# ----------------------------------------------------------------------------------------

def test_each_ablation_and_dims_loads_as_a_config_with_its_questions(exported):
    root, questions, _ = exported
    cells = questions.groupby(["ablation", "dims"])["question_id"].apply(set)
    assert len(cells) >= 4  # none/blank/text_only over 2d/3d
    for (ablation, dims), ids in cells.items():
        ds = _load(root, config_name(ablation, dims))
        assert set(ds["question_id"]) == ids and len(ds) == len(ids)
        assert set(ds["ablation"]) == {ablation} and set(ds["dims"]) == {dims}
    every = _load(root, DEFAULT_CONFIG)["question_id"]
    assert sorted(every) == sorted(questions["question_id"])


def test_hf_features_are_typed_images_and_the_factors_are_columns(exported):
    root, questions, _ = exported
    ds = _load(root, config_name("none", "3d"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds.features["frames"], datasets.List)
    assert isinstance(ds.features["frames"].feature, datasets.Image)
    assert ds.features["n_frames"].dtype == "int64"
    assert ds.features["separation_mm"].dtype == "float64"
    for factor in ("modality", "plane", "dims", "convention", "prompt", "background",
                   "terminology", "form", "family", "ablation"):
        assert factor in ds.features
    row = ds[0]
    assert row["image"] is None and len(row["frames"]) == 4
    assert isinstance(row["frames"][0], Image.Image) and row["frames"][0].size == (8, 8)
    flat = _load(root, config_name("none", "2d"))[0]
    assert isinstance(flat["image"], Image.Image) and flat["frames"] == []
    text = _load(root, config_name("text_only", "2d"))[0]
    assert text["image"] is None and text["frames"] == []


def test_check_export_compares_every_row_and_image(exported):
    root, questions, _ = exported
    summary = check_export(root)
    assert summary["rows"] == len(questions)
    assert summary["configs"][DEFAULT_CONFIG] == len(questions)
    n_2d = int((questions.dims.eq("2d") & questions.image_path.notna()).sum())
    assert summary["rows_with_image"] == n_2d > 0
    assert summary["stack_frames"] == int(questions.loc[questions.dims.eq("3d"), "n_frames"].sum())
    assert sum(summary["tsv_rows"].values()) == len(questions)


def test_check_export_names_a_changed_row(exported, tmp_path):
    import shutil

    root, questions, _ = exported
    copy = tmp_path / "copy"
    shutil.copytree(root / "data", copy / "data")
    changed = questions.copy()
    changed.loc[0, "answer"] = "something else"
    changed.to_parquet(copy / "data" / "benchmark" / "questions.parquet", index=False)
    with pytest.raises(AssertionError, match=changed.loc[0, "question_id"]):
        check_export(copy)


def test_repeated_images_are_stored_once(exported):
    root, questions, info = exported
    bench = root / "data" / "benchmark"
    raw_bytes = sum((bench / p).stat().st_size if p.endswith(".png")
                    else sum(f.stat().st_size for f in (bench / p).iterdir())
                    for p in questions["image_path"].dropna())
    image_bytes = 0  # what the image columns take in the parquet files
    for path in info["hf_files"]:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                if col.path_in_schema.split(".")[0] in ("image", "frames"):
                    image_bytes += col.total_compressed_size
    assert image_bytes < raw_bytes / 3  # each render is asked about several times


def test_extra_question_columns_are_exported_with_their_types(exported, tmp_path):
    import shutil

    root, questions, _ = exported
    copy = tmp_path / "copy"
    shutil.copytree(root / "data" / "benchmark", copy / "data" / "benchmark")
    more = questions.assign(answer_in_name=np.arange(len(questions)) % 2 == 0,
                            new_source_note=None)
    more.to_parquet(copy / "data" / "benchmark" / "questions.parquet", index=False)
    export("demo", root=copy)
    ds = _load(copy, DEFAULT_CONFIG)
    assert ds.features["answer_in_name"].dtype == "bool"
    expected = dict(zip(more["question_id"], more["answer_in_name"], strict=True))
    assert ds["answer_in_name"] == [expected[q] for q in ds["question_id"]]
    assert set(ds["new_source_note"]) == {None}


# ----------------------------------------------------------------------------------------
# The export as a stage: stamped, re-written only when stale, replaced whole or not at all
# ----------------------------------------------------------------------------------------

def _export_digests(root) -> dict[str, str]:
    """sha256 of every file of the three exports (stamps and staging folders aside)."""
    import hashlib

    base = export_paths(root)["dir"]
    return {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
            for part in ("hf", "lmms_eval", "vlmevalkit")
            for p in sorted((base / part).rglob("*")) if p.is_file()}


def _copy_benchmark(root, target):
    import shutil

    shutil.copytree(root / "data" / "benchmark", target / "data" / "benchmark")
    return target


def test_a_fresh_export_is_read_back_and_a_changed_question_table_makes_it_stale(exported,
                                                                                tmp_path):
    root, questions, _ = exported
    first = export("demo", root=root, check=False)
    assert first["reused"]  # the fixture exported these questions already
    copy = _copy_benchmark(root, tmp_path / "copy")
    before = _export_digests(copy)
    parquet = copy / first["hf_files"][0].relative_to(root)
    mtime = parquet.stat().st_mtime_ns
    again = export("demo", root=copy, check=False)
    assert again["reused"]  # the stamp names files under data/benchmark: a copy stays fresh
    assert parquet.stat().st_mtime_ns == mtime and _export_digests(copy) == before
    assert again["rows"] == first["rows"] == len(questions) and again["hf_files"][0] == parquet
    assert again["bytes"] == first["bytes"]
    assert export("demo", root=copy, check=False, force=True)["reused"] is False

    changed = questions.copy()
    changed.loc[0, "text"] = changed.loc[0, "text"] + " (edited)"
    changed.to_parquet(copy / "data" / "benchmark" / "questions.parquet", index=False)
    third = export("demo", root=copy)  # with the check against the edited table
    assert not third["reused"]
    ds = _load(copy, DEFAULT_CONFIG)
    text = dict(zip(ds["question_id"], ds["text"], strict=True))
    assert text[changed.loc[0, "question_id"]].endswith(" (edited)")


def test_a_changed_render_makes_the_export_stale(exported, tmp_path):
    root, questions, _ = exported
    copy = _copy_benchmark(root, tmp_path / "copy")
    export("demo", root=copy, check=False)
    flat = questions[questions.dims.eq("2d") & questions.image_path.notna()].iloc[0]
    png = copy / "data" / "benchmark" / flat["image_path"]
    Image.new("RGB", (8, 8), (255, 0, 0)).save(png)
    info = export("demo", root=copy)  # the check compares every image with the renders
    assert not info["reused"]


def test_a_profile_given_as_a_toml_path_is_named_in_the_export_not_its_path(exported,
                                                                           tmp_path):
    """The export is shared with other machines: it names the profile (the TOML's stem),
    never where the file lies on this one."""
    from mislib.config import PROFILE_DIR

    root, _, _ = exported
    copy = _copy_benchmark(root, tmp_path / "copy")
    toml = tmp_path / "profiles" / "my_run.toml"
    toml.parent.mkdir()
    toml.write_text((PROFILE_DIR / "demo.toml").read_text())
    info = export(str(toml), root=copy, check=False)
    assert not info["reused"] and info["profile"] == "my_run"
    written = [f for f in (copy / "data" / "benchmark" / "export").rglob("*")
               if f.is_file() and not f.name.startswith(".")]
    assert written
    for f in written:
        assert str(tmp_path).encode() not in f.read_bytes(), f


def test_an_export_stopped_by_an_error_leaves_the_previous_export_intact(exported, tmp_path,
                                                                         monkeypatch):
    """The three exports are written aside and moved in only when all are complete: an error
    after the HF folder was written (here in the VLMEvalKit writer) changes nothing on disk."""
    import mislib.export as export_pkg

    root, questions, _ = exported
    copy = _copy_benchmark(root, tmp_path / "copy")
    export("demo", root=copy, check=False)
    before = _export_digests(copy)
    changed = questions.iloc[: len(questions) // 2]
    changed.to_parquet(copy / "data" / "benchmark" / "questions.parquet", index=False)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_pkg, "write_vlmevalkit", fail)
    with pytest.raises(OSError, match="disk full"):
        export("demo", root=copy, check=False)
    assert _export_digests(copy) == before
    leftovers = [p.name for p in export_paths(copy)["dir"].iterdir() if ".partial" in p.name]
    assert leftovers == []
    monkeypatch.undo()
    info = export("demo", root=copy)  # still stale: written now, and checked
    assert not info["reused"] and info["rows"] == len(changed)


def test_questions_without_a_needed_column_are_named(tmp_path):
    bench = tmp_path / "data" / "benchmark"
    bench.mkdir(parents=True)
    pd.DataFrame({"question_id": ["q1"], "text": ["?"]}).to_parquet(bench / "questions.parquet")
    with pytest.raises(ValueError, match=r"questions.parquet.*'family'"):
        export("demo", root=tmp_path)


def test_export_without_questions_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="questions"):
        export("demo", root=tmp_path)


# ----------------------------------------------------------------------------------------
# lmms-eval task folder (its loading by lmms-eval itself: tests/test_export_lmms.py)
# ----------------------------------------------------------------------------------------

def test_lmms_eval_has_one_task_per_family_and_input_over_the_hf_files(exported):
    root, questions, info = exported
    folder = export_paths(root)["lmms_eval"]
    group = yaml.safe_load((folder / "mis_ground.yaml").read_text())
    kinds = {(r["family"], "text" if pd.isna(r["image_path"]) else
              "video" if r["dims"] == "3d" else "image") for r in questions.to_dict("records")}
    assert sorted(group["task"]) == sorted(lm.task_name(f, k) for f, k in kinds)
    assert {m["metric"] for m in group["aggregate_metric_list"]} == set(lm.POOLED)
    seen = set()
    for task in group["task"]:
        # the template's !function tags need lmms-eval's loader; the task file is plain YAML
        config = yaml.safe_load((folder / f"{task}.yaml").read_text())
        assert config["include"] == "_default_template_yaml"
        for rel in config["dataset_kwargs"]["data_files"]["test"]:
            path = (folder / rel).resolve()
            assert path.is_file(), rel
            seen |= set(pq.read_table(path, columns=["question_id"])["question_id"].to_pylist())
    assert seen == set(questions["question_id"])
    template = (folder / "_default_template_yaml").read_text()
    assert "repeats: 2" in template  # the demo profile's n_trials
    assert "function: !function utils.AllTrials" in template
    ast.parse((folder / "utils.py").read_text())


def test_lmms_hooks_give_image_video_and_text_inputs(exported):
    root, _, _ = exported
    for config, kind in (("none_2d", "image"), ("none_3d", "video"), ("text_only_2d", "text")):
        doc = _load(root, config)[0]
        visual = lm.doc_to_visual(doc)
        if kind == "image":
            assert len(visual) == 1 and isinstance(visual[0], Image.Image)
        elif kind == "video":
            assert visual[0]["type"] == "video" and len(visual[0]["url"]) == doc["n_frames"]
            assert all(isinstance(f, Image.Image) for f in visual[0]["url"])
        else:
            assert visual == []
        assert lm.doc_to_text(doc) == doc["text"]
        assert lm.doc_to_target(doc) == doc["answer"]


def test_lmms_process_results_scores_every_trial_with_the_stage_06_parser(exported):
    root, questions, _ = exported
    q = questions[questions.form.eq("open")].iloc[0].to_dict()
    wrong = next(c for c in q["choices"] if c != q["answer"])
    responses = [f"Answer: {q['answer']}", f"Answer: {wrong}", "no idea",
                 f"Answer: {q['choices'][0]} or {q['choices'][1]}"]
    out = lm.process_results(q, responses)
    assert set(out) == set(lm.METRICS)
    scored = out["accuracy"]
    expected = [parse_answer(r, q) for r in responses]
    assert scored["status"] == [s for _, s in expected] == ["ok", "ok", "unparseable", "ambiguous"]
    assert scored["correct"] == [is_correct(v, s, q) for v, s in expected] == [
        True, False, False, False]


def test_lmms_aggregations_are_stage_06_bayes_and_parse_rates():
    items = [{"correct": [True, False], "status": ["ok", "unparseable"]},
             {"correct": [False, False], "status": ["ambiguous", "ok"]},
             {"correct": [True, True], "status": ["ok", "ok"]}]
    R = np.array([[1, 0], [0, 0], [1, 1]])
    assert lm.accuracy(items) == pytest.approx(0.5)
    assert lm.bayes_at_n(items) == pytest.approx(bayes_at_n(R)[0])
    _, _, lo, hi = bayes_interval(R, level=0.95)
    assert (lm.bayes_lo95(items), lm.bayes_hi95(items)) == pytest.approx((lo, hi))
    assert lm.unparseable_rate(items) == pytest.approx(1 / 6)
    assert lm.ambiguous_rate(items) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="same number of trials"):
        lm.bayes_at_n([*items, {"correct": [True], "status": ["ok"]}])


def test_lmms_task_folder_refuses_fewer_than_one_trial(exported, tmp_path):
    root, questions, info = exported
    with pytest.raises(ValueError, match="n_trials"):
        lm.write_lmms_eval(questions, info["hf_files"], export_paths(root)["hf"], tmp_path,
                           n_trials=0, max_new_tokens=16)


# ----------------------------------------------------------------------------------------
# VLMEvalKit TSVs
# ----------------------------------------------------------------------------------------

def _tsvs(root):
    folder = export_paths(root)["vlmevalkit"]
    return {name: read_tsv(folder / f"{name}.tsv") for name in FILES
            if (folder / f"{name}.tsv").is_file()}


def test_vlmevalkit_files_have_the_columns_its_loader_selects_classes_by(exported):
    root, questions, _ = exported
    tsvs = _tsvs(root)
    assert set(tsvs) == set(FILES)
    for name, tsv in tsvs.items():
        kind_in, _forms, _cls, kind = FILES[name]
        letters = [c for c in tsv.columns if len(c) == 1 and c in string.ascii_uppercase]
        assert "image_path" not in tsv.columns and "question" in tsv.columns
        if kind == "mcq":  # build_dataset: A and B (+ image) -> Custom(Text)MCQDataset
            assert letters[:2] == ["A", "B"]
            assert ("image" in tsv.columns) == (kind_in != "text")
            assert tsv["answer"].isin(letters).all()
        else:  # ImageYORNDataset compares answer == extracted Yes/No
            assert letters == [] and set(tsv["answer"]) == {"Yes", "No"}
    text = tsvs["MIS-Ground_TEXT_MCQ"]
    assert set(text["question_id"]) == set(questions.loc[questions.image_path.isna(),
                                                         "question_id"])


def test_vlmevalkit_answers_are_the_option_letter_or_yes_no_of_the_truth(exported):
    root, questions, _ = exported
    by_id = questions.set_index("question_id")
    for name, tsv in _tsvs(root).items():
        for row in tsv.to_dict("records"):
            q = by_id.loc[row["question_id"]]
            if FILES[name][3] == "yn":
                assert row["answer"] == {"True": "Yes", "False": "No"}[q["answer"]]
            elif q["form"] == "open":
                assert row[row["answer"]] == q["answer"]
            else:
                assert row[row["answer"]] == {"True": "Yes", "False": "No"}[q["answer"]]


def test_vlmevalkit_questions_name_structures_by_label_not_bare_letters(exported):
    root, questions, _ = exported
    by_id = questions.set_index("question_id")
    labelled = 0
    for tsv in _tsvs(root).values():
        for row in tsv.to_dict("records"):
            tokens = option_tokens(row["question"])
            assert not [t for t in tokens if len(t) == 1 and t in string.ascii_uppercase]
            letter = by_id.loc[row["question_id"], "letter_a"]
            if isinstance(letter, str):
                assert f"label-{letter}" in row["question"]
                labelled += 1
            assert "Answer:" not in row["question"] and "Options:" not in row["question"]
    assert labelled > 0


def test_rewrite_question_relabels_letters_and_asks_yes_or_no():
    row = {"question_id": "q1", "form": "closed_true", "letter_a": "B", "letter_b": "A",
           "answer": "True", "choices": ["True", "False"],
           "text": "The image is a slice. Is the following statement true or false? The liver "
                   "(B) lies above structure A. Answer as seen.\n"
                   "End your reply with a line 'Answer: True' or 'Answer: False'."}
    assert rewrite_question(row, "yn") == (
        "The image is a slice. Is the following statement correct? The liver (label-B) lies "
        "above structure label-A. Answer as seen. Please answer yes or no.")
    assert options_and_answer(row, "yn") == ([], "Yes")
    assert options_and_answer(row, "mcq") == (["Yes", "No"], "A")
    statement = {**row, "text": "Statement: Structure A is above structure B. True or False?"}
    assert rewrite_question(statement, "yn") == ("Statement: Structure label-A is above "
                                                 "structure label-B. Correct? Please answer yes "
                                                 "or no.")
    opened = {**row, "form": "open", "answer": "below", "choices": ["above", "below"],
              "text": "Relative to A, is the kidney (B) above or below? Options: above, below."}
    assert rewrite_question(opened, "mcq") == \
        "Relative to label-A, is the kidney (label-B) above or below?"
    assert options_and_answer(opened, "mcq") == (["above", "below"], "B")


def test_rewrite_question_refuses_a_text_that_keeps_a_bare_capital_letter():
    row = {"question_id": "q9", "form": "open", "letter_a": None, "letter_b": None,
           "answer": "axial", "choices": ["axial", "coronal"],
           "text": "Plane C shows what? Options: axial, coronal."}
    with pytest.raises(ValueError, match="q9.*bare capital"):
        rewrite_question(row, "mcq")


def test_vlmevalkit_images_resolve_index_references_to_the_render_bytes(exported):
    root, questions, _ = exported
    bench = root / "data" / "benchmark"
    by_id = questions.set_index("question_id")
    tsvs = _tsvs(root)
    refs = 0
    for name, tsv in tsvs.items():
        if "image" not in tsv.columns:
            continue
        refs += int((tsv["image"].astype(str).str.len() <= 64).sum())
        for row, frames in zip(tsv.to_dict("records"), resolve_images(tsv), strict=True):
            path = bench / by_id.loc[row["question_id"], "image_path"]
            files = sorted(path.glob("frame_*.png")) if path.is_dir() else [path]
            assert frames == [f.read_bytes() for f in files], (name, row["question_id"])
    assert refs > 0
    stack = tsvs["MIS-Ground_3D_MCQ"]["image"].iloc[0]
    assert len(json.loads(stack)) == 4
    assert base64.b64decode(json.loads(stack)[0]).startswith(b"\x89PNG")


def test_vlmevalkit_export_ships_the_3d_classes_launcher_and_config(exported):
    root, _, _ = exported
    folder = export_paths(root)["vlmevalkit"]
    config = json.loads((folder / "config.json").read_text())
    assert {n: c["class"] for n, c in config["data"].items()} == \
        {n: spec[2] for n, spec in FILES.items()}
    assert config["model"]["Qwen3-VL-8B-Instruct"]["class"] == "Qwen3VLChat"
    module = ast.parse((folder / "mis_ground_vlmeval.py").read_text())
    classes = {n.name for n in module.body if isinstance(n, ast.ClassDef)}
    assert {"MISGroundVideoMCQ", "MISGroundVideoYORN"} <= classes
    ast.parse((folder / "run_mis_ground.py").read_text())
    assert "exact_matching" in (folder / "README.md").read_text()
