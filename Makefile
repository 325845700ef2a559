# Two front doors, each bootstrapping .venv on a fresh clone: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: demo test bench check lint typecheck docs wheel wheel-check format clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,viz,cli,onnx,triton,docs]'
	touch $@

demo: $(VENV)/.ready
	$(PY) -m multihead demo

# lint, types (mypy on src/), the test suite (tests/test_docs.py builds the docs with warnings as errors)
test: $(VENV)/.ready
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest

bench: $(VENV)/.ready
	$(PY) -m multihead bench $(ARGS)

check: $(VENV)/.ready
	$(PY) -m multihead check

lint: $(VENV)/.ready
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(VENV)/.ready
	$(PY) -m mypy

docs: $(VENV)/.ready
	$(PY) -m mkdocs build --strict --site-dir build/site

# the wheel, installed into a fresh venv (torch from the local file) and run outside the repository
wheel: $(VENV)/.ready
	rm -rf dist
	$(PY) -m pip wheel -q --no-deps -w dist .

wheel-check: wheel
	rm -rf build/wheel-venv
	$(PYTHON) -m venv build/wheel-venv
	build/wheel-venv/bin/python -m pip install -q $(TORCH) dist/multihead-*.whl
	cd "$$(mktemp -d)" && $(abspath build/wheel-venv)/bin/multihead --version \
		&& $(abspath build/wheel-venv)/bin/multihead --help > /dev/null \
		&& $(abspath build/wheel-venv)/bin/python -m multihead bench --help > /dev/null \
		&& $(abspath build/wheel-venv)/bin/python -m multihead check \
		&& $(abspath build/wheel-venv)/bin/python -m multihead demo

format: $(VENV)/.ready
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .mypy_cache build dist site
