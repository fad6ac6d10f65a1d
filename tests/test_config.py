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
