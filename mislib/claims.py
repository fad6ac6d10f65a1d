"""Stage 08: the paper's headline claims beside this run's estimates, and the paper's tables.

Every headline number of the paper is a :class:`Claim` quantity: an accuracy of some
questions (``kind="level"``) or the difference of two (``kind="difference"``), selected by
factor levels from ``scored.parquet`` (stage 06). This run's estimate is Bayes@N with a
central credible interval (models pooled, in the profile's ``claims_arm``); the SemSam claim
uses the paired effect of ``semsam_effect.parquet``. Where stage 07's factor model has the
same contrast (``contrasts.parquet``), its population-averaged estimate is shown beside it.

Status of each quantity:

- ``reproduced`` — a level: the paper's value lies inside this run's interval; a difference:
  same sign as the paper's and the interval excludes zero.
- ``not reproduced`` — otherwise.
- ``not measurable`` — this run has no such questions (a level absent from the benchmark,
  a model not run, no SemSam arm).

:func:`write_paper_assets` (notebook 08) writes ``paper/claims.md``, ``paper/numbers.tex``
(LaTeX macros) and ``paper/tables/*.tex`` (booktabs) + ``*.md``.

>>> [c.id for c in CLAIMS][:3]
['semsam_baseline', 'semsam_with', 'semsam_gain']
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm

from mislib.bayes import bayes_by, bayes_by_factor
from mislib.config import stage_params
from mislib.paths import (
    BAYES_BY_FACTOR_FILE,
    CLAIMS_FILE,
    CONTRASTS_FILE,
    FACTOR_EFFECTS_FILE,
    NUMBERS_FILE,
    SCORED_FILE,
    SEMSAM_EFFECT_FILE,
    UNPARSEABLE_FILE,
    project_paths,
)
from mislib.stage import StageRun
from mislib.vocabulary import CLAIM_STATUSES as STATUSES
from mislib.vocabulary import QUESTION_FACTORS, cell_name, difference_name, is_missing

#: Columns of the claims table (``paper/tables/claims.*`` and :func:`evaluate_claims`).
CLAIM_COLUMNS = ("claim", "id", "quantity", "kind", "paper", "estimate", "lo", "hi", "raw",
                 "n_questions", "status", "model_estimate", "model_lo", "model_hi", "note")
TABLES = ("claims", "accuracy_by_model_arm", "accuracy_by_factor", "semsam_effect",
          "unparseable", "factor_effects")


@dataclass(frozen=True)
class Claim:
    """One headline quantity of the paper.

    Attributes
    ----------
    id : short identifier (letters and underscores; becomes LaTeX macro names).
    claim : which headline claim it belongs to (a short title).
    quantity : what is measured, in words.
    paper : the paper's value, percent (level) or percentage points (difference).
    select : factor levels of the questions measured (``{"family": "plane"}``).
    minus : for a difference, the levels of the subtracted questions.
    contrast : the matching ``contrasts.parquet`` name of stage 07, if any.
    """

    id: str
    claim: str
    quantity: str
    paper: float
    select: Mapping[str, str] = field(default_factory=dict)
    minus: Mapping[str, str] | None = None
    contrast: str | None = None

    @property
    def kind(self) -> str:
        return "level" if self.minus is None else "difference"


_IMG = {"ablation": "none"}
_SEMSAM = "SemSam on Qwen3-VL-32B"
_STD = "Standard view: anatomical beats colloquial"
_STO = "Storage view: colloquial beats anatomical"
_XSL = "Cross-slice relations are harder than in-plane ones"
_DIM = "3D stacks are slightly harder than 2D slices"
_BOX = "A box helps colloquial and hurts anatomical questions"
_TXT = "Text only: anatomical survives, colloquial collapses"

#: The paper's headline numbers (issue 7), one row per quantity.
CLAIMS: tuple[Claim, ...] = (
    Claim("semsam_baseline", _SEMSAM, "accuracy, baseline decoding", 53.4),
    Claim("semsam_with", _SEMSAM, "accuracy with SemSam", 66.5),
    Claim("semsam_gain", _SEMSAM, "SemSam − baseline (paired)", 66.5 - 53.4),
    Claim("std_anatomical", _STD, "standard view, anatomical terms", 69.4,
          {**_IMG, "convention": "standard", "terminology": "anatomical"},
          contrast=cell_name(convention="standard", terminology="anatomical")),
    Claim("std_colloquial", _STD, "standard view, colloquial terms", 57.8,
          {**_IMG, "convention": "standard", "terminology": "colloquial"},
          contrast=cell_name(convention="standard", terminology="colloquial")),
    Claim("std_gap", _STD, "standard view: anatomical − colloquial", 69.4 - 57.8,
          {**_IMG, "convention": "standard", "terminology": "anatomical"},
          {**_IMG, "convention": "standard", "terminology": "colloquial"},
          contrast="-" + difference_name(
              cell_name(convention="standard", terminology="colloquial"),
              cell_name(convention="standard", terminology="anatomical"))),
    Claim("sto_colloquial", _STO, "storage view, colloquial terms", 59.85,
          {**_IMG, "convention": "storage", "terminology": "colloquial"},
          contrast=cell_name(convention="storage", terminology="colloquial")),
    Claim("sto_anatomical", _STO, "storage view, anatomical terms", 50.2,
          {**_IMG, "convention": "storage", "terminology": "anatomical"},
          contrast=cell_name(convention="storage", terminology="anatomical")),
    Claim("sto_gap", _STO, "storage view: colloquial − anatomical", 59.85 - 50.2,
          {**_IMG, "convention": "storage", "terminology": "colloquial"},
          {**_IMG, "convention": "storage", "terminology": "anatomical"},
          contrast=difference_name(cell_name(convention="storage", terminology="colloquial"),
                                   cell_name(convention="storage", terminology="anatomical"))),
    Claim("plane_naming", "Plane naming", "plane-naming questions", 77.6,
          {**_IMG, "family": "plane"}, contrast=cell_name(family="plane")),
    Claim("cross_slice", _XSL, "cross-slice (3D) relations", 68.0,
          {**_IMG, "family": "relation_3d"}, contrast=cell_name(family="relation_3d")),
    Claim("in_plane", _XSL, "in-plane (2D) relations", 71.7,
          {**_IMG, "family": "relation_2d"}, contrast=cell_name(family="relation_2d")),
    Claim("cross_minus_in", _XSL, "cross-slice − in-plane", 68.0 - 71.7,
          {**_IMG, "family": "relation_3d"}, {**_IMG, "family": "relation_2d"},
          contrast=difference_name(cell_name(family="relation_3d"),
                                   cell_name(family="relation_2d"))),
    Claim("dims_3d", _DIM, "3D stacks", 56.9, {**_IMG, "dims": "3d"},
          contrast=cell_name(dims="3d")),
    Claim("dims_2d", _DIM, "2D slices", 58.8, {**_IMG, "dims": "2d"},
          contrast=cell_name(dims="2d")),
    Claim("dims_gap", _DIM, "3D − 2D", 56.9 - 58.8, {**_IMG, "dims": "3d"},
          {**_IMG, "dims": "2d"},
          contrast=difference_name(cell_name(dims="3d"), cell_name(dims="2d"))),
    Claim("nobox_colloquial", _BOX, "no visual prompt, colloquial terms", 45.1,
          {**_IMG, "prompt": "<baseline>", "terminology": "colloquial"},
          contrast=cell_name(prompt="<baseline>", terminology="colloquial")),
    Claim("box_colloquial_gain", _BOX, "box − no prompt, colloquial terms", 8.23,
          {**_IMG, "prompt": "box", "terminology": "colloquial"},
          {**_IMG, "prompt": "<baseline>", "terminology": "colloquial"},
          contrast=difference_name(cell_name(prompt="box", terminology="colloquial"),
                                   cell_name(prompt="<baseline>", terminology="colloquial"))),
    Claim("nobox_anatomical", _BOX, "no visual prompt, anatomical terms", 75.3,
          {**_IMG, "prompt": "<baseline>", "terminology": "anatomical"},
          contrast=cell_name(prompt="<baseline>", terminology="anatomical")),
    Claim("box_anatomical_gain", _BOX, "box − no prompt, anatomical terms", -13.33,
          {**_IMG, "prompt": "box", "terminology": "anatomical"},
          {**_IMG, "prompt": "<baseline>", "terminology": "anatomical"},
          contrast=difference_name(cell_name(prompt="box", terminology="anatomical"),
                                   cell_name(prompt="<baseline>", terminology="anatomical"))),
    Claim("text_anatomical", _TXT, "text only, anatomical terms", 69.3,
          {"ablation": "text_only", "terminology": "anatomical"},
          contrast=cell_name(ablation="text_only", terminology="anatomical")),
    Claim("image_anatomical", _TXT, "with the image, anatomical terms", 74.0,
          {"ablation": "none", "terminology": "anatomical"},
          contrast=cell_name(ablation="none", terminology="anatomical")),
    Claim("text_colloquial", _TXT, "text only, colloquial terms", 40.4,
          {"ablation": "text_only", "terminology": "colloquial"},
          contrast=cell_name(ablation="text_only", terminology="colloquial")),
    Claim("text_minus_image_anatomical", _TXT, "text only − with image, anatomical", 69.3 - 74.0,
          {"ablation": "text_only", "terminology": "anatomical"},
          {"ablation": "none", "terminology": "anatomical"},
          contrast=difference_name(cell_name(ablation="text_only", terminology="anatomical"),
                                   cell_name(ablation="none", terminology="anatomical"))),
)
_SEMSAM_IDS = {"semsam_baseline": "baseline", "semsam_with": "semsam", "semsam_gain": "effect"}


# ----------------------------------------------------------------------------------------
# Evaluating the claims
# ----------------------------------------------------------------------------------------

def _subset(scored: pd.DataFrame, select: Mapping[str, str], baseline: str) -> pd.DataFrame:
    mask = np.ones(len(scored), dtype=bool)
    for factor, level in select.items():
        level = baseline if level == "<baseline>" else level
        if factor not in scored:
            return scored.iloc[0:0]
        mask &= (scored[factor].astype(str) == level).to_numpy()
    return scored[mask]


def _estimate(rows: pd.DataFrame, level: float) -> tuple[float, ...] | None:
    """``(mu, sigma, lo, hi, n_questions, raw accuracy)`` of some scored rows, or None."""
    if rows.empty:
        return None
    cell = bayes_by(rows.assign(_all="all"), ["_all"], level)
    if cell.empty or cell["n_questions"].iat[0] == 0:
        return None
    r = cell.iloc[0]
    return (float(r["mu"]), float(r["sigma"]), float(r["lo"]), float(r["hi"]),
            int(r["n_questions"]), float(r["accuracy"]))


def _status(kind: str, paper: float, estimate: float, lo: float, hi: float) -> str:
    if kind == "level":
        return "reproduced" if lo <= paper <= hi else "not reproduced"
    excludes_zero = lo > 0 or hi < 0
    same_sign = np.sign(estimate) == np.sign(paper)
    return "reproduced" if excludes_zero and same_sign else "not reproduced"


def _contrast_lookup(contrasts: pd.DataFrame | None, name: str | None) -> tuple[float, ...]:
    """(mean, lo, hi) in percent of a stage-07 contrast; a leading ``-`` flips its sign."""
    if contrasts is None or not name or contrasts.empty:
        return (math.nan,) * 3
    flip = name.startswith("-")
    row = contrasts[contrasts["contrast"] == name.lstrip("-")]
    if row.empty:
        return (math.nan,) * 3
    r = row.iloc[0]
    mean, lo, hi = 100 * r["mean"], 100 * r["lo95"], 100 * r["hi95"]
    return (-mean, -hi, -lo) if flip else (mean, lo, hi)


def evaluate_claims(scored: pd.DataFrame, semsam: pd.DataFrame | None = None,
                    contrasts: pd.DataFrame | None = None, *, arm: str = "baseline",
                    semsam_model: str = "Qwen3-VL-32B", prompt_baseline: str = "none",
                    level: float = 0.95, claims: Sequence[Claim] = CLAIMS) -> pd.DataFrame:
    """Each claim quantity beside this run's estimate, interval and status.

    Parameters
    ----------
    scored : ``scored.parquet`` of stage 06.
    semsam : ``semsam_effect.parquet`` of stage 06 (the SemSam claim; None = not measurable).
    contrasts : ``contrasts.parquet`` of stage 07 (optional; fills ``model_*``).
    arm : the arm the factor claims are measured in (models pooled).
    semsam_model : text that the model id of the SemSam claim contains (case-insensitive).
    prompt_baseline : the ``prompt`` level meaning "no visual prompt".
    level : credible level of the intervals.

    Returns
    -------
    DataFrame with :data:`CLAIM_COLUMNS`; ``paper``, ``estimate``, ``lo``, ``hi`` and
    ``model_*`` in percent (levels) or percentage points (differences). ``estimate`` is
    the Bayes@N posterior mean, which shrinks each question's accuracy towards 50 % by
    N/(N+2) for N trials; ``raw`` is the plain accuracy of the same trials, for comparison
    with numbers reported as plain accuracies.
    """
    in_arm = scored[scored["arm"].astype(str) == arm] if "arm" in scored else scored
    rows = []
    for c in claims:
        row = {"claim": c.claim, "id": c.id, "quantity": c.quantity, "kind": c.kind,
               "paper": c.paper, "estimate": math.nan, "lo": math.nan, "hi": math.nan,
               "raw": math.nan, "n_questions": 0, "status": "not measurable", "note": ""}
        # stage 07 names the no-prompt level as the benchmark does (box after none)
        contrast = c.contrast and c.contrast.replace("<baseline>", prompt_baseline)
        mean, lo, hi = _contrast_lookup(contrasts, contrast)
        row.update(model_estimate=mean, model_lo=lo, model_hi=hi)
        if c.id in _SEMSAM_IDS:
            row.update(_semsam_claim(c, semsam, semsam_model))
        else:
            uses_baseline = "<baseline>" in c.select.values() or (
                c.minus is not None and "<baseline>" in c.minus.values())
            a = _estimate(_subset(in_arm, c.select, prompt_baseline), level)
            b = None if c.minus is None else _estimate(
                _subset(in_arm, c.minus, prompt_baseline), level)
            if a is None or (c.minus is not None and b is None):
                row["note"] = (f"no questions with prompt '{prompt_baseline}' (no-prompt "
                               "baseline) in this run" if uses_baseline
                               else f"no such questions in the {arm} arm of this run")
            else:
                if b is None:
                    mu, sigma, lo_, hi_, n, raw = a
                else:
                    # Different questions on each side: independent posteriors.
                    mu, sigma = a[0] - b[0], math.hypot(a[1], b[1])
                    z = float(norm.ppf(0.5 + level / 2))
                    lo_, hi_ = mu - z * sigma, mu + z * sigma
                    n, raw = a[4] + b[4], a[5] - b[5]
                row.update(estimate=100 * mu, lo=100 * lo_, hi=100 * hi_, raw=100 * raw,
                           n_questions=n,
                           note=f"Bayes@N, {arm} arm, models pooled")
                row["status"] = _status(c.kind, c.paper, row["estimate"], row["lo"], row["hi"])
        rows.append(row)
    return pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))


def _semsam_claim(c: Claim, semsam: pd.DataFrame | None, pattern: str) -> dict[str, Any]:
    if semsam is None or semsam.empty:
        return {"note": "no model was run in both arms"}
    match = semsam[semsam["model"].astype(str).str.contains(pattern, case=False, regex=False)]
    if match.empty:
        models = ", ".join(sorted(semsam["model"].astype(str)))
        return {"note": f"model {pattern} not in this run (run: {models})"}
    r = match.iloc[0]
    part = _SEMSAM_IDS[c.id]
    est, lo, hi = (100 * r[f"{part}_mu"], 100 * r[f"{part}_lo"], 100 * r[f"{part}_hi"])
    raw = math.nan
    if "baseline_accuracy" in r and "semsam_accuracy" in r:
        raw = 100 * {"baseline": r["baseline_accuracy"], "semsam": r["semsam_accuracy"],
                     "effect": r["semsam_accuracy"] - r["baseline_accuracy"]}[part]
    return {"estimate": est, "lo": lo, "hi": hi, "raw": raw,
            "n_questions": int(r["n_questions"]),
            "status": _status(c.kind, c.paper, est, lo, hi),
            "note": f"{r['model']}, same questions and trials in both arms"}


# ----------------------------------------------------------------------------------------
# Writing tables, macros and claims.md
# ----------------------------------------------------------------------------------------

def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown pipe table of ``table`` (cells as given, ``|`` escaped)."""
    def cell(v: Any) -> str:
        return "" if is_missing(v) else \
            str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(cell(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |"
            for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


_LATEX_SPECIAL = re.compile(r"([&%$#_{}])")


def latex_escape(text: Any) -> str:
    """Escape LaTeX's special characters in a table cell."""
    s = "" if is_missing(text) else str(text)
    s = s.replace("\\", r"\textbackslash{}")
    s = _LATEX_SPECIAL.sub(r"\\\1", s)
    return s.replace("~", r"\textasciitilde{}").replace("^", r"\textasciicircum{}") \
        .replace("−", "$-$").replace("×", r"$\times$").replace("→", r"$\to$")


def latex_table(table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs ``table`` environment (via pandas' Styler) of already-formatted cells."""
    escaped = table.map(latex_escape)
    escaped.columns = [latex_escape(c) for c in table.columns]
    align = "".join("r" if pd.api.types.is_numeric_dtype(table[c]) else "l"
                    for c in table.columns)
    body = escaped.style.hide(axis="index").to_latex(
        hrules=True, column_format=align, caption=latex_escape(caption),
        label=f"tab:{label}", position="htbp", position_float="centering")
    return body


def _pct(v: float, digits: int = 1) -> str:
    return "" if is_missing(v) else f"{v:.{digits}f}"


def _paper(v: float) -> str:
    """The paper's number as the paper prints it (up to two decimals, no trailing zeros)."""
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _interval(lo: float, hi: float, digits: int = 1) -> str:
    if any(is_missing(v) for v in (lo, hi)):
        return ""
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def format_tables(tables: Mapping[str, pd.DataFrame], claims: pd.DataFrame,
                  level: float = 0.95) -> dict[str, tuple[pd.DataFrame, str]]:
    """The paper's tables, formatted for print: ``{name: (table, caption)}``."""
    pct_level = f"{100 * level:g} %"
    out: dict[str, tuple[pd.DataFrame, str]] = {}
    shown = claims.assign(
        paper=[_paper(p) for p in claims["paper"]],
        estimate=[_pct(e) for e in claims["estimate"]],
        interval=[_interval(lo, hi) for lo, hi in zip(claims["lo"], claims["hi"], strict=True)],
        raw=[_pct(e) for e in claims["raw"]],
        factor_model=[_pct(e) for e in claims["model_estimate"]])
    out["claims"] = (shown[["claim", "quantity", "paper", "estimate", "interval", "raw",
                            "factor_model", "status"]].rename(
                                columns={"factor_model": "factor model", "estimate": "this run"}),
                     f"The paper's headline numbers beside this run (percent or points; "
                     f"{pct_level} credible intervals).")

    by = tables["bayes_by_factor"]
    overall = by[by["factor"] == "all"]
    out["accuracy_by_model_arm"] = (pd.DataFrame({
        "model": overall["model"], "arm": overall["arm"],
        "questions": overall["n_questions"].astype(int), "trials": overall["n_trials"],
        "accuracy": [_pct(100 * v) for v in overall["mu"]],
        "interval": [_interval(100 * lo, 100 * hi) for lo, hi in
                     zip(overall["lo"], overall["hi"], strict=True)]}),
        f"Bayes@N accuracy (%) per model and decoding arm, {pct_level} credible intervals.")

    factors = tables["bayes_by_factor_pooled"]
    wide = []
    for (factor, lv), g in factors.groupby(["factor", "level"], sort=False):
        row = {"factor": factor, "level": lv}
        for r in g.itertuples():
            row[str(r.arm)] = f"{100 * r.mu:.1f} {_interval(100 * r.lo, 100 * r.hi)}"
        wide.append(row)
    out["accuracy_by_factor"] = (pd.DataFrame(wide).fillna(""),
                                 "Bayes@N accuracy (%) per factor level and arm, models "
                                 f"pooled, {pct_level} credible intervals.")

    eff = tables["semsam_effect"]
    out["semsam_effect"] = (pd.DataFrame({
        "model": eff["model"], "questions": eff["n_questions"],
        "baseline": [_pct(100 * v) for v in eff["baseline_mu"]],
        "SemSam": [_pct(100 * v) for v in eff["semsam_mu"]],
        "effect": [_pct(100 * v) for v in eff["effect_mu"]],
        "interval": [_interval(100 * lo, 100 * hi) for lo, hi in
                     zip(eff["effect_lo"], eff["effect_hi"], strict=True)],
        "fixed": eff["n_fixed"], "broken": eff["n_broken"]}),
        "SemSam against baseline decoding on the same questions and trials: accuracy (%), "
        f"effect (points, {pct_level} credible interval), trials fixed and broken.")

    un = tables["unparseable"]
    out["unparseable"] = (pd.DataFrame({
        "model": un["model"], "arm": un["arm"], "answers": un["n_responses"],
        "unparseable": [_pct(100 * v) for v in un["unparseable_rate"]],
        "ambiguous": [_pct(100 * v) for v in un["ambiguous_rate"]],
        "not answered": un["n_not_answered"] if "n_not_answered" in un else 0}),
        "Answers the parser could not read or found contradictory (% of answers; scored as "
        "wrong), and records without an answer (missing input, out of memory; not scored), "
        "per model and arm.")

    fe = tables.get("factor_effects")
    if fe is not None and not fe.empty:
        out["factor_effects"] = (pd.DataFrame({
            "term": fe["term"], "mean": [f"{v:.2f}" for v in fe["mean"]],
            "interval": [f"[{lo:.2f}, {hi:.2f}]" for lo, hi in
                         zip(fe["lo95"], fe["hi95"], strict=True)],
            "R-hat": [f"{v:.3f}" for v in fe["r_hat"]],
            "ESS": [f"{v:.0f}" for v in fe["ess_bulk"]]}),
            "Factor model: fixed effects on the logit scale (sum-to-zero deviations), "
            "95 % intervals, R-hat and bulk ESS.")
    return out


def macro_name(*parts: str) -> str:
    """A LaTeX macro name from words (letters only): ``("std_gap", "run")`` → ``StdGapRun``."""
    words = re.split(r"[^A-Za-z0-9]+", " ".join(parts))
    digits = {str(i): w for i, w in enumerate(
        ("Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine"))}
    name = "".join(w[:1].upper() + w[1:] for w in words if w)
    return "".join(digits.get(ch, ch) for ch in name)


def numbers_tex(claims: pd.DataFrame, tables: Mapping[str, pd.DataFrame],
                prefix: str = "mis") -> str:
    """``\\newcommand`` macros for the headline numbers of the paper and of this run."""
    lines = ["% Generated by mislib.claims (notebook 08_paper_assets); do not edit.",
             "% Percent (levels) or percentage points (differences)."]

    def add(name: str, value: str) -> None:
        lines.append(f"\\newcommand{{\\{prefix}{name}}}{{{value}}}")

    for r in claims.itertuples():
        base = macro_name(r.id)
        add(base + "Paper", _paper(r.paper))
        add(base + "Run", _pct(r.estimate) or "n/a")
        add(base + "RunCI", _interval(r.lo, r.hi) or "n/a")
        add(base + "Status", r.status)
    scored = tables["scored"]
    add("NQuestions", f"{scored['question_id'].nunique():,}".replace(",", "{,}"))
    add("NModels", str(scored["model"].nunique()))
    add("NTrials", str(int(scored["trial"].max()) + 1 if len(scored) else 0))
    add("NResponses", f"{len(scored):,}".replace(",", "{,}"))
    by = tables["bayes_by_factor_pooled"]
    for r in by[by["factor"] == "all"].itertuples():
        add("Acc" + macro_name(str(r.arm)), _pct(100 * r.mu))
    return "\n".join(lines) + "\n"


def claims_markdown(claims: pd.DataFrame, context: Mapping[str, Any]) -> str:
    """``paper/claims.md``: one section per headline claim with its quantities."""
    lines = ["# Headline claims of the paper beside this run", "",
             f"Profile `{context.get('profile')}`; models: {context.get('models')}; "
             f"claims arm `{context.get('arm')}`; {context.get('trials')} trials per question; "
             f"{100 * context.get('level', 0.95):g} % credible intervals (Bayes@N).", ""]
    if context.get("warning"):
        lines += [f"> **{context['warning']}**", ""]
    lines += ["Status: a level is *reproduced* when the paper's value lies in this run's "
              "interval; a difference when it has the paper's sign and its interval excludes "
              "zero; *not measurable* when this run has no such questions. `this run` is the "
              "Bayes@N posterior mean (each question's accuracy shrunk towards 50 % by "
              "N/(N+2) for N trials); `raw` is the plain accuracy of the same trials. "
              "`factor model` is "
              "stage 07's population-averaged estimate of the same contrast where it has one "
              "(it pools both arms and every ablation, so its scope is wider than the "
              "Bayes@N column's).",
              ""]
    counts = claims["status"].value_counts()
    lines += ["Summary: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES) + ".", ""]
    for claim, g in claims.groupby("claim", sort=False):
        lines += [f"## {claim}", ""]
        shown = pd.DataFrame({
            "quantity": g["quantity"], "paper": [_paper(v) for v in g["paper"]],
            "this run": [_pct(v) for v in g["estimate"]],
            "interval": [_interval(lo, hi) for lo, hi in zip(g["lo"], g["hi"], strict=True)],
            "raw": [_pct(v) for v in g["raw"]],
            "factor model": [_pct(v) for v in g["model_estimate"]],
            "status": g["status"], "note": g["note"]})
        lines += [markdown_table(shown)]
    return "\n".join(lines)


def _fingerprint(files: Sequence[Path]) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    for f in files:
        if f.exists():
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def run_context(scored: pd.DataFrame, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Who answered: the models, whether any run was simulated or used the smoke model."""
    from mislib.scoring import read_run_records

    models = sorted(scored["model"].astype(str).unique())
    runs = read_run_records(root, scored["run_id"].astype(str).unique())
    warning = ""
    if runs["simulated"].any():
        warning = "Simulated responses (mislib.simulate): these numbers test the pipeline only."
    elif any(m.startswith("smoke:") for m in models):
        warning = ("The demo's smoke model is randomly initialised: its answers are noise, "
                   "so these numbers test the pipeline, not the paper.")
    return {"models": ", ".join(f"`{m}`" for m in models), "warning": warning,
            "trials": int(scored["trial"].max()) + 1 if len(scored) else 0}


def write_paper_assets(profile: str | Mapping[str, Any] = "demo",
                       root: str | os.PathLike | None = None, force: bool = False,
                       **overrides: Any) -> dict[str, Any]:
    """Stage 08's tables: ``paper/claims.md``, ``paper/numbers.tex``, ``paper/tables/*``.

    Reads stage 06's ``scored, bayes_by_factor, semsam_effect, unparseable`` (required) and
    stage 07's ``factor_effects, contrasts`` (required: notebook 08 runs after 07).

    Returns
    -------
    dict with ``claims`` (the DataFrame of :func:`evaluate_claims`) and ``paths`` (every
    file written).
    """
    params = stage_params(profile, "paper", **overrides)
    level = float(stage_params(profile, "scoring").get("credible_level", 0.95))
    paths = project_paths(root)
    inputs = {Path(name).stem: paths.analysis / name for name in
              (SCORED_FILE, BAYES_BY_FACTOR_FILE, SEMSAM_EFFECT_FILE, UNPARSEABLE_FILE,
               FACTOR_EFFECTS_FILE, CONTRASTS_FILE)}
    for name, path in inputs.items():
        if not path.is_file():
            stage = "07 (07_factor_analysis)" if name in ("factor_effects", "contrasts") \
                else "06 (06_scoring)"
            raise FileNotFoundError(f"{path} is missing: run stage {stage} first")
    # Paths relative to paper/ (the stamp .paper.stage.json lives there, git-ignored); the
    # files are written aside and moved in together, the stamp last (mislib.stage).
    tables_dir = paths.tables.relative_to(paths.paper).as_posix()
    outputs = [CLAIMS_FILE, NUMBERS_FILE, f"{tables_dir}/.claims.json"] + [
        f"{tables_dir}/{t}.{ext}" for t in TABLES for ext in ("tex", "md")]
    stamp_params = {**params, "level": level, "inputs": _fingerprint(list(inputs.values()))}
    run = StageRun(paths.paper, "paper", stamp_params, outputs)
    if not force and run.fresh():
        return {"claims": pd.read_json(paths.tables / ".claims.json"),
                "paths": [paths.paper / o for o in outputs if not o.endswith(".claims.json")]}

    tables = {name: pd.read_parquet(path) for name, path in inputs.items()}
    scored = tables["scored"]
    pooled = bayes_by_factor(scored, QUESTION_FACTORS, level, per_model=False)
    tables["bayes_by_factor_pooled"] = pooled
    claims = evaluate_claims(scored, tables["semsam_effect"], tables["contrasts"],
                             arm=str(params["claims_arm"]),
                             semsam_model=str(params["semsam_claim_model"]),
                             prompt_baseline=str(params["prompt_baseline"]), level=level)
    context = {**run_context(scored, root), "profile": params["profile"],
               "arm": params["claims_arm"], "level": level}

    written = []
    with run:
        for name, (table, caption) in format_tables(tables, claims, level).items():
            run.path(f"{tables_dir}/{name}.tex").write_text(latex_table(table, caption, name))
            run.path(f"{tables_dir}/{name}.md").write_text(
                f"{caption}\n\n{markdown_table(table)}")
            written += [paths.tables / f"{name}.tex", paths.tables / f"{name}.md"]
        run.path(NUMBERS_FILE).write_text(numbers_tex(claims, tables))
        run.path(CLAIMS_FILE).write_text(claims_markdown(claims, context))
        claims.to_json(run.path(f"{tables_dir}/.claims.json"), orient="records", indent=1)
    written += [paths.paper / NUMBERS_FILE, paths.paper / CLAIMS_FILE]
    return {"claims": claims, "paths": written, "context": json.loads(json.dumps(
        context, default=str))}
