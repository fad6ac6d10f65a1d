"""MIS-SemSam's decode rule: keyed random draws, the three arms, and the batched rule
against a plain-loop reference."""

from __future__ import annotations

import pytest
import torch

from mislib.semsam.rule import (
    ARMS,
    arm_codes,
    keyed_uniforms,
    one_hot_logits,
    select_next_token,
    semantic_scores,
)
from mislib.semsam.table import NeighborTable

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def random_table(vocab: int, k: int, content_fraction: float, seed: int) -> NeighborTable:
    """A table with random neighbour ids and cosines in [-1, 1] (negative ones included)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (vocab, k), generator=g)
    ids[:, 0] = torch.arange(vocab)
    sims = torch.rand(vocab, k, generator=g) * 2 - 1
    sims[:, 0] = 1.0
    mask = torch.rand(vocab, generator=g) < content_fraction
    return NeighborTable(ids, sims, mask)


def reference_select(logits, table, temperature, top_k, top_p, mode, arm, u, tol=1e-5):
    """Plain loop over rows and candidates, in float64, straight from the rule's text.

    ``u`` holds one uniform number per row (a list).

    Returns (tokens, ambiguous): ``ambiguous[b]`` flags rows whose decision sits within
    ``tol`` of a boundary (top-p cut, a score tie, a draw on a CDF step), where fp32 and
    fp64 may legitimately disagree.
    """
    ids, sims, content = table.ids.tolist(), table.sims.tolist(), table.content_mask.tolist()
    tokens, ambiguous = [], []
    for b in range(logits.shape[0]):
        p = torch.softmax(logits[b].double() / temperature, 0)
        order = torch.argsort(p, descending=True, stable=True)[:top_k].tolist()
        pl = p.tolist()
        mass_top = sum(pl[c] for c in order)
        kept, above, unsure = [], 0.0, False
        for j, c in enumerate(order):
            if pl[c] <= 0:
                break
            if j > 0 and top_p < 1.0:
                unsure |= abs(above - top_p) < tol
                if above >= top_p:
                    break
            kept.append(c)
            above += pl[c] / mass_top

        def draw(weights, u_row=u[b]):
            nonlocal unsure
            total = sum(weights)
            target, acc = u_row * total, 0.0
            for j, w in enumerate(weights):
                acc += w
                unsure |= abs(acc - target) < tol * total
                if acc > target:
                    return j
            return max(j for j, w in enumerate(weights) if w > 0)

        if arm == "greedy":
            choice = kept[0]
        elif arm == "semsam" and all(content[c] for c in kept):
            scores = [sum(max(0.0, sims[c][i]) * pl[ids[c][i]] for i in range(len(ids[c])))
                      for c in kept]
            if mode == "argmax":
                best = max(range(len(kept)), key=lambda j: (scores[j], pl[kept[j]]))
                close = [s for j, s in enumerate(scores) if j != best]
                unsure |= any(abs(s - scores[best]) < tol * scores[best] for s in close)
                choice = kept[best]
            else:
                choice = kept[draw(scores)]
        else:
            choice = kept[draw([pl[c] for c in kept])]
        tokens.append(choice)
        ambiguous.append(unsure)
    return torch.tensor(tokens), torch.tensor(ambiguous)


M64 = (1 << 64) - 1


def splitmix_reference(seed: int, step: int) -> float:
    """SplitMix64 in Python integers (no wrap-around tricks): the uniform of (seed, step)."""
    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    z = mix((mix(seed & M64) + (step + 1) * 0x9E3779B97F4A7C15) & M64)
    return (z >> 40) / 2**24


def uniforms_for(batch: int, seed: int, step: int = 0) -> torch.Tensor:
    return keyed_uniforms(torch.arange(batch) * 7919 + seed, torch.full((batch,), step))


# --------------------------------------------------------------------------------------
# keyed draws
# --------------------------------------------------------------------------------------


def test_keyed_uniforms_equal_the_python_splitmix_reference():
    seeds = [0, 1, 2, 12345, 2**62 + 3, 2**63 - 1, -1, -(2**63)]
    steps = [0, 1, 7, 255, 10**6, 3, 0, 42]
    got = keyed_uniforms(torch.tensor(seeds), torch.tensor(steps))
    want = [splitmix_reference(s, t) for s, t in zip(seeds, steps, strict=True)]
    assert got.dtype == torch.float32 and got.tolist() == want


def test_keyed_uniforms_are_uniform_and_differ_by_seed_and_step():
    n = 200_000
    u = keyed_uniforms(torch.arange(n), torch.zeros(n, dtype=torch.long)).double()
    assert ((u >= 0) & (u < 1)).all()
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    hist = torch.histc(u, bins=20, min=0, max=1)
    assert (hist - n / 20).abs().max() < 5 * (n / 20) ** 0.5  # ~5 sigma per bin
    # consecutive steps of one seed, and neighbouring seeds, are uncorrelated
    steps = keyed_uniforms(torch.full((n,), 99), torch.arange(n)).double()
    assert abs(torch.corrcoef(torch.stack([steps[:-1], steps[1:]]))[0, 1].item()) < 0.01
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.01


def test_keyed_uniforms_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="2 seeds but 3 steps"):
        keyed_uniforms([1, 2], [0, 1, 2])


# --------------------------------------------------------------------------------------
# the rule
# --------------------------------------------------------------------------------------


def test_semantic_scores_clamp_negative_cosines():
    ids = torch.tensor([[0, 1, 2], [1, 0, 2], [2, 0, 1]])
    sims = torch.tensor([[1.0, -0.5, 0.25], [1.0, 0.5, -1.0], [1.0, 0.0, 0.0]])
    table = NeighborTable(ids, sims, torch.ones(3, dtype=torch.bool))
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    scores = semantic_scores(probs, torch.tensor([[0, 1]]), table)
    torch.testing.assert_close(scores, torch.tensor([[0.5 + 0.25 * 0.2, 0.3 + 0.5 * 0.5]]))


@pytest.mark.parametrize("mode", ["argmax", "sample"])
@pytest.mark.parametrize("arm", ARMS)
def test_select_equals_loop_reference(mode, arm):
    settings = [(1, 50, 1, 0.9, 1.0), (7, 1000, 5, 0.8, 0.7), (64, 5000, 20, 0.8, 0.7),
                (16, 3000, 20, 1.0, 1.3), (32, 4096, 40, 0.5, 0.5)]
    checked = ambiguous_rows = fallback_rows = 0
    for seed in range(6):
        for batch, vocab, top_k, top_p, temperature in settings:
            g = torch.Generator().manual_seed(1000 * seed + vocab)
            table = random_table(vocab, 12, content_fraction=0.97, seed=seed)
            logits = torch.randn(batch, vocab, generator=g) * 3
            u = uniforms_for(batch, seed)
            got = select_next_token(logits, table, temperature=temperature, top_k=top_k,
                                    top_p=top_p, mode=mode, arm=arm, uniforms=u)
            want, unsure = reference_select(logits, table, temperature, top_k, top_p, mode,
                                            arm, u.tolist())
            assert torch.equal(got[~unsure], want[~unsure]), (seed, batch, vocab)
            checked += batch
            ambiguous_rows += int(unsure.sum())
            top = logits.topk(top_k).indices
            fallback_rows += int((~table.content_mask[top]).any(1).sum())
    assert ambiguous_rows <= 0.02 * checked
    assert fallback_rows > 0  # the default-rule branch was exercised too


@pytest.mark.parametrize("vocab", [151_936, 151_000])
def test_select_at_full_qwen_vocabulary(vocab):
    table = random_table(vocab, 32, content_fraction=0.998, seed=5)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, vocab, generator=g) * 4
    logits[1, -40:] += 3  # winners at the end (151,000 leaves a ragged tail of 88 tokens)
    u = uniforms_for(3, 9)
    for mode in ("argmax", "sample"):
        for arm in ARMS:
            got = select_next_token(logits, table, temperature=0.7, top_k=20, top_p=0.8,
                                    mode=mode, arm=arm, uniforms=u)
            want, unsure = reference_select(logits, table, 0.7, 20, 0.8, mode, arm, u.tolist())
            assert not unsure.any() and torch.equal(got, want)


def test_score_ties_go_to_the_more_probable_candidate():
    vocab = 40
    table = random_table(vocab, 4, content_fraction=1.0, seed=1)
    table.ids[7] = table.ids[3]  # identical rows: identical scores for tokens 3 and 7
    table.sims[7] = table.sims[3]
    logits = torch.full((2, vocab), -10.0)
    logits[0, 3], logits[0, 7] = 2.0, 1.0
    logits[1, 3], logits[1, 7] = 1.0, 2.0
    got = select_next_token(logits, table, temperature=1.0, top_k=2, top_p=1.0,
                            uniforms=uniforms_for(2, 0))
    assert got.tolist() == [3, 7]


def test_semsam_falls_back_to_the_baseline_draw_with_the_same_keys():
    vocab, batch = 500, 32
    table = random_table(vocab, 8, content_fraction=1.0, seed=2)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(batch, vocab, generator=g) * 2
    # every row's top candidate is a non-content token: the default rule must decide
    top1 = logits.argmax(1)
    table.content_mask[top1] = False
    kwargs = {"temperature": 0.8, "top_k": 10, "top_p": 0.9, "uniforms": uniforms_for(batch, 4)}
    for mode in ("argmax", "sample"):
        semsam = select_next_token(logits, table, mode=mode, arm="semsam", **kwargs)
        baseline = select_next_token(logits, table, mode=mode, arm="baseline", **kwargs)
        assert torch.equal(semsam, baseline)
    table.content_mask[:] = True  # and with all-content candidates SemSam does differ somewhere
    semsam = select_next_token(logits, table, arm="semsam", **kwargs)
    assert not torch.equal(semsam, baseline)


def test_greedy_arm_takes_the_most_probable_token_whatever_the_draws_and_table():
    vocab = 3000
    logits = torch.randn(16, vocab, generator=torch.Generator().manual_seed(8)) * 3
    rule = {"temperature": 0.7, "top_k": 20, "top_p": 0.8}
    a = select_next_token(logits, random_table(vocab, 8, 1.0, seed=1), arm="greedy",
                          uniforms=uniforms_for(16, 1), **rule)
    b = select_next_token(logits, None, arm="greedy", uniforms=uniforms_for(16, 2), **rule)
    assert torch.equal(a, logits.argmax(1)) and torch.equal(b, a)
    baseline = select_next_token(logits, None, arm="baseline", uniforms=uniforms_for(16, 1),
                                 **rule)
    assert not torch.equal(baseline, a)  # the baseline draws, the greedy control does not


def test_mixed_arm_batch_equals_each_arm_alone():
    vocab, batch = 2000, 30
    table = random_table(vocab, 8, content_fraction=0.98, seed=6)
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(6)) * 3
    u = uniforms_for(batch, 6)
    arms = [ARMS[i % 3] for i in range(batch)]
    rule = {"temperature": 0.7, "top_k": 20, "top_p": 0.8}
    for mode in ("argmax", "sample"):
        mixed = select_next_token(logits, table, mode=mode, arm=arm_codes(arms), uniforms=u,
                                  **rule)
        for arm in ARMS:
            alone = select_next_token(logits, table, mode=mode, arm=arm, uniforms=u, **rule)
            rows = torch.tensor([a == arm for a in arms])
            assert torch.equal(mixed[rows], alone[rows]), (mode, arm)
    # without a table, the baseline and greedy rows of a mixed batch still decide
    codes = arm_codes([ARMS[i % 2] for i in range(batch)])
    no_table = select_next_token(logits, None, arm=codes, uniforms=u, **rule)
    with_table = select_next_token(logits, table, arm=codes, uniforms=u, **rule)
    assert torch.equal(no_table, with_table)


def test_a_row_decides_the_same_alone_or_in_any_batch():
    vocab = 300
    table = random_table(vocab, 6, content_fraction=0.9, seed=3)
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(3))
    seeds, steps = torch.tensor([11, 12, 13, 14, 15]), torch.tensor([0, 3, 3, 9, 1])
    rule = {"temperature": 1.0, "top_k": 30, "top_p": 0.95, "mode": "sample"}
    batch = select_next_token(logits, table, uniforms=keyed_uniforms(seeds, steps), **rule)
    alone = [select_next_token(logits[i:i + 1], table,
                               uniforms=keyed_uniforms(seeds[i:i + 1], steps[i:i + 1]), **rule)
             for i in range(5)]
    order = torch.tensor([3, 0, 4, 2, 1])  # a shuffled batch
    shuffled = select_next_token(logits[order], table,
                                 uniforms=keyed_uniforms(seeds[order], steps[order]), **rule)
    assert batch.tolist() == torch.cat(alone).tolist() == shuffled[order.argsort()].tolist()


def test_half_precision_logits_use_fp32_maths():
    vocab = 2000
    table = random_table(vocab, 8, content_fraction=1.0, seed=4)
    logits = (torch.randn(16, vocab, generator=torch.Generator().manual_seed(4)) * 3)
    u = uniforms_for(16, 1)
    for dtype in (torch.bfloat16, torch.float16):
        low = logits.to(dtype)
        a = select_next_token(low, table, temperature=0.7, top_k=20, top_p=0.8, mode="sample",
                              uniforms=u)
        b = select_next_token(low.float(), table, temperature=0.7, top_k=20, top_p=0.8,
                              mode="sample", uniforms=u)
        assert torch.equal(a, b)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": 0.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p"),
    ({"mode": "greedy"}, "mode"), ({"arm": "control"}, "arm"),
    ({"uniforms": torch.rand(3)}, "uniform"), ({"arm": torch.tensor([0, 1])}, "arm codes")])
def test_bad_parameters_are_rejected(kwargs, field):
    table = random_table(10, 2, 1.0, seed=0)
    params = {"temperature": 1.0, "top_k": 3, "top_p": 0.9, "mode": "argmax", **kwargs}
    with pytest.raises(ValueError, match=field):
        select_next_token(torch.randn(1, 10), table, **params)


def test_semsam_arm_without_a_table_is_an_error():
    with pytest.raises(ValueError, match="neighbour table"):
        select_next_token(torch.randn(1, 10), None, temperature=1.0, top_k=3, top_p=0.9)


def test_one_hot_logits_leave_one_finite_entry_per_row():
    out = one_hot_logits(torch.randn(3, 8), torch.tensor([5, 0, 7]))
    assert (torch.isfinite(out).sum(1) == 1).all() and out.argmax(1).tolist() == [5, 0, 7]


def test_the_rule_and_the_inference_protocol_name_the_same_arms():
    from mislib.inference.protocol import ARMS as PROTOCOL_ARMS

    assert ARMS == PROTOCOL_ARMS
