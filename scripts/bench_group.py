"""`scalebio group` measured on a real model (SmolLM2-135M-Instruct, `make smollm2`), two cases:

(a) messy: ONE file, no labels: clean orca-math records (half the file), copies with the answer replaced by "." and
    with the answer's words shuffled (fresh records each), and off-topic records (GPT4-LLM-Cleaned); validation: clean
    orca-math records. group + reweight (split_by: group) + sample a third of the file -> the fraction clean, beside
    `select --method rho-loss` and `less` asked for the same number of records; then `scalebio compare`: the
    held-out loss after fine-tuning on each pick, beside a third of the file drawn at random, paired by seed.
(b) sources: instruct-math's five sources pooled into one file: do the groups recover the sources? (the adjusted Rand
    index of each seed's file, a contingency table of the first; grouping only).

Replaces the section between `<!-- bench_group: begin -->` and `<!-- bench_group: end -->` in docs/results.md.
Several seeds (`--seeds 0 1 2`: each seed draws its own file and runs every method with that seed): the clean
share per method and seed, and group minus each selector seed by seed with a 95% t-interval. A finished seed of
case (a) is kept in --work and reused by a rerun with the same settings, so seeds can run in parallel invocations
(`--no-record`) and a last one with all of them writes the table.

    python scripts/bench_group.py [--case messy sources] [--clean 60] [--per-source 60] [--seeds 0 1 2]
                                  [--group-only] [--no-select] [--no-compare] [--no-record] [--section NAME]
                                  [--work DIR] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

from scalebio_cli.results.paired import versus

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "instruct-math"
MODEL = Path.home() / ".cache" / "scalebio" / "models" / "SmolLM2-135M-Instruct"
BEGIN, END = "<!-- bench_group: begin -->", "<!-- bench_group: end -->"
FLOOR = "group + reweight + sample --min-weight {:g}"
NUM_TEST = 60  # (a): held-out clean records compare evaluates on
COMPARE_EPOCHS = 3  # (a): compare fine-tunes each third-of-the-file pick for 3 epochs (15 steps of 8)
SOURCES = ("GPT4-LLM-Cleaned", "GPTeacher-General-Instruct", "MathInstruct", "dart-math-uniform",
           "orca-math-word-problems-200k")
# CPU-sized: max_length 128, 60 reweight steps of batch 12 (the pretrained defaults otherwise); select as bench_select
RECIPE = {"data": {"max_length": 128},
          "reweight": {"steps": 60, "batch_size": 12, "val_batch_size": 8, "micro_batch_size": 12, "log_every": 10},
          "finetune": {"lr": 5e-5, "batch_size": 8, "micro_batch_size": 8},
          "select": {"rho_loss": {"holdout_epochs": 2}, "less": {"epochs": 2, "lr": 1e-4, "batch_size": 8}}}


def message(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def pairs(name: str, max_chars: int = 600) -> list[tuple[str, str]]:
    """(question, answer) of the source's short records (most fit max_length 128), in file order."""
    records = json.loads((DATA / f"train_{name}.json").read_text())
    return [(r["items"][0]["value"], r["items"][1]["value"]) for r in records if len(r.get("items", [])) >= 2
            and len(r["items"][0]["value"]) + len(r["items"][1]["value"]) < max_chars]


def shuffled_words(answer: str, rng: random.Random) -> str:
    words = answer.split()
    rng.shuffle(words)
    return " ".join(words)


def messy_case(work: Path, clean: int, num_val: int, seed: int) -> tuple[Path, Path, list[str]]:
    """messy.jsonl (clean : dot : shuffled : off-topic = 3 : 1 : 1 : 1), val.jsonl; the labels in file order."""
    rng = random.Random(seed)
    math, other = pairs("orca-math-word-problems-200k"), pairs("GPT4-LLM-Cleaned")
    third = clean // 3
    need = clean + 2 * third + num_val
    if len(math) < need + NUM_TEST or len(other) < third:
        sys.exit(f"too few short records for --clean {clean}")
    rng.shuffle(math)
    rows = [(message(q, a), "clean") for q, a in math[:clean]]
    rows += [(message(q, "."), "dot") for q, _ in math[clean: clean + third]]
    rows += [(message(q, shuffled_words(a, rng)), "shuffled") for q, a in math[clean + third: clean + 2 * third]]
    rows += [(message(q, a), "offtopic") for q, a in rng.sample(other, third)]
    rng.shuffle(rows)
    val = [message(q, a) for q, a in math[need - num_val: need]]
    test = [message(q, a) for q, a in math[need: need + NUM_TEST]]  # held out from the file and the validation
    work.mkdir(parents=True, exist_ok=True)
    (work / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    (work / "messy.jsonl").write_text("".join(json.dumps(r) + "\n" for r, _ in rows))
    (work / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    return work / "messy.jsonl", work / "val.jsonl", [label for _, label in rows]


def scalebio(*args: str) -> None:
    start = time.perf_counter()
    result = subprocess.run([str(Path(sys.executable).parent / "scalebio"), *args], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"scalebio {' '.join(args[:1])} failed:\n{result.stderr[-3000:]}")
    print(f"  scalebio {args[0]}: {time.perf_counter() - start:.0f} s", file=sys.stderr)


def recipe(work: Path, sources: dict, val: Path | None, name: str) -> Path:
    tree = {"model": str(MODEL), "output_dir": str(work / f"run-{name}"), **RECIPE,
            "data": {**RECIPE["data"], "sources": sources}}
    if val is not None:
        tree["data"]["validation"] = str(val)
    (work / f"{name}.yaml").write_text(yaml.safe_dump(tree))
    return work / f"{name}.yaml"


def labels_by_content(messy: Path, labels: list[str]) -> dict[str, str]:
    """Each record of the file (as canonical JSON) -> its label, to read picks back by content."""
    return {json.dumps(json.loads(line), sort_keys=True): lab
            for line, lab in zip(messy.read_text().splitlines(), labels)}


def clean_share(out: Path, label_of: dict[str, str]) -> tuple[float, Counter]:
    """The fraction of `out`'s records that are clean (matched to the file's records by content)."""
    picked = Counter()
    for line in out.read_text().splitlines():
        record = {k: v for k, v in json.loads(line).items() if k not in ("group", "source")}
        picked[label_of[json.dumps(record, sort_keys=True)]] += 1
    return picked["clean"] / sum(picked.values()), picked


def group_counts(grouped: Path, labels: list[str]) -> dict[str, Counter]:
    rows = [json.loads(line)["group"] for line in grouped.read_text().splitlines()]
    table: dict[str, Counter] = {}
    for group, label in zip(rows, labels):
        table.setdefault(group, Counter())[label] += 1
    return dict(sorted(table.items()))


def contingency(table: dict[str, Counter], kinds: list[str]) -> list[str]:
    lines = ["| group | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    lines += [f"| {g} | " + " | ".join(str(c[k]) for k in kinds) + " |" for g, c in table.items()]
    return lines


def run_messy_seed(work: Path, args: argparse.Namespace, seed: int) -> dict:
    """One seed of case (a): its file, groups, and each method's picks (reused when finished with these settings)."""
    key = {"clean": args.clean, "num_val": args.num_val, "group_only": args.group_only,
           "no_select": args.no_select, "overrides": args.overrides, "seed": seed}
    done = work / "result.json"
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        print(f"seed {seed}: reused {done}", file=sys.stderr)
        return json.loads(done.read_text())
    messy, val, labels = messy_case(work / "messy", args.clean, args.num_val, seed)
    label_of = labels_by_content(messy, labels)
    n = len(labels) // 3
    config = recipe(work, {"messy": str(messy)}, val, "messy")
    grouped = work / "messy-groups.jsonl"
    scalebio("group", "--config", str(config), "-o", str(grouped), "--force", f"seed={seed}", *args.overrides)
    table = group_counts(grouped, labels)
    manifest = json.loads(grouped.with_name(grouped.stem + ".manifest.json").read_text())
    result = {"key": key, "records": len(labels), "n": n, "k": manifest["k"],
              "k_scores": manifest.get("k_scores") or {}, "groups": {g: dict(c) for g, c in table.items()},
              "purity": sum(max(c.values()) for c in table.values()) / len(labels), "methods": {}}
    if not args.group_only:
        grouped_recipe = recipe(work, {"messy": {"path": str(grouped), "split_by": "group"}}, val, "reweight")
        scalebio("reweight", "--config", str(grouped_recipe), "--force", f"seed={seed}", *args.overrides)
        out = work / "group-sample.jsonl"
        weights = work / "run-reweight" / "weights.json"
        scalebio("sample", "--weights", str(weights), "-n", str(n), "-o", str(out), "--seed", str(seed), "--force")
        doc = json.loads(weights.read_text())
        result["weights"] = {k.split("/", 1)[1]: v for k, v in doc["weights"].items()}
        result["verdicts"] = {k.split("/", 1)[1]: e["verdict"] for k, e in doc["evidence"].items()}
        methods = [("group + reweight + sample", out)]
        for method in ([] if args.no_select else ["rho-loss", "less"]):
            out = work / f"{method}.jsonl"
            scalebio("select", "--config", str(config), "--method", method, "-n", str(n), "-o", str(out),
                     "--seed", str(seed), "--force", f"seed={seed}", *args.overrides)
            methods.append((f"select {method}", out))
        for name, path in methods:
            share, picked = clean_share(path, label_of)
            result["methods"][name] = {"clean_share": share, "picked": dict(picked)}
    done.write_text(json.dumps(result, indent=1))
    return result


def compare_messy_seed(work: Path, args: argparse.Namespace, seed: int, n: int) -> dict:
    """Held-out loss of what each method picked: `scalebio compare` with each pick as a file mix (n records), beside
    n records of the file drawn at random (the baseline), each fine-tuned COMPARE_EPOCHS epochs under this seed and
    evaluated on clean records held out of the file; compare reuses its finished cells. Each method's cost as
    compare reports it (seconds to produce the pick, and in fine-tunes of it)."""
    messy = work / "messy" / "messy.jsonl"
    if not (work / "messy" / "test.jsonl").exists():  # a seed finished before the test set was written
        messy_case(work / "messy", args.clean, args.num_val, seed)
    rows = messy.read_text().splitlines()
    drawn = work / "random.jsonl"
    drawn.write_text("".join(line + "\n" for line in random.Random(seed).sample(rows, n)))
    mixes = {"random": ("random", drawn), "group": ("group + reweight + sample", work / "group-sample.jsonl"),
             "rho-loss": ("select rho-loss", work / "rho-loss.jsonl"), "less": ("select less", work / "less.jsonl")}
    if args.min_weight:
        mixes["group-floor"] = (FLOOR.format(args.min_weight), work / "group-floor.jsonl")
    out = work / "compare"
    scalebio("compare", "--config", str(work / "messy.yaml"), *[a for name, (_, path) in mixes.items()
                                                                  for a in ("--mix", f"{name}={path}")],
             "--test", f"clean={work / 'messy' / 'test.jsonl'}", "-n", str(n), "-o", str(out), "--seeds", str(seed),
             "--baseline", "random", f"finetune.epochs={COMPARE_EPOCHS}")
    doc = json.loads((out / "compare.json").read_text())
    return {"base": doc["base"]["results"]["clean"]["loss"],
            "loss": {mixes[name][0]: m["results"]["clean"]["loss"]["mean"] for name, m in doc["mixes"].items()},
            "cost": {mixes[name][0]: m["cost"] for name, m in doc["mixes"].items()}}


def floor_pick(work: Path, result: dict, seed: int, min_weight: float) -> None:
    """The same run's weights sampled with `--min-weight`: groups below it get no records (seconds; not cached)."""
    messy = work / "messy" / "messy.jsonl"
    labels = messy_case(work / "messy", result["key"]["clean"], result["key"]["num_val"], seed)[2]
    label_of = labels_by_content(messy, labels)
    out = work / "group-floor.jsonl"
    scalebio("sample", "--weights", str(work / "run-reweight" / "weights.json"), "-n", str(result["n"]), "-o",
             str(out), "--seed", str(seed), "--force", "--min-weight", f"{min_weight:g}")
    share, picked = clean_share(out, label_of)
    result["methods"] = {FLOOR.format(min_weight): {"clean_share": share, "picked": dict(picked)},
                         **result["methods"]}


def run_messy(work: Path, args: argparse.Namespace) -> list[str]:
    results = {seed: run_messy_seed(work / f"messy-seed{seed}", args, seed) for seed in args.seeds}
    if args.min_weight and not args.group_only:
        for seed, result in results.items():
            floor_pick(work / f"messy-seed{seed}", result, seed, args.min_weight)
    first = results[args.seeds[0]]
    skip = args.group_only or args.no_select or args.no_compare
    compared = {} if skip else {seed: compare_messy_seed(work / f"messy-seed{seed}", args, seed, r["n"])
                                for seed, r in results.items()}
    kinds = ["clean", "dot", "shuffled", "offtopic"]
    tried = first["k_scores"]
    how = (f"k = {first['k']} by silhouette ({', '.join(f'k={k} {v:.3f}' for k, v in tried.items())})" if tried
           else f"k = {first['k']}, given")
    what = "grouping only" if args.group_only else f"a third ({first['n']}) sampled"
    table = {g: Counter(c) for g, c in first["groups"].items()}
    lines = [f"### (a) one messy file: {first['records']} records ({args.clean} clean), {what}, "
             f"{len(args.seeds)} seed{'s' * (len(args.seeds) > 1)}", "",
             f"Groups of seed {args.seeds[0]} ({how}; purity {first['purity']:.0%}; purity by seed: "
             + ", ".join(f"{r['purity']:.0%}" for r in results.values()) + "):", "", *contingency(table, kinds), ""]
    if args.group_only:
        return lines
    lines += ["Weights and verdicts by seed: " + "; ".join(
        f"{seed}: " + ", ".join(f"{g} {w:.2f} ({r['verdicts'][g]})" for g, w in r["weights"].items())
        for seed, r in results.items()), "",
        "| method | seed | clean | dot | shuffled | off-topic | clean share |", "|---|---:|---:|---:|---:|---:|---:|"]
    methods = list(first["methods"])
    for m in methods:
        for seed, r in results.items():
            c = r["methods"][m]["picked"]
            lines.append(f"| {m} | {seed} | " + " | ".join(str(c.get(k, 0)) for k in kinds)
                         + f" | {r['methods'][m]['clean_share']:.0%} |")
    share = {m: [r["methods"][m]["clean_share"] for r in results.values()] for m in methods}
    group = methods[0]
    lines += ["", f"| method | mean clean share | {group} minus it, seed by seed | mean | 95% interval |",
              "|---|---:|---|---:|---|"]
    for m in methods:
        mean = sum(share[m]) / len(share[m])
        if m == group:
            lines.append(f"| {m} | {mean:.0%} | | | |")
            continue
        diff = versus(share[group], share[m])
        interval = ("-" if diff["ci95"] is None else
                    f"{diff['ci95'][0] * 100:+.0f} to {diff['ci95'][1] * 100:+.0f} points")
        lines.append(f"| {m} | {mean:.0%} | " + " / ".join(f"{d * 100:+.0f}" for d in diff["per_seed"])
                     + f" | {diff['diff_mean'] * 100:+.0f} points | {interval} |")
    return lines + [""] + (compare_lines(compared, methods) if compared else [])


def cost_cell(costs: list[dict]) -> str:
    """Mean minutes and fine-tunes over seeds of compare's `cost` entries; 0 for a random draw (nothing to learn)."""
    known = [c for c in costs if c.get("seconds") is not None]
    if not known:
        return "0"
    minutes = sum(c["seconds"] for c in known) / len(known) / 60
    return f"{minutes:.1f} ({sum(c['fine_tunes'] for c in known) / len(known):.1f})"


def compare_lines(compared: dict[int, dict], methods: list[str]) -> list[str]:
    """Held-out loss by method and seed, and the group pick minus each other method, paired by seed."""
    seeds = list(compared)
    names = ["random", *methods]
    loss = {m: [compared[s]["loss"][m] for s in seeds] for m in names}
    lines = [f"Held-out loss on {NUM_TEST} clean orca-math records outside the file (`scalebio compare`, each pick "
             f"fine-tuned {COMPARE_EPOCHS} epochs, paired by seed; base model "
             + ", ".join(f"{compared[s]['base']:.3f}" for s in seeds) + "):", "",
             f"| method | cost: minutes (fine-tunes) | loss by seed | mean | {methods[0]} minus it, seed by seed "
             "| mean | 95% interval |", "|---|---:|---|---:|---|---:|---|"]
    group = methods[0]
    for m in names:
        mean = sum(loss[m]) / len(loss[m])
        cells = f"{cost_cell([compared[s]['cost'][m] for s in seeds])} | " + " / ".join(f"{v:.3f}" for v in loss[m])
        if m == group:
            lines.append(f"| {m} | {cells} | {mean:.3f} | | | |")
            continue
        diff = versus(loss[group], loss[m])
        interval = "-" if diff["ci95"] is None else f"{diff['ci95'][0]:+.3f} to {diff['ci95'][1]:+.3f}"
        lines.append(f"| {m} | {cells} | {mean:.3f} | " + " / ".join(f"{d:+.3f}" for d in diff["per_seed"])
                     + f" | {diff['diff_mean']:+.3f} | {interval} |")
    return lines + [""]


def sources_seed(work: Path, args: argparse.Namespace, seed: int) -> tuple[float, dict[str, Counter]]:
    """One seed of case (b): its pooled file (args.per_source records a source) grouped; the adjusted Rand index
    of the groups against the sources, and the contingency table."""
    from sklearn.metrics import adjusted_rand_score

    rng = random.Random(seed)
    rows = [(message(q, a), name) for name in SOURCES for q, a in rng.sample(pairs(name), args.per_source)]
    rng.shuffle(rows)
    work.mkdir(parents=True, exist_ok=True)
    pooled = work / "pooled.jsonl"
    pooled.write_text("".join(json.dumps(r) + "\n" for r, _ in rows))
    labels = [name for _, name in rows]
    config = recipe(work, {"pooled": str(pooled)}, None, "pooled")
    grouped = work / "pooled-groups.jsonl"
    scalebio("group", "--config", str(config), "-o", str(grouped), "--force", f"seed={seed}", *args.overrides)
    groups = [json.loads(line)["group"] for line in grouped.read_text().splitlines()]
    return adjusted_rand_score(labels, groups), group_counts(grouped, labels)


def run_sources(work: Path, args: argparse.Namespace) -> list[str]:
    found = {seed: sources_seed(work / f"sources-seed{seed}", args, seed) for seed in args.seeds}
    table = found[args.seeds[0]][1]
    return [f"### (b) instruct-math's five sources pooled: {len(SOURCES) * args.per_source} records "
            f"({args.per_source} a source)", "",
            "Adjusted Rand index of the groups against the sources, by seed: "
            + ", ".join(f"{seed}: {a:.2f}" for seed, (a, _) in found.items()), "",
            f"Groups of seed {args.seeds[0]} ({len(table)}):", "", *contingency(table, list(SOURCES)), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="+", default=["messy", "sources"], choices=["messy", "sources"])
    parser.add_argument("--clean", type=int, default=60, help="(a): clean records (half the file)")
    parser.add_argument("--num-val", type=int, default=48)
    parser.add_argument("--per-source", type=int, default=60, help="(b): records per instruct-math source")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-group",
                        help="where each seed's runs are kept (and reused)")
    parser.add_argument("--group-only", action="store_true", help="(a): stop after grouping (no reweight/select)")
    parser.add_argument("--no-select", action="store_true", help="(a): skip the RHO-loss and LESS baselines")
    parser.add_argument("--no-compare", action="store_true", help="(a): skip compare's held-out loss of the picks")
    parser.add_argument("--min-weight", type=float, default=0.0,
                        help="(a): also sample each run's weights with `sample --min-weight` (compared first)")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--section", help="write a block of its own in docs/results.md (e.g. one case with other "
                        "settings)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    lines = []
    if "messy" in args.case:
        lines += run_messy(work, args)
    if "sources" in args.case:
        lines += run_sources(work, args)
    lines += [f"`{' '.join(['python scripts/bench_group.py', *sys.argv[1:]])}` on SmolLM2-135M-Instruct, CPU-sized "
              f"(RECIPE in the script: max_length 128, 60 reweight steps of batch 12); "
              f"{(time.perf_counter() - start) / 60:.0f} min on 2 shared cores (finished seeds reused)."]
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        record(table, args.section)


def record(table: str, section: str | None) -> None:
    """The block between BEGIN and END in docs/results.md (`section`: a block of its own, `<!-- bench_group:NAME:
    begin -->`, placed after the others on first use), the text around it kept."""
    begin, end = (BEGIN, END) if section is None else (BEGIN.replace(":", f":{section}:", 1),
                                                        END.replace(":", f":{section}:", 1))
    doc = ROOT / "docs" / "results.md"
    old = doc.read_text(encoding="utf-8")
    block = f"{begin}\n{table}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    elif END in old:
        at = old.index(END) + len(END)
        new = old[:at] + "\n\n" + block + old[at:]
    else:
        new = old.rstrip() + "\n\n## Groups within sources (`scalebio group`)\n\n" + block + "\n"
    doc.write_text(new, encoding="utf-8")


if __name__ == "__main__":
    main()
