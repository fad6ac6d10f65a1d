"""MIS-SemSam as a ``transformers`` logits processor (the hf backend's decode rule).

The processor makes the decision itself with :func:`mislib.semsam.rule.select_next_token`
and returns a row in which only the chosen token is finite, so ``generate`` runs with
``do_sample=False`` and no warpers. Every arm (``baseline``, ``greedy``, ``semsam``) goes
through it, so the arms differ only in the rule; its random numbers are keyed by (the row's
seed, tokens generated so far), the same numbers the vLLM adapters use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from mislib.semsam.rule import ARMS, check_rule, keyed_uniforms, one_hot_logits, select_next_token
from mislib.semsam.table import NeighborTable


class SemSamLogitsProcessor(LogitsProcessor):
    """The decode rule of one arm for ``transformers``' ``generate``.

    Generate with ``do_sample=False`` (greedy takes the one finite token) and with
    ``temperature=None, top_k=None, top_p=None`` so that no warper from the model's
    generation config runs. Build one processor per ``generate`` call: it counts the
    generated tokens from the length of the first ``input_ids`` it sees (or call
    :meth:`reset`).

    Parameters
    ----------
    table : NeighborTable or None
        Neighbour table of the model's input embeddings (moved to the logits' device);
        None is accepted for the ``baseline`` and ``greedy`` arms.
    temperature, top_k, top_p, mode
        As in :func:`~mislib.semsam.rule.select_next_token`.
    arm : str
        One of :data:`~mislib.semsam.rule.ARMS`.
    seed : int or sequence of int
        One seed per batch row (one per (question, trial), the same in every arm); an int
        is used for every row.
    step_offset : int or sequence of int
        Tokens each row generated before this ``generate`` call (a continued sequence, as
        in budget forcing, :mod:`mislib.inference.thinking`): draws are keyed by the tokens
        generated in all, so a continuation never repeats the first call's numbers.

    Examples
    --------
    >>> proc = SemSamLogitsProcessor(table, 0.7, 20, 0.8, "argmax", "semsam",
    ...                              seed=[11, 12])  # doctest: +SKIP
    >>> model.generate(**inputs, logits_processor=LogitsProcessorList([proc]),
    ...                do_sample=False, temperature=None, top_k=None, top_p=None)  # doctest: +SKIP
    """

    def __init__(self, table: NeighborTable | None, temperature: float, top_k: int,
                 top_p: float, mode: str = "argmax", arm: str = "semsam",
                 seed: int | Sequence[int] = 0,
                 step_offset: int | Sequence[int] = 0) -> None:
        check_rule(temperature, top_k, top_p, mode)
        if arm not in ARMS:
            raise ValueError(f"unknown arm {arm!r}; arms: {ARMS}")
        if table is None and arm == "semsam":
            raise ValueError("the semsam arm needs a neighbour table")
        if table is not None and not isinstance(table, NeighborTable):
            raise TypeError(f"table must be a NeighborTable, got {type(table).__name__}")
        self.table, self.temperature, self.top_k, self.top_p = table, temperature, top_k, top_p
        self.mode, self.arm = mode, arm
        self.seeds = None if isinstance(seed, int) else torch.tensor([int(s) for s in seed],
                                                                     dtype=torch.long)
        self.seed = int(seed) if isinstance(seed, int) else None
        self.offsets = torch.as_tensor(step_offset, dtype=torch.long)
        if self.offsets.ndim > 1 or (self.offsets.ndim == 1 and self.seeds is not None
                                     and self.offsets.numel() != self.seeds.numel()):
            raise ValueError("step_offset must be an int or one int per seed")
        self.reset()

    def reset(self) -> None:
        """Forget the prompt length (to reuse the processor for a fresh ``generate`` call)."""
        self._prompt_len: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        batch = scores.shape[0]
        if self.seeds is not None and self.seeds.numel() != batch:
            raise ValueError(f"SemSamLogitsProcessor has {self.seeds.numel()} seeds but the "
                             f"batch has {batch} rows (num_return_sequences and beams multiply "
                             "rows)")
        if self._prompt_len is None:
            self._prompt_len = int(input_ids.shape[1])
        step = int(input_ids.shape[1]) - self._prompt_len
        seeds = self.seeds if self.seeds is not None else torch.full((batch,), self.seed)
        uniforms = keyed_uniforms(seeds, torch.full((batch,), step) + self.offsets)
        if self.table is not None:
            self.table = self.table.to(scores.device)
        token = select_next_token(scores, self.table, temperature=self.temperature,
                                  top_k=self.top_k, top_p=self.top_p, mode=self.mode,
                                  arm=self.arm, uniforms=uniforms)
        return one_hot_logits(torch.empty_like(scores), token)
