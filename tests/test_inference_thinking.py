"""mislib.inference.thinking: thinking models under a fixed reasoning budget (budget forcing),
on the hf backend with the smoke thinking model, through the runner, and on vllm."""

from __future__ import annotations

import copy
import json
import sys

import pandas as pd
import pytest
import torch
from test_inference import _new_root, seeded_table  # noqa: F401  (the module's table fixture)
from test_inference_vllm import (
    ENGINE_OPTIONS,
    generate_on_both_backends,
    require_vllm,
)

from mislib.answers import parse_answer
from mislib.config import load_profile
from mislib.inference import run_inference, store
from mislib.inference.protocol import DecodeSettings, Request
from mislib.inference.thinking import (
    FORCED_SUFFIX,
    PhaseTwo,
    cut_at_stop,
    generated_counts,
    plan_phase_two,
    prompt_opens_think,
    thinking_split,
)
from mislib.smoke import SMOKE_MODEL_ID, SMOKE_THINKING_MODEL_ID

OPEN, CLOSE, EOS = 10, 11, 2
QUESTION = {"family": "relation_2d", "form": "closed_true", "terminology": "anatomical",
            "choices": ["True", "False"], "answer": "True"}
ASK = "Is A above B? End your reply with a line 'Answer: True' or 'Answer: False'."


# ------------------------------------------------------------------ the plan (pure)
@pytest.mark.parametrize(("tokens", "opened", "action", "append", "max_tokens"), [
    ([5, 6, EOS], True, "done", (), 0),            # ended its turn inside the budget
    ([5, CLOSE], True, "answer", (), 8),          # closed the block: its own answer follows
    ([5, 6, 7, 8], True, "force", (CLOSE, 99), 3),  # budget spent inside the block
    ([OPEN, 6, 7, 8], False, "force", (CLOSE, 99), 3),  # a block the model opened itself
    ([5, 6, 7, 8], False, "rest", (), 4),         # no block at all: the rest of the answer
])
def test_the_second_phase_follows_from_where_the_first_stopped(tokens, opened, action,
                                                               append, max_tokens):
    plan = plan_phase_two(tokens, budget=4, eos_ids=[EOS], markers=(OPEN, CLOSE),
                          opened_in_prompt=opened, max_new_tokens=8, forced_answer_tokens=3,
                          suffix=[CLOSE, 99])
    assert (plan.action, plan.append, plan.max_tokens) == (action, append, max_tokens)
    assert plan.forced == (action == "force")


@pytest.mark.parametrize(("tokens", "opened", "action", "keep"), [
    ([5, 6, 7, 8, 9, 1, 3, 4, 5, 6], False, "done", 4),  # no block: cut to max_new_tokens
    ([5, 6, 7, 8, 9, EOS], False, "done", 4),            # ended its turn past it: cut too
    ([5, 6, EOS], False, "done", None),                  # within it: kept whole
    ([5, 6, 7, 8, 9, 1, 3, 4, 5, 6], True, "force", None),  # a block the prompt opened
    ([5, OPEN, 7, 8, 9, 1, 3, 4, 5, 6], False, "force", None),  # one the model opened
])
def test_a_generation_without_a_block_never_exceeds_max_new_tokens(tokens, opened, action,
                                                                    keep):
    # a budget above max_new_tokens: a model that opens no block must not answer at length
    plan = plan_phase_two(tokens, budget=10, eos_ids=[EOS], markers=(OPEN, CLOSE),
                          opened_in_prompt=opened, max_new_tokens=4, forced_answer_tokens=3,
                          suffix=[CLOSE, 99])
    assert (plan.action, plan.keep) == (action, keep)
    assert plan.kept(tokens) == (tokens if keep is None else tokens[:keep])
    if not (opened or OPEN in tokens):
        assert len(plan.kept(tokens)) + plan.max_tokens <= 4


def test_the_counts_are_of_generated_tokens_never_the_appended_suffix():
    forced = PhaseTwo("force", (CLOSE, 99, 98), 3)
    assert generated_counts([5, 6, 7, 8], forced, [21, EOS], (OPEN, CLOSE), True) == (4, 2)
    closed = PhaseTwo("answer", (), 8)
    assert generated_counts([5, CLOSE], closed, [31, EOS], (OPEN, CLOSE), True) == (2, 2)
    assert generated_counts([5, 6], PhaseTwo("rest", (), 2), [7, EOS], (OPEN, CLOSE),
                            False) == (0, 4)


def test_thinking_runs_to_the_first_close_and_an_unclosed_block_is_all_thinking():
    assert thinking_split([5, 6, CLOSE, 7, EOS], (OPEN, CLOSE), True) == (3, 2)
    assert thinking_split([5, 6, 7], (OPEN, CLOSE), True) == (3, 0)
    assert thinking_split([5, 6, 7], (OPEN, CLOSE), False) == (0, 3)
    assert cut_at_stop([5, CLOSE, 0, 0], [CLOSE, EOS]) == [5, CLOSE]


def test_a_prompt_that_opens_the_block_is_recognised():
    assert prompt_opens_think("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_think("<|im_start|>assistant\n")


def test_a_closed_think_block_and_a_forced_answer_line_parse_as_before():
    assert parse_answer("<think>maybe False</think>\nAnswer: True", QUESTION) == ("True", "ok")
    # the prompt opened the block: the output holds its end only, forced or not
    assert parse_answer("A is higher, so" + FORCED_SUFFIX + " True", QUESTION) == ("True", "ok")
    assert parse_answer("Answer: False, hmm" + FORCED_SUFFIX + " True", QUESTION) == \
        ("True", "ok")
    # still open (no budget forcing): no answer
    assert parse_answer("<think>Answer: True", QUESTION)[1] == "unparseable"


def test_semsam_draws_of_a_continued_sequence_are_keyed_past_the_first_phase():
    from mislib.semsam import SemSamLogitsProcessor

    scores = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    seeds = list(range(100, 106))
    rule = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "mode": "sample", "arm": "baseline"}
    plain = SemSamLogitsProcessor(None, **rule, seed=seeds)
    plain(torch.zeros(6, 10, dtype=torch.long), scores)  # step 0 fixes the prompt length
    at_step_5 = plain(torch.zeros(6, 15, dtype=torch.long), scores).argmax(1)
    continued = SemSamLogitsProcessor(None, **rule, seed=seeds, step_offset=[5] * 6)
    first_of_continuation = continued(torch.zeros(6, 15, dtype=torch.long), scores).argmax(1)
    fresh = SemSamLogitsProcessor(None, **rule, seed=seeds)
    at_step_0 = fresh(torch.zeros(6, 15, dtype=torch.long), scores).argmax(1)
    assert torch.equal(first_of_continuation, at_step_5)
    assert not torch.equal(at_step_0, at_step_5)  # so the offset is what made them equal


# ------------------------------------------------------------------ the hf backend
@pytest.fixture(scope="module")
def thinking_hf(smoke_root, seeded_table):  # noqa: F811
    from mislib.inference.registry import load_backend
    from mislib.inference.runner import semsam_table

    backend = load_backend("hf", SMOKE_THINKING_MODEL_ID, root=smoke_root, device="cpu")
    table, path = semsam_table(backend, load_profile("demo")["semsam"]["k"], root=smoke_root,
                               progress=False)
    return backend, str(path)


def _decode(path, **kw):
    base = {"arm": "semsam", "temperature": 0.7, "top_k": 20, "top_p": 0.8,
            "max_new_tokens": 6, "table_path": path}
    return DecodeSettings(**{**base, **kw})


def test_the_smoke_thinking_model_opens_a_think_block_in_its_prompt(thinking_hf):
    backend, _ = thinking_hf
    prompt = backend.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "x"}]}], tokenize=False,
        add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")


def test_hf_budget_forcing_closes_the_block_and_records_the_counts(thinking_hf):
    from PIL import Image

    backend, path = thinking_hf
    requests = [Request("q1", t, 1000 + t, ASK, Image.new("RGB", (48, 48)) if t else None)
                for t in range(3)]
    budget, forced_tokens = 5, 3
    out = backend.generate(requests, _decode(path, reasoning_budget=budget,
                                             forced_answer_tokens=forced_tokens))
    suffix = backend.tokenizer.encode(FORCED_SUFFIX, add_special_tokens=False)
    close = backend.tokenizer.convert_tokens_to_ids("</think>")
    # the random model never closes its block within 5 tokens: every answer is forced
    assert close in suffix
    for g in out:
        assert g.forced_answer is True
        assert "</think>\n\nAnswer:" in g.text
        assert list(g.token_ids[budget: budget + len(suffix)]) == suffix
        # the counts are of generated tokens: the appended "</think>" + "Answer:" is in
        # the ids and the text, in neither count
        assert g.thinking_tokens == budget
        assert g.answer_tokens == len(g.token_ids) - budget - len(suffix)
        assert 1 <= g.answer_tokens <= forced_tokens
        assert g.thinking_tokens + g.answer_tokens == g.n_tokens
    # the thinking part is what a plain decode of `budget` tokens gives: forcing changes
    # nothing before the budget is spent
    plain = backend.generate(requests, _decode(path, max_new_tokens=budget))
    assert [g.token_ids[:budget] for g in out] == [p.token_ids for p in plain]
    assert all(p.thinking_tokens is None and p.forced_answer is None for p in plain)


def test_hf_a_model_whose_template_opens_no_block_answers_within_max_new_tokens(
        smoke_root, seeded_table):  # noqa: F811
    """A budget (10) above max_new_tokens (3) on a model that opens no block (the plain
    smoke model's template opens none and, at these seeds, it writes no <think>): it
    answers in at most max_new_tokens tokens, exactly those of a plain capped decode."""
    from mislib.inference.registry import load_backend
    from mislib.inference.runner import semsam_table

    backend = load_backend("hf", SMOKE_MODEL_ID, root=smoke_root, device="cpu")
    _, path = semsam_table(backend, load_profile("demo")["semsam"]["k"], root=smoke_root,
                           progress=False)
    assert not prompt_opens_think(backend.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "x"}]}], tokenize=False,
        add_generation_prompt=True))
    requests = [Request("q1", t, 2000 + t, ASK) for t in range(3)]
    out = backend.generate(requests, _decode(str(path), max_new_tokens=3, reasoning_budget=10))
    plain = backend.generate(requests, _decode(str(path), max_new_tokens=3))
    think = backend.tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    assert not any(t in think for p in plain for t in p.token_ids)  # the premise: no block
    assert [g.token_ids for g in out] == [p.token_ids for p in plain]
    for g in out:
        assert g.n_tokens == len(g.token_ids) <= 3
        assert (g.thinking_tokens, g.answer_tokens, g.forced_answer) == (0, g.n_tokens, False)


# ------------------------------------------------------------------ through the runner
def _thinking_profile(budget: int):
    prof = copy.deepcopy(load_profile("demo"))
    prof["name"] = "test"
    prof["inference"].update({"max_new_tokens": 4, "batch_size": 4, "n_trials": 1,
                              "limit": 4, "models": ["smoke:think"]})
    prof["models"] = {"smoke:think": {"id": SMOKE_THINKING_MODEL_ID, "thinks": True,
                                "reasoning_budget": budget, "forced_answer_tokens": 2,
                                "semsam_mode": "sample"}}
    return prof


def test_a_thinking_entry_runs_with_its_budget_and_its_records_say_so(smoke_root, tmp_path):
    root = _new_root(tmp_path / "think", smoke_root)
    run = run_inference(_thinking_profile(3), arm="semsam", root=root, progress=False)
    frame = pd.read_parquet(run.responses)
    assert run.run_id.startswith("smoke-think-semsam-")
    assert set(frame["model"]) == {"smoke:think"}
    ok = frame[frame["status"] == "ok"]
    assert len(ok) and ok["forced_answer"].all()
    assert (ok["thinking_tokens"] == 3).all()  # the budget; the appended suffix not counted
    assert ok["answer_tokens"].between(1, 2).all()  # forced_answer_tokens = 2 at most
    assert (ok["thinking_tokens"] + ok["answer_tokens"] == ok["n_tokens"]).all()
    assert ok["raw_text"].str.contains("</think>\n\nAnswer:", regex=False).all()
    identity = json.loads((run.run_dir / "run.json").read_text())
    assert identity["decode"]["reasoning_budget"] == 3 and identity["decode"]["mode"] == "sample"
    assert identity["model_settings"] == {"id": SMOKE_THINKING_MODEL_ID}
    other = run_inference(_thinking_profile(4), arm="semsam", root=root, progress=False)
    assert other.run_id != run.run_id  # the budget changes answers: another run


def test_records_without_the_thinking_columns_still_compact(tmp_path):
    run_dir = tmp_path / "old-run"
    (run_dir / "shards").mkdir(parents=True)
    old = {k: v for k, v in store.make_record(("q1", 0), "old-run", SMOKE_MODEL_ID, "baseline",
                                              7, raw_text="Answer: True", n_tokens=3).items()
           if k not in ("thinking_tokens", "answer_tokens", "forced_answer")}
    (run_dir / "shards" / "old.jsonl").write_text(json.dumps(old) + "\n")
    frame = store.compact(run_dir)
    assert frame.loc[0, "raw_text"] == "Answer: True"
    assert frame[["thinking_tokens", "answer_tokens", "forced_answer"]].isna().all().all()
    assert str(frame["forced_answer"].dtype) == "boolean"


# ------------------------------------------------------------------ vllm, as hf does
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_vllm_budget_forcing_gives_the_hf_backends_tokens_and_counts(smoke_root, tmp_path,
                                                                     seeded_table):  # noqa: F811
    """One engine start: the same thinking requests (text and image) through both backends,
    each in a fresh process (tests/scripts/backend_generate.py)."""
    from mislib.inference.registry import resolve_model

    require_vllm()
    root = _new_root(tmp_path / "vllm_think", smoke_root, n_questions=12)
    frame = pd.read_parquet(root / "data" / "benchmark" / "questions.parquet")
    rows = frame[frame["dims"] == "2d"].head(3).to_dict("records")
    table = smoke_root / ".cache" / "semsam" / f"{seeded_table}.safetensors"
    job = {"source": resolve_model(SMOKE_THINKING_MODEL_ID, smoke_root)[0],
           "model_id": SMOKE_THINKING_MODEL_ID, "benchmark": str(root / "data" / "benchmark"),
           "arms": ["semsam"], "options": ENGINE_OPTIONS,
           "decode": {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "max_new_tokens": 6,
                      "mode": "sample", "k": 32, "table_path": str(table),
                      "table_key": table.stem, "reasoning_budget": 5,
                      "forced_answer_tokens": 3},
           "questions": [{"question_id": r["question_id"], "trial": t, "seed": 500 + t,
                          "text": r["text"], "choices": list(r["choices"]),
                          "image_path": r["image_path"], "dims": r["dims"]}
                         for r in rows for t in (0, 1)]}
    outputs = {backend: out["arms"]["semsam"] for backend, out in
               generate_on_both_backends(job, tmp_path, root).items()}
    assert outputs["vllm"] == outputs["hf"]
    assert all(g["forced_answer"] and "Answer:" in g["text"] for g in outputs["vllm"])
    # generated tokens only: the budget's 5 thinking, at most 3 after the appended suffix
    from transformers import AutoTokenizer

    suffix = AutoTokenizer.from_pretrained(job["source"]).encode(FORCED_SUFFIX,
                                                                 add_special_tokens=False)
    for g in outputs["vllm"]:
        assert g["thinking_tokens"] == 5 and 1 <= g["answer_tokens"] <= 3
        assert g["n_tokens"] == g["thinking_tokens"] + g["answer_tokens"]
        assert g["n_tokens"] == len(g["token_ids"]) - len(suffix)


# ------------------------------------------------------------------ vllm's two calls, scripted
class _Params:
    """Stands in for ``vllm.SamplingParams``: keeps what the backend asked for."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class _ScriptedLLM:
    """Stands in for ``vllm.LLM``: answers each call from a script, recording the calls."""

    def __init__(self, script):
        self.script, self.calls = list(script), []

    def generate(self, prompts, params, use_tqdm=False):
        from types import SimpleNamespace

        self.calls.append((prompts, params))
        rows = self.script.pop(0)
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, stop_reason=stop)])
                for tokens, stop in rows]


@pytest.fixture
def fake_vllm(monkeypatch):
    """The vllm backend module importable without vLLM (stand-ins for the names it imports);
    the modules imported here are dropped afterwards, so other tests see no vLLM."""
    import types

    fake = types.ModuleType("vllm")
    fake.__version__, fake.SamplingParams, fake.LLM = "0.0-test", _Params, None
    logits = types.ModuleType("vllm.v1.sample.logits_processor")
    logits.BatchUpdate, logits.LogitsProcessor = object, object
    builtin = types.ModuleType("vllm.v1.sample.logits_processor.builtin")
    builtin.process_dict_updates = None
    for name, module in {"vllm": fake, "vllm.v1": types.ModuleType("vllm.v1"),
                         "vllm.v1.sample": types.ModuleType("vllm.v1.sample"),
                         "vllm.v1.sample.logits_processor": logits,
                         "vllm.v1.sample.logits_processor.builtin": builtin}.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield
    for name in ("mislib.inference.backends.vllm", "mislib.semsam.vllm_v1"):
        sys.modules.pop(name, None)


def test_vllm_budget_forcing_continues_each_request_as_its_first_call_ended(fake_vllm,
                                                                            smoke_root):
    from mislib.inference.backends.vllm import VLLMBackend
    from mislib.inference.registry import resolve_model
    from mislib.semsam.vllm_v1 import ARM_KEY, STEP_OFFSET_KEY

    backend = VLLMBackend(resolve_model(SMOKE_THINKING_MODEL_ID, smoke_root)[0],
                          model_id=SMOKE_THINKING_MODEL_ID, device="cpu")
    tok = backend.tokenizer
    close = tok.convert_tokens_to_ids("</think>")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    suffix = tok.encode(FORCED_SUFFIX, add_special_tokens=False)
    llm = _ScriptedLLM([
        [([11, 12, 13, 14], None),     # the budget of 4 spent inside the block: forced
         ([11, close], close),          # closed within the budget: its own answer follows
         ([11, 12, eos], None),         # ended its turn: done
         ([11, 12], close)],            # stopped at </think>, left out of the output
        [([21, eos], None), ([31, 32, eos], None), ([41, eos], None)],
    ])
    requests = [Request("q", t, 50 + t, ASK) for t in range(4)]
    decode = DecodeSettings(arm="greedy", temperature=0.7, top_k=20, top_p=0.8,
                            max_new_tokens=6, reasoning_budget=4, forced_answer_tokens=3)
    out = backend._generate_budgeted(llm, requests, decode)

    (first_prompts, first), (second_prompts, second) = llm.calls
    assert all(p.max_tokens == 4 and p.stop_token_ids == [close] for p in first)
    assert all(p.extra_args == {ARM_KEY: "greedy"} for p in first)
    assert [p.seed for p in second] == [50, 51, 53]
    prompt_ids = tok.encode(first_prompts[0]["prompt"], add_special_tokens=False)
    assert second_prompts[0]["prompt_token_ids"] == prompt_ids + [11, 12, 13, 14] + suffix
    assert second_prompts[1]["prompt_token_ids"] == prompt_ids + [11, close]
    assert second_prompts[2]["prompt_token_ids"] == prompt_ids + [11, 12, close]
    assert [p.max_tokens for p in second] == [3, 6, 6]
    assert [p.extra_args[STEP_OFFSET_KEY] for p in second] == [4 + len(suffix), 2, 3]
    assert [g.token_ids for g in out] == [(11, 12, 13, 14, *suffix, 21, eos),
                                          (11, close, 31, 32, eos), (11, 12, eos),
                                          (11, 12, close, 41, eos)]
    assert [g.forced_answer for g in out] == [True, False, False, False]
    # generated tokens only: the forced request thought 4 and answered 2 after the suffix
    assert [(g.thinking_tokens, g.answer_tokens, g.n_tokens) for g in out] == [
        (4, 2, 6), (2, 3, 5), (3, 0, 3), (3, 2, 5)]
    assert "</think>\n\nAnswer:" in out[0].text
