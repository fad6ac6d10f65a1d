"""SemSam shown on real token embeddings: the tables and figures of notebook 05.

Notebook 05 explains the decode rule (docs/design.md, "The SemSam rule and the arms") on the
32,000-token Llama-2 embedding matrix that ships with the ``wordllama`` package: the
neighbourhoods of the benchmark's direction words (the ``k`` neighbours the rule reads,
antonyms marked, every token drawn: Noto Sans CJK is registered for CJK tokens), one decode
step decided by the rule itself (:func:`mislib.semsam.candidates` and
:func:`mislib.semsam.select_next_token`) in each arm, and the cost of a step.

>>> import torch
>>> from mislib.semsam import build_neighbor_table
>>> table = build_neighbor_table(torch.randn(6, 4), torch.ones(6, dtype=torch.bool), k=2,
...                              progress=False)
>>> logits = torch.tensor([[3.0, 2.8, 2.6, -9.0, -9.0, -9.0]])
>>> step = decode_step(logits, table, [f"t{i}" for i in range(6)], temperature=1.0,
...                    top_k=3, top_p=1.0)
>>> list(step.columns)
['token', 'candidate', 'content', 'p', 'score', 'baseline', 'greedy', 'semsam']
>>> step["greedy"].tolist()
[True, False, False]
"""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import torch

from mislib.paths import project_paths
from mislib.semsam import (
    ARMS,
    NeighborTable,
    candidates,
    keyed_uniforms,
    select_next_token,
    semantic_scores,
)

#: The direction words whose neighbourhoods notebook 05 shows.
DIRECTION_WORDS = ("superior", "inferior", "left", "right", "anterior", "posterior", "above",
                   "below")
#: Antonym pairs among the benchmark's answer terms (and their everyday variants): a
#: neighbour that is the antonym of the word is marked in the neighbourhood figure, since
#: its probability adds to the word's score as much as a synonym's would.
ANTONYM_PAIRS = (("left", "right"), ("superior", "inferior"), ("anterior", "posterior"),
                 ("medial", "lateral"), ("above", "below"), ("upper", "lower"), ("up", "down"),
                 ("over", "under"), ("top", "bottom"), ("front", "back"),
                 ("proximal", "distal"), ("earlier", "later"), ("before", "after"),
                 ("true", "false"), ("yes", "no"))
#: The font families that draw the tokens, in order: DejaVu Sans (matplotlib's own: Latin,
#: Greek, Cyrillic), then Noto Sans CJK for CJK and Hangul (the ``noto-cjk-sans-otc``
#: package ships the font file; :func:`token_fonts` registers it).
CJK_FONT_PACKAGE = "noto-cjk-sans-otc"
#: A hand-made next-token distribution for "The liver lies ___ the diaphragm": "above" is the
#: single most probable token, but "below" and its synonyms together hold more mass.
EXAMPLE_STEP = {"above": 3.0, "below": 2.7, "beneath": 2.4, "under": 2.3, "inferior": 2.0,
                "over": 1.2, "superior": 0.8, "near": 1.0}


def wordllama_table(k: int, force: bool = False, root: str | os.PathLike | None = None):
    """The neighbour table of WordLlama's Llama-2 embeddings, built once and cached.

    Returns ``(table, tokenizer, seconds)``: the :class:`~mislib.semsam.NeighborTable` of
    the content tokens with ``k`` neighbours, the ``tokenizers.Tokenizer`` of the same
    vocabulary, and the seconds it took to build or read. ``force`` rebuilds the cached
    table (under ``.cache/semsam/``, keyed by the embeddings, ``k`` and the mask).
    """
    from mislib.semsam import cached_neighbor_table, content_token_mask, load_wordllama, table_key

    embeddings, tokenizer = load_wordllama()
    mask = content_token_mask(tokenizer, embeddings.shape[0])
    cache_dir = project_paths(root).cache / "semsam"
    if force:
        (cache_dir / f"{table_key(embeddings, mask, k)}.safetensors").unlink(missing_ok=True)
    t0 = time.perf_counter()
    table = cached_neighbor_table(embeddings, mask, k, cache_dir=cache_dir)
    return table, tokenizer, time.perf_counter() - t0


def token_id(tokenizer: Any, word: str) -> int:
    """The id of ``word`` as one token of a ``tokenizers.Tokenizer`` (an error otherwise)."""
    ids = tokenizer.encode(word, add_special_tokens=False).ids
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens in this vocabulary")
    return ids[0]


def bare_word(token: str) -> str:
    """A token as a lower-case word: without the word-start mark ``▁`` and non-letters.

    >>> bare_word("▁Right"), bare_word("left,")
    ('right', 'left')
    """
    return re.sub(r"[^\w]|_", "", token.replace("▁", "")).lower()


def antonyms(word: str, pairs: Iterable[tuple[str, str]] = ANTONYM_PAIRS) -> set[str]:
    """The antonyms of ``word`` in ``pairs`` (lower case; empty when it has none).

    >>> sorted(antonyms("Left")), sorted(antonyms("near"))
    (['right'], [])
    """
    word = bare_word(word)
    return {b if a == word else a for a, b in pairs if word in (a, b)}


def neighbourhoods(table: NeighborTable, tokenizer: Any,
                   words: Sequence[str] = DIRECTION_WORDS, n: int | None = None
                   ) -> pd.DataFrame:
    """Each word's ``n`` nearest content tokens (default: all ``k`` the rule reads).

    Returns
    -------
    DataFrame: ``word, rank, neighbour, cosine, antonym``. Rank 0 is the word itself
    (cosine 1); ``neighbour`` is the token as the vocabulary spells it (``▁`` marks a token
    that starts a word); ``antonym`` marks a neighbour that is the word's antonym
    (:data:`ANTONYM_PAIRS`, compared as :func:`bare_word`).
    """
    n = table.k if n is None else min(n, table.k)
    rows = []
    for word in words:
        tid = token_id(tokenizer, word)
        opposite = antonyms(word)
        for rank in range(n):
            neighbour = tokenizer.id_to_token(int(table.ids[tid, rank]))
            rows.append({"word": word, "rank": rank, "neighbour": neighbour,
                         "cosine": float(table.sims[tid, rank]),
                         "antonym": bare_word(neighbour) in opposite})
    return pd.DataFrame(rows)


def example_logits(tokenizer: Any, vocab: int,
                   logits: Mapping[str, float] = EXAMPLE_STEP, floor: float = -4.0) -> torch.Tensor:
    """Next-token logits ``[1, vocab]``: ``floor`` everywhere, the given words raised."""
    z = torch.full((1, vocab), floor)
    for word, value in logits.items():
        z[0, token_id(tokenizer, word)] = value
    return z


def decode_step(logits: torch.Tensor, table: NeighborTable,
                id_to_token: Sequence[str] | Callable[[int], str], *, temperature: float,
                top_k: int, top_p: float, seed: int = 0) -> pd.DataFrame:
    """One decode step of one row as the rule decides it, per candidate and arm.

    Every column comes from :mod:`mislib.semsam.rule` itself, nothing is re-implemented:
    the rows are the ``top_k`` tokens of :func:`mislib.semsam.candidates` (most probable
    first) with ``candidate`` marking those top-p keeps (the set ``I``), ``content``
    whether the table re-scores the token (the rule falls back to the default draw when a
    kept candidate is not a content token), ``p`` the token's probability
    ``softmax(logits / temperature)``, ``score`` its neighbourhood score
    (:func:`mislib.semsam.semantic_scores`), and one boolean column per arm marking the
    token :func:`mislib.semsam.select_next_token` picks in that arm, with the same keyed
    random number for every arm (``seed``, step 0), as a run pairs them.

    Parameters
    ----------
    logits : ``[1, V]`` next-token logits.
    table : the neighbour table of the same vocabulary.
    id_to_token : a token's text by id (a tokenizer's ``id_to_token`` or a list).
    temperature, top_k, top_p : the rule's parameters.
    """
    if logits.ndim != 2 or logits.shape[0] != 1:
        raise ValueError(f"decode_step shows one row: logits must be [1, V], got "
                         f"{tuple(logits.shape)}")
    name = id_to_token if callable(id_to_token) else id_to_token.__getitem__
    rule = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    cand, kept = candidates(logits, **rule)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    uniforms = keyed_uniforms([seed], [0])
    picks = {arm: int(select_next_token(logits, table, **rule, arm=arm, uniforms=uniforms))
             for arm in ARMS}
    ids = [int(i) for i in cand[0]]
    return pd.DataFrame({
        "token": [name(i) for i in ids], "candidate": kept[0].numpy(),
        "content": table.content_mask[cand[0]].numpy(),
        "p": probs[0, cand[0]].numpy(),
        "score": semantic_scores(probs, cand, table)[0].numpy(),
        **{arm: [i == picks[arm] for i in ids] for arm in ARMS}})


def decode_timing(rounds: int = 30) -> pd.DataFrame:
    """Median ms of one decode step per batch size and method, with SemSam's ratios.

    Rows are batch sizes; columns the methods of :func:`mislib.semsam.time_decode_step` and
    ``argmax / chain``, ``argmax / softmax+argmax``.
    """
    from mislib.semsam import time_decode_step

    timing = pd.DataFrame(time_decode_step(rounds=rounds))
    wide = timing.pivot(index="batch", columns="method", values="median_ms")
    wide["argmax / chain"] = wide.semsam_argmax / wide.transformers_chain
    wide["argmax / softmax+argmax"] = wide.semsam_argmax / wide.softmax_argmax
    return wide


# ----------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------
@cache
def token_fonts() -> tuple[str, ...]:
    """Font families that draw the vocabulary's tokens, registered with matplotlib.

    DejaVu Sans (matplotlib's own font: Latin, Greek, Cyrillic) first, then Noto Sans CJK
    from the ``noto-cjk-sans-otc`` package (CJK ideographs, kana, Hangul), added to
    matplotlib's font manager on first use; matplotlib falls back glyph by glyph along
    the list. Without the package a warning says that CJK tokens will show as boxes.
    """
    from matplotlib import font_manager

    families = ["DejaVu Sans"]
    try:
        from noto_cjk_sans_otc import FONT_PATH
    except ImportError:
        warnings.warn(f"the {CJK_FONT_PACKAGE} package is not installed: CJK and Hangul "
                      "tokens will show as boxes (pip install it, or install the project's "
                      "dependencies)", stacklevel=2)
        return tuple(families)
    path = str(FONT_PATH)
    if path not in {f.fname for f in font_manager.fontManager.ttflist}:
        font_manager.fontManager.addfont(path)
    families.append(font_manager.FontProperties(fname=path).get_name())
    return tuple(families)


@cache
def _charmap(family: str) -> frozenset[int]:
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    path = font_manager.findfont(font_manager.FontProperties(family=family),
                                 fallback_to_default=False)
    return frozenset(FT2Font(path).get_charmap())


def missing_glyphs(texts: Iterable[str], families: Sequence[str] | None = None) -> list[str]:
    """The characters of ``texts`` that none of ``families`` (default :func:`token_fonts`)
    draws, sorted; whitespace is ignored."""
    families = token_fonts() if families is None else families
    covered: set[int] = set()
    for family in families:
        try:
            covered |= _charmap(family)
        except ValueError:  # not installed: nothing covered by it
            continue
    chars = {c for text in texts for c in str(text) if not c.isspace()}
    return sorted(c for c in chars if ord(c) not in covered)


def neighbourhood_figure(hoods: pd.DataFrame, k: int, ncols: int = 4) -> plt.Figure:
    """One panel per word: the ``k`` neighbours the rule reads, by cosine similarity.

    ``hoods`` is :func:`neighbourhoods` (rank 0, the word itself, is left out). Antonyms
    of the word among its neighbours are drawn in red (their probability counts toward
    the word's score like a synonym's), neighbours with a cosine <= 0 in grey (they add
    nothing). Tokens are drawn with :func:`token_fonts`; characters no installed font
    draws are named under the figure.
    """
    fonts = list(token_fonts())
    words = list(pd.unique(hoods["word"]))
    ncols = min(ncols, len(words))
    nrows = -(-len(words) // ncols)
    n_shown = int(hoods.groupby("word")["rank"].max().max())
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 0.9 + 0.16 * n_shown * nrows),
                             sharex=True, squeeze=False)
    colours = {"antonym": "#c0392b", "neighbour": "#2c7fb8", "no weight": "0.7"}
    for ax, word in zip(axes.flat, words, strict=False):
        rows = hoods[(hoods.word == word) & (hoods["rank"] > 0)].iloc[::-1]
        kind = ["antonym" if a else "no weight" if c <= 0 else "neighbour"
                for a, c in zip(rows.get("antonym", [False] * len(rows)), rows.cosine,
                                strict=True)]
        ax.barh(range(len(rows)), rows.cosine.clip(lower=0), color=[colours[c] for c in kind])
        # "▁" marks a token that starts a word; shown as "_" ("_left" and "Left" differ)
        ax.set_yticks(range(len(rows)), rows.neighbour.str.replace("▁", "_", regex=False),
                      fontsize=7)
        for label, c in zip(ax.get_yticklabels(), kind, strict=True):
            label.set_fontfamily(fonts)
            if c == "antonym":
                label.set_color(colours["antonym"])
        n_antonyms = kind.count("antonym")
        ax.set_title(f"{word}" + (f" ({n_antonyms} antonym{'s' * (n_antonyms > 1)})"
                                  if n_antonyms else ""), fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.6, len(rows) - 0.4)
    for ax in axes.flat[len(words):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("cosine similarity")
    from matplotlib.patches import Patch

    keys = {"neighbour": "neighbour", "antonym": "antonym of the word",
            "no weight": "cosine <= 0 (adds nothing)"}
    fig.legend([Patch(color=colours[c]) for c in keys], list(keys.values()),
               loc="upper right", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"The k = {k} neighbours the rule reads (the word itself, rank 0, not "
                 "shown), WordLlama's Llama-2 embeddings", x=0.01, ha="left", fontsize=10)
    missing = missing_glyphs(hoods["neighbour"])
    if missing:
        fig.text(0.01, 0.0, "no installed font draws: " + " ".join(missing)
                 + (f" (install {CJK_FONT_PACKAGE})" if len(fonts) < 2 else ""),
                 fontsize=7, color="#c0392b", va="top")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def decode_step_figure(step: pd.DataFrame, n: int = 8) -> plt.Figure:
    """The renormalised ``p`` and the normalised neighbourhood score of the top candidates."""
    top = step.head(n)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    x = range(len(top))
    ax.bar([i - 0.2 for i in x], top.p / top.p.sum(), width=0.4, label="p (renormalised)")
    ax.bar([i + 0.2 for i in x], top.score / top.score.sum(), width=0.4,
           label="neighbourhood score (normalised)")
    ax.set_xticks(list(x), top.token.str.replace("▁", "", regex=False))
    ax.set_ylabel("share")
    ax.legend()
    greedy = step.loc[step["greedy"], "token"].iat[0].lstrip("▁")
    semsam = step.loc[step["semsam"], "token"].iat[0].lstrip("▁")
    ax.set_title(f"One step: p picks {greedy!r}, SemSam picks {semsam!r}")
    fig.tight_layout()
    return fig


def overhead_figure(wide: pd.DataFrame, vocab: int = 151_936) -> plt.Figure:
    """Median ms per decode step of each method and batch size (log scale)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    methods = ["transformers_chain", "softmax_argmax", "semsam_argmax", "semsam_sample"]
    width = 0.2
    for i, method in enumerate(methods):
        ax.bar([b + (i - 1.5) * width for b in range(len(wide))], wide[method], width=width,
               label=method.replace("_", " "))
    ax.set_xticks(range(len(wide)), [f"B = {b}" for b in wide.index])
    ax.set_yscale("log")
    ax.set_ylabel("median ms per decode step (CPU)")
    ax.set_title(f"Decode-step cost at V = {vocab:,}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
