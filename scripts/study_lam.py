"""Are the verdicts right on real runs? The demo (tiny model, CPU), with and without signal, short and long runs,
LISA on and off, five seeds: how many runs call a source, against what the level allows.

    python scripts/study_lam.py                          # the whole study (~40 runs; see docs/results.md)
    python scripts/study_lam.py --seeds 0 1 --steps 60   # a part of it
    python scripts/study_lam.py --jobs 4                 # runs in parallel (one process each)
    python scripts/study_lam.py --finished-only          # tabulate what --work holds, naming what is missing

Finished runs are kept in --work (runs/study-lam) and reused by a rerun with more seeds or settings; a change of
code does not invalidate them: delete --work after one.

Two cases built from the demo data (scripts/build_demo.py):
  denoising  the demo: clean (right answers), noisy (answers replaced by "."), offtopic (another task); the right
             verdicts: clean raised, noisy and offtopic lowered
  no-signal  the demo's clean source split three ways (one distribution), validation drawn from it too; the right
             verdict is "unclear" for every source: a run that calls any source is a false alarm, and at the level
             0.05 (Holm over the sources) at most 5% of runs may raise one

Settings: the demo recipe's own, with LISA as written for the case (`lisa-1`: 1 block re-drawn every 20 steps, the
issue's tiny case; `lisa-off`: every block, so the batches follow the series' own correlation time) and
`--steps` long. The script prints a table, and writes the section "The verdicts on real runs" of docs/results.md
between its markers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
VARIANTS: dict[str, list[str]] = {
    "lisa-1": ["reweight.lisa.layers=1", "reweight.lisa.interval=20"],
    "lisa-off": ["reweight.lisa.layers=0"],
    # lisa-1 with a placebo: half of the largest source as a source of its own, tested against the other half
    "lisa-1-placebo": ["reweight.lisa.layers=1", "reweight.lisa.interval=20", "reweight.placebo=true"],
}
CALLED_RIGHT = {"denoising": {"clean": "raised", "noisy": "lowered", "offtopic": "lowered"}}


def no_signal_data(demo: Path, out: Path) -> dict[str, str]:
    records = (demo / "data" / "clean.jsonl").read_text().splitlines()
    random.Random(0).shuffle(records)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for k, name in enumerate(["part0", "part1", "part2", "val"]):
        path = out / f"{name}.jsonl"
        path.write_text("\n".join(records[k::4]) + "\n")
        paths[name] = str(path)
    return paths


def run(case: str, variant: str, seed: int, steps: int, work: Path, sources: dict[str, str] | None,
        val: str | None) -> dict:
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    demo = ROOT / "demo"
    recipe["model"] = str(demo / "model")
    recipe["data"]["sources"] = sources or {k: str(demo / "data" / Path(v).name)
                                            for k, v in recipe["data"]["sources"].items()}
    recipe["data"]["validation"] = val or str(demo / "data" / "val.jsonl")
    tag = f"{case}-{variant}-{steps}-{seed}"
    recipe["seed"], recipe["output_dir"] = seed, str(work / "runs" / tag)
    recipe["reweight"].update(steps=steps, log_every=5)
    recipe["checkpoint"] = {"every": 0}
    path = work / "recipes" / f"{tag}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    exe = Path(sys.executable).parent / "scalebio"
    start = time.perf_counter()
    result = subprocess.run([str(exe), "reweight", "--config", str(path), "--force", *VARIANTS[variant]],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{case} {variant} seed {seed} failed:\n{result.stderr[-3000:]}")
    doc = json.loads((Path(recipe["output_dir"]) / "weights.json").read_text())
    return {"case": case, "variant": variant, "seed": seed, "steps": steps, "weights": doc["weights"],
            "evidence": doc["evidence"], "settled": doc.get("settled", {}).get("all"),
            "placebo": (doc.get("placebo") or {}).get("evidence"),
            "trajectory": doc["trajectory"], "seconds": time.perf_counter() - start}


def called(r: dict) -> list[str]:
    return [f"{n} {e['verdict']}" for n, e in r["evidence"].items() if e["verdict"] != "unclear"]


def left_out(runs: list[dict], min_weight: float) -> str:
    """What `sample --min-weight` would leave out of each run's sample: sources and in how many runs."""
    from collections import Counter

    from scalebio_cli.stages.sample import floored

    counts = Counter(n for r in runs for n in floored(r["weights"], min_weight)[1])
    return ", ".join(f"{n} in {c}" for n, c in sorted(counts.items())) or "none"


def table(results: list[dict], case: str, min_weight: float) -> str:
    """Per setting: runs, runs calling any source (no-signal) or calling every source right (denoising), the
    smallest p seen, what was called, and the placebo's verdicts where the setting has one (each a false alarm);
    what `sample --min-weight` would leave out."""
    rows = [r for r in results if r["case"] == case]
    right = CALLED_RIGHT.get(case)
    head = ("| LISA | steps | runs | " + ("runs called right" if right else "runs calling any source")
            + f" | verdicts (all runs) | smallest p | settled | left out by `sample --min-weight {min_weight:g}` |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        for steps in sorted({r["steps"] for r in rows}):
            runs = [r for r in rows if r["variant"] == variant and r["steps"] == steps]
            if not runs:
                continue
            if right:
                hits = sum(all(r["evidence"][n]["verdict"] == v for n, v in right.items()) for r in runs)
            else:
                hits = sum(bool(called(r)) for r in runs)
            verdicts = "; ".join(", ".join(called(r)) or "none" for r in runs)
            ps = [e["p"] for r in runs for e in r["evidence"].values() if e.get("p") is not None]
            smallest = f"{min(ps):.2g}" if ps else "- (too few batches)"
            settled = sum(bool(r.get("settled")) for r in runs)
            placebos = [r["placebo"] for r in runs if r.get("placebo")]
            if placebos:  # the real sources' p above; the placebo's own (against its twin) beside it
                alarms = sum(e["verdict"] != "unclear" for e in placebos)
                ps = [e["p"] for e in placebos if e.get("p") is not None]
                verdicts += (f"; placebo called in {alarms} of {len(placebos)}"
                             + (f" (p {min(ps):.2g}-{max(ps):.2g})" if ps else ""))
            lines.append(f"| {variant} | {steps} | {len(runs)} | {hits} | {verdicts} | {smallest} | "
                         f"{settled}/{len(runs)} | {left_out(runs, min_weight)} |")
    return "\n".join(lines)


def write_results(text: str) -> None:
    doc = ROOT / "docs" / "results.md"
    begin, end = "<!-- study_lam: begin -->", "<!-- study_lam: end -->"
    block = f"{begin}\n{text}\n{end}"
    existing = doc.read_text()
    if begin in existing and end in existing:
        before, rest = existing.split(begin, 1)
        doc.write_text(before + block + rest.split(end, 1)[1])
    else:
        doc.write_text(existing.rstrip() + "\n\n## The verdicts on real runs\n\n" + block + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, nargs="+", default=[60, 200])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--cases", nargs="+", default=["no-signal", "denoising"], choices=["no-signal", "denoising"])
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each its own process)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "study-lam")
    parser.add_argument("--min-weight", type=float, default=0.05,
                        help="the floor whose effect on `sample` the tables show (what it would leave out)")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--finished-only", action="store_true",
                        help="tabulate the finished runs of the grid (in --work), run nothing, name the missing ones")
    args = parser.parse_args()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_demo.py")], check=True, capture_output=True)
    null = no_signal_data(ROOT / "demo", args.work / "no-signal")
    null_sources = {k: v for k, v in null.items() if k != "val"}
    done_file = args.work / "results.json"  # every finished run, so that a rerun (or more seeds) reuses them
    done = json.loads(done_file.read_text()) if done_file.exists() else {}
    grid = [(case, variant, steps, seed) for case in args.cases for variant in args.variants
            for steps in args.steps for seed in args.seeds]
    todo = [g for g in grid if "/".join(map(str, g)) not in done]
    missing = ["/".join(map(str, g)) for g in todo] if args.finished_only else []
    todo = [] if args.finished_only else todo

    def one(g: tuple) -> tuple[str, dict]:
        case, variant, steps, seed = g
        sources, val = (None, None) if case == "denoising" else (null_sources, null["val"])
        return "/".join(map(str, g)), run(case, variant, seed, steps, args.work, sources, val)

    from concurrent.futures import ThreadPoolExecutor

    if args.jobs > 1:  # one thread per run: torch's threads of several runs fighting over the cores made a 200-step
        # demo run 19x slower (1.3 s a step against 0.07 alone, 2 jobs on 2 cores)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # threads wait on subprocesses: one process per run
        for key, r in pool.map(one, todo):
            done[key] = r
            done_file.write_text(json.dumps(done))
            print(f"{key}: " + " ".join(f"{n} {e['verdict']} (p {e['p']})" for n, e in r["evidence"].items()),
                  flush=True)
    results = [done["/".join(map(str, g))] for g in grid if "/".join(map(str, g)) in done]
    minutes = sum(r["seconds"] for r in results) / 60  # the runs' own time, reused ones included
    flag = "--finished-only " if args.finished_only else ""
    command = (f"python scripts/study_lam.py {flag}--seeds {' '.join(map(str, args.seeds))} --steps "
               f"{' '.join(map(str, args.steps))} --variants {' '.join(args.variants)} --cases {' '.join(args.cases)}")
    text = (f"`{command}` ({len(results)} runs of the demo recipe, {minutes:.0f} min of run time on this machine). "
            "Verdicts at p < 0.05, Holm-adjusted over the three sources; a run too short for "
            f"{4} batches of at least one LISA interval says unclear.\n")
    if missing:
        text += (f"\nNot run ({len(missing)} of the grid's {len(grid)}; the same command without --finished-only runs "
                 f"them): {', '.join(missing)}.\n")
    for case in args.cases:
        text += ("\nNo signal (one distribution split three ways; every verdict is a false alarm; at the level at "
                 "most 1 run in 20 may call a source):\n\n" if case == "no-signal" else
                 "\nDenoising (right: clean raised, noisy and offtopic lowered):\n\n")
        text += table(results, case, args.min_weight) + "\n"
    print(text)
    if not args.no_record:
        write_results(text.rstrip())


if __name__ == "__main__":
    main()
