"""`scalebio compare`: mixtures compared the way the paper does: for every mix and seed, sample N records, fine-tune
`model` with the recipe's finetune section, evaluate on every test file; mean and spread over seeds.

Each (mix, seed) is a cell in DIR/cells/MIX-seedS/ (sample.jsonl, model/, eval.json, cell.json). A cell is finished
when its eval.json exists; a rerun reuses finished cells (the settings they ran with must match: cell.json) and
resumes an unfinished fine-tuning from its last checkpoint; `--force` redoes every cell. The sample, finetune and
eval stages are handed in by the CLI (stages never import each other). Writes DIR/compare.json, compare.md and
compare.png (results/compare_report.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

from rich.markup import escape

from scalebio_cli.console import console
from scalebio_cli.errors import InputError
from scalebio_cli.files import write_json
from scalebio_cli.recipe import Recipe

FORMAT = "scalebio-compare/1"
KEYWORDS = ("uniform", "proportional")
METRICS = ("loss", "perplexity", "accuracy", "accuracy_math_verify")


@dataclasses.dataclass(frozen=True)
class Mix:
    name: str
    spec: str  # `uniform`, `proportional`, or an absolute path
    kind: str  # uniform | proportional | weights | file


@dataclasses.dataclass
class Stages:
    """The stage modules compare drives (sample, finetune, evaluate), handed in by the CLI."""

    sample: Any
    finetune: Any
    evaluate: Any


def parse_mixes(items: list[str]) -> dict[str, Mix]:
    """`NAME=SPEC` (or `uniform` / `proportional` alone); a SPEC file is a weights.json or a sample/select output."""
    mixes: dict[str, Mix] = {}
    problems = []
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep:
            name, spec = item, item
        if not name or not spec or (not sep and item not in KEYWORDS):
            problems.append(f"--mix {item!r}: expected NAME=SPEC (SPEC: a weights file, uniform, proportional, or a "
                            "sample file)")
            continue
        if name in mixes:
            problems.append(f"--mix: the name '{name}' is given twice")
            continue
        if spec in KEYWORDS:
            mixes[name] = Mix(name, spec, spec)
            continue
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            problems.append(f"--mix {name}: file not found: {path}")
            continue
        mixes[name] = Mix(name, str(path), "weights" if _is_weights_file(path) else "file")
    if not mixes and not problems:
        problems.append("--mix: give at least one mix (NAME=SPEC)")
    if problems:
        raise InputError(problems)
    return mixes


def _is_weights_file(path: Path) -> bool:
    if path.suffix != ".json":
        return False
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and str(doc.get("format", "")).startswith("scalebio-weights/")


def check(recipe: Recipe, where: str | Path, mixes: dict[str, Mix], tests: dict[str, str], num_samples: int,
          seeds: list[int], output: Path) -> None:
    """Every problem at once, before any cell runs."""
    from scalebio_cli.recipe.preflight import data_file_problems, model_folder_problems, recipe_source_problems
    from scalebio_cli.results import weights_file

    problems = [] if tests else ["--test: give at least one test file (NAME=FILE)"]
    if num_samples < 1:
        problems.append(f"--num-samples: must be >= 1, got {num_samples}")
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        problems.append(f"--seeds: distinct seeds >= 0, got {seeds}")
    if output.exists() and not output.is_dir():
        problems.append(f"--output {output}: is a file; name a folder")
    for name, path in tests.items():
        problems += data_file_problems(f"--test {name}", path)
    for mix in mixes.values():
        if mix.kind == "weights":
            try:
                weights_file.load(mix.spec)
            except InputError as exc:
                problems += [f"--mix {mix.name}: {p}" for p in exc.problems]
        elif mix.kind == "file":
            problems += data_file_problems(f"--mix {mix.name}", mix.spec)
    recipe_problems = model_folder_problems("model", recipe.model, need_tokenizer=not recipe.tokenizer)
    if any(m.kind in KEYWORDS for m in mixes.values()):
        if not recipe.data.sources:
            recipe_problems.append("data.sources: uniform/proportional mixes are over data.sources; none given")
        recipe_problems += recipe_source_problems(recipe, validation=False)[1]
    problems += [f"{where}: {p}" for p in recipe_problems]
    if problems:
        raise InputError(problems)


def _cell_settings(recipe: Recipe, mix: Mix, seed: int, num_samples: int, tests: dict[str, str],
                   generate: bool) -> dict[str, Any]:
    ft = {k: v for k, v in dataclasses.asdict(recipe.finetune).items() if k not in ("data", "weights")}
    return {"mix": mix.name, "spec": mix.spec, "seed": seed, "num_samples": num_samples, "model": recipe.model,
            "max_length": recipe.data.max_length, "finetune": ft, "tests": tests, "generate": generate}


def _sample(stages: Stages, recipe: Recipe, mix: Mix, seed: int, num_samples: int, out: Path) -> None:
    from scalebio_cli.data.read.sources import recipe_sources

    if mix.kind == "weights":
        draw = stages.sample.weights_file_draw(mix.spec, out, False, False)
    else:
        draw = stages.sample.baseline_draw(mix.kind, recipe_sources(recipe), out, {"the recipe's model": recipe.model})
    stages.sample.run(draw.probs, draw.sources, num_samples, out, seed, False, draw.label, draw.sizes)


@dataclasses.dataclass
class Comparison:
    recipe: Recipe
    mixes: dict[str, Mix]
    tests: dict[str, str]
    num_samples: int
    seeds: list[int]
    output: Path
    generate: bool = False
    max_new_tokens: int = 256
    force: bool = False


def run_cell(c: Comparison, stages: Stages, mix: Mix, seed: int) -> dict[str, Any]:
    """One (mix, seed): sample, fine-tune, evaluate; the eval document (reused when the cell is finished)."""
    from scalebio_cli.results import run_folder

    cell = c.output / "cells" / f"{mix.name}-seed{seed}"
    settings = _cell_settings(c.recipe, mix, seed, c.num_samples, c.tests, c.generate)
    if c.force:
        shutil.rmtree(cell, ignore_errors=True)
    if (cell / "eval.json").is_file():
        recorded = json.loads((cell / "cell.json").read_text()) if (cell / "cell.json").is_file() else None
        if recorded != settings:
            raise InputError(f"{cell}: finished with other settings (cell.json); rerun with --force to redo it, or "
                             "write to another --output")
        console.print(f"[dim]compare[/] reusing the finished cell {escape(str(cell))}")
        return json.loads((cell / "eval.json").read_text())
    cell.mkdir(parents=True, exist_ok=True)
    write_json(cell / "cell.json", settings)
    data = Path(mix.spec) if mix.kind == "file" else cell / "sample.jsonl"
    if mix.kind != "file":
        _sample(stages, c.recipe, mix, seed, c.num_samples, data)
    model_dir = cell / "model"
    if not (cell / "finetune.done").is_file():
        ft = dataclasses.replace(c.recipe.finetune, data=str(data), weights=None)
        sub = dataclasses.replace(c.recipe, seed=seed, output_dir=str(model_dir), finetune=ft, report_to=[])
        with run_folder.claim(model_dir, "finetune", "auto", False):
            stages.finetune.run(sub, "auto", False)
        (cell / "finetune.done").touch()
    return stages.evaluate.run(str(model_dir), c.tests, output=cell / "eval.json",
                               batch_size=c.recipe.finetune.micro_batch_size, max_length=c.recipe.data.max_length,
                               generate=c.generate, max_new_tokens=c.max_new_tokens, precision=c.recipe.precision,
                               trust_remote_code=c.recipe.trust_remote_code, chat_template=c.recipe.data.chat_template)


def summary(values: list[float]) -> dict[str, Any]:
    """mean, sample standard deviation over seeds (0 for one seed), and the values in seed order."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def aggregate(c: Comparison, docs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    mixes = {}
    for name, per_seed in docs.items():
        results: dict[str, Any] = {}
        for test in c.tests:
            entries = [d["results"][test] for d in per_seed]
            results[test] = {m: summary([float(e[m]) for e in entries]) for m in METRICS
                             if all(e.get(m) is not None for e in entries)}
        mixes[name] = {"spec": c.mixes[name].spec, "results": results}
    return {"format": FORMAT, "seeds": c.seeds, "num_samples": c.num_samples, "model": c.recipe.model,
            "tests": c.tests, "generate": c.generate, "mixes": mixes}


def run(c: Comparison, stages: Stages) -> Path:
    """Every cell (reusing finished ones), then DIR/compare.json, compare.md, compare.png; returns compare.json."""
    from scalebio_cli.errors import TrainingStopped
    from scalebio_cli.results import compare_report
    from scalebio_cli.train.stopping import StopSignals

    cells = [(mix, seed) for mix in c.mixes.values() for seed in c.seeds]
    docs: dict[str, list[dict[str, Any]]] = {name: [] for name in c.mixes}
    # SIGTERM/SIGINT: a fine-tuning checkpoints and stops; a signal that comes while a cell samples or evaluates
    # (or during a fine-tuning's last step, which then finishes) stops compare once that cell is done
    with StopSignals().installed() as signals:
        for k, (mix, seed) in enumerate(cells):
            if signals.received:
                raise TrainingStopped(f"stopped by {signals.received} after {k} of {len(cells)} cells; the same "
                                      "command continues (finished cells are reused)", signal=signals.received)
            console.print(f"[bold]compare[/] cell {k + 1} of {len(cells)}: {escape(mix.name)} seed {seed} "
                          f"({len(cells) - k - 1} remaining after it)")
            docs[mix.name].append(run_cell(c, stages, mix, seed))
    doc = aggregate(c, docs)
    path = c.output / "compare.json"
    write_json(path, doc)
    compare_report.write_table_and_plot(doc, c.output)
    console.print(compare_report.markdown(doc), markup=False)
    return path
