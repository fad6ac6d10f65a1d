"""Stage 04: run a vision-language model on the benchmark, in the baseline and SemSam arms.

One call of :func:`run_inference` answers every selected question ``n_trials`` times with
one model in one arm and writes ``data/results/<run_id>/``:

- ``run.json`` — what the answers depend on: model id and revision, processor settings
  (pixel budgets, frames, fps), decode settings, the SemSam table's hash and k, the
  questions file's hash; plus, per session that added records, package versions and git
  commit. ``run_id`` is a hash of the parts the answers depend on, so a rerun with the
  same configuration finds and resumes the same folder;
- ``shards/*.jsonl`` — one JSON object per finished (question, trial), appended and
  flushed after every batch, one shard per process. A run killed at any moment resumes:
  finished keys are skipped and a torn last line is ignored;
- ``responses.parquet`` — the shards compacted, one row per (question, trial) with
  ``run_id, model, arm, question_id, trial, seed, raw_text, parsed, parse_status, correct,
  n_tokens, latency_s`` and ``status, error, batch_size``. ``n_tokens`` counts generated
  tokens up to and including the end-of-turn token; ``latency_s`` is the wall time of the
  ``generate`` call that produced the record, shared by its ``batch_size`` rows.

Both arms decode through the same :class:`mislib.semsam.SemSamLogitsProcessor` with
``generate(do_sample=False)``: the baseline arm with re-scoring off. Seeds depend on the
profile seed, the question and the trial only, so the arms are paired draw for draw.

Records that could not be produced normally keep their own ``status`` instead of being
lost: ``missing_input`` (image or stack file absent; no generation), ``unknown_family``
(generated, kept raw, not parsed), ``oom`` (out of memory even at batch size 1). A batch
that runs out of memory is halved and retried, and later batches keep the smaller size.

>>> result = run_inference(profile="demo", arm="semsam", limit=8)    # doctest: +SKIP
>>> pd.read_parquet(result.responses).groupby("parse_status").size()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from mislib.config import (
    config_hash,
    file_digest,
    is_fresh,
    load_profile,
    stage_params,
    write_stamp,
)
from mislib.paths import REPO_ROOT, project_paths
from mislib.scoring import FAMILIES, is_correct, parse_answer

log = logging.getLogger(__name__)

ARMS = ("baseline", "semsam")
BACKENDS = ("hf",)
RECORD_STATUSES = ("ok", "missing_input", "unknown_family", "oom")
#: Columns of ``responses.parquet``, in order.
RESPONSE_COLUMNS = ("run_id", "model", "arm", "question_id", "trial", "seed", "raw_text",
                    "parsed", "parse_status", "correct", "n_tokens", "latency_s", "status",
                    "error", "batch_size")
#: Packages whose versions go into ``run.json``.
RECORDED_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas",
                     "pillow", "mislib")


@dataclass(frozen=True)
class InferenceRun:
    """Where one (model, arm) run lives and what this call did.

    Attributes
    ----------
    run_id : the folder name under ``data/results``.
    run_dir : ``data/results/<run_id>``.
    responses : ``run_dir / "responses.parquet"``.
    n_records : rows of ``responses.parquet`` (selected questions x trials).
    n_generated : records this call produced (0 when everything was already done).
    wall_s : seconds spent producing them.
    """

    run_id: str
    run_dir: Path
    responses: Path
    n_records: int
    n_generated: int
    wall_s: float

    @property
    def questions_per_s(self) -> float:
        """Records (question, trial pairs) produced per second by this call."""
        return self.n_generated / self.wall_s if self.wall_s > 0 else float("nan")


# ----------------------------------------------------------------------------------------
# Questions, seeds and inputs
# ----------------------------------------------------------------------------------------
def trial_seed(base_seed: int, question_id: str, trial: int) -> int:
    """The seed of one (question, trial): the same in every arm and for every model.

    A hash, not a counter, so it does not depend on which questions are selected, on the
    batch a record lands in, or on how often the run was resumed.
    """
    digest = hashlib.sha256(f"{int(base_seed)}:{question_id}:{int(trial)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def select_questions(questions: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """The first ``limit`` questions in a seeded, file-order-independent shuffle.

    ``limit`` of None or 0 keeps all. Stage 03 balances factor cells over the whole table,
    so a head of the file would not be a fair sample; a hash of each id is.
    """
    if "question_id" not in questions.columns:
        raise ValueError("questions table has no 'question_id' column")
    duplicated = questions["question_id"][questions["question_id"].duplicated()]
    if len(duplicated):
        raise ValueError(f"questions table repeats question_id {duplicated.iloc[0]!r}")
    order = np.argsort([trial_seed(seed, qid, -1) for qid in questions["question_id"]],
                       kind="stable")
    picked = questions.iloc[order]
    if limit:
        picked = picked.iloc[: int(limit)]
    return picked.reset_index(drop=True)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def input_kind(question: Mapping[str, Any]) -> str:
    """``"text"`` (no image), ``"video"`` (a 3D stack folder) or ``"image"`` (a 2D PNG)."""
    path = question.get("image_path")
    if _is_missing(path) or str(path) == "":
        return "text"
    return "video" if str(question.get("dims")) == "3d" else "image"


def load_media(question: Mapping[str, Any], benchmark_dir: Path) -> Any:
    """The picture(s) of one question.

    Returns
    -------
    None for a text-only question; a ``PIL.Image`` (RGB) for a 2D question; for a 3D
    stack a uint8 array ``[n_frames, height, width, 3]`` of its ``frame_*.png`` in order.

    Raises
    ------
    FileNotFoundError
        Naming the missing file or folder (or a stack folder without frames).
    """
    from PIL import Image

    kind = input_kind(question)
    if kind == "text":
        return None
    path = benchmark_dir / str(question["image_path"])
    if kind == "image":
        if not path.is_file():
            raise FileNotFoundError(f"question {question['question_id']}: image not found: {path}")
        with Image.open(path) as im:
            return im.convert("RGB")
    if not path.is_dir():
        raise FileNotFoundError(f"question {question['question_id']}: stack folder not found: "
                                f"{path}")
    frames = sorted(path.glob("frame_*.png"))
    if not frames:
        raise FileNotFoundError(f"question {question['question_id']}: no frame_*.png in {path}")
    arrays = []
    for frame in frames:
        with Image.open(frame) as im:
            arrays.append(np.asarray(im.convert("RGB")))
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"question {question['question_id']}: frames of {path} differ in size")
    return np.stack(arrays)


def question_prompt(question: Mapping[str, Any], instruction: str = "") -> str:
    """The user text: the question, then ``instruction`` with ``{options}`` filled in.

    Stage 03's questions already end with the answer format they expect, so profiles
    leave ``instruction`` empty; a template such as ``"Answer with one of: {options}."``
    serves question tables that do not.
    """
    choices = question.get("choices")
    options = [] if _is_missing(choices) else [str(c) for c in list(choices)]
    text = str(question["text"]).strip()
    if instruction and options:
        text = f"{text}\n{instruction.format(options=', '.join(options))}"
    return text


def _question_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    """A parquet row as plain Python values (lists for ``choices``)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------
# The hf backend
# ----------------------------------------------------------------------------------------
def _is_oom(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text
                                                or "can't allocate memory" in text)


def resolve_model(model_id: str, root: str | os.PathLike | None = None) -> tuple[str, str]:
    """Where to load ``model_id`` from, and its revision.

    ``smoke:tiny-qwen3-vl`` is the demo's randomly initialised model (built on first use,
    revision = its spec hash); an existing folder is loaded as is (revision = a hash of its
    ``config.json`` and weight index); anything else is a Hugging Face hub id, loaded from
    the local cache when offline (revision resolved after loading).
    """
    from mislib.smoke import SMOKE_MODEL_ID, smoke_model_dir

    if model_id == SMOKE_MODEL_ID:
        folder = smoke_model_dir(root)
        return str(folder), json.loads((folder / "smoke.json").read_text())["spec_hash"]
    if model_id.startswith("smoke:"):
        raise ValueError(f"unknown smoke model {model_id!r}; the only one is {SMOKE_MODEL_ID!r}")
    folder = Path(model_id).expanduser()
    if folder.is_dir():
        digest = hashlib.sha256()
        for name in ("config.json", "model.safetensors.index.json", "model.safetensors"):
            if (folder / name).is_file() and (folder / name).stat().st_size < 64 << 20:
                digest.update((folder / name).read_bytes())
            elif (folder / name).is_file():
                digest.update(str((folder / name).stat().st_size).encode())
        return str(folder), "local-" + digest.hexdigest()[:12]
    return model_id, "main"


class HFBackend:
    """A transformers image-text-to-text model with its own processor and chat template.

    Loads Qwen3-VL checkpoints as ``Qwen3VLForConditionalGeneration`` and any other VLM
    through ``AutoModelForImageTextToText``; safetensors only, ``trust_remote_code=False``.
    On CUDA it runs in bf16 with sdpa attention, on CPU in fp32. 2D questions pass a
    picture; 3D stacks pass their frames as a video (``do_sample_frames=False`` and
    metadata ``fps``, so every frame given is used and time stamps are frame numbers);
    models without a video processor get the frames as a sequence of pictures.

    Parameters
    ----------
    model_id : a hub id, a local folder or ``smoke:tiny-qwen3-vl``.
    root : project root (for the smoke model's cache).
    device : ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    video_fps : frames per second declared for stacks (Qwen3-VL writes time stamps).
    """

    def __init__(self, model_id: str, root: str | os.PathLike | None = None,
                 device: str = "auto", video_fps: float = 1.0):
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        self.model_id = model_id
        source, revision = resolve_model(model_id, root)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.video_fps = float(video_fps)
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"model {model_id!r} cannot be loaded: not a local folder, not in the "
                f"Hugging Face cache, or not a transformers model ({error})") from error
        self.family = config.model_type
        kwargs = {"dtype": self.dtype, "trust_remote_code": False, "use_safetensors": True}
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
                raise ValueError(f"model {model_id!r} (model_type {self.family!r}) is not an "
                                 "image-text-to-text model transformers knows") from error
            raise
        self.processor = AutoProcessor.from_pretrained(source, trust_remote_code=False)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation continues on the right
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.revision = getattr(config, "_commit_hash", None) or revision
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = sorted(set(eos) | {self.tokenizer.eos_token_id} - {None})
        self.has_video = getattr(self.processor, "video_processor", None) is not None

    # What run.json records about the processor: anything that changes the pixels or tokens
    # the model sees.
    def settings(self) -> dict[str, Any]:
        def sizes(proc: Any) -> dict[str, Any]:
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

        return {"family": self.family, "model_class": type(self.model).__name__,
                "processor_class": type(self.processor).__name__,
                "image_processor": sizes(getattr(self.processor, "image_processor", None)),
                "video_processor": sizes(getattr(self.processor, "video_processor", None)),
                "video_as": "video" if self.has_video else "images",
                "video_fps": self.video_fps, "do_sample_frames": False,
                "chat_template_sha": hashlib.sha256(
                    str(self.processor.chat_template or "").encode()).hexdigest()[:16],
                "device": self.device.type, "dtype": str(self.dtype).removeprefix("torch."),
                # without transformers_version, so an upgrade alone does not start a new run
                "generation_config": {k: v for k, v in
                                      self.model.generation_config.to_diff_dict().items()
                                      if k != "transformers_version"}}

    def input_embeddings(self):
        """The input-embedding matrix ``[V, d]`` (SemSam's neighbourhood space)."""
        return self.model.get_input_embeddings().weight

    def _conversation(self, text: str, media: Any) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = []
        if isinstance(media, np.ndarray):
            if self.has_video:
                content.append({"type": "video"})
            else:
                content += [{"type": "image"} for _ in range(len(media))]
        elif media is not None:
            content.append({"type": "image"})
        content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]

    def prepare(self, prompts: Sequence[tuple[str, Any]]):
        """Tokenised, padded model inputs for ``[(user text, media), ...]`` on the device."""
        from PIL import Image

        texts, images, videos, metadata = [], [], [], []
        for text, media in prompts:
            texts.append(self.processor.apply_chat_template(
                self._conversation(text, media), tokenize=False, add_generation_prompt=True))
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

    def generate(self, prompts: Sequence[tuple[str, Any]], logits_processor: Any,
                 max_new_tokens: int) -> list[tuple[str, int]]:
        """Decode each prompt; returns ``[(text, number of generated tokens), ...]``.

        ``do_sample=False`` and no warpers: the logits processor makes every choice.
        The token count includes the end-of-turn token and excludes padding after it.
        """
        import torch

        inputs = self.prepare(prompts)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=int(max_new_tokens), do_sample=False,
                temperature=None, top_k=None, top_p=None, num_beams=1,
                logits_processor=logits_processor, pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:].cpu()
        results = []
        for row in new.tolist():
            n = len(row)
            for i, token in enumerate(row):
                if token in self.eos_ids:
                    n = i + 1
                    break
            results.append((self.tokenizer.decode(row[:n], skip_special_tokens=True), n))
        return results


def load_backend(backend: str, model_id: str, root: str | os.PathLike | None = None,
                 device: str = "auto", video_fps: float = 1.0) -> HFBackend:
    """A loaded backend; the last one is kept, so both arms of a model load it once."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown inference backend {backend!r}; available: {BACKENDS}")
    source, _ = resolve_model(model_id, root)
    if Path(source).is_dir():
        source = str(Path(source).resolve())
    key = (backend, model_id, source, device, float(video_fps))
    if _BACKEND_CACHE.get("key") == key:
        return _BACKEND_CACHE["backend"]
    _BACKEND_CACHE.clear()  # free the previous model before loading the next
    loaded = HFBackend(model_id, root=root, device=device, video_fps=video_fps)
    _BACKEND_CACHE.update(key=key, backend=loaded)
    return loaded


_BACKEND_CACHE: dict[str, Any] = {}


# ----------------------------------------------------------------------------------------
# SemSam
# ----------------------------------------------------------------------------------------
def semsam_table(backend: HFBackend, k: int, root: str | os.PathLike | None = None,
                 progress: bool = True):
    """The model's neighbour table, built once and cached under ``.cache/semsam``."""
    from mislib import semsam

    embeddings = backend.input_embeddings().detach()
    mask = semsam.content_token_mask(backend.tokenizer, embeddings.shape[0])
    return semsam.cached_neighbor_table(embeddings, mask, int(k),
                                        cache_dir=project_paths(root).cache / "semsam",
                                        progress=progress)


def make_logits_processor(table: Any, arm: str, seeds: Sequence[int],
                          decode: Mapping[str, Any]):
    """The decision rule of one batch: SemSam re-scoring (``semsam``) or not (``baseline``)."""
    from transformers import LogitsProcessorList

    from mislib.semsam import SemSamLogitsProcessor

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms: {ARMS}")
    return LogitsProcessorList([SemSamLogitsProcessor(
        table, temperature=decode["temperature"], top_k=decode["top_k"],
        top_p=decode["top_p"], mode=decode["mode"], rescore=(arm == "semsam"),
        seed=list(seeds))])


# ----------------------------------------------------------------------------------------
# The resumable store
# ----------------------------------------------------------------------------------------
def read_shards(shard_dir: Path) -> list[dict[str, Any]]:
    """Every complete record in ``shard_dir/*.jsonl``, first occurrence of each key kept.

    A line that does not parse (the torn tail of a killed writer) is skipped with a
    warning naming the shard; so is a record without ``question_id``/``trial``.
    """
    records: dict[tuple[str, int], dict[str, Any]] = {}
    for shard in sorted(shard_dir.glob("*.jsonl")):
        with shard.open("r", encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    key = (str(record["question_id"]), int(record["trial"]))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    log.warning("%s line %d: incomplete record skipped", shard, number)
                    continue
                records.setdefault(key, record)
    return list(records.values())


class ShardWriter:
    """Appends records to one new shard file; each batch is flushed and fsynced."""

    def __init__(self, shard_dir: Path):
        shard_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self.path = shard_dir / f"part-{stamp}-{os.getpid()}.jsonl"
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        # One write call per batch, so a kill leaves at most the batch's last line torn.
        blob = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n"
                       for r in records)
        self._fh.write(blob)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()
        if self.path.stat().st_size == 0:
            self.path.unlink()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def compact(run_dir: Path, keys: Sequence[tuple[str, int]] | None = None) -> pd.DataFrame:
    """Write ``responses.parquet`` from the shards (only ``keys`` when given), atomically."""
    for stale in run_dir.glob(".responses.*.parquet"):  # left by a compaction killed midway
        stale.unlink(missing_ok=True)
    records = read_shards(run_dir / "shards")
    frame = pd.DataFrame.from_records(records, columns=list(RESPONSE_COLUMNS))
    if keys is not None:
        order = {key: i for i, key in enumerate(keys)}
        rank = [order.get((str(q), int(t))) for q, t in zip(frame["question_id"],
                                                             frame["trial"], strict=True)]
        frame = frame.assign(_rank=rank).dropna(subset=["_rank"]).sort_values("_rank")
        frame = frame.drop(columns="_rank").reset_index(drop=True)
    frame = frame.astype({"trial": "int64", "seed": "int64", "batch_size": "int64"})
    frame["correct"] = frame["correct"].astype("boolean")
    frame["n_tokens"] = frame["n_tokens"].astype("Int64")
    tmp = run_dir / f".responses.{os.getpid()}.parquet"
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, run_dir / "responses.parquet")
    return frame


# ----------------------------------------------------------------------------------------
# Run record
# ----------------------------------------------------------------------------------------
def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """``HEAD`` of the repository mislib runs from, with ``-dirty`` if files changed."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"], check=True, capture_output=True,
                               text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def _slug(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", model_id.rsplit("/", 1)[-1]).strip("-").lower()


# ----------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------
def _decode_settings(params: Mapping[str, Any], semsam_params: Mapping[str, Any]) -> dict:
    return {"temperature": float(semsam_params["temperature"]),
            "top_k": int(semsam_params["top_k"]), "top_p": float(semsam_params["top_p"]),
            "mode": str(semsam_params["mode"]), "k": int(semsam_params["k"]),
            "max_new_tokens": int(params["max_new_tokens"]), "do_sample": False,
            "seed": int(params["seed"]), "instruction": str(params.get("instruction", ""))}


def run_inference(profile: str | Mapping[str, Any] = "demo", arm: str = "baseline",
                  model: str | None = None, limit: int | None = None,
                  out: str | os.PathLike | None = None, force: bool = False,
                  root: str | os.PathLike | None = None, progress: bool = True,
                  generate_hook: Callable | None = None, **overrides: Any) -> InferenceRun:
    """Answer the benchmark's questions with one model in one arm; resumable.

    Parameters
    ----------
    profile : profile name, TOML path or loaded mapping; its ``[inference]`` and
        ``[semsam]`` tables set the knobs.
    arm : ``"baseline"`` or ``"semsam"``.
    model : model id (default: the profile's first ``models`` entry).
    limit : at most this many questions (default: the profile's ``limit``; 0 = all).
    out : results folder (default ``<root>/data/results``).
    force : start this run's records over instead of resuming.
    root : project root (default: the repository or ``$MISGROUND_ROOT``).
    progress : show a tqdm bar (records per second).
    generate_hook : test seam; wraps the backend's ``generate`` (e.g. to inject an
        out-of-memory error). ``None`` in normal use.
    **overrides : other ``[inference]`` keys (``n_trials``, ``batch_size``,
        ``max_new_tokens``, ``device``, ...).

    Returns
    -------
    InferenceRun
        The run's folder, its ``responses.parquet`` and this call's throughput.

    Raises
    ------
    FileNotFoundError
        When ``questions.parquet`` is absent (run stage 03 first).
    ValueError
        Unknown arm, backend or model id.
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms: {ARMS}")
    prof = load_profile(profile) if not isinstance(profile, Mapping) else profile
    params = stage_params(prof, "inference", limit=limit, **overrides)
    semsam_params = stage_params(prof, "semsam")
    model_id = model or params["models"][0]
    paths = project_paths(root)
    questions_file = paths.benchmark / "questions.parquet"
    if not questions_file.is_file():
        raise FileNotFoundError(f"{questions_file} not found: run stage 03 "
                                "(notebooks/03_question_generation) first")
    results_dir = Path(out) if out is not None else paths.results
    decode = _decode_settings(params, semsam_params)
    request = {"model": model_id, "arm": arm, "backend": params["backend"],
               "device": params.get("device", "auto"), "video_fps": params.get("video_fps", 1.0),
               "n_trials": int(params["n_trials"]), "limit": int(params["limit"] or 0),
               "batch_size": int(params["batch_size"]), "decode": decode,
               "questions_sha": file_digest(questions_file)}
    stage = f"inference-{_slug(model_id)}-{arm}"
    stamp = results_dir / f".{stage}.stage.json"
    if not force and stamp.is_file():
        recorded = json.loads(stamp.read_text())
        if is_fresh(results_dir, stage, request, recorded.get("outputs", [])):
            run_dir = results_dir / recorded["outputs"][0].split("/")[0]
            n = len(pd.read_parquet(run_dir / "responses.parquet", columns=["trial"]))
            return InferenceRun(run_dir.name, run_dir, run_dir / "responses.parquet", n, 0, 0.0)

    questions = select_questions(pd.read_parquet(questions_file), request["limit"],
                                 decode["seed"])
    backend = load_backend(params["backend"], model_id, root=root, device=request["device"],
                           video_fps=request["video_fps"])
    table = semsam_table(backend, decode["k"], root=root, progress=progress)
    settings = backend.settings()
    identity = {"model": model_id, "revision": backend.revision, "arm": arm,
                "backend": params["backend"], "processor": settings, "decode": decode,
                "semsam_table": {"hash": table.key, "k": decode["k"]},
                "questions_sha": request["questions_sha"]}
    run_id = f"{_slug(model_id)}-{arm}-{config_hash(identity)[:10]}"
    run_dir = results_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    with _locked(run_dir):
        if force:
            shutil.rmtree(run_dir / "shards", ignore_errors=True)
            for stale in ("responses.parquet", "run.json"):
                (run_dir / stale).unlink(missing_ok=True)
        return _run_locked(run_dir, run_id, identity, params, paths, questions_file,
                           questions, request, decode, backend, table, arm, model_id,
                           results_dir, stage, generate_hook, progress)


@contextlib.contextmanager
def _locked(run_dir: Path):
    """An exclusive lock on ``run_dir``, so two processes never append the same records.

    The lock is ``flock`` on ``run_dir/.lock``: the kernel releases it when the holder
    exits, however it exits, so a killed run never leaves a stale lock behind.
    """
    import fcntl

    with (run_dir / ".lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{run_dir} is being written by another process right now; "
                               "wait for it to finish or stop it") from None
        yield


def _run_locked(run_dir, run_id, identity, params, paths, questions_file, questions, request,
                decode, backend, table, arm, model_id, results_dir, stage, generate_hook,
                progress) -> InferenceRun:
    """The body of :func:`run_inference` once the run's folder is locked."""
    run_record = {"run_id": run_id, **identity, "profile": params["profile"],
                  "questions_file": str(questions_file.relative_to(paths.root))
                  if questions_file.is_relative_to(paths.root) else str(questions_file),
                  "sessions": []}
    if (run_dir / "run.json").is_file():
        run_record["sessions"] = json.loads((run_dir / "run.json").read_text()).get(
            "sessions", [])

    keys = [(str(q), t) for q in questions["question_id"] for t in range(request["n_trials"])]
    done = {(r["question_id"], int(r["trial"])) for r in read_shards(run_dir / "shards")}
    todo = [key for key in keys if key not in done]
    by_id = {str(row["question_id"]): _question_dict(row)
             for row in questions.to_dict(orient="records")}
    # Same input kind together (text / image / video), so batches pad little.
    kind_rank = {"text": 0, "image": 1, "video": 2}
    todo.sort(key=lambda key: kind_rank[input_kind(by_id[key[0]])])

    session = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "git_commit": git_commit(), "packages": package_versions(),
               "n_questions": len(questions), "n_trials": request["n_trials"],
               "n_todo": len(todo)}
    run_record["sessions"].append(session)
    _atomic_write_text(run_dir / "run.json", json.dumps(run_record, indent=2, default=str))

    generate = backend.generate if generate_hook is None else generate_hook(backend.generate)
    t0 = time.perf_counter()
    n_generated = 0
    if todo:
        writer = ShardWriter(run_dir / "shards")
        bar = tqdm(total=len(todo), unit="q", desc=f"{_slug(model_id)} {arm}",
                   disable=not progress, dynamic_ncols=True)
        try:
            state = {"batch_size": max(1, request["batch_size"])}
            position = 0
            while position < len(todo):
                chunk = todo[position: position + state["batch_size"]]
                position += len(chunk)
                records = _run_batch(chunk, by_id, paths.benchmark, generate, table, arm,
                                     decode, run_id, model_id, state)
                writer.write(records)
                n_generated += len(records)
                bar.update(len(records))
        finally:
            bar.close()
            writer.close()
    wall = time.perf_counter() - t0

    frame = compact(run_dir, keys)
    missing = set(keys) - set(zip(frame["question_id"], frame["trial"], strict=True))
    if missing:
        raise RuntimeError(f"{run_dir}: {len(missing)} records missing after the run, e.g. "
                           f"{sorted(missing)[0]}")
    session.update(finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   n_generated=n_generated, wall_s=round(wall, 3))
    run_record["n_records"] = len(frame)
    run_record["status_counts"] = frame["status"].value_counts().to_dict()
    _atomic_write_text(run_dir / "run.json", json.dumps(run_record, indent=2, default=str))
    write_stamp(results_dir, stage, request, [f"{run_id}/responses.parquet"])
    return InferenceRun(run_id, run_dir, run_dir / "responses.parquet", len(frame),
                        n_generated, wall)


def _record(key: tuple[str, int], run_id: str, model_id: str, arm: str, seed: int,
            **fields: Any) -> dict[str, Any]:
    base = {"run_id": run_id, "model": model_id, "arm": arm, "question_id": key[0],
            "trial": key[1], "seed": seed, "raw_text": None, "parsed": None,
            "parse_status": None, "correct": False, "n_tokens": None, "latency_s": None,
            "status": "ok", "error": None, "batch_size": 0}
    base.update(fields)
    return base


def _run_batch(chunk: Sequence[tuple[str, int]], by_id: Mapping[str, dict], benchmark: Path,
               generate: Callable, table: Any, arm: str, decode: Mapping[str, Any],
               run_id: str, model_id: str, state: dict[str, int]) -> list[dict[str, Any]]:
    """Records for one batch of keys, none lost: inputs that fail get their own status."""
    records: list[dict[str, Any]] = []
    ready: list[tuple[tuple[str, int], int, str, Any]] = []
    for key in chunk:
        question = by_id[key[0]]
        seed = trial_seed(decode["seed"], key[0], key[1])
        try:
            media = load_media(question, benchmark)
        except (FileNotFoundError, ValueError, OSError) as error:
            log.warning("%s", error)
            records.append(_record(key, run_id, model_id, arm, seed, status="missing_input",
                                   error=str(error)))
            continue
        ready.append((key, seed, question_prompt(question, decode["instruction"]), media))
    records += _generate_halving(ready, by_id, generate, table, arm, decode, run_id,
                                 model_id, state)
    return records


def _generate_halving(ready: list, by_id: Mapping[str, dict], generate: Callable, table: Any,
                      arm: str, decode: Mapping[str, Any], run_id: str, model_id: str,
                      state: dict[str, int]) -> list[dict[str, Any]]:
    """Generate for ``ready``; on out-of-memory halve the batch (and later ones) and retry."""
    if not ready:
        return []
    t0 = time.perf_counter()
    try:
        outputs = generate([(text, media) for _, _, text, media in ready],
                           make_logits_processor(table, arm, [s for _, s, _, _ in ready],
                                                 decode), decode["max_new_tokens"])
    except Exception as error:
        if not _is_oom(error):
            raise
        _free_memory()
        if len(ready) == 1:
            key, seed = ready[0][0], ready[0][1]
            log.warning("question %s trial %d: out of memory at batch size 1", *key)
            return [_record(key, run_id, model_id, arm, seed, status="oom",
                            error=str(error)[:500], batch_size=1)]
        half = len(ready) // 2
        state["batch_size"] = max(1, min(state["batch_size"], half))
        log.warning("out of memory at batch size %d: retrying in halves", len(ready))
        return (_generate_halving(ready[:half], by_id, generate, table, arm, decode, run_id,
                                  model_id, state)
                + _generate_halving(ready[half:], by_id, generate, table, arm, decode, run_id,
                                    model_id, state))
    latency = time.perf_counter() - t0
    records = []
    for (key, seed, _, _), (text, n_tokens) in zip(ready, outputs, strict=True):
        question = by_id[key[0]]
        fields: dict[str, Any] = {"raw_text": text, "n_tokens": int(n_tokens),
                                  "latency_s": latency, "batch_size": len(ready)}
        if question.get("family") not in FAMILIES:
            fields.update(status="unknown_family",
                          error=f"question {key[0]}: unknown family {question.get('family')!r}"
                                f"; expected one of {FAMILIES}")
        else:
            value, status = parse_answer(text, question)
            fields.update(parsed=value, parse_status=status,
                          correct=bool(is_correct(value, status, question)))
        records.append(_record(key, run_id, model_id, arm, seed, **fields))
    return records


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarise_runs(run_dirs: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per run: model, arm, records, statuses and throughput over all its sessions.

    ``questions_per_s`` is records produced per second of generation, summed over the
    sessions in ``run.json`` (a resumed run counts every session that added records).
    """
    rows = []
    for run_dir in map(Path, run_dirs):
        record = json.loads((run_dir / "run.json").read_text())
        frame = pd.read_parquet(run_dir / "responses.parquet",
                                columns=["status", "parse_status", "correct", "n_tokens"])
        sessions = [s for s in record.get("sessions", []) if s.get("n_generated")]
        generated = sum(s["n_generated"] for s in sessions)
        wall = sum(s.get("wall_s") or 0.0 for s in sessions)
        rows.append({
            "run_id": record["run_id"], "model": record["model"], "arm": record["arm"],
            "device": record.get("processor", {}).get("device"),
            "n_records": len(frame), "n_ok": int((frame["status"] == "ok").sum()),
            "n_parsed": int((frame["parse_status"] == "ok").sum()),
            "n_unparseable": int((frame["parse_status"] == "unparseable").sum()),
            "n_ambiguous": int((frame["parse_status"] == "ambiguous").sum()),
            "accuracy": float(frame["correct"].fillna(False).astype(bool).mean()),
            "mean_tokens": float(frame["n_tokens"].astype(float).mean()),
            "questions_per_s": generated / wall if wall > 0 else float("nan"),
        })
    return pd.DataFrame(rows)


def current_runs(results_dir: str | os.PathLike | None = None) -> list[Path]:
    """The run folder that the latest finished call wrote for each (model, arm).

    Every configuration change (model revision, decode settings, questions) starts a new
    ``<run_id>`` folder and leaves the old one in place; the stage stamps
    ``.inference-<model>-<arm>.stage.json`` name the current one. Later stages that
    should see one run per (model, arm) read these instead of globbing every folder.
    """
    folder = Path(results_dir) if results_dir is not None else project_paths().results
    runs = []
    for stamp in sorted(folder.glob(".inference-*.stage.json")):
        outputs = json.loads(stamp.read_text()).get("outputs") or []
        if outputs and (folder / outputs[0]).is_file():
            runs.append((folder / outputs[0]).parent)
    return runs
