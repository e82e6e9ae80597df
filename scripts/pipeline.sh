#!/usr/bin/env bash
# The whole pipeline, as a user would chain it: reweight -> sample (ScaleBiO weights, and a baseline of the same
# size) -> finetune each with the same steps and seed -> eval both on a held-out test set -> losses side by side
# -> one HTML report of the run and the results (RUN_DIR/report.html).
#
#   scripts/pipeline.sh RECIPE TEST_FILE [RUN_DIR] [NUM_SAMPLES] [BASELINES]
#
# RECIPE's model is both the reweighting model and the one fine-tuned; its `finetune` section sets the fine-tune
# hyperparameters. BASELINES is a space-separated list of `uniform` and/or `proportional` (default: uniform).
set -euo pipefail
recipe=$1
test_file=$2
run=${3:-runs/pipeline}
n=${4:-600}
baselines=${5:-uniform}
mkdir -p "$run"

# --force: a rerun of the pipeline starts each run over instead of being refused by the last run's outputs
weights=$(scalebio reweight --config "$recipe" output_dir="$run/reweight" --force)

for kind in scalebio $baselines; do
  if [ "$kind" = scalebio ]; then
    scalebio sample --weights "$weights" -n "$n" -o "$run/sample-$kind.jsonl" --seed 0 --replacement
  else
    scalebio sample --weights "$kind" --config "$recipe" -n "$n" -o "$run/sample-$kind.jsonl" --seed 0 --replacement
  fi
  scalebio finetune --config "$recipe" output_dir="$run/finetune-$kind" finetune.data="$run/sample-$kind.jsonl" \
    finetune.weights=null --force
  scalebio eval --model "$run/finetune-$kind" --data test="$test_file" -o "$run/eval-$kind.json"
done

evals=()
for kind in scalebio $baselines; do evals+=(--eval "$kind=$run/eval-$kind.json"); done
scalebio report "$run/reweight" "${evals[@]}" -o "$run/report.html" >/dev/null

python3 - "$run" scalebio $baselines <<'PY'
import json, sys
run, kinds = sys.argv[1], sys.argv[2:]
rows = {k: json.load(open(f"{run}/eval-{k}.json"))["results"]["test"] for k in kinds}
counts = {k: json.load(open(f"{run}/sample-{k}.manifest.json"))["counts"] for k in kinds}
print(f"{'sampling':<14}{'test loss':>10}{'perplexity':>12}   counts")
for k in kinds:
    print(f"{k:<14}{rows[k]['loss']:>10.4f}{rows[k]['perplexity']:>12.3f}   {counts[k]}")
json.dump({k: {"test_loss": rows[k]["loss"], "counts": counts[k]} for k in kinds}, open(f"{run}/comparison.json", "w"), indent=2)
PY
