"""MIS-SemSam's transformers adapter: one finite token per row, ``generate`` equal to a
manual loop over the rule with keyed draws, rows independent of their batch."""

from __future__ import annotations

import pytest
import torch

from mislib.semsam.hf import SemSamLogitsProcessor
from mislib.semsam.rule import keyed_uniforms, select_next_token
from mislib.semsam.table import NeighborTable


def random_table(vocab: int, k: int, content_fraction: float, seed: int) -> NeighborTable:
    """A table with random neighbour ids and cosines in [-1, 1] (negative ones included)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (vocab, k), generator=g)
    ids[:, 0] = torch.arange(vocab)
    sims = torch.rand(vocab, k, generator=g) * 2 - 1
    sims[:, 0] = 1.0
    mask = torch.rand(vocab, generator=g) < content_fraction
    return NeighborTable(ids, sims, mask)


def test_processor_returns_one_finite_token_per_row():
    table = random_table(100, 4, 1.0, seed=6)
    proc = SemSamLogitsProcessor(table, 0.7, 10, 0.8, "argmax", "semsam", seed=[1, 2, 3])
    out = proc(torch.zeros(3, 4, dtype=torch.long), torch.randn(3, 100))
    assert (torch.isfinite(out).sum(1) == 1).all()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": 0.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p"),
    ({"mode": "greedy"}, "mode"), ({"arm": "control"}, "arm"),
    ({"table": None}, "neighbour table")])
def test_processor_rejects_bad_parameters(kwargs, field):
    params = {"table": random_table(10, 2, 1.0, seed=0), "temperature": 1.0, "top_k": 3,
              "top_p": 0.9, "mode": "argmax", "arm": "semsam", **kwargs}
    with pytest.raises(ValueError, match=field):
        SemSamLogitsProcessor(seed=0, **params)


def test_processor_rejects_a_batch_of_another_size_than_its_seeds():
    proc = SemSamLogitsProcessor(random_table(50, 2, 1.0, seed=0), 1.0, 5, 0.9, seed=[1, 2])
    with pytest.raises(ValueError, match="2 seeds but the batch has 3 rows"):
        proc(torch.zeros(3, 4, dtype=torch.long), torch.randn(3, 50))


@pytest.fixture(scope="module")
def tiny_qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from mislib.smoke import TEXT_CONFIG, VISION_CONFIG

    config = Qwen3VLConfig(text_config=dict(TEXT_CONFIG), vision_config=dict(VISION_CONFIG),
                           image_token_id=151655, video_token_id=151656,
                           vision_start_token_id=151652, vision_end_token_id=151653,
                           tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3VLForConditionalGeneration(config).eval()
    # Random weights give nearly flat logits; sharpen them so top-p keeps about 15 of 20.
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return model


def generate(model, prompt, proc, steps):
    from transformers import LogitsProcessorList

    with torch.no_grad():
        return model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
            do_sample=False, temperature=None, top_k=None, top_p=None, use_cache=False,
            logits_processor=LogitsProcessorList([proc]), eos_token_id=None,
            pad_token_id=151643)


def manual_decode(model, prompt, table, seeds, steps, rule):
    """Loop calling select_next_token on the last position, draws keyed by (seed, step)."""
    seq = prompt
    for step in range(steps):
        with torch.no_grad():
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1]
        u = keyed_uniforms(torch.tensor(seeds), torch.full((len(seeds),), step))
        token = select_next_token(logits.float(), table, uniforms=u, **rule)
        seq = torch.cat([seq, token[:, None]], 1)
    return seq


@pytest.mark.parametrize(("mode", "arm"), [("argmax", "semsam"), ("sample", "semsam"),
                                           ("argmax", "baseline"), ("argmax", "greedy")])
def test_generate_with_processor_equals_manual_decode_loop(tiny_qwen3_vl, mode, arm):
    model = tiny_qwen3_vl
    vocab = model.config.text_config.vocab_size
    table = random_table(vocab, 16, content_fraction=0.999, seed=7)
    prompt = torch.randint(0, 151_000, (3, 6), generator=torch.Generator().manual_seed(7))
    seeds = [101, 102, 103]
    rule = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "mode": mode}
    proc = SemSamLogitsProcessor(table, seed=seeds, arm=arm, **rule)
    seq = manual_decode(model, prompt, table, seeds, 5, {**rule, "arm": arm})
    assert torch.equal(generate(model, prompt, proc, 5), seq)
    if arm == "semsam" and mode == "argmax":  # the re-scoring branch really decided something
        baseline = manual_decode(model, prompt, table, seeds, 5, {**rule, "arm": "baseline"})
        assert not torch.equal(seq, baseline)


def test_rows_generate_the_same_tokens_alone_as_in_a_batch(tiny_qwen3_vl):
    model = tiny_qwen3_vl
    table = random_table(model.config.text_config.vocab_size, 16, 0.999, seed=8)
    prompt = torch.randint(0, 151_000, (3, 6), generator=torch.Generator().manual_seed(8))
    seeds = [7, 8, 9]
    rule = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "mode": "sample", "arm": "semsam"}
    together = generate(model, prompt, SemSamLogitsProcessor(table, seed=seeds, **rule), 4)
    for i, seed in enumerate(seeds):
        alone = generate(model, prompt[i:i + 1], SemSamLogitsProcessor(table, seed=[seed], **rule),
                         4)
        assert torch.equal(alone[0], together[i])
