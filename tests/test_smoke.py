"""mislib.smoke: the tiny Qwen3-VL is saved in the real format and loads back."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mislib.smoke import (
    SMOKE_MODEL_ID,
    VOCAB_SIZE,
    smoke_model_dir,
    write_smoke_benchmark,
)

# The session-scoped `smoke_root` fixture (tests/conftest.py) builds the model once.


def test_smoke_folder_holds_the_real_checkpoint_files(smoke_root):
    folder = smoke_model_dir(smoke_root)
    for name in ("config.json", "model.safetensors", "generation_config.json",
                 "tokenizer.json", "processor_config.json", "chat_template.jinja", "smoke.json"):
        assert (folder / name).is_file(), name
    assert not list(folder.glob("*.bin")), "weights must be safetensors only"
    assert json.loads((folder / "smoke.json").read_text())["model_id"] == SMOKE_MODEL_ID


def test_smoke_model_loads_back_with_from_pretrained(smoke_root):
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    folder = smoke_model_dir(smoke_root)
    model = Qwen3VLForConditionalGeneration.from_pretrained(folder, use_safetensors=True)
    processor = AutoProcessor.from_pretrained(folder)
    assert model.get_input_embeddings().weight.shape[0] == VOCAB_SIZE
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert processor.video_processor is not None


def test_smoke_model_dir_reuses_the_cached_build(smoke_root):
    folder = smoke_model_dir(smoke_root)
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert smoke_model_dir(smoke_root) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


def test_smoke_model_dir_rebuilds_a_stale_folder_with_the_same_seeded_weights(smoke_root,
                                                                              tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / ".cache" / "smoke" / "tiny-qwen3-vl"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # a build killed before its marker
    (folder / "smoke.json").write_text(json.dumps({"spec_hash": "stale"}))
    rebuilt = smoke_model_dir(tmp_path)
    assert rebuilt == folder
    assert json.loads((folder / "smoke.json").read_text())["spec_hash"] != "stale"
    assert (folder / "model.safetensors").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tiny")]
    # A build from scratch equals the session's build: the spec fixes the seed.
    first = load_file(smoke_model_dir(smoke_root) / "model.safetensors")
    second = load_file(folder / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)


def test_smoke_model_answers_image_video_and_text_prompts(smoke_root):
    """One batch mixing a picture, a frame stack as video and text only decodes."""
    import torch
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    folder = smoke_model_dir(smoke_root)
    model = Qwen3VLForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    video = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]}],
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "When?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Which side?"}]}],
    ]
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
             for c in conversations]
    inputs = processor(text=texts, images=[image], videos=[video], do_sample_frames=False,
                       video_metadata=[{"fps": 1.0, "total_num_frames": 4,
                                        "frames_indices": [0, 1, 2, 3]}],
                       padding=True, return_tensors="pt")
    # 4 frames at temporal patch 2 -> 2 temporal positions; the image has 1.
    assert inputs["video_grid_thw"].tolist()[0][0] == 2
    assert inputs["image_grid_thw"].tolist()[0][0] == 1
    # Left padding: every prompt ends with the assistant header, so the last column is real.
    assert bool(inputs["attention_mask"][:, -1].all())
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, temperature=None,
                             top_k=None, top_p=None)
    assert out.shape[0] == 3 and out.shape[1] > inputs["input_ids"].shape[1]


def test_write_smoke_benchmark_writes_every_picture_it_names(tmp_path):
    path = write_smoke_benchmark(tmp_path, n_questions=30, seed=3, image_size=32, n_frames=4)
    questions = pd.read_parquet(path)
    assert len(questions) == 30 and questions["question_id"].is_unique
    bench = path.parent
    for rel, dims in zip(questions["image_path"], questions["dims"], strict=True):
        if pd.isna(rel):
            continue
        if dims == "3d":
            assert len(list((bench / rel).glob("frame_*.png"))) == 4
        else:
            assert (bench / rel).is_file()
    assert questions["image_path"].isna().any(), "the text-only ablation has no picture"


@pytest.mark.parametrize("bad", ["smoke:other"])
def test_unknown_smoke_model_id_is_rejected(bad, tmp_path):
    from mislib.inference.registry import resolve_model

    with pytest.raises(ValueError, match="unknown smoke model"):
        resolve_model(bad, tmp_path)
