"""Profiles and stage configuration hashes.

A *profile* is a named parameter set (``mislib/profiles/<name>.toml``), one TOML table per
stage (``[volumes]``, ``[render]``, ``[questions]``, ``[semsam]``, ``[inference]``,
``[scoring]``, ``[analysis]``, ``[paper]``) plus a top-level ``seed``. Notebooks pass the
profile name through papermill; a notebook cell may override single keys.

Each stage writes a stamp ``.<stage>.stage.json`` beside its outputs holding the hash of
its parameters; :func:`is_fresh` lets a stage skip work whose outputs exist for the same
hash, unless ``force=True``.

>>> params = stage_params("demo", "volumes", slices_per_volume=3)
>>> params["slices_per_volume"]
3
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PROFILE_DIR = Path(__file__).with_name("profiles")
STAGES = ("volumes", "render", "questions", "semsam", "inference", "scoring", "analysis", "paper")


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name: str | os.PathLike = "demo") -> dict[str, Any]:
    """The whole profile as a dict. ``name`` is a profile name or a path to a TOML file."""
    path = Path(name)
    if path.suffix != ".toml":
        path = PROFILE_DIR / f"{name}.toml"
    if not path.is_file():
        raise ValueError(
            f"unknown profile {str(name)!r}: no file {path}; available: {available_profiles()}"
        )
    with path.open("rb") as fh:
        profile = tomllib.load(fh)
    profile.setdefault("name", path.stem)
    return profile


def stage_params(profile: str | Mapping[str, Any], stage: str, **overrides: Any) -> dict[str, Any]:
    """Parameters of one stage: the profile's ``[stage]`` table, ``seed``, then ``overrides``.

    Overrides whose value is ``None`` are ignored, so a notebook's parameters cell can leave
    a knob at ``None`` to mean "the profile's value". Unknown keys are rejected so a typo in
    a notebook cell does not silently do nothing.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    prof = load_profile(profile) if not isinstance(profile, Mapping) else profile
    params = copy.deepcopy(dict(prof.get(stage, {})))
    params.setdefault("seed", prof.get("seed", 0))
    params["profile"] = prof.get("name", "custom")
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in params:
            raise ValueError(
                f"unknown parameter {key!r} for stage {stage!r} of profile "
                f"{params['profile']!r}; known: {sorted(params)}"
            )
        params[key] = value
    return params


def config_hash(params: Mapping[str, Any]) -> str:
    """A short, stable hash of a JSON-serialisable parameter mapping (key order ignored)."""
    blob = json.dumps(params, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    """A short SHA-256 of a file's bytes, read in 1 MiB blocks: stages put the digests of
    their input files into their configuration hash, so new inputs make outputs stale."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _stamp_path(out_dir: Path, stage: str) -> Path:
    return Path(out_dir) / f".{stage}.stage.json"


def is_fresh(out_dir: str | os.PathLike, stage: str, params: Mapping[str, Any],
             outputs: Iterable[str | os.PathLike]) -> bool:
    """True when ``out_dir`` holds a stamp of ``stage`` for these params and every output exists."""
    stamp = _stamp_path(Path(out_dir), stage)
    if not stamp.is_file():
        return False
    try:
        recorded = json.loads(stamp.read_text())
    except json.JSONDecodeError:
        return False
    if recorded.get("hash") != config_hash(params):
        return False
    return all(Path(out_dir, o).exists() for o in outputs)


def write_stamp(out_dir: str | os.PathLike, stage: str, params: Mapping[str, Any],
                outputs: Iterable[str | os.PathLike]) -> Path:
    """Record that ``stage`` produced ``outputs`` (paths relative to ``out_dir``) for ``params``."""
    stamp = _stamp_path(Path(out_dir), stage)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "hash": config_hash(params), "params": dict(params),
              "outputs": [str(o) for o in outputs]}
    stamp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    return stamp


def read_stamp(out_dir: str | os.PathLike, stage: str) -> dict[str, Any] | None:
    stamp = _stamp_path(Path(out_dir), stage)
    return json.loads(stamp.read_text()) if stamp.is_file() else None
