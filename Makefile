# The two commands of the README. Both create .venv on first use and reinstall when setup.cfg changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Compiled DeepSpeed ops go into the venv: a stale lock in a shared cache can hang torch forever.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions

.PHONY: demo test test-fast lint venv

demo: $(STAMP)
	$(PY) -m pretrain.demo $(ARGS)

# The whole suite, after the linter and the formatter check (CI runs exactly this), on two pytest-xdist
# workers, each test file whole on one of them (module fixtures train once); WORKERS=0 runs it serially.
WORKERS ?= 2
test: lint
	$(PY) -m pytest -n $(WORKERS) --dist loadfile $(ARGS)

# The unit tests: no multi-process, Slurm or slow test.
test-fast: lint
	$(PY) -m pytest -m "not dist and not slurm and not slow" $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

venv: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@
