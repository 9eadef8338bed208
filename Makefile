# Two commands matter: `make demo` and `make test`. Both bootstrap everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
APT_PKGS := dataset-fashion-mnist postgresql

.PHONY: demo test test-fast lint format bootstrap system-deps clean

demo: bootstrap
	$(VENV)/bin/taps-cl demo

test: bootstrap
	$(PY) -m pytest -q

test-fast: bootstrap
	$(PY) -m pytest -q -m "not integration"

lint: bootstrap
	$(VENV)/bin/ruff check taps_cl tests benchmarks
	$(VENV)/bin/ruff format --check taps_cl tests benchmarks

format: bootstrap
	$(VENV)/bin/ruff format taps_cl tests benchmarks
	$(VENV)/bin/ruff check --fix taps_cl tests benchmarks

bootstrap: system-deps $(VENV)/.deps-stamp

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

# torch first, from this machine's local wheels: a later resolver run then keeps it.
$(VENV)/.torch-stamp: $(VENV)/bin/python
	$(PY) -m pip install -q $(TORCH_PINS)
	touch $@

$(VENV)/.deps-stamp: $(VENV)/.torch-stamp pyproject.toml setup.py
	$(PY) -m pip install -q -e ".[dev]" $(TORCH_PINS)
	touch $@

# Debian packages: the offline Fashion-MNIST files and the PostgreSQL server for the store tests.
# Installed only when running as root with apt; otherwise their tests skip (or fail when CI=true).
system-deps:
	@bash scripts/system_deps.sh $(APT_PKGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
