"""Bayes@N: accuracy over repeated trials as a posterior, per group and paired by arm.

Accuracy is summarised with Bayes@N (Hariri et al., 2026) as implemented by the
``scorio`` package: per question a Dirichlet(1, ..., 1) prior updated by its N trials, and
the posterior mean ``mu`` and standard deviation ``sigma`` of the average score over the
question set. Credible intervals are scorio's central normal approximation, clipped to
the score's range. The SemSam effect (:func:`semsam_effect`) compares the two arms on the
same questions and trials (they share per-(question, trial) seeds).

>>> mu, sigma = bayes_at_n([[1, 1, 0], [0, 0, 0]])
>>> round(mu, 4), round(sigma, 4)
(0.4, 0.1291)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from mislib.vocabulary import QUESTION_FACTORS, decoded_model, decoder_of

#: Category scores of the paired SemSam coding ``2 * baseline_correct + semsam_correct``.
PAIRED_WEIGHTS = np.array([0.0, 1.0, -1.0, 0.0])


def bayes_at_n(R: Any, w: Any = None) -> tuple[float, float]:
    """Bayes@N posterior mean and standard deviation of the average score.

    Parameters
    ----------
    R : array-like of int, shape (M, N)
        Outcome category of each of N trials of M questions; binary (0 wrong, 1 right)
        unless ``w`` is given. A boolean matrix is read as 0/1.
    w : array-like of float, shape (C + 1,), optional
        Score of each category ``0..C`` (default ``[0, 1]``: accuracy).

    Returns
    -------
    (mu, sigma) : floats, in the units of ``w`` (accuracy in [0, 1] by default).

    Raises
    ------
    ValueError
        When ``R`` is not a non-empty 2-D matrix or holds a category ``w`` does not score.

    Examples
    --------
    >>> mu, sigma = bayes_at_n([[1, 1, 0], [0, 0, 0]])
    >>> round(mu, 4), round(sigma, 4)
    (0.4, 0.1291)
    """
    from scorio.eval import bayes

    R = np.asarray(R)
    if R.ndim != 2 or R.shape[0] == 0 or R.shape[1] == 0:
        raise ValueError(f"R must be a non-empty (questions, trials) matrix; got shape {R.shape}")
    if R.dtype == bool:
        R = R.astype(np.int64)
    mu, sigma = bayes(R, None if w is None else np.asarray(w, dtype=float))
    return float(mu), float(sigma)


def bayes_interval(R: Any, w: Any = None, level: float = 0.95) -> tuple[float, float, float,
                                                                       float]:
    """``(mu, sigma, lo, hi)``: Bayes@N with a central credible interval at ``level``.

    The interval is scorio's normal approximation, clipped to ``[min(w), max(w)]``.
    """
    from scorio.eval import bayes_ci

    R = np.asarray(R)
    if R.ndim != 2 or R.shape[0] == 0 or R.shape[1] == 0:
        raise ValueError(f"R must be a non-empty (questions, trials) matrix; got shape {R.shape}")
    if R.dtype == bool:
        R = R.astype(np.int64)
    weights = np.array([0.0, 1.0]) if w is None else np.asarray(w, dtype=float)
    mu, sigma, lo, hi = bayes_ci(R, weights, confidence=level,
                                 bounds=(float(weights.min()), float(weights.max())))
    return mu, sigma, lo, hi


def outcome_matrix(rows: pd.DataFrame, value: str = "correct") -> tuple[np.ndarray, np.ndarray,
                                                                        int]:
    """The (question, trial) matrix of one group of scored rows.

    Parameters
    ----------
    rows : DataFrame with ``question_id``, ``trial`` and ``value`` (one row per
        (question, trial); duplicates are an error).
    value : the column to place in the matrix (bool or small int).

    Returns
    -------
    R : ndarray, shape (M, N), int64 — the first N = (most trials any question has) trials
        of every question that has all of them.
    question_ids : ndarray, shape (M,) — the row labels.
    n_incomplete : int — questions left out because they have fewer than N trials (an
        unfinished run); Bayes@N needs the same N for every question.
    """
    dup = rows.duplicated(["question_id", "trial"])
    if dup.any():
        first = rows.loc[dup, ["question_id", "trial"]].iloc[0].tolist()
        raise ValueError(f"{int(dup.sum())} duplicated (question_id, trial) rows, e.g. {first}; "
                         "two runs of the same model and arm? choose one with [scoring] runs")
    wide = rows.pivot(index="question_id", columns="trial", values=value)
    complete = wide.notna().all(axis=1)
    wide = wide[complete]
    return (wide.to_numpy(dtype=np.int64), wide.index.to_numpy(),
            int((~complete).sum()))


def chance_level(rows: pd.DataFrame, question_ids: Any = None) -> float:
    """Mean over questions of ``1 / n_options``: the accuracy of answering at random.

    ``rows`` carry ``question_id`` and ``n_options`` (stage 06's ``scored`` table); only the
    questions in ``question_ids`` count when given. NaN without an ``n_options`` column.
    """
    if "n_options" not in rows or rows.empty:
        return float("nan")
    per_question = rows.drop_duplicates("question_id").set_index("question_id")["n_options"]
    if question_ids is not None:
        per_question = per_question.reindex(question_ids)
    return float((1.0 / per_question.astype(float)).mean())


#: The column :func:`bayes_by` marks each pooled (model, arm) with.
_UNIT = "_pooled_unit"


def _pooled_matrix(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`outcome_matrix` of rows pooled over (model, arm) units (:data:`_UNIT`).

    Each unit's questions are complete on that unit's own trials (an unfinished question
    is left out as in :func:`outcome_matrix`); units sent different numbers of trials are
    pooled on the first N trials of each, N the fewest any unit has, since Bayes@N needs
    one N. (Against the most trials of any unit, every question of a unit sent fewer was
    'incomplete', and a pooled estimate was the other units' alone.)
    """
    parts = [outcome_matrix(g.drop(columns=_UNIT)) for _, g in rows.groupby(_UNIT, sort=True)]
    n_incomplete = sum(p[2] for p in parts)
    parts = [p for p in parts if p[0].size]
    if not parts:
        return np.zeros((0, 0), np.int64), np.array([], dtype=object), n_incomplete
    n = min(p[0].shape[1] for p in parts)
    return (np.vstack([p[0][:, :n] for p in parts]),
            np.concatenate([p[1] for p in parts]), n_incomplete)


def _bayes_row(rows: pd.DataFrame, level: float) -> dict[str, Any]:
    R, qids, n_incomplete = (_pooled_matrix(rows) if _UNIT in rows else outcome_matrix(rows))
    if R.size == 0:
        return {"n_questions": 0, "n_trials": 0, "n_incomplete": n_incomplete,
                "n_responses": 0, "accuracy": np.nan, "chance": np.nan, "mu": np.nan,
                "sigma": np.nan, "lo": np.nan, "hi": np.nan}
    mu, sigma, lo, hi = bayes_interval(R, level=level)
    return {"n_questions": int(R.shape[0]), "n_trials": int(R.shape[1]),
            "n_incomplete": n_incomplete, "n_responses": int(R.size),
            "accuracy": float(R.mean()), "chance": chance_level(rows, qids),
            "mu": mu, "sigma": sigma, "lo": lo, "hi": hi}


def bayes_by(scored: pd.DataFrame, by: Sequence[str], level: float = 0.95) -> pd.DataFrame:
    """Bayes@N accuracy of every group of ``scored`` rows.

    Parameters
    ----------
    scored : the ``scored.parquet`` table (``question_id, trial, correct`` + factors).
    by : grouping columns, e.g. ``["model", "arm", "convention", "terminology"]``; rows
        where a grouping column is null (the factor does not apply) are left out. Without
        ``model`` (or ``arm``) in ``by`` the models (arms) are pooled, each (model, arm,
        question) counting as one question of Bayes@N; (model, arm)s sent different
        numbers of trials are pooled on the first N trials of each, N the fewest. With a ``backend`` column, a model
        decoded on an endpoint is the model ``"<model> via <decoder>"``
        (:func:`mislib.vocabulary.decoded_model`), never pooled into its local run.
    level : credible level of ``lo``/``hi``.

    Returns
    -------
    DataFrame, one row per group: the ``by`` columns, ``n_questions, n_trials,
    n_incomplete, n_responses`` (questions × trials), ``accuracy`` (raw mean), ``chance``
    (mean of ``1 / n_options`` over the questions; NaN when ``scored`` lacks
    ``n_options``), ``mu, sigma, lo, hi`` (Bayes@N, fractions).
    """
    missing = [c for c in (*by, "question_id", "trial", "correct") if c not in scored]
    if missing:
        raise ValueError(f"scored table lacks columns {missing}")
    table = scored.dropna(subset=list(by))
    if "backend" in table and any(decoder_of(b) != "local" for b in table["backend"].unique()):
        # a model decoded on an endpoint is its own model, as stage 06 scores it beside
        # the local run (mislib.vocabulary.decoded_model)
        table = table.assign(model=[decoded_model(m, b) for m, b in
                                    zip(table["model"], table["backend"], strict=True)])
    # Pooling over models or arms: each (model, arm, question) is its own Bayes@N row.
    pooled = [c for c in ("model", "arm") if c in table and c not in by]
    if pooled and len(table.drop_duplicates(pooled)) > 1:
        unit = table[pooled[0]].astype(str)
        for c in pooled[1:]:
            unit = unit + "\x1f" + table[c].astype(str)
        table = table.assign(question_id=unit + "\x1f" + table["question_id"].astype(str),
                             **{_UNIT: unit})
    rows = []
    for key, group in table.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key, strict=True)), **_bayes_row(group, level)})
    columns = [*by, "n_questions", "n_trials", "n_incomplete", "n_responses", "accuracy",
               "chance", "mu", "sigma", "lo", "hi"]
    return pd.DataFrame(rows, columns=columns)


def bayes_by_factor(scored: pd.DataFrame, factors: Sequence[str] = QUESTION_FACTORS,
                    level: float = 0.95, per_model: bool = True) -> pd.DataFrame:
    """Bayes@N per model × arm overall (``factor == level == "all"``) and per factor level.

    Parameters
    ----------
    per_model : False pools the models (``model`` is then ``"all models"``).

    Returns
    -------
    DataFrame with ``model, arm, factor, level`` and the columns of :func:`bayes_by`.
    Factors absent from ``scored`` are skipped; a factor's null rows (not applicable to
    that question) are left out of its levels.
    """
    keys = ["model", "arm"] if per_model else ["arm"]
    parts = []
    overall = bayes_by(scored, keys, level)
    parts.append(overall.assign(factor="all", level="all"))
    for factor in factors:
        if factor not in scored:
            continue
        table = bayes_by(scored, [*keys, factor], level)
        parts.append(table.rename(columns={factor: "level"}).assign(factor=factor))
    out = pd.concat(parts, ignore_index=True)
    if not per_model:
        out["model"] = "all models"
    out["level"] = out["level"].astype(str)
    out["credible_level"] = level
    first = ["model", "arm", "factor", "level"]
    return out[first + [c for c in out.columns if c not in first]]


def semsam_effect(scored: pd.DataFrame, baseline: str = "baseline", treated: str = "semsam",
                  level: float = 0.95) -> pd.DataFrame:
    """The paired SemSam effect per model: SemSam minus baseline on the same (question, trial).

    Arms are paired by (model, decoder): a model answered through an endpoint
    (``backend = "openai"``) is a comparison of its own beside the same model decoded
    locally (``decoder = "local"``: the hf and vllm backends, which give the same tokens).

    Only (question, trial) pairs answered in both arms enter, so the two arms are compared
    on identical questions with identical per-(question, trial) seeds. Two estimates:

    - ``effect_*``: the difference of the two arms' Bayes@N posteriors on that shared set
      (``semsam_mu - baseline_mu``; ``effect_sigma`` adds the two variances, the arms'
      outcomes being independent given the question). It is consistent with the arm
      accuracies shown beside it and is what the claims and figures use.
    - ``paired_*``: Bayes@N (scorio) of the trial-paired outcome coded in four categories
      (baseline wrong/right × SemSam wrong/right, scores ``0, +1, -1, 0``). It uses the
      trial pairing, so shared per-trial noise cancels, but its Dirichlet(1,1,1,1) prior
      shrinks the difference by N/(N+4) per question where the arms' priors shrink by
      N/(N+2): with few trials it is closer to zero than ``effect_mu``.

    Returns
    -------
    DataFrame, one row per (model, decoder) answered in both arms: ``model, decoder,
    n_questions, n_trials, n_responses`` (shared questions × trials per arm), ``chance`` (mean
    ``1 / n_options`` of the shared questions), ``baseline_mu, baseline_sigma, baseline_lo,
    baseline_hi, semsam_mu, ..., effect_mu,
    effect_sigma, effect_lo, effect_hi, paired_mu, paired_sigma, paired_lo, paired_hi``
    (fractions), ``baseline_accuracy, semsam_accuracy`` (plain means of the shared
    trials), ``n_fixed`` (trials baseline got wrong and SemSam right), ``n_broken``
    (the reverse) and ``credible_level``.
    """
    from scorio.eval.utils import normal_credible_interval

    rows = []
    decoders = (scored["backend"].map(decoder_of) if "backend" in scored
                else pd.Series("local", index=scored.index))
    for (model, decoder), group in scored.groupby([scored["model"], decoders.rename("decoder")],
                                                  sort=True):
        arms = {arm: g.set_index(["question_id", "trial"])["correct"]
                for arm, g in group.groupby("arm") if arm in (baseline, treated)}
        if len(arms) < 2:
            continue
        both = pd.concat({"b": arms[baseline], "s": arms[treated]}, axis=1, join="inner")
        if both.empty:
            continue
        code = (2 * both["b"].astype(int) + both["s"].astype(int)).rename("code")
        R, qids, _ = outcome_matrix(code.reset_index(), "code")
        if R.size == 0:
            continue
        b_mu, b_sigma, b_lo, b_hi = bayes_interval(R // 2, level=level)
        s_mu, s_sigma, s_lo, s_hi = bayes_interval(R % 2, level=level)
        e_mu, e_sigma = s_mu - b_mu, math.hypot(s_sigma, b_sigma)
        e_lo, e_hi = normal_credible_interval(e_mu, e_sigma, credibility=level,
                                              bounds=(-1.0, 1.0))
        p_mu, p_sigma, p_lo, p_hi = bayes_interval(R, PAIRED_WEIGHTS, level)
        rows.append({"model": model, "decoder": decoder, "n_questions": R.shape[0],
                     "n_trials": R.shape[1], "n_responses": int(R.size),
                     "chance": chance_level(group, qids),
                     "baseline_mu": b_mu, "baseline_sigma": b_sigma, "baseline_lo": b_lo,
                     "baseline_hi": b_hi, "semsam_mu": s_mu, "semsam_sigma": s_sigma,
                     "semsam_lo": s_lo, "semsam_hi": s_hi, "effect_mu": e_mu,
                     "effect_sigma": e_sigma, "effect_lo": e_lo, "effect_hi": e_hi,
                     "paired_mu": p_mu, "paired_sigma": p_sigma, "paired_lo": p_lo,
                     "paired_hi": p_hi, "baseline_accuracy": float((R // 2).mean()),
                     "semsam_accuracy": float((R % 2).mean()), "n_fixed": int((R == 1).sum()),
                     "n_broken": int((R == 2).sum()), "credible_level": level})
    columns = ["model", "decoder", "n_questions", "n_trials", "n_responses", "chance",
               "baseline_mu", "baseline_sigma",
               "baseline_lo", "baseline_hi", "semsam_mu", "semsam_sigma", "semsam_lo",
               "semsam_hi", "effect_mu", "effect_sigma", "effect_lo", "effect_hi", "paired_mu",
               "paired_sigma", "paired_lo", "paired_hi", "baseline_accuracy",
               "semsam_accuracy", "n_fixed", "n_broken", "credible_level"]
    return pd.DataFrame(rows, columns=columns)
