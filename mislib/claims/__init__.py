"""Stage 08: the paper's headline claims put to a reproduction test, and the paper's tables.

Every headline number of the paper is a claim quantity: an accuracy of some questions
(``kind="level"``, percent) or the difference of two (``kind="difference"``, percentage
points). The factor claims (:data:`CLAIMS`) select questions by factor levels from stage 06's
``scored.parquet`` and pool the models in the profile's ``claims_arm``; the decoding claims
(:data:`ARM_CLAIMS`) compare two arms of one model on the same (question, trial) pairs, for
every model that ran both arms. This run's estimate is Bayes@N (:mod:`mislib.bayes`) with a
central credible interval ``[lo, hi]``; beside it stand the raw accuracy of the same trials,
chance (the mean of 1 / number of answer options) and n (questions × trials; for a
difference, each side's; with models pooled, a question counts once per model). Where stage
07's factor model has the same contrast (``contrasts.parquet``) its estimate is shown too,
marked *not converged* when that fit did not converge (:func:`read_converged`).

The reproduction test
---------------------
A claim's tolerance band is the paper's value ``p`` ± ``t`` (``[paper] tolerance_points``,
percent for a level, points for a difference). With ``[lo, hi]`` this run's interval:

- a **level** is *reproduced* when ``p - t <= lo`` and ``hi <= p + t`` (the whole interval
  inside the band); *contradicted* when ``hi < p - t`` or ``lo > p + t`` (the whole
  interval outside); *inconclusive* otherwise (wider than the band, or overlapping its edge).
- a **difference** is *reproduced* when its interval lies inside the band **and** excludes
  zero on the side of the paper's sign (``lo > 0`` for a positive ``p``, ``hi < 0`` for a
  negative one); *contradicted* when the interval lies outside the band, or excludes zero on
  the other side (the opposite sign); *inconclusive* otherwise (an interval that holds zero is
  never reproduced).
- a difference the paper gives no number for but a direction (``sign``; SemSam against the
  greedy control) is *reproduced* when its interval excludes zero on that side,
  *contradicted* when it excludes zero on the other, *inconclusive* otherwise.

Before any of that a claim is *not measurable* when this run has no such questions (or no
model ran both arms), and *not assessed* when a smoke model (random weights,
:func:`mislib.provenance.is_smoke_model`) answered any of its questions, when either side has
fewer than ``[paper] min_questions`` distinct questions, when the paper states nothing to
compare with (greedy against baseline), or when the paper's number is another model's
accuracy (the SemSam accuracies are Qwen3-VL-32B's; the SemSam gain of any other model is
tested for its sign only).

Bayes@N (what ``estimate`` is): per question a uniform Beta(1, 1) prior updated by its N
trials, so a question answered correctly k times has posterior mean (k + 1) / (N + 2); the
estimate is the average of these over the questions, and the interval a normal
approximation from scorio. The data's weight is N / (N + 2): with few trials the estimate is
pulled towards 50 % (0 of 2 correct gives 25 %, 2 of 2 gives 75 %), so the raw accuracy and
chance stand beside it. If a paper number is a plain accuracy, the comparison is biased
towards 50 % by the same factor (N = 5: a 13-point difference shows as 9.3 points).

:func:`write_paper_assets` (notebook 08) writes ``paper/claims.md``, ``paper/numbers.tex``
(LaTeX macros, the profile and counts included) and ``paper/tables/*.tex`` (booktabs) +
``*.md``, each table with its provenance caption; :mod:`mislib.claims_figure` draws the
paper against this run.

The package, along its seams
----------------------------
:mod:`~mislib.claims.definitions`
    the claims as data: :class:`Claim`, :class:`ArmClaim`, :data:`CLAIMS`, :data:`ARM_CLAIMS`.
:mod:`~mislib.claims.evaluation`
    the reproduction test (:func:`claim_status`, :func:`status_reason`) and the claims table
    (:func:`evaluate_claims`, :data:`CLAIM_COLUMNS`).
:mod:`~mislib.claims.rendering`
    ``claims.md``, the paper's tables and ``numbers.tex`` as text (:func:`claims_markdown`,
    :func:`format_tables`, :func:`numbers_tex`, ...).
``mislib.claims`` itself
    stage 08 on disk (:func:`write_paper_assets`, :func:`read_converged`,
    :func:`read_recovery`); the other modules' names are re-exported here.

>>> claim_status("level", 69.4, 66.0, 71.0, tolerance=5.0)
'reproduced'
>>> claim_status("level", 69.4, 40.0, 90.0, tolerance=5.0)   # wide: never reproduced
'inconclusive'
>>> claim_status("difference", 11.6, -1.0, 9.0, tolerance=5.0)  # holds zero
'inconclusive'
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from mislib.analysis.stage import read_convergence, read_diagnostics
from mislib.bayes import bayes_by_factor
from mislib.claims.definitions import ARM_CLAIMS, CLAIMS, PAPER, ArmClaim, Claim
from mislib.claims.evaluation import CLAIM_COLUMNS, claim_status, evaluate_claims, status_reason
from mislib.claims.rendering import (
    BAYES_AT_N,
    TABLES,
    claims_display,
    claims_markdown,
    format_tables,
    latex_escape,
    latex_table,
    macro_name,
    markdown_table,
    numbers_tex,
)
from mislib.claims.rendering import _recovery_sentence as _recovery_sentence
from mislib.config import stage_params
from mislib.paths import (
    BAYES_BY_FACTOR_FILE,
    CLAIMS_FILE,
    CONTRASTS_FILE,
    FACTOR_DIAGNOSTICS_FILE,
    FACTOR_EFFECTS_FILE,
    NUMBERS_FILE,
    QUESTIONS_FILE,
    RECOVERY_DIAGNOSTICS_FILE,
    RECOVERY_FILE,
    RESPONSES_FILE,
    RUN_FILE,
    SCORED_FILE,
    SEMSAM_EFFECT_FILE,
    UNPARSEABLE_FILE,
    project_paths,
)
from mislib.provenance import Provenance, caption, scored_run_ids
from mislib.stage import StageRun
from mislib.vocabulary import CLAIM_STATUSES as STATUSES
from mislib.vocabulary import QUESTION_FACTORS

__all__ = [
    "ARM_CLAIMS", "BAYES_AT_N", "CLAIMS", "CLAIM_COLUMNS", "PAPER", "STATUSES", "TABLES",
    "ArmClaim", "Claim", "claim_status", "claims_display", "claims_markdown",
    "evaluate_claims", "format_tables", "latex_escape", "latex_table", "macro_name",
    "markdown_table", "numbers_tex", "read_converged", "read_recovery", "status_reason",
    "write_paper_assets",
]


def _fingerprint(files: Sequence[Path]) -> str:
    """The inputs' identity (path, size, mtime) and the code that computes the assets (every
    module of :mod:`mislib.claims`, :mod:`mislib.provenance`, which counts the questions
    asked and words the captions, and :mod:`mislib.bayes`, which estimates the claims), so
    that a new input or a change to that code rewrites the assets."""
    import mislib.bayes
    import mislib.provenance

    h = hashlib.sha256()
    for module in [*sorted(Path(__file__).parent.glob("*.py")),
                   Path(mislib.provenance.__file__), Path(mislib.bayes.__file__)]:
        h.update(module.read_bytes())
    for f in files:
        if f.exists():
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def read_converged(root: str | os.PathLike | None = None) -> bool | None:
    """Whether stage 07's fit converged: the ``converged`` verdict of its
    ``factor_diagnostics.json`` (:func:`mislib.analysis.read_convergence`, the one reader of
    that file); None when stage 07 has not run."""
    verdict = read_convergence(root)
    return None if verdict is None else bool(verdict["converged"])


def read_recovery(root: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """Stage 07's recovery study in brief: ``covered``, ``terms``, ``coverage`` (share of
    planted effects inside their 95 % intervals), ``converged`` and ``calibration`` (the
    calibration test, :func:`mislib.analysis.recovery.calibration`), both from
    ``recovery_diagnostics.json`` (None without it); None without a study."""
    paths = project_paths(root)
    table_path = paths.analysis / RECOVERY_FILE
    if not table_path.is_file():
        return None
    covered = pd.read_parquet(table_path, columns=["covered"])["covered"].astype(bool)
    diag_path = paths.analysis / RECOVERY_DIAGNOSTICS_FILE
    diag = read_diagnostics(diag_path) if diag_path.is_file() else {}
    return {"covered": int(covered.sum()), "terms": len(covered),
            "coverage": float(covered.mean()) if len(covered) else math.nan,
            "converged": bool(diag["converged"]) if diag else None,
            "calibration": diag.get("calibration")}


def write_paper_assets(profile: str | Mapping[str, Any] = "demo",
                       root: str | os.PathLike | None = None, force: bool = False,
                       **overrides: Any) -> dict[str, Any]:
    """Stage 08's tables: ``paper/claims.md``, ``paper/numbers.tex``, ``paper/tables/*``.

    Reads stage 03's ``questions.parquet`` (the generated questions), stage 06's
    ``scored, bayes_by_factor, semsam_effect, unparseable`` and stage 07's
    ``factor_effects, contrasts`` (required: notebook 08 runs after 07), its
    ``factor_diagnostics.json`` (whether the fit converged; unknown when absent), its
    recovery study (coverage; said to be missing when absent) and the scored runs' records
    (``responses.parquet``, what was asked; ``run.json``, whether simulated). All of them and
    the code that computes the assets are in the stamp: a change to any redoes them.

    Returns
    -------
    dict with ``claims`` (the DataFrame of :func:`evaluate_claims`), ``provenance``
    (:class:`mislib.provenance.Provenance` of the numbers) and ``paths`` (every file
    written).
    """
    params = stage_params(profile, "paper", **overrides)
    level = float(stage_params(profile, "scoring").get("credible_level", 0.95))
    paths = project_paths(root)
    inputs = {Path(name).stem: paths.analysis / name for name in
              (SCORED_FILE, BAYES_BY_FACTOR_FILE, SEMSAM_EFFECT_FILE, UNPARSEABLE_FILE,
               FACTOR_EFFECTS_FILE, CONTRASTS_FILE)}
    inputs["questions"] = paths.benchmark / QUESTIONS_FILE
    for name, path in inputs.items():
        if not path.is_file():
            stage = {"factor_effects": "07 (07_factor_analysis)",
                     "contrasts": "07 (07_factor_analysis)",
                     "questions": "03 (03_question_generation)"}.get(name, "06 (06_scoring)")
            raise FileNotFoundError(f"{path} is missing: run stage {stage} first")
    optional = [paths.analysis / name for name in
                (FACTOR_DIAGNOSTICS_FILE, RECOVERY_FILE, RECOVERY_DIAGNOSTICS_FILE)]
    # the records of the runs scored or read by stage 06 (Provenance.from_scored counts the
    # questions asked from them) and their run.json (whether simulated)
    scored_runs = set(pd.read_parquet(inputs["scored"], columns=["run_id"])["run_id"].astype(str))
    for run_id in sorted(scored_runs | scored_run_ids(params["profile"], root)):
        optional += [paths.results / run_id / name for name in (RESPONSES_FILE, RUN_FILE)]
    # Paths relative to paper/ (the stamp .paper.stage.json lives there, git-ignored); the
    # files are written aside and moved in together, the stamp last (mislib.stage).
    tables_dir = paths.tables.relative_to(paths.paper).as_posix()
    outputs = [CLAIMS_FILE, NUMBERS_FILE, f"{tables_dir}/.claims.json"] + [
        f"{tables_dir}/{t}.{ext}" for t in TABLES for ext in ("tex", "md")]
    stamp_params = {**params, "level": level,
                    "inputs": _fingerprint([*inputs.values(), *optional])}
    run = StageRun(paths.paper, "paper", stamp_params, outputs)
    if not force and run.fresh():
        saved = json.loads((paths.tables / ".claims.json").read_text())
        return {"claims": pd.DataFrame.from_records(saved["claims"], columns=CLAIM_COLUMNS),
                "provenance": _provenance_from_record(saved["provenance"]),
                "paths": [paths.paper / o for o in outputs if not o.endswith(".claims.json")]}

    tables = {name: pd.read_parquet(path) for name, path in inputs.items()
              if name != "questions"}
    scored = tables["scored"]
    tables["bayes_by_factor_pooled"] = bayes_by_factor(scored, QUESTION_FACTORS, level,
                                                       per_model=False)
    converged = read_converged(root)
    recovery = read_recovery(root)
    prov = Provenance.from_scored(scored, params["profile"], root, converged=converged)
    claims = evaluate_claims(scored, tables["contrasts"], arm=str(params["claims_arm"]),
                             semsam_model=str(params["semsam_claim_model"]),
                             prompt_baseline=str(params["prompt_baseline"]), level=level,
                             tolerance=float(params["tolerance_points"]),
                             min_questions=int(params["min_questions"]), converged=converged)
    context = {"provenance": prov, "arm": params["claims_arm"], "level": level,
               "tolerance": float(params["tolerance_points"]),
               "min_questions": int(params["min_questions"]), "recovery": recovery}

    written = []
    source = caption(prov)
    with run:
        for name, (table, what) in format_tables(tables, claims, level, converged).items():
            run.path(f"{tables_dir}/{name}.tex").write_text(
                latex_table(table, f"{what} {source}", name))
            run.path(f"{tables_dir}/{name}.md").write_text(
                f"{what}\n\n{source}\n\n{markdown_table(table)}")
            written += [paths.tables / f"{name}.tex", paths.tables / f"{name}.md"]
        run.path(NUMBERS_FILE).write_text(numbers_tex(
            claims, tables, prov, semsam_model=str(params["semsam_claim_model"]),
            recovery=recovery))
        run.path(CLAIMS_FILE).write_text(claims_markdown(claims, context))
        saved = {"provenance": _provenance_record(prov),
                 "claims": json.loads(claims.to_json(orient="records"))}
        run.path(f"{tables_dir}/.claims.json").write_text(json.dumps(saved, indent=1))
    written += [paths.paper / NUMBERS_FILE, paths.paper / CLAIMS_FILE]
    return {"claims": claims, "provenance": prov, "paths": written}


def _provenance_record(prov: Provenance) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(prov)))


def _provenance_from_record(record: Mapping[str, Any]) -> Provenance:
    """The :class:`Provenance` that :func:`_provenance_record` wrote (lists back to tuples)."""
    fields = dict(record)
    for key in ("models", "run_ids"):
        fields[key] = tuple(fields.get(key, ()))
    fields["counts"] = tuple(tuple(pair) for pair in fields.get("counts", ()))
    return Provenance(**fields)
