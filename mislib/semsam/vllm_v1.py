"""MIS-SemSam as a vLLM logits processor for the V1 model runner (vLLM's CPU path).

vLLM builds one processor per engine worker from ``LLM(logits_processors=[...])`` (this
class, or the string ``"mislib.semsam.vllm_v1:SemSamV1LogitsProcessor"``). What it needs
reaches it in two ways:

- once per engine, ``LLM(additional_config={"semsam": ENGINE_CONFIG})``: the neighbour
  table **by path** (each worker process loads it) and the rule's settings
  ``temperature, top_k, top_p, mode`` (:func:`engine_config` writes this mapping);
- per request, ``SamplingParams(temperature=0, seed=SEED, extra_args={"semsam_arm": ARM})``:
  the arm (``baseline``, ``greedy`` or ``semsam``) and the (question, trial) seed; and,
  for a continued sequence (budget forcing, :mod:`mislib.inference.thinking`),
  ``extra_args={STEP_OFFSET_KEY: n}``: the tokens generated before this request's prompt
  ended, added to the count that keys the draws.

A vLLM OpenAI server reads the same keys (:mod:`mislib.semsam.vllm_args`):
``--additional-config '{"semsam": ENGINE_CONFIG}'`` for the engine, and a request body's
``"temperature": 0, "seed": SEED, "vllm_xargs": {"semsam_arm": ARM}`` (vLLM copies
``vllm_xargs`` into ``extra_args``); ``python -m mislib serve`` starts one.

Requests without ``semsam_arm`` pass untouched. For the others the processor decides the
token with :func:`mislib.semsam.rule.select_next_token`, with uniform numbers keyed by (seed,
tokens generated so far), and returns a row whose only finite entry is that token, which
vLLM's greedy sampler (temperature 0) takes. The decision does not depend on the batch the
request shares, nor on preemption (the count of generated tokens survives a recompute).

>>> from vllm import LLM, SamplingParams                                    # doctest: +SKIP
>>> llm = LLM(model, logits_processors=[SemSamV1LogitsProcessor],
...           additional_config={"semsam": engine_config(path, 0.7, 20, 0.8)})  # doctest: +SKIP
>>> llm.generate(prompts, SamplingParams(temperature=0, seed=7, max_tokens=16,
...              extra_args={"semsam_arm": "semsam"}))                     # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from mislib.semsam.rule import ARMS, check_rule, keyed_uniforms, select_next_token
from mislib.semsam.table import NeighborTable
from mislib.semsam.vllm_args import (  # noqa: F401  (re-exported)
    ARM_KEY,
    CONFIG_KEY,
    STEP_OFFSET_KEY,
    engine_config,
)


def request_step_offset(params: SamplingParams) -> int:
    """The tokens a continued request generated before its prompt ended (0 if none)."""
    offset = (params.extra_args or {}).get(STEP_OFFSET_KEY, 0)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"extra_args[{STEP_OFFSET_KEY!r}] = {offset!r}: should be an "
                         "integer >= 0")
    return offset


def read_engine_config(additional_config: Any) -> tuple[dict[str, Any] | None,
                                                        NeighborTable | None]:
    """The rule settings and the loaded table from ``vllm_config.additional_config``.

    Returns ``(None, None)`` when the engine has no SemSam settings (requests then cannot
    ask for an arm). A malformed entry raises ``ValueError`` naming the field.
    """
    cfg = (additional_config or {}).get(CONFIG_KEY) if isinstance(
        additional_config, Mapping) else None
    if cfg is None:
        return None, None
    missing = {"temperature", "top_k", "top_p"} - set(cfg)
    if missing:
        raise ValueError(f"additional_config[{CONFIG_KEY!r}] lacks {sorted(missing)}")
    rule = {"temperature": cfg["temperature"], "top_k": cfg["top_k"], "top_p": cfg["top_p"],
            "mode": cfg.get("mode", "argmax")}
    check_rule(**rule)
    table = NeighborTable.load(cfg["table"]) if cfg.get("table") else None
    return rule, table


def request_arm(params: SamplingParams) -> str | None:
    """The arm a request asks for (None: not a SemSam request); raises on a bad one."""
    arm = (params.extra_args or {}).get(ARM_KEY)
    if arm is None:
        return None
    if arm not in ARMS:
        raise ValueError(f"extra_args[{ARM_KEY!r}] = {arm!r}; arms: {ARMS}")
    if params.seed is None:
        raise ValueError(f"a request with extra_args[{ARM_KEY!r}] needs SamplingParams.seed "
                         "(its random draws are keyed by it)")
    if params.temperature != 0:
        raise ValueError(f"a request with extra_args[{ARM_KEY!r}] needs temperature=0 (the "
                         "processor decides; vLLM's greedy sampler takes its token), got "
                         f"{params.temperature}")
    return arm


class SemSamV1LogitsProcessor(LogitsProcessor):
    """The decode rule inside vLLM's V1 sampler (see the module docstring for its inputs).

    Parameters
    ----------
    vllm_config : the engine's ``VllmConfig`` (``additional_config[CONFIG_KEY]`` read here).
    device : where the logits live (the table is moved there once).
    is_pin_memory : unused (no host-to-device staging is needed).
    """

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        request_arm(sampling_params)

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.rule, table = read_engine_config(getattr(vllm_config, "additional_config", None))
        self.table = table.to(device) if table is not None else None
        self.device = device
        # persistent-batch index -> (seed, arm code, the request's live output token list,
        # tokens generated before its prompt ended)
        self.requests: dict[int, tuple[int, int, list[int], int]] = {}

    def _new_state(self, params: SamplingParams, _prompt: list[int] | None,
                   output_ids: list[int]) -> tuple[int, int, list[int], int] | None:
        arm = request_arm(params)
        if arm is None:
            return None
        if self.rule is None:
            raise ValueError(f"a request asks for arm {arm!r} but the engine was started "
                             f"without additional_config[{CONFIG_KEY!r}]")
        if arm == "semsam" and self.table is None:
            raise ValueError(f"the semsam arm needs additional_config[{CONFIG_KEY!r}]"
                             "['table'] (the neighbour table's path)")
        return int(params.seed), ARMS.index(arm), output_ids, request_step_offset(params)

    def is_argmax_invariant(self) -> bool:
        """False: the processor changes which token greedy sampling takes."""
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.requests, batch_update, self._new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.requests:
            return logits
        rows = sorted(i for i in self.requests if i < logits.shape[0])
        if not rows:
            return logits
        states = [self.requests[i] for i in rows]
        seeds = torch.tensor([s for s, _, _, _ in states], dtype=torch.long)
        steps = torch.tensor([len(out) + offset for _, _, out, offset in states],
                             dtype=torch.long)
        codes = [a for _, a, _, _ in states]
        arm = ARMS[codes[0]] if len(set(codes)) == 1 else torch.tensor(codes, device=logits.device)
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        picked = logits.index_select(0, index)
        token = select_next_token(picked, self.table, arm=arm,
                                  uniforms=keyed_uniforms(seeds, steps, logits.device),
                                  **self.rule)
        picked.fill_(-torch.inf).scatter_(1, token[:, None], 0.0)
        return logits.index_copy_(0, index, picked)
