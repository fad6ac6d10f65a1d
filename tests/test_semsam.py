"""MIS-SemSam: content mask, neighbour tables, the batched decode rule and the processor."""

from __future__ import annotations

import math

import pytest
import torch

from mislib.semsam import (
    NeighborTable,
    SemSamLogitsProcessor,
    build_neighbor_table,
    cached_neighbor_table,
    content_token_mask,
    select_next_token,
    semantic_scores,
    table_key,
)

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


def reference_select(logits, table, temperature, top_k, top_p, mode, rescore, u, tol=1e-5):
    """Plain loop over rows and candidates, in float64, straight from the rule's text.

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

        if rescore and all(content[c] for c in kept):
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


def brute_force_knn(emb, mask, k):
    """float64 cosine kNN among the masked rows, the token itself first."""
    content = mask.nonzero().squeeze(1)
    x = emb[content].double()
    x = x / x.norm(dim=1, keepdim=True)
    sim = x @ x.T
    sim.fill_diagonal_(math.inf)
    vals, pos = sim.topk(k, dim=1)
    vals[:, 0] = 1.0
    return content, content[pos], vals


# --------------------------------------------------------------------------------------
# content mask
# --------------------------------------------------------------------------------------


def test_content_mask_on_real_qwen_tokenizer_keeps_only_regular_bpe():
    pytest.importorskip("dashscope")
    from mislib.qwen_tokenizer import (
        N_REGULAR_TOKENS,
        QWEN3_VL_EMBEDDING_ROWS,
        build_qwen_tokenizer,
    )

    tok = build_qwen_tokenizer()
    mask = content_token_mask(tok, QWEN3_VL_EMBEDDING_ROWS)
    assert mask.shape == (151_936,) and mask.dtype == torch.bool
    assert mask[:N_REGULAR_TOKENS].all()
    assert not mask[N_REGULAR_TOKENS:].any()  # special, added (<think>), padding rows
    think, image_pad = tok.convert_tokens_to_ids(["<think>", "<|image_pad|>"])
    assert not mask[think] and not mask[image_pad]
    assert mask[tok.convert_tokens_to_ids("Ġleft")]


def test_content_mask_drops_special_added_control_and_rows_beyond_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "left": 1, "right": 2, "<|image_pad|>": 3, "above": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.add_special_tokens(["<s>"])   # id 5, special
    backend.add_tokens(["<think>"])       # id 6, added but not special
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    mask = content_token_mask(tok, 9)
    assert mask.tolist() == [False, True, True, False, True, False, False, False, False]
    # a raw tokenizers.Tokenizer works too (its unk token is not flagged, so it is kept)
    assert content_token_mask(backend, 4).tolist() == [True, True, True, False]


# --------------------------------------------------------------------------------------
# neighbour tables
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("margin", "block"), [(16, 128), (0, 100), (16, 4096)])
def test_table_equals_brute_force(margin, block):
    g = torch.Generator().manual_seed(margin + block)
    emb = torch.randn(600, 24, generator=g)
    mask = torch.rand(600, generator=g) < 0.9
    table = build_neighbor_table(emb, mask, 8, margin=margin, block_size=block, progress=False)
    content, ref_ids, ref_sims = brute_force_knn(emb, mask, 8)
    torch.testing.assert_close(table.sims[content].double(), ref_sims, atol=2e-6, rtol=0)
    same = table.ids[content] == ref_ids
    # ids may differ only where two neighbours have the same cosine (to fp32 rounding)
    tie = torch.zeros_like(same)
    tie[:, 1:-1] = ((ref_sims[:, 1:-1] - ref_sims[:, 2:]).abs() < 1e-6) | (
        (ref_sims[:, 1:-1] - ref_sims[:, :-2]).abs() < 1e-6)
    assert (same | tie).all()
    assert (table.ids[content, 0] == content).all()
    assert table.content_mask[table.ids[content]].all()  # neighbours are content tokens
    other = (~mask).nonzero().squeeze(1)
    assert (table.ids[other] == other[:, None]).all() and (table.sims[other] == 0).all()
    if margin == 0:  # nothing beyond k is kept, so every row needs the exact fallback
        assert table.meta["exact_fallback_rows"] == int(mask.sum())


def assert_table_matches(table, emb, mask, k, atol=2e-6):
    """Equal to the float64 brute force: cosines to ``atol``, ids except among ties."""
    content, ref_ids, ref_sims = brute_force_knn(emb, mask, k)
    torch.testing.assert_close(table.sims[content].double(), ref_sims, atol=atol, rtol=0)
    got = table.ids[content]
    assert (got[:, 0] == content).all()
    # the same set of neighbours above the k-th cosine (ties at the k-th may swap members)
    ref_exact = brute_force_cos(emb, content, got)
    torch.testing.assert_close(ref_exact, ref_sims, atol=atol, rtol=0)


def brute_force_cos(emb, content, ids):
    """float64 cosines between each content row and the ids listed for it."""
    x = emb.double() / emb.double().norm(dim=1, keepdim=True)
    out = (x[ids] * x[content][:, None, :]).sum(-1)
    out[:, 0] = 1.0
    return out


def test_table_on_clustered_near_duplicate_rows_across_blocks():
    """Tight clusters and exact duplicates: many near-ties, so rows need the fp32 fallback."""
    g = torch.Generator().manual_seed(11)
    centres = torch.randn(12, 64, generator=g)
    emb = centres[torch.randint(0, 12, (900,), generator=g)]
    emb = emb + 1e-3 * torch.randn(900, 64, generator=g)
    emb[100:110] = emb[5]  # exact duplicates: equal cosines
    mask = torch.ones(900, dtype=torch.bool)
    mask[::7] = False
    table = build_neighbor_table(emb, mask, 10, margin=8, block_size=96, progress=False)
    assert table.meta["exact_fallback_rows"] > 0
    assert_table_matches(table, emb, mask, 10)
    # each row's neighbours are the row's own cluster (the clusters hold ~75 rows each)
    content = mask.nonzero().squeeze(1)
    cluster = ((emb[:, None, :] - centres[None]).norm(dim=-1)).argmin(1)
    assert (cluster[table.ids[content]] == cluster[content][:, None]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_table_accepts_low_and_high_precision_embeddings(dtype):
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(400, 40, generator=g).to(dtype)
    mask = torch.rand(400, generator=g) < 0.8
    table = build_neighbor_table(emb, mask, 6, block_size=64, progress=False)
    assert_table_matches(table, emb.float(), mask, 6)


def test_table_with_a_zero_embedding_row():
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(200, 16, generator=g)
    emb[17] = 0.0
    table = build_neighbor_table(emb, torch.ones(200, dtype=torch.bool), 4, block_size=64,
                                 progress=False)
    assert table.ids[17, 0] == 17 and torch.isfinite(table.sims).all()
    others = torch.cat([torch.arange(17), torch.arange(18, 200)])
    assert not (table.ids[others] == 17).any() or (table.sims[table.ids[others] == 17] == 0).all()


def test_table_save_load_and_cache_key(tmp_path):
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(300, 16, generator=g)
    mask = torch.ones(300, dtype=torch.bool)
    mask[-5:] = False
    table = cached_neighbor_table(emb, mask, 6, cache_dir=tmp_path, progress=False)
    path = tmp_path / f"{table.key}.safetensors"
    assert path.is_file() and table.key == table_key(emb, mask, 6)
    loaded = NeighborTable.load(path)
    assert torch.equal(loaded.ids, table.ids) and torch.equal(loaded.sims, table.sims)
    assert torch.equal(loaded.content_mask, mask) and loaded.key == table.key
    again = cached_neighbor_table(emb, mask, 6, cache_dir=tmp_path)
    assert torch.equal(again.ids, table.ids)
    other_mask = mask.clone()
    other_mask[0] = False
    keys = {table.key, table_key(emb, mask, 7), table_key(emb, other_mask, 6),
            table_key(emb * 2, mask, 6), table_key(emb.half(), mask, 6)}
    assert len(keys) == 5


def test_load_names_the_broken_file(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a table")
    with pytest.raises(ValueError, match="broken.safetensors"):
        NeighborTable.load(bad)


# --------------------------------------------------------------------------------------
# the decode rule
# --------------------------------------------------------------------------------------


def test_semantic_scores_clamp_negative_cosines():
    ids = torch.tensor([[0, 1, 2], [1, 0, 2], [2, 0, 1]])
    sims = torch.tensor([[1.0, -0.5, 0.25], [1.0, 0.5, -1.0], [1.0, 0.0, 0.0]])
    table = NeighborTable(ids, sims, torch.ones(3, dtype=torch.bool))
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    scores = semantic_scores(probs, torch.tensor([[0, 1]]), table)
    torch.testing.assert_close(scores, torch.tensor([[0.5 + 0.25 * 0.2, 0.3 + 0.5 * 0.5]]))


@pytest.mark.parametrize("mode", ["argmax", "sample"])
@pytest.mark.parametrize("rescore", [True, False])
def test_select_equals_loop_reference(mode, rescore):
    settings = [(1, 50, 1, 0.9, 1.0), (7, 1000, 5, 0.8, 0.7), (64, 5000, 20, 0.8, 0.7),
                (16, 3000, 20, 1.0, 1.3), (32, 4096, 40, 0.5, 0.5)]
    checked = ambiguous_rows = fallback_rows = 0
    for seed in range(6):
        for batch, vocab, top_k, top_p, temperature in settings:
            g = torch.Generator().manual_seed(1000 * seed + vocab)
            table = random_table(vocab, 12, content_fraction=0.97, seed=seed)
            logits = torch.randn(batch, vocab, generator=g) * 3
            got = select_next_token(logits, table, temperature=temperature, top_k=top_k,
                                    top_p=top_p, mode=mode, rescore=rescore,
                                    generator=torch.Generator().manual_seed(seed))
            u = torch.rand(batch, generator=torch.Generator().manual_seed(seed)).tolist()
            want, unsure = reference_select(logits, table, temperature, top_k, top_p, mode,
                                            rescore, u)
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
    for mode in ("argmax", "sample"):
        got = select_next_token(logits, table, temperature=0.7, top_k=20, top_p=0.8,
                                mode=mode, generator=torch.Generator().manual_seed(9))
        u = torch.rand(3, generator=torch.Generator().manual_seed(9)).tolist()
        want, unsure = reference_select(logits, table, 0.7, 20, 0.8, mode, True, u)
        assert not unsure.any() and torch.equal(got, want)


def test_score_ties_go_to_the_more_probable_candidate():
    vocab = 40
    table = random_table(vocab, 4, content_fraction=1.0, seed=1)
    table.ids[7] = table.ids[3]  # identical rows: identical scores for tokens 3 and 7
    table.sims[7] = table.sims[3]
    logits = torch.full((2, vocab), -10.0)
    logits[0, 3], logits[0, 7] = 2.0, 1.0
    logits[1, 3], logits[1, 7] = 1.0, 2.0
    got = select_next_token(logits, table, temperature=1.0, top_k=2, top_p=1.0)
    assert got.tolist() == [3, 7]


def test_fallback_equals_baseline_arm_with_same_generator():
    vocab, batch = 500, 32
    table = random_table(vocab, 8, content_fraction=1.0, seed=2)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(batch, vocab, generator=g) * 2
    # every row's top candidate is a non-content token: the default rule must decide
    top1 = logits.argmax(1)
    table.content_mask[top1] = False
    kwargs = {"temperature": 0.8, "top_k": 10, "top_p": 0.9}
    for mode in ("argmax", "sample"):
        semsam = select_next_token(logits, table, mode=mode, rescore=True,
                                   generator=torch.Generator().manual_seed(4), **kwargs)
        baseline = select_next_token(logits, table, mode=mode, rescore=False,
                                     generator=torch.Generator().manual_seed(4), **kwargs)
        assert torch.equal(semsam, baseline)
    table.content_mask[:] = True  # and with all-content candidates SemSam does differ somewhere
    semsam = select_next_token(logits, table, rescore=True,
                               generator=torch.Generator().manual_seed(4), **kwargs)
    assert not torch.equal(semsam, baseline)


def test_per_row_generators_make_rows_independent_of_the_batch():
    vocab = 300
    table = random_table(vocab, 6, content_fraction=0.9, seed=3)
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(3))
    seeds = [11, 12, 13, 14, 15]
    batch = select_next_token(logits, table, temperature=1.0, top_k=30, top_p=0.95,
                              mode="sample",
                              generator=[torch.Generator().manual_seed(s) for s in seeds])
    alone = [select_next_token(logits[i:i + 1], table, temperature=1.0, top_k=30, top_p=0.95,
                               mode="sample", generator=[torch.Generator().manual_seed(s)])
             for i, s in enumerate(seeds)]
    assert batch.tolist() == torch.cat(alone).tolist()
    with pytest.raises(ValueError, match="generators"):
        select_next_token(logits, table, temperature=1.0, top_k=3, top_p=1.0,
                          generator=[torch.Generator()])


def test_half_precision_logits_use_fp32_maths():
    vocab = 2000
    table = random_table(vocab, 8, content_fraction=1.0, seed=4)
    logits = (torch.randn(16, vocab, generator=torch.Generator().manual_seed(4)) * 3)
    for dtype in (torch.bfloat16, torch.float16):
        low = logits.to(dtype)
        a = select_next_token(low, table, temperature=0.7, top_k=20, top_p=0.8, mode="sample",
                              generator=torch.Generator().manual_seed(1))
        b = select_next_token(low.float(), table, temperature=0.7, top_k=20, top_p=0.8,
                              mode="sample", generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": 0.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p"),
    ({"mode": "greedy"}, "mode")])
def test_bad_parameters_are_rejected(kwargs, field):
    table = random_table(10, 2, 1.0, seed=0)
    params = {"temperature": 1.0, "top_k": 3, "top_p": 0.9, "mode": "argmax", **kwargs}
    with pytest.raises(ValueError, match=field):
        select_next_token(torch.randn(1, 10), table, **params)
    with pytest.raises(ValueError, match=field):
        SemSamLogitsProcessor(table, params["temperature"], params["top_k"], params["top_p"],
                              params["mode"], True, seed=0)


# --------------------------------------------------------------------------------------
# the transformers processor
# --------------------------------------------------------------------------------------


def test_processor_returns_one_finite_token_per_row():
    table = random_table(100, 4, 1.0, seed=6)
    proc = SemSamLogitsProcessor(table, 0.7, 10, 0.8, "argmax", True, seed=[1, 2, 3])
    out = proc(torch.zeros(3, 4, dtype=torch.long), torch.randn(3, 100))
    assert (torch.isfinite(out).sum(1) == 1).all()


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


@pytest.mark.parametrize(("mode", "rescore"), [("argmax", True), ("sample", True),
                                               ("argmax", False)])
def test_generate_with_processor_equals_manual_decode_loop(tiny_qwen3_vl, mode, rescore):
    from transformers import LogitsProcessorList

    model = tiny_qwen3_vl
    vocab = model.config.text_config.vocab_size
    table = random_table(vocab, 16, content_fraction=0.999, seed=7)
    prompt = torch.randint(0, 151_000, (3, 6), generator=torch.Generator().manual_seed(7))
    seeds = [101, 102, 103]
    rule = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "mode": mode, "rescore": rescore}
    proc = SemSamLogitsProcessor(table, seed=seeds, **rule)
    with torch.no_grad():
        generated = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
            do_sample=False, temperature=None, top_k=None, top_p=None, use_cache=False,
            logits_processor=LogitsProcessorList([proc]), eos_token_id=None,
            pad_token_id=151643)
        seq = manual_decode(model, prompt, table, seeds, 5, rule)
        assert torch.equal(generated, seq)
        if rescore and mode == "argmax":  # the re-scoring branch really decided something
            baseline = manual_decode(model, prompt, table, seeds, 5, {**rule, "rescore": False})
            assert not torch.equal(seq, baseline)


def manual_decode(model, prompt, table, seeds, steps, rule):
    """Greedy-style loop calling select_next_token on the last position's logits."""
    seq = prompt
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    for _ in range(steps):
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1]
        token = select_next_token(logits.float(), table, generator=generators, **rule)
        seq = torch.cat([seq, token[:, None]], 1)
    return seq
