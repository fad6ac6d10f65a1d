"""Validity rules of the benchmark, checked independently of the code that generates it.

The generator (:mod:`mislib.render`, :mod:`mislib.questions`) is built to obey these rules;
the checkers here re-derive each rule from the written tables — ``letters.parquet``,
``renders.parquet``, ``questions.parquet`` — with their own code, never by reading a flag
the generator set, so a generator bug shows up as a violation instead of being trusted.
Stage 03 writes their summary to ``benchmark/validity.parquet`` (:func:`validity_report`:
``rule, checked, violations, description``); the project's ``docs/design.md`` states the rules.

Each checker takes the tables and returns ``(checked, violations)``: how many items it
looked at and a DataFrame of the offending rows (empty when the rule holds).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def check_letters_on_marks(letters: pd.DataFrame) -> tuple[int, pd.DataFrame]:
    """Every letter is nearer its own anchor than any other structure's anchor.

    Parameters
    ----------
    letters : DataFrame
        ``letters.parquet``: one row per (render, frame, letter) with the glyph's centre
        ``letter_col, letter_row`` and its mark's anchor ``anchor_col, anchor_row`` (pixels).

    Returns
    -------
    (letters checked, violating rows with ``own_px`` and ``other_px`` distances and the
    ``nearer`` letter whose anchor is closer).
    """
    need = {"render_id", "frame", "letter", "letter_col", "letter_row", "anchor_col",
            "anchor_row"}
    missing = sorted(need - set(letters.columns))
    if missing:
        raise ValueError(f"letters.parquet: missing columns {missing}")
    bad = []
    for (_, _), group in letters.groupby(["render_id", "frame"], sort=False):
        centre = group[["letter_col", "letter_row"]].to_numpy(float)
        anchor = group[["anchor_col", "anchor_row"]].to_numpy(float)
        dist = np.linalg.norm(centre[:, None, :] - anchor[None, :, :], axis=2)  # letter x anchor
        own = np.diag(dist).copy()
        np.fill_diagonal(dist, np.inf)
        nearest = dist.argmin(axis=1)
        other = dist[np.arange(len(group)), nearest]
        for i in np.flatnonzero(other <= own):
            row = group.iloc[i].to_dict()
            bad.append({**row, "own_px": float(own[i]), "other_px": float(other[i]),
                        "nearer": group["letter"].iloc[nearest[i]]})
    return len(letters), pd.DataFrame(bad)
