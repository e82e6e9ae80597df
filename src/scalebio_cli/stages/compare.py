"""`scalebio compare`: mixtures compared as a paired experiment (CONTRACT v4, compare.json `scalebio-compare/2`).

For every mix and seed k: draw the mix's N records (seeded by k; a file mix larger than N is subsampled, a `source:`
mix draws from that source alone), fine-tune `model` with the recipe's finetune section under seed k (every mix
shares seed k's fine-tuning randomness: new parameters' init, data order, dropout), evaluate on every test file.
The base model is evaluated once too (the row before fine-tuning). Per mix: records and response tokens per seed,
what producing the mix cost, and per test set and metric the paired difference to the baseline mix with its 95%
t-interval (results/paired.py). `--match tokens` gives every mix of a seed the same response tokens instead (the
smallest N-record draw's; each mix trains on the shortest prefix of its draw that reaches it).

Each (mix, seed) is a cell in DIR/cells/MIX-seedS/ (sample.jsonl, finetune/, eval.json, cell.json); the base model's
is DIR/cells/base/. Reuse is by content (results/reuse.py): a cell is reused only when the sha256 of everything it
read (weights or record file, the sources it draws from, the model, the test files) and its resolved settings
match; a finished fine-tuning of other inputs is refused (exit 2, before any cell starts) unless `--force`; changed
test files re-evaluate. Every cell's feasibility is checked before the first starts. The sample, finetune and eval
stages are handed in by the CLI (stages never import each other). Writes DIR/compare.json, compare.md, compare.png.
The pieces are comparing/'s: mixes.py (parsing, what a mix draws), cells.py (cells and their keys), cost.py,
summary.py (compare.json).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from rich.markup import escape

from scalebio_cli.comparing.cells import MATCH, Cell, Comparison, Inputs, eval_key, plan, train_key
from scalebio_cli.comparing.mixes import KEYWORDS, Mix, draw_plan, feasibility, subsample
from scalebio_cli.comparing.summary import aggregate
from scalebio_cli.console import console
from scalebio_cli.errors import InputError
from scalebio_cli.files import write_json, write_text
from scalebio_cli.recipe import Recipe
from scalebio_cli.results import reuse


@dataclasses.dataclass
class Stages:
    """The stage modules compare drives (sample, finetune, evaluate), handed in by the CLI."""

    sample: Any
    finetune: Any
    evaluate: Any


def check(recipe: Recipe, where: str | Path, mixes: dict[str, Mix], tests: dict[str, str], num_samples: int,
          seeds: list[int], output: Path, baseline: str | None = None, match: str = "records") -> None:
    """Every problem at once, before any cell runs: usage, inputs, and whether every cell can draw its N records."""
    from scalebio_cli.recipe.model_checks import model_folder_problems
    from scalebio_cli.recipe.preflight import data_file_problems, recipe_source_problems
    from scalebio_cli.results import weights_file

    problems = [] if tests else ["--test: give at least one test file (NAME=FILE)"]
    if num_samples < 1:
        problems.append(f"--num-samples: must be >= 1, got {num_samples}")
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        problems.append(f"--seeds: distinct seeds >= 0, got {seeds}")
    if match not in MATCH:
        problems.append(f"--match: must be one of {', '.join(MATCH)}, got {match!r}")
    if baseline is not None and baseline not in mixes:
        problems.append(f"--baseline {baseline}: not a mix (the mixes: {', '.join(mixes)})")
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
    if any(m.kind in (*KEYWORDS, "source") for m in mixes.values()):
        if not recipe.data.sources:
            recipe_problems.append("data.sources: uniform, proportional and source: mixes draw from data.sources; "
                                   "none given")
        recipe_problems += recipe_source_problems(recipe, validation=False)[1]
    problems += [f"{where}: {p}" for p in recipe_problems]
    if problems:
        raise InputError(problems)
    infeasible = [p for mix in mixes.values() for p in feasibility(recipe, mix, num_samples)]
    if infeasible:
        raise InputError(infeasible)


# -- drawing each cell's records -------------------------------------------------------------------------------
def draw(c: Comparison, stages: Stages, cell: Cell, out: Path) -> None:
    """The cell's N records into `out` (JSON lines)."""
    probs, sizes, named = draw_plan(c.recipe, cell.mix)
    if cell.mix.kind == "file":
        subsample(cell.mix.spec, sizes["file"], c.num_samples, cell.seed, out)
        return
    label = cell.mix.spec if cell.mix.kind == "weights" else f"{cell.mix.kind}:{cell.mix.spec}"
    stages.sample.run(probs, named, c.num_samples, out, cell.seed, False, label, sizes)


class TokenCounter:
    """Response tokens of each record of a file as fine-tuning counts them (the recipe's template and max_length;
    0 for a record with no response token left)."""

    def __init__(self, recipe: Recipe):
        self.recipe, self.renderer = recipe, None

    def __call__(self, path: Path) -> list[int]:
        from scalebio_cli.data.tokens.render import Renderer
        from scalebio_cli.data.tokens.tokenized import load_tokenized
        from scalebio_cli.train.modeling import load_tokenizer

        if self.renderer is None:
            r = self.recipe
            self.renderer = Renderer(load_tokenizer(r.tokenizer_path, r.trust_remote_code, r.data.chat_template),
                                     r.data.max_length)
        try:
            data = load_tokenized(path, self.renderer, self.recipe.data.cache_dir)
        except InputError:  # no record keeps a response token: fine-tuning says so, with the file's name
            return []
        per_record = [0] * data.num_records
        for i in range(len(data)):
            start, end = int(data.offsets[i]), int(data.offsets[i + 1])
            per_record[int(data.record_index[i])] = int(data.trainable[start + 1: end].sum())
        return per_record


def draw_all(c: Comparison, stages: Stages, cells: list[Cell], count: TokenCounter) -> None:
    """Every cell's draw (a finished draw of the same key is kept) and its tokens per record. A cell whose
    fine-tuning finished from other inputs is refused here, before anything of it is touched (unless --force)."""
    problems = []
    for cell in cells:
        recorded = reuse.read_json(cell.folder / "draw.json")
        sample = cell.folder / "sample.jsonl"
        if not c.force and isinstance(recorded, dict) and recorded.get("key") == cell.draw_key and sample.is_file():
            cell.tokens_per_record = recorded["tokens_per_record"]
            continue
        finished = reuse.finished_differences(cell.folder / "finetune", {})
        if finished is not None and not c.force:
            old = (reuse.read_json(cell.folder / "finetune" / reuse.DONE_NAME) or {}).get("key") or {}
            settings = old.get("settings") if isinstance(old.get("settings"), dict) else {}
            was = {"inputs": old.get("inputs"), "settings": {k: settings.get(k) for k in cell.draw_key["settings"]}}
            changed = reuse.differences(was if old else None, cell.draw_key)
            problems.append(f"{cell.folder}: finished from other inputs ({'; '.join(changed)}); pass --force to "
                            "redo it, or write to another --output")
            continue
        shutil.rmtree(cell.folder, ignore_errors=True)
        cell.folder.mkdir(parents=True)
        draw(c, stages, cell, sample)
        cell.tokens_per_record = count(sample)
        write_json(cell.folder / "draw.json", {"key": cell.draw_key, "tokens_per_record": cell.tokens_per_record})
    problems += [f"--mix {x.mix.name}: no record of seed {x.seed}'s draw keeps a response token within "
                 f"data.max_length={c.recipe.data.max_length} (raise data.max_length)"
                 for x in cells if not sum(x.tokens_per_record)]
    if problems:
        raise InputError(problems)


def budgets(c: Comparison, cells: list[Cell]) -> dict[int, int | None]:
    """--match tokens: per seed, the response tokens of the smallest N-record draw (None under --match records)."""
    if c.match != "tokens":
        return dict.fromkeys(c.seeds)
    return {s: min(sum(x.tokens_per_record) for x in cells if x.seed == s) for s in c.seeds}


def training_file(cell: Cell, budget: int | None) -> Path:
    """The records the cell trains on: its draw, or (a token budget) the shortest prefix reaching the budget."""
    sample = cell.folder / "sample.jsonl"
    per = cell.tokens_per_record
    if budget is None:
        cell.records, cell.tokens = sum(1 for t in per if t), sum(per)
        return sample
    total, k = 0, 0
    while k < len(per) and total < budget:
        total, k = total + per[k], k + 1
    cell.records, cell.tokens = sum(1 for t in per[:k] if t), total
    lines = sample.read_text(encoding="utf-8").splitlines(keepends=True)
    write_text(cell.folder / "train.jsonl", "".join(lines[:k]))
    return cell.folder / "train.jsonl"


# -- fine-tuning and evaluating -----------------------------------------------------------------------------------


def _evaluate(c: Comparison, stages: Stages, model: str, output: Path) -> dict[str, Any]:
    r = c.recipe
    return stages.evaluate.run(model, c.tests, output=output, batch_size=r.finetune.micro_batch_size,
                               max_length=r.data.max_length, generate=c.generate, max_new_tokens=c.max_new_tokens,
                               precision=r.precision, trust_remote_code=r.trust_remote_code,
                               chat_template=r.data.chat_template)


def evaluate_base(c: Comparison, stages: Stages, inputs: Inputs) -> dict[str, Any]:
    """The model before fine-tuning on every test file (DIR/cells/base/), reused while its key holds."""
    folder = c.output / "cells" / "base"
    key = eval_key(c, inputs, reuse.make_key({f"the {k}": v for k, v in inputs.model().items()}, {}))
    recorded = reuse.read_json(folder / "cell.json")
    if not c.force and isinstance(recorded, dict) and recorded.get("key") == key and (folder / "eval.json").is_file():
        console.print("[dim]compare[/] reusing the base model's evaluation")
        return json.loads((folder / "eval.json").read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_json(folder / "cell.json", {"mix": "base", "key": key})
    console.print("[bold]compare[/] the base model (before fine-tuning)")
    return _evaluate(c, stages, c.recipe.model, folder / "eval.json")


def run_cell(c: Comparison, stages: Stages, inputs: Inputs, cell: Cell) -> dict[str, Any]:
    """One (mix, seed) after its draw: fine-tune (reused when finished with this key), evaluate (reused when the
    test files and eval settings match too); the eval document. cell.json, naming what the evaluation is of, is
    written only once the fine-tuning it evaluates is known to be this key's."""
    key = eval_key(c, inputs, cell.train_key)
    recorded = reuse.read_json(cell.folder / "cell.json")
    done = reuse.finished_differences(cell.folder / "finetune", cell.train_key) == []
    if done and isinstance(recorded, dict) and recorded.get("key") == key and (cell.folder / "eval.json").is_file():
        console.print(f"[dim]compare[/] reusing the finished cell {escape(str(cell.folder))}")
        return json.loads((cell.folder / "eval.json").read_text())
    (cell.folder / "eval.json").unlink(missing_ok=True)
    (cell.folder / "cell.json").unlink(missing_ok=True)
    recipe = dataclasses.replace(c.recipe, seed=cell.seed)  # seed k: the same fine-tuning randomness for every mix
    data = cell.folder / ("train.jsonl" if c.match == "tokens" else "sample.jsonl")
    ft = reuse.finetuned(recipe, data, cell.folder / "finetune", stages.finetune.run, cell.train_key, c.force)
    write_json(cell.folder / "cell.json", {"mix": cell.mix.name, "seed": cell.seed, "key": key,
                                           "records": cell.records, "tokens": cell.tokens,
                                           "finetune_seconds": round(ft.seconds, 2)})
    return _evaluate(c, stages, str(ft.model), cell.folder / "eval.json")


def check_finished(c: Comparison, cells: list[Cell]) -> None:
    """A finished fine-tuning of other inputs or settings is refused (all at once) before any cell starts."""
    problems = []
    for cell in cells:
        changed = reuse.finished_differences(cell.folder / "finetune", cell.train_key)
        if changed and not c.force:
            problems.append(f"{cell.folder}: finished from other inputs or settings ({'; '.join(changed)}); pass "
                            "--force to redo it, or write to another --output")
    if problems:
        raise InputError(problems)


def data_checks(c: Comparison) -> None:
    """The data checks every stage runs first (data/checks.py), before the first cell: what the mixes draw from (the
    sources of data.sources and of weights files, record files) against the validation sets and the test files. A
    mix that holds test records scores well on them for holding them, so the log names it and the count."""
    from scalebio_cli.data import stage_checks
    from scalebio_cli.data.read import sources as data_sources
    from scalebio_cli.data.read.expand import validation_sources

    drawn: dict[str, Any] = {}
    for mix in c.mixes.values():
        for name, source in draw_plan(c.recipe, mix)[2].items():
            label = f"--mix {mix.name}" if mix.kind == "file" else name
            if label in drawn and drawn[label].path != source.path:
                label = f"{name} (mix '{mix.name}')"
            drawn.setdefault(label, source)
    references = {s.key: s for s in validation_sources(c.recipe).values()}
    references |= {f"test set '{n}'": data_sources.from_path(f"--test {n}", p) for n, p in c.tests.items()}
    stage_checks.before_training(c.recipe, drawn, references, keeps_all="compare")


def run(c: Comparison, stages: Stages) -> Path:
    """Plan every cell, draw every cell's records, check finished cells against their keys, evaluate the base
    model, then fine-tune and evaluate cell by cell (reusing what matches); DIR/compare.json, compare.md,
    compare.png; returns compare.json."""
    from scalebio_cli.errors import TrainingStopped
    from scalebio_cli.results import compare_report
    from scalebio_cli.train.stopping import StopSignals

    data_checks(c)
    inputs = Inputs(c.recipe)
    cells = plan(c, inputs)
    draw_all(c, stages, cells, TokenCounter(c.recipe))
    limit = budgets(c, cells)
    for cell in cells:
        training_file(cell, limit[cell.seed])
        cell.train_key = train_key(c, cell, limit[cell.seed])
    check_finished(c, cells)
    docs: dict[str, list[dict[str, Any]]] = {name: [] for name in c.mixes}
    # SIGTERM/SIGINT: a fine-tuning checkpoints and stops; a signal that comes while a cell samples or evaluates
    # (or during a fine-tuning's last step, which then finishes) stops compare once that cell is done
    with StopSignals().installed() as signals:
        base = evaluate_base(c, stages, inputs)
        for k, cell in enumerate(cells):
            if signals.received:
                raise TrainingStopped(f"stopped by {signals.received} after {k} of {len(cells)} cells; the same "
                                      "command continues (finished cells are reused)", signal=signals.received)
            console.print(f"[bold]compare[/] cell {k + 1} of {len(cells)}: {escape(cell.mix.name)} seed {cell.seed} "
                          f"({cell.records:,} records, {cell.tokens:,} response tokens; "
                          f"{len(cells) - k - 1} remaining after it)")
            docs[cell.mix.name].append(run_cell(c, stages, inputs, cell))
    doc = aggregate(c, docs, cells, base)
    for warning in doc["warnings"]:
        console.print(f"[bold yellow]warning:[/] {escape(warning)}")
    path = c.output / "compare.json"
    write_json(path, doc)
    compare_report.write_table_and_plot(doc, c.output)
    console.print(compare_report.markdown(doc), markup=False)
    return path
