"""The reproduction test and the claims table: each claim of
:mod:`mislib.claims.definitions` measured on stage 06's scored trials (Bayes@N, raw accuracy,
chance, n) and given a status by the rules :mod:`mislib.claims` states.

>>> claim_status("level", 77.6, 75.0, 80.0, tolerance=5.0)
'reproduced'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm

from mislib.bayes import bayes_by, semsam_effect
from mislib.claims.definitions import ARM_CLAIMS, CLAIMS, ArmClaim, Claim
from mislib.provenance import is_smoke_model
from mislib.vocabulary import decoded_model, is_missing

#: Columns of the claims table (:func:`evaluate_claims`). ``paper``, ``estimate``, ``lo``,
#: ``hi``, ``raw``, ``chance`` and ``factor_*`` are percent (levels) or points (differences).
#: ``n_questions`` × ``n_trials`` are the responses behind a level, or behind the first side
#: of a difference; ``minus_n_questions`` × ``minus_n_trials`` those of the subtracted side
#: (0 for a level).
CLAIM_COLUMNS = ("claim", "id", "quantity", "kind", "source", "models", "paper_model", "paper",
                 "sign", "tolerance", "estimate", "lo", "hi", "raw", "chance", "n_questions",
                 "n_trials", "minus_n_questions", "minus_n_trials", "status", "reason", "factor_estimate", "factor_lo", "factor_hi",
                 "factor_converged", "note")

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
