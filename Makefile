# Two front doors, each bootstrapping .venv on a fresh clone: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench check lint format clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,viz,cli,onnx,triton,docs]'
	touch $@

demo: $(VENV)/.ready
	$(PY) -m multihead demo

test: $(VENV)/.ready
	$(PY) -m ruff check .
	$(PY) -m pytest

bench: $(VENV)/.ready
	$(PY) -m multihead bench $(ARGS)

check: $(VENV)/.ready
	$(PY) -m multihead check

lint: $(VENV)/.ready
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.ready
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
