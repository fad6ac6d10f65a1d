"""Exports of the benchmark that the evaluation harnesses load and score as they are.

``make export`` (:func:`mislib.questions.export`) writes, under ``data/benchmark/export/``:

- ``hf/`` — a Hugging Face ``datasets`` folder: typed parquet files and a dataset card whose
  ``configs`` make each (ablation, dims) cell a config (:mod:`mislib.export.hf`);
- ``lmms_eval/`` — an lmms-eval task group ``mis_ground`` over those files, scored with
  mislib's parser (``--include_path``; :mod:`mislib.export.lmms_eval`);
- ``vlmevalkit/`` — TSVs in VLMEvalKit's stock multiple-choice and yes/no formats, plus our
  dataset classes for the 3D stacks (:mod:`mislib.export.vlmevalkit`).

The export is a stage of its own (:class:`mislib.stage.StageRun`, stamp
``export/.export.stage.json``): its inputs are ``questions.parquet``, every render file the
questions name and the export code itself, so a changed table or image makes it stale and
an unchanged one is read back, not written again. The three folders are written aside and
moved in together, the stamp last: an error or a kill while exporting leaves the previous
export (and its stamp) as it was.

What each needs from its consumer is in ``data/README.md``; :func:`check_export` loads the
HF configs with ``datasets`` and the TSVs as VLMEvalKit reads them, and compares every row
and image byte with ``questions.parquet`` and the render files. The lmms-eval task is tested
with lmms-eval itself (``tests/test_export_lmms.py``, in the venv ``make env-lmms`` builds).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from mislib.config import config_hash, profile_name, read_stamp, stage_params
from mislib.export._common import none, read_questions
from mislib.export.hf import check_hf, write_hf
from mislib.export.lmms_eval import GROUP, write_lmms_eval
from mislib.export.vlmevalkit import check_vlmevalkit, write_vlmevalkit
from mislib.paths import QUESTIONS_FILE, project_paths
from mislib.stage import StageRun, digests_only, input_digests

EXPORT_DIR = "export"
#: The stage's name (its stamp is ``export/.export.stage.json``).
STAGE = "export"
#: What the export wrote, read back when it is fresh (names relative to ``export/``).
SUMMARY_FILE = "export.json"
#: The stage's outputs, relative to ``export/``: replaced together or not at all.
OUTPUTS = ("hf", "lmms_eval", "vlmevalkit", SUMMARY_FILE)
#: Files of an earlier layout of the export, removed when the export is written again.
_LEGACY = ("MIS-Ground.tsv", "MIS-Ground_text_only.tsv")


def export_paths(root: str | os.PathLike | None = None) -> dict[str, Path]:
    """The export folders: ``dir`` and its ``hf``, ``lmms_eval`` and ``vlmevalkit`` parts."""
    base = project_paths(root).benchmark / EXPORT_DIR
    return {"dir": base, "hf": base / "hf", "lmms_eval": base / "lmms_eval",
            "vlmevalkit": base / "vlmevalkit"}


def render_files(questions: pd.DataFrame, benchmark_dir: Path) -> list[Path]:
    """The render files the questions name: a 2D image's PNG, every frame of a 3D stack (a
    missing render is listed by its own path, so the stamp records it as missing)."""
    files: list[Path] = []
    for rel in sorted({str(p) for p in questions["image_path"].map(none).dropna()}):
        path = benchmark_dir / rel
        files += sorted(path.glob("frame_*.png")) if path.is_dir() else [path]
    return files


def _code_files() -> Iterable[Path]:
    """The export's own code: its files go into the exports (``vlmeval_dataset.py``, the
    lmms-eval ``utils.py``) or decide their contents, so a new version re-exports."""
    return sorted(Path(__file__).parent.glob("*.py"))


def export_benchmark(profile: str = "demo", root: str | os.PathLike | None = None,
                     rows_per_shard: int = 20_000, rows_per_group: int = 256,
                     progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Write the three exports of ``questions.parquet`` as one stage, unless they are fresh.

    Parameters
    ----------
    profile : its ``[inference]`` table gives the lmms-eval tasks their trials per question
        (``n_trials``) and generation budget (``max_new_tokens``).
    rows_per_shard, rows_per_group : rows per parquet file and per row group.
    force : export again even when the stamp says the exports are fresh (same questions,
        renders, settings and export code).

    Returns
    -------
    dict with ``rows``, ``hf`` / ``lmms_eval`` / ``vlmevalkit`` (what each writer returned,
    paths under ``export/``), ``hf_files``, ``bytes`` (total size of the export),
    ``profile``, ``dir`` and ``reused`` (True when a fresh export was read back).
    """
    paths = project_paths(root)
    questions = read_questions(root)
    out = export_paths(root)
    for name in _LEGACY:
        (out["dir"] / name).unlink(missing_ok=True)
    inference = stage_params(profile, "inference")
    # the files name the profile, not the path of its TOML on this machine
    name = profile_name(profile)
    settings = {"profile": str(profile), "rows_per_shard": int(rows_per_shard),
                "rows_per_group": int(rows_per_group),
                "n_trials": int(inference.get("n_trials", 1)),
                "max_new_tokens": int(inference.get("max_new_tokens", 512))}
    named = {QUESTIONS_FILE: paths.benchmark / QUESTIONS_FILE}
    named.update({f.relative_to(paths.benchmark).as_posix(): f
                  for f in render_files(questions, paths.benchmark)})
    named.update({f"mislib/export/{f.name}": f for f in _code_files()})
    previous = (read_stamp(out["dir"], STAGE) or {}).get("input_files")
    inputs = input_digests(named.values(), previous)
    digests = digests_only(inputs)
    # keyed by names under data/benchmark, so a moved project keeps its stamp
    stamp = {**settings, "inputs": config_hash({name: digests[str(path)]
                                                for name, path in named.items()})}
    run = StageRun(out["dir"], STAGE, stamp, OUTPUTS, inputs)
    if not force and run.fresh():
        return _summary(json.loads((out["dir"] / SUMMARY_FILE).read_text()), out["dir"],
                        reused=True)
    with run:  # written under a staging folder, moved in together, the stamp last
        # the lmms-eval tasks name the HF files by relative paths, the same once moved in
        hf = write_hf(questions, paths.benchmark, run.path("hf"), profile=name,
                      rows_per_shard=rows_per_shard, rows_per_group=rows_per_group,
                      progress=progress)
        lmms = write_lmms_eval(questions, hf["files"], run.path("hf"), run.path("lmms_eval"),
                               n_trials=settings["n_trials"],
                               max_new_tokens=settings["max_new_tokens"], profile=name)
        vlm = write_vlmevalkit(questions, paths.benchmark, run.path("vlmevalkit"),
                               progress=progress)
        record = _record(run.staging, questions, hf, lmms, vlm, name)
        run.path(SUMMARY_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return _summary(record, out["dir"], reused=False)


def _record(staging: Path, questions: pd.DataFrame, hf: dict, lmms: dict, vlm: dict,
            profile: str) -> dict[str, Any]:
    """What the writers returned, as JSON with paths relative to the export folder."""
    def rel(path: Path) -> str:
        return Path(path).relative_to(staging).as_posix()

    size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    return {"rows": len(questions), "profile": profile, "bytes": size,
            "hf": {"files": [rel(f) for f in hf["files"]], "configs": hf["configs"],
                   "rows": hf["rows"]},
            "lmms_eval": {"tasks": lmms["tasks"], "n_trials": lmms["n_trials"]},
            "vlmevalkit": {"files": {k: rel(f) for k, f in vlm["files"].items()},
                           "rows": vlm["rows"]}}


def _summary(record: dict[str, Any], base: Path, reused: bool) -> dict[str, Any]:
    """:func:`export_benchmark`'s result from the export's record (paths under ``base``)."""
    hf_files = [base / f for f in record["hf"]["files"]]
    return {"rows": record["rows"], "profile": record["profile"], "bytes": record["bytes"],
            "dir": base, "reused": reused, "hf_files": hf_files,
            "hf": {**record["hf"], "files": hf_files},
            "lmms_eval": {**record["lmms_eval"], "dir": base / "lmms_eval"},
            "vlmevalkit": {"files": {k: base / f for k, f in
                                     record["vlmevalkit"]["files"].items()},
                           "rows": record["vlmevalkit"]["rows"], "dir": base / "vlmevalkit"}}


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
