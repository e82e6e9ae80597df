"""The paper's comparison on a real model: SmolLM2-135M-Instruct on the five instruct-math sources, ScaleBiO's mix
against uniform, proportional, RHO-loss and LESS, each fine-tuned and evaluated over several seeds.

    python scripts/compare_math.py                        # 2 CPU cores: a pool of 100 records a source, 3 seeds
    python scripts/compare_math.py --per-source 0 --num-val 0 -n 6000 precision=bf16 ...   # a GPU, whole files

What a user would run, as `scalebio` subprocesses (every stage resumes or reuses finished work):
  reweight  recipes/instruct-math-smollm2.yaml on the pool -> weights.json (one run: its evidence says how sure)
  select    --method rho-loss and --method less, N records of the pool each (one selection; seeds vary training)
  compare   scalebio / uniform / proportional / rho-loss / less: sample N (seeded), fine-tune (the recipe's
            `finetune` section, seeded), held-out loss on test.json (280 records); mean and std over seeds
The pool: a seeded draw of --per-source records of each training file and --num-val of val.json (0 = whole files),
so that the per-record baselines can score all of it on a CPU. Writes the section between
`<!-- compare-math:begin/end -->` in docs/results.md. No threshold on the outcome: this records what happens.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "instruct-math"  # `make instruct-math-data` links it
RECIPE = ROOT / "recipes" / "instruct-math-smollm2.yaml"
MODEL = Path.home() / ".cache" / "scalebio" / "models" / "SmolLM2-135M-Instruct"
RESULTS = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- compare-math:begin -->", "<!-- compare-math:end -->"
# CPU-sized baselines (bench_select.py's): the irreducible model 2 epochs over the validation set; LESS's warm-up
# 2 epochs at batch 8 (5% of a 500-record pool is one batch of 32 otherwise) with projection 1,024.
SELECT = ["select.rho_loss.holdout_epochs=2", "select.less.epochs=2", "select.less.lr=1e-4",
          "select.less.batch_size=8"]


def subset(src: Path, dst: Path, n: int, seed: int) -> str:
    """A seeded draw of n records of a JSON list file (all of it for n = 0 or n >= its size), in file order."""
    records = json.loads(src.read_text())
    if 0 < n < len(records):
        keep = sorted(random.Random(f"{seed}:{src.name}").sample(range(len(records)), n))
        records = [records[i] for i in keep]
    dst.write_text(json.dumps(records))
    return str(dst)


def scalebio(*args: str, log: Path) -> None:
    command = [str(Path(sys.executable).parent / "scalebio"), *args]
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    with log.open("a") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        if subprocess.run(command, stdout=out, stderr=out).returncode:
            sys.exit(f"failed: {' '.join(command)} (log: {log})")


def report(work: Path, args: argparse.Namespace, minutes: float) -> str:
    weights = json.loads((work / "reweight" / "weights.json").read_text())
    compare = json.loads((work / "compare" / "compare.json").read_text())
    rows = ["| source | weight | evidence z |", "|---|---:|---:|"]
    for name, w in sorted(weights["weights"].items(), key=lambda kv: -kv[1]):
        z = weights["evidence"][name]["z"]
        rows.append(f"| {name} | {w:.3f} | {'-' if z is None else f'{z:+.1f}'} |")
    table = ["| mix | held-out loss, mean ± std | per seed |", "|---|---:|---|"]
    for name, mix in sorted(compare["mixes"].items(), key=lambda kv: kv[1]["results"]["test"]["loss"]["mean"]):
        loss = mix["results"]["test"]["loss"]
        table.append(f"| {name} | {loss['mean']:.4f} ± {loss['std']:.4f} | "
                     + ", ".join(f"{v:.4f}" for v in loss["per_seed"]) + " |")
    command = " ".join(["python scripts/compare_math.py", *sys.argv[1:]])
    pool = "whole files" if not args.per_source else f"{args.per_source} records a source"
    val = "all of val.json" if not args.num_val else f"{args.num_val} of val.json"
    return "\n".join([
        f"`{command}` (`make compare-math`; pool: {pool}, validation: {val}; {args.num_samples} records per mix; "
        f"seeds {', '.join(map(str, args.seeds))}; {minutes:.0f} min on this machine over its invocations). "
        f"Weights: one reweight run ({weights['config']['reweight']['steps']} steps), with its evidence per source:",
        "", *rows, "",
        "Held-out loss (response tokens of the 280 test.json records) after fine-tuning SmolLM2 on each mix, "
        "best first; the seed draws the sample (scalebio, uniform, proportional) and the fine-tuning order (all "
        "five; the RHO-loss and LESS files are one selection each):", "", *table, "",
        "![held-out loss per mix and seed](compare-math.png)"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-source", type=int, default=100, help="pool records per source (0 = whole files)")
    parser.add_argument("--num-val", type=int, default=100, help="validation records (0 = all of val.json)")
    parser.add_argument("-n", "--num-samples", type=int, default=160, help="records per mix")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "compare-math")
    parser.add_argument("--no-record", action="store_true", help="do not touch docs/results.md")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE recipe overrides for every stage")
    args = parser.parse_args()
    if not (DATA / "val.json").is_file():
        sys.exit(f"{DATA} not found: make instruct-math-data INSTRUCT_MATH=/path/to/instruct-math")
    work = args.work.resolve()
    (work / "data").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["data"]["sources"] = {name: subset(DATA / f"train_{name}.json", work / "data" / f"train_{name}.json",
                                              args.per_source, 0) for name in recipe["data"]["sources"]}
    recipe["data"]["validation"] = subset(DATA / "val.json", work / "data" / "val.json", args.num_val, 0)
    recipe.update(model=args.model, output_dir=str(work / "reweight"))
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    common, log, n = ["--config", str(work / "recipe.yaml"), *args.overrides], work / "commands.log", args.num_samples
    scalebio("reweight", *common, "--resume", "auto", log=log)
    for method in ("rho-loss", "less"):
        out = work / f"{method}.jsonl"
        if not out.with_name(f"{method}.manifest.json").is_file():
            scalebio("select", *common, *SELECT, "--method", method, "-n", str(n), "-o", str(out), "--force", log=log)
    scalebio("compare", *common, "-n", str(n), "--seeds", *map(str, args.seeds),
             "--mix", f"scalebio={work / 'reweight' / 'weights.json'}", "--mix", "uniform", "--mix", "proportional",
             "--mix", f"rho-loss={work / 'rho-loss.jsonl'}", "--mix", f"less={work / 'less.jsonl'}",
             "--test", f"test={DATA / 'test.json'}", "--output", str(work / "compare"), log=log)
    # The time the table cost, summed over invocations: a rerun that reuses finished stages must not report only
    # its own few seconds.
    ledger = work / "elapsed.json"
    seconds = (json.loads(ledger.read_text())["seconds"] if ledger.is_file() else 0.0) + time.perf_counter() - start
    ledger.write_text(json.dumps({"seconds": seconds}))
    body = report(work, args, seconds / 60)
    print(body)
    if not args.no_record:
        text = RESULTS.read_text()
        block = f"{BEGIN}\n{body}\n{END}"
        RESULTS.write_text(text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):] if BEGIN in text
                           else text.rstrip() + "\n\n" + block + "\n")
        (ROOT / "docs" / "compare-math.png").write_bytes((work / "compare" / "compare.png").read_bytes())
        print(f"recorded in {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
