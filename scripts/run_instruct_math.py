"""Reweight the five real instruct/math sources with a tiny locally built model; record the weights.

    python scripts/run_instruct_math.py [--steps N] [--no-record]

Builds (once) runs/instruct-math-tiny/model: a byte-level BPE tokenizer trained on the data and an 8-block Llama;
runs `scalebio reweight --config recipes/instruct-math-tiny.yaml`; writes the learned weights into
docs/results.md (between the instruct-math markers). Needs ../shared/data/instruct-math.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "instruct-math"
MODEL = ROOT / "runs" / "instruct-math-tiny" / "model"
RECIPE = ROOT / "recipes" / "instruct-math-tiny.yaml"
RESULTS = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- instruct-math:reweight:begin -->", "<!-- instruct-math:reweight:end -->"
# Llama-3-8B weights from the paper's math run for the sources we have (uniform over its 10 sources = 0.10).
PAPER = {"MathInstruct": 0.190, "GPT4-LLM-Cleaned": 0.144, "GPTeacher-General-Instruct": 0.130,
         "dart-math-uniform": 0.066, "orca-math-word-problems-200k": 0.061}


def build_model() -> None:
    from scalebio_cli.tiny import corpus_texts, save_tiny_model

    if (MODEL / "config.json").exists():
        return
    files = sorted(DATA.glob("train_*.json")) + [DATA / "val.json"]
    save_tiny_model(MODEL, corpus_texts(files), arch="llama", layers=8, hidden=128, vocab_size=4096)


def replace_section(text: str, body: str) -> str:
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text:
        return text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    return text.rstrip() + "\n\n" + block + "\n"


def record(doc: dict, seconds: float) -> None:
    rows = ["| source | ScaleBiO weight | averaged (2nd half) | paper, Llama-3-8B (of 10 sources) |",
            "|---|---:|---:|---:|"]
    for name, weight in sorted(doc["weights"].items(), key=lambda kv: -kv[1]):
        rows.append(f"| {name} | {weight:.3f} | {doc['weights_averaged'][name]:.3f} | {PAPER.get(name, float('nan')):.3f} |")
    cfg = doc["config"]["reweight"]
    body = "\n".join([
        f"Run: `python scripts/run_instruct_math.py` ({doc['steps']} steps, tiny 8-block Llama d=128 built locally, "
        f"max_length {doc['config']['data']['max_length']}, batch {cfg['batch_size']} + {cfg['val_batch_size']} "
        f"validation, alpha {cfg['alpha']}, lr_u/w {cfg['lr_u']}, lr_lambda {cfg['lr_lambda']}, LISA "
        f"{cfg['lisa']['layers']} blocks / {cfg['lisa']['interval']} steps, seed {doc['seed']}; "
        f"{seconds / 60:.1f} min on 2 CPU cores). Uniform = 0.200.", "", *rows])
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(replace_section(RESULTS.read_text() if RESULTS.exists() else "# Results\n", body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="override reweight.steps")
    parser.add_argument("--no-record", action="store_true", help="do not touch docs/results.md")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this run needs the shared instruct-math data")
    build_model()
    overrides = [f"reweight.steps={args.steps}"] if args.steps else []
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "scalebio_cli", "reweight", "--config", str(RECIPE), *overrides],
                            stdout=subprocess.PIPE, text=True)
    if result.returncode:
        sys.exit(result.returncode)
    doc = json.loads(Path(result.stdout.strip()).read_text())
    if not args.no_record:
        record(doc, time.perf_counter() - start)
        print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
