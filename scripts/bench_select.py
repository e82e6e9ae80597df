"""`scalebio select` on a real model: SmolLM2-135M-Instruct on a denoising case built from instruct-math records
(clean / "." answers / shuffled answers, 100 records each by default; validation: clean records of the same kind).
Each method is asked for a third of the pool and must take >= 60% clean. Prints a table and replaces the section
between `<!-- bench_select: begin -->` and `<!-- bench_select: end -->` in docs/benchmarks.md.

    python scripts/bench_select.py [--per-source 100] [--no-record] [KEY=VALUE ...]   (recipe overrides)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from scalebio_cli.selection.denoising import write_case

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "instruct-math" / "train_orca-math-word-problems-200k.json"
MODEL = Path.home() / ".cache" / "scalebio" / "models" / "SmolLM2-135M-Instruct"
BEGIN, END = "<!-- bench_select: begin -->", "<!-- bench_select: end -->"
# CPU-sized: max_length 128, 2 warm-up epochs / 2 holdout epochs (published: 4 and the finetune section's)
RECIPE = {"data": {"max_length": 128}, "finetune": {"lr": 5e-5, "batch_size": 8, "micro_batch_size": 8},
          "select": {"rho_loss": {"holdout_epochs": 2}, "less": {"epochs": 2, "lr": 1e-4, "batch_size": 8,
                                                                  "projection_dim": 1024}}}


def pairs_from(path: Path, max_chars: int = 600):
    """(question, answer) pairs of the file's short records (question + answer < max_chars: most fit max_length 128
    tokens), in file order; `take(n)` hands out the next n and stops the benchmark when the file runs out."""
    records = json.loads(path.read_text())
    turns = [(r["items"][0]["value"], r["items"][1]["value"]) for r in records
             if len(r.get("items", [])) >= 2 and len(r["items"][0]["value"]) + len(r["items"][1]["value"]) < max_chars]
    position = [0]

    def take(n: int) -> list[tuple[str, str]]:
        out = turns[position[0]: position[0] + n]
        position[0] += n
        if len(out) < n:
            sys.exit(f"{path.name}: only {len(turns):,} records under {max_chars} characters; lower --per-source or "
                     "--num-val")
        return out
    return take


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-source", type=int, default=100)
    parser.add_argument("--num-val", type=int, default=64)
    parser.add_argument("--max-chars", type=int, default=600, help="records used: question + answer shorter than this")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-select-"))
    paths = write_case(work / "data", pairs_from(DATA, args.max_chars), args.per_source, args.num_val)
    recipe = {"model": str(MODEL), "output_dir": str(work / "run"), **RECIPE}
    recipe["data"] = {**RECIPE["data"], "sources": {n: str(paths[n]) for n in ("clean", "dot", "shuffled")},
                      "validation": str(paths["val"])}
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    n = args.per_source  # a third of the pool
    rows, failed = [], []
    for method in ("rho-loss", "less"):
        out = work / f"{method}.jsonl"
        start = time.perf_counter()
        result = subprocess.run([str(Path(sys.executable).parent / "scalebio"), "select", "--config",
                                 str(work / "recipe.yaml"), "--method", method, "-n", str(n), "-o", str(out),
                                 *args.overrides], capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"select {method} failed:\n{result.stderr[-3000:]}")
        counts = json.loads(out.with_name(out.stem + ".manifest.json").read_text())["counts"]
        share = counts["clean"] / n
        rows.append(f"| {method} | {counts['clean']} | {counts['dot']} | {counts['shuffled']} | {share:.0%} | "
                    f"{time.perf_counter() - start:.0f} s |")
        if share < 0.6:
            failed.append(method)
    table = "\n".join([f"### select on SmolLM2-135M-Instruct: denoising, {3 * n} records, {n} asked for", "",
                       "| method | clean | dot | shuffled | clean share | time |", "|---|---:|---:|---:|---:|---:|",
                       *rows, "", f"`{' '.join(['python scripts/bench_select.py', *sys.argv[1:]])}`: orca-math "
                       f"records (question + answer under {args.max_chars} characters), {args.num_val} clean "
                       "validation records; settings: RECIPE in the script (CPU-sized: max_length 128, 2 holdout "
                       "epochs, 2 LESS warm-up epochs at batch 8, projection 1,024). Each method must take >= 60% "
                       "clean."])
    print(table)
    if not args.no_record:
        doc = ROOT / "docs" / "benchmarks.md"
        old = doc.read_text(encoding="utf-8") if doc.is_file() else "# Benchmarks\n"
        section = f"{BEGIN}\n{table}\n{END}"
        new = (old[: old.index(BEGIN)] + section + old[old.index(END) + len(END):] if BEGIN in old and END in old
               else old.rstrip() + "\n\n" + section + "\n")
        doc.write_text(new, encoding="utf-8")
    if failed:
        sys.exit(f"clean share below 60%: {', '.join(failed)}")


if __name__ == "__main__":
    main()
