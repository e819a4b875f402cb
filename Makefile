# The two commands: `make run` (system + demo data) and `make test` (the whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: run test install lock system-deps down bench lint
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

# Installed from constraints.txt, the lock of every package the suite was run with, so
# a new upstream release cannot change what is tested. `make lock` renews the lock.
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,bench]"
	touch $@

lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q -U pip
	.lock-venv/bin/python -m pip install -q ".[test,bench]"
	{ echo "# The lock: every package of \`pip install .[test,bench]\`, made by \`make lock\`."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude eventpulse --exclude setuptools; } > constraints.txt
	rm -rf .lock-venv

system-deps:
	./scripts/system-deps.sh

lint: install
	$(PY) -m mypy
