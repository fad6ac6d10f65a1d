"""Exports of the benchmark: a Hugging Face ``datasets`` parquet dataset and a VLMEvalKit TSV.

Both are written under ``data/benchmark/export/`` from ``questions.parquet`` and the rendered
images, one row per question, in the order of ``questions.parquet``:

- ``hf/data/test-NNNNN-of-NNNNN.parquet`` + ``hf/README.md`` (a dataset card whose
  ``configs`` let ``datasets.load_dataset(<folder>)`` find the files): every question
  column, ``image`` (:class:`datasets.Image`, the PNG bytes of a 2D render; null for 3D and
  text-only questions) and ``frames`` (a list of images, the frames of a 3D stack). The
  same image appears on many rows; the image columns are dictionary-encoded in each row
  group, so every image is stored once per row group instead of once per question.
- ``MIS-Ground.tsv``: VLMEvalKit's layout: ``index``, ``image`` (base64 PNG; a stack is a
  JSON list of base64 frames; a row whose image already appeared holds the ``index`` of
  that row instead, as VLMEvalKit's loaders resolve), ``question``, ``answer``, plus
  ``question_id``, ``category`` (the family), the factor columns and ``choices``
  (a JSON list). Text-only questions have no image, which VLMEvalKit's image loaders do
  not accept, so they go to ``MIS-Ground_text_only.tsv`` (same columns, empty ``image``);
  ``index`` is the row number in ``questions.parquet`` across both files.

:func:`check_export` loads both back (the parquet with ``datasets.load_dataset("parquet")``)
and compares every row and every image byte with ``questions.parquet`` and the files.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from mislib.paths import project_paths

EXPORT_DIR = "export"
HF_DIR = "hf"
TSV_NAME = "MIS-Ground.tsv"
TSV_TEXT_NAME = "MIS-Ground_text_only.tsv"
TSV_FACTORS = ("family", "form", "terminology", "ablation", "modality", "source", "plane",
               "dims", "convention", "prompt", "background", "component_a", "component_b",
               "letter_a", "letter_b", "axis", "direction", "volume_id", "render_id",
               "image_path", "n_frames")
# VLMEvalKit treats an image field of at most this many characters as another row's index.
_TSV_REF_MAX = 64


#: Columns of the exported dataset, in order, with their types other than plain strings.
_EXPORT_COLUMNS = ("question_id", "render_id", "volume_id", "slice_id", "source", "modality",
                   "plane", "dims", "convention", "prompt", "background", "terminology",
                   "form", "family", "ablation", "component_a", "component_b", "name_a",
                   "name_b", "letter_a", "letter_b", "axis", "direction", "separation_mm",
                   "text", "answer", "choices", "image_path", "n_frames", "relation_id",
                   "image", "frames")


def _features():
    import datasets

    typed = {"separation_mm": datasets.Value("float64"),
             "choices": datasets.List(datasets.Value("string")),
             "n_frames": datasets.Value("int64"), "image": datasets.Image(),
             "frames": datasets.List(datasets.Image())}
    return datasets.Features({name: typed.get(name, datasets.Value("string"))
                              for name in _EXPORT_COLUMNS})


class _ImageCache:
    """PNG bytes of renders, read once each (a small LRU: rows come grouped by render)."""

    def __init__(self, benchmark_dir: Path, size: int = 64):
        self.dir = benchmark_dir
        self.size = size
        self._cache: OrderedDict[str, list[bytes]] = OrderedDict()

    def frames(self, image_path: str, n_frames: int) -> list[bytes]:
        """The PNG bytes of a 2D image (one item) or of a stack's frames, in frame order."""
        if image_path in self._cache:
            self._cache.move_to_end(image_path)
            return self._cache[image_path]
        path = self.dir / image_path
        if path.is_dir():
            files = sorted(path.glob("frame_*.png"))
            if len(files) != n_frames:
                raise ValueError(f"{path}: {len(files)} frames on disk, questions.parquet "
                                 f"says n_frames={n_frames}")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"questions.parquet names image {image_path!r}, but {path} "
                                    "does not exist")
        data = [f.read_bytes() for f in files]
        self._cache[image_path] = data
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return data


def _is_stack(row: Mapping) -> bool:
    return row["dims"] == "3d"


def _none(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else v


def _dataset_card(n_rows: int, files: list[str]) -> str:
    files_yaml = "\n".join(f"      - {f}" for f in files)
    return f"""---
configs:
  - config_name: default
    data_files:
      - split: test
        path:
{files_yaml}
---
# MIS-Ground (exported by `make export`)

{n_rows} spatial-grounding questions on rendered CT/MRI slices and slice stacks. One row per
question: `text` is the full prompt (with its answer instruction), `answer` the ground
truth (`True`/`False`, a direction term or a plane name), `choices` the valid options.
`image` holds the 2D render, `frames` the frames of a 3D stack (played as a video); both are
empty for text-only questions. The factor columns (`modality`, `plane`, `dims`,
`convention`, `prompt`, `background`, `terminology`, `form`, `family`, `ablation`) describe
the factorial design.

```python
import datasets
ds = datasets.load_dataset("parquet", data_files="data/*.parquet", split="train")
```
"""


def export_paths(root: str | os.PathLike | None = None) -> dict[str, Path]:
    base = project_paths(root).benchmark / EXPORT_DIR
    return {"dir": base, "hf": base / HF_DIR, "tsv": base / TSV_NAME,
            "tsv_text": base / TSV_TEXT_NAME}


def export_benchmark(profile: str = "demo", root: str | os.PathLike | None = None,
                     rows_per_shard: int = 20_000, rows_per_group: int = 256,
                     progress: bool = True) -> dict[str, Any]:
    """Write the HF parquet dataset and the VLMEvalKit TSV of ``questions.parquet``.

    Parameters
    ----------
    profile : str
        Recorded in the dataset card only; the export reads the files under ``root``.
    rows_per_shard, rows_per_group : int
        Rows per parquet file and per row group (images are deduplicated within a group).

    Returns
    -------
    dict with ``rows``, ``hf_files`` (paths), ``tsv`` (path) and ``bytes`` (total size).
    """
    paths = project_paths(root)
    qfile = paths.benchmark / "questions.parquet"
    if not qfile.is_file():
        raise FileNotFoundError(f"no {qfile}: run stage 03 (`python -m mislib questions`) first")
    questions = pd.read_parquet(qfile)
    out = export_paths(root)
    data_dir = out["hf"] / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for old in data_dir.glob("*.parquet"):
        old.unlink()
    features = _features()
    schema = features.arrow_schema
    images = _ImageCache(paths.benchmark)
    n = len(questions)
    n_shards = max(1, -(-n // rows_per_shard))
    hf_files = []
    records = questions.to_dict("records")
    bar = tqdm(total=n, desc="export", unit="question", disable=not progress)

    tsv_tmp = {k: out[k].with_suffix(".tsv.tmp") for k in ("tsv", "tsv_text")}
    first_index: dict[str, int] = {}
    tsv_columns = ["index", "image", "question", "answer", "question_id", "category",
                   "choices", *[c for c in TSV_FACTORS if c != "family"]]
    with (open(tsv_tmp["tsv"], "w", newline="", encoding="utf-8") as fh_img,
          open(tsv_tmp["tsv_text"], "w", newline="", encoding="utf-8") as fh_text):
        writers = {k: csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_MINIMAL,
                                 lineterminator="\n")
                   for k, fh in (("tsv", fh_img), ("tsv_text", fh_text))}
        for w in writers.values():
            w.writerow(tsv_columns)
        for shard in range(n_shards):
            name = f"test-{shard:05d}-of-{n_shards:05d}.parquet"
            target = data_dir / name
            writer = pq.ParquetWriter(
                target, schema, compression="zstd", use_dictionary=True,
                # let a row group's dictionary hold its distinct images (default 1 MiB)
                dictionary_pagesize_limit=1 << 30)
            try:
                lo, hi = shard * rows_per_shard, min(n, (shard + 1) * rows_per_shard)
                for start in range(lo, hi, rows_per_group):
                    batch = records[start:min(hi, start + rows_per_group)]
                    cols: dict[str, list] = {f: [] for f in features}
                    for i, row in enumerate(batch, start=start):
                        image, frames, b64 = None, [], ""
                        path = _none(row["image_path"])
                        if path is not None:
                            data = images.frames(path, int(row["n_frames"]))
                            if _is_stack(row):
                                frames = [{"bytes": d, "path": None} for d in data]
                            else:
                                image = {"bytes": data[0], "path": None}
                            if path in first_index:
                                b64 = str(first_index[path])
                            else:
                                first_index[path] = i
                                enc = [base64.b64encode(d).decode("ascii") for d in data]
                                b64 = json.dumps(enc) if _is_stack(row) else enc[0]
                        for f in features:
                            if f == "image":
                                cols[f].append(image)
                            elif f == "frames":
                                cols[f].append(frames)
                            elif f == "choices":
                                cols[f].append([str(c) for c in row["choices"]])
                            else:
                                cols[f].append(_none(row[f]))
                        tsv = writers["tsv" if path is not None else "tsv_text"]
                        tsv.writerow([i, b64, row["text"], row["answer"], row["question_id"],
                                      row["family"], json.dumps([str(c) for c in row["choices"]]),
                                      *["" if _none(row[c]) is None else row[c]
                                        for c in tsv_columns[7:]]])
                    writer.write_table(pa.Table.from_pydict(cols, schema=schema),
                                       row_group_size=rows_per_group)
                    bar.update(len(batch))
            finally:
                writer.close()
            hf_files.append(target)
    bar.close()
    for k, tmp in tsv_tmp.items():
        os.replace(tmp, out[k])
    rel = [f"data/{p.name}" for p in hf_files]
    (out["hf"] / "README.md").write_text(_dataset_card(n, rel))
    size = sum(p.stat().st_size for p in [*hf_files, out["tsv"], out["tsv_text"]])
    return {"rows": n, "hf_files": hf_files, "tsv": out["tsv"], "tsv_text": out["tsv_text"],
            "bytes": size, "profile": str(profile)}


def _tsv_images(tsv: pd.DataFrame) -> list[list[bytes]]:
    """Decode the TSV's image field per row, resolving index references like VLMEvalKit."""
    raw = dict(zip(tsv["index"].astype(str), tsv["image"].fillna("").astype(str), strict=True))
    out = []
    for idx in tsv["index"].astype(str):
        value = raw[idx]
        if value and len(value) <= _TSV_REF_MAX:
            value = raw[value]
            if len(value) <= _TSV_REF_MAX:
                raise ValueError(f"TSV row {idx}: image reference to a row without an image")
        if not value:
            out.append([])
        elif value.startswith("["):
            out.append([base64.b64decode(v) for v in json.loads(value)])
        else:
            out.append([base64.b64decode(value)])
    return out


def check_export(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Load both exports back and compare them with ``questions.parquet`` and the images.

    The parquet dataset is loaded with ``datasets.load_dataset("parquet", ...)``; every row's
    id, text, answer and choices and every image's bytes must match. Raises ``AssertionError``
    naming the first difference; returns counts on success.
    """
    import datasets

    paths = project_paths(root)
    out = export_paths(root)
    questions = pd.read_parquet(paths.benchmark / "questions.parquet")
    files = sorted(str(p) for p in (out["hf"] / "data").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no exported parquet files under {out['hf']}; run the export")
    # A throw-away cache: the check must read the files, not an earlier load of them.
    with tempfile.TemporaryDirectory(prefix="mis-ground-export-check-") as cache:
        ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
        raw = ds.cast_column("image", datasets.Image(decode=False)).cast_column(
            "frames", datasets.List(datasets.Image(decode=False)))
        hf_rows = raw.to_list()
    assert len(hf_rows) == len(questions), \
        f"HF export has {len(hf_rows)} rows, questions {len(questions)}"
    read = lambda p: pd.read_csv(p, sep="\t", keep_default_na=False, dtype=str)  # noqa: E731
    tsv_img, tsv_text = read(out["tsv"]), read(out["tsv_text"])
    imgs = dict(zip(tsv_img["index"], _tsv_images(tsv_img), strict=True))
    assert (tsv_text["image"] == "").all(), "text-only TSV rows carry images"
    tsv = pd.concat([tsv_img, tsv_text], ignore_index=True)
    tsv = tsv.sort_values("index", key=lambda s: s.astype(int)).reset_index(drop=True)
    assert len(tsv) == len(questions), f"TSVs have {len(tsv)} rows, questions {len(questions)}"
    assert tsv["index"].astype(int).tolist() == list(range(len(tsv))), "TSV index is not 0..n-1"
    tsv_imgs = [imgs.get(idx, []) for idx in tsv["index"]]
    images = _ImageCache(paths.benchmark, size=256)
    n_images = n_frames = 0
    for i, (q, hf) in enumerate(zip(questions.to_dict("records"), hf_rows, strict=True)):
        for col in ("question_id", "text", "answer", "family", "form"):
            assert hf[col] == q[col], f"HF row {i}: {col} {hf[col]!r} != {q[col]!r}"
        assert hf["choices"] == [str(c) for c in q["choices"]], f"HF row {i}: choices differ"
        assert tsv.at[i, "question_id"] == q["question_id"], f"TSV row {i}: question_id differs"
        assert tsv.at[i, "question"] == q["text"], f"TSV row {i}: question text differs"
        assert tsv.at[i, "answer"] == q["answer"], f"TSV row {i}: answer differs"
        path = _none(q["image_path"])
        expected = [] if path is None else images.frames(path, int(q["n_frames"]))
        got = ([f["bytes"] for f in hf["frames"]] if q["dims"] == "3d"
               else [] if hf["image"] is None else [hf["image"]["bytes"]])
        assert got == expected, f"HF row {i} ({q['question_id']}): image bytes differ"
        assert tsv_imgs[i] == expected, f"TSV row {i} ({q['question_id']}): image bytes differ"
        n_images += int(bool(expected)) if q["dims"] == "2d" else 0
        n_frames += len(expected) if q["dims"] == "3d" else 0
    return {"rows": len(hf_rows), "rows_with_image": n_images, "stack_frames": n_frames,
            "hf_files": len(files), "tsv_rows": len(tsv_img), "tsv_text_rows": len(tsv_text)}
