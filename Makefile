# rankwatch: `make demo` runs the main job, `make test` passes the tests. Both set up everything
# they need on a fresh Debian machine (system packages with apt-get, Python into .venv).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# CPU build of torch: a range would pull a multi-GB CUDA build from the index.
TORCH_SPEC ?= torch==2.13.0
# Local wheel cache of this machine image, when present (holds the CPU torch build).
PIP_LOCAL := $(shell [ -d /opt/wheels ] && echo --find-links /opt/wheels)
SYSTEM_PACKAGES := prometheus prometheus-alertmanager victoria-metrics prometheus-node-exporter
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: all setup system-deps venv test lint demo rules dashboards docs bench gpu-check clean

all: test

system-deps:
	@missing=""; for b in prometheus promtool amtool prometheus-alertmanager victoria-metrics vmagent prometheus-node-exporter; do \
	  command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages (missing:$$missing)"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	fi
	@# The Debian packages enable services; rankwatch starts its own instances on free ports.
	@-$(SUDO) systemctl disable --now prometheus prometheus-alertmanager prometheus-node-exporter victoria-metrics >/dev/null 2>&1 || true

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_LOCAL) "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PIP_LOCAL) -e '.[dev,torch,hf,lightning,aws]'
	touch $@

venv: $(VENV)/.stamp

setup: system-deps venv

lint: venv
	$(VENV)/bin/ruff check rankwatch tests bench examples

test: setup
	$(VENV)/bin/ruff check rankwatch tests bench examples
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m rankwatch demo $(DEMO_ARGS)

# The XID and EFA alerts are written from the detector's own tables (rankwatch/rulegen.py).
rules: venv
	$(PY) -m rankwatch.rulegen

dashboards: rules
	$(PY) -m rankwatch dashboards generate --out dashboards --kubernetes-out deploy/kubernetes/base/generated

docs: venv
	$(VENV)/bin/mkdocs build --strict

# On a GPU machine, its own Python (torch on CUDA) runs the check; elsewhere the project's venv,
# which says at once that there is no GPU.
gpu-check:
	@if python3 -c "import torch, prometheus_client, pynvml, rich" 2>/dev/null; then py=python3; \
	else $(MAKE) -s venv && py=$(PY); fi; \
	PYTHONPATH=$(CURDIR) $$py -m rankwatch.gpucheck $(GPU_CHECK_ARGS)

bench: setup
	@echo "see BENCHMARKS.md for each benchmark's command"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo-report site
