"""The lmms-eval export: a task group ``mis_ground`` that lmms-eval loads with ``--include_path``.

``make export`` writes ``benchmark/export/lmms_eval/`` (``data/README.md``, benchmark/export)::

    mis_ground.yaml                     the group: its tasks and the metrics pooled over them
    _default_template_yaml              what every task shares (hooks, metrics, trials)
    mis_ground_<family>_<input>.yaml    one task per question family x input path
    utils.py                            the hooks lmms-eval calls; they are this module's

One task per family and input path — ``image`` (a 2D render), ``video`` (a 3D stack, its
frames handed to the model as one video) and ``text`` (the text-only ablation) — so each
question goes through the input path it was built for. A task reads the HF export's parquet
files of its family and input (``../hf/data/...``, relative paths that lmms-eval resolves
against the task file), so the export folder moves as a whole.

Scoring is stage 06's: :func:`process_results` parses every response with mislib's parser
(``mislib.answers``) against the question's valid options and scores it like
``mislib.scoring``; the metrics are
``accuracy`` (unparseable and ambiguous answers count as wrong), ``bayes_at_n`` (Bayes@N
posterior mean, the paper's accuracy), ``bayes_lo95`` / ``bayes_hi95`` (its 95 % credible
interval), and ``unparseable_rate`` / ``ambiguous_rate`` (the parse outcomes counted apart).
The N trials of a question are lmms-eval's ``repeats``; its default filter keeps only the
first response of each document, so the tasks use a filter that keeps all of them
(``all_trials``). Needs mislib importable in lmms-eval's environment (``make env-lmms``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mislib.answers import is_correct, parse_answer
from mislib.bayes import bayes_at_n as _bayes_at_n
from mislib.bayes import bayes_interval
from mislib.export._common import INPUTS, input_kind, slug

GROUP = "mis_ground"
FILTER = "all_trials"
#: Metrics each task reports, and whether the group pools them (linear in the questions).
METRICS = ("accuracy", "bayes_at_n", "bayes_lo95", "bayes_hi95", "unparseable_rate",
           "ambiguous_rate")
POOLED = ("accuracy", "bayes_at_n", "unparseable_rate", "ambiguous_rate")
#: Decoding the tasks ask for: Qwen3-VL Instruct's recommended sampling (override with
#: lmms-eval's ``--gen_kwargs``). ``until`` is empty: the answer line follows any reasoning.
GENERATION = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}


def task_name(family: str, kind: str) -> str:
    """The lmms-eval task of one question family and input path, e.g. ``mis_ground_plane_video``."""
    return f"{GROUP}_{slug(family)}_{kind}"


# ----------------------------------------------------------------------------------------
# Hooks lmms-eval calls (the exported utils.py imports them). ``doc`` is one row of the HF
# export: the question columns, ``image`` (PIL) and ``frames`` (list of PIL).
# ----------------------------------------------------------------------------------------

def doc_to_visual(doc: Mapping[str, Any]) -> list:
    """The model's visual input: ``[image]``, ``[{"type": "video", "url": frames}]`` or ``[]``.

    lmms-eval's chat-mode models turn a dict with ``type: video`` into a video message whose
    frames are the stack's PNGs in frame order (a folder path would be read as a video file).
    """
    kind = input_kind(doc)
    if kind == "image":
        return [doc["image"].convert("RGB")]
    if kind == "video":
        return [{"type": "video", "url": [f.convert("RGB") for f in doc["frames"]]}]
    return []


def doc_to_text(doc: Mapping[str, Any], lmms_eval_specific_kwargs: Mapping | None = None) -> str:
    """The question exactly as stage 04 sends it (stage 03's ``text``, instruction included)."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['text']}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc: Mapping[str, Any]) -> str:
    return str(doc["answer"])


def score_responses(doc: Mapping[str, Any], responses: Sequence[str]) -> dict[str, Any]:
    """Parse and score the N responses to one question as stage 06 does.

    Returns ``{"question_id", "correct": [bool] * N, "status": [str] * N, "parsed": [...]}``.
    """
    parsed, status, correct = [], [], []
    for text in responses:
        value, st = parse_answer(text, doc)
        parsed.append(value)
        status.append(st)
        correct.append(bool(is_correct(value, st, doc)))
    return {"question_id": doc["question_id"], "correct": correct, "status": status,
            "parsed": parsed}


def process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, Any]:
    """lmms-eval's per-document hook: ``results`` are the N trials' responses."""
    scored = score_responses(doc, results)
    return {metric: scored for metric in METRICS}


def _outcomes(items: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The (question, trial) matrix of correct outcomes; every question needs the same N."""
    lengths = {len(it["correct"]) for it in items}
    if len(lengths) != 1:
        raise ValueError(f"questions were answered {sorted(lengths)} times: Bayes@N needs the "
                         "same number of trials for every question")
    return np.array([it["correct"] for it in items], dtype=np.int64)


def _status_rate(items: Sequence[Mapping[str, Any]], status: str) -> float:
    statuses = [s for it in items for s in it["status"]]
    return float(np.mean([s == status for s in statuses])) if statuses else float("nan")


def accuracy(items: Sequence[Mapping[str, Any]]) -> float:
    """Raw accuracy over all (question, trial) answers; unparseable and ambiguous are wrong."""
    return float(_outcomes(items).mean())


def bayes_at_n(items: Sequence[Mapping[str, Any]]) -> float:
    """Bayes@N posterior mean accuracy (``mislib.bayes.bayes_at_n``)."""
    return _bayes_at_n(_outcomes(items))[0]


def bayes_lo95(items: Sequence[Mapping[str, Any]]) -> float:
    """Lower end of the 95 % credible interval of Bayes@N (``mislib.bayes.bayes_interval``)."""
    return bayes_interval(_outcomes(items), level=0.95)[2]


def bayes_hi95(items: Sequence[Mapping[str, Any]]) -> float:
    """Upper end of the 95 % credible interval of Bayes@N."""
    return bayes_interval(_outcomes(items), level=0.95)[3]


def unparseable_rate(items: Sequence[Mapping[str, Any]]) -> float:
    """Share of answers in which no valid option was found."""
    return _status_rate(items, "unparseable")


def ambiguous_rate(items: Sequence[Mapping[str, Any]]) -> float:
    """Share of answers that declared several different options."""
    return _status_rate(items, "ambiguous")


# ----------------------------------------------------------------------------------------
# Writing the task folder
# ----------------------------------------------------------------------------------------

_UTILS = '''"""lmms-eval hooks of the MIS-Ground tasks (written by `make export`).

The logic is mislib's (mislib.export.lmms_eval): mislib must be importable here.
"""

from lmms_eval.api.filter import Filter

from mislib.export.lmms_eval import (  # noqa: F401
    accuracy,
    ambiguous_rate,
    bayes_at_n,
    bayes_hi95,
    bayes_lo95,
    doc_to_target,
    doc_to_text,
    doc_to_visual,
    process_results,
    unparseable_rate,
)


class AllTrials(Filter):
    """Keep every trial's response (lmms-eval's default filter keeps only the first)."""
'''


def _template(n_trials: int, max_new_tokens: int, profile: str) -> str:
    metrics = "\n".join(f"  - metric: {m}\n    aggregation: !function utils.{m}\n"
                        f"    higher_is_better: {'false' if m.endswith('_rate') else 'true'}"
                        for m in METRICS)
    gen = "\n".join(f"  {k}: {str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in GENERATION.items())
    return f"""# Shared by every MIS-Ground task (written by `make export`, profile {profile}).
dataset_path: parquet
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
{gen}
  until: []
# N trials per question; all of them reach process_results through the all_trials filter.
repeats: {n_trials}
filter_list:
  - name: {FILTER}
    filter:
      - function: !function utils.AllTrials
metric_list:
{metrics}
metadata:
  version: 1.0
  profile: {profile}
"""


def _task_yaml(name: str, family: str, kind: str, files: Sequence[str]) -> str:
    listed = "\n".join(f"      - {f}" for f in files)
    return f"""task: {name}
task_alias: {family} ({kind})
include: _default_template_yaml
dataset_kwargs:
  data_files:
    test:
{listed}
"""


def _group_yaml(tasks: Sequence[str]) -> str:
    listed = "\n".join(f"  - {t}" for t in tasks)
    pooled = "\n".join(f"  - metric: {m}\n    aggregation: mean\n    weight_by_size: true\n"
                       f"    filter_list: {FILTER}" for m in POOLED)
    return f"""group: {GROUP}
task:
{listed}
# Means over the tasks weighted by their questions: the pooled accuracy, Bayes@N mean and
# parse rates (the Bayes@N interval is per task only: it does not pool linearly).
aggregate_metric_list:
{pooled}
metadata:
  version: 1.0
"""


def write_lmms_eval(questions: pd.DataFrame, hf_files: Sequence[Path], hf_dir: Path,
                    out_dir: Path, n_trials: int, max_new_tokens: int,
                    profile: str = "demo") -> dict[str, Any]:
    """Write the task folder ``out_dir`` over the HF export's parquet files.

    Parameters
    ----------
    questions : the exported questions (for the family and input path of each file).
    hf_files : the HF export's parquet files (under ``hf_dir``), each holding one
        (ablation, dims, family, input) cell, as :func:`mislib.export.hf.write_hf` writes them.
    n_trials : lmms-eval ``repeats`` (the profile's ``[inference] n_trials``).
    max_new_tokens : the generation budget (the profile's ``[inference] max_new_tokens``).

    Returns
    -------
    dict with ``tasks`` (name -> number of questions) and ``dir``.

    Raises
    ------
    ValueError
        When ``n_trials`` < 1.
    """
    if int(n_trials) < 1:
        raise ValueError(f"n_trials must be at least 1, got {n_trials}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.yaml"):
        old.unlink()
    counts = questions.assign(_kind=[input_kind(r) for r in questions.to_dict("records")])
    counts = counts.groupby(["family", "_kind"]).size()
    by_task: dict[str, list[str]] = {}
    meta: dict[str, tuple[str, str]] = {}
    for path in hf_files:
        family_kind = Path(path).name.split("-")[0:2]
        family, kind = family_kind[0], family_kind[1]
        if kind not in INPUTS:
            raise ValueError(f"{path}: not an HF export file name (<family>-<input>-...)")
        name = task_name(family, kind)
        rel = Path(os.path.relpath(path, out_dir)).as_posix()
        by_task.setdefault(name, []).append(rel)
        meta[name] = (family, kind)
    for name, files in by_task.items():
        family, kind = meta[name]
        (out_dir / f"{name}.yaml").write_text(_task_yaml(name, family, kind, sorted(files)))
    tasks = sorted(by_task)
    (out_dir / "_default_template_yaml").write_text(_template(int(n_trials), int(max_new_tokens),
                                                              profile))
    (out_dir / f"{GROUP}.yaml").write_text(_group_yaml(tasks))
    (out_dir / "utils.py").write_text(_UTILS)
    sizes = {}
    for name in tasks:
        family, kind = meta[name]
        sizes[name] = int(sum(v for (f, k), v in counts.items() if slug(f) == family and k == kind))
    return {"tasks": sizes, "dir": out_dir, "n_trials": int(n_trials)}
