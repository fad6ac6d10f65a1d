"""mislib.explain: notebook 05's tables come from the decode rule itself."""

from __future__ import annotations

import doctest

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from mislib import explain  # noqa: E402
from mislib.semsam import build_neighbor_table, keyed_uniforms, select_next_token  # noqa: E402

RULE = {"temperature": 1.0, "top_k": 4, "top_p": 1.0}


@pytest.fixture(scope="module")
def table():
    # Token 0 stands alone; tokens 1-3 are one tight cluster (synonyms); 4-5 are far away.
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.99, 0.1], [0.0, 0.98, 0.15],
                        [0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    return build_neighbor_table(emb, torch.ones(6, dtype=torch.bool), k=3, progress=False)


def test_decode_step_marks_the_token_the_rule_picks_in_each_arm(table):
    logits = torch.tensor([[3.0, 2.8, 2.7, 2.6, -9.0, -9.0]])
    step = explain.decode_step(logits, table, [f"t{i}" for i in range(6)], **RULE, seed=5)
    u = keyed_uniforms([5], [0])
    for arm in ("baseline", "greedy", "semsam"):
        picked = int(select_next_token(logits, table, **RULE, arm=arm, uniforms=u))
        assert step.loc[step[arm], "token"].tolist() == [f"t{picked}"]


def test_decode_step_shows_semsam_choosing_the_cluster_over_the_most_probable_token(table):
    logits = torch.tensor([[3.0, 2.8, 2.7, 2.6, -9.0, -9.0]])
    step = explain.decode_step(logits, table, [f"t{i}" for i in range(6)], **RULE)
    assert step.loc[step["greedy"], "token"].item() == "t0"
    assert step.loc[step["semsam"], "token"].item() in {"t1", "t2", "t3"}
    assert step["score"].idxmax() != step["p"].idxmax()


def test_decode_step_takes_one_row_only(table):
    with pytest.raises(ValueError, match=r"\[1, V\]"):
        explain.decode_step(torch.zeros(2, 6), table, [str(i) for i in range(6)], **RULE)


def test_the_figures_are_drawn_from_the_tables(table):
    logits = torch.tensor([[3.0, 2.8, 2.7, 2.6, -9.0, -9.0]])
    step = explain.decode_step(logits, table, [f"t{i}" for i in range(6)], **RULE)
    fig = explain.decode_step_figure(step)
    assert "SemSam picks" in fig.axes[0].get_title()


def test_docstring_examples_run():
    assert doctest.testmod(explain).failed == 0
