"""A head-to-head that can tell the methods apart, on SmolLM2-135M-Instruct and the five instruct-math sources, as a
user would run it (`scalebio` subprocesses; every stage resumes or reuses finished work by content):

    python scripts/compare_math.py                                   # the CPU size (many hours: see the Makefile)
    python scripts/compare_math.py --per-source 0 --num-val 0 precision=bf16 ...   # a GPU, whole files
    python scripts/compare_math.py --smoke --model demo/model --no-record   # every stage at toy size (~20 min)
    python scripts/compare_math.py --ceiling-only --ceiling-n 80 --num-test 100   # step 1 alone, CPU-sized

1. The ceiling: `scalebio compare` of each source alone (`--mix NAME=source:NAME`, --ceiling-n records, paired
   seeds), and uniform over them. If the single sources are inside each other's seed noise, no mixture can matter
   much and compare says so.
2. The head-to-head, at each --ratios share of the pool: ScaleBiO (`reweight`, --lam-steps lam steps, one run per
   --reweight-seeds; compare trains on the first seed's weights, the table shows every seed's), uniform, RHO-loss
   and LESS (`select`, which also writes every pool record's score), and the hybrid (`sample --weights W --rank-by
   SCORES`: ScaleBiO's share of each source, the best records within it by --hybrid-scores), all paired against
   uniform with 95% intervals, with each method's cost.
The pool: a seeded draw of --per-source records of each training file and --num-val of val.json (0 = whole files).
data.max_length is --max-length (default 1024, so that most records are whole: the doc gives the share per source).
Writes the section between `<!-- compare-math:begin/end -->` in docs/results.md. No threshold on the outcome.
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
# 2 epochs at batch 8 with projection 1,024.
SELECT = ["select.rho_loss.holdout_epochs=2", "select.less.epochs=2", "select.less.lr=1e-4",
          "select.less.batch_size=8"]
# --smoke: every stage at toy size (a check that the pipeline runs, not a result)
SMOKE = {"per_source": 12, "num_val": 8, "num_test": 8, "ratios": [0.25], "ceiling_n": 4, "lam_steps": 4,
         "reweight_seeds": [0], "seeds": [0, 1], "max_length": 512}


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


def select_once(common: list[str], method: str, n: int, out: Path, log: Path) -> None:
    """`select`, reused only when the content key of what it reads (the recipe, every pool and validation file,
    the model, the settings) matches the one recorded beside its output."""
    from scalebio_cli.recipe import load_recipe
    from scalebio_cli.results import reuse

    recipe = load_recipe(Path(common[1]), common[2:] + SELECT)
    files = {f"source {k}": s.path for k, s in recipe.data.sources.items()}
    files |= {f"validation {k}": s.path for k, s in recipe.validation_sets().items()}
    key = reuse.make_key({k: reuse.path_sha256(p) for k, p in files.items()}
                         | reuse.model_identity(recipe.model, recipe.tokenizer),
                         {"method": method, "n": n, "overrides": common[2:] + SELECT,
                          "recipe": recipe.to_dict() | {"output_dir": None}})
    marker = out.with_name(out.stem + ".key.json")
    if out.is_file() and reuse.read_json(marker) == key:
        print(f"reusing {out} (same inputs)", file=sys.stderr)
        return
    scalebio("select", *common, *SELECT, "--method", method, "-n", str(n), "-o", str(out), "--scores",
             str(out.with_name(out.stem + ".scores.jsonl")), "--force", log=log)
    marker.write_text(json.dumps(key))


def whole_share(recipe_path: Path) -> dict[str, float]:
    """The share of each source's records that data.max_length keeps whole."""
    from scalebio_cli.data.tokens.render import Renderer
    from scalebio_cli.data.tokens.tokenized import load_tokenized
    from scalebio_cli.recipe import load_recipe
    from scalebio_cli.train.modeling import load_tokenizer

    recipe = load_recipe(recipe_path, [])
    renderer = Renderer(load_tokenizer(recipe.tokenizer_path, recipe.trust_remote_code, recipe.data.chat_template),
                        recipe.data.max_length)
    out = {}
    for name, spec in recipe.data.sources.items():
        data = load_tokenized(spec.path, renderer)
        out[name] = 1 - data.num_truncated / max(1, data.num_records)
    return out


def compare_table(doc: dict) -> list[str]:
    """Best first by test loss: mean ± std, paired difference to the baseline with its 95% interval, cost."""
    rows = [f"| mix | records | response tokens | test loss (mean ± std) | vs {doc['baseline']} (95% CI) | cost |",
            "|---|---:|---:|---:|---:|---|"]
    base = (doc.get("base") or {}).get("results", {}).get("test", {}).get("loss")
    if base is not None:
        rows.append(f"| base model (no fine-tuning) | - | - | {base:.4f} | - | - |")
    for name, mix in sorted(doc["mixes"].items(), key=lambda kv: kv[1]["results"]["test"]["loss"]["mean"]):
        loss = mix["results"]["test"]["loss"]
        vs = loss.get("vs_baseline")
        diff = "-" if not vs else f"{vs['diff_mean']:+.4f} " + (
            f"[{vs['ci95'][0]:+.4f}, {vs['ci95'][1]:+.4f}]" if vs["ci95"] else "(one seed)")
        cost = mix["cost"]
        spent = ("0" if cost["seconds"] == 0 else "unknown" if cost["seconds"] is None else
                 f"{cost['seconds'] / 60:.1f} min = {cost['fine_tunes'] or 0:.1f} fine-tunes")
        std = "" if loss["std"] is None else f" ± {loss['std']:.4f}"
        rows.append(f"| {name} | {mix['records']['mean']:.0f} | {mix['tokens']['mean']:,.0f} | {loss['mean']:.4f}"
                    f"{std} | {diff} | {spent} |")
    return rows


def verdict(doc: dict) -> str:
    """What wins and by how much, in words, from the paired intervals against the baseline."""
    better, worse, unclear = [], [], []
    for name, mix in doc["mixes"].items():
        vs = mix["results"]["test"]["loss"].get("vs_baseline")
        if not vs:
            continue
        if vs["ci95"] and vs["ci95"][1] < 0:
            better.append(f"{name} ({vs['diff_mean']:+.4f})")
        elif vs["ci95"] and vs["ci95"][0] > 0:
            worse.append(f"{name} ({vs['diff_mean']:+.4f})")
        else:
            unclear.append(name)
    parts = [f"lower loss than {doc['baseline']} beyond the seed noise: {', '.join(better) or 'none'}",
             f"higher: {', '.join(worse) or 'none'}", f"inside the noise: {', '.join(unclear) or 'none'}"]
    return "; ".join(parts) + "."


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, int, dict]:
    """The pool, the recipe over it (work/recipe.yaml), the test file; returns (recipe path, pool size, recipe)."""
    (work / "data").mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["data"]["sources"] = {name: subset(args.data / f"train_{name}.json", work / "data" / f"train_{name}.json",
                                              args.per_source, 0) for name in recipe["data"]["sources"]}
    recipe["data"]["validation"] = subset(args.data / "val.json", work / "data" / "val.json", args.num_val, 0)
    recipe["data"]["max_length"] = args.max_length
    recipe.update(model=args.model, output_dir=str(work / "reweight"))
    subset(args.data / "test.json", work / "data" / "test.json", args.num_test, 0)
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    size = sum(len(json.loads(Path(p).read_text())) for p in recipe["data"]["sources"].values())
    return path, size, recipe


def run_all(args: argparse.Namespace, work: Path) -> dict:
    """Every stage (reused where finished); what the report needs."""
    recipe_path, pool, recipe = prepare(args, work)
    log, test = work / "commands.log", f"test={work / 'data' / 'test.json'}"
    common = ["--config", str(recipe_path), *args.overrides]
    seeds = ["--seeds", *map(str, args.seeds)]
    sources = list(recipe["data"]["sources"])
    scalebio("compare", *common, "-n", str(args.ceiling_n), *seeds, "--test", test, "--baseline", "uniform",
             *[a for s in sources for a in ("--mix", f"{s}=source:{s}")], "--mix", "uniform",
             "--output", str(work / "ceiling"), log=log)
    ceiling = json.loads((work / "ceiling" / "compare.json").read_text())
    if args.ceiling_only:
        return {"pool": pool, "recipe": recipe_path, "runs": [], "heads": {}, "ceiling": ceiling}
    delay = args.lam_delay if args.lam_delay is not None else int(recipe["reweight"].get("lambda_delay") or 0)
    steps = args.lam_steps + delay
    runs = []
    for seed in args.reweight_seeds:
        out = work / f"reweight-seed{seed}"
        scalebio("reweight", *common, f"seed={seed}", f"output_dir={out}", f"reweight.steps={steps}",
                 *([f"reweight.lambda_delay={args.lam_delay}"] if args.lam_delay is not None else []),
                 "--resume", "auto", log=log)
        runs.append(out / "weights.json")
    heads = {}
    for ratio in args.ratios:
        n = max(1, round(ratio * pool))
        folder = work / f"ratio-{ratio:g}"
        folder.mkdir(exist_ok=True)
        for method in ("rho-loss", "less"):
            select_once(common, method, n, folder / f"{method}.jsonl", log)
        hybrid = folder / "hybrid.jsonl"
        scalebio("sample", "--weights", str(runs[0]), "--rank-by",
                 str(folder / f"{args.hybrid_scores}.scores.jsonl"), "-n", str(n), "-o", str(hybrid), "--force",
                 log=log)
        scalebio("compare", *common, "-n", str(n), *seeds, "--test", test, "--baseline", "uniform",
                 "--mix", f"scalebio={runs[0]}", "--mix", "uniform", "--mix", f"rho-loss={folder / 'rho-loss.jsonl'}",
                 "--mix", f"less={folder / 'less.jsonl'}", "--mix", f"hybrid={hybrid}",
                 "--output", str(folder / "compare"), log=log)
        heads[ratio] = (n, json.loads((folder / "compare" / "compare.json").read_text()))
    return {"pool": pool, "recipe": recipe_path, "runs": runs, "heads": heads, "ceiling": ceiling}


def weights_rows(runs: list[Path]) -> list[str]:
    docs = [json.loads(p.read_text()) for p in runs]
    head = "| source | " + " | ".join(f"seed {d['seed']}: weight (verdict)" for d in docs) + " |"
    rows = [head, "|---|" + "---:|" * len(docs)]
    for name in docs[0]["weights"]:
        rows.append(f"| {name} | " + " | ".join(
            f"{d['weights'][name]:.3f} ({d['evidence'][name].get('verdict', '-')})" for d in docs) + " |")
    return rows


def report(args: argparse.Namespace, got: dict, minutes: float) -> str:
    command = " ".join(["python scripts/compare_math.py", *sys.argv[1:]])
    pool = "whole files" if not args.per_source else f"{args.per_source} records a source"
    whole = whole_share(got["recipe"])
    ceiling = got["ceiling"]
    lines = [f"`{command}` (pool: {pool}, {got['pool']:,} records; validation: "
             f"{args.num_val or 'all'} of val.json; test: {args.num_test or 'all 280'} of test.json; max_length "
             f"{args.max_length}, records kept whole: " + ", ".join(f"{n} {v:.0%}" for n, v in whole.items())
             + f"; seeds {', '.join(map(str, args.seeds))}; {minutes:.0f} min on this machine over its invocations).",
             "", f"**The ceiling**: each source alone, {args.ceiling_n} records, and uniform over them (where a "
             "mixture lands among its sources), paired by seed:", "",
             *compare_table(ceiling), ""]
    if ceiling.get("ceiling"):
        from scalebio_cli.results.paired import ceiling_sentence

        lines += [ceiling_sentence(ceiling["ceiling"]), ""]
    if not got["runs"]:
        return "\n".join(lines + ["The head-to-head was not run with this command (`--ceiling-only`); on a GPU: "
                                  "`make compare-math-gpu`."])
    lines += [f"**ScaleBiO's weights**: {args.lam_steps} lam steps, one run per seed:", "",
              *weights_rows(got["runs"]), ""]
    for ratio, (n, doc) in got["heads"].items():
        lines += [f"**Head-to-head at {ratio:.0%} of the pool** ({n:,} records per mix; hybrid: ScaleBiO's shares, "
                  f"best records by {args.hybrid_scores} scores), paired against uniform:", "",
                  *compare_table(doc), "", f"At {ratio:.0%}: {verdict(doc)}", ""]
        lines += [f"Warning: {w}" for w in doc.get("warnings") or []]
    return "\n".join(lines).rstrip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-source", type=int, default=400, help="pool records per source (0 = whole files)")
    parser.add_argument("--num-val", type=int, default=100, help="validation records (0 = all of val.json)")
    parser.add_argument("--num-test", type=int, default=0, help="test records (0 = all of test.json)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5], help="shares of the pool per mix")
    parser.add_argument("--ceiling-n", type=int, default=200, help="records per single-source mix")
    parser.add_argument("--lam-steps", type=int, default=300, help="reweight steps after the lam delay")
    parser.add_argument("--lam-delay", type=int, default=None, help="reweight.lambda_delay (default: the recipe's)")
    parser.add_argument("--reweight-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hybrid-scores", choices=["rho-loss", "less"], default="rho-loss")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--data", type=Path, default=DATA, help="the instruct-math folder")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "compare-math")
    parser.add_argument("--smoke", action="store_true", help="every stage at toy size (minutes; not a result)")
    parser.add_argument("--ceiling-only", action="store_true",
                        help="step 1 alone: is there room for a mixture to matter on this data at this size?")
    parser.add_argument("--no-record", action="store_true", help="do not touch docs/results.md")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE recipe overrides for every stage")
    args = parser.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if not (args.data / "val.json").is_file():
        sys.exit(f"{args.data} not found: make instruct-math-data INSTRUCT_MATH=/path/to/instruct-math")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    got = run_all(args, work)
    # The time the tables cost, summed over invocations: a rerun that reuses finished stages must not report only
    # its own few seconds.
    ledger = work / "elapsed.json"
    seconds = (json.loads(ledger.read_text())["seconds"] if ledger.is_file() else 0.0) + time.perf_counter() - start
    ledger.write_text(json.dumps({"seconds": seconds}))
    body = report(args, got, seconds / 60)
    print(body)
    if not args.no_record:
        text = RESULTS.read_text()
        block = f"{BEGIN}\n{body}\n{END}"
        RESULTS.write_text(text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):] if BEGIN in text
                           else text.rstrip() + "\n\n" + block + "\n")
        pictures = {"compare-math-ceiling.png": work / "ceiling"}
        if not args.ceiling_only:  # the head-to-head's picture: the largest ratio
            pictures["compare-math.png"] = work / f"ratio-{args.ratios[-1]:g}" / "compare"
        for name, folder in pictures.items():
            (ROOT / "docs" / name).write_bytes((folder / "compare.png").read_bytes())
        print(f"recorded in {RESULTS} and docs/{', docs/'.join(pictures)}", file=sys.stderr)


if __name__ == "__main__":
    main()
