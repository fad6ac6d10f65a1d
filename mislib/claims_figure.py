"""The paper against this run, one row per claim quantity (stage 08's reproduction test drawn).

Each row shows the paper's value as a black diamond inside its tolerance band (grey), this
run's Bayes@N estimate with its credible interval coloured by the claim's status
(:mod:`mislib.claims`), the raw accuracy of the same trials as a cross and, for an
accuracy, chance as a grey tick. Levels (percent) and differences (percentage points) sit in
two panels with their own axes. A claim the paper gives only a direction for has no diamond;
its band is the side of zero it claims.

>>> from mislib.claims import evaluate_claims           # doctest: +SKIP
>>> fig = claims_figure(evaluate_claims(scored))         # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from mislib.claims import ARM_CLAIMS
from mislib.provenance import Provenance
from mislib.vocabulary import CLAIM_STATUSES, is_missing

#: Colour of each claim status (colour-blind safe: blue, vermilion, orange, greys).
STATUS_COLOURS: Mapping[str, str] = {
    "reproduced": "#0072B2", "contradicted": "#D55E00", "inconclusive": "#E69F00",
    "not assessed": "#7f7f7f", "not measurable": "#c7c7c7"}
#: File name (without notebook prefix and suffix) under ``figures/``.
FIGURE_NAME = "claims_vs_paper"
_PER_MODEL = {c.id for c in ARM_CLAIMS}
_NEEDED = ("id", "quantity", "kind", "models", "paper", "sign", "tolerance", "estimate", "lo",
           "hi", "raw", "chance", "status")


def _row_label(row: pd.Series) -> str:
    """The quantity, and for a decoding claim (one row per model) the model's name."""
    models = str(row["models"])
    if row["id"] not in _PER_MODEL or not models:
        return str(row["quantity"])
    return f"{row['quantity']} · {models.split('/')[-1]}"


def _panel(ax: plt.Axes, rows: pd.DataFrame, unit: str) -> None:
    y = np.arange(len(rows))[::-1]
    for yi, (_, r) in zip(y, rows.iterrows(), strict=True):
        tol = float(r["tolerance"])
        if not is_missing(r["paper"]):
            ax.barh(yi, 2 * tol, left=r["paper"] - tol, height=0.7, color="0.88", zorder=1)
            ax.plot(r["paper"], yi, marker="D", color="black", markersize=4.5, zorder=4)
        elif r["sign"]:
            # the paper's direction only: shade the claimed side of zero
            ax.barh(yi, 1e3 * np.sign(r["sign"]), left=0, height=0.7, color="0.93", zorder=1)
        colour = STATUS_COLOURS.get(str(r["status"]), "black")
        if is_missing(r["estimate"]):
            ax.text(0.01, yi, str(r["status"]), transform=ax.get_yaxis_transform(),
                    va="center", ha="left", fontsize=6.5, color="0.45", style="italic")
            continue
        ax.plot([r["lo"], r["hi"]], [yi, yi], color=colour, linewidth=2.2, zorder=3,
                solid_capstyle="butt")
        ax.plot(r["estimate"], yi, "o", color=colour, markersize=4, zorder=5)
        if not is_missing(r["raw"]):
            ax.plot(r["raw"], yi, "x", color=colour, markersize=4, zorder=5)
        if r["kind"] == "level" and not is_missing(r["chance"]):
            ax.plot(r["chance"], yi, "|", color="0.35", markersize=8, zorder=2)
    ax.set_yticks(y, [_row_label(r) for _, r in rows.iterrows()], fontsize=7)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    values = pd.concat([rows[c] for c in ("paper", "lo", "hi", "raw")]).dropna()
    if unit == "percent":
        ax.set_xlim(0, 100)
        ax.set_xlabel("accuracy (%)")
    else:
        ax.axvline(0, color="0.4", linewidth=0.8, zorder=2)
        reach = max(float(values.abs().max()) if len(values) else 0.0,
                    float(rows["tolerance"].max())) * 1.15 + 1
        ax.set_xlim(-reach, reach)
        ax.set_xlabel("difference (percentage points)")
    ax.grid(axis="y", visible=False)


def claims_figure(claims: pd.DataFrame, title: str = "") -> plt.Figure:
    """The claims table of :func:`mislib.claims.evaluate_claims` drawn: paper vs this run.

    Raises
    ------
    ValueError
        When ``claims`` lacks a column the figure needs, or has no rows.
    """
    missing = [c for c in _NEEDED if c not in claims]
    if missing:
        raise ValueError(f"claims table lacks columns {missing} (mislib.claims.evaluate_claims)")
    if claims.empty:
        raise ValueError("claims table has no rows")
    levels = claims[claims["kind"] == "level"]
    diffs = claims[claims["kind"] == "difference"]
    panels = [(p, unit) for p, unit in ((levels, "percent"), (diffs, "points")) if len(p)]
    heights = [len(p) for p, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, 1.2 + 0.24 * sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (rows, unit) in zip(axes[:, 0], panels, strict=True):
        _panel(ax, rows, unit)
    shown = [s for s in CLAIM_STATUSES if s in set(claims["status"])]
    handles = [Patch(color=STATUS_COLOURS[s], label=s) for s in shown] + [
        Line2D([], [], marker="D", color="black", linestyle="", markersize=4.5,
               label="paper"),
        Patch(color="0.88", label=f"paper ± {claims['tolerance'].iat[0]:g}"),
        Line2D([], [], marker="o", color="0.3", linestyle="", markersize=4,
               label="this run: Bayes@N + interval"),
        Line2D([], [], marker="x", color="0.3", linestyle="", markersize=4, label="raw"),
        Line2D([], [], marker="|", color="0.35", linestyle="", markersize=8, label="chance")]
    axes[0, 0].legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.01), ncol=5,
                      fontsize=6.5, frameon=False)
    fig.suptitle(title or "The paper's headline claims against this run", y=1.0,
                 fontweight="bold", fontsize=10)
    fig.tight_layout()
    return fig


def save_claims_figure(claims: pd.DataFrame, provenance: Provenance,
                       root: str | os.PathLike | None = None) -> list[Path]:
    """Draw :func:`claims_figure` and save it as ``figures/08_claims_vs_paper.{png,pdf}``,
    stamped with ``provenance``; the paths.

    The figure draws no factor-model estimate, so its stamp leaves out the fit's convergence
    (the claims table's factor-model column carries it).
    """
    from mislib.plots import save_figure, set_style

    set_style()
    title = None
    if provenance.smoke:
        title = ("The paper's headline claims against this run — smoke model: answers are "
                 "noise, nothing assessed")
    return save_figure(claims_figure(claims, title or ""), FIGURE_NAME, root=root,
                       provenance=provenance.replace(converged=None))
