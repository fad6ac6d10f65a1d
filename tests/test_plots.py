"""mislib.plots: each figure draws what its name says; the stage writes PNG and PDF."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from mislib import plots
from mislib.bayes import bayes_by_factor
from mislib.provenance import STAMP_GID
from mislib.scoring import rescore, score_runs
from mislib.simulate import simulate_study, write_study


def _errorbars(ax):
    """The errorbar containers drawn on an axis (one per plotted series)."""
    return [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]


def _tick_level(tick):
    """A tick label's level (its first line; the second says n)."""
    return tick.get_text().split("\n")[0]


def _raw_markers(ax):
    """The raw-accuracy markers drawn on an axis (``x`` markers, one line per series)."""
    return [line for line in ax.lines if line.get_marker() == "x"]


def _chance_segments(ax):
    """The dashed chance segments (LineCollections from ``hlines``) of an axis."""
    return [c for c in ax.collections if c.__class__.__name__ == "LineCollection"
            and c.get_linestyle()[0][1] is not None]


@pytest.fixture(scope="module")
def study():
    return simulate_study(n_questions=300, n_trials=2, seed=7, models=("m-small", "m-large"))


@pytest.fixture(scope="module")
def scored(study):
    return rescore(study.responses, study.questions, progress=False)


def test_a_figure_whose_save_fails_keeps_the_old_file_whole(tmp_root, monkeypatch):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    png, pdf = plots.save_figure(fig, "demo_line", tmp_root)
    old = png.read_bytes()

    def torn(self, fname, **kwargs):  # writes half a file, then dies
        open(fname, "wb").write(old[: len(old) // 2])
        raise OSError("disk full")

    fig, ax = plt.subplots()
    monkeypatch.setattr(plt.Figure, "savefig", torn)
    with pytest.raises(OSError, match="disk full"):
        plots.save_figure(fig, "demo_line", tmp_root)
    assert png.read_bytes() == old
    assert sorted(p.name for p in png.parent.iterdir()) == [pdf.name, png.name]


def test_save_figure_writes_png_and_pdf_named_by_the_notebook(tmp_root):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    paths = plots.save_figure(fig, "demo_line", tmp_root)
    assert [p.name for p in paths] == ["08_demo_line.png", "08_demo_line.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    assert not plt.fignum_exists(fig.number)  # closed after saving


def test_accuracy_by_factor_draws_one_panel_per_factor_and_series_per_model_arm(scored):
    table = bayes_by_factor(scored, factors=("dims", "terminology", "plane"))
    fig = plots.accuracy_by_factor(table)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["dims", "terminology", "plane"]
    assert len(_errorbars(visible[0])) == 4  # 2 models x 2 arms
    assert [_tick_level(t) for t in visible[2].get_xticklabels()] == ["axial", "coronal",
                                                                       "sagittal"]
    plt.close(fig)


def test_accuracy_by_factor_plots_percent_of_the_bayes_means():
    table = pd.DataFrame({"model": "m", "arm": "baseline", "factor": "dims",
                          "level": ["3d", "2d"], "mu": [0.5, 0.6], "lo": [0.4, 0.55],
                          "hi": [0.6, 0.65]})
    fig = plots.accuracy_by_factor(table)
    line = _errorbars(fig.axes[0])[0].lines[0]
    assert list(line.get_ydata()) == pytest.approx([60.0, 50.0])  # 2d first: level order
    plt.close(fig)


def test_interaction_draws_a_panel_per_arm_and_a_line_per_terminology():
    cells = pd.DataFrame([{"arm": arm, "convention": c, "terminology": t, "mu": 0.5,
                           "lo": 0.4, "hi": 0.6}
                          for arm in ("baseline", "semsam") for c in ("storage", "standard")
                          for t in ("anatomical", "colloquial")])
    fig = plots.interaction(cells, "convention", "terminology")
    assert [ax.get_title() for ax in fig.axes] == ["arm = baseline", "arm = semsam"]
    assert all(len(_errorbars(ax)) == 2 for ax in fig.axes)
    assert [_tick_level(t) for t in fig.axes[0].get_xticklabels()] == ["standard", "storage"]
    plt.close(fig)


def test_interaction_without_cells_is_an_error():
    empty = pd.DataFrame(columns=["arm", "convention", "terminology", "mu", "lo", "hi"])
    with pytest.raises(ValueError, match="no convention × terminology cells"):
        plots.interaction(empty, "convention", "terminology")


def _prompt_cells(prompts):
    rows = []
    for i, p in enumerate(prompts):
        for j, t in enumerate(("anatomical", "colloquial")):
            mu = 0.5 + 0.05 * i - 0.1 * j
            rows.append({"arm": "baseline", "prompt": p, "terminology": t, "mu": mu,
                         "sigma": 0.02, "lo": mu - 0.04, "hi": mu + 0.04})
    return pd.DataFrame(rows)


def test_visual_prompt_effect_draws_differences_from_the_no_prompt_baseline():
    fig = plots.visual_prompt_effect(_prompt_cells(["none", "mask", "box"]), baseline="none")
    ax = fig.axes[0]
    assert [_tick_level(t) for t in ax.get_xticklabels()] == ["mask", "box"]
    ys = _errorbars(ax)[0].lines[0].get_ydata()
    assert list(ys) == pytest.approx([5.0, 10.0])  # points above the baseline
    assert "minus no prompt" in fig._suptitle.get_text()
    plt.close(fig)


def test_visual_prompt_effect_draws_the_raw_difference_beside_the_bayes_difference():
    cells = _prompt_cells(["none", "mask"]).assign(accuracy=[0.7, 0.5, 0.9, 0.4],
                                                   n_questions=10, n_trials=2)
    fig = plots.visual_prompt_effect(cells, baseline="none")
    ax = fig.axes[0]
    assert [line.get_ydata()[0] for line in _raw_markers(ax)] == pytest.approx([20.0, -10.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["mask\nn 10×2"]
    assert "raw difference" in [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    plt.close(fig)


def test_visual_prompt_effect_without_a_baseline_level_says_so():
    fig = plots.visual_prompt_effect(_prompt_cells(["mask", "box", "point"]), baseline="none")
    assert "no 'none' baseline" in fig._suptitle.get_text()
    plt.close(fig)


def test_semsam_by_model_draws_arms_and_the_effect_per_model():
    effect = pd.DataFrame({"model": ["a", "b"], "baseline_mu": [0.5, 0.6],
                           "baseline_lo": [0.45, 0.55], "baseline_hi": [0.55, 0.65],
                           "semsam_mu": [0.6, 0.62], "semsam_lo": [0.55, 0.57],
                           "semsam_hi": [0.65, 0.67], "effect_mu": [0.1, 0.02],
                           "effect_lo": [0.05, -0.01], "effect_hi": [0.15, 0.05]})
    fig = plots.semsam_by_model(effect)
    left, right = fig.axes
    assert len(_errorbars(left)) == 2
    assert list(_errorbars(right)[0].lines[0].get_ydata()) == pytest.approx([10.0, 2.0])
    plt.close(fig)
    with pytest.raises(ValueError, match="empty"):
        plots.semsam_by_model(effect.iloc[0:0])


def test_factor_forest_has_one_row_per_term_and_leaves_out_the_intercept():
    effects = pd.DataFrame({"term": ["Intercept", "dims[2d]", "dims[3d]",
                                     "convention[standard]:terminology[anatomical]"],
                            "mean": [0.4, 0.1, -0.1, 0.3], "lo95": [0.2, 0.0, -0.2, 0.1],
                            "hi95": [0.6, 0.2, 0.0, 0.5], "r_hat": [1.0, 1.0, 1.02, 1.0]})
    fig = plots.factor_forest(effects)
    ax = fig.axes[0]
    top_down = sorted(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels()),
                          strict=True), reverse=True)
    assert [label for _, label in top_down] == [
        "dims[2d]", "dims[3d]", "convention[standard]:terminology[anatomical]"]
    plt.close(fig)


def _save_reused_figures(root):
    """What notebooks 06 and 07 save before notebook 08 runs (the figures the paper reuses)."""
    for notebook, name in plots.REUSED_FIGURES.values():
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        plots.save_figure(fig, name, root, notebook=notebook)


def test_make_figures_writes_every_figure_from_the_analysis_tables(tmp_root, study,
                                                                   monkeypatch):
    write_study(study, tmp_root)
    score_runs("demo", root=tmp_root, progress=False)
    _save_reused_figures(tmp_root)
    stamps = {}
    save = plots.save_figure

    def spy(fig, name, *args, **kwargs):
        paths = save(fig, name, *args, **kwargs)
        stamps[name] = [t.get_text() for t in fig.texts if t.get_gid() == STAMP_GID]
        return paths

    monkeypatch.setattr(plots, "save_figure", spy)
    written = plots.make_figures("demo", tmp_root)
    assert set(written) == set(plots.FIGURES) | set(plots.REUSED_FIGURES)
    for name, paths in written.items():
        assert [p.suffix for p in paths] == [".png", ".pdf"], name
        assert all(p.stat().st_size > 1000 for p in paths), name
        if name in plots.FIGURES:
            assert paths[0].name == f"08_{name}.png"
            (label,) = stamps[name]
            assert "profile demo" in label and "sim-m-small-baseline" in label, name
    # drawn once: the paper's forest is notebook 07's, accuracy by factor notebook 06's
    assert written["factor_forest"][0].name == "07_forest.png"
    assert written["accuracy_by_factor"][0].name == "06_accuracy_by_factor.png"
    assert not (tmp_root / "figures" / "08_factor_forest.png").exists()
    assert not (tmp_root / "figures" / "08_accuracy_by_factor.png").exists()


def test_make_figures_names_the_notebook_whose_figure_is_missing(tmp_root, study):
    write_study(study, tmp_root)
    score_runs("demo", root=tmp_root, progress=False)
    with pytest.raises(FileNotFoundError, match="notebook 06_scoring"):
        plots.make_figures("demo", tmp_root)


def test_accuracy_by_factor_shows_raw_accuracy_chance_and_n(scored):
    table = bayes_by_factor(scored, factors=("family",))
    fig = plots.accuracy_by_factor(table)
    ax = fig.axes[0]
    raws = _raw_markers(ax)
    assert len(raws) == 4  # one per model x arm
    part = table[(table["factor"] == "family")].sort_values(["model", "arm"])
    first = part[(part["model"] == "m-large") & (part["arm"] == "baseline")]
    order = plots.ordered("family", first["level"])
    expected = first.set_index("level").loc[order, "accuracy"] * 100
    assert list(raws[0].get_ydata()) == pytest.approx(list(expected))
    chance = _chance_segments(ax)
    heights = sorted(round(seg[0][1], 6) for c in chance for seg in c.get_segments())
    assert heights[0] < 50 < heights[-1] + 1e-9  # plane questions: 3 options
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    n = first.set_index("level").loc[order]
    assert ticks == [f"{lv}\nn {q}×{t}" for lv, q, t in
                     zip(order, n["n_questions"], n["n_trials"], strict=True)]
    assert ax.get_ylim()[0] < 0 and ax.get_ylim()[1] > 100  # the whole 0–100 % scale
    plt.close(fig)


def test_accuracy_by_factor_without_raw_or_chance_columns_draws_intervals_only():
    table = pd.DataFrame({"model": "m", "arm": "baseline", "factor": "dims",
                          "level": ["2d", "3d"], "mu": [0.6, 0.5], "lo": [0.55, 0.45],
                          "hi": [0.65, 0.55]})
    fig = plots.accuracy_by_factor(table)
    assert not _raw_markers(fig.axes[0]) and not _chance_segments(fig.axes[0])
    plt.close(fig)


def test_accuracy_by_arm_draws_each_arm_per_model_with_raw_chance_and_n(scored):
    table = bayes_by_factor(scored, factors=("dims",))
    fig = plots.accuracy_by_arm(table)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["m-large", "m-small"]
    ax = visible[0]
    assert len(_errorbars(ax)) == 2 and len(_raw_markers(ax)) == 2
    assert _chance_segments(ax)
    overall = table[(table["factor"] == "all") & (table["model"] == "m-large")]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        f"{arm}\nn {q}×{t}" for arm, q, t in
        zip(overall["arm"], overall["n_questions"], overall["n_trials"], strict=True)]
    plt.close(fig)


def test_accuracy_by_size_draws_a_line_per_arm_over_sized_models_and_references(scored):
    from mislib.bayes import bayes_by

    table = bayes_by(scored, ["model", "arm"])
    fig = plots.accuracy_by_size(table, {"m-small": 2.0, "m-large": 32.0})
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    lines = _errorbars(ax)
    assert len(lines) == 2  # one line per arm, each over both models, smallest first
    for line in lines:
        assert list(line.lines[0].get_xdata()) == [2.0, 32.0]
    base = table[table["arm"] == "baseline"].set_index("model")
    assert list(lines[0].lines[0].get_ydata()) == pytest.approx(
        list(base.loc[["m-small", "m-large"], "mu"] * 100))
    assert len(_raw_markers(ax)) == 2
    plt.close(fig)
    # a model without a size (a hosted reference) is a labelled horizontal line per arm
    fig = plots.accuracy_by_size(table, {"m-small": 2.0})
    (ax,) = fig.axes
    assert [len(line.lines[0].get_xdata()) for line in _errorbars(ax)] == [1, 1]
    assert {t.get_text().split(" (raw")[0] for t in ax.texts} == {"m-large · baseline",
                                                                  "m-large · semsam"}
    plt.close(fig)


def test_semsam_by_model_draws_raw_accuracies_and_their_difference(scored):
    from mislib.bayes import semsam_effect

    effect = semsam_effect(scored)
    fig = plots.semsam_by_model(effect)
    left, right = fig.axes
    assert len(_raw_markers(left)) == 2 and _chance_segments(left)
    raw_diff = (effect["semsam_accuracy"] - effect["baseline_accuracy"]) * 100
    assert list(_raw_markers(right)[0].get_ydata()) == pytest.approx(list(raw_diff))
    plt.close(fig)


def test_ordered_puts_known_levels_first_then_the_rest_sorted():
    assert plots.ordered("ablation", ["zeta", "blank", np.nan, "none", "alpha"]) == [
        "none", "blank", "alpha", "zeta"]


def _fake_fit():
    """What notebook 07's figures read from a fit: tables and a two-chain posterior."""
    import types

    import xarray as xr

    rng = np.random.default_rng(0)
    effects = pd.DataFrame({"term": ["Intercept", "dims[2d]", "dims[3d]"],
                            "mean": [0.3, 0.1, -0.1], "lo95": [0.1, 0.0, -0.2],
                            "hi95": [0.5, 0.2, 0.0], "r_hat": [1.001, 1.02, 1.0],
                            "ess_bulk": [800.0, 90.0, 700.0]})
    sds = pd.DataFrame({"term": ["sd[question]"], "r_hat": [1.003], "ess_bulk": [400.0]})
    ppc = pd.DataFrame({"cell": ["p[dims=2d]", "p[dims=3d]"], "observed": [0.6, 0.2],
                        "residual": [0.0, -0.3], "res_lo95": [-0.1, -0.1],
                        "res_hi95": [0.1, 0.1], "inside": [True, False]})
    post = xr.Dataset({"Intercept": (("chain", "draw"), rng.normal(size=(2, 50))),
                       "sd_question": (("chain", "draw"), rng.gamma(2.0, size=(2, 50)))})
    tree = xr.DataTree.from_dict({"posterior": post})
    return types.SimpleNamespace(effects=effects, sds=sds, ppc=ppc, posterior=tree)


def test_factor_analysis_figures_are_the_four_of_notebook_07_labelled_with_the_data():
    figures = plots.factor_analysis_figures(_fake_fit(), "SIMULATED study")
    assert list(figures) == ["diagnostics", "traces", "forest", "ppc"]
    for name, fig in figures.items():
        titles = [fig._suptitle.get_text() if fig._suptitle else ""] + [
            ax.get_title() for ax in fig.axes]
        assert any("SIMULATED study" in t for t in titles), name
    traces = figures["traces"]
    assert [ax.get_ylabel() for ax in traces.axes] == ["Intercept", "sd_question"]
    assert len(traces.axes[0].lines) == 2  # one line per chain


def test_ppc_figure_marks_cells_outside_their_band_in_red():
    fig = plots.ppc_figure(_fake_fit().ppc)
    colors = fig.axes[0].collections[-1].get_facecolors()
    # rows are drawn bottom-up: the last cell (outside) first
    assert colors[0][0] > colors[0][2] and colors[1][2] > colors[1][0]


def test_diagnostics_figure_draws_the_r_hat_bound():
    fit = _fake_fit()
    fig = plots.diagnostics_figure(fit.effects, fit.sds)
    from mislib.analysis import RHAT_MAX

    assert any(np.allclose(line.get_xdata(), RHAT_MAX) for line in fig.axes[0].lines)


def test_semsam_by_model_draws_a_model_decoded_on_an_endpoint_as_its_own_entry():
    # bayes.semsam_effect gives one row per (model, decoder): the same model decoded
    # locally and on an endpoint are two comparisons, both drawn and told apart
    effect = pd.DataFrame({"model": ["m", "m"], "decoder": ["local", "openai"],
                           "baseline_mu": [0.5, 0.6], "baseline_lo": [0.45, 0.55],
                           "baseline_hi": [0.55, 0.65], "semsam_mu": [0.6, 0.62],
                           "semsam_lo": [0.55, 0.57], "semsam_hi": [0.65, 0.67],
                           "effect_mu": [0.1, 0.02], "effect_lo": [0.05, -0.01],
                           "effect_hi": [0.15, 0.05]})
    fig = plots.semsam_by_model(effect)
    right = fig.axes[1]
    assert [t.get_text() for t in right.get_xticklabels()] == ["m", "m via openai"]
    assert list(_errorbars(right)[0].lines[0].get_ydata()) == pytest.approx([10.0, 2.0])
    plt.close(fig)
