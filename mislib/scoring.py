"""Stage 06: re-parse every model output, score it, and summarise accuracy with Bayes@N.

:func:`rescore` re-parses every raw output of stage 04 against ``questions.parquet`` with
:func:`mislib.answers.parse_answer` (so a run can be re-scored with a newer parser) and joins
the question factors; :func:`score_runs` is what notebook 06 calls: it reads the current
runs' ``data/results/*/responses.parquet`` and writes
``data/analysis/{scored,bayes_by_factor,semsam_effect,unparseable}.parquet``. The Bayes@N
summaries are :mod:`mislib.bayes`; parse outcomes that are not ``ok`` are counted on their
own (``unparseable.parquet``).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from mislib import answers
from mislib.answers import is_correct, n_options, parse_answer
from mislib.bayes import (  # noqa: F401  (re-exported: stage 06's public summaries)
    PAIRED_WEIGHTS,
    bayes_at_n,
    bayes_by,
    bayes_by_factor,
    bayes_interval,
    outcome_matrix,
    semsam_effect,
)
from mislib.config import stage_params
from mislib.inference.store import current_runs
from mislib.paths import (
    BAYES_BY_FACTOR_FILE,
    QUESTIONS_FILE,
    RESPONSES_FILE,
    RUN_FILE,
    SCORED_FILE,
    SEMSAM_EFFECT_FILE,
    UNPARSEABLE_FILE,
    project_paths,
)
from mislib.stage import StageRun
from mislib.vocabulary import (  # noqa: F401
    FAMILIES,
    PARSE_STATUSES,
    QUESTION_FACTORS,
    decoder_of,
    is_missing,
)

#: The factors whose levels get their own Bayes@N rows (columns of ``questions.parquet``).
FACTORS = QUESTION_FACTORS
#: The columns of stage 04's ``responses.parquet`` this stage needs.
RESPONSE_COLUMNS = ("run_id", "model", "arm", "question_id", "trial", "raw_text")
#: What :func:`score_runs` writes under ``data/analysis/``.
OUTPUTS = (SCORED_FILE, BAYES_BY_FACTOR_FILE, SEMSAM_EFFECT_FILE, UNPARSEABLE_FILE)


def unparseable_rates(scored: pd.DataFrame) -> pd.DataFrame:
    """Parse outcomes per model × arm.

    Returns
    -------
    DataFrame: ``model, arm, n_responses`` (answered records), ``n_ok, n_unparseable,
    n_ambiguous, unparseable_rate, ambiguous_rate`` (of the answered records),
    ``n_reparsed_differently`` (re-parse differs from the status or value stored at
    inference time), ``n_not_answered`` (records stage 04 could not answer, or questions
    of an unknown family) and ``not_answered`` (JSON counts per record status).
    """
    rows = []
    for (model, arm), g in scored.groupby(["model", "arm"], sort=True):
        answered = g["answered"].to_numpy(bool) if "answered" in g else np.ones(len(g), bool)
        status = g["parse_status"][answered]
        n = int(answered.sum())
        changed = int(g["reparsed_differently"].sum()) if "reparsed_differently" in g else 0
        not_answered = (g.loc[~answered, "status"].value_counts().to_dict()
                        if "status" in g else {})
        rows.append({"model": model, "arm": arm, "n_responses": n,
                     "n_ok": int((status == "ok").sum()),
                     "n_unparseable": int((status == "unparseable").sum()),
                     "n_ambiguous": int((status == "ambiguous").sum()),
                     "unparseable_rate": float((status == "unparseable").mean()) if n else np.nan,
                     "ambiguous_rate": float((status == "ambiguous").mean()) if n else np.nan,
                     "n_reparsed_differently": changed,
                     "n_not_answered": int((~answered).sum()),
                     "not_answered": json.dumps(not_answered, sort_keys=True)})
    return pd.DataFrame(rows, columns=["model", "arm", "n_responses", "n_ok", "n_unparseable",
                                       "n_ambiguous", "unparseable_rate", "ambiguous_rate",
                                       "n_reparsed_differently", "n_not_answered",
                                       "not_answered"])


# ----------------------------------------------------------------------------------------
# Re-scoring raw outputs
# ----------------------------------------------------------------------------------------

_QUESTION_KEYS = ("question_id", "family", "form", "terminology", "choices", "answer",
                  "letter_a", "letter_b", "component_a", "component_b", "name_a", "name_b")


def rescore(responses: pd.DataFrame, questions: pd.DataFrame,
            progress: bool = True) -> pd.DataFrame:
    """Parse every raw output again and score it against its question.

    Parameters
    ----------
    responses : stage 04 rows (``run_id, model, arm, question_id, trial, raw_text``; the
        stored ``parsed, parse_status, correct`` are kept as ``*_at_inference``).
    questions : stage 03's ``questions.parquet``.
    progress : show a progress bar.

    Returns
    -------
    DataFrame, one row per response: the response columns with ``parsed, parse_status,
    correct`` from this parser, ``reparsed_differently`` (bool), ``status`` (stage 04's
    record status, ``unknown_family`` for a question of an unknown family), ``answered``
    (``status == "ok"``: the model produced an answer; other rows are not parsed, have a
    null ``parse_status`` and are not scored), ``n_options`` (the question's number of valid
    options: its chance level is ``1 / n_options``), and the question's factor columns
    (everything of ``questions.parquet`` but ``text`` and ``choices``).

    Raises
    ------
    ValueError
        When a response names a question that ``questions`` lacks, or a required column
        is missing.
    """
    missing = [c for c in RESPONSE_COLUMNS if c not in responses]
    if missing:
        raise ValueError(f"responses lack columns {missing}")
    if "question_id" not in questions:
        raise ValueError("questions lack the column 'question_id'")
    qtable = questions.drop_duplicates("question_id").set_index("question_id", drop=False)
    unknown = ~responses["question_id"].isin(qtable.index)
    if unknown.any():
        ids = responses.loc[unknown, "question_id"].unique()[:5].tolist()
        raise ValueError(f"{int(unknown.sum())} responses name questions absent from "
                         f"questions.parquet, e.g. {ids}: was the benchmark regenerated "
                         "after the run?")
    record_status = _record_status(responses, qtable)
    answered = (record_status == "ok").to_numpy()
    parsed, status, correct = _parse_all(responses, qtable, answered, progress)
    out = responses.copy()
    for col in ("parsed", "parse_status", "correct"):
        if col in out:
            out = out.rename(columns={col: f"{col}_at_inference"})
    out["parsed"] = pd.Series(parsed, index=out.index, dtype=object)
    out["parse_status"] = pd.Series(status, index=out.index, dtype=object)
    out["correct"] = np.asarray(correct, dtype=bool)
    out["status"] = record_status.to_numpy()
    out["answered"] = answered
    out["reparsed_differently"] = _reparsed_differently(out) & answered
    options = {qid: n_options({k: row.get(k) for k in _QUESTION_KEYS})
               for qid, row in zip(qtable.index, qtable.to_dict("records"), strict=True)}
    out["n_options"] = out["question_id"].map(options).astype("int64")
    factors = [c for c in questions.columns if c not in ("text", "choices", "question_id")
               and c not in out.columns]
    return out.merge(qtable[["question_id", *factors]].reset_index(drop=True),
                     on="question_id", how="left", validate="many_to_one")


def _record_status(responses: pd.DataFrame, qtable: pd.DataFrame) -> pd.Series:
    """Each response's record status, ``unknown_family`` for a question of an unknown family.

    A record stage 04 could not answer (missing input, out of memory) or a question of an
    unknown family is no answer of the model: it is kept out of the accuracy and counted
    per status in ``unparseable.parquet`` instead.
    """
    record_status = (responses["status"].fillna("ok").astype(str) if "status" in responses
                     else pd.Series("ok", index=responses.index))
    known = qtable["family"].isin(FAMILIES)
    bad_family = ~responses["question_id"].map(known).astype(bool)
    if bad_family.any():
        ids = responses.loc[bad_family, "question_id"].unique()[:5].tolist()
        warnings.warn(f"{int(bad_family.sum())} responses answer questions of an unknown "
                      f"family (e.g. {ids}; expected one of {FAMILIES}): not scored",
                      stacklevel=3)
        record_status = record_status.where(~bad_family, "unknown_family")
    return record_status


def _parse_all(responses: pd.DataFrame, qtable: pd.DataFrame, answered: np.ndarray,
               progress: bool) -> tuple[list, list, list]:
    """Parsed value, parse status and correctness of every answered response (None, None,
    False for the others); identical texts of one question are parsed once."""
    records = {qid: {k: row.get(k) for k in _QUESTION_KEYS}
               for qid, row in zip(qtable.index, qtable.to_dict("records"), strict=True)}
    cache: dict[tuple[str, str], tuple[Any, str]] = {}
    parsed, status, correct = [], [], []
    texts = responses["raw_text"].to_numpy(dtype=object)
    qids = responses["question_id"].to_numpy(dtype=object)
    for qid, text, ok in tqdm(zip(qids, texts, answered, strict=True), total=len(texts),
                              desc="re-parsing", unit="resp", disable=not progress,
                              mininterval=1.0):
        if not ok:
            parsed.append(None)
            status.append(None)
            correct.append(False)
            continue
        key = (qid, "" if is_missing(text) else str(text))
        if key not in cache:  # trials often repeat the same text
            cache[key] = parse_answer(key[1], records[qid])
        value, st = cache[key]
        parsed.append(value)
        status.append(st)
        correct.append(is_correct(value, st, records[qid]))
    return parsed, status, correct


def _reparsed_differently(out: pd.DataFrame) -> np.ndarray:
    """Rows whose new parse differs from the one stored at inference time (status or value)."""
    if "parse_status_at_inference" not in out:
        return np.zeros(len(out), dtype=bool)

    def as_text(col: pd.Series) -> np.ndarray:
        return np.array(["" if is_missing(v) else str(v) for v in col], dtype=object)

    differs = as_text(out["parse_status_at_inference"]) != as_text(out["parse_status"])
    if "parsed_at_inference" in out:
        differs |= as_text(out["parsed_at_inference"]) != as_text(out["parsed"])
    return differs.astype(bool)


def unparsed_examples(scored: pd.DataFrame, per_group: int = 3, width: int = 120) -> pd.DataFrame:
    """Up to ``per_group`` outputs per (model, arm, parse status) that did not parse ``ok``.

    ``raw_text`` is cut to ``width`` characters, for a table a reader can scan.
    """
    examples = (scored[scored["parse_status"] != "ok"]
                .groupby(["model", "arm", "parse_status"]).head(per_group)
                [["model", "arm", "question_id", "parse_status", "raw_text"]])
    return examples.assign(raw_text=examples["raw_text"].astype(str).str.slice(0, width))


def find_runs(root: str | os.PathLike | None = None,
              runs: Iterable[str] | None = None) -> list[Path]:
    """``responses.parquet`` of the runs to score: the named ones, else the current ones.

    The current runs are those stage 04's stamps name, one per (model, arm): a changed
    configuration starts a new run folder and leaves the old one on disk, and it must not
    be counted twice. Without any stamp (results copied in by hand, or simulated), every
    run under ``data/results`` is taken.

    Raises
    ------
    FileNotFoundError
        When there is none, or a named run has no ``responses.parquet``.
    """
    results = project_paths(root).results
    runs = [str(r) for r in runs or []]
    if runs:
        files = [results / r / RESPONSES_FILE for r in runs]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"named runs have no responses.parquet: {absent}")
        return files
    files = [run / RESPONSES_FILE for run in current_runs(results)]
    if not files:
        files = sorted(results.glob(f"*/{RESPONSES_FILE}"))
    if not files:
        raise FileNotFoundError(
            f"no run results under {results}: run stage 04 first (notebook 04_inference or "
            "`python -m mislib infer --arm baseline` and `--arm semsam`)")
    return files


def load_responses(files: Sequence[Path]) -> pd.DataFrame:
    """Concatenate runs' ``responses.parquet``; a file lacking a needed column is named."""
    frames = []
    for path in files:
        frame = pd.read_parquet(path)
        missing = [c for c in RESPONSE_COLUMNS if c not in frame]
        if missing:
            raise ValueError(f"{path}: lacks columns {missing} (stage 04's responses schema)")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def read_run_records(root: str | os.PathLike | None = None,
                     run_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """The ``run.json`` of each run (one row per run; missing or broken files give nulls)."""
    results = project_paths(root).results
    rows = []
    for run_id in sorted(set(run_ids or [p.parent.name for p in results.glob(f"*/{RUN_FILE}")])):
        path = results / str(run_id) / RUN_FILE
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            record = {}
        rows.append({"run_id": run_id, "model": record.get("model") or record.get("model_id"),
                     "arm": record.get("arm"), "simulated": bool(record.get("simulated", False)),
                     "record": json.dumps(record, default=str)})
    return pd.DataFrame(rows, columns=["run_id", "model", "arm", "simulated", "record"])


def _fingerprint(files: Sequence[Path]) -> str:
    """Identity of the inputs and of the code (the parser, this module and the Bayes@N
    estimates of :mod:`mislib.bayes`), so new runs or changed code invalidate."""
    from mislib import bayes

    h = hashlib.sha256(Path(answers.__file__).read_bytes() + Path(__file__).read_bytes()
                       + Path(bayes.__file__).read_bytes())
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def score_runs(profile: str | Mapping[str, Any] = "demo",
               root: str | os.PathLike | None = None, force: bool = False,
               progress: bool = True, **overrides: Any) -> dict[str, pd.DataFrame]:
    """Stage 06: re-parse, score and summarise every run; write ``data/analysis/*.parquet``.

    Parameters
    ----------
    profile : profile name, TOML path or mapping; its ``[scoring]`` table supplies
        ``credible_level`` and ``runs`` (run ids to score; empty = every run under
        ``data/results``).
    root : project root (default: the repository).
    force : redo the work even when the outputs are fresh for these inputs.
    overrides : single ``[scoring]`` keys (``None`` = the profile's value).

    Returns
    -------
    dict with DataFrames ``scored`` (the answered records, see :func:`rescore`),
    ``bayes_by_factor``, ``semsam_effect``, ``unparseable`` (read back from disk when
    fresh).
    """
    params = stage_params(profile, "scoring", **overrides)
    paths = project_paths(root)
    files = find_runs(root, params.get("runs"))
    qpath = paths.benchmark / QUESTIONS_FILE
    if not qpath.is_file():
        raise FileNotFoundError(f"{qpath} is missing: run stage 03 (03_question_generation)")
    stamp_params = {**params, "inputs": _fingerprint([qpath, *files])}
    out_dir = paths.analysis
    run = StageRun(out_dir, "scoring", stamp_params, OUTPUTS)  # mislib.stage
    if not force and run.fresh():
        return {Path(o).stem: pd.read_parquet(out_dir / o) for o in OUTPUTS}

    level = float(params.get("credible_level", 0.95))
    responses = load_responses(files)
    rescored = rescore(responses, pd.read_parquet(qpath), progress=progress)
    unparseable = unparseable_rates(rescored)
    # Only the model's answers are scored; the rest are counted in unparseable.parquet.
    scored = rescored[rescored["answered"]].reset_index(drop=True)
    # one answer per (model, decoder, arm, question, trial): an endpoint's run of a model
    # is scored beside the local one, never merged with it (mislib.vocabulary.decoder_of)
    decoder = (scored["backend"].map(decoder_of) if "backend" in scored
               else pd.Series("local", index=scored.index))
    if scored.assign(decoder=decoder).duplicated(["model", "decoder", "arm", "question_id",
                                                  "trial"]).any():
        runs = sorted(scored["run_id"].unique())
        raise ValueError(f"runs {runs} answer the same (model, arm, question, trial) more "
                         "than once; name the runs to score in [scoring] runs")
    tables = {"scored": scored,
              "bayes_by_factor": bayes_by_factor(scored, level=level),
              "semsam_effect": semsam_effect(scored, level=level),
              "unparseable": unparseable}
    with run:  # the four tables are moved in together, the stamp last
        for name, table in tables.items():
            table.to_parquet(run.path(f"{name}.parquet"), index=False)
    if tables["semsam_effect"].empty and scored["arm"].nunique() > 1:
        warnings.warn("no model was answered in both the baseline and the semsam arm on the "
                      "same questions: semsam_effect.parquet is empty", stacklevel=2)
    return tables
