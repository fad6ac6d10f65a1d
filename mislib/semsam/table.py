"""MIS-SemSam's neighbour tables: which tokens are content, and each one's nearest neighbours.

Once per embedding space, :func:`build_neighbor_table` stores every content token's cosine
``k`` nearest neighbours among the content tokens (itself first): ids ``S_tid[V, k]`` and
cosines ``S_val[V, k]``, as a :class:`NeighborTable`. :func:`cached_neighbor_table` keeps
one file per (embeddings, mask, k) under ``.cache/semsam/``; the decode rule
(:mod:`mislib.semsam.rule`) and its adapters read it, and the vLLM adapters load it by path
in the engine's worker processes.

>>> import torch
>>> table = build_neighbor_table(torch.randn(50, 8), torch.ones(50, dtype=torch.bool), k=4,
...                              progress=False)
>>> table.ids.shape
torch.Size([50, 4])
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

#: Bumped whenever the table build changes in a way that changes its output, so cached
#: tables built by older code are not reused.
TABLE_FORMAT = "mislib.semsam.neighbor_table/1"

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
    faster there than bf16 or fp32 matmuls; integer tensor cores on a GPU), over the
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
