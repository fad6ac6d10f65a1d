"""The model registry: per-model settings from a profile's ``[models.<name>]`` tables.

A profile names the models it runs in ``[inference] models``: each item is either the
name of a ``[models.<name>]`` table (its id, backend, weights dtype, pixel budgets, frames
per stack, whether it thinks and its reasoning budget, SemSam mode, decode overrides,
``trust_remote_code``, size, and an endpoint's settings for the ``openai`` backend) or a
plain model id, which runs with the profile's ``[inference]`` and ``[semsam]`` values, as
profiles without a registry always did. :func:`model_entry` returns the entry with those
profile defaults filled in; the schema itself (:class:`~mislib.config.ModelEntry`) lives
with the other tables in :mod:`mislib.config`, which checks it when a profile loads.

>>> profile = {"inference": {"backend": "hf", "max_new_tokens": 16, "models": ["m"]},
...            "semsam": {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "mode": "argmax"},
...            "models": {"m": {"id": "Qwen/Qwen3-VL-8B-Thinking", "thinks": True,
...                             "reasoning_budget": 512, "semsam_mode": "sample"}}}
>>> entry = model_entry(profile, "m")
>>> entry.id, entry.backend, entry.max_new_tokens, entry.semsam_mode, entry.reasoning_budget
('Qwen/Qwen3-VL-8B-Thinking', 'hf', 16, 'sample', 512)
>>> model_entry(profile, "Qwen/Qwen2.5-VL-7B-Instruct").thinks   # a plain id
False
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mislib.config import (
    EndpointFields,
    ModelEntry,
    ProfileError,
    load_profile,
    model_table_errors,
)

__all__ = ["ModelEntry", "check_remote_code", "endpoint_options", "local_backend_options",
           "model_entries", "model_entry", "model_identity"]

#: Keys of an entry that fall back to the profile: entry key -> (table, key).
PROFILE_DEFAULTS = {"backend": ("inference", "backend"),
                    "max_new_tokens": ("inference", "max_new_tokens"),
                    "temperature": ("semsam", "temperature"), "top_k": ("semsam", "top_k"),
                    "top_p": ("semsam", "top_p"), "semsam_mode": ("semsam", "mode")}


def _profile(profile: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    return profile if isinstance(profile, Mapping) else load_profile(profile)


def model_entry(profile: str | os.PathLike | Mapping[str, Any], name: str) -> ModelEntry:
    """The registry entry ``name`` of ``profile`` (or a plain id's default entry), with the
    profile's ``[inference]`` / ``[semsam]`` values filled in where the entry sets none.

    Raises
    ------
    ProfileError
        The entry breaks the schema (naming ``[models.<name>]`` and the key).
    """
    prof = _profile(profile)
    tables = prof.get("models") or {}
    if name in tables:
        problems = model_table_errors(name, tables[name])
        if problems:
            raise ProfileError(f"profile {prof.get('name', 'custom')!r}: "
                               + "; ".join(problems))
        entry = ModelEntry.model_validate({**tables[name], "name": name})
    else:
        entry = ModelEntry(name=name, id=name)
    fill = {}
    for key, (table, source) in PROFILE_DEFAULTS.items():
        if getattr(entry, key) is None and source in (prof.get(table) or {}):
            fill[key] = prof[table][source]
    return entry.model_copy(update=fill)


def model_entries(profile: str | os.PathLike | Mapping[str, Any],
                  every: bool = False) -> list[ModelEntry]:
    """The entries of the models ``[inference] models`` lists, in its order; with
    ``every=True`` also every other ``[models.<name>]`` table (after them, by name)."""
    prof = _profile(profile)
    names = list((prof.get("inference") or {}).get("models") or [])
    if every:
        names += sorted(set(prof.get("models") or {}) - set(names))
    return [model_entry(prof, name) for name in names]


def model_identity(entry: ModelEntry) -> dict[str, Any]:
    """The entry's settings that change answers beyond the decode settings: the id when it
    differs from the name, the frames per stack, and those the entry sets of the weights
    dtype, pixel budgets and stack mode (the loaded backend's ``settings()`` records their
    effect too, but the stage's freshness check runs before any backend loads, on these).
    Empty for a plain id, so the run ids of profiles without a registry stay what they
    were."""
    out: dict[str, Any] = {}
    if entry.id != entry.name:
        out["id"] = entry.id
    for key in ("frames_per_stack", "dtype", "min_pixels", "max_pixels", "stack_as"):
        if getattr(entry, key) is not None:
            out[key] = getattr(entry, key)
    return out


def local_backend_options(entry: ModelEntry) -> dict[str, Any]:
    """Keyword arguments of the local backends (``hf``, ``vllm``) from an entry: weights
    dtype, pixel budgets, how stacks are passed, remote code; only those the entry sets."""
    out: dict[str, Any] = {key: getattr(entry, key)
                           for key in ("dtype", "min_pixels", "max_pixels", "stack_as")
                           if getattr(entry, key) is not None}
    if entry.trust_remote_code:
        out["trust_remote_code"] = True
    return out


#: Keys of an entry that the openai backend takes as keyword arguments: the fields an entry
#: shares with ``[inference.openai]`` (one definition, :class:`mislib.config.EndpointFields`).
ENDPOINT_KEYS = tuple(EndpointFields.model_fields)


def endpoint_options(entry: ModelEntry) -> dict[str, Any]:
    """Keyword arguments of the ``openai`` backend from an entry: the endpoint, the NAME of
    the key's environment variable, how stacks are sent, prices and limits; only those the
    entry sets (the backend's defaults, then the profile's ``[inference.openai]``, fill the
    rest)."""
    return {key: getattr(entry, key) for key in ENDPOINT_KEYS if getattr(entry, key) is not None}


#: Files of a checkpoint whose ``auto_map`` asks transformers to run the repository's code.
REMOTE_CODE_FILES = ("config.json", "processor_config.json", "preprocessor_config.json",
                     "tokenizer_config.json")


def check_remote_code(source: str, model_id: str, trust_remote_code: bool = False) -> None:
    """Refuse a model whose files map to code of its own repository (``auto_map``) unless
    its entry says ``trust_remote_code = true``.

    Checked before anything is loaded, on the files themselves, because transformers may
    quietly load a built-in class for a known ``model_type`` even where the repository
    ships code meant to replace it.

    Raises
    ------
    ValueError
        Naming the model, the file and the classes it maps, and the key to set.
    """
    if trust_remote_code:
        return
    for name in REMOTE_CODE_FILES:
        path = _checkpoint_file(source, name)
        if path is None:
            continue
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            classes = sorted(auto_map) if isinstance(auto_map, dict) else auto_map
            raise ValueError(
                f"model {model_id!r} needs code from its own repository ({name} maps "
                f"{classes} through auto_map); mislib runs it only when its [models.<name>] "
                "entry says trust_remote_code = true, after you have read that code")


def _checkpoint_file(source: str, name: str) -> str | None:
    """A file of a local folder or a hub repository (the local cache when offline)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        path = folder / name
        return str(path) if path.is_file() else None
    try:
        from transformers.utils import cached_file

        return cached_file(source, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None
