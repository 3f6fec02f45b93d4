# Two commands do all the set-up on a fresh machine:
#   make demo   virtual environment + Fashion-MNIST + `deit demo`
#   make test   virtual environment + Fashion-MNIST + Chromium + the whole test suite

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# headless Chromium renders the HTML run report in a test
CHROMIUM := /usr/bin/chromium
# torch and torchvision are pinned to the pair that installs on our machines; other pairs may work for you
TORCH := torch==2.14.1 torchvision==0.29.1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup data lint clean

demo: setup
	$(BIN)/deit demo

test: setup $(CHROMIUM)
	$(BIN)/python -m pytest

setup: $(INSTALLED) data

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

data: $(FASHION_MNIST)

$(FASHION_MNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq chromium

lint: $(INSTALLED)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs build src/*.egg-info
