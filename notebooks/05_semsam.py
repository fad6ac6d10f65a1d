# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: MIS-Ground (mislib)
#     language: python
#     name: mis-ground
# ---

# %% [markdown]
# # 05 · MIS-SemSam: re-scoring a token by its neighbourhood
#
# A model that hesitates between *below*, *inferior*, *under* and *above* may give the
# single largest probability to *above* while most of its mass sits on words that mean
# *below*. MIS-SemSam is a training-free decode-time rule that looks at that mass. Once per
# model, it stores each content token's `k` nearest neighbours in the input-embedding
# space (cosine, the token itself included). At each step, among the usual top-k/top-p
# candidates `I` of `p = softmax(z / T)`, it scores
#
# $$\mathrm{score}(c) = \sum_{j=1}^{k} \max(0, S_\mathrm{val}[c, j])\; p\big(S_\mathrm{tid}[c, j]\big)$$
#
# and emits `argmax score` (ties to the more probable candidate) — or, in the sampling
# variant, draws proportionally to the scores. If any candidate is not a content token
# (end of turn, a control marker), the default rule decides: a draw from `p` restricted
# to `I`. The **baseline arm** of notebook 04 is the same code with re-scoring off and the
# same per-(question, trial) random streams, so the two arms differ only in the rule.
#
# This notebook shows the rule on **real** LLM token embeddings (the 32,000-token Llama-2
# embedding matrix that ships with the `wordllama` package), and what it costs per step.

# %% tags=["parameters"]
profile = "demo"
force = False
k = None            # neighbours per token (None: [semsam] k of the profile)
temperature = None
top_k = None
top_p = None
timing_rounds = None  # rounds of the decode-step timing (None: 5 for demo, 30 otherwise)

# %%
from mislib import explain
from mislib.config import stage_params
from mislib.plots import save_figure
from mislib.provenance import Provenance

NOTEBOOK = "05_semsam"
params = stage_params(profile, "semsam", k=k, temperature=temperature, top_k=top_k,
                      top_p=top_p)
rule = {"temperature": params["temperature"], "top_k": params["top_k"],
        "top_p": params["top_p"]}
rounds = timing_rounds or (5 if params["profile"] == "demo" else 30)
params

# %% [markdown]
# ## A neighbour table on real token embeddings
#
# Content tokens are the tokenizer's regular vocabulary: special and added tokens, control
# markers and embedding rows beyond the tokenizer are left out (for Qwen3-VL that drops
# ids ≥ 151,643, `<think>` included). The table is cached on disk under a hash of the
# embeddings, `k` and the mask.

# %%
table, tokenizer, seconds = explain.wordllama_table(params["k"], force=force)
print(f"{int(table.content_mask.sum()):,} content tokens of {table.num_embeddings:,}; "
      f"table {tuple(table.ids.shape)} ready in {seconds:.1f} s; key {table.key}")
# No model answered here: the stamp names the profile, the embeddings and k.
provenance = Provenance.from_profile(
    profile, {"content tokens of WordLlama's Llama-2 vocabulary": int(table.content_mask.sum()),
              "neighbours per token (k)": table.k})

# %% [markdown]
# ## Neighbourhoods of direction words
#
# The eight words the benchmark's answers use, each with the `k` neighbours the rule reads
# for it (the table's `k`, from the profile's `[semsam] k`): the word itself first
# (cosine 1), then its nearest content tokens. `antonym` marks a neighbour that is the
# word's antonym in a small curated list (`explain.ANTONYM_PAIRS`: left/right,
# superior/inferior, anterior/posterior, medial/lateral, above/below, true/false, …).

# %%
hoods = explain.neighbourhoods(table, tokenizer)
print(f"k = {table.k}: the {table.k - 1} nearest content tokens besides the word itself")
hoods[hoods["antonym"]]

# %%
hoods.pivot(index="rank", columns="word", values="neighbour")[list(explain.DIRECTION_WORDS)]

# %%
fig = explain.neighbourhood_figure(hoods, table.k)
save_figure(fig, "neighbourhoods", notebook=NOTEBOOK, provenance=provenance)
fig

# %% [markdown]
# Direction words sit next to their synonyms and their morphological variants, and several
# next to their antonyms (red): *superior*/*inferior*, *anterior*/*posterior* and
# *above*/*below* are each other's nearest or near neighbours, because they share contexts.
# Every neighbour with a positive cosine adds its probability to the word's score, an
# antonym as much as a synonym; negative cosines add nothing. That is why the rule works on
# the *candidates' own* distribution rather than on any fixed synonym list, and why a
# neighbourhood holding an antonym can let the rule pick against the evidence. Tokens in
# other scripts (Cyrillic, CJK, Hangul) are drawn with DejaVu Sans and Noto Sans CJK
# (`explain.token_fonts`); a character no installed font draws would be named under the
# figure.
#
# ## One decode step where re-scoring changes the choice
#
# A hand-made next-token distribution for *"The liver lies ___ the diaphragm"*: *above* is
# the single most probable token, but *below*, *beneath*, *under* and *inferior* together
# hold more mass. The table is the rule's own computation, nothing re-implemented: the
# `top_k` tokens of `mislib.semsam.candidates` with `candidate` marking the set `I` that
# top-p keeps, `content` whether the table re-scores the token, its probability `p` and
# neighbourhood score (`mislib.semsam.semantic_scores`), and the token
# `mislib.semsam.select_next_token` picks in each arm, all three with the same keyed random
# number.

# %%
step = explain.decode_step(explain.example_logits(tokenizer, table.num_embeddings), table,
                           tokenizer.id_to_token, **rule)
step.head(10)

# %%
fig = explain.decode_step_figure(step)
save_figure(fig, "decode_step", notebook=NOTEBOOK, provenance=provenance)
fig

# %% [markdown]
# The score of *below* collects the probability of *beneath*, *under* and *inferior*
# (its neighbours; a neighbour counts whether or not it is itself a candidate), while
# *above* has fewer probable neighbours, so the `semsam` arm emits
# *below* where `greedy` emits *above* and `baseline` draws from the candidates. Only the
# candidates' neighbours are read: one gather of `|I| × k` entries.
#
# ## What it costs per step
#
# One decode step at Qwen3-VL's vocabulary (151,936 tokens), top-k 20, top-p 0.8, against
# transformers' own sampling chain (Temperature → TopK → TopP warpers, softmax,
# multinomial; TopP sorts the whole vocabulary) and against a bare softmax + argmax, the
# floor any selection rule pays. The rule never materialises `p`: the top-k is found from
# block maxima, and every decision is invariant to the softmax normaliser, so only the
# candidates' and their neighbours' logits are exponentiated. `make bench ONLY=semsam`
# runs the same timing with more rounds, plus the table-build benchmark.

# %%
wide = explain.decode_timing(rounds)
wide.round(3)

# %%
fig = explain.overhead_figure(wide)
save_figure(fig, "overhead", notebook=NOTEBOOK, provenance=provenance)
fig

# %% [markdown]
# SemSam costs a small multiple of softmax + argmax and a fraction of the stock sampling
# chain, so the SemSam arm of notebook 04 runs at the baseline's speed. Timings on a
# shared CPU are noisy; the medians above come from round-robin rounds in which every
# method meets the same load.
