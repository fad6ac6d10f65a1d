"""The figures of notebooks 06–08, drawn from the tables of stages 06 and 07.

Each figure function takes a table and returns a :class:`matplotlib.figure.Figure`;
:func:`save_figure` — the one way every notebook saves a figure — writes it as PNG and PDF
under ``figures/`` with the notebook's number in its name (:func:`mislib.paths.figure_path`);
:func:`make_figures` draws the paper's set from ``data/analysis/`` (what notebook 08 calls),
:func:`factor_analysis_figures` notebook 07's diagnostics of the factor model. Notebook 05's
figures explain the decode rule and live beside its tables in :mod:`mislib.explain`.

Accuracies are Bayes@N posterior means with central credible intervals (stage 06), in
percent; the forest plot shows the factor model's fixed effects on the logit scale
(stage 07). Cells pool the models of a run (each (model, question) a Bayes@N row) and are
drawn per arm.

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
    BAYES_BY_FACTOR_FILE,
    FACTOR_EFFECTS_FILE,
    SCORED_FILE,
    SEMSAM_EFFECT_FILE,
    figure_path,
    project_paths,
)
from mislib.provenance import Provenance, stamp
from mislib.vocabulary import ordered

NOTEBOOK = "08_paper_assets"
#: The figures :func:`make_figures` writes (file names ``08_<name>.png|pdf``).
FIGURES = ("accuracy_by_factor", "convention_terminology", "visual_prompt", "dims_2d_3d",
           "ablations", "semsam_by_model", "factor_forest")


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


def _points(ax: plt.Axes, table: pd.DataFrame, x: str, hue: str | None,
            x_order: Sequence[str], hue_order: Sequence[str], palette: Mapping[str, Any],
            y: str = "mu", lo: str = "lo", hi: str = "hi", scale: float = 100.0,
            lines: bool = False) -> None:
    """Dodged points with interval bars: one series per ``hue`` level over ``x`` levels."""
    n_hue = max(len(hue_order), 1)
    width = 0.6 if n_hue > 1 else 0.0
    for j, level in enumerate(hue_order or [None]):
        part = table if hue is None else table[table[hue].astype(str) == level]
        offset = (j - (n_hue - 1) / 2) * (width / n_hue)
        xs, ys, los, his = [], [], [], []
        for i, xl in enumerate(x_order):
            row = part[part[x].astype(str) == xl]
            if row.empty:
                continue
            r = row.iloc[0]
            xs.append(i + offset)
            ys.append(r[y] * scale)
            los.append(r[lo] * scale)
            his.append(r[hi] * scale)
        if not xs:
            continue
        ys, los, his = np.array(ys), np.array(los), np.array(his)
        ax.errorbar(xs, ys, yerr=[ys - los, his - ys], fmt="o-" if lines else "o",
                    color=palette.get(level, "C0"), capsize=3, markersize=5, linewidth=1.4,
                    label=level)
    ax.set_xticks(range(len(x_order)))
    ax.set_xticklabels(x_order)
    ax.set_xlim(-0.6, len(x_order) - 0.4)


def _palette(levels: Sequence[str]) -> dict[str, Any]:
    return dict(zip(levels, sns.color_palette("colorblind", max(len(levels), 1)), strict=False))


def accuracy_by_factor(table: pd.DataFrame, factors: Sequence[str] | None = None,
                       ncols: int = 3) -> plt.Figure:
    """Bayes@N accuracy (%) with credible intervals for every level of every factor.

    Parameters
    ----------
    table : ``bayes_by_factor.parquet`` (``model, arm, factor, level, mu, lo, hi``).
    factors : which factors, in order (default: every factor in the table but ``all``).
    ncols : panels per row.

    One panel per factor; one colour per model × arm.
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
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.8 * nrows), sharey=True,
                             squeeze=False)
    for ax, factor in zip(axes.flat, factors, strict=False):
        part = table[table["factor"] == factor]
        _points(ax, part, "level", "series", ordered(factor, part["level"]), series, palette)
        ax.set_title(factor)
        ax.set_xlabel("")
        ax.tick_params(axis="x", labelrotation=20)
    for ax in axes.flat[len(factors):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("Bayes@N accuracy (%)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(series), 4),
               bbox_to_anchor=(0.5, 1.02), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def interaction(cells: pd.DataFrame, x: str, hue: str, col: str = "arm",
                title: str | None = None, reference: float | None = None) -> plt.Figure:
    """Accuracy (%) of ``x`` × ``hue`` cells, one panel per ``col`` level (an interaction plot).

    Parameters
    ----------
    cells : Bayes@N cells (:func:`mislib.scoring.bayes_by` with ``[col, x, hue]``).
    x, hue, col : the factor on the axis, the factor in colour, the factor per panel.
    title : figure title.
    reference : a horizontal dashed line (percent), e.g. chance.
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
        _points(ax, part, x, hue, x_order, hue_order, palette, lines=True)
        if reference is not None:
            ax.axhline(reference, color="0.5", linestyle="--", linewidth=0.8)
        ax.set_title(f"{col} = {panel}" if panel is not None else "")
        ax.set_xlabel(x)
    axes[0, 0].set_ylabel("Bayes@N accuracy (%)")
    axes[0, -1].legend(title=hue, loc="best", frameon=True, fontsize="small")
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
    (points, with intervals from the two cells' posterior SDs); without it, the prompts'
    accuracies are drawn and the title says that the baseline is missing.
    """
    _check_columns(cells, ["prompt", "terminology", "mu", "sigma", "lo", "hi"],
                   "prompt × terminology cells")
    has_baseline = baseline in set(cells["prompt"].astype(str))
    if not has_baseline:
        return interaction(cells, "prompt", "terminology", col,
                           title=f"Visual prompts (no '{baseline}' baseline in this run)")
    keys = [c for c in (col, "terminology") if c in cells]
    base = cells[cells["prompt"].astype(str) == baseline].set_index(keys)[["mu", "sigma"]]
    rows = []
    for _, r in cells[cells["prompt"].astype(str) != baseline].iterrows():
        key = tuple(r[k] for k in keys)
        if key not in base.index:
            continue
        b = base.loc[key]
        d, s = r["mu"] - b["mu"], float(np.hypot(r["sigma"], b["sigma"]))
        rows.append({**{k: r[k] for k in keys}, "prompt": r["prompt"], "mu": d,
                     "lo": d - 1.959964 * s, "hi": d + 1.959964 * s})
    diff = pd.DataFrame(rows)
    fig = interaction(diff, "prompt", "terminology", col, reference=0.0,
                      title=f"Visual prompt minus no prompt ('{baseline}')")
    for ax in fig.axes:
        if ax.get_ylabel():
            ax.set_ylabel("difference (points)")
    return fig


def semsam_by_model(effect: pd.DataFrame) -> plt.Figure:
    """Baseline vs SemSam accuracy per model (left) and the paired effect (right).

    Parameters
    ----------
    effect : ``semsam_effect.parquet`` (``model, baseline_mu/lo/hi, semsam_mu/lo/hi,
        effect_mu/lo/hi``).
    """
    _check_columns(effect, ["model", "baseline_mu", "baseline_lo", "baseline_hi", "semsam_mu",
                            "semsam_lo", "semsam_hi", "effect_mu", "effect_lo", "effect_hi"],
                   "semsam_effect table")
    if effect.empty:
        raise ValueError("semsam_effect table is empty: no model was run in both arms")
    set_style()
    models = list(effect["model"].astype(str))
    long = pd.concat([effect.assign(arm=arm, mu=effect[f"{arm}_mu"], lo=effect[f"{arm}_lo"],
                                    hi=effect[f"{arm}_hi"]) for arm in ("baseline", "semsam")])
    arms = ["baseline", "semsam"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(3.0 + 1.3 * len(models), 3.2),
                                      gridspec_kw={"width_ratios": [1.4, 1]})
    _points(left, long, "model", "arm", models, arms, _palette(arms))
    left.set_ylabel("Bayes@N accuracy (%)")
    left.set_title("accuracy per arm")
    left.legend(frameon=True, fontsize="small")
    eff = effect.assign(series="SemSam − baseline")
    _points(right, eff, "model", "series", models, ["SemSam − baseline"],
            {"SemSam − baseline": sns.color_palette("colorblind")[2]},
            y="effect_mu", lo="effect_lo", hi="effect_hi")
    right.axhline(0.0, color="0.4", linestyle="--", linewidth=0.8)
    right.set_ylabel("paired effect (points)")
    right.set_title("SemSam effect")
    for ax in (left, right):
        ax.set_xlabel("")
        ax.tick_params(axis="x", labelrotation=15)
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
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.0, 3.0), sharey=True)
    for ax, table, x in ((left, dims, "dims"), (right, family, "family")):
        if table.empty:
            ax.set_title(f"{x}: not in this run")
            continue
        arms = ordered("arm", table["arm"])
        _points(ax, table, x, "arm", ordered(x, table[x]), arms, _palette(arms), lines=True)
        ax.set_xlabel(x)
        ax.legend(frameon=True, fontsize="small")
    left.set_ylabel("Bayes@N accuracy (%)")
    left.set_title("2D slices vs 3D stacks")
    right.set_title("question family")
    fig.tight_layout()
    return fig


def make_figures(profile: str | Mapping[str, Any] = "demo",
                 root: str | os.PathLike | None = None, **overrides: Any
                 ) -> dict[str, list[Path]]:
    """Draw every figure of the paper from ``data/analysis/`` and save it (PNG + PDF).

    Reads ``scored, bayes_by_factor, semsam_effect`` (stage 06) and ``factor_effects``
    (stage 07); a missing input is an error naming the stage that writes it. ``overrides``
    are ``[paper]`` keys (``prompt_baseline``). Returns ``{figure name: [png, pdf]}``; a
    run without both arms has no SemSam figure.
    """
    from mislib.config import stage_params

    analysis = project_paths(root).analysis
    params = stage_params(profile, "paper", **overrides)
    level = float(stage_params(profile, "scoring").get("credible_level", 0.95))

    def need(name: str, stage: str) -> pd.DataFrame:
        path = analysis / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run {stage} first")
        return pd.read_parquet(path)

    by_factor = need(BAYES_BY_FACTOR_FILE, "stage 06 (06_scoring)")
    scored = need(SCORED_FILE, "stage 06 (06_scoring)")
    effect = need(SEMSAM_EFFECT_FILE, "stage 06 (06_scoring)")
    effects = need(FACTOR_EFFECTS_FILE, "stage 07 (07_factor_analysis)")
    cells = figure_cells(scored, level)
    baseline = str(params.get("prompt_baseline", "none"))
    drawn: dict[str, plt.Figure] = {
        "accuracy_by_factor": accuracy_by_factor(by_factor),
        "convention_terminology": interaction(cells["convention_terminology"], "convention",
                                              "terminology",
                                              title="Display convention × terminology"),
        "visual_prompt": visual_prompt_effect(cells["prompt_terminology"], baseline),
        "dims_2d_3d": dims_2d_3d(cells["dims"], cells["family"]),
        "ablations": interaction(cells["ablation_terminology"], "ablation", "terminology",
                                 title="Text-only and blank ablations"),
        "factor_forest": factor_forest(effects),
    }
    if not effect.empty:
        drawn["semsam_by_model"] = semsam_by_model(effect)
    return {name: save_figure(fig, name, root) for name, fig in drawn.items()}


# ----------------------------------------------------------------------------------------
# Notebook 07: the factor model's diagnostics, traces and predictive check
# ----------------------------------------------------------------------------------------
def diagnostics_figure(effects: pd.DataFrame, sds: pd.DataFrame, title: str = "") -> plt.Figure:
    """Histograms of R-hat and bulk ESS of every fixed effect and random-intercept SD.

    ``effects`` and ``sds`` are ``factor_effects.parquet`` and ``factor_sd.parquet``
    (``r_hat, ess_bulk``); the dashed line is the convergence bound
    :data:`mislib.analysis.RHAT_MAX`.
    """
    df = pd.concat([effects, sds], ignore_index=True)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    axes[0].hist(df["r_hat"], bins=30, color="C0")
    axes[0].axvline(RHAT_MAX, color="C3", ls="--", label=f"R-hat = {RHAT_MAX}")
    axes[0].set_xlabel("R-hat (rank-normalised, split)")
    axes[0].legend(fontsize=7)
    axes[1].hist(df["ess_bulk"], bins=30, color="C1")
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
    """Observed accuracy per cell (dots; red outside) against its 95 % predictive band.

    ``ppc`` is ``ppc.parquet`` (``cell, observed, pp_lo95, pp_hi95, inside``).
    """
    df = ppc.iloc[::-1]
    fig, ax = plt.subplots(figsize=(6.5, 0.2 * len(df) + 1.0))
    y = np.arange(len(df))
    ax.hlines(y, df["pp_lo95"], df["pp_hi95"], color="0.7", lw=4, label="95 % predictive")
    colors = np.where(df["inside"], "C0", "C3")
    ax.scatter(df["observed"], y, s=12, c=colors, zorder=3, label="observed")
    ax.set_yticks(y, df["cell"].str.removeprefix("p[").str.removesuffix("]"), fontsize=7)
    ax.set_ylim(-0.7, len(df) - 0.3)
    ax.set_xlabel("accuracy")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def factor_analysis_figures(fit: Any, label: str) -> dict[str, plt.Figure]:
    """Notebook 07's figures of a fit: ``diagnostics``, ``traces``, ``forest`` and ``ppc``.

    ``fit`` is a :class:`mislib.analysis.FactorAnalysis` (or FactorFit); ``label`` says what
    was analysed and goes into every title, so a simulated study is never mistaken for the
    benchmark.
    """
    forest = factor_forest(fit.effects)
    forest.axes[0].set_title(f"Factor effects — {label}", fontsize=9)
    return {
        "diagnostics": diagnostics_figure(fit.effects, fit.sds,
                                          title=f"Sampler diagnostics — {label}"),
        "traces": traces_figure(fit.posterior, title="Traces of the intercept and "
                                f"random-intercept SDs — {label}"),
        "forest": forest,
        "ppc": ppc_figure(fit.ppc, title=f"Posterior predictive check — {label}"),
    }
