"""Write every figure the docs quote about the demo, from runs of the commands that produce them.

    python scripts/write_demo_docs.py [--reuse]

Runs (after scripts/build_demo.py): the README quickstart's commands in full (timed), `scalebio reweight --config
recipes/demo.yaml` (timed; what `make demo` runs), the demo pipeline (sample by the weights and uniformly, fine-tune
each, eval on demo/data/test.jsonl: what `make pipeline` runs, reusing the demo's weights), the llamafactory and
axolotl exports, and the quickstart's commands cut to a few steps (what tests/test_docs.py reruns). Records them in
docs/demo-results.json and rewrites the blocks between `<!-- demo:NAME:begin -->` and `<!-- demo:NAME:end -->` in
README.md and docs/*.md from that file. tests/test_docs.py fails when a block differs from what this script would
write, when a demo figure appears outside a block, or when the short run no longer gives the recorded numbers
(then the code changed what the demo does: rerun this script). `--reuse`: keep the finished runs in runs/ (and
their recorded times) and only redo what is missing; `--render`: only rewrite the blocks from the record (after
editing a renderer or the text around a block). About 15 min on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "docs" / "demo-results.json"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- demo:([\w-]+):begin -->\n)(.*?)(<!-- demo:\2:end -->)", re.S)
QUICK_RECIPE = "<!-- quickstart:recipe -->"
QUICK_COMMANDS = "<!-- quickstart:commands -->"
FAST = {"reweight": ["reweight.steps=3", "reweight.log_every=1"]}  # the test's cut: a few steps
FAST_SAMPLES = "16"


# -- the README quickstart, as the test runs it ------------------------------------------------------------------


def fenced_after(text: str, marker: str) -> str:
    """The body of the first fenced block after `marker`."""
    tail = text[text.index(marker):]
    match = re.search(r"```[a-z]*\n(.*?)```", tail, re.S)
    assert match, f"no fenced block after {marker}"
    return match.group(1)


def quickstart(readme: str, fast: bool) -> tuple[str, list[list[str]]]:
    """The quickstart's recipe file name and text, and its `scalebio ...` commands as argument lists (without the
    leading `scalebio`). fast: a few reweight steps and a small sample, as tests/test_docs.py runs them."""
    recipe = fenced_after(readme, QUICK_RECIPE)
    commands = []
    for line in fenced_after(readme, QUICK_COMMANDS).splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line.startswith("scalebio "):
            continue
        args = shlex.split(line)[1:]
        if fast:
            args += FAST.get(args[0], [])
            args = [FAST_SAMPLES if i and args[i - 1] in ("-n", "--num-samples") else a for i, a in enumerate(args)]
        commands.append(args)
    return recipe, commands


def recipe_name(commands: list[list[str]]) -> str:
    first = commands[0]
    return first[first.index("--config") + 1]


# -- running commands --------------------------------------------------------------------------------------------


def scalebio(*args: str, cwd: Path = ROOT) -> tuple[str, str]:
    env = {**os.environ, "COLUMNS": "120", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                                          os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "scalebio_cli", *args], cwd=cwd, env=env, capture_output=True,
                            text=True)
    if result.returncode != 0:
        sys.exit(f"scalebio {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout.strip(), result.stderr


def timed(run) -> tuple[object, dict]:
    """Run `run()`; its wall and child CPU minutes and the load average of the machine meanwhile."""
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = run()
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return out, {"wall_min": round((time.perf_counter() - start) / 60, 1), "cpu_min": round(cpu / 60, 1),
                 "load": round(os.getloadavg()[0], 1), "cores": os.cpu_count()}


def log_tail(stderr: str) -> list[str]:
    """The log from the last step line to the end (weights, averaged weights, evidence)."""
    lines = [ln.rstrip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("reweight ━")]
    last_step = max(i for i, ln in enumerate(lines) if ln.startswith("step "))
    return lines[last_step:]


def reweight_summary(run: Path) -> dict:
    doc = json.loads((run / "weights.json").read_text())
    return {k: doc[k] for k in ("weights", "weights_averaged", "evidence", "steps")}


def run_quickstart(readme: str, old: dict, reuse: bool) -> dict:
    """The quickstart in full (timed), from the repository folder as a user runs it."""
    if reuse and "quickstart" in old and (ROOT / "runs" / "my-run" / "weights.json").exists():
        return old["quickstart"]
    recipe, commands = quickstart(readme, fast=False)
    path = ROOT / recipe_name(commands)
    path.write_text(recipe)
    try:
        def run():
            return [scalebio(*args, "--force") if args[0] in ("reweight", "finetune", "sample") else scalebio(*args)
                    for args in commands]
        _, cost = timed(run)
        # the reweight alone, the cost the quickstart quotes
        _, reweight_cost = timed(lambda: scalebio(*commands[0], "--force", "output_dir=runs/my-run-timing"))
    finally:
        path.unlink()
    summary = reweight_summary(ROOT / "runs" / "my-run")
    return {**summary, "commands": cost, "reweight": reweight_cost}


def run_fast(readme: str, tmp: Path) -> dict:
    """The quickstart cut short, exactly as tests/test_docs.py runs it: the numbers the test compares."""
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "demo").symlink_to(ROOT / "demo")
    recipe, commands = quickstart(readme, fast=True)
    (tmp / recipe_name(commands)).write_text(recipe)
    for args in commands:
        scalebio(*args, cwd=tmp)
    return reweight_summary(tmp / "runs" / "my-run")


def run_demo(old: dict, reuse: bool) -> dict:
    run = ROOT / "runs" / "demo"
    if reuse and "demo" in old and (run / "weights.json").exists():
        return old["demo"]
    (_, stderr), cost = timed(lambda: scalebio("reweight", "--config", "recipes/demo.yaml", "--force"))
    return {**reweight_summary(run), "log": log_tail(stderr), "cost": cost}


def run_pipeline(old: dict, reuse: bool) -> dict:
    """scripts/pipeline.sh's stages after reweight, on the demo's weights (the same recipe: the same weights)."""
    run = ROOT / "runs" / "docs-pipeline"
    if reuse and "pipeline" in old and (run / "eval-uniform.json").exists():
        return old["pipeline"]
    run.mkdir(parents=True, exist_ok=True)
    rows = {}
    for kind in ("scalebio", "uniform"):
        by = ["--weights", "runs/demo/weights.json"] if kind == "scalebio" else \
            ["--weights", "uniform", "--config", "recipes/demo.yaml"]
        sample = run / f"sample-{kind}.jsonl"
        scalebio("sample", *by, "-n", "600", "-o", str(sample), "--seed", "0", "--replacement", "--force")
        scalebio("finetune", "--config", "recipes/demo.yaml", f"output_dir={run}/finetune-{kind}",
                 f"finetune.data={sample}", "finetune.weights=null", "--force")
        scalebio("eval", "--model", f"{run}/finetune-{kind}", "--data", "test=demo/data/test.jsonl",
                 "-o", str(run / f"eval-{kind}.json"))
        result = json.loads((run / f"eval-{kind}.json").read_text())["results"]["test"]
        counts = json.loads((run / f"sample-{kind}.manifest.json").read_text())["counts"]
        rows[kind] = {"loss": result["loss"], "perplexity": result["perplexity"], "counts": counts}
    return rows


def run_exports() -> dict:
    scalebio("export", "runs/demo/weights.json", "--to", "llamafactory", "--to", "axolotl")
    import yaml

    llama = yaml.safe_load((ROOT / "runs" / "demo" / "export-llamafactory" / "llamafactory.yaml").read_text())
    axolotl = (ROOT / "runs" / "demo" / "export-axolotl" / "axolotl.yaml").read_text()
    kept = re.search(r"about ([\d,]+) records in all \(([^)]*)\)", axolotl)
    return {"llamafactory": {k: llama[k] for k in ("dataset", "mix_strategy", "interleave_probs")},
            "axolotl_kept": kept.group(1), "axolotl_summary": kept.group(2)}


# -- rendering ---------------------------------------------------------------------------------------------------


def _minutes(cost: dict) -> str:
    return (f"{cost['wall_min']:.1f} min on {cost['cores']} CPU cores shared with other jobs (load average "
            f"{cost['load']:.1f}; {cost['cpu_min']:.1f} CPU-minutes)")


def _num(value: float | None, spec: str) -> str:
    """A number as the JSON shows it (null where the run had too few batches for an error estimate)."""
    return "null" if value is None else format(value, spec)


def render(name: str, rec: dict) -> str:
    """The body of block `name`, from the record."""
    demo, pipe, quick = rec["demo"], rec.get("pipeline", {}), rec.get("quickstart", {})
    names = list(demo["weights"])
    if name == "log":
        return "```\n" + "\n".join(demo["log"]) + "\n```\n"
    if name == "weights-json":
        ev = demo["evidence"][names[0]]
        r3 = lambda d: "{" + ", ".join(f'"{n}": {v:.3f}' for n, v in d.items()) + "}"  # noqa: E731
        uniform = {n: 1 / len(names) for n in names}
        return ("```json\n{\n  \"format\": \"scalebio-weights/1\",\n"
                f'  "weights": {r3(demo["weights"])},\n  "weights_averaged": {r3(demo["weights_averaged"])},\n'
                f'  "evidence": {{"{names[0]}": {{"advantage": {ev["advantage"]:.3f}, '
                f'"stderr": {_num(ev["stderr"], ".3f")}, "z": {_num(ev["z"], ".2f")}, "steps": {ev["steps"]},\n'
                f'              "contrast": {_num(ev.get("contrast"), ".3f")}, "t": {_num(ev.get("t"), ".2f")}, '
                f'"p": {_num(ev["p"], ".2g")}, "verdict": "{ev["verdict"]}"}}, "...": "..."}},\n'
                f'  "sources": {{"{names[0]}": {{"path": "/abs/demo/data/...", "num_examples": 600, '
                '"sha256": "..."}, "...": "..."},\n'
                f'  "trajectory": [{{"step": 0, "weights": {r3(uniform)}}}, "..."],\n'
                f'  "steps": {demo["steps"]}, "seed": 0, "model": "/abs/demo/model", '
                '"config": {"...": "the fully resolved recipe"}\n}\n```\n')
    if name == "demo-cost":
        return f"`make demo`'s reweight took {_minutes(demo['cost'])} when these figures were recorded.\n"
    if name == "quickstart-cost":
        got = ", ".join(f"{n} {quick['weights'][n]:.3f} ({quick['evidence'][n]['verdict']})" for n in names)
        return (f"On the demo this gives {got}. Measured on the demo model (0.3M parameters): the reweight took "
                f"{_minutes(quick['reweight'])}; all five commands {quick['commands']['wall_min']:.1f} min. A "
                "135M model such as SmolLM2 is ~500x larger: its CPU times are in docs/results.md.\n")
    if name == "weights":
        lines = ["| source | weight | averaged (2nd half) | z (vs the mixture) | t (vs the rest) | p (Holm, of t) "
                 "| verdict | lam steps |", "|---|---:|---:|---:|---:|---:|---|---:|"]
        for n in sorted(names, key=lambda n: -demo["weights"][n]):
            ev = demo["evidence"][n]
            lines.append(f"| {n} | {demo['weights'][n]:.3f} | {demo['weights_averaged'][n]:.3f} | "
                         f"{_num(ev['z'], '+.2f')} | {_num(ev.get('t'), '+.2f')} | {_num(ev['p'], '.2g')} | "
                         f"{ev['verdict']} | {ev['steps']} |")
        return "\n".join(lines) + "\n"
    if name == "pipeline":
        lines = ["| sampling | test loss | perplexity | counts |", "|---|---:|---:|---|"]
        for kind, row in pipe.items():
            counts = ", ".join(f"{n} {c}" for n, c in row["counts"].items())
            lines.append(f"| {kind} | {row['loss']:.4f} | {row['perplexity']:.2f} | {counts} |")
        return "\n".join(lines) + "\n"
    if name == "export":
        lf = rec["exports"]["llamafactory"]
        probs = lf["interleave_probs"]
        return ("```bash\nscalebio export runs/demo/weights.json --to llamafactory --to axolotl\n"
                "cat runs/demo/export-llamafactory/llamafactory.yaml\n"
                "# dataset_dir: /abs/runs/demo/export-llamafactory\n"
                f"# dataset: {lf['dataset']}\n# mix_strategy: {lf['mix_strategy']}\n"
                f"# interleave_probs: {probs}\n```\n\n"
                f"axolotl keeps about {rec['exports']['axolotl_kept']} records of the demo's 1,800 "
                f"({rec['exports']['axolotl_summary']}).\n")
    raise KeyError(f"no renderer for block demo:{name}")


def rewrite(path: Path, rec: dict) -> str:
    text = path.read_text()
    return BLOCK.sub(lambda m: m.group(1) + render(m.group(2), rec) + m.group(4), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reuse", action="store_true", help="keep finished runs (and their recorded times)")
    parser.add_argument("--render", action="store_true", help="only rewrite the blocks from docs/demo-results.json")
    args = parser.parse_args()
    if args.render:
        write_blocks(json.loads(RECORD.read_text()))
        return
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_demo.py")], check=True)
    old = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    readme = (ROOT / "README.md").read_text()
    rec = {"demo": run_demo(old, args.reuse)}
    rec["pipeline"] = run_pipeline(old, args.reuse)
    rec["exports"] = run_exports()
    rec["quickstart"] = run_quickstart(readme, old, args.reuse)
    rec["fast"] = run_fast(readme, ROOT / "runs" / "docs-fast")
    RECORD.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {RECORD.relative_to(ROOT)}")
    write_blocks(rec)


def write_blocks(rec: dict) -> None:
    for path in DOCS:
        new = rewrite(path, rec)
        if new != path.read_text():
            path.write_text(new)
            print(f"rewrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
