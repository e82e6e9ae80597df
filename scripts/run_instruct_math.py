"""The whole pipeline on the five real instruct/math sources with a tiny locally built model; record the results.

    python scripts/run_instruct_math.py [--samples N] [--no-record]
    python scripts/run_instruct_math.py --lora 8 --weights-only     # LoRA reweight next to the LISA one

Builds (once) runs/instruct-math-tiny/model: a byte-level BPE tokenizer trained on the data and an 8-block Llama.
Then scripts/pipeline.sh with recipes/instruct-math-tiny.yaml: reweight; sample N records by the ScaleBiO weights,
uniformly, and proportionally to source size; fine-tune the tiny model on each (same steps, same seed); evaluate
each on test.json. Writes the weights and the held-out losses into docs/results.md. Needs data/instruct-math/.
`--lora R` also reweights with u and w as two rank-R LoRA adapters over the one frozen model (10x the learning
rate, as adapters need), training in every block and with LISA over the adapters, and records the weight vectors
side by side with their rank correlations;
`--weights-only` runs the reweight stage(s) only (`--reuse`: keeping weights files already there).
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
DATA = ROOT / "data" / "instruct-math"  # what the recipes read; `make instruct-math-data` links it
MODEL = ROOT / "runs" / "instruct-math-tiny" / "model"
RECIPE = ROOT / "recipes" / "instruct-math-tiny.yaml"
RESULTS = ROOT / "docs" / "results.md"
RUN = ROOT / "runs" / "instruct-math-tiny"
MARKERS = "<!-- instruct-math:{}:begin -->", "<!-- instruct-math:{}:end -->"
# Llama-3-8B weights from the paper's math run for the sources we have (uniform over its 10 sources = 0.10).
PAPER = {"MathInstruct": 0.190, "GPT4-LLM-Cleaned": 0.144, "GPTeacher-General-Instruct": 0.130,
         "dart-math-uniform": 0.066, "orca-math-word-problems-200k": 0.061}


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation of two score lists without ties (five sources' weights)."""
    def ranks(xs: list[float]) -> list[int]:
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        out = [0] * len(xs)
        for rank, i in enumerate(order):
            out[i] = rank
        return out

    ra, rb, n = ranks(a), ranks(b), len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


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


def reweight(env: dict, output: Path, *overrides: str, reuse: bool = False) -> dict:
    if not (reuse and (output / "weights.json").is_file()):
        subprocess.run(["scalebio", "reweight", "--config", str(RECIPE), f"output_dir={output}", *overrides, "--force"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads((output / "weights.json").read_text())


def record_lora(lisa: dict, lora: dict, lora_lisa: dict, r: int, took: str) -> None:
    """LISA's weights next to LoRA's, adapters training in every block and under LISA's draws."""
    names = sorted(lisa["weights"], key=lambda n: -lisa["weights"][n])
    rows = [f"| source | LISA (full model copies) | LoRA r={r}, every block | LoRA r={r}, LISA over the adapters "
            "| paper, Llama-3-8B |", "|---|---:|---:|---:|---:|"]
    rows += [f"| {n} | {lisa['weights'][n]:.3f} | {lora['weights'][n]:.3f} | {lora_lisa['weights'][n]:.3f} | "
             f"{PAPER[n]:.3f} |" for n in names]
    lisa_w, lora_w, both_w, paper = ([d[n] for n in names] for d in (lisa["weights"], lora["weights"],
                                                                    lora_lisa["weights"], PAPER))
    cfg = lora["config"]["reweight"]
    draws = lora_lisa["config"]["reweight"]["lisa"]
    body = "\n".join([
        f"`python scripts/run_instruct_math.py --lora {r} --weights-only` ({lora['steps']} steps each, the recipe "
        f"above; LoRA: u and w two rank-{r} adapters on every linear layer of the blocks over one frozen copy of the "
        f"model, lr_u/w {cfg['lr_u']}, training in every block (`reweight.lisa.layers=0`) or, LISA over the "
        f"adapters, in {draws['layers']} drawn blocks re-drawn every {draws['interval']} steps (the recipe's LISA); "
        f"{took}). All on the tiny model built from scratch, so the LoRA adapters move a random base: what this "
        "shows is whether the bilevel signal survives the rank-r restriction. Spearman: LoRA vs LISA "
        f"{spearman(lora_w, lisa_w):+.2f}, LoRA with LISA over the adapters vs LISA {spearman(both_w, lisa_w):+.2f} "
        f"and vs LoRA in every block {spearman(both_w, lora_w):+.2f}; vs the paper: LoRA "
        f"{spearman(lora_w, paper):+.2f}, LoRA with LISA {spearman(both_w, paper):+.2f}, LISA "
        f"{spearman(lisa_w, paper):+.2f}.", "", *rows])
    RESULTS.write_text(replace_section(RESULTS.read_text(), "lora", body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=3000, help="records per fine-tuning set")
    parser.add_argument("--no-record", action="store_true", help="do not touch docs/results.md")
    parser.add_argument("--lora", type=int, default=0, metavar="R", help="also reweight with rank-R LoRA adapters")
    parser.add_argument("--weights-only", action="store_true", help="run the reweight stage(s) only")
    parser.add_argument("--reuse", action="store_true", help="with --weights-only: keep weights.json files that exist")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: make instruct-math-data INSTRUCT_MATH=/path/to/instruct-math")
    build_model()
    start = time.perf_counter()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if args.weights_only:
        doc = reweight(env, RUN / "reweight", reuse=args.reuse)
    else:
        subprocess.run([str(ROOT / "scripts" / "pipeline.sh"), str(RECIPE), str(DATA / "test.json"), str(RUN),
                        str(args.samples), "uniform proportional"], check=True, env=env)
        doc = json.loads((RUN / "reweight" / "weights.json").read_text())
        if not args.no_record:
            record(doc, json.loads((RUN / "comparison.json").read_text()), time.perf_counter() - start, args.samples)
            print(f"recorded in {RESULTS}")
    if args.lora:
        lr = 10 * float(doc["config"]["reweight"]["lr_u"])  # adapters learn from zero: 10x the full model's rate
        reuse = args.reuse and args.weights_only
        lora = reweight(env, RUN / "reweight-lora", f"reweight.lora.r={args.lora}", "reweight.lisa.layers=0",
                        f"reweight.lr_u={lr}", f"reweight.lr_w={lr}", reuse=reuse)
        both = reweight(env, RUN / "reweight-lora-lisa", f"reweight.lora.r={args.lora}", f"reweight.lr_u={lr}",
                        f"reweight.lr_w={lr}", reuse=reuse)  # the recipe's LISA, over the adapters
        print(" ".join(f"{n} LISA {doc['weights'][n]:.3f} LoRA {lora['weights'][n]:.3f} LoRA+LISA "
                       f"{both['weights'][n]:.3f}" for n in doc["weights"]))
        if not args.no_record:
            took = ("weights files of earlier runs reused where present" if args.reuse
                    else f"{(time.perf_counter() - start) / 60:.1f} min on 2 CPU cores")
            record_lora(doc, lora, both, args.lora, took)
            print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
