"""The MIS-SemSam decode rule: one pure, batched torch function shared by every adapter.

At each decode step and for each row, :func:`select_next_token`

1. takes ``p = softmax(z / T)`` over the whole vocabulary and the candidates ``I`` = top-k
   of ``p``, then top-p on the renormalised top-k (a token is kept while the mass ranked
   above it is below ``top_p``; the most probable token is always kept);
2. decides by the row's **arm**:

   - ``baseline``: the default rule, a draw from ``p`` restricted to ``I``;
   - ``greedy``: the most probable candidate (no draw, no re-scoring): the control that
     separates determinism from re-scoring;
   - ``semsam``: if every candidate is a content token, scores ``score(c) = sum_k max(0,
     S_val[c, k]) * p[S_tid[c, k]]`` (neighbours outside ``I`` count) and returns ``argmax
     score`` (ties go to the more probable candidate), or in ``mode="sample"`` draws
     proportionally to the scores; otherwise falls back to the default rule.

Random draws are **keyed**: row ``b``'s uniform number is a counter-based hash of (its seed,
the number of tokens it has generated so far) (:func:`keyed_uniforms`), not the next number
of a generator. So a (question, trial) gets the same numbers in every arm, whatever batch it
lands in, however often the engine preempts and recomputes it, and on every backend: the
arms are paired draw for draw, and the transformers and vLLM adapters make identical choices
on identical logits. ``docs/design.md`` (MIS-SemSam) gives the reasoning.

>>> import torch
>>> from mislib.semsam.table import NeighborTable
>>> table = NeighborTable(torch.randint(0, 50, (50, 4)), torch.rand(50, 4),
...                       torch.ones(50, dtype=torch.bool))
>>> u = keyed_uniforms(torch.tensor([11, 12]), torch.tensor([0, 0]))
>>> select_next_token(torch.randn(2, 50), table, temperature=0.7, top_k=5, top_p=0.9,
...                   arm="semsam", uniforms=u).shape
torch.Size([2])
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from mislib.semsam.table import NeighborTable
from mislib.vocabulary import ARMS  # the decode arms, in the order of their integer codes

#: SemSam's selection among the candidates.
MODES = ("argmax", "sample")


def check_rule(temperature: float, top_k: int, top_p: float, mode: str) -> None:
    """Raise ``ValueError`` naming the first invalid rule parameter."""
    if isinstance(temperature, bool) or not (
            isinstance(temperature, int | float) and temperature > 0
            and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if isinstance(top_k, bool) or not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if isinstance(top_p, bool) or not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def arm_codes(arms: str | Sequence[str], batch: int | None = None) -> torch.Tensor:
    """Integer codes ``[B]`` (index into :data:`ARMS`) of one arm for ``batch`` rows, or of a
    list of per-row arms."""
    names = [arms] * int(batch or 1) if isinstance(arms, str) else list(arms)
    unknown = sorted(set(names) - set(ARMS))
    if unknown:
        raise ValueError(f"unknown arm {unknown[0]!r}; arms: {ARMS}")
    return torch.tensor([ARMS.index(a) for a in names], dtype=torch.long)


# --------------------------------------------------------------------------------------
# Keyed random draws
# --------------------------------------------------------------------------------------

def _signed(value: int) -> int:
    """A 64-bit constant as the signed int64 torch stores."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)  # SplitMix64's increment (2**64 / golden ratio)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic on negative numbers)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps modulo 2**64)."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def keyed_uniforms(seeds: torch.Tensor | Sequence[int], steps: torch.Tensor | Sequence[int],
                   device: torch.device | str | None = None) -> torch.Tensor:
    """One U[0, 1) number per row, a pure function of (seed, step).

    Parameters
    ----------
    seeds
        ``[B]`` integer seeds (any int64; one per (question, trial), the same in every arm).
    steps
        ``[B]`` tokens the row has generated so far (0 for its first token).
    device
        Where to compute (default: the device of ``seeds`` when a tensor, else CPU).

    Returns
    -------
    torch.FloatTensor
        ``[B]`` fp32 multiples of ``2**-24`` in ``[0, 1)``: SplitMix64 output number
        ``step + 1`` of the stream that starts at the mixed seed, top 24 bits. Exact integer
        arithmetic, so CPU and CUDA give the same numbers bit for bit.
    """
    if device is None:
        device = seeds.device if isinstance(seeds, torch.Tensor) else "cpu"
    seeds = torch.as_tensor(seeds, dtype=torch.long, device=device).reshape(-1)
    steps = torch.as_tensor(steps, dtype=torch.long, device=device).reshape(-1)
    if seeds.shape != steps.shape:
        raise ValueError(f"{seeds.numel()} seeds but {steps.numel()} steps")
    z = _mix64(_mix64(seeds) + (steps + 1) * _GOLDEN)
    return _shift_right(z, 40).to(torch.float32) * (1.0 / (1 << 24))


# --------------------------------------------------------------------------------------
# The decode rule
# --------------------------------------------------------------------------------------

def semantic_scores(probs: torch.Tensor, candidates: torch.Tensor,
                    table: NeighborTable) -> torch.Tensor:
    """Neighbourhood mass of each candidate: ``sum_k max(0, S_val[c, k]) * p[S_tid[c, k]]``.

    Parameters
    ----------
    probs
        ``[B, V]`` next-token probabilities (or any non-negative per-token values; the
        decode rule passes unnormalised ones, which leaves the argmax unchanged).
    candidates
        ``[B, M]`` token ids.
    table
        Neighbour table on the same device.

    Returns
    -------
    torch.FloatTensor
        ``[B, M]`` scores (fp32).
    """
    ids, weights = table.ids[candidates], table.weights[candidates]
    values = probs.gather(1, ids.flatten(1)).view_as(ids).float()
    return (weights * values).sum(-1)


def select_next_token(logits: torch.Tensor, table: NeighborTable | None, *,
                      temperature: float, top_k: int, top_p: float, mode: str = "argmax",
                      arm: str | torch.Tensor = "semsam",
                      uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """The decision of one decode step for a batch, in any mix of arms.

    Parameters
    ----------
    logits
        ``[B, V]`` next-token logits (fp32, bf16 or fp16; the maths runs in fp32).
    table
        :class:`~mislib.semsam.table.NeighborTable` with ``V`` rows, on the logits' device;
        may be None when no row is in the ``semsam`` arm.
    temperature, top_k, top_p
        ``p = softmax(logits / temperature)``; candidates are the ``top_k`` most probable
        tokens, then those whose higher-ranked mass (within the renormalised top-k) is
        below ``top_p``. Zero-probability tokens (``-inf`` logits) are never candidates.
    mode
        SemSam's choice: ``"argmax"`` (highest score; ties to the more probable candidate)
        or ``"sample"`` (a draw proportional to the scores).
    arm
        One of :data:`ARMS` for every row, or ``[B]`` integer codes (:func:`arm_codes`);
        with codes and no table, no row may be coded ``semsam`` (not checked: checking
        would wait for the device).
    uniforms
        ``[B]`` U[0, 1) numbers, one per row (:func:`keyed_uniforms`); every draw a row
        makes this step uses its number. None draws them from torch's global generator
        (for exploration only: runs pass keyed numbers so that arms are paired).

    Returns
    -------
    torch.LongTensor
        ``[B]`` chosen token ids.
    """
    check_rule(temperature, top_k, top_p, mode)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
    batch, vocab = logits.shape
    if isinstance(arm, str):
        if arm not in ARMS:
            raise ValueError(f"unknown arm {arm!r}; arms: {ARMS}")
        codes, uses = None, {arm}
    else:
        # Per-row arms: every branch is computed (no host sync to find which arms occur).
        codes = torch.as_tensor(arm, dtype=torch.long, device=logits.device).reshape(-1)
        if codes.numel() != batch:
            raise ValueError(f"{codes.numel()} arm codes for a batch of {batch} rows")
        uses = set(ARMS) if table is not None else {"baseline", "greedy"}
    if "semsam" in uses:
        if table is None:
            raise ValueError("the semsam arm needs a neighbour table")
        if table.num_embeddings != vocab:
            raise ValueError(f"logits have {vocab} columns but the table has "
                             f"{table.num_embeddings} rows")
    n_cand = min(top_k, vocab)
    top_logits, cand = _topk(logits, n_cand)
    if uses == {"greedy"}:
        return cand[:, 0]
    if uniforms is None:
        uniforms = torch.rand(batch, device=logits.device)
    u = torch.as_tensor(uniforms, device=logits.device).reshape(-1).float()
    if u.numel() != batch:
        raise ValueError(f"{u.numel()} uniform numbers for a batch of {batch} rows")
    inv_t = 1.0 / temperature
    top_z = top_logits.float()
    z_max = top_z[:, :1]
    q, keep = _top_p(top_z, inv_t, top_p)
    chosen = _inverse_cdf(q.masked_fill(~keep, 0.0), u)  # the default rule
    if "semsam" in uses:
        ids, weights = table.ids[cand], table.weights[cand]
        nb_z = logits.gather(1, ids.flatten(1)).view_as(ids).float()
        scores = (weights * torch.exp((nb_z - z_max[..., None]) * inv_t)).sum(-1)
        if mode == "argmax":
            # Candidates are sorted by p, and argmax returns the first maximum: ties -> higher p.
            pick = scores.masked_fill(~keep, -1.0).argmax(-1)
        else:
            pick = _inverse_cdf(scores.masked_fill(~keep, 0.0), u)
        rescored = (table.content_mask[cand] | ~keep).all(-1)
        if codes is not None:
            rescored &= codes == ARMS.index("semsam")
        chosen = torch.where(rescored, pick, chosen)
    if codes is not None and "greedy" in uses:
        chosen = chosen.masked_fill(codes == ARMS.index("greedy"), 0)
    return cand.gather(1, chosen[:, None]).squeeze(1)


def _top_p(top_z: torch.Tensor, inv_t: float, top_p: float) -> tuple[torch.Tensor,
                                                                    torch.Tensor]:
    """``(q, keep)`` of sorted top-k logits ``[B, M]``: ``p`` up to a per-row factor, and
    the candidates top-p keeps (the most probable one always)."""
    # p up to the common factor exp(z_max / T) / sum exp(z / T), which no decision needs.
    q = torch.exp((top_z - top_z[:, :1]) * inv_t)
    keep = q > 0
    if top_p < 1.0:
        p_top = q / q.sum(-1, keepdim=True)
        keep &= (p_top.cumsum(-1) - p_top) < top_p
    keep[:, 0] = True
    return q, keep


def candidates(logits: torch.Tensor, *, temperature: float, top_k: int,
               top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate set ``I`` of each row, as :func:`select_next_token` forms it.

    Returns
    -------
    (ids, kept) : ``[B, M]`` token ids of the ``M = min(top_k, V)`` most probable tokens
        (most probable first) and a ``[B, M]`` boolean mask of those top-p keeps.
    """
    check_rule(temperature, top_k, top_p, "argmax")
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
    top_logits, cand = _topk(logits, min(top_k, logits.shape[1]))
    return cand, _top_p(top_logits.float(), 1.0 / temperature, top_p)[1]


def one_hot_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``logits`` overwritten in place so that each row's only finite entry (0) is its token.

    A greedy sampler (transformers' ``do_sample=False``, vLLM's ``temperature=0``) then takes
    exactly the token the rule chose.
    """
    logits.fill_(-math.inf)
    return logits.scatter_(1, tokens.reshape(-1, 1).to(logits.device), 0.0)


_TOPK_BLOCK = 128


def _topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk`` (sorted, descending), through block maxima when ``V`` is large.

    The ``k`` largest entries lie in the ``k`` blocks with the largest maxima (plus the
    ragged tail), so one vectorised max pass over ``V`` (``amax`` over contiguous blocks,
    cheaper than ``max_pool1d``; figures in bench/RESULTS.md) and a ``topk`` over
    ``k * block`` entries replace a selection over the whole row.
    """
    batch, vocab = logits.shape
    n_blocks = vocab // _TOPK_BLOCK
    if n_blocks < 8 * k:
        return logits.topk(k, dim=-1)
    body = n_blocks * _TOPK_BLOCK
    blocks = logits[:, :body].view(batch, n_blocks, _TOPK_BLOCK)
    maxima = blocks.amax(-1)
    which = maxima.topk(k, dim=-1).indices  # [B, k]
    pool = blocks.gather(1, which[..., None].expand(-1, -1, _TOPK_BLOCK)).flatten(1)
    pool_ids = (which[..., None] * _TOPK_BLOCK
                + torch.arange(_TOPK_BLOCK, device=logits.device)).flatten(1)
    if body < vocab:
        pool = torch.cat([pool, logits[:, body:]], 1)
        tail = torch.arange(body, vocab, device=logits.device).expand(batch, -1)
        pool_ids = torch.cat([pool_ids, tail], 1)
    vals, pos = pool.topk(k, dim=-1)
    return vals, pool_ids.gather(1, pos)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Column drawn from each row of non-negative ``weights`` ``[B, M]`` with uniforms ``u``.

    Picks the first column whose cumulative weight exceeds ``u * total``, so a
    zero-weight column is never chosen (rounding at the top end falls back to the last
    positive one).
    """
    cdf = weights.cumsum(-1)
    idx = (cdf <= u[:, None] * cdf[:, -1:]).sum(-1)
    positions = torch.arange(weights.shape[1], device=weights.device)
    last_positive = (positions * (weights > 0)).amax(-1)
    return torch.minimum(idx, last_positive)


# --------------------------------------------------------------------------------------
# Timing of one decode step (notebook 05 and the benchmark)
# --------------------------------------------------------------------------------------

def time_decode_step(batches: Sequence[int] = (1, 8, 64), vocab: int = 151_936,
                     rounds: int = 30, temperature: float = 0.7, top_k: int = 20,
                     top_p: float = 0.8, k: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """Median seconds of one decode step: SemSam against transformers' chain and a floor.

    Methods, on the same fp32 logits ``[B, vocab]``: ``transformers_chain`` (Temperature ->
    TopK -> TopP warpers, softmax, multinomial), ``softmax_argmax`` (the floor every rule
    pays), ``semsam_argmax`` and ``semsam_sample`` (:func:`select_next_token` with a random
    ``k``-neighbour table). They are timed round-robin, one call each per round, so load
    from other processes hits them alike. Each turn makes one untimed call before the timed
    one: the first calls after the chain run measurably slower whichever method comes next
    (bench/RESULTS.md), which would measure the chain's aftermath instead of the method.

    Returns
    -------
    list of dict
        One row per (batch, method): ``batch, method, median_ms, min_ms, rounds``.
    """
    import statistics

    from transformers import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(seed)
    table = NeighborTable(torch.randint(0, vocab, (vocab, k), generator=g),
                          torch.rand(vocab, k, generator=g), torch.ones(vocab, dtype=torch.bool))
    chain = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k),
                                 TopPLogitsWarper(top_p)])
    rule = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    rows = []
    for batch in batches:
        # LLM-like logits: a few strong tokens over a broad floor
        logits = torch.randn(batch, vocab, generator=g) * 2.0
        logits[:, torch.randint(0, vocab, (30,), generator=g)] += 8.0
        seeds = torch.arange(batch) + seed
        steps = torch.zeros(batch, dtype=torch.long)
        methods = {
            "transformers_chain": lambda x=logits: torch.multinomial(
                torch.softmax(chain(None, x), dim=-1), 1, generator=g),
            "softmax_argmax": lambda x=logits: torch.softmax(x, dim=-1).argmax(-1),
            "semsam_argmax": lambda x=logits, s=seeds, t=steps: select_next_token(
                x, table, mode="argmax", uniforms=keyed_uniforms(s, t), **rule),
            "semsam_sample": lambda x=logits, s=seeds, t=steps: select_next_token(
                x, table, mode="sample", uniforms=keyed_uniforms(s, t), **rule),
        }
        times: dict[str, list[float]] = {name: [] for name in methods}
        with torch.no_grad():
            for fn in methods.values():  # warm-up
                fn()
            for _ in range(rounds):
                for name, fn in methods.items():
                    fn()  # untimed: takes the aftermath of the previous method's call
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        rows += [{"batch": batch, "method": name, "median_ms": statistics.median(v) * 1e3,
                  "min_ms": min(v) * 1e3, "rounds": rounds} for name, v in times.items()]
    return rows
