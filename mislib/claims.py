"""Stage 08: the paper's headline claims put to a reproduction test, and the paper's tables.

Every headline number of the paper is a claim quantity: an accuracy of some questions
(``kind="level"``, percent) or the difference of two (``kind="difference"``, percentage
points). The factor claims (:data:`CLAIMS`) select questions by factor levels from stage 06's
``scored.parquet`` and pool the models in the profile's ``claims_arm``; the decoding claims
(:data:`ARM_CLAIMS`) compare two arms of one model on the same (question, trial) pairs, for
every model that ran both arms. This run's estimate is Bayes@N (:mod:`mislib.bayes`) with a
central credible interval ``[lo, hi]``; beside it stand the raw accuracy of the same trials,
chance (the mean of 1 / number of answer options) and n (questions × trials; for a
difference, each side's). Where stage
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
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm

from mislib.analysis.stage import read_convergence, read_diagnostics
from mislib.bayes import bayes_by, bayes_by_factor, semsam_effect
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
    SCORED_FILE,
    SEMSAM_EFFECT_FILE,
    UNPARSEABLE_FILE,
    project_paths,
)
from mislib.provenance import Provenance, caption, is_smoke_model
from mislib.stage import StageRun
from mislib.vocabulary import (
    ARMS,
    QUESTION_FACTORS,
    cell_name,
    decoded_model,
    difference_name,
    is_missing,
)
from mislib.vocabulary import CLAIM_STATUSES as STATUSES

#: Columns of the claims table (:func:`evaluate_claims`). ``paper``, ``estimate``, ``lo``,
#: ``hi``, ``raw``, ``chance`` and ``factor_*`` are percent (levels) or points (differences).
#: ``n_questions`` × ``n_trials`` are the responses behind a level, or behind the first side
#: of a difference; ``minus_n_questions`` × ``minus_n_trials`` those of the subtracted side
#: (0 for a level).
CLAIM_COLUMNS = ("claim", "id", "quantity", "kind", "source", "models", "paper_model", "paper",
                 "sign", "tolerance", "estimate", "lo", "hi", "raw", "chance", "n_questions",
                 "n_trials", "minus_n_questions", "minus_n_trials", "status", "reason", "factor_estimate", "factor_lo", "factor_hi",
                 "factor_converged", "note")
TABLES = ("claims", "accuracy_by_model_arm", "accuracy_by_factor", "semsam_effect",
          "unparseable", "factor_effects")
#: The paper: Yu, Hariri et al., "Medical Image Spatial Grounding with Semantic Sampling",
#: arXiv:2603.14579 (v1), and the authors' project page and poster of it.
PAPER = "arXiv:2603.14579v1"
#: Where a factor claim's number was taken from (issue 7 transcribed them; the paper's
#: section or table of each has not been checked against the paper in this repository).
_RESULTS = f"{PAPER}, results (number as transcribed in issue 7; section not checked)"


@dataclass(frozen=True)
class Claim:
    """One headline quantity of the paper measured on question subsets (models pooled).

    Attributes
    ----------
    id : short identifier (letters, digits and underscores; becomes LaTeX macro names).
    claim : which headline claim it belongs to (a short title).
    quantity : what is measured, in words.
    paper : the paper's value, percent (level) or percentage points (difference).
    select : factor levels of the questions measured (``{"family": "plane"}``;
        ``"<baseline>"`` is the profile's no-prompt level).
    minus : for a difference, the levels of the subtracted questions.
    contrast : the matching ``contrasts.parquet`` name of stage 07, if any (a leading ``-``
        turns it round).
    source : where the paper states it.
    """

    id: str
    claim: str
    quantity: str
    paper: float
    select: Mapping[str, str] = field(default_factory=dict)
    minus: Mapping[str, str] | None = None
    contrast: str | None = None
    source: str = _RESULTS

    @property
    def kind(self) -> str:
        return "level" if self.minus is None else "difference"


@dataclass(frozen=True)
class ArmClaim:
    """One quantity of two decoding arms of one model on the same (question, trial) pairs.

    Attributes
    ----------
    id, claim, quantity, source : as in :class:`Claim`.
    paper : the paper's value for its model ``[paper] semsam_claim_model``; NaN when the
        paper gives no number.
    arms : ``(reference, compared)`` arms, e.g. ``("baseline", "semsam")``.
    part : ``"reference"`` or ``"compared"`` (that arm's accuracy, a level) or ``"effect"``
        (compared − reference, a difference).
    sign : the direction the paper implies for an effect (+1, -1; 0: none); it is what is
        tested for a model other than the paper's, or when the paper gives no number.
    """

    id: str
    claim: str
    quantity: str
    paper: float
    source: str
    arms: tuple[str, str]
    part: str
    sign: int = 0

    @property
    def kind(self) -> str:
        return "difference" if self.part == "effect" else "level"


_IMG = {"ablation": "none"}
_SEMSAM = "SemSam against baseline decoding"
_GREEDY = "SemSam against the greedy control (three arms)"
_STD = "Standard view: anatomical beats colloquial"
_STO = "Storage view: colloquial beats anatomical"
_XSL = "Cross-slice relations are harder than in-plane ones"
_DIM = "3D stacks are slightly harder than 2D slices"
_BOX = "A box helps colloquial and hurts anatomical questions"
_TXT = "Text only: anatomical survives, colloquial collapses"
_PAGE = f"{PAPER} project page and poster (headline figure: accuracy against model size)"

#: The decoding claims, evaluated for every model that ran both arms of a pair.
ARM_CLAIMS: tuple[ArmClaim, ...] = (
    ArmClaim("semsam_baseline", _SEMSAM, "accuracy, baseline decoding", 53.4, _PAGE,
             ("baseline", "semsam"), "reference"),
    ArmClaim("semsam_with", _SEMSAM, "accuracy with SemSam", 66.5, _PAGE,
             ("baseline", "semsam"), "compared"),
    ArmClaim("semsam_gain", _SEMSAM, "SemSam − baseline (paired)", 13.06,
             f"{PAPER}, abstract (+13.06 % on Qwen3-VL-32B; SemSam called model-agnostic)",
             ("baseline", "semsam"), "effect", sign=+1),
    ArmClaim("semsam_minus_greedy", _GREEDY, "SemSam − greedy (paired)", math.nan,
             "no number in the paper: it credits the gain to re-scoring, so SemSam should "
             "beat greedy decoding (docs/design.md, the arms)", ("greedy", "semsam"), "effect",
             sign=+1),
    ArmClaim("greedy_minus_baseline", _GREEDY, "greedy − baseline (paired)", math.nan,
             "no claim in the paper (the greedy arm is this project's control)",
             ("baseline", "greedy"), "effect"),
)
#: The factor claims: question subsets of the claims arm, models pooled.
CLAIMS: tuple[Claim, ...] = (
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


# ----------------------------------------------------------------------------------------
# The reproduction test
# ----------------------------------------------------------------------------------------

def _sign_status(lo: float, hi: float, sign: int) -> str:
    if (sign > 0 and lo > 0) or (sign < 0 and hi < 0):
        return "reproduced"
    if (sign > 0 and hi < 0) or (sign < 0 and lo > 0):
        return "contradicted"
    return "inconclusive"


def claim_status(kind: str, paper: float, lo: float, hi: float, tolerance: float,
                 sign: int = 0) -> str:
    """*reproduced*, *contradicted* or *inconclusive*: an interval against paper ± tolerance.

    The rules are the module's (its docstring states them).

    Parameters
    ----------
    kind : ``"level"`` or ``"difference"``.
    paper : the paper's value; NaN for a difference the paper gives a direction only.
    lo, hi : this run's credible interval, in the paper's units.
    tolerance : half-width of the band around ``paper`` (> 0).
    sign : the paper's direction of a difference (default: the sign of ``paper``).

    Raises
    ------
    ValueError
        For an unknown ``kind``, a tolerance that is not positive, a missing or reversed
        interval, or a claim with neither a number nor a direction.

    Examples
    --------
    >>> claim_status("difference", -13.33, -16.0, -9.0, tolerance=5.0)
    'reproduced'
    >>> claim_status("difference", -1.9, 0.5, 1.5, tolerance=5.0)  # inside, wrong sign
    'contradicted'
    """
    if kind not in ("level", "difference"):
        raise ValueError(f"kind must be 'level' or 'difference', not {kind!r}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, not {tolerance!r}")
    if is_missing(lo) or is_missing(hi) or lo > hi:
        raise ValueError(f"interval [{lo}, {hi}] is missing or reversed")
    if is_missing(paper):
        if kind == "level" or not sign:
            raise ValueError("a claim needs the paper's value (or a difference's direction)")
        return _sign_status(lo, hi, sign)
    band_lo, band_hi = paper - tolerance, paper + tolerance
    inside = band_lo <= lo and hi <= band_hi
    outside = hi < band_lo or lo > band_hi
    if kind == "level":
        return "reproduced" if inside else "contradicted" if outside else "inconclusive"
    direction = sign or int(np.sign(paper))
    if direction == 0:
        raise ValueError("a difference of 0 has no direction to test; give sign")
    by_sign = _sign_status(lo, hi, direction)
    if inside and by_sign == "reproduced":
        return "reproduced"
    if outside or by_sign == "contradicted":
        return "contradicted"
    return "inconclusive"


def status_reason(status: str, kind: str, paper: float, lo: float, hi: float,
                  tolerance: float, sign: int = 0) -> str:
    """Why :func:`claim_status` decided ``status``, in words."""
    interval = f"[{lo:.1f}, {hi:.1f}]"
    if is_missing(paper):
        side = "above" if sign > 0 else "below"
        return {"reproduced": f"interval {interval} lies {side} 0, the paper's direction",
                "contradicted": f"interval {interval} lies on the other side of 0",
                "inconclusive": f"interval {interval} holds 0"}[status]
    band = f"{paper - tolerance:.1f} to {paper + tolerance:.1f}"
    if status == "reproduced":
        return f"interval {interval} lies inside the band {band}" + (
            " and excludes 0" if kind == "difference" else "")
    if status == "contradicted":
        if hi < paper - tolerance or lo > paper + tolerance:
            return f"interval {interval} lies outside the band {band}"
        return f"interval {interval} excludes 0 on the side opposite the paper's sign"
    if kind == "difference" and lo <= 0 <= hi:
        return f"interval {interval} holds 0 (band {band})"
    if hi - lo > 2 * tolerance:
        return f"interval {interval} is wider than the band {band}"
    return f"interval {interval} overlaps the edge of the band {band}"


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


def _estimate(rows: pd.DataFrame, level: float) -> dict[str, float] | None:
    """Bayes@N (mu, sigma, lo, hi), raw accuracy, chance (percent; NaN without the scored
    table's ``n_options``), questions and trials of some scored rows; None if empty.

    ``n_questions`` counts Bayes@N's rows ((model, question) pairs when models are pooled);
    ``n_distinct`` the distinct questions, which ``min_questions`` is held against."""
    if rows.empty:
        return None
    cell = bayes_by(rows.assign(_all="all"), ["_all"], level)
    if cell.empty or cell["n_questions"].iat[0] == 0:
        return None
    r = cell.iloc[0]
    return {"mu": float(r["mu"]), "sigma": float(r["sigma"]), "lo": float(r["lo"]),
            "hi": float(r["hi"]), "n_questions": int(r["n_questions"]),
            "n_trials": int(r["n_trials"]), "raw": float(r["accuracy"]),
            "chance": 100 * float(r.get("chance", math.nan)),
            "n_distinct": int(rows["question_id"].nunique())}


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


def _assess(kind: str, paper: float, sign: int, lo: float, hi: float, *, tolerance: float,
            n_questions: int, min_questions: int, smoke: Sequence[str],
            no_claim: str = "") -> tuple[str, str]:
    """(status, reason) of a measured claim: *not assessed* first, then the band test."""
    if smoke:
        return "not assessed", (f"answered by the smoke model {', '.join(smoke)} (random "
                                "weights: its answers are noise)")
    if n_questions < min_questions:
        return "not assessed", (f"{n_questions} questions, fewer than min_questions = "
                                f"{min_questions}")
    if no_claim:
        return "not assessed", no_claim
    if is_missing(paper) and not sign:
        return "not assessed", "the paper makes no claim about this quantity"
    status = claim_status(kind, paper, lo, hi, tolerance, sign)
    return status, status_reason(status, kind, paper, lo, hi, tolerance, sign)


def _blank(c: Claim | ArmClaim, tolerance: float) -> dict[str, Any]:
    return {"claim": c.claim, "id": c.id, "quantity": c.quantity, "kind": c.kind,
            "source": c.source, "models": "", "paper_model": "", "paper": c.paper,
            "sign": getattr(c, "sign", 0) or (int(np.sign(c.paper)) if c.kind == "difference"
                                              and not is_missing(c.paper) else 0),
            "tolerance": tolerance, "estimate": math.nan, "lo": math.nan, "hi": math.nan,
            "raw": math.nan, "chance": math.nan, "n_questions": 0, "n_trials": 0,
            "minus_n_questions": 0, "minus_n_trials": 0, "status": "not measurable", "reason": "", "factor_estimate": math.nan,
            "factor_lo": math.nan, "factor_hi": math.nan, "factor_converged": None,
            "note": ""}


def evaluate_claims(scored: pd.DataFrame, contrasts: pd.DataFrame | None = None, *,
                    arm: str = "baseline", semsam_model: str = "Qwen3-VL-32B",
                    prompt_baseline: str = "none", level: float = 0.95,
                    tolerance: float = 5.0, min_questions: int = 30,
                    converged: bool | None = None, claims: Sequence[Claim] = CLAIMS,
                    arm_claims: Sequence[ArmClaim] = ARM_CLAIMS) -> pd.DataFrame:
    """Each claim quantity beside this run's estimate, interval, raw accuracy, chance and n.

    Parameters
    ----------
    scored : ``scored.parquet`` of stage 06 (its ``n_options`` gives ``chance``).
    contrasts : ``contrasts.parquet`` of stage 07 (optional; fills ``factor_*``).
    arm : the arm the factor claims are measured in (models pooled).
    semsam_model : text that the model id of the paper's SemSam model contains
        (case-insensitive); the decoding claims' numbers are that model's.
    prompt_baseline : the ``prompt`` level meaning "no visual prompt".
    level : credible level of the intervals.
    tolerance, min_questions : the reproduction test's band half-width (percent or points)
        and the fewest questions a claim is assessed on (the module docstring's rules).
    converged : whether stage 07's fit converged (None: unknown); ``factor_converged``.

    Returns
    -------
    DataFrame with :data:`CLAIM_COLUMNS`: the decoding claims first (one row per model
    that ran both arms of the claim, or one *not measurable* row), then the factor claims.
    ``estimate`` is the Bayes@N posterior mean, ``raw`` the plain accuracy of the same
    trials, ``n_questions`` × ``n_trials`` the trials behind them.
    """
    if not tolerance > 0:
        raise ValueError(f"[paper] tolerance_points must be positive, not {tolerance!r}")
    rows = _arm_claim_rows(scored, arm_claims, semsam_model, level, tolerance, min_questions)
    in_arm = scored[scored["arm"].astype(str) == arm] if "arm" in scored else scored
    models = sorted(in_arm["model"].astype(str).unique()) if "model" in in_arm else []
    smoke = [m for m in models if is_smoke_model(m)]
    z = float(norm.ppf(0.5 + level / 2))
    for c in claims:
        row = _blank(c, tolerance)
        row["models"] = ", ".join(models) + (" (pooled)" if len(models) > 1 else "")
        # stage 07 names the no-prompt level as the benchmark does (box after none)
        contrast = c.contrast and c.contrast.replace("<baseline>", prompt_baseline)
        mean, lo, hi = _contrast_lookup(contrasts, contrast)
        row.update(factor_estimate=mean, factor_lo=lo, factor_hi=hi,
                   factor_converged=None if is_missing(mean) else converged)
        uses_baseline = "<baseline>" in c.select.values() or (
            c.minus is not None and "<baseline>" in c.minus.values())
        a = _estimate(_subset(in_arm, c.select, prompt_baseline), level)
        b = None if c.minus is None else _estimate(
            _subset(in_arm, c.minus, prompt_baseline), level)
        if a is None or (c.minus is not None and b is None):
            row["note"] = (f"no questions with prompt '{prompt_baseline}' (no-prompt "
                           "baseline) in this run" if uses_baseline
                           else f"no such questions in the {arm} arm of this run")
            row["reason"] = row["note"]
            rows.append(row)
            continue
        if b is None:
            est = {k: a[k] for k in ("mu", "lo", "hi", "raw", "chance", "n_questions",
                                     "n_trials")}
            n_min = a["n_distinct"]
        else:
            # Different questions on each side: independent posteriors.
            mu, sigma = a["mu"] - b["mu"], math.hypot(a["sigma"], b["sigma"])
            # each side's own responses (questions × trials), not a sum of questions
            # times the larger trial count
            est = {"mu": mu, "lo": mu - z * sigma, "hi": mu + z * sigma,
                   "raw": a["raw"] - b["raw"], "chance": a["chance"] - b["chance"],
                   "n_questions": a["n_questions"], "n_trials": a["n_trials"],
                   "minus_n_questions": b["n_questions"], "minus_n_trials": b["n_trials"]}
            n_min = min(a["n_distinct"], b["n_distinct"])
        row.update(estimate=100 * est["mu"], lo=100 * est["lo"], hi=100 * est["hi"],
                   raw=100 * est["raw"], chance=est["chance"],
                   n_questions=est["n_questions"], n_trials=est["n_trials"],
                   minus_n_questions=est.get("minus_n_questions", 0),
                   minus_n_trials=est.get("minus_n_trials", 0),
                   note=f"Bayes@N, {arm} arm, models pooled")
        row["status"], row["reason"] = _assess(
            c.kind, c.paper, row["sign"], row["lo"], row["hi"], tolerance=tolerance,
            n_questions=n_min, min_questions=min_questions, smoke=smoke)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))


_PART = {"reference": "baseline", "compared": "semsam", "effect": "effect"}


def _arm_claim_rows(scored: pd.DataFrame, arm_claims: Sequence[ArmClaim], semsam_model: str,
                    level: float, tolerance: float, min_questions: int) -> list[dict]:
    """The decoding claims: one row per (claim, model that ran both of its arms)."""
    effects = {pair: semsam_effect(scored, baseline=pair[0], treated=pair[1], level=level)
               for pair in dict.fromkeys(c.arms for c in arm_claims)}
    rows = []
    for c in arm_claims:
        effect = effects[c.arms]
        if effect.empty:
            row = _blank(c, tolerance)
            row["note"] = row["reason"] = (f"no model ran both the {c.arms[0]} and the "
                                           f"{c.arms[1]} arm")
            rows.append(row)
            continue
        for r in effect.itertuples(index=False):
            r = r._asdict()
            # a model decoded on an endpoint is its own row (bayes.semsam_effect pairs arms
            # by model and decoder), named so beside the same model decoded locally
            model = decoded_model(r["model"], r.get("decoder", "local"))
            row = _blank(c, tolerance)
            prefix = _PART[c.part]
            raw = {"reference": r["baseline_accuracy"], "compared": r["semsam_accuracy"],
                   "effect": r["semsam_accuracy"] - r["baseline_accuracy"]}[c.part]
            chance = 100 * float(r.get("chance", math.nan))
            row.update(models=model, paper_model=semsam_model if not is_missing(c.paper)
                       else "", estimate=100 * r[f"{prefix}_mu"],
                       lo=100 * r[f"{prefix}_lo"], hi=100 * r[f"{prefix}_hi"], raw=100 * raw,
                       chance=0.0 if c.part == "effect" and not is_missing(chance) else chance,
                       n_questions=int(r["n_questions"]), n_trials=int(r["n_trials"]),
                       note=f"{c.arms[1]} against {c.arms[0]} on the same questions and "
                            "trials")
            if c.part == "effect":  # paired: both arms answered the same questions × trials
                row.update(minus_n_questions=row["n_questions"],
                           minus_n_trials=row["n_trials"])
            paper, sign, no_claim = c.paper, row["sign"], ""
            if not is_missing(c.paper) and semsam_model.lower() not in model.lower():
                if c.part == "effect":
                    paper = math.nan  # another model: the paper's direction only
                    row["note"] += (f"; the paper's {c.paper:+g} is {semsam_model}'s, so "
                                    "this model is tested for the sign only")
                else:
                    no_claim = (f"the paper's {c.paper:g} % is {semsam_model}'s accuracy, "
                                f"not {model}'s")
            row["status"], row["reason"] = _assess(
                c.kind, paper, sign, row["lo"], row["hi"], tolerance=tolerance,
                n_questions=row["n_questions"], min_questions=min_questions,
                smoke=[model] if is_smoke_model(model) else [], no_claim=no_claim)
            rows.append(row)
    return rows


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
        .replace("−", "$-$").replace("×", r"$\times$").replace("→", r"$\to$") \
        .replace("±", r"$\pm$").replace("·", r"$\cdot$").replace("…", r"\ldots{}")


def latex_table(table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs ``table`` environment (via pandas' Styler) of already-formatted cells.

    The tabular is shrunk to the text width when wider (``\\resizebox`` of graphicx, which
    the document loads).
    """
    escaped = table.map(latex_escape)
    escaped.columns = [latex_escape(c) for c in table.columns]
    align = "".join("r" if pd.api.types.is_numeric_dtype(table[c]) else "l"
                    for c in table.columns)
    body = escaped.style.hide(axis="index").to_latex(
        hrules=True, column_format=align, caption=latex_escape(caption),
        label=f"tab:{label}", position="htbp", position_float="centering")
    # shrink a table wider than the text to the text width (graphicx's \resizebox)
    fit = r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%"
    body = body.replace("\\begin{tabular}", fit + "\n\\begin{tabular}", 1)
    body = body.replace("\\end{tabular}\n", "\\end{tabular}}\n", 1)
    return body.replace("\\centering\n", "\\centering\n\\small\n", 1)


def _pct(v: float, digits: int = 1) -> str:
    return "" if is_missing(v) else f"{v:.{digits}f}"


def _paper(v: float) -> str:
    """The paper's number as the paper prints it (up to two decimals, no trailing zeros)."""
    return "" if is_missing(v) else f"{v:.2f}".rstrip("0").rstrip(".")


def _interval(lo: float, hi: float, digits: int = 1) -> str:
    if any(is_missing(v) for v in (lo, hi)):
        return ""
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def _n(n_questions: Any, n_trials: Any) -> str:
    """``questions × trials`` (empty when nothing was measured)."""
    if is_missing(n_questions) or not int(n_questions):
        return ""
    return f"{int(n_questions):,} × {int(n_trials)}"


def _claim_n(kind: str, n_questions: Any, n_trials: Any, minus_n_questions: Any,
             minus_n_trials: Any) -> str:
    """A claim's n: ``questions × trials``, for a difference per side (``a vs b``, or ``each
    side`` when both sides have the same counts, as the paired SemSam comparisons do).

    >>> _claim_n("difference", 640, 4, 410, 2)
    '640 × 4 vs 410 × 2'
    >>> _claim_n("difference", 96, 2, 96, 2)
    '96 × 2 each side'
    """
    first = _n(n_questions, n_trials)
    if kind != "difference" or not first or is_missing(minus_n_questions) \
            or not int(minus_n_questions):
        return first
    second = _n(minus_n_questions, minus_n_trials)
    return f"{first} each side" if first == second else f"{first} vs {second}"


def _paper_band(paper: float, sign: int, tolerance: float) -> str:
    if is_missing(paper):
        return {1: "> 0", -1: "< 0"}.get(int(sign), "—")
    return f"{_paper(paper)} ± {tolerance:g}"


def _factor_cell(estimate: float, lo: float, hi: float, converged: Any) -> str:
    """Stage 07's estimate, or *not converged* instead of a number a reader should not use."""
    if is_missing(estimate):
        return ""
    if converged is False:
        return "not converged"
    text = f"{estimate:.1f} {_interval(lo, hi)}"
    return text if converged is True else f"{text} (convergence unknown)"


def _short_model(models: str) -> str:
    return "pooled" if "(pooled)" in models else models


def claims_display(claims: pd.DataFrame) -> pd.DataFrame:
    """The claims table as printed (strings): paper ± tolerance, this run, raw, chance, n."""
    return pd.DataFrame({
        "quantity": claims["quantity"], "model": [_short_model(m) for m in claims["models"]],
        "paper": [_paper_band(p, s, t) for p, s, t in
                  zip(claims["paper"], claims["sign"], claims["tolerance"], strict=True)],
        "this run": [f"{_pct(e)} {_interval(lo, hi)}".strip() for e, lo, hi in
                     zip(claims["estimate"], claims["lo"], claims["hi"], strict=True)],
        "raw": [_pct(v) for v in claims["raw"]],
        "chance": [_pct(v) for v in claims["chance"]],
        "n": [_claim_n(*row) for row in zip(
            claims["kind"], claims["n_questions"], claims["n_trials"],
            claims["minus_n_questions"], claims["minus_n_trials"], strict=True)],
        "factor model": [_factor_cell(e, lo, hi, c) for e, lo, hi, c in zip(
            claims["factor_estimate"], claims["factor_lo"], claims["factor_hi"],
            claims["factor_converged"], strict=True)],
        "status": claims["status"]})


def _chance_column(table: pd.DataFrame) -> list[str]:
    """A stage-06 table's ``chance`` (fraction) as percent strings (empty when absent)."""
    if "chance" not in table:
        return [""] * len(table)
    return [_pct(100 * v) for v in table["chance"]]


def format_tables(tables: Mapping[str, pd.DataFrame], claims: pd.DataFrame,
                  level: float = 0.95, converged: bool | None = None
                  ) -> dict[str, tuple[pd.DataFrame, str]]:
    """The paper's tables, formatted for print: ``{name: (table, caption)}``.

    Every accuracy stands with its raw value, chance (1 / options) and n (questions ×
    trials) beside Bayes@N; the caption says what is shown (the caller adds the provenance).
    """
    pct_level = f"{100 * level:g} %"
    out: dict[str, tuple[pd.DataFrame, str]] = {}
    out["claims"] = (claims_display(claims),
                     "The paper's headline numbers (± the reproduction test's tolerance) "
                     f"beside this run: Bayes@N with {pct_level} credible interval, raw "
                     "accuracy, chance and n = questions × trials (percent or points; a "
                     "difference gives each side's).")

    by = tables["bayes_by_factor"]
    overall = by[by["factor"] == "all"]
    out["accuracy_by_model_arm"] = (pd.DataFrame({
        "model": overall["model"], "arm": overall["arm"],
        "n": [_n(q, t) for q, t in zip(overall["n_questions"], overall["n_trials"],
                                       strict=True)],
        "chance": _chance_column(overall),
        "raw": [_pct(100 * v) for v in overall["accuracy"]],
        "Bayes@N": [_pct(100 * v) for v in overall["mu"]],
        "interval": [_interval(100 * lo, 100 * hi) for lo, hi in
                     zip(overall["lo"], overall["hi"], strict=True)]}),
        f"Accuracy (%) per model and decoding arm: raw, Bayes@N with {pct_level} credible "
        "interval, chance and n = questions × trials.")

    factors = tables["bayes_by_factor_pooled"]
    wide = []
    for (factor, lv), g in factors.groupby(["factor", "level"], sort=False):
        row = {"factor": factor, "level": lv,
               "chance": " / ".join(dict.fromkeys(_chance_column(g))),
               "n": " / ".join(dict.fromkeys(_n(q, t) for q, t in
                                             zip(g["n_questions"], g["n_trials"],
                                                 strict=True)))}
        for r in g.itertuples():
            row[f"{r.arm} raw"] = _pct(100 * r.accuracy)
            row[f"{r.arm} Bayes@N"] = f"{100 * r.mu:.1f} {_interval(100 * r.lo, 100 * r.hi)}"
        wide.append(row)
    out["accuracy_by_factor"] = (pd.DataFrame(wide).fillna(""),
                                 "Accuracy (%) per factor level and arm, models pooled: raw "
                                 f"and Bayes@N with {pct_level} credible interval; chance and "
                                 "n = questions × trials (per arm when they differ).")

    eff = tables["semsam_effect"]
    out["semsam_effect"] = (pd.DataFrame({
        "model": [decoded_model(m, d) for m, d in
                  zip(eff["model"], eff.get("decoder", pd.Series("local", index=eff.index)),
                      strict=True)],
        "n": [_n(q, t) for q, t in zip(eff["n_questions"], eff["n_trials"], strict=True)],
        "chance": _chance_column(eff),
        "baseline raw": [_pct(100 * v) for v in eff["baseline_accuracy"]],
        "baseline": [_pct(100 * v) for v in eff["baseline_mu"]],
        "SemSam raw": [_pct(100 * v) for v in eff["semsam_accuracy"]],
        "SemSam": [_pct(100 * v) for v in eff["semsam_mu"]],
        "effect": [_pct(100 * v) for v in eff["effect_mu"]],
        "interval": [_interval(100 * lo, 100 * hi) for lo, hi in
                     zip(eff["effect_lo"], eff["effect_hi"], strict=True)],
        "fixed": eff["n_fixed"], "broken": eff["n_broken"]}),
        "SemSam against baseline decoding on the same questions and trials: raw and Bayes@N "
        f"accuracy (%), the Bayes@N effect (points, {pct_level} credible interval), chance, "
        "n = questions × trials, and trials fixed and broken.")

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
        fit = {True: "The fit converged.", None: "The fit's convergence is unknown (no "
               "diagnostics).", False: "NOT CONVERGED: R-hat, ESS or divergences fail; do "
               "not read these effects."}[converged]
        out["factor_effects"] = (pd.DataFrame({
            "term": fe["term"], "mean": [f"{v:.2f}" for v in fe["mean"]],
            "interval": [f"[{lo:.2f}, {hi:.2f}]" for lo, hi in
                         zip(fe["lo95"], fe["hi95"], strict=True)],
            "R-hat": [f"{v:.3f}" for v in fe["r_hat"]],
            "ESS": [f"{v:.0f}" for v in fe["ess_bulk"]]}),
            "Factor model: fixed effects on the logit scale (sum-to-zero deviations), "
            f"95 % intervals, R-hat and bulk ESS. {fit}")
    return out


def macro_name(*parts: str) -> str:
    """A LaTeX macro name from words (letters only): ``("std_gap", "run")`` → ``StdGapRun``."""
    words = re.split(r"[^A-Za-z0-9]+", " ".join(parts))
    digits = {str(i): w for i, w in enumerate(
        ("Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine"))}
    name = "".join(w[:1].upper() + w[1:] for w in words if w)
    return "".join(digits.get(ch, ch) for ch in name)


def _count(n: int) -> str:
    """An integer for LaTeX with a thin-space-free thousands comma (``1{,}128``)."""
    return f"{int(n):,}".replace(",", "{,}")


def _headline_rows(claims: pd.DataFrame, semsam_model: str) -> pd.DataFrame:
    """One row per claim id: the paper's model's row where several models ran, else the first."""
    picked = []
    for _, g in claims.groupby("id", sort=False):
        mine = g[g["models"].str.lower().str.contains(semsam_model.lower(), regex=False)]
        picked.append((mine if len(mine) else g).iloc[0])
    return pd.DataFrame(picked)


def numbers_tex(claims: pd.DataFrame, tables: Mapping[str, pd.DataFrame], prov: Provenance,
                prefix: str = "mis", semsam_model: str = "Qwen3-VL-32B",
                recovery: Mapping[str, Any] | None = None) -> str:
    """``\\newcommand`` macros: the profile and counts, the demo switch, the headline numbers.

    ``\\ifmisdemo`` is true when a smoke model (random weights) answered, so that
    ``main.tex`` can say that it is the demo; ``\\ifmissimulated`` when the responses were
    simulated; ``\\ifmisconverged`` when stage 07's fit converged. ``recovery``
    (:func:`read_recovery`) gives the recovery study's coverage (``n/a`` without one),
    ``\\ifmisrecovery`` and ``\\ifmisrecoveryconverged``, and its calibration test's
    ``\\misRecoveryCalibrationP`` (``= 0.62`` or ``< 0.001``, for ``$p ...$``),
    ``\\ifmisrecoverycalibrated`` and
    ``\\ifmisrecoveryunbiased``.
    """
    lines = ["% Generated by mislib.claims (notebook 08_paper_assets); do not edit.",
             f"% {caption(prov)}",
             "% Percent (levels) or percentage points (differences)."]

    def add(name: str, value: str) -> None:
        lines.append(f"\\newcommand{{\\{prefix}{name}}}{{{value}}}")

    rec = recovery or {}
    cal = rec.get("calibration") or {}
    for flag, value in (("demo", prov.smoke), ("simulated", prov.simulated),
                        ("converged", prov.converged is True), ("recovery", bool(rec)),
                        ("recoveryconverged", rec.get("converged") is True),
                        ("recoverycalibrated", bool(cal)),
                        ("recoveryunbiased", cal.get("unbiased") is True)):
        lines += [f"\\newif\\if{prefix}{flag}", f"\\{prefix}{flag}{'true' if value else 'false'}"]
    add("Profile", latex_escape(prov.profile))
    add("Models", latex_escape(", ".join(prov.models)))
    add("RunIds", latex_escape(", ".join(prov.run_ids)))
    add("Provenance", latex_escape(prov.label()))
    add("NQuestionsGenerated", _count(prov.n_questions_generated))
    add("NQuestionsAsked", _count(prov.n_questions_asked))
    add("NQuestionsAnswered", _count(prov.n_questions_asked if prov.n_questions_answered is None
                                     else prov.n_questions_answered))
    add("NTrials", str(prov.n_trials))
    add("NModels", str(len(prov.models)))
    add("NResponses", _count(len(tables["scored"])))
    add("Tolerance", f"{float(claims['tolerance'].iat[0]):g}" if len(claims) else "")
    add("RecoveryCovered", str(rec["covered"]) if rec else "n/a")
    add("RecoveryTerms", str(rec["terms"]) if rec else "n/a")
    add("RecoveryCoverage", _pct(100 * rec["coverage"], 0) if rec else "n/a")
    # relation and value, for math mode: "= 0.62", "< 0.001"
    add("RecoveryCalibrationP", "n/a" if not cal else "< 0.001" if cal["p_value"] < 0.001
        else f"= {cal['p_value']:.2g}")
    counts = claims["status"].value_counts()
    for status in STATUSES:
        add("N" + macro_name(status), str(int(counts.get(status, 0))))
    for r in _headline_rows(claims, semsam_model).itertuples():
        base = macro_name(r.id)
        add(base + "Paper", _paper(r.paper) or "n/a")
        add(base + "Model", latex_escape(_short_model(r.models)) or "n/a")
        add(base + "Run", _pct(r.estimate) or "n/a")
        add(base + "RunCI", _interval(r.lo, r.hi) or "n/a")
        add(base + "Raw", _pct(r.raw) or "n/a")
        add(base + "Chance", _pct(r.chance) or "n/a")
        add(base + "N", latex_escape(_claim_n(r.kind, r.n_questions, r.n_trials,
                                              r.minus_n_questions, r.minus_n_trials))
            or "n/a")
        add(base + "Status", r.status)
    by = tables["bayes_by_factor_pooled"]
    overall = by[by["factor"] == "all"].set_index("arm")
    for arm in ARMS:
        r = overall.loc[arm] if arm in overall.index else None
        add("Acc" + macro_name(arm), "n/a" if r is None else _pct(100 * r["mu"]))
        add("Acc" + macro_name(arm) + "CI",
            "n/a" if r is None else _interval(100 * r["lo"], 100 * r["hi"]))
        add("Raw" + macro_name(arm), "n/a" if r is None else _pct(100 * r["accuracy"]))
        add("Chance" + macro_name(arm),
            "n/a" if r is None or "chance" not in r else _pct(100 * r["chance"]) or "n/a")
    return "\n".join(lines) + "\n"


BAYES_AT_N = (
    "**Bayes@N.** Each question was asked N times. Bayes@N puts a uniform Beta(1, 1) prior "
    "on a question's accuracy and updates it with its N trials: k correct answers give the "
    "posterior mean (k + 1) / (N + 2). `this run` is the average of these means over the "
    "questions, with scorio's normal-approximation credible interval. The data's weight is "
    "N / (N + 2), the prior's (a pull towards 50 %) 2 / (N + 2): with N = 2 a question "
    "answered wrongly both times counts 25 % and one answered rightly both times 75 %, so a "
    "model that is always wrong scores 25 %, not 0 %. `raw` is the plain share of correct "
    "trials and `chance` the accuracy of guessing (the mean of 1 / number of answer "
    "options); `n` is questions × trials (each side's for a difference). If a paper number "
    "is a plain accuracy, Bayes@N pulls this run's value towards 50 % by the same factor (N = 5: a 13-point difference "
    "shows as 9.3 points).")


def _recovery_sentence(recovery: Mapping[str, Any] | None) -> str:
    if not recovery:
        return " No recovery study was run: nothing shows that the factor model finds effects."
    fit = {True: "", False: " (its fit did not converge)", None: ""}[recovery["converged"]]
    cal = recovery.get("calibration")
    verdict = "" if not cal else (
        f" Taken together the planted effects lie where the fit puts them (calibration test "
        f"p = {cal['p_value']:.2f}): no sign of bias." if cal["unbiased"] else
        f" Taken together the planted effects lie further from the fit than chance allows "
        f"(calibration test p = {cal['p_value']:.1g}): the recovery is BIASED.")
    return (f" In stage 07's recovery study (simulated effects shaped like the paper's), the "
            f"factor model's 95 % intervals covered {recovery['covered']} of "
            f"{recovery['terms']} planted effects ({100 * recovery['coverage']:.0f} %){fit}."
            + verdict)


def claims_markdown(claims: pd.DataFrame, context: Mapping[str, Any]) -> str:
    """``paper/claims.md``: the provenance, the rules, Bayes@N, then one section per claim."""
    prov: Provenance = context["provenance"]
    tol = context.get("tolerance", 5.0)
    lines = ["# Headline claims of the paper beside this run", "",
             f"{caption(prov)} Claims arm `{context.get('arm')}` (models pooled) for the "
             f"factor claims; {100 * context.get('level', 0.95):g} % credible intervals.", ""]
    if prov.smoke:
        lines += ["> **The demo's smoke model has random weights: its answers are noise. "
                  "These numbers test the pipeline, not the paper; no claim is assessed.**",
                  ""]
    if prov.simulated:
        lines += ["> **Simulated responses (mislib.simulate): these numbers test the pipeline "
                  "only.**", ""]
    if prov.converged is False:
        lines += ["> **Stage 07's factor model did not converge (R-hat, ESS or divergences): "
                  "its column says *not converged*.**", ""]
    elif prov.converged is None:
        lines += ["> Stage 07's diagnostics are missing: the factor model's convergence is "
                  "unknown.", ""]
    lines += [
        f"**The reproduction test** (tolerance ± {tol:g} percent or points, "
        f"`[paper] tolerance_points`). A level is *reproduced* when this run's interval lies "
        "inside the paper's value ± the tolerance, *contradicted* when it lies entirely "
        "outside that band, *inconclusive* otherwise (wider than the band or across its "
        "edge). A difference is *reproduced* only when its interval also excludes 0 on the "
        "side of the paper's sign; it is *contradicted* when it lies outside the band or "
        "excludes 0 on the other side. Where the paper gives a direction but no number "
        "(`> 0`), only the side of 0 is tested. A claim is *not assessed* when the smoke "
        "model answered it, when it rests on fewer than "
        f"{context.get('min_questions', 30)} questions (`[paper] min_questions`), or when "
        "the paper's number is another model's; *not measurable* when this run has no such "
        "questions or arms. The SemSam claims are evaluated for every model that ran both "
        "arms; the paper's numbers are its model's (`paper model`).", "",
        BAYES_AT_N, "",
        "`factor model` is stage 07's population-averaged estimate of the same contrast "
        "where it has one (it pools both arms and every ablation, so its scope is wider); "
        "it reads *not converged* when that fit did not converge." + _recovery_sentence(
            context.get("recovery")), ""]
    counts = claims["status"].value_counts()
    lines += ["Summary: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES) + ".", ""]
    for claim, g in claims.groupby("claim", sort=False):
        lines += [f"## {claim}", ""]
        shown = claims_display(g).drop(columns=["status"])
        shown.insert(1, "paper model", g["paper_model"].to_numpy())
        shown["status"] = g["status"].to_numpy()
        shown["why"] = g["reason"].to_numpy()
        lines += [markdown_table(shown)]
        by_source: dict[str, list[str]] = {}
        for quantity, source in zip(g["quantity"], g["source"], strict=True):
            by_source.setdefault(source, [])
            if quantity not in by_source[source]:
                by_source[source].append(quantity)
        if len(by_source) == 1:
            lines += [f"Paper source: {next(iter(by_source))}.", ""]
        else:
            lines += ["Paper sources: " + "; ".join(f"{', '.join(q)}: {src}" for src, q in
                                                    by_source.items()) + ".", ""]
    return "\n".join(lines)


def _fingerprint(files: Sequence[Path]) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
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
    ``factor_diagnostics.json`` (whether the fit converged; unknown when absent) and its
    recovery study (coverage; said to be missing when absent).

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
