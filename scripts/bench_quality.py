"""Do the learned weights separate clean from corrupted data on a real pretrained model? A denoising benchmark.

    python scripts/bench_quality.py                          # SmolLM2-135M-Instruct on CPU, LISA default, seed 0
    python scripts/bench_quality.py --seeds 0 1 2 --variants default full
    python scripts/bench_quality.py --device cuda --preset gpu --seeds 0 1 2 --variants all

Sources, all built from ../shared/data/instruct-math (short general-instruction records of GPT4-LLM-Cleaned and
GPTeacher, and short MathInstruct records), disjoint from each other and from the validation set, each with the
validation set's mix of 2 general records to 1 math record (so only the corruption tells them apart):

  clean      correct responses (general and math), drawn like the validation set
  dot        responses replaced by "." (the paper's denoising corruption)
  shuffled   the words of each response shuffled
  swapped    responses taken from other records (answers that do not belong to the question)
  wrong      every number in the answer changed (general answers that hold numbers; math: wrong final answers)

`--case alpaca` is the three-source case of the paper's denoising setting: clean / dot / shuffled, all built from
short GPT4-LLM-Cleaned (Alpaca prompts, GPT-4 answers) records, validation drawn from the same records.

The right answer: `clean` gets the largest weight and every corrupted source less than uniform. Each variant x seed
is one real `scalebio reweight` run (a subprocess); the script prints the weights per logged step and a table,
draws the weights over steps, and writes the section "Real-model quality" of docs/results.md with the command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "instruct-math"
SOURCES = ("clean", "dot", "shuffled", "swapped", "wrong")
ALPACA_SOURCES, ALPACA_PER_SOURCE, ALPACA_VAL = ("clean", "dot", "shuffled"), 120, 90
# Records per source: general-instruction and math, the validation set's 2:1 mix.
PER_SOURCE_GENERAL, PER_SOURCE_MATH = 80, 40
# Budget presets: CPU fits 2 cores (tens of steps, short records); GPU is the reference's scale.
PRESETS = {
    "cpu": {"steps": 60, "batch_size": 9, "val_batch_size": 3, "micro_batch_size": 11, "max_length": 128,
            "log_every": 5},
    "gpu": {"steps": 300, "batch_size": 60, "val_batch_size": 60, "micro_batch_size": 20, "max_length": 512,
            "log_every": 10},
}
# The study's settings, each one change from `default` (KEY=VALUE overrides of the reweight recipe).
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "full": ["reweight.lisa.layers=0"],
    # u and w as two LoRA adapters over one frozen base, training in every block (train/lora.py), with the ~10x
    # learning rate adapters want (docs/multi-gpu.md, LoRA)
    "lora": ["reweight.lisa.layers=0", "reweight.lora.r=8", "reweight.lr_u=1e-3", "reweight.lr_w=1e-3"],
    "cut-embeddings": ["reweight.lisa.train_embeddings=false"],
    "lisa-2": ["reweight.lisa.layers=2"],
    "lisa-8": ["reweight.lisa.layers=8"],
    "interval-5": ["reweight.lisa.interval=5"],
    "no-warmup": ["reweight.warmup_ratio=0"],
    "no-clipping": ["reweight.max_grad_norm=null"],
    "no-weight-decay": ["reweight.weight_decay=0"],
    "alpha-1": ["reweight.alpha=1"],
    "lr-1e-4": ["reweight.lr_u=1e-4", "reweight.lr_w=1e-4"],
    "val-batch-9": ["reweight.val_batch_size=9"],
    # what may make LISA runs right within a small budget (ALGORITHM-level options, reference behaviour default)
    # the lam step's variance reductions (docs/results.md, "The lam step"), one change at a time from the defaults
    "no-delay": ["reweight.lambda_delay=0"],
    "cosine": ["reweight.lambda_schedule=cosine"],
    "every-3": ["reweight.lambda_every=3"],
    "tau-2": ["reweight.tau=2", "reweight.tau_every=20"],
    "relative": ["reweight.lambda_signal=relative"],  # changes the fixed point (not a variance reduction)
    "sgd-lambda": ["reweight.lambda_optimizer=sgd", "reweight.lr_lambda=50"],
    # the defaults with a control source (half of the largest source, the same data): its verdict must be unclear
    "placebo": ["reweight.placebo=true"],
}


def short_records(name: str, max_prompt: int = 160, max_response: int = 180) -> list[dict]:
    records = json.loads((SHARED / f"train_{name}.json").read_text())
    return [r for r in records if len(r["items"]) == 2 and len(r["items"][0]["value"]) <= max_prompt
            and 30 <= len(r["items"][1]["value"]) <= max_response]


def _with_response(record: dict, response: str) -> dict:
    return {"items": [record["items"][0], {"from": "gpt", "value": response}]}


def _shuffle_words(record: dict, rng: random.Random) -> dict:
    words = record["items"][1]["value"].split()
    rng.shuffle(words)
    return _with_response(record, " ".join(words))


def _write(out: Path, named: list[tuple[str, list[dict]]], rng: random.Random) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in named:
        rng.shuffle(records)
        paths[name] = out / f"{name}.json"
        paths[name].write_text(json.dumps(records, ensure_ascii=False))
    return paths


def build_alpaca(out: Path, seed: int = 0) -> dict[str, Path]:
    """The alpaca case: clean / dot / shuffled and the validation set, disjoint GPT4-LLM-Cleaned records."""
    rng = random.Random(seed)
    records = short_records("GPT4-LLM-Cleaned")
    rng.shuffle(records)
    it = iter(records)

    def take(n: int) -> list[dict]:
        return [next(it) for _ in range(n)]

    val, clean = take(ALPACA_VAL), take(ALPACA_PER_SOURCE)
    dot = [_with_response(r, ".") for r in take(ALPACA_PER_SOURCE)]
    shuffled = [_shuffle_words(r, rng) for r in take(ALPACA_PER_SOURCE)]
    return _write(out, [("clean", clean), ("dot", dot), ("shuffled", shuffled), ("val", val)], rng)


def build_data(out: Path, seed: int = 0) -> dict[str, Path]:
    """Write the five sources and the validation set (sharegpt JSON) into `out`; returns their paths.

    Every source is a copy of the clean one's task mix (2 general-instruction records to 1 math record, as in the
    validation set) with disjoint records, so that a source can only win or lose by its corruption, not by holding
    more of the validation set's math than the clean source does.
    """
    rng = random.Random(seed)
    general = short_records("GPT4-LLM-Cleaned") + short_records("GPTeacher-General-Instruct")
    math = [r for r in short_records("MathInstruct") if re.search(r"\d", r["items"][1]["value"])]
    rng.shuffle(general)
    rng.shuffle(math)
    # `wrong` needs general answers that contain numbers; take them first so no other source holds them.
    with_numbers = [r for r in general if re.search(r"\d", r["items"][1]["value"])][:PER_SOURCE_GENERAL]
    taken = {id(r) for r in with_numbers}
    g = iter([r for r in general if id(r) not in taken])
    m = iter(math)

    def take(n_general: int = PER_SOURCE_GENERAL, n_math: int = PER_SOURCE_MATH) -> list[dict]:
        return [next(g) for _ in range(n_general)] + [next(m) for _ in range(n_math)]

    def perturb(match: re.Match) -> str:
        value = int(match.group())
        return str(value + rng.choice([-1, 1]) * rng.randint(1, max(2, value // 2 + 1)))

    val = take(60, 30)
    clean = take()
    dot = [_with_response(r, ".") for r in take()]
    shuffled = [_shuffle_words(r, rng) for r in take()]
    base = take()
    rng.shuffle(base)
    donors = base[1:] + base[:1]  # a derangement: every record gets another record's response
    swapped = [_with_response(r, d["items"][1]["value"]) for r, d in zip(base, donors)]
    numbered = with_numbers + [next(m) for _ in range(PER_SOURCE_MATH)]
    wrong = [_with_response(r, re.sub(r"\d+", perturb, r["items"][1]["value"])) for r in numbered]
    return _write(out, [("clean", clean), ("dot", dot), ("shuffled", shuffled), ("swapped", swapped),
                        ("wrong", wrong), ("val", val)], rng)


# The cases: the five-source benchmark above and the paper's alpaca denoising case, each with its data builder.
CASES = {"mixed": (SOURCES, build_data), "alpaca": (ALPACA_SOURCES, build_alpaca)}


def model_path(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    flag = ["--gguf"] if args.gguf else []
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "get_smollm2.py"), *flag], capture_output=True,
                         text=True)
    if out.returncode != 0:
        sys.exit(f"SmolLM2 is not available ({out.stderr.strip()})")
    return out.stdout.strip().splitlines()[-1]


def base_settings(base: str) -> dict:
    """The reweight settings every variant starts from: the defaults (a recipe that sets only model, sources and
    validation, plus the budget) or the reference's values (recipes/reference.yaml)."""
    if base == "defaults":
        return {}
    settings = yaml.safe_load((ROOT / "recipes" / "reference.yaml").read_text())["reweight"]
    return {k: v for k, v in settings.items() if k not in ("steps", "batch_size", "val_batch_size")}


def run_variant(name: str, seed: int, args: argparse.Namespace, paths: dict[str, Path],
                model: str) -> dict | None:
    preset = PRESETS[args.preset]
    out = args.work / "runs" / f"{name}-seed{seed}"
    recipe = {
        "model": model, "output_dir": str(out), "seed": seed,
        "data": {"sources": {n: str(paths[n]) for n in args.sources}, "validation": str(paths["val"]),
                 "max_length": preset["max_length"]},
        "reweight": {**base_settings(args.base), "steps": preset["steps"], "batch_size": preset["batch_size"],
                     "val_batch_size": preset["val_batch_size"], "micro_batch_size": preset["micro_batch_size"],
                     "log_every": preset["log_every"]},
        "checkpoint": {"every": 0},
    }
    path = args.work / "recipes" / f"{name}-seed{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    exe = Path(sys.executable).parent / "scalebio"
    command = [str(exe), "reweight", "--config", str(path), *args.overrides, *VARIANTS[name]]
    # A finished run of the same recipe and command is reused (the benchmark takes hours on CPU; an interrupted
    # invocation picks up where it stopped). A change of settings or data reruns it; a change of code does not:
    # delete --work's runs/ folder after one.
    done = out / "bench_run.json"
    data = {n: hashlib.sha256(paths[n].read_bytes()).hexdigest() for n in paths}
    key = {"recipe": recipe, "command": command[1:], "data": data}
    if done.exists() and (out / "weights.json").exists():
        previous = json.loads(done.read_text())
        if previous.get("key") == key:
            return previous["result"]
    if args.finished_only:
        return None
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{name} seed {seed} failed:\n{result.stderr[-3000:]}")
    doc = json.loads((out / "weights.json").read_text())
    row = {"variant": name, "seed": seed, "weights": doc["weights"], "trajectory": doc["trajectory"],
           "evidence": doc.get("evidence", {}), "placebo": doc.get("placebo"),
           "seconds": time.perf_counter() - start, "overrides": VARIANTS[name]}
    done.write_text(json.dumps({"key": key, "result": row}))
    return row


def passes(weights: dict[str, float]) -> bool:
    uniform = 1 / len(weights)
    return max(weights, key=weights.get) == "clean" and all(weights[n] < uniform for n in weights if n != "clean")


def plot(results: list[dict], path: Path, sources: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted({r["variant"] for r in results}, key=list(VARIANTS).index)
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.4), dpi=110, squeeze=False)
    for ax, variant in zip(axes[0], variants):
        for r in (x for x in results if x["variant"] == variant):
            steps = [p["step"] for p in r["trajectory"]]
            for i, source in enumerate(sources):
                ax.plot(steps, [p["weights"][source] for p in r["trajectory"]], color=f"C{i}", linewidth=1.4,
                        alpha=0.85, label=source if r["seed"] == results[0]["seed"] else None)
        ax.axhline(1 / len(sources), color="grey", linestyle=":", linewidth=1)
        ax.set_title(variant)
        ax.set_xlabel("step")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("sampling weight")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def called_right(evidence: dict[str, dict], sources: tuple[str, ...]) -> bool:
    """clean raised and every corrupted copy lowered (today's verdicts)."""
    return all(evidence.get(n, {}).get("verdict") == ("raised" if n == "clean" else "lowered") for n in sources)


def verdicts(r: dict, sources: tuple[str, ...]) -> str:
    """Each source's verdict with its t (against the rest of the mixture), and the placebo's (against its twin);
    a run recorded before verdicts tested the contrast shows its former z instead."""
    evidence = [r["evidence"].get(n, {}) for n in sources]
    if not all("t" in e for e in evidence):
        return "former z " + " / ".join("-" if e.get("z") is None else f"{e['z']:+.1f}" for e in evidence)
    shown = " / ".join(f"{e['verdict']} ({'-' if e['t'] is None else format(e['t'], '+.1f')})" for e in evidence)
    control = r.get("placebo")
    if control:
        e = control["evidence"]
        shown += f"; placebo {e['verdict']} ({'-' if e.get('t') is None else format(e['t'], '+.1f')})"
    return shown


def report(results: list[dict], args: argparse.Namespace, command: str) -> str:
    lines = [f"Model `{Path(args.model_label).name}`, preset `{args.preset}` ({json.dumps(PRESETS[args.preset])}), "
             f"base `{args.base}` ({json.dumps(base_settings(args.base))}), {args.device}. Passes: clean largest "
             f"and every corrupted source below uniform ({1 / len(args.sources):.3f}). Called right: clean raised, "
             "every corrupted copy lowered (verdicts at p < 0.05, Holm; t against the rest of the mixture).", "",
             f"`{command}`", "",
             "| variant | seed | " + " | ".join(args.sources) + " | verdict (t), same order | passes | called right "
             "| minutes |", "|---|---:|" + "---:|" * len(args.sources) + "---|---|---|---:|"]
    for r in results:
        w, evidence = r["weights"], r["evidence"]
        right = ("yes" if called_right(evidence, args.sources) else "no") if all(
            "t" in evidence.get(n, {}) for n in args.sources) else "-"
        lines.append(f"| {r['variant']} | {r['seed']} | " + " | ".join(f"{w[n]:.3f}" for n in args.sources)
                     + f" | {verdicts(r, args.sources)} | {'yes' if passes(w) else 'no'} | {right} | "
                     f"{r['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def write_results(text: str, plot_name: str, case: str, section: str | None = None) -> None:
    """Put the table between the markers of the section "Real-model quality" in docs/results.md (the section's
    hand-written study around it stays); a results.md without the section gets it appended. `section`: a block
    of its own (`bench_quality:SECTION`), for a study beside the case's main table."""
    doc = ROOT / "docs" / "results.md"
    tag = "bench_quality" + (f":{section}" if section else "" if case == "mixed" else f":{case}")
    begin, end = f"<!-- {tag}: begin -->", f"<!-- {tag}: end -->"
    block = f"{begin}\n{text}\n\n![weights over steps]({plot_name})\n{end}"
    existing = doc.read_text() if doc.exists() else "# Results\n"
    if begin in existing and end in existing:
        before, rest = existing.split(begin, 1)
        doc.write_text(before + block + rest.split(end, 1)[1])
    else:
        head = "\n## Real-model quality: denoising on SmolLM2-135M-Instruct\n\n"
        doc.write_text(existing.rstrip() + "\n" + head + block + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder or .gguf (default: SmolLM2 via scripts/get_smollm2.py)")
    parser.add_argument("--gguf", action="store_true", help="use the GGUF file itself instead of the folder")
    parser.add_argument("--case", default="mixed", choices=list(CASES),
                        help="mixed: the five sources above; alpaca: clean / dot / shuffled from GPT4-LLM-Cleaned")
    parser.add_argument("--preset", default="cpu", choices=list(PRESETS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--base", default="defaults", choices=["defaults", "reference"],
                        help="the settings the variants change: the defaults or recipes/reference.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=["default"], help=f"any of {', '.join(VARIANTS)}, or all")
    parser.add_argument("--work", type=Path, help="default: runs/quality (alpaca: runs/quality-alpaca)")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/results.md")
    parser.add_argument("--section", help="write a block of its own in docs/results.md, <!-- "
                        "bench_quality:SECTION: begin/end --> (default: the case's main table)")
    parser.add_argument("--finished-only", action="store_true",
                        help="report the runs that have finished (an interrupted invocation's), run nothing")
    parser.add_argument("overrides", nargs="*", help="extra KEY=VALUE recipe overrides for every run")
    args = parser.parse_args()
    suffix = "" if args.case == "mixed" else f"-{args.case}"  # the five-source case keeps its original names
    args.work = (args.work or ROOT / "runs" / f"quality{suffix}").resolve()  # recipes name absolute paths
    args.sources, build = CASES[args.case]
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found: the benchmark builds its sources from instruct-math")
    variants = list(VARIANTS) if args.variants == ["all"] else args.variants
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if args.device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    paths = build(args.work / "data")
    model = model_path(args)
    args.model_label = model
    results, missing = [], []
    for variant in variants:
        for seed in args.seeds:
            r = run_variant(variant, seed, args, paths, model)
            if r is None:
                print(f"{variant} seed {seed}: not run yet (--finished-only)", file=sys.stderr)
                missing.append(f"{variant} seed {seed}")
                continue
            results.append(r)
            steps = " | ".join(f"{p['step']}: " + " ".join(f"{p['weights'][n]:.2f}" for n in args.sources)
                               for p in r["trajectory"])
            print(f"{variant} seed {seed} ({r['seconds'] / 60:.1f} min) [{' '.join(args.sources)}] {steps}",
                  file=sys.stderr)
    command = " ".join(["python scripts/bench_quality.py", *(a for a in sys.argv[1:] if a != "--finished-only")])
    text = report(results, args, command)
    if missing:
        text += f"\n\nNot run yet (the invocation was stopped before them): {', '.join(missing)}."
    print(text)
    if not results:
        sys.exit("no finished run to report")
    plot_name = f"quality{suffix}-{args.section or args.preset}.png"
    plot(results, (args.work if args.no_record else ROOT / "docs") / plot_name, args.sources)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    if not args.no_record:
        write_results(text, plot_name, args.case, args.section)


if __name__ == "__main__":
    main()
