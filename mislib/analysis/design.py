"""The fixed-effect design: sum-to-zero bases, the random-intercept cells, the whitening.

A diagonal mass matrix cannot follow correlated directions, and the plain form of the
factor model has two kinds that are linear in its coefficients: unbalanced levels (a rare
level tied to the intercept; ``dims`` told apart from ``family`` by plane questions only) and
the means of random intercepts that a fixed effect could stand in for. :func:`fixed_design`
collects the fixed effects and those means into one coefficient vector ``theta`` with
independent priors, and whitens it by a Laplace approximation of the binomial GLM on the
pattern counts, so the sampler moves in coordinates where these correlations are gone.

>>> b = sum_to_zero_basis(3)
>>> np.allclose(b.sum(axis=0), 0), np.allclose(b.T @ b, np.eye(2))
(True, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mislib.analysis.data import FactorData, first_rows, patterns
from mislib.vocabulary import TRIAL_FACTORS, interaction_name


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
    first_row = first_rows(data.question_index, n_q)
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
    out. In these coordinates the design's correlations are gone (unbalanced levels that
    tie a rare level to the intercept; ``dims``, which only plane questions separate from
    ``family``), which a diagonal mass matrix cannot undo: in raw coordinates they left
    ``Intercept`` and ``family`` mixing slowly at the paper's scale (bench/RESULTS.md).

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
    """The pattern design of the fixed effects and its whitening transform (:class:`FixedDesign`).

    ``group_sd_guess`` stands in for the random-intercept SDs in the prior of the block
    means while the transform is computed (a guess 2x off only leaves a condition number of
    about 4 along the block means' ridge); ``newton_steps`` bounds the search for the mode.
    """
    pattern_codes, pattern_of_row, counts = patterns(data)
    matrix, scale, blocks, group_means, n_fixed, names = _design_columns(
        data, pattern_codes, pattern_of_row, prior_sd, interaction_sd)
    theta, transform = _laplace(matrix, scale, n_fixed, counts, group_sd_guess, newton_steps)
    return FixedDesign(matrix=matrix, pattern_of_row=pattern_of_row, scale=scale, mode=theta,
                       transform=transform, blocks=blocks, group_means=group_means,
                       n_fixed=n_fixed, coef_names=names)


def _design_columns(data: FactorData, pattern_codes: np.ndarray, pattern_of_row: np.ndarray,
                    prior_sd: float, interaction_sd: float):
    """The columns of the pattern design: intercept, factors, interactions, group means.

    Returns ``(matrix, scale, blocks, group_means, n_fixed, coef_names)`` as in
    :class:`FixedDesign`.
    """
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
    first = first_rows(pattern_of_row, n_pat)
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
    return matrix, scale, blocks, group_means, n_fixed, names


def _laplace(matrix: np.ndarray, scale: np.ndarray, n_fixed: int, counts,
             group_sd_guess: float, newton_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Mode and whitening transform of the binomial GLM of the fixed effects and group means.

    The random-intercept SDs are set to ``group_sd_guess`` (their columns scaled by it);
    Newton's method finds the mode, and ``transform`` is the inverse Cholesky factor of the
    Hessian there (``transform @ transform.T`` = the Laplace covariance).
    """
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
    return theta, transform
