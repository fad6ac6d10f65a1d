"""SemSam's vLLM adapters (V1 model runner and Model Runner V2) against vLLM's own interface
types, in ``.venv-vllm`` (``make env-vllm``), without an engine: every decided row is the
pure rule's token for (logits, seed, tokens generated so far, arm), the V1 state follows
vLLM's batch moves, V2's per-slot state follows slot recycling, and bad requests are
refused. Model Runner V2 needs CUDA to run an engine; this is what CPU CI can check of it.
The V1 processor inside a running engine is checked by tests/test_inference_vllm.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import require

from mislib.paths import REPO_ROOT
from mislib.semsam.table import NeighborTable

VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
CHECKS = ("v1_added_rows_decide_as_the_rule", "v1_state_follows_moves_swaps_and_removals",
          "v1_a_request_decides_alike_alone_and_in_a_batch",
          "v1_validate_params_rejects_bad_requests",
          "v2_rows_decide_as_the_rule_by_slot_and_position", "v1_and_v2_decide_alike",
          "v2_recycled_slot_forgets_its_previous_request",
          "v2_batch_without_semsam_requests_is_untouched")


@pytest.fixture(scope="module")
def adapter_checks(tmp_path_factory):
    ok = VLLM_PYTHON.is_file() and subprocess.run(
        [str(VLLM_PYTHON), "-c", "import vllm"], capture_output=True).returncode == 0
    require(ok, "the vLLM environment (.venv-vllm with vllm importable)", "make env-vllm")
    g = torch.Generator().manual_seed(1)
    vocab = 3000
    ids = torch.randint(0, vocab, (vocab, 8), generator=g)
    ids[:, 0] = torch.arange(vocab)
    table = NeighborTable(ids, torch.rand(vocab, 8, generator=g),
                          torch.rand(vocab, generator=g) < 0.99, key="test")
    path = table.save(tmp_path_factory.mktemp("vllm_adapters") / "table.safetensors")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([str(VLLM_PYTHON), str(REPO_ROOT / "tests/scripts/vllm_adapters.py"),
                           str(path)], env=env, capture_output=True, text=True, timeout=600)
    done = {json.loads(line)["check"] for line in proc.stdout.splitlines()
            if line.startswith("{")}
    return proc, done


@pytest.mark.parametrize("check", CHECKS)
def test_vllm_adapter(adapter_checks, check):
    proc, done = adapter_checks
    assert check in done, f"check {check!r} did not pass:\n{proc.stderr[-3000:]}"


def test_importing_mislib_semsam_imports_neither_vllm_nor_transformers():
    code = ("import sys, mislib, mislib.semsam, mislib.inference; "
            "print(sorted(m for m in ('vllm', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
