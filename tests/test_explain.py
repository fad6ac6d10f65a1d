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


def test_decode_step_candidates_are_the_rules_own_set(table, monkeypatch):
    # top-p 0.5 keeps the two most probable of p ~ (0.31, 0.25, 0.23, 0.21)
    logits = torch.tensor([[3.0, 2.8, 2.7, 2.6, -9.0, -9.0]])
    rule = {**RULE, "top_p": 0.5}
    step = explain.decode_step(logits, table, [f"t{i}" for i in range(6)], **rule)
    assert step["candidate"].tolist() == [True, True, False, False]
    assert step["content"].all()
    for seed in range(20):  # the default draw never leaves the candidate set
        s = explain.decode_step(logits, table, [f"t{i}" for i in range(6)], **rule, seed=seed)
        assert s.loc[s["baseline"], "candidate"].item()
    # the column is whatever the rule's candidates() says, not a copy of its logic
    ids, kept = explain.candidates(logits, **rule)
    monkeypatch.setattr(explain, "candidates", lambda z, **kw: (ids, ~kept))
    flipped = explain.decode_step(logits, table, [f"t{i}" for i in range(6)], **rule)
    assert flipped["candidate"].tolist() == [False, False, True, True]


def test_antonyms_come_from_the_curated_pairs_in_both_directions():
    assert explain.antonyms("left") == {"right"}
    assert explain.antonyms("▁Inferior") == {"superior"}
    assert explain.antonyms("True") == {"false"}
    assert explain.antonyms("liver") == set()


class _Tokenizer:
    """What neighbourhoods() needs of a tokenizers.Tokenizer: encode and id_to_token."""

    def __init__(self, vocab):
        self.vocab = vocab

    def encode(self, word, add_special_tokens=False):
        import types

        return types.SimpleNamespace(ids=[self.vocab.index(word)])

    def id_to_token(self, i):
        return self.vocab[i]


def test_neighbourhoods_list_the_k_neighbours_and_mark_antonyms():
    vocab = ["left", "▁Right", "▁leftward", "右", "above", "below"]
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.3], [0.95, 0.1], [0.8, 0.5], [0.0, 1.0],
                        [0.1, 0.9]])
    table = build_neighbor_table(emb, torch.ones(6, dtype=torch.bool), k=4, progress=False)
    hoods = explain.neighbourhoods(table, _Tokenizer(vocab), words=("left", "above"))
    assert hoods.groupby("word").size().tolist() == [4, 4]  # k rows per word, itself first
    left = hoods[hoods.word == "left"].set_index("neighbour")
    assert left.loc["left", "rank"] == 0
    assert left.loc["▁Right", "antonym"] and not left.loc["▁leftward", "antonym"]
    fig = explain.neighbourhood_figure(hoods, table.k)
    assert "k = 4" in fig._suptitle.get_text()
    panel = fig.axes[0]
    red = [t.get_text() for t in panel.get_yticklabels() if t.get_color() == "#c0392b"]
    assert red == ["_Right"]
    assert "(1 antonym)" in panel.get_title()


def test_token_fonts_draw_cjk_tokens():
    import importlib.util

    from conftest import require

    require(importlib.util.find_spec("noto_cjk_sans_otc") is not None,
            "the noto-cjk-sans-otc package", "pip install -e . (a project dependency)")
    fonts = explain.token_fonts()
    assert len(fonts) == 2 and "CJK" in fonts[1]
    assert explain.missing_glyphs(["左", "右", "오른쪽", "вправо", "_left"]) == []
    assert explain.missing_glyphs(["左"], families=["DejaVu Sans"]) == ["左"]
