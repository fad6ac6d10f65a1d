"""Trials to binomial counts and integer factor codes: the input of the factor model.

:func:`prepare_factor_data` aggregates scored trials to one row per (model, arm, question)
with ``n`` trials and ``k`` correct, codes every factor's levels in the benchmark's order
(-1 where a factor does not apply to a question), drops what the data cannot identify, and
finds the blocks of pair and volume levels that no question links (:func:`_linked_levels`).

>>> from mislib.simulate import simulate_study, scored_table
>>> scored = scored_table(simulate_study(n_questions=300, n_trials=2, seed=3))
>>> data = prepare_factor_data(scored)
>>> data.factors[:3], int(data.obs["n"].sum()) == len(scored)
(['arm', 'model', 'modality'], True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mislib.vocabulary import (
    MODEL_FACTORS,
    TRIAL_FACTORS,
    decoded_model,
    interaction_name,
    ordered,
    structure_pair,
)

#: The factors of the model (:data:`mislib.vocabulary.MODEL_FACTORS`).
FACTORS: tuple[str, ...] = MODEL_FACTORS
#: The interactions the paper's claims need.
INTERACTIONS: tuple[str, ...] = ("convention:terminology", "prompt:terminology",
                                 "ablation:terminology", "arm:model")
#: The crossed random intercepts.
GROUPS: tuple[str, ...] = ("question", "pair", "volume")
#: Fewer questions per level on average: a pair/volume intercept is dropped, since it cannot
#: be told apart from the question intercept.
MIN_QUESTIONS_PER_LEVEL = 2.0


@dataclass
class FactorData:
    """Binomial counts and integer codes, the input of :func:`mislib.analysis.build_model`.

    Attributes
    ----------
    obs : DataFrame, one row per (model, arm, question): ``model, arm, question_id, n, k``,
        the factor columns and ``pair, volume_id``.
    factors : factors in the model (each with at least two observed levels).
    levels : the levels of each factor and group, in model order.
    interactions : pairs of factors whose interaction is in the model.
    codes : factor → int array[n_obs], the level index, -1 where the factor does not apply.
    question_index : int array[n_obs], the row's question in ``levels["question"]``.
    group_codes : group → int array[n_questions], each question's pair / volume index.
    dropped : term → why it is not in the model.
    nested : group → the factors whose levels split the group's levels into unlinked
        blocks (volume → modality; pair → modality, and family, terminology: single
        structures of plane questions against pairs of relation questions).
    group_blocks : group → int array[n_levels], the level's block (see
        :func:`_linked_levels`); the model samples the intercepts as deviations summing to
        zero within each block plus one mean per block.
    block_labels : group → a name per block (``"modality=CT,family=plane"``).
    """

    obs: pd.DataFrame
    factors: list[str]
    levels: dict[str, list[str]]
    interactions: list[tuple[str, str]]
    codes: dict[str, np.ndarray]
    question_index: np.ndarray
    group_codes: dict[str, np.ndarray]
    dropped: dict[str, str] = field(default_factory=dict)
    nested: dict[str, list[str]] = field(default_factory=dict)
    group_blocks: dict[str, np.ndarray] = field(default_factory=dict)
    block_labels: dict[str, list[str]] = field(default_factory=dict)


def _parse_interactions(interactions: Sequence[str | tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for item in interactions:
        pair = tuple(item.split(":")) if isinstance(item, str) else tuple(item)
        if len(pair) != 2 or not all(pair):
            raise ValueError(f"interaction {item!r} must name two factors as 'f1:f2'")
        out.append(pair)
    return out


def prepare_factor_data(scored: pd.DataFrame, factors: Sequence[str] = FACTORS,
                        interactions: Sequence[str | tuple[str, str]] = INTERACTIONS,
                        groups: Sequence[str] = GROUPS) -> FactorData:
    """Aggregate scored trials to binomial counts and code the factors.

    Parameters
    ----------
    scored : one row per (model, arm, question, trial) with ``model, arm, question_id,
        correct`` and the question's factor columns (``scored.parquet`` of stage 06, or
        responses joined with ``questions.parquet``); ``component_a, component_b`` for the
        pair and ``volume_id`` for the volume intercepts.
    factors, interactions, groups : what enters the model (see :mod:`mislib.analysis`).

    Returns
    -------
    FactorData
    """
    interactions = _parse_interactions(interactions)
    question_cols = _check_scored(scored, factors, interactions, groups)
    obs = aggregate_trials(scored, question_cols, with_pair="pair" in groups)
    dropped: dict[str, str] = {}
    kept, levels, codes, inter = _code_factors(obs, factors, interactions, dropped)
    q_codes, q_levels = pd.factorize(obs["question_id"], sort=True)
    levels["question"] = list(q_levels)
    group_codes = _group_codes(obs, q_levels, groups, levels, dropped)
    nested, group_blocks, block_labels = _group_blocks(group_codes, kept, codes, levels,
                                                       first_rows(q_codes, len(q_levels)))
    return FactorData(obs=obs, factors=kept, levels=levels, interactions=inter, codes=codes,
                      question_index=q_codes.astype(np.int64), group_codes=group_codes,
                      dropped=dropped, nested=nested, group_blocks=group_blocks,
                      block_labels=block_labels)


def _check_scored(scored: pd.DataFrame, factors: Sequence[str],
                  interactions: list[tuple[str, str]], groups: Sequence[str]) -> list[str]:
    """Validate the scored table; return the question-level columns the model reads."""
    need = {"model", "arm", "question_id", "correct"} | set(factors)
    need |= {f for pair in interactions for f in pair}
    if "pair" in groups:
        need |= {"component_a", "component_b"}
    if "volume" in groups:
        need.add("volume_id")
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown random-intercept groups {sorted(unknown)}; known: {GROUPS}")
    missing = sorted(need - set(scored.columns))
    if missing:
        raise ValueError(f"scored table lacks column(s) {missing}; it has {list(scored.columns)}")
    if scored.empty:
        raise ValueError("scored table has no rows")
    if scored["correct"].isna().any():
        raise ValueError(f"column 'correct' has {int(scored['correct'].isna().sum())} null "
                         "values; score every trial (unparseable answers count as wrong)")
    return [c for c in dict.fromkeys(
        [f for f in need if f not in TRIAL_FACTORS and f not in ("correct", "question_id")])]


def aggregate_trials(scored: pd.DataFrame, question_cols: Sequence[str],
                     with_pair: bool = True) -> pd.DataFrame:
    """One row per (model, arm, question): ``n`` trials, ``k`` correct, the question columns.

    ``question_cols`` must be constant over the trials of a question (an error names the
    ones that are not); with ``with_pair`` the order-free ``pair`` of structures is added.
    Where ``scored`` has a ``backend`` column, a model decoded on an endpoint is its own
    ``model`` level (``"<model> via openai"``): its trials are never pooled with the same
    model's local ones (:func:`mislib.vocabulary.decoded_model`).

    >>> trials = pd.DataFrame({"model": "m", "arm": "baseline", "question_id": ["q1", "q1"],
    ...                        "correct": [True, False], "family": "plane"})
    >>> aggregate_trials(trials, ["family"], with_pair=False)[["question_id", "n", "k"]]
      question_id  n  k
    0          q1  2  1
    """
    question_cols = list(question_cols)
    df = scored[["model", "arm", "question_id", "correct", *question_cols]].copy()
    df["correct"] = df["correct"].astype(bool)
    if "backend" in scored:
        df["model"] = [decoded_model(m, b) for m, b in zip(df["model"], scored["backend"],
                                                            strict=True)]
    for col in ("model", "arm", "question_id"):
        df[col] = df[col].astype(str)
    varying = df.groupby("question_id", sort=False)[question_cols].nunique(dropna=False).max()
    bad = sorted(varying[varying > 1].index)
    if bad:
        raise ValueError(f"question-level column(s) {bad} differ between trials of one question")
    obs = (df.groupby(["model", "arm", "question_id"], sort=True, observed=True)
             .agg(n=("correct", "size"), k=("correct", "sum")).reset_index())
    per_q = df.drop_duplicates("question_id").set_index("question_id")[question_cols]
    obs = obs.join(per_q, on="question_id")
    obs["k"] = obs["k"].astype(np.int64)
    if with_pair:
        obs["pair"] = structure_pair(obs["component_a"], obs["component_b"])
    return obs


def _code_factors(obs: pd.DataFrame, factors: Sequence[str],
                  interactions: list[tuple[str, str]], dropped: dict[str, str]):
    """Level codes of the factors with two or more observed levels, and the interactions kept.

    Returns ``(kept factors, levels, codes, interactions)``; what is left out is recorded
    in ``dropped`` with the reason.
    """
    kept, levels, codes = [], {}, {}
    for f in dict.fromkeys([*factors, *(x for p in interactions for x in p)]):
        lv = ordered(f, obs[f])
        if len(lv) < 2:
            dropped[f] = f"{len(lv)} observed level(s) {lv}"
            continue
        levels[f] = lv
        codes[f] = pd.Categorical(obs[f].astype(object).where(obs[f].notna()),
                                  categories=lv).codes.astype(np.int64)
        if f in factors:
            kept.append(f)
    inter = []
    for f1, f2 in interactions:
        name = interaction_name(f1, f2)
        if f1 not in levels or f2 not in levels:
            dropped[name] = "a factor has fewer than two observed levels"
            continue
        both = (codes[f1] >= 0) & (codes[f2] >= 0)
        if not both.any():
            dropped[name] = "the two factors never apply to the same question"
            continue
        inter.append((f1, f2))
    # An interaction's factors need their main effects (sum-to-zero coding).
    for f in {x for p in inter for x in p} - set(kept):
        kept.append(f)
    kept = [f for f in dict.fromkeys([*factors, *kept]) if f in kept]
    for f in list(codes):
        if f not in kept:
            codes.pop(f)
            levels.pop(f)
    return kept, levels, codes, inter


def _group_codes(obs: pd.DataFrame, q_levels, groups: Sequence[str],
                 levels: dict[str, list[str]], dropped: dict[str, str]) -> dict[str, np.ndarray]:
    """Each question's level of every random-intercept group that can be identified."""
    first = obs.drop_duplicates("question_id").set_index("question_id").loc[q_levels]
    group_codes = {}
    for g, col in (("pair", "pair"), ("volume", "volume_id")):
        if g in groups:
            c, u = pd.factorize(first[col].astype(str), sort=True)
            per_level = len(q_levels) / len(u)
            if "question" in groups and per_level < MIN_QUESTIONS_PER_LEVEL:
                # Nearly one question per level: this intercept and the question's are not
                # separately identified, and their SDs would only trade off.
                dropped[g] = (f"{per_level:.2f} questions per {g} (< "
                              f"{MIN_QUESTIONS_PER_LEVEL}): not separable from the question "
                              "intercept")
                continue
            group_codes[g] = c.astype(np.int64)
            levels[g] = list(u)
    if "question" in groups:
        group_codes["question"] = np.arange(len(q_levels), dtype=np.int64)
    return group_codes


def first_rows(index: np.ndarray, n: int) -> np.ndarray:
    """The first position of each value ``0..n-1`` in ``index`` (every value must occur).

    >>> first_rows(np.array([1, 0, 1, 2]), 3)
    array([1, 0, 3])
    """
    first = np.zeros(n, dtype=np.int64)
    first[index[::-1]] = np.arange(len(index))[::-1]
    return first


def _group_blocks(group_codes: dict[str, np.ndarray], kept: Sequence[str],
                  codes: dict[str, np.ndarray], levels: dict[str, list[str]],
                  first_row: np.ndarray):
    """The blocks of each group's levels that no question links, and the factors splitting them.

    The levels of a pair or volume group fall into blocks that no question links: volumes of
    different modalities (modality is nested in volume), pairs of two structures and single
    structures (plane questions: family is partly nested in pair). The mean intercept of a
    block trades off against the fixed effects of the factor that splits the group, a ridge
    through hundreds of coordinates that a diagonal mass matrix crosses slowly. So the model
    samples the intercepts as deviations summing to zero within each block plus one mean per
    block, and the block means join the fixed effects (:class:`~mislib.analysis.FixedDesign`).

    Returns ``(nested, group_blocks, block_labels)`` as in :class:`FactorData`.
    """
    nested, group_blocks, block_labels = {}, {}, {}
    for g, gcodes in group_codes.items():
        inside, parts = [], []
        if g != "question":
            for f in kept:
                if f in TRIAL_FACTORS:
                    continue
                part, names = _linked_levels(gcodes, codes[f][first_row], levels[f])
                if len(names) > 1:
                    inside.append(f)
                    parts.append((f, part, names))
        nested[g] = inside
        if parts:
            frame = pd.DataFrame({f: part for f, part, _ in parts})
            blocks, uniq = pd.MultiIndex.from_frame(frame).factorize()
            labels = [",".join(f"{f}={names[i]}" for (f, _, names), i in zip(parts, u,
                                                                            strict=True))
                      for u in uniq]
        else:
            blocks, labels = np.zeros(len(levels[g])), ["all"]
        group_blocks[g] = np.asarray(blocks, dtype=np.int64)
        block_labels[g] = labels
    return nested, group_blocks, block_labels


def patterns(data: FactorData) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Unique factor-code combinations ("patterns") of the rows.

    The fixed part of a row's logit depends only on its pattern, so the model and the
    contrasts compute it once per pattern (a few hundred) instead of once per row.

    Returns
    -------
    codes : int [n_pattern, n_factor]; index : int [n_obs], each row's pattern;
    counts : DataFrame ``n, k`` summed per pattern.
    """
    names = data.factors
    mat = np.stack([data.codes[f] for f in names], axis=1)
    uniq, inverse = np.unique(mat, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    counts = pd.DataFrame({"n": np.bincount(inverse, weights=data.obs["n"].to_numpy(float)),
                           "k": np.bincount(inverse, weights=data.obs["k"].to_numpy(float))})
    return uniq, inverse, counts


def _linked_levels(group_codes: np.ndarray, factor_codes: np.ndarray,
                   factor_levels: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Split a group's levels by the factor levels their questions share.

    Two group levels are linked when questions of both have one factor level (code -1,
    the factor does not apply, counts as a level); the linked sets are the connected
    components of the bipartite graph of group levels and factor levels.

    Parameters
    ----------
    group_codes, factor_codes : int [n_questions], each question's group level and factor
        code.
    factor_levels : names of the factor codes 0, 1, ...

    Returns
    -------
    int [n_group_levels], each group level's component; and per component the factor
    levels it holds, as ``"a|b"``.

    >>> _linked_levels(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), ["x", "y", "z"])
    (array([0, 0, 1]), ['x|y', 'z'])
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_g = int(group_codes.max()) + 1
    f_node = np.where(factor_codes < 0, len(factor_levels), factor_codes)
    n_f = len(factor_levels) + 1
    edges = coo_matrix((np.ones(len(group_codes)), (group_codes, n_g + f_node)),
                       shape=(n_g + n_f, n_g + n_f))
    _, comp = connected_components(edges, directed=False)
    part, uniq = pd.factorize(comp[:n_g])
    names = []
    for c in uniq:
        held = sorted(set(f_node[comp[n_g + f_node] == c]))
        names.append("|".join(factor_levels[i] if i < len(factor_levels) else "none"
                              for i in held))
    return np.asarray(part, dtype=np.int64), names
