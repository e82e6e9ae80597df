"""The lam step's variance reductions, one change at a time, on the demo (tiny model, CPU): weights and evidence.

    python scripts/study_lam.py                 # 3 seeds, every variant, ~10 min on 2 idle cores
    python scripts/study_lam.py --seeds 0 --variants reference every-3

Finished runs are kept in --work (runs/study-lam) and reused by a rerun with more seeds or variants; a change of
code does not invalidate them: delete --work after one.

Two cases built from the demo data (scripts/build_demo.py):
  denoising  the demo: clean (right answers), noisy (answers replaced by "."), offtopic (another task); the right
             answer is clean first, noisy last
  no-signal  the demo's clean source split three ways (one distribution), validation drawn from it too; the right
             answer is "cannot tell": every |z| < 3 and weights near uniform

Each variant changes one setting from `reference` (the reference's lam step: cosine rate, no delay, one lam step per
step, constant alpha); the demo's own learning rates and batches stay. The script prints a table per case, plots
the clean weight over steps, and writes the section "The lam step" of docs/results.md between its markers.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
STEPS = 60
VARIANTS: dict[str, list[str]] = {
    "reference": [],
    "constant": ["reweight.lambda_schedule=constant"],
    "delay-10": ["reweight.lambda_delay=10"],
    "every-3": ["reweight.lambda_every=3"],
    "tau-2": ["reweight.tau=2", "reweight.tau_every=25"],
    "defaults": ["reweight.lambda_schedule=constant", "reweight.lambda_delay=null"],  # the shipped lam settings
    "relative": ["reweight.lambda_signal=relative"],  # changes the fixed point: for comparison only
}


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


def run(case: str, variant: str, seed: int, work: Path, sources: dict[str, str] | None, val: str | None) -> dict:
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    demo = ROOT / "demo"
    recipe["model"] = str(demo / "model")
    recipe["data"]["sources"] = sources or {k: str(demo / "data" / Path(v).name)
                                            for k, v in recipe["data"]["sources"].items()}
    recipe["data"]["validation"] = val or str(demo / "data" / "val.jsonl")
    recipe["seed"], recipe["output_dir"] = seed, str(work / "runs" / f"{case}-{variant}-{seed}")
    recipe["reweight"].update(steps=STEPS, log_every=5)
    recipe["checkpoint"] = {"every": 0}
    path = work / "recipes" / f"{case}-{variant}-{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    exe = Path(sys.executable).parent / "scalebio"
    start = time.perf_counter()
    result = subprocess.run([str(exe), "reweight", "--config", str(path), "--force", *VARIANTS[variant]],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{case} {variant} seed {seed} failed:\n{result.stderr[-3000:]}")
    doc = json.loads((Path(recipe["output_dir"]) / "weights.json").read_text())
    return {"case": case, "variant": variant, "seed": seed, "weights": doc["weights"],
            "evidence": doc["evidence"], "trajectory": doc["trajectory"], "seconds": time.perf_counter() - start}


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else \
        f"{values[0]:.3f}"


def table(results: list[dict], case: str) -> str:
    rows = [r for r in results if r["case"] == case]
    names = list(rows[0]["weights"])
    head = ("| variant | seeds | " + " | ".join(f"{n} weight" for n in names) + " | "
            + " | ".join(f"{n} z" for n in names) + " | max abs z |")
    lines = [head, "|" + "---|" * (3 + 2 * len(names))]
    for variant in VARIANTS:
        runs = [r for r in rows if r["variant"] == variant]
        if not runs:
            continue
        weights = [mean_std([r["weights"][n] for r in runs]) for n in names]
        zs = [mean_std([r["evidence"][n]["z"] or 0.0 for r in runs]) for n in names]
        worst = max(abs(e["z"] or 0.0) for r in runs for e in r["evidence"].values())
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(weights) + " | " + " | ".join(zs)
                     + f" | {worst:.2f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (case, source) in zip(axes, [("denoising", "clean"), ("no-signal", "part0")]):
        for k, variant in enumerate(VARIANTS):
            for r in (r for r in results if r["case"] == case and r["variant"] == variant):
                steps = [p["step"] for p in r["trajectory"]]
                ax.plot(steps, [p["weights"][source] for p in r["trajectory"]], color=f"C{k}", alpha=0.7,
                        label=variant if r["seed"] == min(x["seed"] for x in results) else None)
        ax.axhline(1 / 3, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{case}: weight of {source}")
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_results(text: str) -> None:
    doc = ROOT / "docs" / "results.md"
    begin, end = "<!-- study_lam: begin -->", "<!-- study_lam: end -->"
    block = f"{begin}\n{text}\n{end}"
    existing = doc.read_text()
    if begin in existing and end in existing:
        before, rest = existing.split(begin, 1)
        doc.write_text(before + block + rest.split(end, 1)[1])
    else:
        doc.write_text(existing.rstrip() + "\n\n## The lam step: variance reductions on the demo\n\n" + block + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "study-lam")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_demo.py")], check=True, capture_output=True)
    null = no_signal_data(ROOT / "demo", args.work / "no-signal")
    null_sources = {k: v for k, v in null.items() if k != "val"}
    done_file = args.work / "results.json"  # every finished run, so that a rerun (or more seeds) reuses them
    done = json.loads(done_file.read_text()) if done_file.exists() else {}
    results = []
    for variant in args.variants:
        for seed in args.seeds:
            for case in ("denoising", "no-signal"):
                sources, val = (None, None) if case == "denoising" else (null_sources, null["val"])
                key = f"{case}/{variant}/{seed}/{STEPS}"
                if key not in done:
                    done[key] = run(case, variant, seed, args.work, sources, val)
                    done_file.write_text(json.dumps(done))
                results.append(done[key])
                r = results[-1]
                print(f"{case:9} {variant:10} seed {seed}: " + " ".join(
                    f"{n} {w:.3f} (z {r['evidence'][n]['z'] or 0:+.1f})" for n, w in r["weights"].items()),
                    flush=True)
    minutes = sum(r["seconds"] for r in results) / 60  # the runs' own time, reused ones included
    plot_path = ROOT / "docs" / "study-lam.png"
    plot(results, plot_path)
    command = (f"python scripts/study_lam.py --seeds {' '.join(map(str, args.seeds))} "
               f"--variants {' '.join(args.variants)}")
    text = (f"`{command}` ({STEPS} steps of the demo recipe per run, {len(results)} runs, {minutes:.0f} min on this "
            "machine). Weights and evidence z: mean ± std over seeds; max abs z: the largest |z| of any source in any "
            "seed.\n\nDenoising (right answer: clean first, noisy last; z of clean > 3, of noisy < -3):\n\n"
            + table(results, "denoising") + "\n\nNo signal (one distribution split three ways; right answer: every "
            "|z| < 3, weights near 1/3):\n\n" + table(results, "no-signal")
            + f"\n\n![clean and part0 weights over steps]({plot_path.name})")
    print(text)
    if not args.no_record:
        write_results(text)


if __name__ == "__main__":
    main()
