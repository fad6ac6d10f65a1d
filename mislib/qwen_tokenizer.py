"""Qwen's real tokenizer, built offline.

Model weights cannot be downloaded on the build machines, but the ``dashscope`` package
ships ``resources/qwen.tiktoken``: Qwen's byte-level BPE (151,643 regular tokens, the same
ids every Qwen2/2.5/3 and Qwen3-VL checkpoint uses). :func:`build_qwen_tokenizer` turns it
into a fast tokenizer with transformers' ``TikTokenConverter``, appends Qwen3-VL's
special/added tokens from id 151643 in the order the released checkpoints use, and sets a
Qwen3-VL-style chat template that renders image and video content items as vision
placeholders (``<|vision_start|><|image_pad|><|vision_end|>``), which Qwen3-VL's processor
expands to the right number of patch tokens.

>>> tok = build_qwen_tokenizer()                      # doctest: +SKIP
>>> tok.convert_tokens_to_ids(["<|im_end|>", "<think>"])  # doctest: +SKIP
[151645, 151667]
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

#: Number of regular (BPE) tokens; special/added tokens start here.
N_REGULAR_TOKENS = 151_643
#: Rows of Qwen3-VL's input-embedding matrix (padded beyond the tokenizer for speed).
QWEN3_VL_EMBEDDING_ROWS = 151_936
#: Model context length declared by Qwen3-VL's tokenizer config.
MODEL_MAX_LENGTH = 262_144

# Qwen's pre-tokenizer: like GPT-4's, but digits are split one by one (``\p{N}``, not {1,3}).
QWEN_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# (token, special) in Qwen3-VL's id order from 151643. ``special`` mirrors the released
# tokenizer config: tool-call, fill-in-the-middle and thinking markers are added tokens that
# are NOT flagged special (they survive ``skip_special_tokens``), which is why SemSam's
# content mask cannot rely on the flag alone.
QWEN3_VL_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# Qwen3-VL-style ChatML template. Content is a string or a list of items
# {"type": "text", "text": ...} / {"type": "image", ...} / {"type": "video", ...}
# (items carrying an "image"/"video"/"image_url" key count as such too). Each image or video
# becomes one placeholder that the processor expands; ``add_vision_id=True`` numbers them.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- set counts = namespace(image=0, video=0) -%}"
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}"
    "{%- set counts.image = counts.image + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ counts.image ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item.type == 'video' or 'video' in item -%}"
    "{%- set counts.video = counts.video + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' ~ counts.video ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}{{- item.text -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + render(message.content)"
    " + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + render(message.content) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Bump when the build changes, so cached copies on disk are rebuilt.
_BUILD_VERSION = "1"
_STAMP = "mislib_qwen_tokenizer.json"


def qwen_tiktoken_path() -> Path:
    """Path of ``qwen.tiktoken`` inside the installed ``dashscope`` package.

    Located through the import system without importing ``dashscope`` itself (its top
    level pulls in HTTP clients we do not need).
    """
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'dashscope' is not installed; it ships resources/qwen.tiktoken "
            "(pip install dashscope)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "resources" / "qwen.tiktoken"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"dashscope is installed at {list(spec.submodule_search_locations)} "
        "but has no resources/qwen.tiktoken"
    )


def _build_key(vocab_file: Path) -> str:
    digest = hashlib.sha256()
    digest.update(vocab_file.read_bytes())
    digest.update(repr((_BUILD_VERSION, QWEN_SPLIT_PATTERN, QWEN3_VL_ADDED_TOKENS,
                        QWEN3_VL_CHAT_TEMPLATE, MODEL_MAX_LENGTH)).encode())
    return digest.hexdigest()[:16]


def _convert(vocab_file: Path) -> PreTrainedTokenizerFast:
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(vocab_file), pattern=QWEN_SPLIT_PATTERN).converted()
    # Qwen normalises to NFC before splitting, like its released tokenizer.json.
    backend.normalizer = normalizers.NFC()
    if backend.get_vocab_size() != N_REGULAR_TOKENS:
        raise ValueError(
            f"{vocab_file}: expected {N_REGULAR_TOKENS} BPE tokens, got {backend.get_vocab_size()}"
        )
    # Added one by one so each lands on the next id, in Qwen3-VL's order.
    for expected_id, (content, special) in enumerate(QWEN3_VL_ADDED_TOKENS, N_REGULAR_TOKENS):
        token = AddedToken(content, special=special, normalized=False)
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(content) != expected_id:
            raise RuntimeError(f"{content} got id {backend.token_to_id(content)}, not {expected_id}")
    vision = [c for c, special in QWEN3_VL_ADDED_TOKENS[1:14] if special]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        extra_special_tokens=vision,
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        padding_side="left",  # batched generation pads on the left
    )


def build_qwen_tokenizer(out_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """Qwen3-VL's tokenizer rebuilt from ``dashscope``'s ``qwen.tiktoken``.

    Parameters
    ----------
    out_dir
        If given, the tokenizer is saved there with ``save_pretrained`` (and loaded from
        there on later calls while its build key matches), so ``AutoTokenizer
        .from_pretrained(out_dir)`` and Qwen3-VL processors can load it.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        151,643 BPE tokens (ids 0..151642) followed by the 26 Qwen3-VL special/added
        tokens (ids 151643..151668); ``eos_token = "<|im_end|>"``, ``pad_token =
        "<|endoftext|>"``, a Qwen3-VL-style chat template. (The model's embedding matrix
        has 151,936 rows; rows beyond the tokenizer are padding.)
    """
    vocab_file = qwen_tiktoken_path()
    key = _build_key(vocab_file)
    if out_dir is not None:
        out = Path(out_dir)
        stamp = out / _STAMP
        if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
            return AutoTokenizer.from_pretrained(out)
    tokenizer = _convert(vocab_file)
    if out_dir is not None:
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(out)
        stamp.write_text(json.dumps({"key": key, "source": "dashscope/resources/qwen.tiktoken"}))
    return tokenizer
