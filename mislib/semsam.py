"""MIS-SemSam: re-score next-token candidates by the probability mass of their neighbourhood.

Once per embedding space, :func:`build_neighbor_table` stores every content token's cosine
``k`` nearest neighbours among the content tokens (itself first): ids ``S_tid[V, k]`` and
cosines ``S_val[V, k]``. At each decode step and for each row, :func:`select_next_token`

1. takes ``p = softmax(z / T)`` over the whole vocabulary and the candidates ``I`` = top-k
   of ``p``, then top-p on the renormalised top-k (a token is kept while the mass ranked
   above it is below ``top_p``; the most probable token is always kept);
2. if every candidate is a content token, scores ``score(c) = sum_k max(0, S_val[c, k]) *
   p[S_tid[c, k]]`` (neighbours outside ``I`` count) and returns ``argmax score`` (ties go to
   the more probable candidate), or in ``mode="sample"`` draws proportionally to the scores;
3. otherwise falls back to the default rule: a draw from ``p`` restricted to ``I``.

With ``rescore=False`` the same code is the **baseline arm** (always the default rule). Both
arms draw exactly one uniform number per row and step from the same generator, whichever
branch decides, so with equal seeds the two arms consume identical random streams and differ
only in the selection rule.

:class:`SemSamLogitsProcessor` wraps the rule for ``transformers``' ``generate``.

>>> import torch
>>> table = build_neighbor_table(torch.randn(50, 8), torch.ones(50, dtype=torch.bool), k=4)
>>> logits = torch.randn(2, 50)
>>> select_next_token(logits, table, temperature=0.7, top_k=5, top_p=0.9).shape
torch.Size([2])
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor

#: Bumped whenever the table build changes in a way that changes its output, so cached
#: tables built by older code are not reused.
TABLE_FORMAT = "mislib.semsam.neighbor_table/1"
MODES = ("argmax", "sample")

# Tokens that look like control markers (``<|image_pad|>``, ``<|vision_start|>``...). Such
# strings are added tokens in every tokenizer we know; this is a second line of defence for
# a tokenizer that keeps one in its regular vocabulary.
_CONTROL_TOKEN = re.compile(r"^<\|.*\|>$")


# --------------------------------------------------------------------------------------
# Content tokens
# --------------------------------------------------------------------------------------

def content_token_mask(tokenizer: Any, num_embeddings: int) -> torch.Tensor:
    """Which rows of the input-embedding matrix are regular-vocabulary (content) tokens.

    Parameters
    ----------
    tokenizer
        A ``transformers`` tokenizer (fast or slow) or a raw ``tokenizers.Tokenizer``.
    num_embeddings
        Rows of the model's input-embedding matrix, ``V`` (Qwen3-VL: 151,936, more than its
        tokenizer's 151,669 tokens).

    Returns
    -------
    torch.BoolTensor
        ``[V]``; True for tokens of the tokenizer's regular vocabulary (its BPE/unigram
        model). False for special tokens, every added token whether flagged special or not
        (``<think>``, ``<tool_call>``, fill-in-the-middle markers), anything shaped like a
        ``<|...|>`` control marker, and embedding rows beyond the tokenizer (padding).
    """
    if num_embeddings <= 0:
        raise ValueError(f"num_embeddings must be positive, got {num_embeddings}")
    import tokenizers

    backend = tokenizer if isinstance(tokenizer, tokenizers.Tokenizer) else getattr(
        tokenizer, "backend_tokenizer", None)
    if backend is not None:
        vocab = backend.get_vocab(with_added_tokens=False)
        added_ids = set(backend.get_added_tokens_decoder())
    elif hasattr(tokenizer, "get_vocab"):  # a slow (Python) transformers tokenizer
        vocab = tokenizer.get_vocab()
        added_ids = set(getattr(tokenizer, "added_tokens_decoder", {}))
    else:
        raise TypeError(f"cannot read a vocabulary from {type(tokenizer).__name__}")
    excluded = added_ids | set(getattr(tokenizer, "all_special_ids", []))
    ids = [i for tok, i in vocab.items()
           if i < num_embeddings and i not in excluded and not _CONTROL_TOKEN.match(tok)]
    mask = torch.zeros(num_embeddings, dtype=torch.bool)
    mask[torch.tensor(ids, dtype=torch.long)] = True
    return mask


# --------------------------------------------------------------------------------------
# Neighbour tables
# --------------------------------------------------------------------------------------

@dataclass(eq=False)
class NeighborTable:
    """Each content token's cosine nearest neighbours among the content tokens.

    Attributes
    ----------
    ids : torch.LongTensor
        ``[V, k]`` neighbour token ids, nearest first; column 0 is the token itself. Rows of
        non-content tokens hold their own id in every column (never read by the rule).
    sims : torch.FloatTensor
        ``[V, k]`` cosine similarities (fp32), matching ``ids``; 0 on non-content rows.
    content_mask : torch.BoolTensor
        ``[V]`` the content tokens the table was built over.
    key : str
        Hash of (embeddings, k, mask, format): the cache key, recorded in ``run.json``.
    meta : dict
        Build facts (``k``, ``margin``, rows that needed the exact fallback, ...).
    """

    ids: torch.Tensor
    sims: torch.Tensor
    content_mask: torch.Tensor
    key: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ids.ndim != 2 or self.sims.shape != self.ids.shape:
            raise ValueError(f"ids {tuple(self.ids.shape)} and sims {tuple(self.sims.shape)} "
                             "must both be [V, k]")
        if self.content_mask.shape != (self.ids.shape[0],):
            raise ValueError(f"content_mask {tuple(self.content_mask.shape)} must be "
                             f"[{self.ids.shape[0]}]")
        self._weights: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    @property
    def num_embeddings(self) -> int:
        return int(self.ids.shape[0])

    @property
    def weights(self) -> torch.Tensor:
        """``max(0, sims)``: the score weights, computed once (negative cosines count 0)."""
        if self._weights is None:
            self._weights = self.sims.float().clamp_min(0.0)
        return self._weights

    def to(self, device: torch.device | str) -> NeighborTable:
        """The same table with its tensors on ``device`` (``self`` if already there)."""
        device = torch.device(device)
        if self.ids.device == device:
            return self
        return NeighborTable(self.ids.to(device), self.sims.to(device),
                             self.content_mask.to(device), self.key, dict(self.meta))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as safetensors (written to a temporary file, then renamed)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"ids": self.ids.to(torch.int32).cpu().contiguous(),
                   "sims": self.sims.float().cpu().contiguous(),
                   "content_mask": self.content_mask.to(torch.uint8).cpu().contiguous()}
        metadata = {"format": TABLE_FORMAT, "key": self.key,
                    "meta": json.dumps(self.meta, default=str)}
        fd, tmp = tempfile.mkstemp(prefix=".semsam-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeighborTable:
        """Read a table written by :meth:`save`; a malformed file raises naming the file."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        except Exception as exc:  # safetensors raises several types for a broken file
            raise ValueError(f"{path}: not a readable safetensors neighbour table ({exc})") from exc
        if metadata.get("format") != TABLE_FORMAT:
            raise ValueError(f"{path}: format {metadata.get('format')!r}, expected {TABLE_FORMAT!r}")
        missing = {"ids", "sims", "content_mask"} - set(tensors)
        if missing:
            raise ValueError(f"{path}: missing tensors {sorted(missing)}")
        try:
            return cls(tensors["ids"].long(), tensors["sims"].float(),
                       tensors["content_mask"].bool(), metadata.get("key", ""),
                       json.loads(metadata.get("meta", "{}")))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc


def table_key(embeddings: torch.Tensor | np.ndarray, content_mask: torch.Tensor, k: int) -> str:
    """Hash identifying a table: the embedding bytes, dtype and shape, ``k``, the mask, the format."""
    emb = torch.as_tensor(embeddings).detach().cpu().contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([TABLE_FORMAT, str(emb.dtype), list(emb.shape), int(k)]).encode())
    digest.update(memoryview(emb.reshape(-1).view(torch.uint8).numpy()))
    digest.update(memoryview(content_mask.detach().cpu().to(torch.uint8).numpy()))
    return digest.hexdigest()


def cached_neighbor_table(embeddings: torch.Tensor | np.ndarray, content_mask: torch.Tensor,
                          k: int, cache_dir: str | os.PathLike | None = None,
                          **build_kwargs: Any) -> NeighborTable:
    """:func:`build_neighbor_table`, cached as ``<cache_dir>/<key>.safetensors``.

    Parameters
    ----------
    cache_dir
        Default ``.cache/semsam/`` of the project (:func:`mislib.paths.project_paths`).
    build_kwargs
        Passed to :func:`build_neighbor_table` on a cache miss (speed knobs only: they do
        not change the table, so they are not part of the key).
    """
    if cache_dir is None:
        from mislib.paths import project_paths

        cache_dir = project_paths().cache / "semsam"
    key = table_key(embeddings, content_mask, k)
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        table = NeighborTable.load(path)
        if table.key == key:
            return table
    table = build_neighbor_table(embeddings, content_mask, k, key=key, **build_kwargs)
    table.save(path)
    return table


def build_neighbor_table(embeddings: torch.Tensor | np.ndarray, content_mask: torch.Tensor,
                         k: int, *, margin: int = 96, block_size: int = 8192,
                         device: torch.device | str | None = None, key: str | None = None,
                         progress: bool = True) -> NeighborTable:
    """Exact cosine k-nearest neighbours of every content token among the content tokens.

    Parameters
    ----------
    embeddings
        ``[V, d]`` input-embedding matrix (any float dtype; not modified).
    content_mask
        ``[V]`` bool, e.g. from :func:`content_token_mask`.
    k
        Neighbours per token, the token itself included (column 0).
    margin
        Extra candidates kept by the int8 pass and re-ranked exactly (see Notes).
    block_size
        Rows per block of the similarity matrix (memory: about ``4 * block_size**2`` bytes
        per block plus the int8 copy of the content rows, ``V * d`` bytes).
    device
        Where to compute (default: the embeddings' device); CUDA works the same way.
    key
        Precomputed :func:`table_key` (computed here when omitted).

    Returns
    -------
    NeighborTable

    Notes
    -----
    The unit vectors are rounded to int8 on one common scale and their dot products
    computed block by block as exact int32 sums (``torch._int_mm``: AVX-512-VNNI on a CPU,
    about twice its bf16 rate and four times fp32; integer tensor cores on a GPU), over the
    upper triangle only, since the matrix is symmetric. Each row keeps its ``k + margin``
    best int8 candidates: a block entry can only enter a list when it beats that list's
    current last entry, so each block is compared once with the lowest such threshold and
    only the few entries above it are merged (no block is sorted). The candidates are then
    re-scored exactly in fp32 and the best ``k`` kept. A row is accepted only when its exact
    ``k``-th similarity beats the best discarded int8 estimate by more than the rounding
    error: five times a per-pair bound on the standard deviation of the first-order error,
    ``||e_x||_4^2 ||y||_4^2`` summed both ways, plus a strict bound on the second-order term
    ``||e_x||_2 ||e_y||_2``. Rows that fail (near-ties, clustered embeddings) are recomputed
    with a full fp32 pass, so the result equals an fp32 brute force up to fp32 rounding.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    emb = torch.as_tensor(embeddings)
    if emb.ndim != 2 or not emb.is_floating_point():
        raise ValueError(f"embeddings must be a [V, d] float matrix, got {tuple(emb.shape)} {emb.dtype}")
    content_mask = torch.as_tensor(content_mask).to(torch.bool).cpu()
    n_rows, dim = emb.shape
    if content_mask.shape != (n_rows,):
        raise ValueError(f"content_mask has shape {tuple(content_mask.shape)}, embeddings have "
                         f"{n_rows} rows")
    content_ids = content_mask.nonzero().squeeze(1)
    n_content = int(content_ids.numel())
    if n_content < k:
        raise ValueError(f"k={k} neighbours requested but only {n_content} content tokens")
    device = torch.device(device) if device is not None else emb.device
    block_size = max(1, int(block_size))
    if key is None:
        key = table_key(emb, content_mask, k)
    width = min(k + max(margin, 0), n_content)
    content_dev = content_ids.to(device)
    content_src = content_ids.to(emb.device)

    def unit_rows(rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 unit vectors of the content rows at positions ``rows`` (zero rows stay zero)."""
        picked = torch.index_select(emb, 0, content_src[rows.to(emb.device)], out=out)
        x = picked.to(device=device, dtype=torch.float32)
        return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)

    clock = _PhaseClock(device)
    # int8 copy of the unit content rows on one common scale, so that the integer dot
    # products rank every row and every column alike, and each row's rounding statistics.
    starts = list(range(0, n_content, block_size))
    inv_norm = torch.empty(n_content, device=device)  # 1 / ||row|| (0 for a zero row)
    peak = torch.zeros((), device=device)  # the largest |coordinate| of a unit row
    for s in starts:
        e = min(s + block_size, n_content)
        raw = emb[content_src[s:e]].to(device=device, dtype=torch.float32)
        norm = raw.norm(dim=1)
        inv_norm[s:e] = torch.where(norm > 0, 1.0 / norm, 0.0)
        peak = torch.maximum(peak, (raw.abs().amax(1) * inv_norm[s:e]).max())
    scale = float(peak) / 127.0 if float(peak) > 0 else 1.0
    dim_pad = -(-dim // 8) * 8  # CUDA's int8 matmul wants a multiple of 8; zeros change nothing
    low = torch.zeros(n_content, dim_pad, dtype=torch.int8, device=device)
    err2 = torch.empty(n_content, device=device)   # ||x - scale * q(x)||_2
    err4 = torch.empty(n_content, device=device)   # ||x - scale * q(x)||_4^2
    val4 = torch.empty(n_content, device=device)   # ||x||_4^2
    for s in starts:
        e = min(s + block_size, n_content)
        x = unit_rows(torch.arange(s, e, device=device))
        q = torch.round(x / scale).clamp_(-127, 127)
        low[s:e, :dim] = q.to(torch.int8)
        err = (x - q * scale).square_()
        err2[s:e] = err.sum(1).sqrt()
        err4[s:e] = err.square_().sum(1).sqrt()
        val4[s:e] = x.square_().square_().sum(1).sqrt()
    # Per row, a bound on the standard deviation of the first-order rounding error of its
    # dot products with any other row, and a strict bound on the second-order term.
    spread = (err4 * val4.max()).sqrt() + (err4.max() * val4).sqrt()  # [n_content]
    second = err2 * err2.max()

    clock.lap("quantise")
    # The candidate pass, in integer units of scale**2 (exact int32 sums).
    best_val = torch.full((n_content, width), _INT_MIN, dtype=torch.int32, device=device)
    best_idx = torch.zeros((n_content, width), dtype=torch.long, device=device)
    n_blocks = len(starts)
    bar = tqdm(total=n_blocks * (n_blocks + 1) // 2, desc="semsam kNN (int8 blocks)",
               disable=not progress, leave=False)
    # Diagonal blocks first: they seed every row's candidate list (itself first).
    for s in starts:
        e = min(s + block_size, n_content)
        sim = _int8_matmul(low[s:e], low[s:e].T)
        sim.diagonal().fill_(_INT_MAX)
        vals, idx = sim.topk(min(width, e - s), dim=1)
        best_val[s:e, :vals.shape[1]] = vals
        best_idx[s:e, :vals.shape[1]] = idx + s
        bar.update()
    # Off-diagonal blocks of the upper triangle: each updates its rows and its columns.
    for j, sj in enumerate(starts):
        ej = min(sj + block_size, n_content)
        low_t = low[sj:ej].T
        for si in starts[:j]:
            _merge_candidates(best_val, best_idx, si, sj,
                              _int8_matmul(low[si:si + block_size], low_t))
            bar.update()
    bar.close()
    del low

    clock.lap("candidates")
    # Exact fp32 re-rank of the candidates, then the acceptance test. The candidates' dot
    # products are one sampled product (sparse pattern x dense rows), which streams each
    # candidate row once instead of gathering [rows, width, d] copies.
    if n_content == n_rows and emb.dtype == torch.float32 and emb.device == device:
        content_rows = emb
    else:
        content_rows = emb[content_src].to(device=device, dtype=torch.float32)
    ids_c = torch.empty((n_content, k), dtype=torch.long, device=device)
    sims_c = torch.empty((n_content, k), device=device)
    accepted = torch.empty(n_content, dtype=torch.bool, device=device)
    for s in range(0, n_content, block_size):
        e = min(s + block_size, n_content)
        rows = torch.arange(s, e, device=device)
        cand = best_idx[s:e].sort(dim=1).values  # sorted columns: a valid CSR pattern
        exact = _sampled_dots(unit_rows(rows), content_rows, cand) * inv_norm[cand]
        order_key = exact.masked_fill(cand == rows[:, None], math.inf)  # itself first
        top, pos = order_key.topk(k, dim=1)
        ids_c[s:e] = cand.gather(1, pos)
        sims_c[s:e] = exact.gather(1, pos)
        if width == n_content:  # every content token was a candidate: nothing was discarded
            accepted[s:e] = True
            continue
        # Every discarded entry's int8 estimate is at most the weakest kept candidate's.
        discarded = best_val[s:e, -1].double() * scale**2  # lists are sorted by value
        tolerance = 5.0 * spread[s:e] + second[s:e] + 1e-6
        kth = top[:, -1] if k > 1 else torch.full_like(top[:, 0], math.inf)
        accepted[s:e] = kth.double() >= discarded + tolerance
    del best_val, best_idx, content_rows

    clock.lap("rerank")
    redo = (~accepted).nonzero().squeeze(1)
    if redo.numel():
        _exact_rows(redo, unit_rows, n_content, k, block_size, ids_c, sims_c, device)
    clock.lap("exact_fallback")

    ids = torch.arange(n_rows, device=device)[:, None].repeat(1, k)
    sims = torch.zeros((n_rows, k), device=device)
    ids[content_dev] = content_dev[ids_c]
    sims[content_dev] = sims_c
    meta = {"k": k, "margin": width - k, "block_size": block_size, "dim": dim,
            "n_content": n_content, "exact_fallback_rows": int(redo.numel()),
            "device": str(device), "seconds": clock.laps}
    return NeighborTable(ids.cpu(), sims.cpu(), content_mask, key, meta)


_INT_MIN = torch.iinfo(torch.int32).min
_INT_MAX = torch.iinfo(torch.int32).max


def _int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 product of int8 ``a [m, d]`` and ``b [d, n]`` (VNNI on CPU, IMMA on GPU)."""
    if a.device.type == "cpu":
        return torch._int_mm(a, b)
    m, n = a.shape[0], b.shape[1]  # CUDA wants m > 16 and n a multiple of 8
    a = torch.nn.functional.pad(a, (0, 0, 0, max(0, 17 - m)))
    b = torch.nn.functional.pad(b, (0, -n % 8))
    return torch._int_mm(a, b)[:m, :n]


def _merge_candidates(best_val: torch.Tensor, best_idx: torch.Tensor, row0: int, col0: int,
                      sim: torch.Tensor) -> None:
    """Fold block ``sim`` (content rows ``row0 + i``, columns ``col0 + j``) into the lists.

    Both directions at once, since the block is a piece of a symmetric matrix: row ``i``
    may gain column ``j`` and row ``col0 + j`` may gain row ``row0 + i``. Only entries
    above a line's current ``width``-th best can enter its list; one comparison with the
    lowest of those thresholds over the block's rows and columns finds them (after the
    diagonal blocks, a small fraction of a block), and only they are merged.
    """
    n_i, n_j = sim.shape
    thr_rows = best_val[row0:row0 + n_i, -1]
    thr_cols = best_val[col0:col0 + n_j, -1]
    floor = torch.minimum(thr_rows.min(), thr_cols.min())
    r, c = (sim > floor).nonzero(as_tuple=True)
    v = sim[r, c]
    into_row = v > thr_rows[r]
    _append(best_val, best_idx, r[into_row] + row0, c[into_row] + col0, v[into_row],
            rows_sorted=True)  # nonzero() lists entries row by row
    into_col = v > thr_cols[c]
    _append(best_val, best_idx, c[into_col] + col0, r[into_col] + row0, v[into_col])


def _append(best_val: torch.Tensor, best_idx: torch.Tensor, rows: torch.Tensor,
            ids: torch.Tensor, vals: torch.Tensor, rows_sorted: bool = False) -> None:
    """Merge the entries ``(rows[i], ids[i], vals[i])`` into the lists of their rows."""
    if rows.numel() == 0:
        return
    if not rows_sorted:
        rows, order = rows.sort()
        ids, vals = ids[order], vals[order]
    lines, counts = torch.unique_consecutive(rows, return_counts=True)
    slot = torch.repeat_interleave(torch.arange(lines.numel(), device=rows.device), counts)
    first = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - first[slot]
    longest = int(counts.max())
    new_val = torch.full((lines.numel(), longest), _INT_MIN, dtype=vals.dtype, device=vals.device)
    new_idx = torch.zeros((lines.numel(), longest), dtype=best_idx.dtype, device=ids.device)
    new_val[slot, pos] = vals
    new_idx[slot, pos] = ids
    merged, pick = torch.cat([best_val[lines], new_val], 1).topk(best_val.shape[1], dim=1)
    best_idx[lines] = torch.cat([best_idx[lines], new_idx], 1).gather(1, pick)
    best_val[lines] = merged


class _PhaseClock:
    """Wall seconds of consecutive phases (synchronising a CUDA device at each lap)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.laps = device, {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now


def _sampled_dots(query: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``out[i, j] = query[i] . rows[cols[i, j]]`` for ``cols`` ``[m, w]`` sorted along dim 1."""
    m, w = cols.shape
    crow = torch.arange(0, m * w + 1, w, device=cols.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, cols.reshape(-1), query.new_zeros(m * w),
                                          size=(m, rows.shape[0]), check_invariants=False)
        out = torch.sparse.sampled_addmm(pattern, query, rows.T, beta=0.0)
    return out.values().view(m, w)


def _exact_rows(redo: torch.Tensor, unit_rows, n_content: int, k: int, block_size: int,
                ids_c: torch.Tensor, sims_c: torch.Tensor, device: torch.device) -> None:
    """Full fp32 kNN for the rows ``redo`` (those the int8 pass could not certify)."""
    step = max(1, min(1024, redo.numel()))
    for s in tqdm(range(0, redo.numel(), step), desc="semsam kNN (exact fp32 rows)",
                  leave=False, disable=redo.numel() <= step):
        rows = redo[s:s + step]
        query = unit_rows(rows)
        best_v = torch.full((rows.numel(), k), -math.inf, device=device)
        best_i = torch.zeros((rows.numel(), k), dtype=torch.long, device=device)
        for c0 in range(0, n_content, block_size):
            cols = torch.arange(c0, min(c0 + block_size, n_content), device=device)
            sim = query @ unit_rows(cols).T
            sim[rows[:, None] == cols[None, :]] = math.inf  # the token itself first
            v, i = sim.topk(min(k, cols.numel()), dim=1)
            v, order = torch.cat([best_v, v], 1).topk(k, dim=1)
            best_i = torch.cat([best_i, cols[i]], 1).gather(1, order)
            best_v = v
        own = (query * query).sum(1)
        best_v[:, 0] = own  # the +inf placeholder back to the token's own cosine
        ids_c[rows] = best_i
        sims_c[rows] = best_v


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
    ids, weights = _neighbours(candidates, table)
    values = probs.gather(1, ids.flatten(1)).view_as(ids).float()
    return (weights * values).sum(-1)


def _neighbours(candidates: torch.Tensor, table: NeighborTable) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour ids ``[B, M, K]`` and clamped cosines ``[B, M, K]`` of ``candidates``."""
    return table.ids[candidates], table.weights[candidates]


def select_next_token(logits: torch.Tensor, table: NeighborTable, *, temperature: float,
                      top_k: int, top_p: float, mode: str = "argmax", rescore: bool = True,
                      generator: torch.Generator | Sequence[torch.Generator] | None = None,
                      ) -> torch.Tensor:
    """The MIS-SemSam decision for one decode step of a batch.

    Parameters
    ----------
    logits
        ``[B, V]`` next-token logits (fp32, bf16 or fp16; the maths runs in fp32).
    table
        :class:`NeighborTable` with ``V`` rows, on the logits' device.
    temperature, top_k, top_p
        ``p = softmax(logits / temperature)``; candidates are the ``top_k`` most probable
        tokens, then those whose higher-ranked mass (within the renormalised top-k) is
        below ``top_p``. Zero-probability tokens (``-inf`` logits) are never candidates.
    mode
        ``"argmax"`` (highest score; ties to the more probable candidate) or ``"sample"``
        (a draw proportional to the scores).
    rescore
        False gives the baseline arm: always the default rule.
    generator
        Source of the one uniform number drawn per row: ``None`` (torch's global RNG), one
        ``torch.Generator`` (``B`` numbers from it, on its device), or a sequence of ``B``
        generators, row ``b`` drawing from ``generator[b]`` (for pairing arms per
        (question, trial); this draw is the only per-row Python step).

    Returns
    -------
    torch.LongTensor
        ``[B]`` chosen token ids.
    """
    _check_rule(temperature, top_k, top_p, mode)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
    batch, vocab = logits.shape
    if table.num_embeddings != vocab:
        raise ValueError(f"logits have {vocab} columns but the table has {table.num_embeddings} rows")
    n_cand = min(top_k, vocab)
    top_logits, cand = _topk(logits, n_cand)
    inv_t = 1.0 / temperature
    top_z = top_logits.float()
    z_max = top_z[:, :1]
    # p up to the common factor exp(z_max / T) / sum exp(z / T), which no decision needs.
    q = torch.exp((top_z - z_max) * inv_t)
    keep = q > 0
    if top_p < 1.0:
        p_top = q / q.sum(-1, keepdim=True)
        keep &= (p_top.cumsum(-1) - p_top) < top_p
    keep[:, 0] = True
    u = _uniforms(batch, generator, logits.device)
    default = _inverse_cdf(q.masked_fill(~keep, 0.0), u)
    if not rescore:
        return cand.gather(1, default[:, None]).squeeze(1)
    ids, weights = _neighbours(cand, table)
    nb_z = logits.gather(1, ids.flatten(1)).view_as(ids).float()
    scores = (weights * torch.exp((nb_z - z_max[..., None]) * inv_t)).sum(-1)
    if mode == "argmax":
        # Candidates are sorted by p, and argmax returns the first maximum: ties -> higher p.
        pick = scores.masked_fill(~keep, -1.0).argmax(-1)
    else:
        pick = _inverse_cdf(scores.masked_fill(~keep, 0.0), u)
    all_content = (table.content_mask[cand] | ~keep).all(-1)
    chosen = torch.where(all_content, pick, default)
    return cand.gather(1, chosen[:, None]).squeeze(1)


def _check_rule(temperature: float, top_k: int, top_p: float, mode: str) -> None:
    if not (isinstance(temperature, int | float) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


_TOPK_BLOCK = 128


def _topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk`` (sorted, descending), through block maxima when ``V`` is large.

    The ``k`` largest entries lie in the ``k`` blocks with the largest maxima (plus the
    ragged tail), so one vectorised max pass over ``V`` (``amax`` over contiguous blocks,
    about 7x faster than ``max_pool1d`` at B = 1 on an AVX-512 CPU) and a ``topk`` over
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


def _uniforms(batch: int, generator: torch.Generator | Sequence[torch.Generator] | None,
              device: torch.device) -> torch.Tensor:
    """One U[0, 1) number per row, drawn as :func:`select_next_token` documents."""
    if generator is None:
        return torch.rand(batch, device=device)
    if isinstance(generator, torch.Generator):
        return torch.rand(batch, generator=generator, device=generator.device).to(device)
    if len(generator) != batch:
        raise ValueError(f"{len(generator)} generators for a batch of {batch} rows")
    return torch.cat([torch.rand(1, generator=g, device=g.device) for g in generator]).to(device)


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


class SemSamLogitsProcessor(LogitsProcessor):
    """MIS-SemSam as a ``transformers`` logits processor that decides the token itself.

    It returns a row in which only the chosen token is finite, so generate with
    ``do_sample=False`` (greedy picks it) and with ``temperature=None, top_k=None,
    top_p=None`` so that no warper from the model's generation config runs. Build one
    processor per ``generate`` call: its generators advance with every step.

    Parameters
    ----------
    table : NeighborTable
        Neighbour table of the model's input embeddings (moved to the logits' device).
    temperature, top_k, top_p, mode, rescore
        As in :func:`select_next_token`; ``rescore=False`` is the baseline arm.
    seed : int, sequence of int, or None
        A sequence gives every batch row its own CPU generator (one per (question, trial),
        so both arms draw the same numbers per row, on CPU and CUDA alike); an int seeds
        one generator for the batch; None uses torch's global RNG.

    Examples
    --------
    >>> proc = SemSamLogitsProcessor(table, 0.7, 20, 0.8, "argmax", True, seed=[11, 12])  # doctest: +SKIP
    >>> model.generate(**inputs, logits_processor=LogitsProcessorList([proc]),
    ...                do_sample=False, temperature=None, top_k=None, top_p=None)  # doctest: +SKIP
    """

    def __init__(self, table: NeighborTable, temperature: float, top_k: int, top_p: float,
                 mode: str = "argmax", rescore: bool = True,
                 seed: int | Sequence[int] | None = None) -> None:
        _check_rule(temperature, top_k, top_p, mode)
        if not isinstance(table, NeighborTable):
            raise TypeError(f"table must be a NeighborTable, got {type(table).__name__}")
        if seed is not None and not isinstance(seed, int):
            seed = [int(s) for s in seed]
        self.table, self.temperature, self.top_k, self.top_p = table, temperature, top_k, top_p
        self.mode, self.rescore, self.seed = mode, rescore, seed
        self.reset()

    def reset(self) -> None:
        """Re-seed the generators (to reuse the processor for a fresh ``generate`` call)."""
        if self.seed is None:
            self._generator = None
        elif isinstance(self.seed, int):
            self._generator = torch.Generator().manual_seed(self.seed)
        else:
            self._generator = [torch.Generator().manual_seed(s) for s in self.seed]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if isinstance(self._generator, list) and len(self._generator) != scores.shape[0]:
            raise ValueError(f"SemSamLogitsProcessor has {len(self._generator)} seeds but the "
                             f"batch has {scores.shape[0]} rows (num_return_sequences and "
                             "beams multiply rows)")
        self.table = self.table.to(scores.device)
        token = select_next_token(scores, self.table, temperature=self.temperature,
                                  top_k=self.top_k, top_p=self.top_p, mode=self.mode,
                                  rescore=self.rescore, generator=self._generator)
        out = torch.full_like(scores, -math.inf)
        return out.scatter_(1, token[:, None], 0.0)


# --------------------------------------------------------------------------------------
# Real embeddings for the notebook, and the decode-step timing used by notebook and bench
# --------------------------------------------------------------------------------------

def load_wordllama() -> tuple[torch.Tensor, Any]:
    """The LLM token embeddings that ship with the ``wordllama`` package, and their tokenizer.

    Returns
    -------
    embeddings : torch.FloatTensor
        ``[32000, 256]`` (Llama-2 vocabulary, WordLlama's ``l2_supercat`` 256-d matrix).
    tokenizer : tokenizers.Tokenizer
        The matching Llama-2 tokenizer.

    Notes
    -----
    The files are located through the import system without importing ``wordllama`` (which
    pulls in its inference stack); nothing is downloaded.
    """
    import importlib.util

    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'wordllama' is not installed (pip install wordllama)")
    root = Path(next(iter(spec.submodule_search_locations)))
    weights = root / "weights" / "l2_supercat_256.safetensors"
    vocab = root / "tokenizers" / "l2_supercat_tokenizer_config.json"
    for path in (weights, vocab):
        if not path.is_file():
            raise FileNotFoundError(f"wordllama is installed at {root} but has no {path.name}")
    tensors = load_file(str(weights))
    if "embedding.weight" not in tensors:
        raise ValueError(f"{weights}: no tensor 'embedding.weight' (has {sorted(tensors)})")
    return tensors["embedding.weight"].float(), Tokenizer.from_file(str(vocab))


def time_decode_step(batches: Sequence[int] = (1, 8, 64), vocab: int = 151_936,
                     rounds: int = 30, temperature: float = 0.7, top_k: int = 20,
                     top_p: float = 0.8, k: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """Median seconds of one decode step: SemSam against transformers' chain and a floor.

    Methods, on the same fp32 logits ``[B, vocab]``: ``transformers_chain`` (Temperature ->
    TopK -> TopP warpers, softmax, multinomial), ``softmax_argmax`` (the floor every rule
    pays), ``semsam_argmax`` and ``semsam_sample`` (:func:`select_next_token` with a random
    ``k``-neighbour table). They are timed round-robin, one call each per round, so load
    from other processes hits them alike. Each turn makes one untimed call before the timed
    one: the first calls after the chain run up to 2.7x slower (0.8 against 0.3 ms for
    the same SemSam call at B = 1, whichever method comes next), which would measure the
    chain's aftermath instead of the method.

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
        gen = torch.Generator().manual_seed(seed + 1)
        methods = {
            "transformers_chain": lambda x=logits, r=gen: torch.multinomial(
                torch.softmax(chain(None, x), dim=-1), 1, generator=r),
            "softmax_argmax": lambda x=logits: torch.softmax(x, dim=-1).argmax(-1),
            "semsam_argmax": lambda x=logits, r=gen: select_next_token(
                x, table, mode="argmax", generator=r, **rule),
            "semsam_sample": lambda x=logits, r=gen: select_next_token(
                x, table, mode="sample", generator=r, **rule),
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
