"""Exports of the benchmark that the evaluation harnesses load and score as they are.

``make export`` (:func:`mislib.questions.export`) writes, under ``data/benchmark/export/``:

- ``hf/`` — a Hugging Face ``datasets`` folder: typed parquet files and a dataset card whose
  ``configs`` make each (ablation, dims) cell a config (:mod:`mislib.export.hf`);
- ``lmms_eval/`` — an lmms-eval task group ``mis_ground`` over those files, scored with
  mislib's parser (``--include_path``; :mod:`mislib.export.lmms_eval`);
- ``vlmevalkit/`` — TSVs in VLMEvalKit's stock multiple-choice and yes/no formats, plus our
  dataset classes for the 3D stacks (:mod:`mislib.export.vlmevalkit`).

What each needs from its consumer is in ``data/README.md``; :func:`check_export` loads the
HF configs with ``datasets`` and the TSVs as VLMEvalKit reads them, and compares every row
and image byte with ``questions.parquet`` and the render files. The lmms-eval task is tested
with lmms-eval itself (``tests/test_export_lmms.py``, in the venv ``make env-lmms`` builds).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mislib.config import stage_params
from mislib.export._common import read_questions
from mislib.export.hf import check_hf, write_hf
from mislib.export.lmms_eval import GROUP, write_lmms_eval
from mislib.export.vlmevalkit import check_vlmevalkit, write_vlmevalkit
from mislib.paths import project_paths

EXPORT_DIR = "export"
#: Files of an earlier layout of the export, removed when the export is written again.
_LEGACY = ("MIS-Ground.tsv", "MIS-Ground_text_only.tsv")


def export_paths(root: str | os.PathLike | None = None) -> dict[str, Path]:
    """The export folders: ``dir`` and its ``hf``, ``lmms_eval`` and ``vlmevalkit`` parts."""
    base = project_paths(root).benchmark / EXPORT_DIR
    return {"dir": base, "hf": base / "hf", "lmms_eval": base / "lmms_eval",
            "vlmevalkit": base / "vlmevalkit"}


def export_benchmark(profile: str = "demo", root: str | os.PathLike | None = None,
                     rows_per_shard: int = 20_000, rows_per_group: int = 256,
                     progress: bool = True) -> dict[str, Any]:
    """Write the three exports of ``questions.parquet``.

    Parameters
    ----------
    profile : its ``[inference]`` table gives the lmms-eval tasks their trials per question
        (``n_trials``) and generation budget (``max_new_tokens``).
    rows_per_shard, rows_per_group : rows per parquet file and per row group.

    Returns
    -------
    dict with ``rows``, ``hf`` / ``lmms_eval`` / ``vlmevalkit`` (what each writer returned),
    ``bytes`` (total size of the export) and ``profile``.
    """
    paths = project_paths(root)
    questions = read_questions(root)
    out = export_paths(root)
    for name in _LEGACY:
        (out["dir"] / name).unlink(missing_ok=True)
    inference = stage_params(profile, "inference")
    hf = write_hf(questions, paths.benchmark, out["hf"], profile=str(profile),
                  rows_per_shard=rows_per_shard, rows_per_group=rows_per_group,
                  progress=progress)
    lmms = write_lmms_eval(questions, hf["files"], out["hf"], out["lmms_eval"],
                           n_trials=int(inference.get("n_trials", 1)),
                           max_new_tokens=int(inference.get("max_new_tokens", 512)),
                           profile=str(profile))
    vlm = write_vlmevalkit(questions, paths.benchmark, out["vlmevalkit"], progress=progress)
    size = sum(p.stat().st_size for p in out["dir"].rglob("*") if p.is_file())
    return {"rows": len(questions), "hf": hf, "lmms_eval": lmms, "vlmevalkit": vlm,
            "hf_files": hf["files"], "bytes": size, "profile": str(profile), "dir": out["dir"]}


def check_export(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Load the exports back and compare them with ``questions.parquet`` and the renders.

    Every HF config is loaded with ``datasets.load_dataset(folder, name)``; every TSV is
    read as VLMEvalKit reads it and checked against its loader rules; the lmms-eval folder
    must hold the group and one task file per task. Raises ``AssertionError`` naming the
    first difference; returns counts on success.
    """
    paths = project_paths(root)
    out = export_paths(root)
    questions = read_questions(root)
    if not (out["hf"] / "README.md").is_file():
        raise FileNotFoundError(f"no export under {out['dir']}: run `make export` first")
    summary = check_hf(questions, paths.benchmark, out["hf"])
    summary.update(check_vlmevalkit(questions, paths.benchmark, out["vlmevalkit"]))
    group = out["lmms_eval"] / f"{GROUP}.yaml"
    assert group.is_file(), f"no lmms-eval group file {group}"
    tasks = [ln.strip()[2:] for ln in group.read_text().splitlines()
             if ln.startswith("  - ") and ln.strip()[2:].startswith(f"{GROUP}_")]
    for task in tasks:
        assert (out["lmms_eval"] / f"{task}.yaml").is_file(), f"lmms-eval task {task} has no file"
    summary["lmms_eval_tasks"] = tasks
    return summary
