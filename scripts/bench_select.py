"""`scalebio select` on a real model: SmolLM2-135M-Instruct on the paper's alpaca denoising case (clean / "." answers /
answers with their words shuffled, GPT4-LLM-Cleaned records, 200 a source by default; validation: 100 clean records
of the same kind), or `--case orca` (orca-math records, shuffled = another record's answer). Each method is asked
for a third of the pool, per seed (the seed draws the records and seeds the method), and must take >= 60% clean in
every seed. RHO-loss runs with its default settings. Prints a table and replaces the case's section between
`<!-- bench_select[ CASE]: begin -->` and `<!-- bench_select[ CASE]: end -->` in docs/benchmarks.md (alpaca: no CASE).

    python scripts/bench_select.py [--case alpaca|orca] [--per-source 200] [--num-val 100] [--seeds 0 1 2]
                                   [--methods rho-loss less] [--work DIR] [--no-record] [KEY=VALUE ...]  (overrides)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases.denoising import write_alpaca_case, write_case

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "instruct-math"
ORCA = SHARED / "train_orca-math-word-problems-200k.json"
ALPACA = SHARED / "train_GPT4-LLM-Cleaned.json"
MODEL = Path.home() / ".cache" / "scalebio" / "models" / "SmolLM2-135M-Instruct"
# CPU-sized LESS (2 warm-up epochs at batch 8, projection 1,024; published: 4 epochs, 8,192); RHO-loss: defaults
RECIPE = {"data": {"max_length": 128},
          "select": {"less": {"epochs": 2, "lr": 1e-4, "batch_size": 8, "projection_dim": 1024}}}


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


def run_select(recipe: Path, method: str, n: int, out: Path, seed: int, overrides: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    result = subprocess.run([str(Path(sys.executable).parent / "scalebio"), "select", "--config", str(recipe),
                             "--method", method, "-n", str(n), "-o", str(out), "--seed", str(seed), "--force",
                             *overrides],
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"select {method} failed:\n{result.stderr[-3000:]}")
    return json.loads(out.with_name(out.stem + ".manifest.json").read_text()), time.perf_counter() - start


def method_defaults(method: str) -> dict:
    """The method's select section defaults as this checkout has them: a changed default recomputes its selection."""
    from dataclasses import asdict

    from scalebio_cli.recipe.schema import LessConfig, RhoLossConfig

    return asdict(RhoLossConfig() if method == "rho-loss" else LessConfig())


def reused(out: Path, key: dict) -> tuple[dict, float] | None:
    """A finished selection in --work made from the same data, size, seed and settings (its key file says so), with
    the seconds it took then; None otherwise."""
    key_file, manifest = out.with_name(out.stem + ".key.json"), out.with_name(out.stem + ".manifest.json")
    if not (key_file.is_file() and manifest.is_file() and out.is_file()):
        return None
    recorded = json.loads(key_file.read_text())
    seconds = recorded.pop("seconds")
    return (json.loads(manifest.read_text()), seconds) if recorded == json.loads(json.dumps(key)) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=("alpaca", "orca"), default="alpaca")
    parser.add_argument("--per-source", type=int, default=200)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["rho-loss", "less"], choices=("rho-loss", "less"))
    parser.add_argument("--max-chars", type=int, default=600, help="orca: question + answer shorter than this")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--work", type=Path, help="keep the runs here and reuse a finished selection whose data, "
                        "size, seed and settings match (default: a new temporary folder)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-select-"))
    n = args.per_source  # a third of the pool
    rows, failed, shares = [], [], {m: [] for m in args.methods}
    for seed in args.seeds:
        folder = work / f"seed{seed}"
        if args.case == "alpaca":
            paths = write_alpaca_case(folder / "data", ALPACA, args.per_source, args.num_val, seed)
        else:
            paths = write_case(folder / "data", pairs_from(ORCA, args.max_chars), args.per_source, args.num_val, seed)
        recipe = {"model": str(MODEL), "output_dir": str(folder / "run"), "seed": seed, **RECIPE}
        recipe["data"] = {**RECIPE["data"], "sources": {k: str(paths[k]) for k in ("clean", "dot", "shuffled")},
                          "validation": str(paths["val"])}
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        for method in args.methods:
            out = folder / f"{method}.jsonl"
            key = {"data": {k: hashlib.sha256(Path(v).read_bytes()).hexdigest() for k, v in paths.items()},
                   "method": method, "n": n, "seed": seed, "overrides": args.overrides, "recipe": RECIPE,
                   "defaults": method_defaults(method)}
            manifest, seconds = reused(out, key) or run_select(folder / "recipe.yaml", method, n, out, seed,
                                                               args.overrides)
            out.with_name(out.stem + ".key.json").write_text(json.dumps({**key, "seconds": seconds}))
            counts, share = manifest["counts"], manifest["counts"]["clean"] / n
            shares[method].append(share)
            fit = manifest["settings"].get("irreducible")
            il = (f"{fit['heldout_loss_before']:.3f} -> {fit['heldout_loss_after']:.3f} ({fit['steps']} steps)"
                  if fit else "")
            rows.append(f"| {method} | {seed} | {counts['clean']} | {counts['dot']} | {counts['shuffled']} | "
                        f"{share:.0%} | {il} | {seconds:.0f} s |")
            if share < 0.6:
                failed.append(f"{method} seed {seed}")
    means = ", ".join(f"{m} {sum(v) / len(v):.0%}" for m, v in shares.items())
    if len(shares) == 2 and all(len(v) > 1 for v in shares.values()):  # same pool and seed: a paired difference
        from scalebio_cli.results.paired import versus

        (a, va), (b, vb) = shares.items()
        d = versus(vb, va)
        means += (f"; {b} minus {a}, seed by seed: {d['diff_mean']:+.0%} (95% t-interval {d['ci95'][0]:+.0%} to "
                  f"{d['ci95'][1]:+.0%}, {len(va)} seeds)")
    table = "\n".join([
        f"### select on SmolLM2-135M-Instruct: {args.case} denoising, {3 * n} records, {n} asked for", "",
        "| method | seed | clean | dot | shuffled | clean share | IL model held-out loss | time |",
        "|---|---:|---:|---:|---:|---:|---|---:|", *rows, "", f"Mean clean share: {means}.", "",
        f"`{' '.join(['python scripts/bench_select.py', *sys.argv[1:]])}`: {args.num_val} clean validation records; "
        "RHO-loss with its default settings (select.rho_loss), LESS CPU-sized (RECIPE in the script: 2 warm-up "
        "epochs at batch 8, projection 1,024), max_length 128. Each method must take >= 60% clean in every seed."])
    print(table)
    if not args.no_record:
        doc = ROOT / "docs" / "benchmarks.md"
        old = doc.read_text(encoding="utf-8") if doc.is_file() else "# Benchmarks\n"
        tag = "" if args.case == "alpaca" else f" {args.case}"  # a section per case
        begin, end = f"<!-- bench_select{tag}: begin -->", f"<!-- bench_select{tag}: end -->"
        section = f"{begin}\n{table}\n{end}"
        new = (old[: old.index(begin)] + section + old[old.index(end) + len(end):] if begin in old and end in old
               else old.rstrip() + "\n\n" + section + "\n")
        doc.write_text(new, encoding="utf-8")
    if failed:
        sys.exit(f"clean share below 60%: {', '.join(failed)}")


if __name__ == "__main__":
    main()
