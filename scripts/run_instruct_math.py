"""The whole pipeline on the five real instruct/math sources with a tiny locally built model; record the results.

    python scripts/run_instruct_math.py [--samples N] [--no-record]

Builds (once) runs/instruct-math-tiny/model: a byte-level BPE tokenizer trained on the data and an 8-block Llama.
Then scripts/pipeline.sh with recipes/instruct-math-tiny.yaml: reweight; sample N records by the ScaleBiO weights,
uniformly, and proportionally to source size; fine-tune the tiny model on each (same steps, same seed); evaluate
each on test.json. Writes the weights and the held-out losses into docs/results.md. Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "instruct-math"
MODEL = ROOT / "runs" / "instruct-math-tiny" / "model"
RECIPE = ROOT / "recipes" / "instruct-math-tiny.yaml"
RESULTS = ROOT / "docs" / "results.md"
RUN = ROOT / "runs" / "instruct-math-tiny"
MARKERS = "<!-- instruct-math:{}:begin -->", "<!-- instruct-math:{}:end -->"
# Llama-3-8B weights from the paper's math run for the sources we have (uniform over its 10 sources = 0.10).
PAPER = {"MathInstruct": 0.190, "GPT4-LLM-Cleaned": 0.144, "GPTeacher-General-Instruct": 0.130,
         "dart-math-uniform": 0.066, "orca-math-word-problems-200k": 0.061}


def build_model() -> None:
    from scalebio_cli.tiny import corpus_texts, save_tiny_model

    if (MODEL / "config.json").exists():
        return
    files = sorted(DATA.glob("train_*.json")) + [DATA / "val.json"]
    save_tiny_model(MODEL, corpus_texts(files), arch="llama", layers=8, hidden=128, vocab_size=4096)


def replace_section(text: str, name: str, body: str) -> str:
    begin, end = (m.format(name) for m in MARKERS)
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        return text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    return text.rstrip() + "\n\n" + block + "\n"


def record(doc: dict, comparison: dict, seconds: float, samples: int) -> None:
    rows = ["| source | ScaleBiO weight | averaged (2nd half) | paper, Llama-3-8B (of 10 sources) |",
            "|---|---:|---:|---:|"]
    for name, weight in sorted(doc["weights"].items(), key=lambda kv: -kv[1]):
        paper = PAPER.get(name, float("nan"))
        rows.append(f"| {name} | {weight:.3f} | {doc['weights_averaged'][name]:.3f} | {paper:.3f} |")
    cfg = doc["config"]["reweight"]
    body = "\n".join([
        f"Run: `python scripts/run_instruct_math.py` ({doc['steps']} steps, tiny 8-block Llama d=128 built locally, "
        f"max_length {doc['config']['data']['max_length']}, batch {cfg['batch_size']} + {cfg['val_batch_size']} "
        f"validation, alpha {cfg['alpha']}, lr_u/w {cfg['lr_u']}, lr_lambda {cfg['lr_lambda']}, LISA "
        f"{cfg['lisa']['layers']} blocks / {cfg['lisa']['interval']} steps, seed {doc['seed']}; "
        f"whole pipeline {seconds / 60:.1f} min on 2 CPU cores). Uniform = 0.200.", "", *rows])
    ft = doc["config"]["finetune"]
    table = ["| sampling | held-out loss (test.json) | perplexity | counts |", "|---|---:|---:|---|"]
    for kind, r in comparison.items():
        table.append(f"| {kind} | {r['test_loss']:.4f} | {2.718281828459045 ** r['test_loss']:.2f} | "
                     + ", ".join(f"{k} {v}" for k, v in r["counts"].items()) + " |")
    finetune_body = "\n".join([
        f"Each: {samples:,} records sampled with replacement (seed 0), one epoch of full fine-tuning of the same tiny "
        f"model (batch {ft['batch_size']}, lr {ft['lr']}, seed 0), loss on the 280 held-out test.json records "
        "(proportional = uniform: every source has 3,000 records).",
        "", *table])
    RESULTS.parent.mkdir(exist_ok=True)
    text = RESULTS.read_text() if RESULTS.exists() else "# Results\n"
    text = replace_section(text, "reweight", body)
    RESULTS.write_text(replace_section(text, "finetune", finetune_body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=3000, help="records per fine-tuning set")
    parser.add_argument("--no-record", action="store_true", help="do not touch docs/results.md")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this run needs the shared instruct-math data")
    build_model()
    start = time.perf_counter()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([str(ROOT / "scripts" / "pipeline.sh"), str(RECIPE), str(DATA / "test.json"), str(RUN),
                    str(args.samples), "uniform proportional"], check=True, env=env)
    doc = json.loads((RUN / "reweight" / "weights.json").read_text())
    comparison = json.loads((RUN / "comparison.json").read_text())
    if not args.no_record:
        record(doc, comparison, time.perf_counter() - start, args.samples)
        print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
