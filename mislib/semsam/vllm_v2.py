"""MIS-SemSam as a vLLM logits processor for Model Runner V2 (vLLM's default on CUDA).

Model Runner V2 rejects V1 processors and has its own interface
(``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor``): per-request state is
kept in request slots, filled on the host in :meth:`~SemSamV2LogitsProcessor.add_request`
and copied to the device in :meth:`~SemSamV2LogitsProcessor.apply_staged_writes`;
:meth:`~SemSamV2LogitsProcessor.apply` then sees every logits row with the slot it belongs
to. The inputs are those of :mod:`mislib.semsam.vllm_v1`: ``additional_config["semsam"]``
(:func:`~mislib.semsam.vllm_v1.engine_config`: the table's path and the rule) once per
engine, ``SamplingParams(temperature=0, seed=..., extra_args={"semsam_arm": ...})`` per
request.

``apply`` never waits for the device: the tokens generated so far are ``pos + 1 -
prompt_len`` of each row's slot, the rule runs on every row (rows of other requests keep
their logits through a ``where``), and the arms of the batch are per-row codes.

>>> llm = LLM(model, logits_processors=[SemSamV2LogitsProcessor],
...           additional_config={"semsam": engine_config(path, 0.7, 20, 0.8)})  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.logits_processor import (
    LogitsContext,
    LogitsProcessor,
    LogitsProcRequestState,
)

from mislib.semsam.rule import ARMS, keyed_uniforms, select_next_token
from mislib.semsam.vllm_v1 import (
    CONFIG_KEY,
    read_engine_config,
    request_arm,
    request_step_offset,
)

_PASS = -1  # slot code: the request is not SemSam's


class SemSamV2LogitsProcessor(LogitsProcessor):
    """The decode rule inside Model Runner V2's sampler.

    Parameters
    ----------
    vllm_config : the engine's ``VllmConfig`` (``additional_config[CONFIG_KEY]`` read here).
    req_states : the runner's per-slot request state (device, slot count, prompt lengths).
    """

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        request_arm(sampling_params)

    def __init__(self, vllm_config: Any, req_states: LogitsProcRequestState) -> None:
        super().__init__(vllm_config, req_states)
        self.rule, table = read_engine_config(getattr(vllm_config, "additional_config", None))
        self.device = torch.device(req_states.device)
        self.table = table.to(self.device) if table is not None else None
        self.req_states = req_states
        slots = int(req_states.max_num_reqs)
        # host copies (written by add_request), device copies (read by apply)
        self._arm = np.full(slots, _PASS, dtype=np.int64)
        self._seed = np.zeros(slots, dtype=np.int64)
        self._offset = np.zeros(slots, dtype=np.int64)  # tokens generated before the prompt ended
        self.arm = torch.full((slots,), _PASS, dtype=torch.long, device=self.device)
        self.seed = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.offset = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._dirty = False

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        """Record the request's arm and seed in its slot; False when it is not SemSam's."""
        arm = request_arm(sampling_params)
        if arm is not None and self.rule is None:
            raise ValueError(f"a request asks for arm {arm!r} but the engine was started "
                             f"without additional_config[{CONFIG_KEY!r}]")
        if arm == "semsam" and self.table is None:
            raise ValueError(f"the semsam arm needs additional_config[{CONFIG_KEY!r}]"
                             "['table'] (the neighbour table's path)")
        self._arm[req_idx] = _PASS if arm is None else ARMS.index(arm)
        self._seed[req_idx] = 0 if arm is None else int(sampling_params.seed)
        self._offset[req_idx] = 0 if arm is None else request_step_offset(sampling_params)
        self._dirty = True
        return arm is not None

    def apply_staged_writes(self) -> None:
        if self._dirty:
            self.arm.copy_(torch.from_numpy(self._arm), non_blocking=True)
            self.seed.copy_(torch.from_numpy(self._seed), non_blocking=True)
            self.offset.copy_(torch.from_numpy(self._offset), non_blocking=True)
            self._dirty = False

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if not (self._arm[ctx.idx_mapping_np] != _PASS).any():
            return logits
        slot = ctx.expanded_idx_mapping.long()
        arm = self.arm[slot]
        mine = arm != _PASS
        prompt_len = self.req_states.prompt_len.gpu.to(self.device)[slot].long()
        steps = ctx.pos.long() + 1 - prompt_len + self.offset[slot]
        token = select_next_token(logits, self.table, arm=arm.clamp_min(0),
                                  uniforms=keyed_uniforms(self.seed[slot], steps),
                                  **self.rule)
        columns = torch.arange(logits.shape[1], device=logits.device)
        decided = torch.where(columns == token[:, None], 0.0, -torch.inf)
        return torch.where(mine[:, None], decided, logits)
