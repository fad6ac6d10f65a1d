"""mislib.export: the HF ``datasets`` parquet export and the VLMEvalKit TSV."""

from __future__ import annotations

import base64
import json

import datasets
import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_questions import make_inputs

from mislib.export import check_export, export_paths
from mislib.questions import export, generate


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    make_inputs(root, conventions=("standard", "storage"), prompts=("none", "mask"))
    questions = generate("demo", root=root, force=True)
    info = export("demo", root=root)
    return root, questions, info


def test_hf_export_loads_with_datasets_and_matches_questions(exported):
    root, questions, info = exported
    assert info["rows"] == len(questions)
    ds = datasets.load_dataset("parquet", data_files=[str(p) for p in info["hf_files"]],
                               split="train", cache_dir=str(root / "hf-cache"))
    assert ds["question_id"] == questions["question_id"].tolist()
    assert ds["answer"] == questions["answer"].tolist()
    first_2d = questions.index[questions.dims.eq("2d") & questions.image_path.notna()][0]
    image = ds[int(first_2d)]["image"]
    assert image.size == (8, 8)  # decoded to a PIL image
    first_3d = questions.index[questions.dims.eq("3d") & questions.image_path.notna()][0]
    row = ds[int(first_3d)]
    assert row["image"] is None and len(row["frames"]) == questions.at[first_3d, "n_frames"] == 4
    text_only = questions.index[questions.ablation.eq("text_only")][0]
    assert ds[int(text_only)]["image"] is None and ds[int(text_only)]["frames"] == []


def test_check_export_compares_every_row_and_image(exported):
    root, questions, _ = exported
    summary = check_export(root)
    assert summary["rows"] == len(questions)
    n_2d = int((questions.dims.eq("2d") & questions.image_path.notna()).sum())
    assert summary["rows_with_image"] == n_2d > 0
    assert summary["stack_frames"] == int(questions.loc[questions.dims.eq("3d"), "n_frames"].sum())


def test_repeated_images_are_stored_once(exported):
    root, questions, info = exported
    raw_bytes = sum((root / "data" / "benchmark" / p).stat().st_size if p.endswith(".png")
                    else sum(f.stat().st_size for f in (root / "data" / "benchmark" / p).iterdir())
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


def test_vlmevalkit_tsv_has_base64_images_and_index_references(exported):
    root, questions, _ = exported
    paths = export_paths(root)
    tsv = pd.read_csv(paths["tsv"], sep="\t", keep_default_na=False, dtype=str)
    text = pd.read_csv(paths["tsv_text"], sep="\t", keep_default_na=False, dtype=str)
    assert len(tsv) + len(text) == len(questions)
    assert set(text["question_id"]) == set(questions.loc[questions.render_id.isna(), "question_id"])
    assert list(tsv.columns[:4]) == ["index", "image", "question", "answer"]
    long = tsv[tsv["image"].str.len() > 64]
    refs = tsv[tsv["image"].str.len() <= 64]
    assert len(long) == questions["image_path"].nunique() and len(refs) > 0
    assert set(refs["image"]) <= set(long["index"])
    png = base64.b64decode(long[long["dims"] == "2d"]["image"].iloc[0])
    assert png.startswith(b"\x89PNG")
    frames = json.loads(long[long["dims"] == "3d"]["image"].iloc[0])
    assert len(frames) == 4 and base64.b64decode(frames[0]).startswith(b"\x89PNG")
    # the text round-trips through the TSV, newlines included
    merged = tsv.merge(questions, on="question_id")
    assert (merged["question"] == merged["text"]).all()


def test_no_prompt_questions_keep_their_level_and_letter_free_text(exported):
    root, questions, info = exported
    bare = questions[questions["prompt"] == "none"]
    assert len(bare) > 0
    ds = datasets.load_dataset("parquet", data_files=[str(p) for p in info["hf_files"]],
                               split="train", cache_dir=str(root / "hf-cache")).to_pandas()
    rows = ds[ds["prompt"] == "none"]
    assert rows["question_id"].tolist() == bare["question_id"].tolist()
    assert rows["letter_a"].isna().all() and (rows["text"] == bare["text"].values).all()
    tsv = pd.read_csv(export_paths(root)["tsv"], sep="\t", keep_default_na=False, dtype=str)
    tsv_bare = tsv[tsv["prompt"] == "none"]
    assert set(tsv_bare["question_id"]) == set(bare["question_id"])
    assert (tsv_bare["letter_a"] == "").all() and (tsv_bare["background"] == "scan").all()


def test_export_without_questions_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="questions"):
        export("demo", root=tmp_path)
