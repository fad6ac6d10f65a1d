"""The demo's model: a tiny, randomly initialised Qwen3-VL saved in the real on-disk format.

The demo profile cannot download weights, yet it must exercise the loading path a real run
takes (``from_pretrained`` of a config, safetensors weights, a tokenizer, an image
processor, a video processor and a chat template). :func:`smoke_model_dir` builds such a
folder once from a :class:`~transformers.Qwen3VLConfig` with tiny text and vision towers
and Qwen's full 151,936-row vocabulary (so the real-format tokenizer of
:func:`mislib.qwen_tokenizer.build_qwen_tokenizer` fits), and every later call returns the
cached folder. Its answers are noise: it proves the pipeline, not any result.

>>> from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
>>> folder = smoke_model_dir()                                          # doctest: +SKIP
>>> model = Qwen3VLForConditionalGeneration.from_pretrained(folder)     # doctest: +SKIP
>>> processor = AutoProcessor.from_pretrained(folder)                   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mislib.config import config_hash
from mislib.paths import QUESTIONS_FILE, project_paths

#: The model id under which profiles name the smoke model.
SMOKE_MODEL_ID = "smoke:tiny-qwen3-vl"
#: The same weights with a thinking chat template (the assistant turn opens ``<think>``, as
#: Qwen3-VL-*-Thinking's does), for the reasoning-budget path (:mod:`mislib.inference.thinking`).
SMOKE_THINKING_MODEL_ID = "smoke:tiny-qwen3-vl-thinking"
#: Smoke model id -> its folder's name under ``.cache/smoke/``.
SMOKE_MODELS = {SMOKE_MODEL_ID: "tiny-qwen3-vl", SMOKE_THINKING_MODEL_ID: "tiny-qwen3-vl-thinking"}
#: The generation prompt of the chat template, and the thinking variant's.
ASSISTANT_TURN = "'<|im_start|>assistant\\n'"
THINKING_ASSISTANT_TURN = "'<|im_start|>assistant\\n<think>\\n'"
SMOKE_SEED = 20261125
#: Qwen3-VL's vocabulary: 151,643 BPE tokens, then special tokens, padded to 151,936 rows.
VOCAB_SIZE = 151_936

# Tiny towers: the text model's width sets the embedding matrix (151,936 x 32 floats, tied
# with the LM head, about 19 MB in fp32), everything else is a few hundred kB. Head
# dimension 32 (vLLM's CPU attention accepts no smaller one, so the vllm backend loads the
# same model) gives 16 rotary frequencies, split 6/5/5 over (time, height, width) as
# Qwen3-VL's interleaved multimodal RoPE expects (its real split is 24/20/20 of 64).
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0,
                        "mrope_section": [6, 5, 5], "mrope_interleaved": True},
    "tie_word_embeddings": True,
    "pad_token_id": 151643,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
VISION_CONFIG: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 32,          # = the text model's hidden size
    "num_position_embeddings": 256,  # a 16 x 16 learned grid, resampled to each image
    "deepstack_visual_indexes": [1],
}
# Pixel budgets of the saved processors. Real Qwen3-VL checkpoints allow megapixels; the
# smoke model keeps images at <= 160 x 160 (25 visual tokens) and a 16-frame stack at
# <= 16 x 96 x 96 pixels in all (72 visual tokens) so a CPU batch takes well under a second.
IMAGE_SIZE = {"shortest_edge": 32 * 32, "longest_edge": 160 * 160}
VIDEO_SIZE = {"shortest_edge": 2 * 32 * 32, "longest_edge": 16 * 96 * 96}


def smoke_spec() -> dict[str, Any]:
    """Everything that determines the smoke model's files (hashed into its cache marker)."""
    return {"text_config": TEXT_CONFIG, "vision_config": VISION_CONFIG, "seed": SMOKE_SEED,
            "image_size": IMAGE_SIZE, "video_size": VIDEO_SIZE, "format": 1}


def smoke_model_dir(root: str | os.PathLike | None = None,
                    model_id: str = SMOKE_MODEL_ID) -> Path:
    """The folder of the tiny Qwen3-VL, built on first use under ``.cache/smoke/``.

    Parameters
    ----------
    root : path, optional
        Project root (default: the repository); the model lives in
        ``<root>/.cache/smoke/tiny-qwen3-vl/``.
    model_id : str
        :data:`SMOKE_MODEL_ID`, or :data:`SMOKE_THINKING_MODEL_ID` for the same weights
        with a chat template whose assistant turn opens ``<think>`` (in
        ``tiny-qwen3-vl-thinking/``).

    Returns
    -------
    Path
        A folder that ``Qwen3VLForConditionalGeneration.from_pretrained`` and
        ``AutoProcessor.from_pretrained`` load (``config.json``, ``model.safetensors``,
        ``generation_config.json``, tokenizer files, ``processor_config.json``,
        ``chat_template.jinja``) and a ``smoke.json`` marker holding the spec hash.

    Notes
    -----
    The build is written to a temporary sibling folder and renamed into place, so a run
    killed mid-build never leaves a half-written model that later calls would trust; the
    folder is rebuilt when :func:`smoke_spec` changes.
    """
    if model_id not in SMOKE_MODELS:
        raise ValueError(f"unknown smoke model {model_id!r}; smoke models: {sorted(SMOKE_MODELS)}")
    folder = project_paths(root).cache / "smoke" / SMOKE_MODELS[model_id]
    thinking = model_id == SMOKE_THINKING_MODEL_ID
    want = config_hash({**smoke_spec(), "thinking": True} if thinking else smoke_spec())
    marker = folder / "smoke.json"
    if marker.is_file() and json.loads(marker.read_text()).get("spec_hash") == want:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    base = smoke_model_dir(root) if thinking else None  # the weights are the instruct's
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        if base is None:
            _build(staging)
        else:
            _build_thinking(base, staging)
        (staging / "smoke.json").write_text(json.dumps(
            {"model_id": model_id, "spec_hash": want, "spec": smoke_spec(),
             "thinking": thinking, "note": "randomly initialised; its answers are noise"},
            indent=2))
        if folder.exists():  # a stale build (older spec): replace it
            shutil.rmtree(folder, ignore_errors=True)
        try:
            staging.rename(folder)
        except OSError:
            # Another process finished the same build first; its copy is as good as ours.
            if not (marker.is_file()
                    and json.loads(marker.read_text()).get("spec_hash") == want):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _build(out: Path) -> None:
    """Write config, seeded random weights, tokenizer and processors to ``out``."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    from mislib.qwen_tokenizer import build_qwen_tokenizer

    tokenizer = build_qwen_tokenizer()
    if len(tokenizer) > VOCAB_SIZE:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the model's "
                         f"{VOCAB_SIZE} embedding rows")
    ids = tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    config = Qwen3VLConfig(
        text_config=dict(TEXT_CONFIG), vision_config=dict(VISION_CONFIG),
        image_token_id=ids[0], video_token_id=ids[1],
        vision_start_token_id=ids[2], vision_end_token_id=ids[3],
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SMOKE_SEED)
        model = Qwen3VLForConditionalGeneration(config).eval()
    # What Qwen3-VL-Instruct checkpoints ship, so that `generate` meets the same defaults
    # (sampling on) that a real run has to override explicitly.
    model.generation_config = GenerationConfig(
        bos_token_id=151643, pad_token_id=151643, eos_token_id=[151645, 151643],
        do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.0)
    model.save_pretrained(out)

    image_processor = Qwen2VLImageProcessor(
        size=dict(IMAGE_SIZE), patch_size=VISION_CONFIG["patch_size"],
        temporal_patch_size=VISION_CONFIG["temporal_patch_size"],
        merge_size=VISION_CONFIG["spatial_merge_size"],
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    video_processor = Qwen3VLVideoProcessor(
        size=dict(VIDEO_SIZE), patch_size=VISION_CONFIG["patch_size"],
        temporal_patch_size=VISION_CONFIG["temporal_patch_size"],
        merge_size=VISION_CONFIG["spatial_merge_size"],
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], cap_pixels_per_frame=False)
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor,
                                 chat_template=tokenizer.chat_template)
    processor.save_pretrained(out)


def _build_thinking(base: Path, out: Path) -> None:
    """Copy the smoke model's files from ``base`` to ``out`` with a thinking chat template:
    the assistant turn of the generation prompt opens a ``<think>`` block."""
    for path in base.iterdir():
        if path.is_file() and path.name != "smoke.json":
            shutil.copy2(path, out / path.name)
    template = (out / "chat_template.jinja").read_text()
    if template.count(ASSISTANT_TURN) != 1:
        raise ValueError(f"{base / 'chat_template.jinja'}: expected one generation prompt "
                         f"{ASSISTANT_TURN}, found {template.count(ASSISTANT_TURN)}")
    (out / "chat_template.jinja").write_text(
        template.replace(ASSISTANT_TURN, THINKING_ASSISTANT_TURN))


def write_smoke_benchmark(root: str | os.PathLike | None = None, n_questions: int = 24,
                          seed: int = 0, image_size: int = 64, n_frames: int = 4,
                          ablation_share: float = 0.5) -> Path:
    """A small benchmark in stage 03's layout, with random pictures, for stage-04 checks.

    Stage 04 can then be tested and timed without stages 01-03: the questions come from
    :func:`mislib.simulate.simulate_questions` (the real schema and factor mix), and each
    question that is not text-only gets a random RGB PNG (2D) or a folder of
    ``frame_000.png ...`` (3D stack), written where ``image_path`` says.

    Parameters
    ----------
    root : path, optional
        Project root; files go to ``<root>/data/benchmark/``.
    n_questions : int
        Number of questions.
    seed : int
        Seed of the questions and of the pictures.
    image_size : int
        Side of every picture in pixels.
    n_frames : int
        Frames per 3D stack (even, as the renderer writes them).
    ablation_share : float
        Share of relation questions in the ablations (half of them text-only), higher
        than the paper's so that small tables hold text-only questions too.

    Returns
    -------
    Path
        The ``questions.parquet`` written.
    """
    import numpy as np
    import pandas as pd
    from PIL import Image

    from mislib.simulate import simulate_questions

    bench_dir = project_paths(root).benchmark
    questions = simulate_questions(n_questions, seed=seed, ablation_share=ablation_share)
    rng = np.random.default_rng(seed)
    paths: list[str | None] = []
    for render_id, dims in zip(questions["render_id"], questions["dims"], strict=True):
        if pd.isna(render_id):  # the text-only ablation
            paths.append(None)
            continue
        if dims == "3d":
            rel = f"stacks/{render_id}"
            (bench_dir / rel).mkdir(parents=True, exist_ok=True)
            for f in range(n_frames):
                pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(bench_dir / rel / f"frame_{f:03d}.png")
        else:
            rel = f"images/{render_id}.png"
            (bench_dir / "images").mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(bench_dir / rel)
        paths.append(rel)
    questions["image_path"] = paths
    questions["n_frames"] = np.where(questions["dims"] == "3d", n_frames, 1)
    out = bench_dir / QUESTIONS_FILE
    questions.to_parquet(out, index=False)
    return out
