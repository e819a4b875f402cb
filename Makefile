# The two commands: `make run` (system + demo data) and `make test` (the whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: run test install system-deps down bench lint
run: install system-deps
	$(VENV)/bin/eventpulse up --demo

down:
	$(VENV)/bin/eventpulse down

test: install system-deps
	$(PY) -m pytest

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

system-deps:
	./scripts/system-deps.sh

lint: install
	$(PY) -m mypy
