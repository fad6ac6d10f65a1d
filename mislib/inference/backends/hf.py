"""The ``hf`` backend: a transformers image-text-to-text model, decoded by the SemSam rule.

Every arm goes through :class:`mislib.semsam.SemSamLogitsProcessor` with
``generate(do_sample=False)``: the processor makes every choice (re-scoring on in the
``semsam`` arm, off in ``baseline``, the most probable candidate in ``greedy``), seeded per request, so
the arms differ only in the selection rule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from mislib.inference.prompts import conversation
from mislib.inference.protocol import ARMS, Capabilities, DecodeSettings, Generation, Request
from mislib.inference.thinking import (
    cut_at_stop,
    forced_suffix_ids,
    generated_counts,
    plan_phase_two,
    prompt_opens_think,
    think_markers,
)


def eos_ids(generation_config: Any, tokenizer: Any) -> list[int]:
    """The ids that end a turn: the generation config's (one id or a list) and the
    tokenizer's, so both backends stop on the same tokens."""
    eos = generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return sorted(set(eos) | {tokenizer.eos_token_id} - {None})


def processor_settings(processor: Any, has_video: bool, video_fps: float | None) -> dict[str, Any]:
    """The processor's part of a run's identity: its class, pixel budgets, how stacks are
    passed, and the chat template's hash. Shared by the local backends, so that the same
    processor gives the same record whichever engine runs the model."""
    return {"processor_class": type(processor).__name__,
            "image_processor": processor_sizes(getattr(processor, "image_processor", None)),
            "video_processor": processor_sizes(getattr(processor, "video_processor", None)),
            "video_as": "video" if has_video else "images",
            "video_fps": video_fps, "do_sample_frames": False,
            "chat_template_sha": hashlib.sha256(
                str(processor.chat_template or "").encode()).hexdigest()[:16]}


def processor_sizes(proc: Any) -> dict[str, Any]:
    """The pixel budgets and normalisation of an image or video processor (JSON-ready), the
    part of the run identity that says which pixels a model sees; ``{}`` for None."""
    if proc is None:
        return {}
    keys = ("size", "min_pixels", "max_pixels", "patch_size", "temporal_patch_size",
            "merge_size", "do_resize", "image_mean", "image_std")
    out = {k: getattr(proc, k) for k in keys if getattr(proc, k, None) is not None}
    if dataclasses.is_dataclass(out.get("size")):  # transformers' SizeDict
        out["size"] = {k: v for k, v in dataclasses.asdict(out["size"]).items()
                       if v is not None}
    out["class"] = type(proc).__name__
    return json.loads(json.dumps(out, default=str))


def set_pixel_budget(processor: Any, min_pixels: int | None, max_pixels: int | None,
                     model_id: str) -> None:
    """Give the processor's image processor a model entry's pixel budget per picture
    (Qwen-VL processors: ``size = {"shortest_edge": min, "longest_edge": max}`` in pixels).

    Raises
    ------
    ValueError
        A budget was asked for and the image processor has no pixel budget to set.
    """
    if min_pixels is None and max_pixels is None:
        return
    proc = getattr(processor, "image_processor", None)
    size = getattr(proc, "size", None)
    size = dataclasses.asdict(size) if dataclasses.is_dataclass(size) else dict(size or {})
    if "longest_edge" not in size or "shortest_edge" not in size:
        raise ValueError(f"model {model_id!r}: min_pixels/max_pixels set a pixel budget, but "
                         f"its image processor ({type(proc).__name__}) has none (size = "
                         f"{size})")
    size = {"shortest_edge": int(min_pixels if min_pixels is not None
                                 else size["shortest_edge"]),
            "longest_edge": int(max_pixels if max_pixels is not None else size["longest_edge"])}
    proc.size = type(proc.size)(**size) if dataclasses.is_dataclass(proc.size) else size
    for key, value in (("min_pixels", size["shortest_edge"]),
                       ("max_pixels", size["longest_edge"])):
        if getattr(proc, key, None) is not None:
            setattr(proc, key, value)


def stack_mode(processor: Any, stack_as: str | None, model_id: str) -> bool:
    """Whether 3D stacks go to the model as a video (else as a sequence of pictures).

    Raises
    ------
    ValueError
        ``stack_as = "video"`` for a processor without a video processor.
    """
    has_video = getattr(processor, "video_processor", None) is not None
    if stack_as == "video" and not has_video:
        raise ValueError(f"model {model_id!r}: stack_as = 'video' but its processor has no "
                         "video processor; use stack_as = 'images'")
    return has_video and stack_as != "images"


class HFBackend:
    """A transformers image-text-to-text model with its own processor and chat template.

    Loads Qwen3-VL checkpoints as ``Qwen3VLForConditionalGeneration`` and any other VLM
    through ``AutoModelForImageTextToText``; safetensors only, and no code of the model's
    repository unless ``trust_remote_code``. On CUDA it runs in bf16 with sdpa attention, on
    CPU in fp32 (unless ``dtype`` says otherwise). With a reasoning budget
    (``DecodeSettings.reasoning_budget``) it decodes in two phases, forcing the answer of a
    thinking model whose budget ran out (:mod:`mislib.inference.thinking`). 2D questions pass a
    picture; 3D stacks pass their frames as a video (``do_sample_frames=False`` and
    metadata ``fps``, so every frame given is used and time stamps are frame numbers);
    models without a video processor get the frames as a sequence of pictures.

    Parameters
    ----------
    source : a local folder or hub id (from :func:`mislib.inference.registry.resolve_model`).
    model_id : the id the profile names (recorded, and used in error messages).
    revision : the source's revision when the loaded config carries no commit hash.
    device : ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    video_fps : frames per second declared for stacks (Qwen3-VL writes time stamps).
    dtype : weights dtype (``"bfloat16"``, ``"float16"``, ``"float32"``; None: bf16 on
        CUDA, fp32 on CPU).
    min_pixels, max_pixels : the image processor's pixel budget per picture (None: the
        checkpoint's own); :func:`set_pixel_budget`.
    stack_as : ``"video"`` or ``"images"`` (None: a video where the processor takes one).
    trust_remote_code : let the checkpoint's own code run (refused otherwise,
        :func:`mislib.inference.models.check_remote_code`).

    Examples
    --------
    >>> from mislib.inference.registry import load_backend
    >>> backend = load_backend("hf", "smoke:tiny-qwen3-vl", device="cpu")  # doctest: +SKIP
    >>> backend.generate([Request("q1", 0, 7, "Is A above B?")], decode)  # doctest: +SKIP
    [Generation(text='...', n_tokens=16, token_ids=(...))]
    """

    def __init__(self, source: str, model_id: str | None = None, revision: str = "main",
                 device: str = "auto", video_fps: float = 1.0, dtype: str | None = None,
                 min_pixels: int | None = None, max_pixels: int | None = None,
                 stack_as: str | None = None, trust_remote_code: bool = False):
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        from mislib.inference.models import check_remote_code

        self.model_id = model_id or source
        check_remote_code(source, self.model_id, trust_remote_code)
        remote = bool(trust_remote_code)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype is None:
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = getattr(torch, dtype)
        self.video_fps = float(video_fps)
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=remote)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"model {self.model_id!r} cannot be loaded: not a local folder, not in the "
                f"Hugging Face cache, or not a transformers model ({error})") from error
        self.family = config.model_type
        kwargs = {"dtype": self.dtype, "trust_remote_code": remote, "use_safetensors": True}
        if self.device.type == "cuda":
            kwargs["attn_implementation"] = "sdpa"
        if self.family == "qwen3_vl":
            from transformers import Qwen3VLForConditionalGeneration as model_class
        else:
            model_class = AutoModelForImageTextToText
        try:
            self.model = model_class.from_pretrained(source, **kwargs).to(self.device).eval()
        except ValueError as error:
            if "Unrecognized configuration class" in str(error):
                raise ValueError(f"model {self.model_id!r} (model_type {self.family!r}) is not "
                                 "an image-text-to-text model transformers knows") from error
            raise
        self.processor = AutoProcessor.from_pretrained(source, trust_remote_code=remote)
        set_pixel_budget(self.processor, min_pixels, max_pixels, self.model_id)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation continues on the right
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.revision = getattr(config, "_commit_hash", None) or revision
        self.eos_ids = eos_ids(self.model.generation_config, self.tokenizer)
        self.has_video = stack_mode(self.processor, stack_as, self.model_id)
        self.capabilities = Capabilities(arms=ARMS, embeddings=True, max_batch=None,
                                         max_concurrency=1)
        self._tables: dict[str, Any] = {}

    def settings(self) -> dict[str, Any]:
        """What changes the pixels or tokens the model sees: model and processor classes,
        pixel budgets, frame handling, chat template hash, device, dtype, generation config."""
        return {"family": self.family, "model_class": type(self.model).__name__,
                **processor_settings(self.processor, self.has_video, self.video_fps),
                "device": self.device.type, "dtype": str(self.dtype).removeprefix("torch."),
                # without transformers_version, so an upgrade alone does not start a new run
                "generation_config": {k: v for k, v in
                                      self.model.generation_config.to_diff_dict().items()
                                      if k != "transformers_version"}}

    def input_embeddings(self):
        """The input-embedding matrix ``[V, d]`` (SemSam's neighbourhood space)."""
        return self.model.get_input_embeddings().weight

    def _conversation(self, text: str, media: Any) -> list[dict[str, Any]]:
        return conversation(text, media, self.has_video)

    def prepare(self, requests: Sequence[Request]):
        """Tokenised, padded model inputs for the requests, on the device."""
        from PIL import Image

        texts, images, videos, metadata = [], [], [], []
        for request in requests:
            media = request.media
            texts.append(self.processor.apply_chat_template(
                self._conversation(request.text, media), tokenize=False,
                add_generation_prompt=True))
            if isinstance(media, np.ndarray):
                if self.has_video:
                    videos.append(media)
                    metadata.append({"fps": self.video_fps, "total_num_frames": len(media),
                                     "frames_indices": list(range(len(media)))})
                else:
                    images += [Image.fromarray(frame) for frame in media]
            elif media is not None:
                images.append(media)
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs.update(videos=videos, do_sample_frames=False, video_metadata=metadata)
        return self.processor(**kwargs).to(self.device)

    def _table(self, path: str | None):
        from mislib.semsam import NeighborTable

        if path is None:
            raise ValueError("the hf backend decodes through the SemSam rule, which needs the "
                             "neighbour table: DecodeSettings.table_path is None")
        if path not in self._tables:
            self._tables.clear()
            self._tables[path] = NeighborTable.load(path).to(self.device)
        return self._tables[path]

    def logits_processor(self, requests: Sequence[Request], decode: DecodeSettings,
                         step_offset: Sequence[int] | int = 0):
        """The decision rule of one batch, one seed (and count of tokens generated before
        this call, for a continued sequence) per request."""
        from transformers import LogitsProcessorList

        from mislib.semsam import SemSamLogitsProcessor

        return LogitsProcessorList([SemSamLogitsProcessor(
            self._table(decode.table_path), **decode.rule_params(),
            seed=[r.seed for r in requests], step_offset=step_offset)])

    def _decode(self, inputs: Any, requests: Sequence[Request], decode: DecodeSettings,
                max_new_tokens: int, stop_ids: Sequence[int],
                step_offset: Sequence[int] | int = 0) -> list[list[int]]:
        """One ``generate`` call: each row's new tokens up to and including its first stop
        token (padding after it dropped)."""
        import torch

        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=int(max_new_tokens), do_sample=False,
                temperature=None, top_k=None, top_p=None, num_beams=1,
                logits_processor=self.logits_processor(requests, decode, step_offset),
                eos_token_id=list(stop_ids), pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:].cpu().tolist()
        return [cut_at_stop(row, stop_ids) for row in new]

    def generate(self, requests: Sequence[Request],
                 decode: DecodeSettings) -> list[Generation]:
        """Decode each request; the token count includes the end-of-turn token and
        excludes padding after it.

        ``do_sample=False`` and no warpers: the logits processor makes every choice. With
        a reasoning budget the decode runs in two phases (budget forcing,
        :mod:`mislib.inference.thinking`).
        """
        if not requests:
            return []
        if decode.reasoning_budget:
            return self._generate_budgeted(requests, decode)
        rows = self._decode(self.prepare(requests), requests, decode,
                            decode.max_new_tokens, self.eos_ids)
        return [Generation(self.tokenizer.decode(row, skip_special_tokens=True), len(row),
                           tuple(row)) for row in rows]

    def _generate_budgeted(self, requests: Sequence[Request],
                           decode: DecodeSettings) -> list[Generation]:
        """Budget forcing: think for at most ``reasoning_budget`` tokens (stopping at
        ``</think>``), then answer, with ``</think>`` and ``Answer:`` appended to a block
        the budget cut off; the second phase continues the first phase's sequences."""
        markers = think_markers(self.tokenizer, self.model_id)
        suffix = forced_suffix_ids(self.tokenizer)
        opened = prompt_opens_think(self.processor.apply_chat_template(
            self._conversation("", None), tokenize=False, add_generation_prompt=True))
        inputs = self.prepare(requests)
        first = self._decode(inputs, requests, decode, decode.reasoning_budget,
                             [*self.eos_ids, markers[1]])
        plans = [plan_phase_two(row, decode.reasoning_budget, self.eos_ids, markers, opened,
                                decode.max_new_tokens, decode.forced_answer_tokens, suffix)
                 for row in first]
        first = [plan.kept(row) for row, plan in zip(first, plans, strict=True)]
        tokens = [row + list(plan.append) for row, plan in zip(first, plans, strict=True)]
        second: list[list[int]] = [[] for _ in requests]
        # second phase, grouped by budget (answer after a closed block, or forced answer)
        for budget in sorted({p.max_tokens for p in plans if p.action != "done"}):
            index = [i for i, p in enumerate(plans) if p.action != "done"
                     and p.max_tokens == budget]
            subset = [requests[i] for i in index]
            more = self._decode(self._continued(self.prepare(subset), [tokens[i] for i in index]),
                                subset, decode, budget, self.eos_ids,
                                [len(tokens[i]) for i in index])
            for i, row in zip(index, more, strict=True):
                second[i] = row
        results = []
        for head, plan, tail in zip(first, plans, second, strict=True):
            # the text and ids hold the appended suffix; the counts only generated tokens
            row = head + list(plan.append) + tail
            thinking, answer = generated_counts(head, plan, tail, markers, opened)
            results.append(Generation(self.tokenizer.decode(row, skip_special_tokens=True),
                                      thinking + answer, tuple(row), thinking_tokens=thinking,
                                      answer_tokens=answer, forced_answer=plan.forced))
        return results

    def _continued(self, inputs: Any, prefixes: Sequence[Sequence[int]]) -> Any:
        """``inputs`` (left-padded prompts) with each row's ``prefixes`` appended: the
        sequences a second phase continues. Per-token inputs other than the ids (the
        attention mask, Qwen3-VL's ``mm_token_type_ids``) grow with text tokens."""
        import torch

        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        per_token = [k for k, v in inputs.items() if k not in ("input_ids", "attention_mask")
                     and isinstance(v, torch.Tensor) and v.shape[:2] == ids.shape]
        rows = []
        for i, prefix in enumerate(prefixes):
            keep = mask[i].bool()
            extra = torch.tensor(list(prefix), dtype=ids.dtype, device=ids.device)
            rows.append({"input_ids": torch.cat([ids[i][keep], extra]),
                         **{k: torch.cat([inputs[k][i][keep], torch.zeros_like(extra)])
                            for k in per_token}})
        width = max(len(r["input_ids"]) for r in rows)
        out = dict(inputs)
        pad = self.tokenizer.pad_token_id
        out["input_ids"] = torch.stack([torch.cat([r["input_ids"].new_full(
            (width - len(r["input_ids"]),), pad), r["input_ids"]]) for r in rows])
        out["attention_mask"] = torch.stack([torch.cat([mask.new_zeros(
            width - len(r["input_ids"])), mask.new_ones(len(r["input_ids"]))]) for r in rows])
        for k in per_token:
            out[k] = torch.stack([torch.cat([r[k].new_zeros(width - len(r[k])), r[k]])
                                  for r in rows])
        return out
