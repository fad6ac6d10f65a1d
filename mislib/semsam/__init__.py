"""MIS-SemSam: re-score next-token candidates by the probability mass of their neighbourhood.

The package is one rule with thin adapters around it:

- :mod:`mislib.semsam.table` — the content-token mask and each content token's cosine
  nearest neighbours (:class:`NeighborTable`, built once per embedding space and cached);
- :mod:`mislib.semsam.rule` — the decode rule, one pure batched torch function
  (:func:`select_next_token`) for the three arms ``baseline``, ``greedy`` and ``semsam``,
  with random draws keyed by (seed, tokens generated so far) (:func:`keyed_uniforms`);
- :mod:`mislib.semsam.hf` — :class:`SemSamLogitsProcessor` for ``transformers``' ``generate``;
- :mod:`mislib.semsam.vllm_v1` and :mod:`mislib.semsam.vllm_v2` — the same rule as a vLLM
  logits processor for the V1 model runner (CPU) and Model Runner V2 (the CUDA default).
  They import vLLM and are only imported by the vllm backend, in ``.venv-vllm``.

``import mislib.semsam`` imports torch but neither transformers nor vLLM; the transformers
processor is imported on first access of ``mislib.semsam.SemSamLogitsProcessor``.

>>> import torch
>>> table = build_neighbor_table(torch.randn(50, 8), torch.ones(50, dtype=torch.bool), k=4,
...                              progress=False)
>>> u = keyed_uniforms([11, 12], [0, 0])
>>> select_next_token(torch.randn(2, 50), table, temperature=0.7, top_k=5, top_p=0.9,
...                   arm="semsam", uniforms=u).shape
torch.Size([2])
"""

from __future__ import annotations

from typing import Any

from mislib.semsam.rule import (
    ARMS,
    MODES,
    arm_codes,
    candidates,
    check_rule,
    keyed_uniforms,
    one_hot_logits,
    select_next_token,
    semantic_scores,
    time_decode_step,
)
from mislib.semsam.table import (
    TABLE_FORMAT,
    NeighborTable,
    build_neighbor_table,
    cached_neighbor_table,
    content_token_mask,
    load_wordllama,
    table_key,
)

__all__ = ["ARMS", "MODES", "TABLE_FORMAT", "NeighborTable", "SemSamLogitsProcessor",
           "arm_codes", "build_neighbor_table", "cached_neighbor_table", "candidates",
           "check_rule",
           "content_token_mask", "keyed_uniforms", "load_wordllama", "one_hot_logits",
           "select_next_token", "semantic_scores", "table_key", "time_decode_step"]


def __getattr__(name: str) -> Any:
    if name == "SemSamLogitsProcessor":  # imports transformers: only when asked for
        from mislib.semsam.hf import SemSamLogitsProcessor

        return SemSamLogitsProcessor
    raise AttributeError(f"module 'mislib.semsam' has no attribute {name!r}")
