# `make demo` and `make test` set everything up on a fresh machine (venv, package, data), then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.phalanx-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_WORKERS ?= 3

.PHONY: setup data chromium demo test clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,ray]'
	@touch $@

# Fashion-MNIST from Debian's package, unless $PHALANX_DATA or the cache already has it.
data:
	@if [ -n "$$PHALANX_DATA" ] || [ -f $(FMNIST) ] || [ -f $$HOME/.cache/phalanx/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  echo "data: Fashion-MNIST present"; \
	else \
	  echo "data: installing dataset-fashion-mnist"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

# Headless Chromium for the report's screenshot check (scripts/screenshot_report.py), when missing.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
	  echo "chromium: present"; \
	else \
	  echo "chromium: installing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; \
	fi

demo: setup
	$(BIN)/phalanx bench configs/grid_demo.yaml --db results/demo.db --out results/demo

test: setup chromium
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=30

clean:
	rm -rf results .pytest_cache
