# Every target installs what it needs into .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
# pip arguments for torch, installed before the rest, e.g. TORCH="torch==2.13.0 --index-url <CUDA wheel index>"
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 5000
# KenLM's lmplz (builds n-gram LMs for asr.lm) is compiled from the kenlm source distribution into .venv/bin
KENLM  ?= kenlm==0.3.0
# Debian/Ubuntu packages that compiling it needs (`make lm-deps` installs them, as root)
KENLM_APT ?= cmake g++ libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev
ARGS   ?=
# processes `make test` runs the suite in (pytest-xdist; tests/conftest.py keeps a module's tests, and the
# tests sharing one trained model, in one process)
TEST_JOBS ?= 2
# make sweep on a cluster: LAUNCHER=slurm (hydra/launcher=...), STORAGE=<study storage URL> (sweep.storage=...)
LAUNCHER ?=
STORAGE  ?=

.DEFAULT_GOAL := help
.PHONY: help setup lmplz lm-deps train sweep test test-fast test-all lint format ui compare clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup:  ## create .venv with everything installed (TORCH=... to choose the torch build, e.g. a CUDA one)
	@want="$(TORCH) $$(cat pyproject.toml | cksum)"; \
	if [ "$$(cat $(STAMP) 2>/dev/null)" != "$$want" ]; then \
	  set -e; \
	  [ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV); \
	  $(BIN)/python -m pip install --quiet --upgrade pip; \
	  $(BIN)/python -m pip install --quiet $(TORCH); \
	  $(BIN)/python -m pip install --quiet -e ".[dev]"; \
	  echo "$$want" > $(STAMP); \
	fi
	@[ -x $(BIN)/lmplz ] || $(MAKE) --no-print-directory lmplz || \
	  echo "warning: KenLM's lmplz was not built, so 'python -m asr.lm build' cannot make LMs (decoding with one works). Fix: make lm-deps (as root), then make lmplz" >&2

lmplz:  ## compile KenLM's lmplz + build_binary into .venv/bin, once (~2 min; needs the packages of lm-deps)
	@echo "Compiling KenLM's lmplz from $(KENLM) (once, ~2 min)"
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	py=$(BIN)/python; [ -x $$py ] || py=$(PYTHON); \
	$$py -m pip download --quiet --no-deps --no-binary kenlm "$(KENLM)" -d "$$tmp"; \
	tar -xzf "$$tmp"/kenlm-*.tar.gz -C "$$tmp"; \
	cmake -S "$$tmp"/kenlm-*/ -B "$$tmp/build" -DCMAKE_BUILD_TYPE=Release > "$$tmp/cmake.log" 2>&1 || { tail -15 "$$tmp/cmake.log" >&2; exit 1; }; \
	cmake --build "$$tmp/build" --target lmplz build_binary -j $$(nproc) > "$$tmp/build.log" 2>&1 || { tail -15 "$$tmp/build.log" >&2; exit 1; }; \
	mkdir -p $(BIN); cp "$$tmp/build/bin/lmplz" "$$tmp/build/bin/build_binary" $(BIN)/

lm-deps:  ## install the Debian/Ubuntu packages that compiling lmplz needs (run as root)
	apt-get update -qq && apt-get install -y -qq --no-install-recommends $(KENLM_APT)

train: setup  ## train on the built-in corpus (ARGS="trainer.epochs=2 ..." for Hydra overrides)
	$(BIN)/python train.py $(ARGS)

sweep: setup  ## Optuna study: TPE + median pruning on eval WER, 2 workers (ARGS="sweep=lr_epochs ..."); rerun to resume; LAUNCHER=slurm STORAGE=postgresql+psycopg2://... for a cluster
	$(BIN)/python sweep.py $(if $(LAUNCHER),hydra/launcher=$(LAUNCHER)) $(if $(STORAGE),sweep.storage=$(STORAGE)) $(ARGS)

test: setup  ## run the test suite in TEST_JOBS processes (tests marked slow excluded)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow and not serial" -n $(TEST_JOBS) --no-loadscope-reorder $(ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "serial and not slow" $(ARGS)

test-fast: setup  ## the quick tier: config composition, search spaces, plan arithmetic, bootstrap, batching (~1 min)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "fast" $(ARGS)

test-all: setup  ## run every test, slow ones included
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not serial" -n $(TEST_JOBS) --no-loadscope-reorder $(ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "serial" $(ARGS)

lint: setup  ## check formatting and lint rules (ruff; settings in pyproject.toml)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: setup  ## reformat the code and apply ruff's safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

ui: setup  ## serve the MLflow UI for ./mlflow.db on http://127.0.0.1:$(PORT)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(PORT)

compare: setup  ## print the latest grid's or study's jobs sorted by WER (SWEEP=<sweep id> for another one)
	$(BIN)/python -m asr.sweep_summary $(or $(SWEEP),latest)

clean:  ## delete run outputs and caches (keeps .venv, mlflow.db and the generated corpus)
	rm -rf outputs multirun data/cache
