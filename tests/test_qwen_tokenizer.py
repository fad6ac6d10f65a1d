"""Qwen3-VL's tokenizer rebuilt offline from dashscope's qwen.tiktoken."""

from __future__ import annotations

import pytest

pytest.importorskip("tiktoken")
pytest.importorskip("dashscope", reason="dashscope ships resources/qwen.tiktoken")

from transformers import AutoTokenizer  # noqa: E402

from mislib.qwen_tokenizer import (  # noqa: E402
    N_REGULAR_TOKENS,
    QWEN3_VL_ADDED_TOKENS,
    build_qwen_tokenizer,
)


@pytest.fixture(scope="session")
def saved_qwen(tmp_path_factory):
    """(tokenizer, folder): built once per session and saved with save_pretrained."""
    out = tmp_path_factory.mktemp("qwen_tokenizer")
    return build_qwen_tokenizer(out), out


def test_vocabulary_has_regular_bpe_then_26_added_tokens(saved_qwen):
    tok, _ = saved_qwen
    assert len(tok) == N_REGULAR_TOKENS + len(QWEN3_VL_ADDED_TOKENS) == 151_669


@pytest.mark.parametrize(
    ("token", "token_id"),
    [("<|endoftext|>", 151643), ("<|im_start|>", 151644), ("<|im_end|>", 151645),
     ("<|vision_start|>", 151652), ("<|vision_end|>", 151653), ("<|image_pad|>", 151655),
     ("<|video_pad|>", 151656), ("<tool_call>", 151657), ("<think>", 151667),
     ("</think>", 151668)],
)
def test_special_tokens_have_qwen3_vl_ids(saved_qwen, token, token_id):
    tok, _ = saved_qwen
    assert tok.convert_tokens_to_ids(token) == token_id


def test_eos_and_pad_are_im_end_and_endoftext(saved_qwen):
    tok, _ = saved_qwen
    assert (tok.eos_token_id, tok.pad_token_id) == (151645, 151643)


def test_think_is_an_added_token_not_flagged_special(saved_qwen):
    tok, _ = saved_qwen
    assert "<think>" not in tok.all_special_tokens
    assert tok.decode([151667, 9707], skip_special_tokens=True) == "<think>Hello"


def test_known_qwen_ids_for_plain_text(saved_qwen):
    # "Hello world!" is [9707, 1879, 0] in every Qwen2/3 tokenizer; digits split one by one.
    tok, _ = saved_qwen
    assert tok.encode("Hello world!") == [9707, 1879, 0]
    assert tok.encode("2024") == [17, 15, 17, 19]


@pytest.mark.parametrize(
    "text",
    ["The liver lies superior to the right kidney.", "  indented\n\ttabs\r\nand 12345 digits",
     "中文 и кириллица, émojis 🫀🦴", "<|im_start|>user\nIs A left of B?<|im_end|>"],
)
def test_round_trip_encode_decode(saved_qwen, text):
    tok, _ = saved_qwen
    assert tok.decode(tok.encode(text)) == text


def test_special_token_markup_encodes_to_one_id(saved_qwen):
    tok, _ = saved_qwen
    assert tok.encode("<|vision_start|><|image_pad|><|vision_end|>") == [151652, 151655, 151653]


def test_loads_back_from_disk_with_auto_tokenizer(saved_qwen):
    tok, out = saved_qwen
    loaded = AutoTokenizer.from_pretrained(out)
    text = "Coronal slice: is the spleen to the left of the liver? 42"
    assert loaded.encode(text) == tok.encode(text)
    assert len(loaded) == len(tok)
    assert loaded.eos_token_id == 151645
    assert loaded.chat_template == tok.chat_template


def test_second_call_with_same_folder_reuses_the_saved_copy(saved_qwen):
    _, out = saved_qwen
    before = (out / "tokenizer.json").stat().st_mtime_ns
    again = build_qwen_tokenizer(out)
    assert (out / "tokenizer.json").stat().st_mtime_ns == before
    assert again.convert_tokens_to_ids("<|im_end|>") == 151645


def test_chat_template_renders_image_and_video_placeholders(saved_qwen):
    tok, _ = saved_qwen
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is A above B?"}]},
        {"role": "assistant", "content": "True"},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Which frame?"}]},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Is A above B?<|im_end|>\n"
        "<|im_start|>assistant\nTrue<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Which frame?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_numbers_images_when_asked(saved_qwen):
    tok, _ = saved_qwen
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                              {"type": "text", "text": "Compare."}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_vision_id=True)
    assert "Picture 1: <|vision_start|>" in text and "Picture 2: <|vision_start|>" in text
