"""Profiles and stage freshness stamps."""

import pytest

from mislib import config


def test_both_profiles_load_and_define_every_stage():
    for name in ("demo", "paper"):
        prof = config.load_profile(name)
        assert prof["name"] == name
        for stage in config.STAGES:
            assert stage in prof, f"profile {name} lacks [{stage}]"


def test_unknown_profile_names_the_file():
    with pytest.raises(ValueError, match="unknown profile 'nope'"):
        config.load_profile("nope")


def test_overrides_apply_and_none_means_profile_value():
    base = config.stage_params("demo", "volumes")
    assert config.stage_params("demo", "volumes", slices_per_volume=None) == base
    assert config.stage_params("demo", "volumes", slices_per_volume=5)["slices_per_volume"] == 5


def test_unknown_override_is_rejected():
    with pytest.raises(ValueError, match="unknown parameter 'slice_per_volume'"):
        config.stage_params("demo", "volumes", slice_per_volume=5)


def test_config_hash_ignores_key_order_and_sees_values():
    assert config.config_hash({"a": 1, "b": 2}) == config.config_hash({"b": 2, "a": 1})
    assert config.config_hash({"a": 1}) != config.config_hash({"a": 2})


def test_stage_is_fresh_only_for_same_params_and_existing_outputs(tmp_path):
    params = {"x": 1}
    (tmp_path / "out.parquet").write_text("x")
    assert not config.is_fresh(tmp_path, "volumes", params, ["out.parquet"])
    config.write_stamp(tmp_path, "volumes", params, ["out.parquet"])
    assert config.is_fresh(tmp_path, "volumes", params, ["out.parquet"])
    assert not config.is_fresh(tmp_path, "volumes", {"x": 2}, ["out.parquet"])
    (tmp_path / "out.parquet").unlink()
    assert not config.is_fresh(tmp_path, "volumes", params, ["out.parquet"])


def test_file_digest_follows_the_bytes(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * (3 << 20))
    b.write_bytes(b"x" * (3 << 20))
    assert config.file_digest(a) == config.file_digest(b)
    b.write_bytes(b"x" * (3 << 20) + b"y")
    assert config.file_digest(a) != config.file_digest(b)


# ---- the profile schema --------------------------------------------------------------------

def _write_profile(tmp_path, table: str, key: str, value, name="bad.toml"):
    """A copy of the demo profile with ``[table] key = value`` (value in TOML syntax)."""
    lines = (config.PROFILE_DIR / "demo.toml").read_text().splitlines()
    out, in_table, done = [], False, False
    for line in lines:
        if line.startswith("["):
            if in_table and not done:
                out.append(f"{key} = {value}")
                done = True
            in_table = line.strip() == f"[{table}]"
        if in_table and line.split("=")[0].strip() == key:
            line, done = f"{key} = {value}", True
        out.append(line)
    if in_table and not done:
        out.append(f"{key} = {value}")
    path = tmp_path / name
    path.write_text("\n".join(out) + "\n")
    return path


@pytest.mark.parametrize("table, key, value, expected", [
    ("render", "planes", '["axial", "diagonal"]', r"\[render\] planes = .*'diagonal'.*'axial', 'coronal' or 'sagittal'"),
    ("questions", "margin_mm", "-5", r"\[questions\] margin_mm = -5: should be greater than 0"),
    ("render", "frames_3d", "15", r"\[render\] frames_3d = 15: should be even"),
    ("render", "frames_3d", "1000", r"\[render\] frames_3d = 1000: should be less than or equal to 64"),
    ("inference", "n_trials", '"two"', r"\[inference\] n_trials = 'two': should be a valid integer"),
    ("inference", "n_trials", "0", r"\[inference\] n_trials = 0: should be greater than or equal to 1"),
    ("volumes", "slices_per_volume", "-1", r"\[volumes\] slices_per_volume = -1: should be greater"),
    ("render", "max_lables", "6", r"\[render\] max_lables = 6: unknown key; did you mean 'max_labels'\?"),
    ("volumes", "sources", '["brain_atlas", "mystery"]', r"\[volumes\] sources = .*'mystery'"),
    ("semsam", "top_p", "1.5", r"\[semsam\] top_p = 1.5: should be less than or equal to 1"),
    ("questions", "cells_per_relation", '"most"', r"\[questions\] cells_per_relation = 'most': .*'all'"),
    ("render", "prompts", '["mask", "mask"]', r"\[render\] prompts = .*lists \['mask'\] more than once"),
    ("analysis", "interactions", '["arm:colour"]', r"\[analysis\] interactions = .*unknown factor.*'colour'"),
    ("render", "workers", "true", r"\[render\] workers = True: should be a valid integer"),
])
def test_bad_profile_value_is_rejected_naming_table_key_and_value(tmp_path, table, key, value,
                                                                  expected):
    path = _write_profile(tmp_path, table, key, value)
    with pytest.raises(config.ProfileError, match=expected) as err:
        config.load_profile(path)
    assert str(path) in str(err.value)


def test_missing_key_and_unknown_table_are_named(tmp_path):
    text = (config.PROFILE_DIR / "demo.toml").read_text().replace("margin_mm = 10.0", "")
    path = tmp_path / "p.toml"
    path.write_text(text + "\n[rendr]\nplanes = []\n")
    with pytest.raises(config.ProfileError) as err:
        config.load_profile(path)
    assert "[questions] margin_mm: missing" in str(err.value)
    assert "unknown table or key 'rendr'; did you mean 'render'?" in str(err.value)


def test_notebook_overrides_are_held_to_the_schema():
    with pytest.raises(config.ProfileError, match=r"\[questions\] margin_mm = -5"):
        config.stage_params("demo", "questions", margin_mm=-5)
    with pytest.raises(config.ProfileError, match=r"\[render\] planes = \('diagonal',\)"):
        config.stage_params("demo", "render", planes=("diagonal",))
    assert config.stage_params("demo", "render", planes=("axial",))["planes"] == ("axial",)


def test_schema_levels_that_config_lists_itself_are_the_stage_modules_levels():
    from mislib import analysis, volumes
    from mislib.inference.registry import BACKENDS
    from mislib.semsam.rule import MODES

    assert config.SEMSAM_MODES == tuple(MODES)
    assert set(config.SOURCES) == set(volumes.DEMO_SOURCES) | set(volumes.DATA_SOURCES)
    assert config.GROUPS == tuple(analysis.GROUPS)
    assert set(config.BACKENDS) >= set(BACKENDS)


def test_profile_path_is_resolved_from_the_callers_directory(tmp_path, monkeypatch):
    import papermill

    from mislib import notebooks

    (tmp_path / "my.toml").write_text((config.PROFILE_DIR / "demo.toml").read_text())
    monkeypatch.chdir(tmp_path)
    assert config.load_profile("my.toml")["name"] == "my"
    seen = {}

    def fake_execute(source, target, parameters, cwd, **kwargs):
        seen.update(parameters=parameters, cwd=cwd)

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    project = tmp_path / "project"  # a root of its own, so build/ lands there
    (project / "notebooks").mkdir(parents=True)
    (project / "notebooks" / "01_volume_prep.ipynb").write_text("{}")
    notebooks.reproduce("my.toml", only="01", root=project)
    assert seen["parameters"]["profile"] == str(tmp_path / "my.toml")
    assert seen["cwd"].endswith("notebooks")


def test_bad_profile_stops_the_cli_before_any_stage_runs(tmp_path, capsys, monkeypatch):
    from mislib import __main__ as cli
    from mislib import volumes

    path = _write_profile(tmp_path, "volumes", "slices_per_volume", "-1")
    monkeypatch.setattr(volumes, "prepare", lambda **kw: pytest.fail("stage 01 ran"))
    assert cli.main(["prepare", "--profile", str(path)]) == 2
    assert "[volumes] slices_per_volume = -1" in capsys.readouterr().err


def test_stamp_manifest_sees_a_file_lost_from_an_output_folder(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"{i}.png").write_bytes(b"png" * (i + 1))
    (tmp_path / "renders.parquet").write_bytes(b"table")
    outputs = ["renders.parquet", "images"]
    config.write_stamp(tmp_path, "render", {"x": 1}, outputs)
    assert config.is_fresh(tmp_path, "render", {"x": 1}, outputs)
    (tmp_path / "images" / "1.png").unlink()
    assert not config.is_fresh(tmp_path, "render", {"x": 1}, outputs)
