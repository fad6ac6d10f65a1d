# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
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
import time
import warnings

import matplotlib.pyplot as plt
import pandas as pd
import torch

from mislib import semsam
from mislib.config import stage_params
from mislib.paths import figure_path, project_paths

params = stage_params(profile, "semsam", k=k, temperature=temperature, top_k=top_k,
                      top_p=top_p)
rounds = timing_rounds or (5 if params["profile"] == "demo" else 30)
# Some neighbours are CJK or Cyrillic tokens that the default font draws as boxes.
warnings.filterwarnings("ignore", message="Glyph .* missing from font")
params

# %% [markdown]
# ## A neighbour table on real token embeddings
#
# Content tokens are the tokenizer's regular vocabulary: special and added tokens, control
# markers and embedding rows beyond the tokenizer are left out (for Qwen3-VL that drops
# ids ≥ 151,643, `<think>` included). The table is cached on disk under a hash of the
# embeddings, `k` and the mask.

# %%
embeddings, tokenizer = semsam.load_wordllama()
mask = semsam.content_token_mask(tokenizer, embeddings.shape[0])
cache_dir = project_paths().cache / "semsam"
key = semsam.table_key(embeddings, mask, params["k"])
if force:
    (cache_dir / f"{key}.safetensors").unlink(missing_ok=True)
t0 = time.perf_counter()
table = semsam.cached_neighbor_table(embeddings, mask, params["k"], cache_dir=cache_dir)
print(f"{int(mask.sum()):,} content tokens of {embeddings.shape[0]:,}; "
      f"table {tuple(table.ids.shape)} ready in {time.perf_counter() - t0:.1f} s; key {table.key}")

# %% [markdown]
# ## Neighbourhoods of direction words
#
# The eight words the benchmark's answers use. Each row lists a word's nearest content
# tokens and their cosines (the word itself first, cosine 1).

# %%
words = ["superior", "inferior", "left", "right", "anterior", "posterior", "above", "below"]


def token_id(word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False).ids
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens in this vocabulary")
    return ids[0]


def neighbourhood(word: str, n: int = 10) -> pd.DataFrame:
    tid = token_id(word)
    return pd.DataFrame({"word": word, "rank": range(n),
                         "neighbour": [tokenizer.id_to_token(int(i)) for i in table.ids[tid, :n]],
                         "cosine": table.sims[tid, :n].numpy()})


hoods = pd.concat([neighbourhood(w) for w in words], ignore_index=True)
hoods.pivot(index="rank", columns="word", values="neighbour")[words]

# %%
fig, axes = plt.subplots(2, 4, figsize=(13, 6), sharex=True)
for ax, word in zip(axes.flat, words, strict=True):
    rows = hoods[(hoods.word == word) & (hoods["rank"] > 0)].iloc[::-1]
    # "▁" marks a token that starts a word; shown as "_" ("_left" and "Left" differ)
    ax.barh(range(len(rows)), rows.cosine, color="tab:blue")
    ax.set_yticks(range(len(rows)), rows.neighbour.str.replace("▁", "_", regex=False))
    ax.set_title(word)
    ax.set_xlim(0, 1)
for ax in axes[1]:
    ax.set_xlabel("cosine similarity")
fig.suptitle(f"Nearest content tokens in WordLlama's Llama-2 embeddings (k = {params['k']})")
fig.tight_layout()
fig.savefig(figure_path("05_semsam", "neighbourhoods"), dpi=150)
fig.savefig(figure_path("05_semsam", "neighbourhoods", suffix=".pdf"))

# %% [markdown]
# Direction words sit next to their synonyms and their morphological variants, and often
# next to their antonyms too (*left*/*right* share contexts). Negative cosines never add
# to a score; a neighbourhood that holds an antonym adds that antonym's probability, which
# is why the rule works on the *candidates' own* distribution rather than on any fixed
# synonym list.
#
# ## One decode step where re-scoring changes the choice
#
# A hand-made next-token distribution for *"The liver lies ___ the diaphragm"*: *above* is
# the single most probable token, but *below*, *beneath*, *under* and *inferior* together
# hold more mass.

# %%
step_logits = torch.full((1, embeddings.shape[0]), -4.0)
for word, logit in {"above": 3.0, "below": 2.7, "beneath": 2.4, "under": 2.3,
                    "inferior": 2.0, "over": 1.2, "superior": 0.8, "near": 1.0}.items():
    step_logits[0, token_id(word)] = logit
rule = {"temperature": params["temperature"], "top_k": params["top_k"],
        "top_p": params["top_p"]}
probs = torch.softmax(step_logits / rule["temperature"], dim=-1)
cand = probs.topk(rule["top_k"]).indices
scores = semsam.semantic_scores(probs, cand, table)
step = pd.DataFrame({"token": [tokenizer.id_to_token(int(i)) for i in cand[0]],
                     "p": probs[0, cand[0]].numpy(), "score": scores[0].numpy()})
picked = semsam.select_next_token(step_logits, table, mode="argmax", **rule)
most_probable = tokenizer.id_to_token(int(probs.argmax()))
print(f"most probable: {most_probable!r}; SemSam (argmax): "
      f"{tokenizer.id_to_token(int(picked))!r}")
step.head(10)

# %%
top = step.head(8)
fig, ax = plt.subplots(figsize=(8, 3.5))
x = range(len(top))
ax.bar([i - 0.2 for i in x], top.p / top.p.sum(), width=0.4, label="p (renormalised)")
ax.bar([i + 0.2 for i in x], top.score / top.score.sum(), width=0.4,
       label="neighbourhood score (normalised)")
ax.set_xticks(list(x), top.token.str.replace("▁", "", regex=False))
ax.set_ylabel("share")
ax.legend()
ax.set_title(f"One step: p picks {most_probable.lstrip('▁')!r}, SemSam picks "
             f"{tokenizer.id_to_token(int(picked)).lstrip('▁')!r}")
fig.tight_layout()
fig.savefig(figure_path("05_semsam", "decode_step"), dpi=150)
fig.savefig(figure_path("05_semsam", "decode_step", suffix=".pdf"))

# %% [markdown]
# The score of *below* collects the probability of *beneath*, *under* and *inferior*
# (its neighbours), while *above* has fewer probable neighbours, so the rule emits
# *below*. Only the candidates' neighbours are read: one gather of `|I| × k` entries.
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
timing = pd.DataFrame(semsam.time_decode_step(rounds=rounds))
wide = timing.pivot(index="batch", columns="method", values="median_ms")
wide["argmax / chain"] = wide.semsam_argmax / wide.transformers_chain
wide["argmax / softmax+argmax"] = wide.semsam_argmax / wide.softmax_argmax
wide.round(3)

# %%
fig, ax = plt.subplots(figsize=(8, 4))
methods = ["transformers_chain", "softmax_argmax", "semsam_argmax", "semsam_sample"]
width = 0.2
for i, method in enumerate(methods):
    ax.bar([b + (i - 1.5) * width for b in range(len(wide))], wide[method], width=width,
           label=method.replace("_", " "))
ax.set_xticks(range(len(wide)), [f"B = {b}" for b in wide.index])
ax.set_yscale("log")
ax.set_ylabel("median ms per decode step (CPU)")
ax.set_title("Decode-step cost at V = 151,936")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(figure_path("05_semsam", "overhead"), dpi=150)
fig.savefig(figure_path("05_semsam", "overhead", suffix=".pdf"))

# %% [markdown]
# SemSam costs a small multiple of softmax + argmax and a fraction of the stock sampling
# chain, so the SemSam arm of notebook 04 runs at the baseline's speed. Timings on a
# shared CPU are noisy; the medians above come from round-robin rounds in which every
# method meets the same load.
