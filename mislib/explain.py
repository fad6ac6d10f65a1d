"""SemSam shown on real token embeddings: the tables and figures of notebook 05.

Notebook 05 explains the decode rule (docs/design.md, "The SemSam rule and the arms") on the
32,000-token Llama-2 embedding matrix that ships with the ``wordllama`` package: the
neighbourhoods of the benchmark's direction words, one decode step decided by the rule
itself (:func:`mislib.semsam.select_next_token`) in each arm, and the cost of a step.

>>> import torch
>>> from mislib.semsam import build_neighbor_table
>>> table = build_neighbor_table(torch.randn(6, 4), torch.ones(6, dtype=torch.bool), k=2,
...                              progress=False)
>>> logits = torch.tensor([[3.0, 2.8, 2.6, -9.0, -9.0, -9.0]])
>>> step = decode_step(logits, table, [f"t{i}" for i in range(6)], temperature=1.0,
...                    top_k=3, top_p=1.0)
>>> list(step.columns)
['token', 'p', 'score', 'baseline', 'greedy', 'semsam']
>>> step["greedy"].tolist()
[True, False, False]
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import torch

from mislib.paths import project_paths
from mislib.semsam import ARMS, NeighborTable, keyed_uniforms, select_next_token, semantic_scores

#: The direction words whose neighbourhoods notebook 05 shows.
DIRECTION_WORDS = ("superior", "inferior", "left", "right", "anterior", "posterior", "above",
                   "below")
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


def neighbourhoods(table: NeighborTable, tokenizer: Any,
                   words: Sequence[str] = DIRECTION_WORDS, n: int = 10) -> pd.DataFrame:
    """Each word's ``n`` nearest content tokens: ``word, rank, neighbour, cosine``.

    Rank 0 is the word itself (cosine 1); ``neighbour`` is the token as the vocabulary
    spells it (``▁`` marks a token that starts a word).
    """
    rows = []
    for word in words:
        tid = token_id(tokenizer, word)
        for rank in range(n):
            rows.append({"word": word, "rank": rank,
                         "neighbour": tokenizer.id_to_token(int(table.ids[tid, rank])),
                         "cosine": float(table.sims[tid, rank])})
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

    The ``top_k`` most probable tokens are listed with their probability ``p`` and their
    neighbourhood score (:func:`mislib.semsam.semantic_scores`); one boolean column per arm
    marks the token :func:`mislib.semsam.select_next_token` picks in that arm, with the same
    keyed random number for every arm (``seed``, step 0), as a run pairs them. Nothing of the
    rule is recomputed here: top-p, the fallback and the choice are the rule's own.

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
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    p_top, cand = probs.topk(min(top_k, logits.shape[1]))
    uniforms = keyed_uniforms([seed], [0])
    picks = {arm: int(select_next_token(logits, table, temperature=temperature, top_k=top_k,
                                        top_p=top_p, arm=arm, uniforms=uniforms))
             for arm in ARMS}
    ids = [int(i) for i in cand[0]]
    return pd.DataFrame({
        "token": [name(i) for i in ids], "p": p_top[0].numpy(),
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
def neighbourhood_figure(hoods: pd.DataFrame, k: int) -> plt.Figure:
    """One panel per word: its nearest content tokens (rank >= 1) by cosine similarity."""
    words = list(pd.unique(hoods["word"]))
    ncols = 4
    nrows = -(-len(words) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(13, 3 * nrows), sharex=True,
                             squeeze=False)
    for ax, word in zip(axes.flat, words, strict=False):
        rows = hoods[(hoods.word == word) & (hoods["rank"] > 0)].iloc[::-1]
        ax.barh(range(len(rows)), rows.cosine, color="tab:blue")
        # "▁" marks a token that starts a word; shown as "_" ("_left" and "Left" differ)
        ax.set_yticks(range(len(rows)), rows.neighbour.str.replace("▁", "_", regex=False))
        ax.set_title(word)
        ax.set_xlim(0, 1)
    for ax in axes.flat[len(words):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("cosine similarity")
    fig.suptitle(f"Nearest content tokens in WordLlama's Llama-2 embeddings (k = {k})")
    fig.tight_layout()
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
