# The two commands the README opens with: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

system-deps:
	bash scripts/install-system-deps.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench scripts fuzz
	$(VENV)/bin/mypy

test: $(STAMP) system-deps lint
	$(VENV)/bin/pytest -n auto -q

bench: $(STAMP) system-deps
	$(PY) bench/convert.py
	$(PY) bench/import.py
	$(PY) bench/containerdisk.py
	$(PY) bench/cpu.py

clean:
	rm -rf $(VENV) demo-out bench-out
