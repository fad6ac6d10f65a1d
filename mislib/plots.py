"""The figures of notebooks 06–08, drawn from the tables of stages 06 and 07.

Each figure function takes a table and returns a :class:`matplotlib.figure.Figure`;
:func:`save_figure` — the one way every notebook saves a figure — writes it as PNG and PDF
under ``figures/`` with the notebook's number in its name (:func:`mislib.paths.figure_path`);
:func:`make_figures` draws stage 08's figures from ``data/analysis/`` and names the ones
notebooks 06 and 07 already saved (a figure is drawn once), :func:`factor_analysis_figures`
notebook 07's diagnostics of the factor model. Notebook 05's figures explain the decode rule
and live beside its tables in :mod:`mislib.explain`. Every saved figure carries a
provenance stamp (:mod:`mislib.provenance`): profile, models, runs and counts.

Accuracies are shown with their context: the Bayes@N posterior mean with its central
credible interval (stage 06; with few trials it is shrunk toward 50 %), the raw accuracy of
the same trials (``x``), the chance level of the questions (dashed, 1 / number of options)
and n (questions × trials), in percent. The forest plot shows the factor model's fixed
effects on the logit scale (stage 07). Cells pool the models of a run (each (model,
question) a Bayes@N row) and are drawn per arm.

>>> import pandas as pd
>>> table = pd.DataFrame({"model": "m", "arm": "baseline", "factor": "dims",
...                       "level": ["2d", "3d"], "mu": [0.6, 0.5], "lo": [0.55, 0.45],
...                       "hi": [0.65, 0.55]})
>>> fig = accuracy_by_factor(table)
>>> len(fig.axes)
1
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from mislib.analysis.fit import RHAT_MAX
from mislib.bayes import bayes_by
from mislib.paths import (
    SCORED_FILE,
    SEMSAM_EFFECT_FILE,
    figure_path,
    project_paths,
)
from mislib.provenance import Provenance, stamp
from mislib.vocabulary import decoded_model, ordered

NOTEBOOK = "08_paper_assets"
#: The figures :func:`make_figures` draws (file names ``08_<name>.png|pdf``).
FIGURES = ("accuracy_by_size", "convention_terminology", "visual_prompt", "dims_2d_3d",
           "ablations", "semsam_by_model")
#: The paper's figures another notebook draws, by the paper's name: (notebook, name there).
#: Drawn once, where they are measured; :func:`make_figures` returns their files.
REUSED_FIGURES = {"accuracy_by_factor": ("06_scoring", "accuracy_by_factor"),
                  "accuracy_by_arm": ("06_scoring", "accuracy_by_arm"),
                  "factor_forest": ("07_factor_analysis", "forest")}


def set_style() -> None:
    """The figures' seaborn theme (paper context, white grid, colour-blind palette)."""
    sns.set_theme(context="paper", style="whitegrid", palette="colorblind",
                  rc={"figure.dpi": 100, "savefig.bbox": "tight", "axes.titleweight": "bold"})


def save_figure(fig: plt.Figure, name: str, root: str | os.PathLike | None = None,
                notebook: str = NOTEBOOK, formats: Sequence[str] = ("png", "pdf"),
                dpi: int = 200, provenance: Provenance | None = None) -> list[Path]:
    """Write ``fig`` as ``figures/<nn>_<name>.<fmt>`` for each format; close it; the paths.

    ``provenance`` (profile, models, runs, counts) is stamped under the figure's corner
    first (:func:`mislib.provenance.stamp`). Each file is written aside and moved onto its
    name, so a killed run never leaves a truncated figure (the next run redraws every
    figure).
    """
    if provenance is not None:
        stamp(fig, provenance)
    paths = []
    for fmt in formats:
        path = figure_path(notebook, name, root, suffix=f".{fmt}")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        try:
            fig.savefig(partial, dpi=dpi, format=fmt, bbox_inches="tight")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        paths.append(path)
    plt.close(fig)
    return paths


def _check_columns(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in table]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}")


def _n_text(rows: pd.DataFrame) -> str:
    """``n 48×2`` (questions × trials) of the rows drawn at one level; a range if they differ."""
    if not {"n_questions", "n_trials"} <= set(rows) or rows.empty:
        return ""
    q = rows["n_questions"].astype(int)
    t = rows["n_trials"].astype(int)
    qs = f"{q.min():,}" if q.min() == q.max() else f"{q.min():,}–{q.max():,}"
    ts = f"{t.min()}" if t.min() == t.max() else f"{t.min()}–{t.max()}"
    return f"n {qs}×{ts}"


def _points(ax: plt.Axes, table: pd.DataFrame, x: str, hue: str | None,
            x_order: Sequence[str], hue_order: Sequence[str], palette: Mapping[str, Any],
            y: str = "mu", lo: str = "lo", hi: str = "hi", scale: float = 100.0,
            lines: bool = False, raw: str | None = "accuracy", chance: str | None = "chance",
            n_in_ticks: bool = True) -> None:
    """Dodged points with interval bars: one series per ``hue`` level over ``x`` levels.

    Beside each interval, when the table has them: the raw accuracy (``raw`` column, an
    ``x`` marker of the series' colour), a dashed grey chance segment per ``x`` level
    (``chance`` column, averaged over the series), and ``n questions×trials`` under each
    tick label.
    """
    n_hue = max(len(hue_order), 1)
    width = 0.6 if n_hue > 1 else 0.0
    slot = width / n_hue if n_hue > 1 else 0.3
    has_raw = raw is not None and raw in table
    for j, level in enumerate(hue_order or [None]):
        part = table if hue is None else table[table[hue].astype(str) == level]
        offset = (j - (n_hue - 1) / 2) * (width / n_hue)
        xs, ys, los, his, raws = [], [], [], [], []
        for i, xl in enumerate(x_order):
            row = part[part[x].astype(str) == xl]
            if row.empty:
                continue
            r = row.iloc[0]
            xs.append(i + offset)
            ys.append(r[y] * scale)
            los.append(r[lo] * scale)
            his.append(r[hi] * scale)
            raws.append(r[raw] * scale if has_raw else np.nan)
        if not xs:
            continue
        ys, los, his = np.array(ys), np.array(los), np.array(his)
        colour = palette.get(level, "C0")
        ax.errorbar(xs, ys, yerr=[ys - los, his - ys], fmt="o-" if lines else "o",
                    color=colour, capsize=3, markersize=5, linewidth=1.4, label=level)
        if has_raw:
            ax.plot(np.array(xs) + 0.35 * slot, raws, "x", color=colour, markersize=5,
                    markeredgewidth=1.4, linestyle="none")
    if chance is not None and chance in table:
        for i, xl in enumerate(x_order):
            level_chance = table.loc[table[x].astype(str) == xl, chance].mean()
            if pd.notna(level_chance):
                ax.hlines(level_chance * scale, i - 0.45, i + 0.45, colors="0.45",
                          linestyles="--", linewidth=0.9, zorder=0)
    labels = list(x_order)
    if n_in_ticks:
        labels = [f"{xl}\n{_n_text(table[table[x].astype(str) == xl])}".rstrip()
                  for xl in x_order]
    ax.set_xticks(range(len(x_order)))
    ax.set_xticklabels(labels)
    ax.set_xlim(-0.6, len(x_order) - 0.4)


def _key_handles(raw: bool, chance: bool, raw_label: str = "raw accuracy") -> list[Any]:
    """Legend entries for the marks every series shares: Bayes@N, raw accuracy, chance."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.2", marker="o", linestyle="-", markersize=5,
                      label="Bayes@N, credible interval")]
    if raw:
        handles.append(Line2D([], [], color="0.2", marker="x", linestyle="none",
                              markersize=5, markeredgewidth=1.4, label=raw_label))
    if chance:
        handles.append(Line2D([], [], color="0.45", linestyle="--", linewidth=0.9,
                              label="chance (1 / options)"))
    return handles


def _percent_axis(ax: plt.Axes) -> None:
    ax.set_ylim(-3, 103)
    ax.set_ylabel("accuracy (%)")


def _palette(levels: Sequence[str]) -> dict[str, Any]:
    return dict(zip(levels, sns.color_palette("colorblind", max(len(levels), 1)), strict=False))


def accuracy_by_factor(table: pd.DataFrame, factors: Sequence[str] | None = None,
                       ncols: int = 3) -> plt.Figure:
    """Accuracy (%) for every level of every factor: Bayes@N, raw accuracy, chance and n.

    Parameters
    ----------
    table : ``bayes_by_factor.parquet`` (``model, arm, factor, level, mu, lo, hi``; with
        ``accuracy``, ``chance``, ``n_questions`` and ``n_trials`` the raw accuracy, the
        chance level and n are drawn too).
    factors : which factors, in order (default: every factor in the table but ``all``).
    ncols : panels per row.

    One panel per factor; one colour per model × arm. Each level shows the Bayes@N mean
    with its credible interval (dot and bar), the raw accuracy of the same trials (``x``
    beside it), the chance level of its questions (dashed) and n (questions × trials) under
    its name.
    """
    _check_columns(table, ["model", "arm", "factor", "level", "mu", "lo", "hi"],
                   "bayes_by_factor table")
    set_style()
    table = table.assign(series=table["model"].astype(str) + " · " + table["arm"].astype(str))
    if factors is None:
        factors = [f for f in pd.unique(table["factor"]) if f != "all"]
    factors = list(factors)
    if not factors:
        raise ValueError("bayes_by_factor table has no factor rows")
    series = sorted(table["series"].unique())
    palette = _palette(series)
    ncols = min(ncols, len(factors))
    nrows = -(-len(factors) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.0 * nrows), sharey=True,
                             squeeze=False)
    for ax, factor in zip(axes.flat, factors, strict=False):
        part = table[table["factor"] == factor]
        _points(ax, part, "level", "series", ordered(factor, part["level"]), series, palette)
        ax.set_title(factor)
        ax.set_xlabel("")
        ax.tick_params(axis="x", labelsize=7)
    for ax in axes.flat[len(factors):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        _percent_axis(ax)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    keys = _key_handles("accuracy" in table, "chance" in table)
    fig.legend(handles + keys, labels + [h.get_label() for h in keys], loc="upper center",
               ncol=min(len(series) + len(keys), 4), bbox_to_anchor=(0.5, 1.0),
               frameon=False, fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.0 * nrows) * (1 + len(series) // 3)))
    return fig


def accuracy_by_arm(table: pd.DataFrame) -> plt.Figure:
    """The arms side by side per model: Bayes@N, raw accuracy, chance and n.

    Parameters
    ----------
    table : ``bayes_by_factor.parquet`` (its overall rows, ``factor == "all"``, are drawn)
        or a table of one row per model × arm with ``mu, lo, hi`` (and ``accuracy``,
        ``chance``, ``n_questions``, ``n_trials``).

    One panel per model, the arms in the benchmark's order (``baseline, greedy, semsam``):
    the comparison the decode rule is judged by, with the numbers that tell a difference
    from noise beside it.
    """
    _check_columns(table, ["model", "arm", "mu", "lo", "hi"], "per-arm table")
    if "factor" in table:
        table = table[table["factor"] == "all"]
    if table.empty:
        raise ValueError("per-arm table has no overall rows (factor == 'all')")
    set_style()
    models = sorted(table["model"].astype(str).unique())
    arms = ordered("arm", table["arm"])
    palette = _palette(arms)
    ncols = min(len(models), 3)
    nrows = -(-len(models) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.2 + 1.3 * len(arms) * ncols,
                                                    3.0 * nrows),
                             sharey=True, squeeze=False)
    for ax, model in zip(axes.flat, models, strict=False):
        part = table[table["model"].astype(str) == model]
        for arm in arms:  # one colour per arm, each at its own position
            _points(ax, part[part["arm"].astype(str) == arm], "arm", "arm", arms, [arm],
                    palette, n_in_ticks=False)
        ax.set_xticklabels([f"{a}\n{_n_text(part[part['arm'].astype(str) == a])}".rstrip()
                            for a in arms])
        ax.set_title(model, fontsize=8)
        ax.set_xlabel("")
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        _percent_axis(ax)
    keys = _key_handles("accuracy" in table, "chance" in table)
    fig.legend(keys, [h.get_label() for h in keys], loc="upper center", ncol=len(keys),
               bbox_to_anchor=(0.5, 1.0), frameon=False, fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (3.0 * nrows)))
    return fig


def accuracy_by_size(table: pd.DataFrame, sizes: Mapping[str, float | None]) -> plt.Figure:
    """The paper's headline figure: overall accuracy against model size, one line per arm.

    Parameters
    ----------
    table : one row per (model, arm) with ``mu, lo, hi`` (Bayes@N) and, when present,
        ``accuracy`` (raw), ``chance``, ``n_questions``, ``n_trials`` (``bayes_by(scored,
        ["model", "arm"])``); a model decoded on an endpoint is named ``"<model> via
        <decoder>"`` (:func:`mislib.vocabulary.decoded_model`).
    sizes : parameters in billions per model name (the registry's ``params_b``; the part
        of a name before ``" via "`` is looked up). A model without a size (a hosted model,
        the smoke model) is a horizontal reference line in its arm's colour, named at the
        right edge, as the paper draws its hosted reference.

    The x axis is logarithmic; each arm's models of known size are joined by a line, with
    the raw accuracy (x) beside each Bayes@N interval, the mean chance level dashed, and n
    in the legend.
    """
    _check_columns(table, ["model", "arm", "mu", "lo", "hi"], "per-model, per-arm table")
    if table.empty:
        raise ValueError("per-model, per-arm table has no rows")
    set_style()
    arms = ordered("arm", table["arm"])
    palette = _palette(arms)
    size_of = {m: sizes.get(str(m).split(" via ")[0]) for m in table["model"].unique()}
    sized = table[table["model"].map(lambda m: size_of[m] is not None)]
    refs = table[table["model"].map(lambda m: size_of[m] is None)]
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for arm in arms:
        part = sized[sized["arm"] == arm].assign(size=lambda d: d["model"].map(size_of))
        part = part.sort_values("size")
        if part.empty:
            continue
        colour = palette[arm]
        ax.errorbar(part["size"], part["mu"] * 100, fmt="o-", color=colour, capsize=3,
                    yerr=[(part["mu"] - part["lo"]) * 100, (part["hi"] - part["mu"]) * 100],
                    label=f"{arm} ({_n_text(part)})".replace(" ()", ""))
        if "accuracy" in part:
            ax.plot(part["size"] * 1.06, part["accuracy"] * 100, "x", color=colour,
                    markersize=5, markeredgewidth=1.4, linestyle="none")
    label_y = -np.inf  # reference labels stacked upwards where their lines coincide
    for r in refs.sort_values("mu").itertuples(index=False):
        colour = palette[r.arm]
        ax.axhline(r.mu * 100, color=colour, linestyle=(0, (6, 3)), linewidth=1.2)
        ax.axhspan(r.lo * 100, r.hi * 100, color=colour, alpha=0.08, linewidth=0)
        label_y = max(r.mu * 100, label_y + 4.0)
        raw = (f" (raw {r.accuracy * 100:.0f} %)" if "accuracy" in refs
               and pd.notna(r.accuracy) else "")
        ax.annotate(f"{r.model} · {r.arm}{raw}", xy=(1.0, r.mu * 100),
                    xycoords=("axes fraction", "data"), xytext=(1.01, label_y),
                    textcoords=("axes fraction", "data"), va="center", fontsize=7,
                    color=colour)
    if "chance" in table and table["chance"].notna().any():
        ax.axhline(table["chance"].mean() * 100, color="0.45", linestyle="--", linewidth=0.9,
                   zorder=0)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    if not sized.empty:  # a tick at each model's size
        known = sorted({size_of[m] for m in sized["model"]})
        ax.set_xticks(known)
        ax.set_xlim(known[0] / 1.5, known[-1] * 1.5)
    else:
        ax.set_xlim(1, 100)
        ax.text(0.5, 0.04, "no model of known size (params_b): reference lines only",
                transform=ax.transAxes, ha="center", fontsize=8, color="0.35")
    ax.set_xlabel("model size (billions of parameters)")
    _percent_axis(ax)
    ax.set_title("Overall accuracy against model size", fontsize=10)
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    keys = _key_handles("accuracy" in table, "chance" in table)
    if not refs.empty:
        keys.append(Line2D([], [], color="0.3", linestyle=(0, (6, 3)), linewidth=1.2,
                           label="model of unknown size (hosted): Bayes@N, interval shaded"))
    ax.legend(handles + keys, labels + [k.get_label() for k in keys], fontsize="x-small",
              loc="upper left", frameon=False)
    fig.tight_layout()
    return fig


def interaction(cells: pd.DataFrame, x: str, hue: str, col: str = "arm",
                title: str | None = None, reference: float | None = None,
                difference: bool = False) -> plt.Figure:
    """Accuracy (%) of ``x`` × ``hue`` cells, one panel per ``col`` level (an interaction plot).

    Parameters
    ----------
    cells : Bayes@N cells (:func:`mislib.scoring.bayes_by` with ``[col, x, hue]``).
    x, hue, col : the factor on the axis, the factor in colour, the factor per panel.
    title : figure title.
    reference : a horizontal dashed line (percent), e.g. 0 for differences.
    difference : the cells are differences in points (no 0–100 % axis, no chance level).

    With ``accuracy``, ``chance``, ``n_questions`` and ``n_trials`` in ``cells`` (as
    :func:`mislib.bayes.bayes_by` writes them) the raw accuracy, the chance level and n are
    drawn beside each interval.
    """
    _check_columns(cells, [x, hue, "mu", "lo", "hi"], f"{x} × {hue} cells")
    if cells.empty:
        raise ValueError(f"no {x} × {hue} cells to plot: does the run have both factors?")
    set_style()
    panels = ordered(col, cells[col]) if col in cells else [None]
    hue_order = ordered(hue, cells[hue])
    palette = _palette(hue_order)
    x_order = ordered(x, cells[x])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels) + 0.6, 3.0),
                             sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        part = cells if panel is None else cells[cells[col].astype(str) == panel]
        _points(ax, part, x, hue, x_order, hue_order, palette, lines=True,
                chance=None if difference else "chance")
        if reference is not None:
            ax.axhline(reference, color="0.5", linestyle="--", linewidth=0.8)
        ax.set_title(f"{col} = {panel}" if panel is not None else "")
        ax.set_xlabel(x)
    if difference:
        axes[0, 0].set_ylabel("difference (points)")
    else:
        _percent_axis(axes[0, 0])
    handles, labels = axes[0, -1].get_legend_handles_labels()
    keys = _key_handles("accuracy" in cells, "chance" in cells and not difference,
                        "raw difference" if difference else "raw accuracy")
    axes[0, -1].legend(handles + keys, labels + [h.get_label() for h in keys], title=hue,
                       loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=True,
                       fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def visual_prompt_effect(cells: pd.DataFrame, baseline: str = "none",
                         col: str = "arm") -> plt.Figure:
    """The visual prompts against the no-prompt baseline, per terminology.

    Parameters
    ----------
    cells : Bayes@N cells by ``[col, "prompt", "terminology"]`` with ``mu, sigma, lo, hi``.
    baseline : the ``prompt`` level that means "no visual prompt".

    When the run has the baseline level, each prompt's difference from it is drawn
    (points, with intervals from the two cells' posterior SDs; ``x``: the difference of
    the raw accuracies; n of the prompt's cell under its name); without it, the prompts'
    accuracies are drawn and the title says that the baseline is missing.
    """
    _check_columns(cells, ["prompt", "terminology", "mu", "sigma", "lo", "hi"],
                   "prompt × terminology cells")
    has_baseline = baseline in set(cells["prompt"].astype(str))
    if not has_baseline:
        return interaction(cells, "prompt", "terminology", col,
                           title=f"Visual prompts (no '{baseline}' baseline in this run)")
    keys = [c for c in (col, "terminology") if c in cells]
    base_rows = cells[cells["prompt"].astype(str) == baseline].set_index(keys)
    base = base_rows[["mu", "sigma"]]
    base_raw = base_rows["accuracy"] if "accuracy" in cells else None
    rows = []
    for _, r in cells[cells["prompt"].astype(str) != baseline].iterrows():
        key = tuple(r[k] for k in keys)
        if key not in base.index:
            continue
        b = base.loc[key]
        d, s = r["mu"] - b["mu"], float(np.hypot(r["sigma"], b["sigma"]))
        row = {**{k: r[k] for k in keys}, "prompt": r["prompt"], "mu": d,
               "lo": d - 1.959964 * s, "hi": d + 1.959964 * s}
        if "accuracy" in cells:  # the raw difference of the same two cells
            row["accuracy"] = r["accuracy"] - base_raw.loc[key]
        if {"n_questions", "n_trials"} <= set(cells):
            row.update(n_questions=r["n_questions"], n_trials=r["n_trials"])
        rows.append(row)
    diff = pd.DataFrame(rows)
    return interaction(diff, "prompt", "terminology", col, reference=0.0, difference=True,
                       title=f"Visual prompt minus no prompt ('{baseline}')")


def semsam_by_model(effect: pd.DataFrame) -> plt.Figure:
    """Baseline vs SemSam accuracy per model (left) and the paired effect (right).

    Parameters
    ----------
    effect : ``semsam_effect.parquet`` (``model, baseline_mu/lo/hi, semsam_mu/lo/hi,
        effect_mu/lo/hi``; a model with a ``decoder`` other than ``local`` is drawn as
        ``"<model> via <decoder>"``; with ``*_accuracy``, ``chance``, ``n_questions`` and
        ``n_trials`` the raw accuracies and their difference, the chance level and n too).
    """
    _check_columns(effect, ["model", "baseline_mu", "baseline_lo", "baseline_hi", "semsam_mu",
                            "semsam_lo", "semsam_hi", "effect_mu", "effect_lo", "effect_hi"],
                   "semsam_effect table")
    if effect.empty:
        raise ValueError("semsam_effect table is empty: no model was run in both arms")
    if "decoder" in effect:  # one row per (model, decoder): an endpoint's run is its own
        effect = effect.assign(model=[decoded_model(m, d) for m, d in
                                      zip(effect["model"], effect["decoder"], strict=True)])
    set_style()
    models = list(effect["model"].astype(str))
    arms = ["baseline", "semsam"]

    def arm_rows(arm: str) -> pd.DataFrame:
        out = effect.assign(arm=arm, mu=effect[f"{arm}_mu"], lo=effect[f"{arm}_lo"],
                            hi=effect[f"{arm}_hi"])
        if f"{arm}_accuracy" in effect:
            out["accuracy"] = effect[f"{arm}_accuracy"]
        return out

    long = pd.concat([arm_rows(arm) for arm in arms])
    fig, (left, right) = plt.subplots(1, 2, figsize=(3.4 + 1.4 * len(models), 3.4),
                                      gridspec_kw={"width_ratios": [1.4, 1]})
    _points(left, long, "model", "arm", models, arms, _palette(arms))
    _percent_axis(left)
    left.set_title("accuracy per arm")
    handles, labels = left.get_legend_handles_labels()
    keys = _key_handles("accuracy" in long, "chance" in long)
    left.legend(handles + keys, labels + [h.get_label() for h in keys], frameon=True,
                fontsize="x-small", loc="upper left")
    eff = effect.assign(series="SemSam − baseline")
    if {"semsam_accuracy", "baseline_accuracy"} <= set(effect):
        eff["accuracy"] = effect["semsam_accuracy"] - effect["baseline_accuracy"]
    _points(right, eff, "model", "series", models, ["SemSam − baseline"],
            {"SemSam − baseline": sns.color_palette("colorblind")[2]},
            y="effect_mu", lo="effect_lo", hi="effect_hi", chance=None)
    right.axhline(0.0, color="0.4", linestyle="--", linewidth=0.8)
    right.set_ylabel("paired effect (points)")
    right.set_title("SemSam effect (x: raw difference)")
    for ax in (left, right):
        ax.set_xlabel("")
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return fig


def factor_forest(effects: pd.DataFrame, include_intercept: bool = False) -> plt.Figure:
    """Forest plot of the factor model's fixed effects (logit scale, 95 % intervals).

    Parameters
    ----------
    effects : ``factor_effects.parquet`` (``term, mean, lo95, hi95``; ``r_hat`` optional:
        terms above :data:`~mislib.analysis.RHAT_MAX` are drawn hollow).
    include_intercept : draw the ``Intercept`` row too.
    """
    _check_columns(effects, ["term", "mean", "lo95", "hi95"], "factor_effects table")
    table = effects if include_intercept else effects[effects["term"] != "Intercept"]
    if table.empty:
        raise ValueError("factor_effects table has no terms to plot")
    set_style()
    table = table.assign(group=table["term"].str.replace(r"\[[^\]]*\]", "", regex=True))
    groups = list(pd.unique(table["group"]))
    palette = _palette(groups)
    fig, ax = plt.subplots(figsize=(6.0, 0.9 + 0.19 * len(table)))
    y = np.arange(len(table))[::-1]
    for yi, (_, r) in zip(y, table.iterrows(), strict=True):
        bad = "r_hat" in r and pd.notna(r["r_hat"]) and r["r_hat"] > RHAT_MAX
        color = palette[r["group"]]
        ax.plot([r["lo95"], r["hi95"]], [yi, yi], color=color, linewidth=1.6)
        ax.plot(r["mean"], yi, "o", color=color, markersize=4.5,
                markerfacecolor="white" if bad else color)
    ax.axvline(0.0, color="0.4", linestyle="--", linewidth=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels(table["term"], fontsize=7)
    ax.set_ylim(-0.8, len(table) - 0.2)
    ax.set_xlabel("effect on the logit of accuracy (sum-to-zero deviation)")
    ax.set_title("Factor model: fixed effects, 95 % intervals")
    fig.tight_layout()
    return fig


def figure_cells(scored: pd.DataFrame, level: float = 0.95) -> dict[str, pd.DataFrame]:
    """The Bayes@N cells the figures need, per arm with the models pooled.

    Returns
    -------
    dict: ``convention_terminology``, ``prompt_terminology``, ``dims``, ``family``,
    ``ablation_terminology`` (each from :func:`mislib.bayes.bayes_by`).
    """
    specs = {"convention_terminology": ["arm", "convention", "terminology"],
             "prompt_terminology": ["arm", "prompt", "terminology"],
             "dims": ["arm", "dims"], "family": ["arm", "family"],
             "ablation_terminology": ["arm", "ablation", "terminology"]}
    return {name: bayes_by(scored, by, level) if all(c in scored for c in by)
            else pd.DataFrame(columns=[*by, "mu", "sigma", "lo", "hi"])
            for name, by in specs.items()}


def dims_2d_3d(dims: pd.DataFrame, family: pd.DataFrame) -> plt.Figure:
    """2D vs 3D questions (left) and in-plane vs cross-slice relations (right), per arm."""
    set_style()
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.0, 3.4), sharey=True)
    for ax, table, x in ((left, dims, "dims"), (right, family, "family")):
        if table.empty:
            ax.set_title(f"{x}: not in this run")
            continue
        arms = ordered("arm", table["arm"])
        _points(ax, table, x, "arm", ordered(x, table[x]), arms, _palette(arms), lines=True)
        ax.set_xlabel(x)
        handles, labels = ax.get_legend_handles_labels()
        keys = _key_handles("accuracy" in table, "chance" in table)
        ax.legend(handles + keys, labels + [h.get_label() for h in keys], frameon=True,
                  fontsize="x-small")
    _percent_axis(left)
    left.set_title("2D slices vs 3D stacks")
    right.set_title("question family")
    fig.tight_layout()
    return fig


def make_figures(profile: str | Mapping[str, Any] = "demo",
                 root: str | os.PathLike | None = None, **overrides: Any
                 ) -> dict[str, list[Path]]:
    """The paper's figures: draw stage 08's own from ``data/analysis/``, point to the rest.

    Draws :data:`FIGURES` (first the headline figure, accuracy against model size per arm,
    sizes from the profile's model registry) from stage 06's ``scored`` and
    ``semsam_effect`` (a missing input is an error naming the stage that writes it) and
    saves each as
    ``figures/08_<name>.png|pdf`` with the run's provenance stamp. The figures notebooks
    06 and 07 already saved (:data:`REUSED_FIGURES`: accuracy by factor level and per arm,
    the factor model's forest plot) are not drawn again: their files are returned under
    the paper's names, and a missing one is an error naming its notebook. ``overrides``
    are ``[paper]`` keys (``prompt_baseline``). Returns ``{figure name: [png, pdf]}``; a
    run without both arms has no SemSam figure.
    """
    from mislib.config import stage_params
    from mislib.inference.models import model_entries

    analysis = project_paths(root).analysis
    params = stage_params(profile, "paper", **overrides)
    level = float(stage_params(profile, "scoring").get("credible_level", 0.95))

    def need(name: str, stage: str) -> pd.DataFrame:
        path = analysis / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run {stage} first")
        return pd.read_parquet(path)

    reused = {}
    for name, (notebook, saved_as) in REUSED_FIGURES.items():
        paths = [figure_path(notebook, saved_as, root, suffix=s) for s in (".png", ".pdf")]
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            raise FileNotFoundError(f"{absent} missing: run notebook {notebook} first (the "
                                    f"paper uses its figure '{saved_as}')")
        reused[name] = paths
    scored = need(SCORED_FILE, "stage 06 (06_scoring)")
    effect = need(SEMSAM_EFFECT_FILE, "stage 06 (06_scoring)")
    provenance = Provenance.from_scored(scored, profile, root)
    cells = figure_cells(scored, level)
    baseline = str(params.get("prompt_baseline", "none"))
    sizes = {e.name: e.params_b for e in model_entries(profile, every=True)}
    drawn: dict[str, plt.Figure] = {
        "accuracy_by_size": accuracy_by_size(bayes_by(scored, ["model", "arm"], level), sizes),
        "convention_terminology": interaction(cells["convention_terminology"], "convention",
                                              "terminology",
                                              title="Display convention × terminology"),
        "visual_prompt": visual_prompt_effect(cells["prompt_terminology"], baseline),
        "dims_2d_3d": dims_2d_3d(cells["dims"], cells["family"]),
        "ablations": interaction(cells["ablation_terminology"], "ablation", "terminology",
                                 title="Text-only and blank ablations"),
    }
    if not effect.empty:
        drawn["semsam_by_model"] = semsam_by_model(effect)
    saved = {name: save_figure(fig, name, root, provenance=provenance)
             for name, fig in drawn.items()}
    return {**reused, **saved}


# ----------------------------------------------------------------------------------------
# Notebook 07 (the analysis lane's section): the factor model's diagnostics, traces,
# predictive check and recovery study
# ----------------------------------------------------------------------------------------
def diagnostics_figure(effects: pd.DataFrame, sds: pd.DataFrame, title: str = "",
                       ess_min: float | None = None) -> plt.Figure:
    """Histograms of R-hat and bulk ESS of every fixed effect and random-intercept SD.

    ``effects`` and ``sds`` are ``factor_effects.parquet`` and ``factor_sd.parquet``
    (``r_hat, ess_bulk``); the dashed lines are the convergence bounds
    :data:`mislib.analysis.RHAT_MAX` and, when given, ``ess_min``.
    """
    df = pd.concat([effects, sds], ignore_index=True)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    axes[0].hist(df["r_hat"], bins=30, color="C0")
    axes[0].axvline(RHAT_MAX, color="C3", ls="--", label=f"R-hat = {RHAT_MAX}")
    axes[0].set_xlabel("R-hat (rank-normalised, split)")
    axes[0].legend(fontsize=7)
    axes[1].hist(df["ess_bulk"], bins=30, color="C1")
    if ess_min is not None:
        axes[1].axvline(ess_min, color="C3", ls="--", label=f"ESS = {ess_min:.0f}")
        axes[1].legend(fontsize=7)
    axes[1].set_xlabel("bulk ESS")
    for ax in axes:
        ax.set_ylabel("parameters")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def traces_figure(posterior: Any, names: Sequence[str] | None = None,
                  title: str = "") -> plt.Figure:
    """Per-chain traces of scalar parameters (default: the intercept and the SDs).

    ``posterior`` is the small posterior of a fit (``factor_posterior.zarr``: an
    ``xarray.DataTree`` with a ``posterior`` group, or that group itself).
    """
    post = posterior["posterior"] if "posterior" in posterior.children else posterior
    if names is None:
        names = ["Intercept", *sorted(v for v in post.data_vars if str(v).startswith("sd_"))]
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.3 * len(names) + 0.4),
                             sharex=True, squeeze=False)
    axes = axes[:, 0]
    for ax, name in zip(axes, names, strict=True):
        values = np.asarray(post[name].values)
        for chain in range(values.shape[0]):
            ax.plot(values[chain], lw=0.5, alpha=0.8, label=f"chain {chain}")
        ax.set_ylabel(name, fontsize=8)
    axes[-1].set_xlabel("draw (after warm-up)")
    axes[0].legend(fontsize=7, ncol=4, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def ppc_figure(ppc: pd.DataFrame, title: str = "") -> plt.Figure:
    """Each cell's misfit: observed minus replicated relative accuracy, against its band.

    ``ppc`` is ``ppc.parquet`` (``cell, residual, res_lo95, res_hi95, inside``; see
    :func:`mislib.analysis.posterior_predictive_check`: a cell's accuracy relative to the
    trials its factor applies to). A misfit reads as distance from 0 in percentage points
    whatever the accuracy: grey bars are the replicates' 95 % band, dots the observed
    residuals, red when outside the band; a cell of a factor the model leaves out
    (``in_model`` false) is labelled ``(not in model)``.
    """
    _check_columns(ppc, ["cell", "residual", "res_lo95", "res_hi95", "inside"], "ppc table")
    df = ppc.iloc[::-1]
    fig, ax = plt.subplots(figsize=(6.5, 0.2 * len(df) + 1.2))
    y = np.arange(len(df))
    ax.hlines(y, 100 * df["res_lo95"], 100 * df["res_hi95"], color="0.7", lw=4,
              label="95 % of replicates")
    ax.axvline(0, color="0.3", lw=0.8)
    colors = np.where(df["inside"], "C0", "C3")
    ax.scatter(100 * df["residual"], y, s=12, c=colors, zorder=3,
               label="observed (red: outside)")
    labels = df["cell"].str.removeprefix("p[").str.removesuffix("]")
    if "in_model" in df:
        labels = labels.where(df["in_model"], labels + " (not in model)")
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_ylim(-0.7, len(df) - 0.3)
    ax.set_xlabel("accuracy relative to the trials the factor applies to:\n"
                  "observed − mean replicate (percentage points)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    outside = int((~df["inside"]).sum())
    ax.set_title(f"{title}\n{outside} of {len(df)} cells outside their band "
                 f"(about {0.05 * len(df):.0f} expected by chance)".strip(), fontsize=9)
    return fig


def recovery_figure(table: pd.DataFrame, title: str = "",
                    headline: Sequence[str] = (),
                    calibration: Mapping[str, Any] | None = None) -> plt.Figure:
    """Planted against recovered fixed effects (logit scale) with 95 % intervals.

    ``table`` is ``recovery.parquet`` (``term, planted, mean, lo95, hi95, covered``). Left:
    every effect, recovered mean and interval against the planted value, on the identity
    line when recovered; red where the interval misses it. Right: the ``headline`` terms
    (the paper's findings) as a forest, planted value as a cross. The title gives the
    coverage and, with ``calibration`` (``recovery_diagnostics.json``'s, from
    :func:`mislib.analysis.recovery.calibration`), the verdict of the calibration test.
    """
    _check_columns(table, ["term", "planted", "mean", "lo95", "hi95", "covered"],
                   "recovery table")
    rows = table[table["term"].isin(headline)] if len(headline) else table.iloc[:0]
    fig, axes = plt.subplots(1, 2 if len(rows) else 1, figsize=(11 if len(rows) else 5.5, 4.6),
                             squeeze=False, gridspec_kw={"width_ratios": [1, 1.2]}
                             if len(rows) else None)
    ax = axes[0, 0]
    for covered, colour, what in ((True, "C0", "interval covers the planted value"),
                                  (False, "C3", "interval misses it")):
        part = table[table["covered"] == covered]
        ax.errorbar(part["planted"], part["mean"],
                    yerr=[part["mean"] - part["lo95"], part["hi95"] - part["mean"]], fmt="o",
                    ms=3, lw=0.8, color=colour, label=f"{what} ({len(part)})")
    lim = [min(table["planted"].min(), table["lo95"].min()) - 0.05,
           max(table["planted"].max(), table["hi95"].max()) + 0.05]
    ax.plot(lim, lim, color="0.5", lw=0.8, ls="--")
    ax.set_xlabel("planted effect (logit)")
    ax.set_ylabel("recovered: posterior mean and 95 % interval (logit)")
    ax.legend(fontsize=7, loc="upper left")
    if len(rows):
        fx = axes[0, 1]
        rows = rows.set_index("term").loc[[t for t in headline if t in set(rows["term"])]]
        y = np.arange(len(rows))[::-1]
        fx.hlines(y, rows["lo95"], rows["hi95"], color="C0", lw=2)
        fx.scatter(rows["mean"], y, color="C0", s=14, zorder=3, label="recovered (95 %)")
        fx.scatter(rows["planted"], y, color="k", marker="x", s=30, zorder=4, label="planted")
        fx.axvline(0, color="0.5", lw=0.8)
        fx.set_yticks(y, rows.index, fontsize=7)
        fx.set_xlabel("effect (logit)")
        fx.set_title("the paper's findings, planted", fontsize=8)
        fx.legend(fontsize=7, loc="lower right")
    n_in = int(table["covered"].sum())
    verdict = ""
    if calibration:
        verdict = (f"; calibration d² {calibration['distance2']:.1f} on {calibration['df']} df, "
                   f"p = {calibration['p_value']:.3f}: "
                   + ("no sign of bias" if calibration["unbiased"] else "BIASED recovery"))
    fig.suptitle(f"{title}\ncoverage: {n_in} of {len(table)} planted effects "
                 f"({n_in / len(table):.0%}) inside their 95 % intervals{verdict}".strip(),
                 fontsize=9)
    fig.tight_layout()
    return fig


def factor_analysis_figures(fit: Any, label: str) -> dict[str, plt.Figure]:
    """Notebook 07's figures of a fit: ``diagnostics``, ``traces``, ``forest`` and ``ppc``.

    ``fit`` is a :class:`mislib.analysis.FactorAnalysis` (or FactorFit); ``label`` says what
    was analysed and goes into every title, so a simulated study is never mistaken for the
    benchmark. Whether the fit converged is stamped by :func:`save_figure`'s
    ``provenance`` (``Provenance(converged=...)``).
    """
    forest = factor_forest(fit.effects)
    forest.axes[0].set_title(f"Factor effects — {label}", fontsize=9)
    diag = getattr(fit, "diagnostics", None) or {}
    ess_min = (diag.get("thresholds") or {}).get("ess_bulk_min")
    return {
        "diagnostics": diagnostics_figure(fit.effects, fit.sds, ess_min=ess_min,
                                          title=f"Sampler diagnostics — {label}"),
        "traces": traces_figure(fit.posterior, title="Traces of the intercept and "
                                f"random-intercept SDs — {label}"),
        "forest": forest,
        "ppc": ppc_figure(fit.ppc, title=f"Posterior predictive check — {label}"),
    }
