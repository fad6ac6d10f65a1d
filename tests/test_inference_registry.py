"""mislib.inference.registry and protocol: backends by name, model sources, decode settings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mislib.inference.protocol import ARMS, Backend, DecodeSettings, Request
from mislib.inference.registry import BACKENDS, backend_class, load_backend, resolve_model
from mislib.paths import REPO_ROOT


def test_importing_mislib_and_its_cli_imports_no_backend_library():
    code = ("import sys, mislib, mislib.inference, mislib.inference.registry, mislib.__main__; "
            "print([m for m in ('vllm', 'ray', 'httpx', 'requests', 'openai', 'aiohttp', "
            "'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True, timeout=120)
    assert json.loads(out.stdout.replace("'", '"')) == []


def test_every_registered_backend_is_a_module_and_class_name():
    assert set(BACKENDS) >= {"hf", "vllm"}
    for target in BACKENDS.values():
        module, _, cls = target.partition(":")
        assert module.startswith("mislib.inference.backends.") and cls


def test_unknown_backend_names_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown inference backend 'tgi'.*'hf'"):
        backend_class("tgi")
    with pytest.raises(ValueError, match="unknown inference backend"):
        load_backend("tgi", "smoke:tiny-qwen3-vl")


def test_the_hf_backend_class_follows_the_protocol():
    cls = backend_class("hf")
    assert cls.__name__ == "HFBackend"
    for member in ("settings", "generate"):
        assert callable(getattr(cls, member))


def test_a_local_folder_is_its_own_source_with_a_content_revision(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "x"}')
    source, revision = resolve_model(str(tmp_path))
    assert source == str(tmp_path.resolve()) and revision.startswith("local-")
    (tmp_path / "config.json").write_text('{"model_type": "y"}')
    assert resolve_model(str(tmp_path))[1] != revision


def test_a_hub_id_is_passed_through_and_an_unknown_smoke_id_rejected(tmp_path):
    assert resolve_model("Qwen/Qwen3-VL-2B-Instruct") == ("Qwen/Qwen3-VL-2B-Instruct", "main")
    with pytest.raises(ValueError, match="unknown smoke model 'smoke:big'"):
        resolve_model("smoke:big", tmp_path)


def test_decode_settings_reject_an_unknown_arm_and_a_zero_budget():
    with pytest.raises(ValueError, match="unknown arm 'nucleus'"):
        DecodeSettings("nucleus", 0.7, 20, 0.8, 16)
    with pytest.raises(ValueError, match="max_new_tokens"):
        DecodeSettings("baseline", 0.7, 20, 0.8, 0)


@pytest.mark.parametrize("arm", ARMS)
def test_each_arm_maps_to_the_rule_it_names(arm):
    decode = DecodeSettings(arm, 0.7, 20, 0.8, 16, table_path="/t.safetensors",
                            table_key="abc")
    rule = decode.rule_params()
    assert rule["arm"] == arm and rule["top_k"] == 20
    identity = decode.identity()
    assert "table_path" not in identity
    # the table changes only the semsam arm's answers, so only its identity names it
    assert ("table_key" in identity) is (arm == "semsam")


def test_a_request_is_keyed_by_question_and_trial():
    assert Request("q1", 2, 99, "text").key == ("q1", 2)


def test_a_class_with_the_protocol_members_is_a_backend():
    class Echo:
        model_id, revision, capabilities = "echo", "1", None

        def settings(self):
            return {}

        def generate(self, requests, decode):
            return []

    assert isinstance(Echo(), Backend)
    assert not isinstance(object(), Backend)
