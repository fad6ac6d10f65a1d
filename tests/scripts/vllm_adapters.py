"""Exercise SemSam's vLLM adapters against vLLM's own interface types, without an engine.

Runs inside ``.venv-vllm`` (used by ``tests/test_semsam_vllm.py``):
``.venv-vllm/bin/python tests/scripts/vllm_adapters.py TABLE.safetensors``. The V1 processor
gets vLLM's ``BatchUpdate`` objects (requests added, moved, swapped, removed), the Model
Runner V2 processor a ``LogitsProcRequestState`` and ``LogitsContext`` built on the CPU (V2
itself needs CUDA). Every decided row must be the pure rule's token for (logits, seed,
tokens generated so far, arm); rows of other requests must be untouched. Prints one JSON
object per check and exits non-zero on the first failure.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import torch


def main(table_path: str) -> None:
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
    from vllm.v1.worker.gpu.sample.logits_processor import (
        LogitsContext,
        LogitsProcRequestState,
    )

    from mislib.semsam.rule import keyed_uniforms, select_next_token
    from mislib.semsam.table import NeighborTable
    from mislib.semsam.vllm_v1 import SemSamV1LogitsProcessor, engine_config
    from mislib.semsam.vllm_v2 import SemSamV2LogitsProcessor

    rule = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "mode": "argmax"}
    config = types.SimpleNamespace(additional_config={"semsam": engine_config(table_path,
                                                                              **rule)})
    table = NeighborTable.load(table_path)
    vocab = table.num_embeddings
    gen = torch.Generator().manual_seed(0)

    def logits(rows: int) -> torch.Tensor:
        return torch.randn(rows, vocab, generator=gen) * 3

    def expected(row: torch.Tensor, seed: int, step: int, arm: str) -> int:
        return int(select_next_token(row[None], table, arm=arm,
                                     uniforms=keyed_uniforms([seed], [step]), **rule)[0])

    def params(arm: str | None, seed: int | None = None, temperature: float = 0.0):
        return SamplingParams(temperature=temperature, seed=seed,
                              extra_args=None if arm is None else {"semsam_arm": arm})

    def decided(out: torch.Tensor, row: int) -> int:
        finite = torch.isfinite(out[row]).nonzero().flatten().tolist()
        assert len(finite) == 1 and out[row, finite[0]] == 0, f"row {row}: {len(finite)} finite"
        return finite[0]

    def report(name: str, **facts) -> None:
        print(json.dumps({"check": name, **facts}), flush=True)

    # ---------------------------------------------------------------- V1
    v1 = SemSamV1LogitsProcessor(config, torch.device("cpu"), False)
    assert v1.is_argmax_invariant() is False
    out_a, out_b, out_c = [], [5, 6], [7]  # the requests' live output-token lists
    v1.update_state(BatchUpdate(batch_size=3, removed=[], moved=[], added=[
        (0, params("semsam", 11), [1, 2], out_a), (1, params("baseline", 12), [1], out_b),
        (2, params(None), [1], out_c)]))
    x = logits(3)
    y = v1.apply(x.clone())
    assert decided(y, 0) == expected(x[0], 11, 0, "semsam")
    assert decided(y, 1) == expected(x[1], 12, 2, "baseline")
    assert torch.equal(y[2], x[2])
    report("v1_added_rows_decide_as_the_rule", tokens=[decided(y, 0), decided(y, 1)])

    # a token generated for each, then request 1 leaves and request 2 moves into its slot,
    # then slots 0 and 1 swap: the state must follow its request
    out_a.append(decided(y, 0))
    out_b.append(decided(y, 1))
    out_c.append(3)
    v1.update_state(BatchUpdate(batch_size=2, removed=[1], added=[],
                                moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    v1.update_state(BatchUpdate(batch_size=2, removed=[], added=[],
                                moved=[(0, 1, MoveDirectionality.SWAP)]))
    x = logits(2)
    y = v1.apply(x.clone())
    assert torch.equal(y[0], x[0])  # the request without an arm, now in slot 0
    assert decided(y, 1) == expected(x[1], 11, 1, "semsam")
    report("v1_state_follows_moves_swaps_and_removals", token=decided(y, 1))

    # the same request decides the same token alone as beside others (keyed draws)
    alone = SemSamV1LogitsProcessor(config, torch.device("cpu"), False)
    alone.update_state(BatchUpdate(batch_size=1, removed=[], moved=[],
                                   added=[(0, params("semsam", 11), [1, 2], list(out_a))]))
    assert decided(alone.apply(x[1:2].clone()), 0) == decided(y, 1)
    report("v1_a_request_decides_alike_alone_and_in_a_batch")

    for bad, match in ((params("nucleus", 1), "arms"), (params("semsam", None), "seed"),
                       (params("semsam", 1, temperature=0.5), "temperature=0")):
        try:
            SemSamV1LogitsProcessor.validate_params(bad)
        except ValueError as error:
            assert match in str(error), error
        else:
            raise AssertionError(f"accepted {bad}")
    SemSamV1LogitsProcessor.validate_params(params(None))
    report("v1_validate_params_rejects_bad_requests")

    # ---------------------------------------------------------------- V2
    slots = 8
    prompt_len = torch.tensor([4, 9, 3, 6, 2, 5, 7, 8], dtype=torch.int32)
    states = LogitsProcRequestState(
        device=torch.device("cpu"), max_num_reqs=slots, vocab_size=vocab, all_token_ids=None,
        prompt_len=types.SimpleNamespace(gpu=prompt_len, np=prompt_len.numpy()),
        prefill_len=None, total_len=None)
    v2 = SemSamV2LogitsProcessor(config, states)
    assert v2.add_request(5, params("semsam", 21)) is True
    assert v2.add_request(3, params("greedy", 22)) is True
    assert v2.add_request(6, params(None)) is False
    v2.apply_staged_writes()
    order = np.array([5, 3, 6])
    generated = [4, 0, 2]  # tokens each request has generated before this step
    pos = torch.tensor([int(prompt_len[s]) - 1 + g for s, g in zip(order, generated,
                                                                    strict=True)])
    mapping = torch.tensor(order, dtype=torch.int32)
    ctx = LogitsContext(expanded_idx_mapping=mapping, idx_mapping=mapping,
                        idx_mapping_np=order, expanded_local_pos=torch.zeros(3, dtype=torch.int32),
                        input_ids=torch.zeros(3, dtype=torch.int32), pos=pos,
                        seq_lens_upper_bound_np=(pos + 1).numpy())
    x = logits(3)
    y = v2.apply(x.clone(), ctx)
    assert decided(y, 0) == expected(x[0], 21, 4, "semsam")
    assert decided(y, 1) == expected(x[1], 22, 0, "greedy") == int(x[1].argmax())
    assert torch.equal(y[2], x[2])
    report("v2_rows_decide_as_the_rule_by_slot_and_position",
           tokens=[decided(y, 0), decided(y, 1)])

    # V1 and V2 decide alike for the same (logits, seed, step, arm)
    v1b = SemSamV1LogitsProcessor(config, torch.device("cpu"), False)
    v1b.update_state(BatchUpdate(batch_size=1, removed=[], moved=[],
                                 added=[(0, params("semsam", 21), [0] * 5, [9] * 4)]))
    assert decided(v1b.apply(x[:1].clone()), 0) == decided(y, 0)
    report("v1_and_v2_decide_alike")

    # a recycled slot is re-initialised: slot 5 now holds a request without an arm
    assert v2.add_request(5, params(None)) is False
    v2.apply_staged_writes()
    y = v2.apply(x.clone(), ctx)
    assert torch.equal(y[0], x[0]) and torch.equal(y[2], x[2])
    report("v2_recycled_slot_forgets_its_previous_request")

    # a batch without SemSam requests is returned as is, without work
    only = np.array([6])
    ctx_only = LogitsContext(expanded_idx_mapping=torch.tensor(only, dtype=torch.int32),
                             idx_mapping=torch.tensor(only, dtype=torch.int32),
                             idx_mapping_np=only, expanded_local_pos=torch.zeros(1),
                             input_ids=torch.zeros(1), pos=torch.tensor([3]),
                             seq_lens_upper_bound_np=np.array([4]))
    x1 = logits(1)
    assert v2.apply(x1, ctx_only) is x1
    report("v2_batch_without_semsam_requests_is_untouched")


if __name__ == "__main__":
    main(sys.argv[1])
