"""The Hugging Face ``datasets`` export: typed parquet files and a dataset card with configs.

Layout under ``benchmark/export/hf/`` (``data/README.md``, benchmark/export)::

    README.md                                   dataset card; its ``configs`` name the files
    data/<ablation>/<dims>/<family>-<input>-NNNNN-of-NNNNN.parquet

One config per (ablation, dims) — ``none_2d``, ``blank_3d``, ``text_only_2d``, ... — and
``all`` (the default) over every file, so ``datasets.load_dataset(folder, "blank_3d",
split="test")`` loads one cell of the design. Every file carries every column of
``questions.parquet`` (the factors are columns) plus ``image`` (:class:`datasets.Image`,
the PNG of a 2D render) and ``frames`` (a list of :class:`datasets.Image`, the frames of a
3D stack in frame order); both are empty for a text-only question. The features are stored
in each file's arrow schema, so the types come back without a loading script.

The same render is asked about by many questions; each row group dictionary-encodes the
image columns, so a render is stored once per row group instead of once per question.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from tqdm import tqdm

from mislib.export._common import ImageCache, input_kind, none, slug

SPLIT = "test"
DEFAULT_CONFIG = "all"
#: The columns the export adds to those of ``questions.parquet``.
IMAGE_COLUMNS = ("image", "frames")


def question_schema(questions: pd.DataFrame) -> pa.Schema:
    """Arrow types of the question columns, as pyarrow infers them from the table.

    Columns that are null on every row get ``string`` (a later, fuller table then keeps
    the same type); ``choices`` is a list of strings.
    """
    sample = questions.drop(columns=[c for c in IMAGE_COLUMNS if c in questions])
    schema = pa.Schema.from_pandas(sample, preserve_index=False)
    fields = []
    for field in schema:
        if field.name == "choices":
            field = pa.field("choices", pa.list_(pa.string()))
        elif pa.types.is_null(field.type):
            field = pa.field(field.name, pa.string())
        fields.append(field)
    return pa.schema(fields)


def features_for(questions: pd.DataFrame):
    """The :class:`datasets.Features` of the export: the question columns, ``image``, ``frames``."""
    import datasets

    features = datasets.Features.from_arrow_schema(question_schema(questions))
    features["image"] = datasets.Image()
    features["frames"] = datasets.List(datasets.Image())
    return features


def config_name(ablation: Any, dims: Any) -> str:
    """The config of one (ablation, dims) cell, e.g. ``text_only_2d``."""
    return f"{slug(ablation)}_{slug(dims)}"


def _file_key(row: dict) -> tuple[str, str, str, str]:
    return (slug(row["ablation"]), slug(row["dims"]), slug(row["family"]), input_kind(row))


def _question_arrays(batch: pd.DataFrame, schema: pa.Schema) -> list[pa.Array]:
    arrays = []
    for field in schema:
        values = batch[field.name].tolist()
        if field.name == "choices":
            values = [None if v is None else [str(c) for c in v] for v in values]
        else:
            values = [none(v) for v in values]
            if isinstance(field.type, pa.ListType):
                values = [None if v is None else list(v) for v in values]
        arrays.append(pa.array(values, type=field.type))
    return arrays


def _card(n_rows: int, configs: dict[str, list[str]], profile: str,
          columns: Sequence[str]) -> str:
    front = {"configs": [
        {"config_name": name, **({"default": True} if name == DEFAULT_CONFIG else {}),
         "data_files": [{"split": SPLIT, "path": files}]}
        for name, files in configs.items()]}
    rows = "\n".join(f"| `{name}` | {len(files)} |" for name, files in configs.items())
    return f"""---
{yaml.safe_dump(front, sort_keys=False).rstrip()}
---
# MIS-Ground (exported by `make export`, profile `{profile}`)

{n_rows} spatial-grounding questions on rendered CT/MRI slices and slice stacks, one row per
question. `text` is the full prompt (with its answer instruction), `answer` the ground truth
(`True`/`False`, a direction term or a plane name), `choices` the valid options. `image`
holds the 2D render, `frames` the frames of a 3D stack in frame order (played as a video);
both are empty for text-only questions. The factors of the design are columns:
{", ".join(f"`{c}`" for c in columns)}.

| config | files |
|---|---|
{rows}

Each config but `{DEFAULT_CONFIG}` is one (ablation, dims) cell; `{DEFAULT_CONFIG}` holds every question.

```python
import datasets
ds = datasets.load_dataset("path/to/hf", "blank_2d", split="{SPLIT}")
ds[0]["image"]          # a PIL image; ds[i]["frames"] is a list of them for a 3D stack
```

Score answers with mislib's parser (`mislib.answers.parse_answer(raw_text, row)`), which
reads the row's `family`, `form`, `terminology`, `choices`, `letter_*` and `name_*`.
"""


def write_hf(questions: pd.DataFrame, benchmark_dir: Path, out_dir: Path, profile: str = "demo",
             rows_per_shard: int = 20_000, rows_per_group: int = 256,
             progress: bool = True) -> dict[str, Any]:
    """Write the parquet files and the dataset card of ``questions`` under ``out_dir``.

    Parameters
    ----------
    questions : stage 03's table (any extra columns are exported as they are).
    benchmark_dir : the folder the questions' ``image_path`` is relative to.
    rows_per_shard, rows_per_group : rows per parquet file and per row group (images are
        deduplicated within a row group).

    Returns
    -------
    dict with ``files`` (paths), ``configs`` (name -> paths relative to ``out_dir``) and
    ``rows``.
    """
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for old in data_dir.rglob("*.parquet"):
        old.unlink()
    features = features_for(questions)
    schema = features.arrow_schema
    qschema = question_schema(questions)
    image_type, frames_type = schema.field("image").type, schema.field("frames").type
    images = ImageCache(benchmark_dir)
    records = questions.to_dict("records")
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(records):
        groups.setdefault(_file_key(row), []).append(i)

    files, configs = [], {DEFAULT_CONFIG: []}
    bar = tqdm(total=len(records), desc="export hf", unit="question", disable=not progress)
    for (ablation, dims, family, kind), rows in groups.items():
        n_shards = max(1, -(-len(rows) // rows_per_shard))
        for shard in range(n_shards):
            rel = f"data/{ablation}/{dims}/{family}-{kind}-{shard:05d}-of-{n_shards:05d}.parquet"
            target = out_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            part = rows[shard * rows_per_shard:(shard + 1) * rows_per_shard]
            # let a row group's dictionary hold its distinct images (default 1 MiB)
            with pq.ParquetWriter(target, schema, compression="zstd", use_dictionary=True,
                                  dictionary_pagesize_limit=1 << 30) as writer:
                for start in range(0, len(part), rows_per_group):
                    idx = part[start:start + rows_per_group]
                    batch = questions.iloc[idx]
                    image, frames = [], []
                    for i in idx:
                        data = images.of_row(records[i])
                        stack = kind == "video"
                        image.append({"bytes": data[0], "path": None}
                                     if data and not stack else None)
                        frames.append([{"bytes": d, "path": None} for d in data] if stack else [])
                    arrays = [*_question_arrays(batch, qschema),
                              pa.array(image, type=image_type), pa.array(frames, type=frames_type)]
                    writer.write_table(pa.Table.from_arrays(arrays, schema=schema),
                                       row_group_size=rows_per_group)
                    bar.update(len(idx))
            files.append(target)
            configs[DEFAULT_CONFIG].append(rel)
            configs.setdefault(config_name(ablation, dims), []).append(rel)
    bar.close()
    factor_columns = [c for c in questions.columns if c not in ("question_id", "text", "answer",
                                                                   "choices")]
    (out_dir / "README.md").write_text(_card(len(records), configs, profile, factor_columns))
    return {"files": files, "configs": configs, "rows": len(records)}


def _same(a: Any, b: Any) -> bool:
    a, b = none(a), none(b)
    if isinstance(a, np.ndarray | list | tuple) or isinstance(b, np.ndarray | list | tuple):
        return [str(x) for x in (a if a is not None else [])] == \
            [str(x) for x in (b if b is not None else [])]
    if isinstance(a, float) and isinstance(b, float):
        return bool(np.isclose(a, b))
    return a == b


def check_hf(questions: pd.DataFrame, benchmark_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Load every config with ``datasets.load_dataset(out_dir, name)`` and compare it with
    ``questions`` and the render files: every column of every row, every image byte.

    Raises ``AssertionError`` naming the config, question and column of the first
    difference; returns counts on success.
    """
    import datasets

    card = (out_dir / "README.md").read_text()
    names = [c["config_name"] for c in yaml.safe_load(card.split("---")[1])["configs"]]
    by_id = {q["question_id"]: q for q in questions.to_dict("records")}
    images = ImageCache(benchmark_dir, size=256)
    counts: dict[str, int] = {}
    n_images = n_frames = 0
    # A throw-away cache: the check must read the files, not an earlier load of them.
    with tempfile.TemporaryDirectory(prefix="mis-ground-hf-check-") as cache:
        for name in names:
            ds = datasets.load_dataset(str(out_dir), name, split=SPLIT, cache_dir=cache)
            assert isinstance(ds.features["image"], datasets.Image), f"{name}: image not typed"
            assert isinstance(ds.features["frames"], datasets.List) and isinstance(
                ds.features["frames"].feature, datasets.Image), f"{name}: frames not typed"
            raw = ds.cast_column("image", datasets.Image(decode=False)).cast_column(
                "frames", datasets.List(datasets.Image(decode=False)))
            counts[name] = len(raw)
            for row in raw:
                qid = row["question_id"]
                assert qid in by_id, f"config {name}: question {qid} not in questions.parquet"
                q = by_id[qid]
                if name != DEFAULT_CONFIG:
                    assert config_name(q["ablation"], q["dims"]) == name, \
                        f"config {name}: question {qid} belongs to another config"
                for col, value in q.items():
                    assert _same(row[col], value), \
                        f"config {name}, question {qid}: {col} {row[col]!r} != {value!r}"
                expected = images.of_row(q)
                got = ([f["bytes"] for f in row["frames"]] if input_kind(q) == "video"
                       else [] if row["image"] is None else [row["image"]["bytes"]])
                assert got == expected, f"config {name}, question {qid}: image bytes differ"
                if name == DEFAULT_CONFIG:
                    n_images += int(input_kind(q) == "image")
                    n_frames += len(expected) if input_kind(q) == "video" else 0
    assert counts[DEFAULT_CONFIG] == len(questions), \
        f"config {DEFAULT_CONFIG} has {counts[DEFAULT_CONFIG]} rows, questions {len(questions)}"
    cells = sum(v for k, v in counts.items() if k != DEFAULT_CONFIG)
    assert cells == len(questions), f"the cell configs hold {cells} rows, questions {len(questions)}"
    return {"rows": len(questions), "configs": counts, "rows_with_image": n_images,
            "stack_frames": n_frames}


def hf_files(out_dir: str | os.PathLike) -> list[Path]:
    """The parquet files of an HF export folder, sorted."""
    return sorted(Path(out_dir, "data").rglob("*.parquet"))
