# Two entry points (see README): `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch only reads .pth files; 2.13.0 is the CPU build this machine carries on disk.
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[test]"
	touch $@

.PHONY: setup demo test
setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) experiments/run.py
	$(PY) experiments/extract.py runs/demo --all
	$(PY) experiments/intervene.py runs/demo --draws 3

test: $(VENV)/.installed
	$(PY) -m pytest -q
