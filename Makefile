# Chasqui: `make run` starts a local 3-node cluster, `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
NODES  ?= 3
DATA   ?= ./var

.PHONY: run test test-faults proto lint bench bench-peers install install-test system-packages clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e '.[test]'
	touch $@

## System packages the tests need: libfaketime (Debian `faketime`) runs a node with a skewed
## wall clock in the clock-skew fault tests. Installed with apt-get when missing and run as root
## (as CI is); otherwise those tests skip and say why.
FAKETIME_LIBRARY := /usr/lib/*/faketime/libfaketimeMT.so.1
system-packages:
	@if ls $(FAKETIME_LIBRARY) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" -eq 0 ]; then \
		apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends faketime; \
	else \
		echo "faketime is missing and this is not root: the clock-skew fault tests will skip"; \
	fi

install: $(VENV)/.installed
install-test: system-packages $(VENV)/.installed-test

## Start a local cluster (data in ./var); Ctrl-C stops every node.
run: install
	$(VENV)/bin/chasqui-node dev --nodes $(NODES) --data-dir $(DATA)

## Unit, property, service, cluster tests and a bounded fault selection.
test: install-test
	$(PY) -m pytest -m 'not slow and not bench' tests

## Every fault test for longer (FAULT_SECONDS each), printing the table of faults and anomalies.
FAULT_SECONDS ?= 180
test-faults: install-test
	CHASQUI_FAULT_SECONDS=$(FAULT_SECONDS) $(PY) -m pytest -m faults -s -p no:cacheprovider tests/faults

## Regenerate chasqui_proto/ from proto/chasqui.proto.
proto: install-test
	$(PY) proto/generate.py

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## Throughput and latency figures against a local 3-node cluster.
bench: install-test
	$(PY) -m pytest -m bench -s tests/bench

## Chasqui, NATS JetStream and RabbitMQ through the shared peer harness in one run (installs the
## peers from Debian packages), then a table of figures and Chasqui/peer ratios.
PEERS  ?= ../shared/bench/peers
ROUNDS ?= 1
bench-peers: install-test
	$(PY) -m tests.bench.peers --peers-dir $(PEERS) --rounds $(ROUNDS)

clean:
	rm -rf $(VENV) $(DATA) *.egg-info .pytest_cache .mypy_cache .ruff_cache
