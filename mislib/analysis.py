"""Stage 07: a hierarchical logistic model of which benchmark factor breaks grounding.

The model
---------
Trials are aggregated to binomial counts, one row per (model, arm, question): ``n`` trials,
``k`` correct. The logit of accuracy is

``Intercept + Σ_f β_f[level] + Σ_(f1,f2) γ_f1,f2[l1, l2] + u_question + u_pair + u_volume``

- ``β_f`` — one vector per factor (arm, model, modality, plane, dims, convention, prompt,
  terminology, form, family, ablation), a **sum-to-zero deviation** per level
  (``pm.ZeroSumNormal``), so ``Intercept`` is the logit at the average level of every factor.
  A factor that does not apply to a question (no prompt on a text-only question, no
  terminology on a plane-naming question) is null there and adds nothing.
- ``γ_f1,f2`` — the interactions the paper's claims need (default convention × terminology,
  prompt × terminology, ablation × terminology, arm × model), sum-to-zero along both axes.
- crossed random intercepts ``u_g ~ Normal(0, σ_g)``, iid, for the question, the structure
  pair (the order-free pair of structures a question names) and the volume. Their means are
  not constrained away, so the fixed effects are population effects whose intervals
  include the uncertainty of, say, the mean intercept of the plane questions.

How it is sampled (nutpie: NUTS, diagonal mass matrix, numba backend). A diagonal mass
matrix cannot follow correlated directions, and the plain form of this model has three
kinds of them; each is removed by an exact reparameterisation:

1. *The design.* Levels are unbalanced (a rare ablation level ties to the intercept) and
   ``dims`` is separated from ``family`` by plane questions only (relation questions carry
   the dims their family implies). The fixed effects are therefore one vector ``theta`` in
   orthonormal sum-to-zero coordinates (priors exactly the ``ZeroSumNormal`` ones), sampled
   as ``theta = mode + transform @ w`` with ``transform`` from a Laplace approximation of
   the binomial GLM on the pattern counts (:class:`FixedDesign`).
2. *Random-intercept means against fixed effects.* The mean intercept of a block of pair or
   volume levels that no question links (MRI against CT volumes; single structures of plane
   questions against two-structure pairs: ``family`` is partly nested in ``pair``,
   :func:`_linked_levels`) trades off against the factor that splits them, and the mean
   question intercept over, say, the plane questions against ``family[plane]``: ridges
   through hundreds to thousands of coordinates. The intercepts are split exactly into
   the part spanned by those means (:class:`GroupCells`: block indicators for pairs and
   volumes, every level of every question-level factor and interaction for questions;
   a few dozen standard-normal coordinates that join ``theta`` and its whitening) and the
   rest, which sums to zero over each of those levels and blocks.
3. *Funnels.* The remaining intercepts are non-centred, ``u = σ·z``, by default; ``centred``
   can name groups to centre, and ``"auto"`` centres a group with >= 250 trials per level.

Paper-scale simulation (``bench/bench_analysis.py``: 33,864 questions x 5 trials x 2 arms,
500 + 500 draws, 2 chains, seed 7, on a shared 2-core machine under load): before these
changes the
smallest bulk ESS of a fixed effect was 34 of 1,000 draws (``Intercept``, ``family``), max
R-hat 1.056; after them 311 (``plane``; on 10,000 questions the median is 1,290), max
fixed-effect R-hat 1.008, SDs <= 1.009, 0
divergences, 42/42 true effects inside their 95 % intervals; 253 CPU s (sampling about
115 s of wall time on two free cores, the same cost per draw as before). The random
intercepts (500 checked per group) reach max R-hat 1.016 (volume), 1.019 (question), 1.031
(pair): above the 1.01 target, whose own noise floor at this length is about 1.01 (the
largest of 1,500 R-hats of independent draws, 2 x 500, is 1.009-1.013). With seed 8 on a
quieter machine: 135 s wall (sampling 116 s), 250 CPU s, max fixed-effect R-hat 1.0098,
``sd[volume]`` 1.016, random intercepts up to 1.021, 0 divergences, 42/42 covered.
Centring pairs and volumes was worse (bulk ESS 94, fixed R-hat 1.018); so were two further
exact reparameterisations tried on 10,000 questions and not kept (a pair's or volume's
intercept shifted by its questions' mean, which questions are nested in; the SDs sampled
as the intercepts' own spread): neither raised the SDs' bulk ESS (~350 of 1,000) nor
lowered the random intercepts' largest R-hat. nutpie's low-rank adaptation was 3.5x
slower per draw than the diagonal one (before these changes).

The benchmark now samples 250 tuning steps and 1,200 draws per chain (the same time budget;
the largest of ~1,500 rank R-hats of independent draws is 1.004-1.005 at that length, against
1.009-1.019 at 2 x 500). Paper scale, quiet machine: seed 7, 149 s wall (sampling 135 s),
max R-hat 1.008 (fixed effects 1.004, SDs <= 1.008, random intercepts <= 1.008), min bulk
ESS 318, 0 divergences, 42/42 covered; seed 8, 175 s, max fixed-effect R-hat 1.003, random
intercepts <= 1.009, but one SD at 1.0104: the target holds with little room.

A factor or interaction with fewer than two observed levels (``model`` in a one-model run,
``convention`` when only one was rendered) is dropped and listed in the diagnostics, and so
is a pair or volume intercept whose levels hold fewer than two questions on average (a small
run where nearly every question names its own pair): it cannot be told apart from the
question intercept.

Outputs (``data/analysis/``)
----------------------------
``factor_effects.parquet``
    One row per fixed effect on the **logit scale**: ``term`` (``Intercept``,
    ``<factor>[<level>]`` or ``<f1>[<l1>]:<f2>[<l2>]``), ``mean, sd, lo95, hi95`` (central
    95 % interval), ``r_hat, ess_bulk``; plus ``ess_tail``.
``factor_sd.parquet``
    The random-intercept standard deviations, ``term`` ``sd[question]`` etc., same columns.
``contrasts.parquet``
    Accuracies on the **probability scale** with 95 % intervals. Columns ``contrast, kind,
    factors, mean, sd, lo95, hi95, observed, n_trials``. Names:

    - ``p[<factor>=<level>]`` (``kind="level"``) and ``p[<f1>=<l1>,<f2>=<l2>]``
      (``kind="cell"``, for each interaction in the model and always for arm × model when
      both vary): the expected accuracy of the benchmark's own trials in that level or cell,
      averaged over *new* draws of the random intercepts (population-averaged; not
      conditional on the fitted question effects). ``observed`` is the raw accuracy of the
      same trials, ``n_trials`` their number. Examples: ``p[family=plane]``,
      ``p[dims=3d]``, ``p[ablation=text_only,terminology=colloquial]``.
    - ``<A> - <B>`` (``kind="difference"``; ``observed`` is the raw difference and
      ``n_trials`` counts both sides) where ``<A>``, ``<B>`` are two of the names
      above that differ in one factor: every pair of levels of each factor, and within each
      level of one factor of an interaction every pair of levels of the other. Examples:
      ``p[arm=semsam,model=<id>] - p[arm=baseline,model=<id>]`` (SemSam's gain per model),
      ``p[convention=standard,terminology=colloquial] -
      p[convention=standard,terminology=anatomical]``,
      ``p[prompt=box,terminology=colloquial] - p[prompt=mask,terminology=colloquial]``,
      ``p[family=relation_3d] - p[family=relation_2d]``, ``p[dims=3d] - p[dims=2d]``.
      The first name is the minuend. Levels are ordered as the benchmark lists them, and a
      pair appears once: ``a - b`` with ``a`` after ``b`` in that order (arm: semsam after
      baseline; dims: 3d after 2d; terminology: colloquial after anatomical; prompt: none,
      mask, box, point; ablation: none, text_only, blank; ...), so read ``-mean`` for the
      other direction.
``ppc.parquet``
    The posterior predictive check per factor level and interaction cell: ``cell`` (named
    like the contrasts), ``factors, observed, n_trials, pp_mean, pp_lo95, pp_hi95, inside``.
    Replicates use new random intercepts (a *mixed* predictive check), so a cell outside its
    band means the factor structure misses something, not that one question is odd.
``factor_diagnostics.json``
    Divergences, the largest R-hat and smallest bulk/tail ESS (fixed effects, random-effect
    SDs, every random intercept and the random intercepts' means ``mean_<group>`` per cell
    of :class:`GroupCells`), sampling settings, sizes, timings, dropped terms.
``factor_posterior.zarr``
    The posterior of the fixed effects and SDs (no per-question intercepts) with sample
    stats, for trace and rank plots.

>>> from mislib.simulate import simulate_study, scored_table
>>> scored = scored_table(simulate_study(n_questions=300, n_trials=2, seed=3))
>>> data = prepare_factor_data(scored)
>>> data.factors[:3], int(data.obs["n"].sum()) == len(scored)
(['arm', 'model', 'modality'], True)
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mislib.config import file_digest, is_fresh, stage_params, write_stamp
from mislib.paths import (
    CONTRASTS_FILE,
    FACTOR_DIAGNOSTICS_FILE,
    FACTOR_EFFECTS_FILE,
    FACTOR_POSTERIOR_FILE,
    FACTOR_SD_FILE,
    PPC_FILE,
    QUESTIONS_FILE,
    RESPONSES_FILE,
    SCORED_FILE,
    project_paths,
)
from mislib.vocabulary import (  # noqa: F401  (LEVEL_ORDER, structure_pair: re-exported)
    LEVEL_ORDER,
    MODEL_FACTORS,
    TRIAL_FACTORS,
    cell_name,
    difference_name,
    interaction_name,
    ordered,
    structure_pair,
)

log = logging.getLogger(__name__)

#: The factors of the model (:data:`mislib.vocabulary.MODEL_FACTORS`).
FACTORS: tuple[str, ...] = MODEL_FACTORS
INTERACTIONS: tuple[str, ...] = ("convention:terminology", "prompt:terminology",
                                 "ablation:terminology", "arm:model")
GROUPS: tuple[str, ...] = ("question", "pair", "volume")
OUTPUTS = (FACTOR_EFFECTS_FILE, FACTOR_SD_FILE, CONTRASTS_FILE, PPC_FILE,
           FACTOR_DIAGNOSTICS_FILE, FACTOR_POSTERIOR_FILE)
RHAT_MAX = 1.01
MIN_QUESTIONS_PER_LEVEL = 2.0  # fewer: a pair/volume intercept is dropped (see below)
DIAG_LEVELS = 500  # random intercepts per group whose R-hat and ESS are checked


# ------------------------------------------------------------------------------------------
# Data: trials → binomial counts, factor codes
# ------------------------------------------------------------------------------------------
@dataclass
class FactorData:
    """Binomial counts and integer codes, the input of :func:`build_model`.

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
    factors, interactions, groups : what enters the model (see the module docstring).

    Returns
    -------
    FactorData
    """
    interactions = _parse_interactions(interactions)
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

    question_cols = [c for c in dict.fromkeys(
        [f for f in need if f not in TRIAL_FACTORS and f not in ("correct", "question_id")])]
    df = scored[["model", "arm", "question_id", "correct", *question_cols]].copy()
    df["correct"] = df["correct"].astype(bool)
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
    if "pair" in groups:
        obs["pair"] = structure_pair(obs["component_a"], obs["component_b"])

    kept, levels, dropped, codes = [], {}, {}, {}
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

    q_codes, q_levels = pd.factorize(obs["question_id"], sort=True)
    levels["question"] = list(q_levels)
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
    # The levels of a pair or volume group fall into blocks that no question links: volumes
    # of different modalities (modality is nested in volume), pairs of two structures and
    # single structures (plane questions: family is partly nested in pair). The mean
    # intercept of a block trades off against the fixed effects of the factor that splits
    # the group, a ridge through hundreds of coordinates that a diagonal mass matrix
    # crosses slowly (paper-scale simulation: R-hat 1.15 for modality, 1.06 for family).
    # So the model samples the intercepts as deviations summing to zero within each block
    # plus one mean per block, and the block means join the fixed effects (FixedDesign).
    first_row = np.zeros(len(q_levels), dtype=np.int64)
    first_row[q_codes[::-1]] = np.arange(len(q_codes))[::-1]
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
    return FactorData(obs=obs, factors=kept, levels=levels, interactions=inter, codes=codes,
                      question_index=q_codes.astype(np.int64), group_codes=group_codes,
                      dropped=dropped, nested=nested, group_blocks=group_blocks,
                      block_labels=block_labels)


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


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------
def _dim(name: str, data: FactorData) -> str:
    return name if name in data.group_codes or name == "question" else f"{name}_level"


def sum_to_zero_basis(n_levels: int) -> np.ndarray:
    """An orthonormal basis [n_levels, n_levels - 1] of the vectors that sum to zero.

    ``pm.ZeroSumNormal(sigma)`` over ``n_levels`` is ``basis @ theta`` with ``theta`` iid
    ``Normal(0, sigma)`` for any such basis (Helmert contrasts here).

    >>> b = sum_to_zero_basis(3)
    >>> np.allclose(b.sum(axis=0), 0), np.allclose(b.T @ b, np.eye(2))
    (True, True)
    """
    basis = np.zeros((n_levels, n_levels - 1))
    for j in range(1, n_levels):
        basis[:j, j - 1] = 1.0
        basis[j, j - 1] = -float(j)
        basis[:, j - 1] /= np.sqrt(j * (j + 1.0))
    return basis


@dataclass
class GroupCells:
    """The directions of a group's intercepts that fixed effects could stand in for.

    Levels are grouped into cells, and ``basis`` spans, over the cells, the vectors the
    fixed effects could shift all intercepts of a cell by: for a pair or volume group the
    indicators of its blocks (:attr:`FactorData.group_blocks`; the directions are the
    block means), for the question group the indicators of every level of every
    question-level factor and interaction (the cells are the questions' combinations of
    levels). Columns are orthonormal over levels: ``basis.T @ diag(sizes) @ basis = I``.
    For iid ``z ~ Normal(0, I)`` over the levels, ``m = V.T z`` (``V = basis[cell]``) is
    ``Normal(0, I)`` and independent of ``z - V m``, so the model samples ``z - V V.T z``
    and ``m`` separately: an exact reparameterisation, with ``m`` among the whitened
    coefficients.

    Attributes
    ----------
    cell : int [n_levels], each level's cell.
    basis : float [n_cells, n_dirs].
    sizes : float [n_cells], levels per cell.
    labels : a name per cell.
    """

    cell: np.ndarray
    basis: np.ndarray
    sizes: np.ndarray
    labels: list[str]


def group_cells(data: FactorData, group: str) -> GroupCells:
    """The cells and spanned directions of a group's intercepts (:class:`GroupCells`)."""
    if group != "question":
        cell = data.group_blocks[group]
        sizes = np.bincount(cell).astype(float)
        return GroupCells(cell=cell, basis=np.diag(1.0 / np.sqrt(sizes)), sizes=sizes,
                          labels=list(data.block_labels[group]))
    n_q = len(data.levels["question"])
    first_row = np.zeros(n_q, dtype=np.int64)
    first_row[data.question_index[::-1]] = np.arange(len(data.question_index))[::-1]
    q_factors = [f for f in data.factors if f not in TRIAL_FACTORS]
    if not q_factors:
        cell = np.zeros(n_q, dtype=np.int64)
        return GroupCells(cell=cell, basis=np.full((1, 1), 1.0 / np.sqrt(n_q)),
                          sizes=np.array([float(n_q)]), labels=["all"])
    mat = np.stack([data.codes[f][first_row] for f in q_factors], axis=1)
    cell_codes, cell = np.unique(mat, axis=0, return_inverse=True)
    cell = cell.ravel().astype(np.int64)
    sizes = np.bincount(cell).astype(float)
    col = {f: j for j, f in enumerate(q_factors)}
    indicators = [np.ones(len(cell_codes))]
    for f in q_factors:
        for c in np.unique(cell_codes[:, col[f]]):
            indicators.append(cell_codes[:, col[f]] == c)
    for f1, f2 in data.interactions:
        if f1 in col and f2 in col:
            pairs = cell_codes[:, [col[f1], col[f2]]]
            for c1, c2 in np.unique(pairs[(pairs >= 0).all(axis=1)], axis=0):
                indicators.append((pairs[:, 0] == c1) & (pairs[:, 1] == c2))
    ind = np.stack(indicators, axis=1).astype(float)
    lam, vec = np.linalg.eigh((ind.T * sizes) @ ind)
    keep = lam > 1e-9 * lam.max()
    basis = ind @ (vec[:, keep] / np.sqrt(lam[keep]))
    labels = [",".join(f"{f}={data.levels[f][c] if c >= 0 else 'none'}"
                       for f, c in zip(q_factors, row, strict=True)) for row in cell_codes]
    return GroupCells(cell=cell, basis=basis, sizes=sizes, labels=labels)


@dataclass
class FixedDesign:
    """The fixed effects as one coefficient vector ``theta`` and its sampling transform.

    ``Intercept`` and every factor and interaction are ``theta`` mapped through
    :func:`sum_to_zero_basis` (``Kronecker`` products for interactions), so ``theta`` has
    independent ``Normal(0, scale)`` priors, exactly the ``ZeroSumNormal`` ones. The
    sampler moves ``w`` with ``theta = mode + transform @ w``: ``mode`` and ``transform``
    (``transform @ transform.T`` the inverse Hessian) come from a Laplace approximation of
    a binomial GLM on the pattern counts, of the fixed effects and the random intercepts'
    means (``group_means``, with a guessed SD), the rest of the random intercepts left
    out. In these coordinates
    the design's correlations are gone (unbalanced levels that tie a rare level to the
    intercept; ``dims``, which only plane questions separate from ``family``), which a
    diagonal mass matrix cannot undo: in raw coordinates they left ``Intercept`` and
    ``family`` mixing slowly at the paper's scale (bulk ESS 34 of 1,000 draws).

    Attributes
    ----------
    matrix : float [n_pattern, n_coef], the logit of each pattern is ``matrix @ theta``.
    pattern_of_row : int [n_obs], each row's pattern.
    scale : float [n_coef], prior SD of each coefficient.
    mode, transform : float [n_coef], [n_coef, n_coef], see above.
    blocks : (name, slice of theta, basis [n_cells, n_slice] or None, shape) per term.
    group_means : group → :class:`GroupCells`, and its slice of ``theta``: the part of the
        group's intercepts that the fixed effects could trade off against, in
        coordinates ``theta_j ~ Normal(0, 1)`` (non-centred: their columns of ``matrix``
        are multiplied by ``sd_group`` in the model).
    n_fixed : the first ``n_fixed`` coefficients are the fixed effects.
    coef_names : names of the coefficients (``family_c1``, ``mean_pair_c0`` ...).
    """

    matrix: np.ndarray
    pattern_of_row: np.ndarray
    scale: np.ndarray
    mode: np.ndarray
    transform: np.ndarray
    blocks: list[tuple[str, slice, np.ndarray | None, tuple[int, ...]]]
    group_means: dict[str, tuple[GroupCells, slice]]
    n_fixed: int
    coef_names: list[str]


def fixed_design(data: FactorData, prior_sd: float = 1.0,
                 interaction_sd: float = 0.5, group_sd_guess: float = 0.4,
                 newton_steps: int = 25) -> FixedDesign:
    """The pattern design of the fixed effects and its whitening transform (see
    :class:`FixedDesign`); ``group_sd_guess`` stands in for the random-intercept SDs in
    the prior of the block means while the transform is computed (a guess 2x off only
    leaves a condition number of about 4 along the block means' ridge)."""
    pattern_codes, pattern_of_row, counts = _patterns(data)
    col = {f: j for j, f in enumerate(data.factors)}
    n_pat = len(pattern_codes)
    columns = [np.ones((n_pat, 1))]
    scale = [1.5 * prior_sd]
    blocks = [("Intercept", slice(0, 1), None, ())]
    names = ["Intercept"]
    start = 1

    def add(name, rows, basis, shape, sd):
        nonlocal start
        width = basis.shape[1]
        columns.append(rows)
        scale.extend([sd] * width)
        blocks.append((name, slice(start, start + width), basis, shape))
        names.extend(f"{name}_c{j}" for j in range(width))
        start += width

    for f in data.factors:
        basis = sum_to_zero_basis(len(data.levels[f]))
        padded = np.vstack([basis, np.zeros((1, basis.shape[1]))])  # code -1 -> zeros
        add(f, padded[pattern_codes[:, col[f]]], basis, (len(basis),), prior_sd)
    for f1, f2 in data.interactions:
        k1, k2 = len(data.levels[f1]), len(data.levels[f2])
        basis = np.kron(sum_to_zero_basis(k1), sum_to_zero_basis(k2))
        c1, c2 = pattern_codes[:, col[f1]], pattern_codes[:, col[f2]]
        rows = np.where(((c1 >= 0) & (c2 >= 0))[:, None], basis[c1 * k2 + c2], 0.0)
        add(interaction_name(f1, f2), rows, basis, (k1, k2), interaction_sd)
    n_fixed = start
    first = np.zeros(n_pat, dtype=np.int64)
    first[pattern_of_row[::-1]] = np.arange(len(pattern_of_row))[::-1]
    group_means = {}
    for g, gcodes in data.group_codes.items():
        cells = group_cells(data, g)
        cell_of_row = cells.cell[gcodes[data.question_index]]
        of_pattern = cell_of_row[first]
        # A cell is a function of the factor levels, so every row of a pattern is in one.
        if not np.array_equal(of_pattern[pattern_of_row], cell_of_row):
            raise AssertionError(f"the cells of {g} are not determined by the factors")
        width = cells.basis.shape[1]
        columns.append(cells.basis[of_pattern])
        scale.extend([1.0] * width)
        group_means[g] = (cells, slice(start, start + width))
        names.extend(f"mean_{g}_c{j}" for j in range(width))
        start += width
    matrix = np.hstack(columns)
    scale = np.asarray(scale)

    # Laplace approximation of the binomial GLM of the fixed effects and block means, the
    # random-intercept SDs set to a guess (Newton's method).
    guess = matrix.copy()
    guess[:, n_fixed:] *= group_sd_guess
    n, k = counts["n"].to_numpy(), counts["k"].to_numpy()
    theta = np.zeros(matrix.shape[1])
    theta[0] = np.log((k.sum() + 0.5) / (n.sum() - k.sum() + 0.5))
    for _ in range(newton_steps):
        p = 1.0 / (1.0 + np.exp(-(guess @ theta)))
        grad = guess.T @ (k - n * p) - theta / scale**2
        hess = (guess.T * (n * p * (1.0 - p))) @ guess + np.diag(1.0 / scale**2)
        step = np.linalg.solve(hess, grad)
        theta = theta + step
        if np.max(np.abs(step)) < 1e-8:
            break
    p = 1.0 / (1.0 + np.exp(-(guess @ theta)))
    hess = (guess.T * (n * p * (1.0 - p))) @ guess + np.diag(1.0 / scale**2)
    chol = np.linalg.cholesky(hess)  # hess = chol @ chol.T
    transform = np.linalg.solve(chol.T, np.eye(len(hess)))  # chol^-T: cov = hess^-1
    return FixedDesign(matrix=matrix, pattern_of_row=pattern_of_row, scale=scale, mode=theta,
                       transform=transform, blocks=blocks, group_means=group_means,
                       n_fixed=n_fixed, coef_names=names)


def resolve_centred(data: FactorData, centred: str | Sequence[str] = "auto",
                    min_trials: float = 250.0) -> list[str]:
    """The random-intercept groups to sample centred.

    ``"auto"`` centres a group when its levels carry on average at least ``min_trials``
    trials each: then the data pin each intercept down and the centred form has no funnel,
    while sparsely observed levels (a question seen 10 times) sample better non-centred.
    The default threshold comes from simulated studies (notebook 07's text, the
    benchmark): with SDs of 0.2-0.6 on the logit scale, volumes with ~200 trials each still
    left the centred SD mixing slowly (bulk ESS < 20 of 2,000 draws), ~300 did not.
    Otherwise ``centred`` lists the groups.
    """
    if isinstance(centred, str):
        if centred != "auto":
            raise ValueError(f"centred must be 'auto' or a list of groups, got {centred!r}")
        total = float(data.obs["n"].sum())
        return [g for g in data.group_codes if total / len(data.levels[g]) >= min_trials]
    unknown = set(centred) - set(GROUPS)
    if unknown:
        raise ValueError(f"centred names unknown group(s) {sorted(unknown)}; known: {GROUPS}")
    return [g for g in data.group_codes if g in centred]


def build_model(data: FactorData, centred: str | Sequence[str] = (),
                prior_sd: float = 1.0, interaction_sd: float = 0.5,
                group_sd_scale: float = 1.0):
    """The PyMC model of :class:`FactorData` (see the module docstring).

    Parameters
    ----------
    centred : random-intercept groups sampled centred (``u ~ Normal(0, σ)``), the others
        non-centred (``u = σ·z``, ``z ~ Normal(0, 1)``); ``"auto"``: :func:`resolve_centred`.
    prior_sd : scale of ``ZeroSumNormal`` main effects and of the intercept (logit).
    interaction_sd : scale of the interaction effects (logit).
    group_sd_scale : scale of the ``HalfNormal`` prior on each random-intercept SD.

    Returns
    -------
    pymc.Model with free variables ``fixed_whitened`` (see :class:`FixedDesign`),
    ``sd_<group>`` and ``u_<group>`` (centred) or ``z_<group>``, and deterministics
    ``Intercept``, one per factor and interaction (named ``f`` and ``f1:f2``) and
    ``mean_<group>`` (the block means of the group's intercepts).
    """
    import pymc as pm
    import pytensor.tensor as pt

    centred = resolve_centred(data, centred)
    n = data.obs["n"].to_numpy()
    k = data.obs["k"].to_numpy()
    # Dimension names get a suffix: PyMC forbids a variable named like a dimension.
    coords = {_dim(name, data): data.levels[name] for name in data.levels}
    n_q = len(data.levels["question"])
    # The fixed part of the logit depends only on a row's factor levels, so it is computed
    # once per distinct combination of levels ("pattern", a few hundred) and then gathered:
    # one gather per row instead of one per factor keeps the gradient cheap at 10^5 rows.
    design = fixed_design(data, prior_sd=prior_sd, interaction_sd=interaction_sd)
    coords["fixed_coef"] = design.coef_names
    for g, (cells, _) in design.group_means.items():
        coords[f"{g}_cell"] = cells.labels

    with pm.Model(coords=coords) as model:
        sds = {g: pm.HalfNormal(f"sd_{g}", group_sd_scale) for g in data.group_codes}
        # Sampled in whitened coordinates (see FixedDesign): theta = mode + transform @ w.
        w = pm.Normal("fixed_whitened", 0.0, 1.0, dims="fixed_coef")
        theta = design.mode + pt.dot(design.transform, w)
        # The priors: theta_j ~ Normal(0, scale_j), for the fixed effects exactly the
        # ZeroSumNormal ones, for the block means standard normal (non-centred). The map
        # is linear (constant Jacobian); w's own standard normal is taken out again.
        pm.Potential("fixed_prior", -0.5 * pt.sum(pt.sqr(theta / design.scale))
                     + 0.5 * pt.sum(pt.sqr(w)))
        for name, sl, basis, shape in design.blocks:
            value = theta[sl] if basis is None else pt.dot(basis, theta[sl])
            if name == "Intercept":
                pm.Deterministic(name, value[0])
            else:
                dims = tuple(_dim(f, data) for f in name.split(":"))
                pm.Deterministic(name, value.reshape(shape), dims=dims)
        n_fixed = design.n_fixed
        eta_pattern = pt.dot(design.matrix[:, :n_fixed], theta[:n_fixed])
        for g, (cells, sl) in design.group_means.items():
            pm.Deterministic(f"mean_{g}", sds[g] * pt.dot(cells.basis, theta[sl]),
                             dims=f"{g}_cell")
            eta_pattern = eta_pattern + sds[g] * pt.dot(design.matrix[:, sl], theta[sl])
        # The random intercepts less their projection on the cells' basis (GroupCells):
        # pair and volume intercepts sum to zero within each block, question intercepts
        # sum to zero over every level of every question-level factor.
        u_total = pt.zeros(n_q)
        for g, gcodes in data.group_codes.items():
            sd = sds[g]
            if g in centred:
                raw = pm.Normal(f"u_{g}", 0.0, sd, dims=g)
            else:
                raw = pm.Normal(f"z_{g}", 0.0, 1.0, dims=g)
            cells = design.group_means[g][0]
            sums = pt.inc_subtensor(pt.zeros(len(cells.sizes))[cells.cell], raw)
            u = raw - pt.dot(cells.basis, pt.dot(cells.basis.T, sums))[cells.cell]
            if g not in centred:
                u = sd * u
            u_total = u_total + (u if g == "question" else u[gcodes])
        eta_rows = eta_pattern[design.pattern_of_row]
        n_blocks, rem = divmod(len(data.obs), n_q)
        if rem == 0 and np.array_equal(data.question_index,
                                       np.tile(np.arange(n_q), n_blocks)):
            # Every (model, arm) answered every question (the paired design): add the
            # question intercepts by broadcasting over a [block, question] grid, whose
            # gradient is a sum, instead of gathering and scattering per row.
            eta = eta_rows.reshape((n_blocks, n_q)) + u_total[None, :]
            k, n = k.reshape(n_blocks, n_q), n.reshape(n_blocks, n_q)
        else:
            eta = eta_rows + u_total[data.question_index]
        # The binomial log-likelihood without its constant binomial coefficient.
        pm.Potential("correct", pt.sum(k * eta - n * pt.softplus(eta)))
    return model


# ------------------------------------------------------------------------------------------
# Fitting and summaries
# ------------------------------------------------------------------------------------------
@dataclass
class FactorFit:
    """Everything :func:`fit_factor_model` computed.

    ``posterior`` is the nutpie ``xarray.DataTree`` (groups ``posterior``, ``sample_stats``;
    per-question intercepts dropped after their R-hat was taken); the tables are described
    in the module docstring.
    """

    data: FactorData
    posterior: Any
    effects: pd.DataFrame
    sds: pd.DataFrame
    contrasts: pd.DataFrame
    ppc: pd.DataFrame
    diagnostics: dict[str, Any]


def _fixed_names(data: FactorData) -> list[str]:
    return ["Intercept", *data.factors, *(interaction_name(a, b) for a, b in data.interactions)]


def _summarise(draws: np.ndarray, rhat: np.ndarray, ess_bulk: np.ndarray,
               ess_tail: np.ndarray, terms: Sequence[str]) -> pd.DataFrame:
    """Rows of ``term, mean, sd, lo95, hi95, r_hat, ess_bulk, ess_tail``.

    ``draws`` is [chain, draw, n_terms]; the diagnostics are [n_terms].
    """
    flat = draws.reshape(-1, draws.shape[-1])
    lo, hi = np.quantile(flat, [0.025, 0.975], axis=0)
    return pd.DataFrame({"term": list(terms), "mean": flat.mean(0), "sd": flat.std(0, ddof=1),
                         "lo95": lo, "hi95": hi, "r_hat": rhat, "ess_bulk": ess_bulk,
                         "ess_tail": ess_tail})


def _diag(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """R-hat, bulk and tail ESS of [chain, draw, n] draws (ArviZ's rank-normalised ones)."""
    import arviz as az

    return (np.asarray(az.rhat(arr, chain_axis=0, draw_axis=1)),
            np.asarray(az.ess(arr, method="bulk", chain_axis=0, draw_axis=1)),
            np.asarray(az.ess(arr, method="tail", prob=0.05, chain_axis=0, draw_axis=1)))


def _stack_terms(post, data: FactorData) -> tuple[np.ndarray, list[str]]:
    """Fixed effects as [chain, draw, n_terms] with their ``factor_effects`` names."""
    cols, terms = [], []
    for name in _fixed_names(data):
        arr = np.asarray(post[name].values)
        if name == "Intercept":
            cols.append(arr[..., None])
            terms.append("Intercept")
        elif ":" in name:
            f1, f2 = name.split(":")
            cols.append(arr.reshape(*arr.shape[:2], -1))
            terms += [f"{f1}[{a}]:{f2}[{b}]" for a in data.levels[f1] for b in data.levels[f2]]
        else:
            cols.append(arr)
            terms += [f"{name}[{lv}]" for lv in data.levels[name]]
    return np.concatenate(cols, axis=-1), terms


def _flat_draws(post, name: str) -> np.ndarray:
    arr = np.asarray(post[name].values)
    return arr.reshape(-1, *arr.shape[2:])


def _patterns(data: FactorData) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Unique factor-code combinations: codes [n_pattern, n_factor], index per obs, counts."""
    names = data.factors
    mat = np.stack([data.codes[f] for f in names], axis=1)
    uniq, inverse = np.unique(mat, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    counts = pd.DataFrame({"n": np.bincount(inverse, weights=data.obs["n"].to_numpy(float)),
                           "k": np.bincount(inverse, weights=data.obs["k"].to_numpy(float))})
    return uniq, inverse, counts


def _eta_fixed(post, data: FactorData, pattern_codes: np.ndarray,
               draw_index: np.ndarray) -> np.ndarray:
    """Fixed-effect logit [n_draw, n_pattern] for factor codes [n_pattern, n_factor]."""
    col = {f: j for j, f in enumerate(data.factors)}
    eta = _flat_draws(post, "Intercept")[draw_index][:, None] + np.zeros(len(pattern_codes))
    for f in data.factors:
        beta = _flat_draws(post, f)[draw_index]
        beta = np.concatenate([beta, np.zeros((len(beta), 1))], axis=1)
        eta += beta[:, pattern_codes[:, col[f]]]
    for f1, f2 in data.interactions:
        g = _flat_draws(post, interaction_name(f1, f2))[draw_index]
        g = np.pad(g, ((0, 0), (0, 1), (0, 1)))
        eta += g[:, pattern_codes[:, col[f1]], pattern_codes[:, col[f2]]]
    return eta


def _total_sd(post, data: FactorData, draw_index: np.ndarray) -> np.ndarray:
    var = np.zeros(len(draw_index))
    for g in data.group_codes:
        var += _flat_draws(post, f"sd_{g}")[draw_index] ** 2
    return np.sqrt(var)


def _marginal_p(eta: np.ndarray, sd: np.ndarray, n_nodes: int = 24) -> np.ndarray:
    """E[invlogit(eta + u)], u ~ Normal(0, sd²) per draw (Gauss–Hermite), same shape as eta."""
    x, w = np.polynomial.hermite_e.hermegauss(n_nodes)
    w = w / w.sum()
    out = np.zeros_like(eta)
    for xj, wj in zip(x, w, strict=True):
        out += wj / (1.0 + np.exp(-(eta + xj * sd[:, None])))
    return out


def _cells(data: FactorData) -> list[tuple[str, tuple[str, ...], dict[str, int]]]:
    """(name, factors, {factor: level code}) of every level and interaction cell."""
    out = []
    for f in data.factors:
        for i, lv in enumerate(data.levels[f]):
            out.append((cell_name(**{f: lv}), (f,), {f: i}))
    pairs = list(data.interactions)
    if "arm" in data.factors and "model" in data.factors and ("arm", "model") not in pairs:
        pairs.append(("arm", "model"))
    for f1, f2 in pairs:
        for i, a in enumerate(data.levels[f1]):
            for j, b in enumerate(data.levels[f2]):
                out.append((cell_name(**{f1: a, f2: b}), (f1, f2), {f1: i, f2: j}))
    return out


def _differences(data: FactorData, cells) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(name, minuend, subtrahend, factors): every pair of levels differing in one factor."""
    by_name = {name: (factors, assign) for name, factors, assign in cells}
    out = []
    for name_a, (factors, assign_a) in by_name.items():
        for name_b, (factors_b, assign_b) in by_name.items():
            if factors != factors_b:
                continue
            differ = [f for f in factors if assign_a[f] != assign_b[f]]
            if len(differ) == 1 and assign_a[differ[0]] > assign_b[differ[0]]:
                out.append((difference_name(name_a, name_b), name_a, name_b, factors))
    return out


def _interval(x: np.ndarray) -> tuple[float, float, float, float]:
    lo, hi = np.quantile(x, [0.025, 0.975])
    return float(x.mean()), float(x.std(ddof=1)), float(lo), float(hi)


def compute_contrasts(post, data: FactorData, max_draws: int = 1000) -> pd.DataFrame:
    """Levels, cells and their differences on the probability scale (module docstring).

    Uses at most ``max_draws`` posterior draws (evenly thinned).
    """
    n_total = _flat_draws(post, "Intercept").shape[0]
    draw_index = np.unique(np.linspace(0, n_total - 1, min(max_draws, n_total)).astype(int))
    codes, _, counts = _patterns(data)
    p = _marginal_p(_eta_fixed(post, data, codes, draw_index), _total_sd(post, data, draw_index))
    col = {f: j for j, f in enumerate(data.factors)}
    weights = counts["n"].to_numpy()
    rows, values, observed, n_trials = [], {}, {}, {}
    cells = _cells(data)
    for name, factors, assign in cells:
        mask = np.all([codes[:, col[f]] == c for f, c in assign.items()], axis=0)
        n_cell = weights[mask].sum()
        if n_cell == 0:
            continue  # a cell no trial is in (e.g. a prompt on a text-only question)
        values[name] = p[:, mask] @ weights[mask] / n_cell
        observed[name] = float(counts["k"].to_numpy()[mask].sum() / n_cell)
        n_trials[name] = int(n_cell)
        rows.append({"contrast": name, "kind": "cell" if len(factors) > 1 else "level",
                     "factors": ":".join(factors),
                     **dict(zip(("mean", "sd", "lo95", "hi95"), _interval(values[name]),
                                strict=True)),
                     "observed": observed[name], "n_trials": n_trials[name]})
    for name, a, b, factors in _differences(data, cells):
        if a in values and b in values:
            rows.append({"contrast": name, "kind": "difference", "factors": ":".join(factors),
                         **dict(zip(("mean", "sd", "lo95", "hi95"),
                                    _interval(values[a] - values[b]), strict=True)),
                         "observed": observed[a] - observed[b],
                         "n_trials": n_trials[a] + n_trials[b]})
    return pd.DataFrame(rows)


def posterior_predictive_check(post, data: FactorData, n_draws: int = 200,
                               seed: int = 0) -> pd.DataFrame:
    """Observed accuracy per level and interaction cell against mixed posterior replicates.

    For each of ``n_draws`` thinned posterior draws: new random intercepts for every
    question, pair and volume from their fitted SDs, then ``k_rep ~ Binomial(n, p)`` per
    (model, arm, question) row, aggregated to each cell's accuracy.
    """
    rng = np.random.default_rng(seed)
    n_total = _flat_draws(post, "Intercept").shape[0]
    draw_index = np.unique(np.linspace(0, n_total - 1, min(n_draws, n_total)).astype(int))
    codes, inverse, counts = _patterns(data)
    eta_pattern = _eta_fixed(post, data, codes, draw_index)
    n = data.obs["n"].to_numpy()
    k = data.obs["k"].to_numpy()
    col = {f: j for j, f in enumerate(data.factors)}
    cells = _cells(data)
    cell_of_obs = [(name, factors, np.all([codes[inverse, col[f]] == c
                                          for f, c in assign.items()], axis=0))
                   for name, factors, assign in cells]
    cell_of_obs = [(name, factors, m) for name, factors, m in cell_of_obs if n[m].sum() > 0]
    onehot = np.stack([m for _, _, m in cell_of_obs], axis=1).astype(float)  # [n_obs, n_cell]
    sds = {g: _flat_draws(post, f"sd_{g}")[draw_index] for g in data.group_codes}
    rep = np.empty((len(draw_index), onehot.shape[1]))
    for s in range(len(draw_index)):
        eta = eta_pattern[s, inverse].copy()
        u_q = np.zeros(len(data.levels["question"]))
        for g, gcodes in data.group_codes.items():
            u_q += rng.normal(0.0, sds[g][s], len(data.levels[g]))[gcodes]
        eta += u_q[data.question_index]
        k_rep = rng.binomial(n, 1.0 / (1.0 + np.exp(-eta)))
        rep[s] = (k_rep @ onehot) / (n @ onehot)
    observed = (k @ onehot) / (n @ onehot)
    lo, hi = np.quantile(rep, [0.025, 0.975], axis=0)
    return pd.DataFrame({
        "cell": [c[0] for c in cell_of_obs], "factors": [":".join(c[1]) for c in cell_of_obs],
        "observed": observed, "n_trials": (n @ onehot).astype(int), "pp_mean": rep.mean(0),
        "pp_lo95": lo, "pp_hi95": hi, "inside": (observed >= lo) & (observed <= hi)})


def fit_factor_model(scored: pd.DataFrame, *, factors: Sequence[str] = FACTORS,
                     interactions: Sequence[str] = INTERACTIONS,
                     groups: Sequence[str] = GROUPS,
                     centred: str | Sequence[str] = (),
                     draws: int = 500, tune: int = 500, chains: int = 2,
                     cores: int | None = None, seed: int = 0, prior_sd: float = 1.0,
                     interaction_sd: float = 0.5, contrast_draws: int = 1000,
                     ppc_draws: int = 200, adaptation: str = "diag",
                     progress: bool = True) -> FactorFit:
    """Fit the hierarchical factor model to scored trials with nutpie.

    Parameters
    ----------
    scored : one row per trial (see :func:`prepare_factor_data`).
    factors, interactions, groups : model terms; interactions as ``"f1:f2"``.
    centred : random-intercept groups sampled centred, the others non-centred; ``"auto"``
        decides from the trials per level (:func:`resolve_centred`).
    draws, tune, chains : NUTS draws and warm-up per chain, number of chains.
    cores : parallel chains (default: ``min(chains, os.cpu_count())``).
    seed : sampler and predictive-check seed.
    prior_sd, interaction_sd : prior scales of main effects and interactions (logit).
    contrast_draws, ppc_draws : posterior draws used for contrasts and the predictive check.
    adaptation : nutpie's mass-matrix adaptation (``"diag"`` or ``"low_rank"``).
    progress : show nutpie's progress bar.

    Returns
    -------
    FactorFit
    """
    import nutpie
    import xarray as xr

    t0 = time.perf_counter()
    data = prepare_factor_data(scored, factors, interactions, groups)
    model = build_model(data, centred=centred, prior_sd=prior_sd,
                        interaction_sd=interaction_sd)
    t_build = time.perf_counter()
    compiled = nutpie.compile_pymc_model(model, backend="numba")
    t_compile = time.perf_counter()
    cores = cores or min(chains, os.cpu_count() or 1)
    trace = nutpie.sample(compiled, draws=draws, tune=tune, chains=chains, cores=cores,
                          seed=seed, progress_bar=progress, save_warmup=False,
                          adaptation=adaptation)
    t_sample = time.perf_counter()

    post = trace.posterior
    fixed, terms = _stack_terms(post, data)
    effects = _summarise(fixed, *_diag(fixed), terms)
    sd_names = [f"sd_{g}" for g in data.group_codes]
    sd_arr = np.stack([np.asarray(post[v].values) for v in sd_names], axis=-1)
    sds = _summarise(sd_arr, *_diag(sd_arr), [f"sd[{g}]" for g in data.group_codes])
    # R-hat and ESS of the random intercepts too, on up to DIAG_LEVELS evenly spaced
    # levels per group: ArviZ takes them one at a time (~1 ms each) and a paper-scale run
    # has 3.7e4 of them.
    re_rhat, re_ess = [], []
    for g in data.group_codes:
        name = f"u_{g}" if f"u_{g}" in post else f"z_{g}"
        arr = np.asarray(post[name].values)
        arr = arr.reshape(*arr.shape[:2], -1)
        pick = np.unique(np.linspace(0, arr.shape[-1] - 1, DIAG_LEVELS).astype(int))
        r, e, _ = _diag(arr[..., pick])
        re_rhat.append(np.nanmax(r))
        re_ess.append(np.nanmin(e))
    # The random intercepts' parts sampled with the fixed effects (GroupCells), per cell.
    mean_arr = []
    for g in data.group_codes:
        arr = np.asarray(post[f"mean_{g}"].values)
        pick = np.unique(np.linspace(0, arr.shape[-1] - 1, DIAG_LEVELS).astype(int))
        mean_arr.append(arr[..., pick])
    mean_rhat, mean_ess, _ = _diag(np.concatenate(mean_arr, axis=-1))
    stats = trace.sample_stats
    diverging = np.asarray(stats["diverging"].values)
    contrasts = compute_contrasts(post, data, max_draws=contrast_draws)
    ppc = posterior_predictive_check(post, data, n_draws=ppc_draws, seed=seed)
    keep = ["Intercept", *data.factors, *(interaction_name(a, b) for a, b in data.interactions),
            *sd_names]
    small = trace.copy()
    small["posterior"] = xr.DataTree(post.to_dataset()[keep])
    t_end = time.perf_counter()

    depth = np.asarray(stats["depth"].values) if "depth" in stats else np.array([np.nan])
    all_rhat = np.concatenate([effects["r_hat"], sds["r_hat"], re_rhat, mean_rhat])
    diagnostics = {
        "n_trials": int(data.obs["n"].sum()), "n_obs": len(data.obs),
        "n_questions": len(data.levels["question"]),
        "groups": {g: len(data.levels[g]) for g in data.group_codes},
        "factors": {f: data.levels[f] for f in data.factors},
        "interactions": [interaction_name(a, b) for a, b in data.interactions],
        "dropped": data.dropped, "centred": resolve_centred(data, centred),
        "nested": {g: f for g, f in data.nested.items() if f},
        "draws": draws, "tune": tune, "chains": chains, "cores": cores, "seed": seed,
        "adaptation": adaptation, "diag_levels_per_group": DIAG_LEVELS,
        "divergences": int(diverging.sum()),
        "max_r_hat_fixed": float(np.nanmax(effects["r_hat"])),
        "max_r_hat": float(np.nanmax(all_rhat)),
        "min_ess_bulk_fixed": float(np.nanmin(effects["ess_bulk"])),
        "min_ess_tail_fixed": float(np.nanmin(effects["ess_tail"])),
        "min_ess_bulk": float(min(np.nanmin(effects["ess_bulk"]), np.nanmin(sds["ess_bulk"]),
                                  *re_ess, np.nanmin(mean_ess))),
        "max_r_hat_group_means": float(np.nanmax(mean_rhat)),
        "max_r_hat_random": {g: float(r) for g, r in zip(data.group_codes, re_rhat,
                                                         strict=True)},
        "mean_tree_depth": float(np.nanmean(depth)),
        "step_size": float(np.nanmean(np.asarray(stats["step_size"].values)))
        if "step_size" in stats else None,
        "ppc_inside_share": float(ppc["inside"].mean()),
        "rhat_ok": bool(np.nanmax(all_rhat) <= RHAT_MAX),
        "seconds": {"build": round(t_build - t0, 2), "compile": round(t_compile - t_build, 2),
                    "sample": round(t_sample - t_compile, 2),
                    "summaries": round(t_end - t_sample, 2), "total": round(t_end - t0, 2)},
    }
    return FactorFit(data=data, posterior=small, effects=effects, sds=sds,
                     contrasts=contrasts, ppc=ppc, diagnostics=diagnostics)


# ------------------------------------------------------------------------------------------
# The stage: read scored trials, fit, write data/analysis/
# ------------------------------------------------------------------------------------------
def load_scored(root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Scored trials with their question factors, as stage 06 left them.

    Reads ``data/analysis/scored.parquet``; question columns it lacks are joined from
    ``data/benchmark/questions.parquet``. Without a scored table, the raw
    ``data/results/*/responses.parquet`` are scored with :mod:`mislib.scoring`.
    """
    paths = project_paths(root)
    scored_path = paths.analysis / SCORED_FILE
    if scored_path.is_file():
        scored = pd.read_parquet(scored_path)
        source = scored_path
    else:
        scored = _score_results(paths)
        source = paths.results
    question_cols = {*FACTORS, "component_a", "component_b", "volume_id"} - set(TRIAL_FACTORS)
    missing = sorted(question_cols - set(scored.columns))
    if missing:
        qpath = paths.benchmark / QUESTIONS_FILE
        if not qpath.is_file():
            raise FileNotFoundError(f"{source} lacks {missing} and there is no {qpath} to "
                                    "join them from")
        questions = pd.read_parquet(qpath, columns=["question_id", *missing])
        scored = scored.merge(questions, on="question_id", how="left", validate="many_to_one")
        unmatched = int(scored[missing[0]].isna().all()) if len(scored) else 0
        if unmatched:
            raise ValueError(f"no question of {source} is in {qpath}")
    return scored


def _score_results(paths) -> pd.DataFrame:
    """Score every ``results/*/responses.parquet`` with stage 06's parser (nothing written)."""
    from mislib import scoring

    files = sorted(paths.results.glob(f"*/{RESPONSES_FILE}"))
    qpath = paths.benchmark / QUESTIONS_FILE
    if not files or not qpath.is_file():
        raise FileNotFoundError(
            f"nothing to analyse: no {paths.analysis / 'scored.parquet'} (stage 06) and no "
            f"{paths.results}/*/responses.parquet with {qpath} (stages 03-04); run notebooks "
            "04 and 06 first")
    log.warning("no %s: scoring %d run(s) under %s with mislib.scoring",
                paths.analysis / SCORED_FILE, len(files), paths.results)
    rescored = scoring.rescore(scoring.load_responses(files), pd.read_parquet(qpath))
    # As stage 06 does: only records the model answered are scored.
    if "answered" in rescored:
        rescored = rescored[rescored["answered"]].reset_index(drop=True)
    return rescored


def write_outputs(fit: FactorFit, out_dir: str | os.PathLike) -> list[Path]:
    """Write the tables, diagnostics and the small posterior of a fit to ``out_dir``."""
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["term", "mean", "sd", "lo95", "hi95", "r_hat", "ess_bulk", "ess_tail"]
    fit.effects[cols].to_parquet(out / FACTOR_EFFECTS_FILE, index=False)
    fit.sds[cols].to_parquet(out / FACTOR_SD_FILE, index=False)
    fit.contrasts.to_parquet(out / CONTRASTS_FILE, index=False)
    fit.ppc.to_parquet(out / PPC_FILE, index=False)
    (out / FACTOR_DIAGNOSTICS_FILE).write_text(json.dumps(fit.diagnostics, indent=2,
                                                            default=str))
    zpath = out / FACTOR_POSTERIOR_FILE
    if zpath.exists():
        shutil.rmtree(zpath)
    fit.posterior.to_zarr(zpath, consolidated=False)
    return [out / name for name in OUTPUTS]


@dataclass
class FactorAnalysis:
    """What notebook 07 shows: the tables, diagnostics, posterior and coded data."""

    effects: pd.DataFrame
    sds: pd.DataFrame
    contrasts: pd.DataFrame
    ppc: pd.DataFrame
    diagnostics: dict[str, Any]
    posterior: Any
    data: FactorData
    params: dict[str, Any]
    reused: bool


def stamp_params(params: Mapping[str, Any], paths) -> dict[str, Any]:
    """The stage parameters plus a digest of the input, so re-scored trials are refitted."""
    scored_path = paths.analysis / SCORED_FILE
    if scored_path.is_file():
        digest = file_digest(scored_path)
    else:
        digest = "|".join(f"{p.relative_to(paths.results)}:{file_digest(p)}"
                          for p in sorted(paths.results.glob(f"*/{RESPONSES_FILE}")))
    return dict(params, input=digest)


def _fit_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("factors", "interactions", "groups", "centred", "draws", "tune", "chains",
            "prior_sd", "interaction_sd", "contrast_draws", "ppc_draws", "seed")
    return {k: params[k] for k in keys if k in params}


def run_factor_analysis(profile: str | Mapping[str, Any] = "demo",
                        root: str | os.PathLike | None = None, force: bool = False,
                        progress: bool = True, **overrides: Any) -> FactorAnalysis:
    """Stage 07: fit the factor model to ``scored.parquet`` and write ``data/analysis/``.

    Parameters
    ----------
    profile : profile name or mapping; its ``[analysis]`` table sets the model and sampler.
    root : project root (default: the repository, or ``$MISGROUND_ROOT``).
    force : refit even when the outputs exist for the same parameters and input.
    progress : show the sampler's progress bar.
    **overrides : single ``[analysis]`` keys (``None`` keeps the profile's value).

    Returns
    -------
    FactorAnalysis; ``reused`` says whether the outputs on disk were fresh and read back.
    """
    import xarray as xr

    params = stage_params(profile, "analysis", **overrides)
    paths = project_paths(root)
    scored = load_scored(paths.root)
    stamp = stamp_params(params, paths)
    out = paths.analysis
    kwargs = _fit_kwargs(params)
    if not force and is_fresh(out, "analysis", stamp, OUTPUTS):
        data = prepare_factor_data(scored, kwargs.get("factors", FACTORS),
                                   kwargs.get("interactions", INTERACTIONS),
                                   kwargs.get("groups", GROUPS))
        posterior = xr.open_datatree(out / FACTOR_POSTERIOR_FILE, engine="zarr",
                                     consolidated=False).load()
        return FactorAnalysis(
            effects=pd.read_parquet(out / FACTOR_EFFECTS_FILE),
            sds=pd.read_parquet(out / FACTOR_SD_FILE),
            contrasts=pd.read_parquet(out / CONTRASTS_FILE),
            ppc=pd.read_parquet(out / PPC_FILE),
            diagnostics=json.loads((out / FACTOR_DIAGNOSTICS_FILE).read_text()),
            posterior=posterior, data=data, params=params, reused=True)
    fit = fit_factor_model(scored, progress=progress, **kwargs)
    write_outputs(fit, out)
    write_stamp(out, "analysis", stamp, OUTPUTS)
    for name, value in (("divergences", fit.diagnostics["divergences"]),
                        ("max R-hat", fit.diagnostics["max_r_hat"])):
        log.info("factor model %s: %s", name, value)
    if not fit.diagnostics["rhat_ok"] or fit.diagnostics["divergences"]:
        log.warning("factor model did not sample cleanly: %d divergences, max R-hat %.3f "
                    "(see factor_diagnostics.json)", fit.diagnostics["divergences"],
                    fit.diagnostics["max_r_hat"])
    return FactorAnalysis(effects=fit.effects, sds=fit.sds, contrasts=fit.contrasts,
                          ppc=fit.ppc, diagnostics=fit.diagnostics, posterior=fit.posterior,
                          data=fit.data, params=params, reused=False)


# ------------------------------------------------------------------------------------------
# Figures (notebook 07; its forest plot is mislib.plots.factor_forest, shared with 08)
# ------------------------------------------------------------------------------------------
def plot_ppc(ppc: pd.DataFrame, ax=None):
    """Observed accuracy per cell (dots) against the 95 % posterior predictive band."""
    import matplotlib.pyplot as plt

    df = ppc.iloc[::-1]
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 0.2 * len(df) + 1.0))
    y = np.arange(len(df))
    ax.hlines(y, df["pp_lo95"], df["pp_hi95"], color="0.7", lw=4, label="95 % predictive")
    colors = np.where(df["inside"], "C0", "C3")
    ax.scatter(df["observed"], y, s=12, c=colors, zorder=3, label="observed")
    ax.set_yticks(y, df["cell"].str.removeprefix("p[").str.removesuffix("]"), fontsize=7)
    ax.set_ylim(-0.7, len(df) - 0.3)
    ax.set_xlabel("accuracy")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    return ax


def plot_diagnostics(effects: pd.DataFrame, sds: pd.DataFrame, axes=None):
    """R-hat and bulk ESS of every fixed effect and random-intercept SD."""
    import matplotlib.pyplot as plt

    df = pd.concat([effects, sds], ignore_index=True)
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(9, 3))
    axes[0].hist(df["r_hat"], bins=30, color="C0")
    axes[0].axvline(RHAT_MAX, color="C3", ls="--", label=f"R-hat = {RHAT_MAX}")
    axes[0].set_xlabel("R-hat (rank-normalised, split)")
    axes[0].legend(fontsize=7)
    axes[1].hist(df["ess_bulk"], bins=30, color="C1")
    axes[1].set_xlabel("bulk ESS")
    for ax in axes:
        ax.set_ylabel("parameters")
    return axes


def plot_traces(posterior, names: Sequence[str] | None = None, axes=None):
    """Per-chain traces of scalar parameters (default: the intercept and the SDs)."""
    import matplotlib.pyplot as plt

    post = posterior["posterior"] if "posterior" in posterior.children else posterior
    if names is None:
        names = ["Intercept", *sorted(v for v in post.data_vars if str(v).startswith("sd_"))]
    if axes is None:
        _, axes = plt.subplots(len(names), 1, figsize=(8, 1.3 * len(names) + 0.4),
                               sharex=True, squeeze=False)
        axes = axes[:, 0]
    for ax, name in zip(axes, names, strict=True):
        values = np.asarray(post[name].values)
        for chain in range(values.shape[0]):
            ax.plot(values[chain], lw=0.5, alpha=0.8, label=f"chain {chain}")
        ax.set_ylabel(name, fontsize=8)
    axes[-1].set_xlabel("draw (after warm-up)")
    axes[0].legend(fontsize=7, ncol=4, loc="upper right")
    return axes
