"""Backends by name, and where a model's weights come from.

Backends are listed as ``"module:Class"`` strings and imported only when asked for, so
``import mislib`` (or ``mislib.inference``) never imports vLLM, an HTTP client, or even
torch. Model sources are resolved apart from backends: the same ``smoke:`` id, folder or
hub id means the same weights whichever backend loads them.

>>> sorted(BACKENDS)
['hf', 'openai', 'vllm']
>>> backend_class("no-such")   # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
ValueError: unknown inference backend 'no-such'; available: ['hf', 'openai', 'vllm']
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any

#: name -> "module:Class" of a class implementing :class:`mislib.inference.protocol.Backend`.
BACKENDS: dict[str, str] = {
    "hf": "mislib.inference.backends.hf:HFBackend",
    "vllm": "mislib.inference.backends.vllm:VLLMBackend",
    "openai": "mislib.inference.backends.openai:OpenAIBackend",
}


def backend_class(name: str) -> type:
    """The backend class registered as ``name``, imported now.

    Raises
    ------
    ValueError
        Unknown name, or a registered module that cannot be imported in this environment
        (e.g. ``vllm`` outside ``.venv-vllm``), naming what is missing.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown inference backend {name!r}; available: {sorted(BACKENDS)}")
    module_name, _, class_name = BACKENDS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"inference backend {name!r} cannot be imported here ({error}); "
                         "see the README for the environment it needs") from error
    return getattr(module, class_name)


def resolve_model(model_id: str, root: str | os.PathLike | None = None) -> tuple[str, str]:
    """Where to load ``model_id`` from, and its revision.

    ``smoke:tiny-qwen3-vl`` is the demo's randomly initialised model (built on first use,
    revision = its spec hash), ``smoke:tiny-qwen3-vl-thinking`` the same with a thinking
    chat template; an existing folder is loaded as is (revision = a hash of its
    ``config.json`` and weight index); anything else is a Hugging Face hub id, loaded from
    the local cache when offline (the backend replaces the revision with the commit hash it
    loaded when it can).
    """
    from mislib.smoke import SMOKE_MODELS, smoke_model_dir

    if model_id in SMOKE_MODELS:
        folder = smoke_model_dir(root, model_id)
        return str(folder), json.loads((folder / "smoke.json").read_text())["spec_hash"]
    if model_id.startswith("smoke:"):
        raise ValueError(f"unknown smoke model {model_id!r}; smoke models: {sorted(SMOKE_MODELS)}")
    folder = Path(model_id).expanduser()
    if folder.is_dir():
        digest = hashlib.sha256()
        for name in ("config.json", "model.safetensors.index.json", "model.safetensors"):
            if (folder / name).is_file() and (folder / name).stat().st_size < 64 << 20:
                digest.update((folder / name).read_bytes())
            elif (folder / name).is_file():
                digest.update(str((folder / name).stat().st_size).encode())
        return str(folder.resolve()), "local-" + digest.hexdigest()[:12]
    return model_id, "main"


def checkpoint_input_embeddings(source: str, dtype: Any = None):
    """The text model's input-embedding matrix ``[V, d]``, read from the safetensors files.

    For backends whose model lives elsewhere (vLLM's worker processes, a server): the SemSam
    table is built from this matrix without loading the model. ``source`` is a folder or a
    hub id (its ``*.safetensors`` are fetched, or read from the cache when offline);
    ``dtype`` is the torch dtype to return (the checkpoint's when None), the one the hf
    backend would hold the weights in, so that every backend builds the same table.
    """
    from safetensors import safe_open

    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    found: list[tuple[str, Path]] = []
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            found += [(name, file) for name in fh.keys()
                      if name.endswith("embed_tokens.weight") and "visual" not in name]
    if not found:
        raise ValueError(f"{folder}: no '*embed_tokens.weight' tensor in the weights")
    # a VLM's text model is its language model; prefer that one when several match
    name, file = sorted(found, key=lambda f: ("language_model" not in f[0], f[0]))[0]
    with safe_open(str(file), framework="pt") as fh:
        weight = fh.get_tensor(name)
    return weight if dtype is None else weight.to(dtype)


_LOADED: dict[str, Any] = {}


def load_backend(name: str, model_id: str, root: str | os.PathLike | None = None,
                 **options: Any) -> Any:
    """A loaded backend; the last one is kept, so the arms of one model load it once (a
    kept backend with a ``refresh`` method, the openai one, re-reads its server first).

    Parameters
    ----------
    name : a key of :data:`BACKENDS`.
    model_id : a hub id, a local folder or ``smoke:tiny-qwen3-vl``.
    root : project root (for the smoke model's cache).
    **options : backend options (``device``, ``video_fps``, ...), part of the cache key.
    """
    cls = backend_class(name)
    source, revision = resolve_model(model_id, root)
    key = json.dumps([name, model_id, source, options], sort_keys=True, default=str)
    if _LOADED.get("key") == key:
        kept = _LOADED["backend"]
        if callable(getattr(kept, "refresh", None)):
            # what it depends on outside this process (an endpoint's server) may have
            # changed since it was loaded: asked again
            kept.refresh()
        return kept
    _LOADED.clear()  # free the previous model before loading the next
    loaded = cls(source, model_id=model_id, revision=revision, **options)
    _LOADED.update(key=key, backend=loaded)
    return loaded


def unload_backend() -> None:
    """Drop the kept backend (and its model's memory)."""
    _LOADED.clear()
