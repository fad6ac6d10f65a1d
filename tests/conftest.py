"""Shared fixtures. Heavy data (the real brain atlas, phantoms) is built once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tmp_root(tmp_path):
    """A throw-away project root for running stages end to end."""
    return tmp_path


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory):
    """A project root whose ``.cache`` holds the tiny Qwen3-VL (built once per session)."""
    from mislib.smoke import smoke_model_dir

    root = tmp_path_factory.mktemp("smoke_root")
    smoke_model_dir(root)
    return root


def require(condition: bool, what: str, how: str) -> None:
    """Skip a test whose optional environment is missing, except in CI, where it fails.

    Tests of the vLLM, lmms-eval and browser paths need environments that ``.ci/run`` builds
    (``how`` says which command). A developer without them sees a skip that names the command;
    CI (``CI=true``) never skips them, so a missing install step fails loudly there.
    """
    if condition:
        return
    message = f"{what} is missing: build it with `{how}`"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)
