"""mislib.inference.models: the model registry of a profile ([models.<name>] tables)."""

from __future__ import annotations

import copy
import json

import pytest
from test_inference import _new_root, seeded_table  # noqa: F401  (the module's table fixture)

from mislib.config import ModelEntry, ProfileError, check_profile, load_profile
from mislib.inference.models import (
    check_remote_code,
    local_backend_options,
    model_entries,
    model_entry,
    model_identity,
)


def _with_models(base: str = "demo", **tables):
    prof = copy.deepcopy(load_profile(base))
    prof["models"] = tables
    return prof


def test_a_plain_id_takes_the_profiles_inference_and_semsam_values():
    prof = load_profile("demo")
    entry = model_entry(prof, "smoke:tiny-qwen3-vl")
    assert (entry.name, entry.id, entry.backend) == ("smoke:tiny-qwen3-vl",) * 2 + ("hf",)
    assert entry.max_new_tokens == prof["inference"]["max_new_tokens"]
    assert (entry.temperature, entry.top_k, entry.top_p, entry.semsam_mode) == (
        prof["semsam"]["temperature"], prof["semsam"]["top_k"], prof["semsam"]["top_p"],
        prof["semsam"]["mode"])
    assert not entry.thinks and entry.reasoning_budget == 0
    assert model_identity(entry) == {}  # today's profiles keep their run ids


def test_an_entry_overrides_the_profile_and_keeps_what_it_leaves_out():
    prof = _with_models(think={"id": "Qwen/Qwen3-VL-8B-Thinking", "thinks": True,
                               "reasoning_budget": 512, "semsam_mode": "sample",
                               "temperature": 1.0, "frames_per_stack": 8, "params_b": 8})
    entry = model_entry(prof, "think")
    assert (entry.id, entry.reasoning_budget, entry.semsam_mode, entry.temperature) == (
        "Qwen/Qwen3-VL-8B-Thinking", 512, "sample", 1.0)
    assert entry.top_k == prof["semsam"]["top_k"]  # not set: the profile's
    assert entry.params_b == 8
    assert model_identity(entry) == {"id": "Qwen/Qwen3-VL-8B-Thinking", "frames_per_stack": 8}


def test_model_entries_follow_the_inference_list_and_every_adds_the_rest():
    prof = _with_models(b={"id": "x/b"}, a={"id": "x/a"})
    prof["inference"]["models"] = ["b", "plain/id"]
    assert [e.name for e in model_entries(prof)] == ["b", "plain/id"]
    assert [e.name for e in model_entries(prof, every=True)] == ["b", "plain/id", "a"]


def test_the_paper_profile_lists_the_roster():
    prof = load_profile("paper")
    entries = {e.name: e for e in model_entries(prof, every=True)}
    for size in (2, 4, 8, 32):
        instruct = entries[f"qwen3-vl-{size}b-instruct"]
        thinking = entries[f"qwen3-vl-{size}b-thinking"]
        assert instruct.id == f"Qwen/Qwen3-VL-{size}B-Instruct" and instruct.params_b == size
        assert thinking.thinks and thinking.reasoning_budget > 0
        assert thinking.semsam_mode == "sample"
    for size in (7, 32, 72):
        assert entries[f"qwen2.5-vl-{size}b-instruct"].id == f"Qwen/Qwen2.5-VL-{size}B-Instruct"
    gemini = entries["gemini-3-flash"]
    assert gemini.backend == "openai" and gemini.api_key_env == "GEMINI_API_KEY"
    assert gemini.arms == ["baseline"]
    assert gemini.base_url.startswith("https://generativelanguage.googleapis.com/")
    assert all(name in entries for name in prof["inference"]["models"])


@pytest.mark.parametrize(("table", "expected"), [
    ({"id": "m", "dtype": "fp8"}, "[models.bad] dtype = 'fp8': "),
    ({"id": "m", "reasoning_budget": 64}, "[models.bad] reasoning_budget is set but thinks"),
    ({"id": "m", "frames_per_stack": 5}, "[models.bad] frames_per_stack = 5: should be even"),
    ({"id": "m", "min_pixels": 900, "max_pixels": 100}, "min_pixels = 900 is above"),
    ({"id": "m", "semsam_mod": "sample"}, "unknown key; did you mean 'semsam_mode'?"),
    ({"dtype": "float32"}, "[models.bad] id: missing"),
    ({"id": "m", "backend": "tgi"}, "[models.bad] backend = 'tgi'"),
    ({"id": "m", "name": "other"}, "[models.bad] name: the table's key"),
    ({"id": "smoke:tiny-qwen3-vl"}, "a smoke model's entry is named smoke:<name>"),
])
def test_a_bad_entry_is_a_profile_error_naming_table_and_key(table, expected):
    with pytest.raises(ProfileError) as err:
        check_profile(_with_models(bad=table))
    assert expected in str(err.value)


def test_a_key_written_where_its_variable_name_belongs_is_refused_and_not_echoed():
    secret = "AIzaSyThisIsNotARealKey123"
    with pytest.raises(ProfileError) as err:
        check_profile(_with_models(bad={"id": "m", "api_key_env": secret}))
    assert "[models.bad] api_key_env" in str(err.value) and secret not in str(err.value)


#: Values of the endpoint fields that [inference.openai] and a model entry share: each is
#: accepted in both places or refused in both (mislib.config.EndpointFields).
ENDPOINT_VALUES = [
    ("base_url", "http://127.0.0.1:8000/v1", True),
    ("base_url", "https://api.example.com/v1beta/openai/", True),
    ("base_url", "http://", False),                 # no host
    ("base_url", "http://a b/v1", False),           # a space
    ("base_url", "127.0.0.1:8000/v1", False),       # no scheme
    ("base_url", "ftp://example.com", False),
    ("api_key_env", "GEMINI_API_KEY", True),
    ("api_key_env", "_LOCAL_KEY_2", True),
    ("api_key_env", "gemini_api_key", False),       # lower case
    ("api_key_env", "MY-KEY", False),
    ("api_key_env", "", False),
    ("api_key_env", "A" * 65, False),               # too long for a name
    ("stack_as", "images", True),
    ("stack_as", "video", True),
    ("stack_as", "frames", False),
    ("price_prompt_per_mtok", 0.0, True),
    ("price_prompt_per_mtok", 0.5, True),
    ("price_prompt_per_mtok", -1.0, False),
    ("price_completion_per_mtok", 3.0, True),
    ("price_completion_per_mtok", "3", False),
    ("max_concurrency", 1, True),
    ("max_concurrency", 32, True),
    ("max_concurrency", 0, False),
    ("max_concurrency", 2.5, False),
    ("max_concurrency", True, False),
    ("request_budget", 100, True),
    ("request_budget", 0, False),
    ("token_budget", 10_000, True),
    ("token_budget", -5, False),
]


@pytest.mark.parametrize(("key", "value", "good"), ENDPOINT_VALUES)
def test_the_endpoint_fields_accept_the_same_values_in_the_profile_and_in_an_entry(key, value,
                                                                                  good):
    from mislib.config import model_table_errors

    prof = copy.deepcopy(load_profile("demo"))
    prof["inference"]["openai"] = {key: value}
    if good:
        check_profile(prof, ["inference"])
        assert model_table_errors("m", {"id": "m", key: value}) == []
    else:
        with pytest.raises(ProfileError, match=f"\\[inference\\] openai.*{key}"):
            check_profile(prof, ["inference"])
        (problem,) = model_table_errors("m", {"id": "m", key: value})
        assert problem.startswith(f"[models.m] {key}")


def test_every_endpoint_field_of_an_entry_reaches_the_openai_backend():
    """What an entry sets of the shared endpoint fields is what the openai backend gets,
    each a parameter it takes (a field added to EndpointFields reaches it too)."""
    import inspect

    from mislib.config import EndpointFields, ModelEntry
    from mislib.inference.backends.openai import OpenAIBackend
    from mislib.inference.models import endpoint_options

    values = {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "MY_KEY",
              "stack_as": "video", "price_prompt_per_mtok": 1.0,
              "price_completion_per_mtok": 2.0, "max_concurrency": 3, "request_budget": 4,
              "token_budget": 5}
    assert set(values) == set(EndpointFields.model_fields)
    assert endpoint_options(ModelEntry(id="m", backend="openai", **values)) == values
    assert endpoint_options(ModelEntry(id="m", backend="openai")) == {}
    assert set(values) <= set(inspect.signature(OpenAIBackend).parameters)


#: Keys as users paste them where the variable's name belongs: each shaped like a name
#: (letters, digits, underscores) or nearly, so only the value's shape gives them away.
PASTED_KEYS = ["ABCDEF0123456789ABCDEF0123456789", "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
               "AIzaSyD_0123456789abcdefGHIJKLMNOPQRstu", "b3f1c2d4e5a60718293a4b5c6d7e8f90",
               "HF_aBcDeFgHiJkLmNoPqRsTuVwXyZ012345",
               "SK_LIVE_4EC39HQLYJWDARJTT1ZDP7DC"]


@pytest.mark.parametrize("key", PASTED_KEYS)
def test_a_pasted_key_is_refused_everywhere_without_being_echoed(key, monkeypatch, capsys):
    """The profile, a model entry, the backend built directly and ``mislib serve``: each
    refuses a key written where its variable's name belongs, and no message shows it."""
    from mislib.config import model_table_errors
    from mislib.inference.backends.openai import OpenAIBackend
    from mislib.serve import server_command

    monkeypatch.setenv(key, "the-variable-exists")  # so a name lookup alone would pass
    prof = copy.deepcopy(load_profile("demo"))
    prof["inference"]["openai"] = {"api_key_env": key}
    shown = []
    with pytest.raises(ProfileError) as err:
        check_profile(prof, ["inference"])
    shown.append(str(err.value))
    shown += model_table_errors("m", {"id": "m", "api_key_env": key})
    with pytest.raises(ValueError) as err:  # no server is asked: refused before
        OpenAIBackend("m", base_url="http://127.0.0.1:9/v1", api_key_env=key)
    shown.append(str(err.value))
    with pytest.raises(ValueError) as err:
        server_command("demo", api_key_env=key, table=False)
    shown.append(str(err.value))
    shown.append(capsys.readouterr().err)
    assert all("api_key_env" in text for text in shown[:-1])
    for text in shown:
        assert key not in text and key[:10] not in text and key[-10:] not in text


@pytest.mark.parametrize("name", ["api_key", "key", "token", "API_TOKEN", "secret"])
def test_a_key_under_a_name_of_its_own_is_refused_without_being_echoed(name):
    """``api_key = "..."`` (or ``token``, ``secret``) is an unknown key; the error names it
    and the key it meant, in the profile's [inference.openai], directly in [inference] and
    in a model entry, and shows the value nowhere."""
    from mislib.config import model_table_errors

    secret = "sk-proj-Abc123def456GHI789jkl012"
    prof = copy.deepcopy(load_profile("demo"))
    prof["inference"]["openai"] = {"base_url": "http://127.0.0.1:8000/v1", name: secret}
    prof["models"] = {"m": {"id": "m", "backend": "openai", name: secret}}
    with pytest.raises(ProfileError) as err:
        check_profile(prof)
    shown = str(err.value)
    assert f"[models.m] {name}: unknown key" in shown
    assert "[inference] openai = " in shown and f"'{name}': '<hidden>'" in shown
    assert f": unknown key {name!r}" in shown
    prof = copy.deepcopy(load_profile("demo"))
    prof["inference"][name] = secret
    with pytest.raises(ProfileError) as err:
        check_profile(prof, ["inference"])
    shown += str(err.value)
    assert f"[inference] {name}" in str(err.value)
    shown += "".join(model_table_errors("m", {"id": "m", name: secret}))
    assert secret not in shown and secret[:10] not in shown and secret[-10:] not in shown
    # a key whose name only contains such a word keeps its value in errors
    prof = copy.deepcopy(load_profile("demo"))
    prof["inference"]["max_new_tokens"] = "many"
    with pytest.raises(ProfileError, match=r"\[inference\] max_new_tokens = 'many'"):
        check_profile(prof, ["inference"])
    assert "forced_answer_tokens = 0" in model_table_errors(
        "m", {"id": "m", "forced_answer_tokens": 0})[0]


def test_a_bad_entry_stops_the_cli_with_exit_code_2(tmp_path, capsys, monkeypatch):
    from mislib import __main__ as cli
    from mislib.inference import runner

    text = (load_profile.__globals__["PROFILE_DIR"] / "demo.toml").read_text()
    path = tmp_path / "bad.toml"
    path.write_text(text + '\n[models.tiny]\nid = "org/tiny-vlm"\ndtype = "int3"\n')
    monkeypatch.setattr(runner, "run_inference", lambda *a, **k: pytest.fail("stage 04 ran"))
    assert cli.main(["infer", "--profile", str(path)]) == 2
    assert "[models.tiny] dtype = 'int3'" in capsys.readouterr().err


def test_local_backend_options_carry_only_what_the_entry_sets():
    assert local_backend_options(ModelEntry(id="m")) == {}
    entry = ModelEntry(id="m", dtype="bfloat16", max_pixels=4096, stack_as="images",
                       trust_remote_code=True)
    assert local_backend_options(entry) == {"dtype": "bfloat16", "max_pixels": 4096,
                                            "stack_as": "images", "trust_remote_code": True}


def test_a_model_with_remote_code_is_refused_unless_its_entry_trusts_it(tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "custom_vlm",
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForImageTextToText": "modeling_custom.CustomModel"}}))
    with pytest.raises(ValueError, match=r"trust_remote_code = true") as err:
        check_remote_code(str(folder), "org/custom", trust_remote_code=False)
    assert "config.json" in str(err.value) and "org/custom" in str(err.value)
    check_remote_code(str(folder), "org/custom", trust_remote_code=True)  # no error


def test_the_hf_backend_refuses_a_saved_model_whose_config_maps_remote_code(smoke_root,
                                                                           tmp_path):
    import shutil

    from mislib.inference.backends.hf import HFBackend
    from mislib.smoke import smoke_model_dir

    folder = tmp_path / "tiny-remote"
    shutil.copytree(smoke_model_dir(smoke_root), folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageTextToText": "modeling_x.XModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="needs code from its own repository"):
        HFBackend(str(folder), model_id="tiny-remote", device="cpu")


def test_an_entrys_pixel_budget_dtype_and_stack_mode_reach_the_hf_backend(smoke_root):
    import numpy as np

    from mislib.inference.backends.hf import HFBackend
    from mislib.inference.protocol import Request
    from mislib.inference.registry import resolve_model
    from mislib.smoke import SMOKE_MODEL_ID

    source = resolve_model(SMOKE_MODEL_ID, smoke_root)[0]
    own = HFBackend(source, model_id="own", device="cpu")
    entry = ModelEntry(id=SMOKE_MODEL_ID, dtype="float32", min_pixels=32 * 32,
                       max_pixels=64 * 64, stack_as="images")
    backend = HFBackend(source, model_id="tuned", device="cpu",
                        **local_backend_options(entry))
    assert backend.settings()["image_processor"]["size"] == {"shortest_edge": 1024,
                                                             "longest_edge": 4096}
    assert own.settings()["image_processor"]["size"]["longest_edge"] == 160 * 160
    assert (backend.settings()["video_as"], own.settings()["video_as"]) == ("images", "video")
    # a 4-frame stack goes in as 4 pictures of at most 64 x 64 pixels (16 patches each)
    stack = np.zeros((4, 96, 96, 3), dtype=np.uint8)
    inputs = backend.prepare([Request("q", 0, 1, "where?", stack)])
    assert "pixel_values_videos" not in inputs
    assert inputs["image_grid_thw"].shape[0] == 4
    assert (inputs["image_grid_thw"][:, 1] * inputs["image_grid_thw"][:, 2] <= 16).all()


def test_a_pixel_budget_for_a_processor_without_one_is_refused():
    from types import SimpleNamespace

    from mislib.inference.backends.hf import set_pixel_budget

    processor = SimpleNamespace(image_processor=SimpleNamespace(size={"height": 224,
                                                                      "width": 224}))
    with pytest.raises(ValueError, match="has none"):
        set_pixel_budget(processor, None, 4096, "org/clip-like")


def test_an_entrys_frames_per_stack_thins_the_stacks_and_names_a_new_run(smoke_root, tmp_path,
                                                                        seeded_table):  # noqa: F811
    import numpy as np

    from mislib.inference import run_inference

    root = _new_root(tmp_path / "frames", smoke_root, n_questions=12)  # 4-frame stacks
    prof = _with_models(**{"smoke:two": {"id": "smoke:tiny-qwen3-vl", "frames_per_stack": 2}})
    prof["inference"].update({"max_new_tokens": 2, "n_trials": 1, "limit": 0,
                              "models": ["smoke:two"]})
    seen = []

    def hook(generate):
        def spy(requests, decode):
            seen.extend(r.media.shape[0] for r in requests if isinstance(r.media, np.ndarray))
            return generate(requests, decode)
        return spy

    run = run_inference(prof, arm="greedy", root=root, progress=False, generate_hook=hook)
    assert seen and set(seen) == {2}
    identity = json.loads((run.run_dir / "run.json").read_text())
    assert identity["model_settings"] == {"id": "smoke:tiny-qwen3-vl", "frames_per_stack": 2}
    assert run.run_id.startswith("smoke-two-greedy-")


def test_a_model_runs_only_the_arms_its_entry_lists(monkeypatch):
    from mislib.inference import runner

    calls = []
    monkeypatch.setattr(runner, "run_inference",
                        lambda prof, arm, model, **kw: calls.append((model, arm)))
    prof = _with_models(hosted={"id": "served-vlm", "arms": ["baseline"]})
    prof["inference"]["models"] = ["smoke:tiny-qwen3-vl", "hosted"]
    runner.run_profile(prof, arms=["baseline", "greedy", "semsam"])
    assert calls == [("smoke:tiny-qwen3-vl", "baseline"), ("smoke:tiny-qwen3-vl", "greedy"),
                     ("smoke:tiny-qwen3-vl", "semsam"), ("hosted", "baseline")]
    with pytest.raises(ValueError, match=r"'hosted' runs the arms \['baseline'\]"):
        runner.run_profile(prof, models=["hosted"], arms=["semsam"])


def test_an_entrys_arms_must_be_known_arms():
    with pytest.raises(ProfileError, match=r"\[models.hosted\].*arms"):
        model_entry(_with_models(hosted={"id": "served-vlm", "arms": ["beam"]}), "hosted")


def test_a_misspelt_entry_name_in_the_model_list_is_a_profile_error():
    prof = load_profile("paper")
    prof["inference"]["models"] = ["qwen3-vl-8b-instruc"]
    with pytest.raises(ProfileError, match=r"'qwen3-vl-8b-instruc'.*did you mean "
                                           r"'qwen3-vl-8b-instruct'"):
        check_profile(prof)
    prof["inference"]["models"] = ["Qwen/Qwen3-VL-8B-Instruct", "qwen3-vl-8b-instruct"]
    check_profile(prof)  # a hub id and an entry's name both pass


def test_an_entrys_pixel_budget_dtype_or_stack_mode_is_no_fresh_rerun(smoke_root, tmp_path):
    from mislib.inference import run_inference

    # the stage's freshness check sees only the request, not the loaded backend's settings:
    # an entry setting that changes what the model sees must be in it, or a changed entry
    # would be answered by the previous run
    root = _new_root(tmp_path / "fresh", smoke_root, n_questions=3)
    prof = _with_models(**{"smoke:px": {"id": "smoke:tiny-qwen3-vl", "max_pixels": 4096}})
    prof["inference"].update({"max_new_tokens": 2, "n_trials": 1, "limit": 1,
                              "models": ["smoke:px"]})
    first = run_inference(prof, arm="greedy", root=root, progress=False)
    assert first.n_generated == 1
    prof["models"]["smoke:px"]["max_pixels"] = 1024
    second = run_inference(prof, arm="greedy", root=root, progress=False)
    assert second.run_id != first.run_id and second.n_generated == 1
    entry = model_entry(prof, "smoke:px")
    for key, value in (("dtype", "float32"), ("stack_as", "images"), ("min_pixels", 512)):
        assert model_identity(entry.model_copy(update={key: value}))[key] == value
