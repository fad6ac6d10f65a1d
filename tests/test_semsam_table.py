"""MIS-SemSam tables: the content-token mask, the kNN table build, its cache and file format."""

from __future__ import annotations

import math

import pytest
import torch

from mislib.semsam.table import (
    NeighborTable,
    build_neighbor_table,
    cached_neighbor_table,
    content_token_mask,
    table_key,
)


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
