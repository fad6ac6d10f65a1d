"""pyproject.toml and environment.yml list the same packages."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# conda-forge names that differ from PyPI's
CONDA_TO_PYPI = {"pytorch": "torch"}
NOT_PACKAGES = {"python", "pip"}
# installed by the Makefile with --no-deps (only its class map is used)
EXTRA_IN_ENV = {"totalsegmentator"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_packages() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # the extras that `make env` installs too
    reqs = list(meta["dependencies"]) + [r for extra in ("dev", "ray")
                                         for r in meta["optional-dependencies"][extra]]
    return {_name(r) for r in reqs}


def _environment_packages() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    names = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            names |= {_name(r) for r in dep.get("pip", [])}
        else:
            names.add(_name(dep))
    return {CONDA_TO_PYPI.get(n, n) for n in names} - NOT_PACKAGES


def test_environment_yml_lists_the_pyproject_packages():
    env = _environment_packages()
    py = _pyproject_packages()
    assert py - env == set(), f"in pyproject.toml but not environment.yml: {sorted(py - env)}"
    extra = env - py - EXTRA_IN_ENV
    assert extra == set(), f"in environment.yml but not pyproject.toml: {sorted(extra)}"


def test_environment_yml_pins_python_312_or_newer():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python>=3.12" in env["dependencies"]
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["requires-python"] == ">=3.12"
