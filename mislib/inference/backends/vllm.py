"""The ``vllm`` backend: offline ``vllm.LLM``, the scale-out engine, with SemSam inside it.

Runs only where vLLM is installed (``make env-vllm`` builds ``.venv-vllm/``). It shows the
model what the hf backend shows it: the model's own chat template (rendered by its
transformers processor), its own processor settings, 2D questions as one picture and 3D
stacks as a video of exactly the frames given (``do_sample_frames=False``, frame ``i`` at
``i / video_fps`` seconds, no resampling). Weights load in bf16 on CUDA and fp32 on CPU,
tensor parallel over ``tensor_parallel_size`` GPUs for models that do not fit one.

Every arm decodes through SemSam's vLLM logits processor (:mod:`mislib.semsam.vllm_v1` for
the V1 model runner, used on CPU and with ``VLLM_USE_V2_MODEL_RUNNER=0``;
:mod:`mislib.semsam.vllm_v2` for Model Runner V2, the CUDA default) with temperature 0: the
processor decides each token with the same pure rule as the hf backend, draws keyed by
(request seed, tokens generated so far), so both backends answer alike. With a reasoning
budget both decode a thinking model in the same two phases (budget forcing,
:mod:`mislib.inference.thinking`). The neighbour table
reaches the engine's workers by path (``additional_config``); each request carries its arm
and seed (``SamplingParams(extra_args=..., seed=...)``). The engine starts on the first
:meth:`VLLMBackend.generate` and is kept for every arm of the model.

>>> from mislib.inference.registry import load_backend
>>> backend = load_backend("vllm", "smoke:tiny-qwen3-vl", device="cpu")  # doctest: +SKIP
>>> backend.generate([Request("q1", 0, 7, "Is A above B?")], decode)  # doctest: +SKIP
[Generation(text='...', n_tokens=16, token_ids=(...))]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import vllm  # here, not lazily: outside .venv-vllm the registry then says what is missing

from mislib.inference.backends.hf import (
    eos_ids,
    processor_settings,
    set_pixel_budget,
    stack_mode,
)
from mislib.inference.prompts import conversation
from mislib.inference.protocol import ARMS, Capabilities, DecodeSettings, Generation, Request
from mislib.inference.thinking import (
    forced_suffix_ids,
    generated_counts,
    plan_phase_two,
    prompt_opens_think,
    think_markers,
)

log = logging.getLogger(__name__)


def uses_model_runner_v2(device: str) -> bool:
    """Whether vLLM will run Model Runner V2 (whose logits processors are another class).

    V2 needs Triton with a backend for the device: the CUDA default, never on CPU;
    ``VLLM_USE_V2_MODEL_RUNNER=0`` forces V1 on CUDA.
    """
    flag = os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower()
    return device == "cuda" and flag not in ("0", "false", "no", "off")


class VLLMBackend:
    """A vision-language model served by an offline ``vllm.LLM`` engine.

    Parameters
    ----------
    source : a local folder or hub id (from :func:`mislib.inference.registry.resolve_model`).
    model_id : the id the profile names (recorded, and used in error messages).
    revision : the source's revision (recorded).
    device : ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    video_fps : frames per second declared for stacks (Qwen3-VL writes time stamps).
    tensor_parallel_size : GPUs one engine spreads the model over.
    max_model_len : context length the engine reserves per sequence (default: the model's
        own, at most 8192; real Qwen3-VL checkpoints declare 256k, far beyond a question).
    max_num_seqs : sequences the engine decodes at once (vLLM's default when None).
    gpu_memory_utilization : share of GPU memory the engine may take (CUDA).
    limit_mm_per_prompt : vLLM's per-prompt media limits; also sizes the dummy inputs vLLM
        profiles memory with (e.g. ``{"video": {"count": 1, "num_frames": 16, "width": 448,
        "height": 448}}``).
    enforce_eager : no CUDA graphs / compilation (default: True on CPU, False on CUDA).
    dtype, min_pixels, max_pixels, stack_as, trust_remote_code : a model entry's settings,
        as in :class:`~mislib.inference.backends.hf.HFBackend` (the pixel budget reaches
        the engine with each prompt's pictures).
    """

    def __init__(self, source: str, model_id: str | None = None, revision: str = "main",
                 device: str = "auto", video_fps: float = 1.0, tensor_parallel_size: int = 1,
                 max_model_len: int | None = None, max_num_seqs: int | None = None,
                 gpu_memory_utilization: float = 0.9,
                 limit_mm_per_prompt: Mapping[str, Any] | None = None,
                 enforce_eager: bool | None = None, dtype: str | None = None,
                 min_pixels: int | None = None, max_pixels: int | None = None,
                 stack_as: str | None = None, trust_remote_code: bool = False):
        import torch
        from transformers import AutoConfig, AutoProcessor, GenerationConfig

        from mislib.inference.models import check_remote_code

        self.model_id = model_id or source
        self.source = source
        check_remote_code(source, self.model_id, trust_remote_code)
        self.trust_remote_code = bool(trust_remote_code)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise ValueError(f"vllm backend: device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        self.device = device
        # "auto" would give bf16 on CPU
        self.dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
        self.video_fps = float(video_fps)
        if int(tensor_parallel_size) < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size!r}")
        self.engine_options = {
            "tensor_parallel_size": int(tensor_parallel_size),
            "max_num_seqs": None if max_num_seqs is None else int(max_num_seqs),
            "gpu_memory_utilization": float(gpu_memory_utilization),
            "limit_mm_per_prompt": dict(limit_mm_per_prompt or {"image": 1, "video": 1}),
            "enforce_eager": (device == "cpu") if enforce_eager is None else bool(enforce_eager),
        }
        try:
            config = AutoConfig.from_pretrained(source,
                                                trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"model {self.model_id!r} cannot be loaded: not a local folder, not in the "
                f"Hugging Face cache, or not a transformers model ({error})") from error
        self.family = config.model_type
        if max_model_len is None:
            text_config = getattr(config, "text_config", None) or config
            own = getattr(text_config, "max_position_embeddings", None)
            max_model_len = min(8192, int(own)) if own else 8192
        self.engine_options["max_model_len"] = int(max_model_len)
        self.architectures = list(getattr(config, "architectures", None) or [])
        self.processor = AutoProcessor.from_pretrained(
            source, trust_remote_code=self.trust_remote_code)
        set_pixel_budget(self.processor, min_pixels, max_pixels, self.model_id)
        # per-prompt processor arguments of pictures: the entry's budget, when it sets one
        self.image_kwargs = ({} if min_pixels is None and max_pixels is None else {"size": dict(
            dataclasses.asdict(self.processor.image_processor.size)
            if dataclasses.is_dataclass(self.processor.image_processor.size)
            else self.processor.image_processor.size)})
        self.tokenizer = self.processor.tokenizer
        self.revision = getattr(config, "_commit_hash", None) or revision
        try:
            self.generation_config = GenerationConfig.from_pretrained(source)
        except OSError:
            self.generation_config = GenerationConfig()
        self.has_video = stack_mode(self.processor, stack_as, self.model_id)
        self.v2 = uses_model_runner_v2(device)
        self.capabilities = Capabilities(arms=ARMS, embeddings=True, max_batch=None,
                                         max_concurrency=1,
                                         extras={"model_runner": "v2" if self.v2 else "v1"})
        self._llm: Any = None
        self._engine_key: str | None = None

    # ---------------------------------------------------------------- identity and table
    def settings(self) -> dict[str, Any]:
        """What changes the pixels or tokens the model sees (as the hf backend records it),
        plus the engine: vLLM's version and model runner."""
        return {"family": self.family, "model_class": "vllm:" + ",".join(self.architectures),
                **processor_settings(self.processor, self.has_video, self.video_fps),
                "device": self.device, "dtype": self.dtype,
                "generation_config": {k: v for k, v in
                                      self.generation_config.to_diff_dict().items()
                                      if k != "transformers_version"},
                "engine": {"vllm": vllm.__version__,
                           "model_runner": "v2" if self.v2 else "v1"}}

    def input_embeddings(self):
        """The input-embedding matrix ``[V, d]``, read from the checkpoint's safetensors.

        The engine's copy lives in its worker processes, so the matrix is read from the
        files, in the dtype the hf backend would hold it in (fp32 on CPU, bf16 on CUDA), so
        that both backends build, and share, the same SemSam table.
        """
        import torch

        from mislib.inference.registry import checkpoint_input_embeddings

        return checkpoint_input_embeddings(
            self.source, torch.bfloat16 if self.device == "cuda" else torch.float32)

    # ---------------------------------------------------------------- the engine
    def _engine(self, decode: DecodeSettings):
        """The ``vllm.LLM`` for this decode's table and rule (started on first use)."""
        from mislib.semsam.vllm_v1 import CONFIG_KEY, engine_config

        semsam = engine_config(decode.table_path, decode.temperature, decode.top_k,
                               decode.top_p, decode.mode)
        key = json.dumps(semsam, sort_keys=True)
        if self._llm is not None and key == self._engine_key:
            return self._llm
        if self._llm is not None:
            log.info("vllm backend: the table or rule changed; restarting the engine")
            self.close()
        from vllm import LLM

        if self.v2:
            from mislib.semsam.vllm_v2 import SemSamV2LogitsProcessor as processor
        else:
            from mislib.semsam.vllm_v1 import SemSamV1LogitsProcessor as processor
        options = {k: v for k, v in self.engine_options.items() if v is not None}
        if self.device == "cpu":
            options.pop("gpu_memory_utilization")
        self._llm = LLM(model=self.source, dtype=self.dtype, seed=0,
                        trust_remote_code=self.trust_remote_code,
                        logits_processors=[processor],
                        additional_config={CONFIG_KEY: semsam}, **options)
        self._engine_key = key
        return self._llm

    def close(self) -> None:
        """Shut the engine down (frees its memory and worker processes)."""
        if self._llm is not None:
            engine = getattr(self._llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None)
            if callable(shutdown):
                shutdown()
            self._llm = None
            self._engine_key = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: vLLM's modules may be gone already
            pass

    # ---------------------------------------------------------------- prompts
    def _conversation(self, text: str, media: Any) -> list[dict[str, Any]]:
        return conversation(text, media, self.has_video)

    def prompt(self, request: Request) -> dict[str, Any]:
        """vLLM's prompt for one request: the chat-templated text and its media."""
        from PIL import Image

        media = request.media
        prompt: dict[str, Any] = {"prompt": self.processor.apply_chat_template(
            self._conversation(request.text, media), tokenize=False,
            add_generation_prompt=True)}
        if isinstance(media, np.ndarray):
            if self.has_video:
                metadata = {"fps": self.video_fps, "total_num_frames": len(media),
                            "frames_indices": list(range(len(media))),
                            "do_sample_frames": False}
                prompt["multi_modal_data"] = {"video": [(media, metadata)]}
                prompt["mm_processor_kwargs"] = {"do_sample_frames": False}
            else:
                prompt["multi_modal_data"] = {"image": [Image.fromarray(f) for f in media]}
                if self.image_kwargs:
                    prompt["mm_processor_kwargs"] = dict(self.image_kwargs)
        elif media is not None:
            prompt["multi_modal_data"] = {"image": media}
            if self.image_kwargs:
                prompt["mm_processor_kwargs"] = dict(self.image_kwargs)
        return prompt

    # ---------------------------------------------------------------- generation
    def generate(self, requests: Sequence[Request],
                 decode: DecodeSettings) -> list[Generation]:
        """Decode each request with the processor deciding every token (temperature 0).

        The token count includes the end-of-turn token; vLLM stops there, as ``generate``
        does in the hf backend.
        """
        from vllm import SamplingParams

        from mislib.semsam.vllm_v1 import ARM_KEY

        if not requests:
            return []
        if decode.arm == "semsam" and decode.table_path is None:
            raise ValueError("the semsam arm needs the neighbour table: "
                             "DecodeSettings.table_path is None")
        llm = self._engine(decode)
        if decode.reasoning_budget:
            return self._generate_budgeted(llm, requests, decode)
        params = [SamplingParams(temperature=0.0, seed=int(r.seed),
                                 max_tokens=int(decode.max_new_tokens),
                                 skip_special_tokens=True, extra_args={ARM_KEY: decode.arm})
                  for r in requests]
        outputs = llm.generate([self.prompt(r) for r in requests], params, use_tqdm=False)
        results = []
        for out in outputs:
            completion = out.outputs[0]
            tokens = tuple(int(t) for t in completion.token_ids)
            # decoded here, not vLLM's incremental text (which holds back a trailing partial
            # UTF-8 character), so both backends record the same text for the same tokens
            results.append(Generation(self.tokenizer.decode(tokens, skip_special_tokens=True),
                                      len(tokens), tokens))
        return results

    def _generate_budgeted(self, llm: Any, requests: Sequence[Request],
                           decode: DecodeSettings) -> list[Generation]:
        """Budget forcing in two ``generate`` calls (:mod:`mislib.inference.thinking`):
        first at most ``reasoning_budget`` tokens, stopping at ``</think>``; then the
        requests that go on, their prompts extended by the first call's tokens (and the
        forced ``</think>`` + ``Answer:``), with SemSam's draws keyed past them."""
        from vllm import SamplingParams

        from mislib.semsam.vllm_v1 import ARM_KEY, STEP_OFFSET_KEY

        markers = think_markers(self.tokenizer, self.model_id)
        suffix = forced_suffix_ids(self.tokenizer)
        prompts = [self.prompt(r) for r in requests]
        opened = [prompt_opens_think(p["prompt"]) for p in prompts]
        eos = eos_ids(self.generation_config, self.tokenizer)
        first_params = [SamplingParams(temperature=0.0, seed=int(r.seed),
                                       max_tokens=int(decode.reasoning_budget),
                                       stop_token_ids=[markers[1]], skip_special_tokens=True,
                                       extra_args={ARM_KEY: decode.arm}) for r in requests]
        first = []
        for out in llm.generate(prompts, first_params, use_tqdm=False):
            completion = out.outputs[0]
            tokens = [int(t) for t in completion.token_ids]
            if completion.stop_reason == markers[1] and tokens[-1:] != [markers[1]]:
                tokens.append(markers[1])  # a stop token vLLM left out of the output
            first.append(tokens)
        plans = [plan_phase_two(row, decode.reasoning_budget, eos, markers, o,
                                decode.max_new_tokens, decode.forced_answer_tokens, suffix)
                 for row, o in zip(first, opened, strict=True)]
        first = [plan.kept(row) for row, plan in zip(first, plans, strict=True)]
        tokens = [row + list(plan.append) for row, plan in zip(first, plans, strict=True)]
        second: list[list[int]] = [[] for _ in requests]
        index = [i for i, plan in enumerate(plans) if plan.action != "done"]
        if index:
            # the prompt as token ids (placeholders not expanded: vLLM expands them with
            # the media, as it does for the text prompt) followed by what was generated
            continued = []
            for i in index:
                prompt = {k: v for k, v in prompts[i].items() if k != "prompt"}
                prompt["prompt_token_ids"] = self.tokenizer.encode(
                    prompts[i]["prompt"], add_special_tokens=False) + tokens[i]
                continued.append(prompt)
            params = [SamplingParams(temperature=0.0, seed=int(requests[i].seed),
                                     max_tokens=int(plans[i].max_tokens),
                                     skip_special_tokens=True,
                                     extra_args={ARM_KEY: decode.arm,
                                                 STEP_OFFSET_KEY: len(tokens[i])})
                      for i in index]
            for i, out in zip(index, llm.generate(continued, params, use_tqdm=False),
                              strict=True):
                second[i] = [int(t) for t in out.outputs[0].token_ids]
        results = []
        for head, plan, tail, o in zip(first, plans, second, opened, strict=True):
            # the text and ids hold the appended suffix; the counts only generated tokens
            row = head + list(plan.append) + tail
            thinking, answer = generated_counts(head, plan, tail, markers, o)
            results.append(Generation(self.tokenizer.decode(row, skip_special_tokens=True),
                                      thinking + answer, tuple(row), thinking_tokens=thinking,
                                      answer_tokens=answer, forced_answer=plan.forced))
        return results

