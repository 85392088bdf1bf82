# The two commands of the README. Both create .venv on first use and reinstall when setup.cfg changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Compiled DeepSpeed ops go into the venv: a stale lock in a shared cache can hang torch forever.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions

.PHONY: demo test venv

demo: $(STAMP)
	$(PY) -m pretrain.demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@
