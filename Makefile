# The two commands: `make run` (system + demo data) and `make test` (the whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: run test install system-deps down bench lint
run: install system-deps
	$(VENV)/bin/eventpulse up --demo

down:
	$(VENV)/bin/eventpulse down

# The suite on one redis-server, then the API, line, purchase and fault tests again with the
# whole app (Serve, actors, purchase job) on a real 3-master Redis Cluster.
CLUSTER_TESTS := tests/test_api_events.py tests/test_api_queue.py tests/test_api_purchases.py \
	tests/test_api_admin.py tests/test_event_queue.py tests/test_purchase_job.py tests/test_faults.py
test: install system-deps
	$(PY) -m pytest
	EVENTPULSE_TEST_REDIS=cluster $(PY) -m pytest $(CLUSTER_TESTS) -k "not redis_restart"

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
