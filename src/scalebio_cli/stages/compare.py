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
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape

from scalebio_cli.console import console
from scalebio_cli.errors import InputError
from scalebio_cli.files import write_json, write_text
from scalebio_cli.recipe import Recipe
from scalebio_cli.results import paired, reuse

FORMAT = "scalebio-compare/2"
KEYWORDS = ("uniform", "proportional")
MATCH = ("records", "tokens")
METRICS = ("loss", "perplexity", "accuracy", "accuracy_math_verify")
_SUBSAMPLE = 0xC0A  # a file mix's per-seed subsample
_CONTENT_KEYS = ("model", "tokenizer", "data.sources", "finetune.data", "finetune.weights")  # hashed, not named


@dataclasses.dataclass(frozen=True)
class Mix:
    name: str
    spec: str  # `uniform`, `proportional`, a source name (kind source), or an absolute path
    kind: str  # uniform | proportional | weights | file | source


@dataclasses.dataclass
class Stages:
    """The stage modules compare drives (sample, finetune, evaluate), handed in by the CLI."""

    sample: Any
    finetune: Any
    evaluate: Any


def parse_mixes(items: list[str]) -> dict[str, Mix]:
    """`NAME=SPEC` (or `uniform` / `proportional` alone); SPEC: a weights.json, a sample/select output, uniform,
    proportional, or `source:SOURCE` (one of data.sources alone)."""
    mixes: dict[str, Mix] = {}
    problems = []
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep:
            name, spec = item, item
        if not name or not spec or (not sep and item not in KEYWORDS):
            problems.append(f"--mix {item!r}: expected NAME=SPEC (SPEC: a weights file, uniform, proportional, "
                            "source:SOURCE, or a sample file)")
        elif name in mixes:
            problems.append(f"--mix: the name '{name}' is given twice")
        elif name == "base":
            problems.append("--mix base: 'base' names the model before fine-tuning; choose another name")
        elif spec in KEYWORDS:
            mixes[name] = Mix(name, spec, spec)
        elif spec.startswith("source:"):
            mixes[name] = Mix(name, spec[len("source:"):], "source")
        else:
            path = Path(spec).expanduser().resolve()
            if path.is_file():
                mixes[name] = Mix(name, str(path), "weights" if _is_weights_file(path) else "file")
            else:
                problems.append(f"--mix {name}: file not found: {path}")
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


def default_baseline(mixes: dict[str, Mix], baseline: str | None) -> str:
    """`--baseline`, else `uniform` when there is such a mix, else the first mix."""
    return baseline or ("uniform" if "uniform" in mixes else next(iter(mixes)))


def check(recipe: Recipe, where: str | Path, mixes: dict[str, Mix], tests: dict[str, str], num_samples: int,
          seeds: list[int], output: Path, baseline: str | None = None, match: str = "records") -> None:
    """Every problem at once, before any cell runs: usage, inputs, and whether every cell can draw its N records."""
    from scalebio_cli.recipe.preflight import data_file_problems, model_folder_problems, recipe_source_problems
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
    feasibility = [p for mix in mixes.values() for p in _feasibility(recipe, mix, num_samples)]
    if feasibility:
        raise InputError(feasibility)


def _draw_plan(recipe: Recipe, mix: Mix) -> tuple[dict[str, float], dict[str, int], dict[str, Any]]:
    """What a mix draws from: its probabilities, the sizes of its sources, and the sources by name (for a file mix,
    the file alone)."""
    from scalebio_cli.data.read import sources as data_sources
    from scalebio_cli.data.read.expand import recipe_sources
    from scalebio_cli.data.read.records import count_records
    from scalebio_cli.results import weights_file

    if mix.kind == "file":
        return {"file": 1.0}, {"file": count_records(mix.spec)}, {"file": data_sources.from_path("file", mix.spec)}
    if mix.kind == "weights":
        probs, doc = weights_file.load(mix.spec)
        return probs, {n: int(doc["sources"][n]["num_examples"]) for n in probs}, weights_file.doc_sources(
            doc, list(probs))
    named = recipe_sources(recipe)
    if mix.kind == "source":
        if mix.spec not in named:
            raise InputError(f"--mix {mix.name}=source:{mix.spec}: not a source of data.sources "
                             f"({', '.join(named)})")
        named = {mix.spec: named[mix.spec]}
    sizes = {n: data_sources.count(s) for n, s in named.items()}
    if mix.kind == "proportional":
        total = sum(sizes.values())
        return {n: s / total for n, s in sizes.items()} if total else dict.fromkeys(sizes, 0.0), sizes, named
    return {n: 1.0 / len(named) for n in named}, sizes, named


def _feasibility(recipe: Recipe, mix: Mix, n: int) -> list[str]:
    """Whether the mix can draw n distinct records (compare never repeats a record: every mix trains on N distinct
    records), and if not, the largest -n it allows."""
    from scalebio_cli.data.out.mixture import largest_remainder

    try:
        probs, sizes, _ = _draw_plan(recipe, mix)
    except InputError as exc:
        return exc.problems
    names = list(probs)

    def short(k: int) -> list[str]:
        counts = largest_remainder(k, [probs[s] for s in names])
        return [s for s, c in zip(names, counts) if c > sizes[s]]

    over = short(n)
    if not over:
        return []
    most = min(int(sizes[s] / probs[s]) if probs[s] > 0 else n for s in names)
    while most > 0 and short(most):
        most -= 1
    counts = dict(zip(names, largest_remainder(n, [probs[s] for s in names])))
    what = (f"{mix.spec} holds {sizes['file']:,} records" if mix.kind == "file" else
            ", ".join(f"source '{s}' holds {sizes[s]:,} records, {counts[s]:,} asked for" for s in over))
    return [f"--mix {mix.name}: -n {n:,} cannot be drawn without repeating records ({what}); compare trains every "
            f"mix on N distinct records: ask for --num-samples {most:,} or fewer"]


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
    baseline: str | None = None
    match: str = "records"


@dataclasses.dataclass
class Cell:
    mix: Mix
    seed: int
    folder: Path
    draw_key: dict[str, Any]
    train_key: dict[str, Any] = dataclasses.field(default_factory=dict)
    tokens_per_record: list[int] = dataclasses.field(default_factory=list)
    records: int = 0
    tokens: int = 0

    @property
    def name(self) -> str:
        return f"{self.mix.name} seed {self.seed}"


# -- content keys --------------------------------------------------------------------------------------------------


class Inputs:
    """The sha256 of everything the cells read, each hashed once per compare."""

    def __init__(self, recipe: Recipe):
        self.recipe, self._memo = recipe, {}

    def _get(self, label: str, compute: Any) -> str:
        if label not in self._memo:
            self._memo[label] = compute()
        return self._memo[label]

    def model(self) -> dict[str, str]:
        ident = self._get("model", lambda: json.dumps(reuse.model_identity(self.recipe.model, self.recipe.tokenizer)))
        return json.loads(ident)

    def source(self, name: str, source: Any) -> str:
        from scalebio_cli.data.read import sources as data_sources

        return self._get(f"source:{name}:{source.path}",
                         lambda: data_sources.content_key(source, data_sources.fingerprint(source)))

    def file(self, path: str) -> str:
        return self._get(f"file:{path}", lambda: reuse.path_sha256(path))

    def of_mix(self, recipe: Recipe, mix: Mix) -> dict[str, str]:
        """The mix's own inputs: its file, or its weights file and the sources it draws from."""
        _, _, named = _draw_plan(recipe, mix)
        if mix.kind == "file":
            return {f"the record file {mix.spec}": self.file(mix.spec)}
        out = {f"the weights file {mix.spec}": self.file(mix.spec)} if mix.kind == "weights" else {}
        return out | {f"source {n} ({s.path})": self.source(n, s) for n, s in named.items()}


def finetune_settings(recipe: Recipe) -> dict[str, Any]:
    """The resolved settings that change a fine-tuning's result (the recipe's finetune result keys), less those
    naming files, whose contents the inputs hold."""
    from scalebio_cli.recipe.schema import result_keys
    from scalebio_cli.results.run_folder import flatten

    flat = flatten(recipe.to_dict())
    return {k: flat.get(k) for k in result_keys("finetune") if k not in _CONTENT_KEYS and k != "seed"}


def _template_inputs(recipe: Recipe, inputs: Inputs) -> dict[str, str]:
    template = recipe.data.chat_template
    return {f"the chat template {template}": inputs.file(template)} if template and Path(template).is_file() else {}


def plan(c: Comparison, inputs: Inputs) -> list[Cell]:
    """Every cell with the key of its draw (no file is read but to hash it, none written)."""
    cells = []
    model = inputs.model()
    for mix in c.mixes.values():
        mine = inputs.of_mix(c.recipe, mix) | {f"the {k}": v for k, v in model.items()}
        mine |= _template_inputs(c.recipe, inputs)
        for seed in c.seeds:
            settings = {"mix": mix.kind, "seed": seed, "num_samples": c.num_samples}
            cells.append(Cell(mix, seed, c.output / "cells" / f"{mix.name}-seed{seed}", reuse.make_key(mine, settings)))
    return cells


def train_key(c: Comparison, cell: Cell, budget: int | None) -> dict[str, Any]:
    settings = {**cell.draw_key["settings"], "finetune": finetune_settings(c.recipe), "match": c.match,
                "token_budget": budget}
    return reuse.make_key(cell.draw_key["inputs"], settings)


def eval_key(c: Comparison, inputs: Inputs, trained: dict[str, Any]) -> dict[str, Any]:
    tests = {f"test {n} ({p})": inputs.file(p) for n, p in c.tests.items()}
    settings = {"generate": c.generate, "max_new_tokens": c.max_new_tokens, "max_length": c.recipe.data.max_length,
                "precision": c.recipe.precision, "chat_template": c.recipe.data.chat_template}
    return reuse.make_key(trained["inputs"] | tests, {"train": trained["settings"], "eval": settings})


# -- drawing each cell's records -------------------------------------------------------------------------------


def _subsample(path: str, size: int, n: int, seed: int, out: Path) -> None:
    """n of a record file's `size` records, seeded, unchanged (their `source` kept), in a seeded order."""
    from scalebio_cli.data.out.record_writer import json_line
    from scalebio_cli.data.read import sources as data_sources

    picks = np.random.default_rng([seed, _SUBSAMPLE]).choice(size, n, replace=False)
    slot = {int(p): j for j, p in enumerate(picks)}
    lines: list[str] = [""] * n
    for index, (_, record) in enumerate(data_sources.iter_records(data_sources.from_path("file", path))):
        if index in slot:
            lines[slot[index]] = json_line(record) + "\n"
    write_text(out, "".join(lines))


def draw(c: Comparison, stages: Stages, cell: Cell, out: Path) -> None:
    """The cell's N records into `out` (JSON lines)."""
    probs, sizes, named = _draw_plan(c.recipe, cell.mix)
    if cell.mix.kind == "file":
        _subsample(cell.mix.spec, sizes["file"], c.num_samples, cell.seed, out)
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


# -- cost -----------------------------------------------------------------------------------------------------------


def _reweight_cost(run: Path) -> dict[str, Any]:
    """A reweight run's wall time and tokens from its metrics.jsonl (sec_per_step and tokens_per_s of its lines)."""
    rows = []
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if (run / "metrics.jsonl").is_file() \
            else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("sec_per_step"), (int, float)) and row.get("step"):
            rows.append(row)
    if not rows:
        return {"seconds": None, "tokens": None, "what": f"reweight run {run}: no timed metrics.jsonl lines"}
    tokens, previous = 0.0, 0
    for row in rows:
        tokens += float(row.get("tokens_per_s") or 0) * float(row["sec_per_step"]) * (row["step"] - previous)
        previous = row["step"]
    return {"seconds": round(float(rows[-1]["sec_per_step"]) * rows[-1]["step"], 1), "tokens": int(tokens),
            "what": f"reweight run {run} ({rows[-1]['step']} steps; metrics.jsonl's sec_per_step x steps)"}


def _file_cost(path: Path) -> dict[str, Any]:
    """What made a record file, from its manifest: `select` (its timed seconds) or `sample` of a weights file (that
    reweight run)."""
    manifest = reuse.read_json(path.with_name(path.stem + ".manifest.json"))
    if not isinstance(manifest, dict):
        return {"seconds": None, "tokens": None, "what": f"unknown: {path} has no manifest beside it"}
    if manifest.get("method"):
        seconds = manifest.get("seconds")
        what = f"select --method {manifest['method']}" + ("" if seconds is not None else
                                                           " (its manifest records no time: an earlier version)")
        return {"seconds": seconds, "tokens": manifest.get("tokens"), "what": what}
    weights = manifest.get("weights_file")
    if weights and Path(weights).is_file():
        cost = _reweight_cost(Path(weights).parent)
        return _plus_scores(cost, manifest.get("rank_by")) if manifest.get("rank_by") else cost
    return {"seconds": None, "tokens": None, "what": f"unknown: the manifest of {path} names no producer"}


def _plus_scores(cost: dict[str, Any], scores: str) -> dict[str, Any]:
    """A ranked sample (`sample --rank-by`) cost its weights' reweight run plus the `select` that wrote the scores
    (the manifest beside it whose scores_file is this file)."""
    for path in sorted(Path(scores).parent.glob("*.manifest.json")):
        manifest = reuse.read_json(path)
        if isinstance(manifest, dict) and manifest.get("method") and manifest.get("scores_file") == scores:
            seconds = manifest.get("seconds")
            total = None if seconds is None or cost["seconds"] is None else cost["seconds"] + seconds
            return {"seconds": total, "tokens": cost["tokens"],
                    "what": f"{cost['what']} + select --method {manifest['method']} (its scores)"}
    return {"seconds": None, "tokens": None, "what": f"{cost['what']} + the scores {scores} (no select manifest "
                                                       "names them)"}


def mix_cost(mix: Mix, finetune_seconds: float) -> dict[str, Any]:
    """What producing the mix cost before compare's own fine-tunings: seconds, tokens, and the seconds in units of
    one fine-tuning of the mix (`fine_tunes`)."""
    if mix.kind in (*KEYWORDS, "source"):
        cost: dict[str, Any] = {"seconds": 0.0, "tokens": 0, "what": f"{mix.kind}: a fixed rule, nothing to learn"}
    elif mix.kind == "weights":
        cost = _reweight_cost(Path(mix.spec).parent)
    else:
        cost = _file_cost(Path(mix.spec))
    seconds = cost["seconds"]
    cost["fine_tunes"] = (None if seconds is None or finetune_seconds <= 0 else round(seconds / finetune_seconds, 3))
    return {k: cost[k] for k in ("seconds", "tokens", "fine_tunes", "what")}


# -- the summary ----------------------------------------------------------------------------------------------------


def summary(values: list[float] | list[int]) -> dict[str, Any]:
    """mean, sample standard deviation over seeds (None for one seed: there is no spread to speak of), values."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "per_seed": values}


def _results(c: Comparison, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for test in c.tests:
        entries = [d["results"][test] for d in per_seed]
        results[test] = {m: summary([float(e[m]) for e in entries]) for m in METRICS
                         if all(e.get(m) is not None for e in entries)}
    return results


def aggregate(c: Comparison, docs: dict[str, list[dict[str, Any]]], cells: list[Cell],
              base: dict[str, Any] | None) -> dict[str, Any]:
    baseline = default_baseline(c.mixes, c.baseline)
    mixes = {}
    for name, per_seed in docs.items():
        mine = [x for x in cells if x.mix.name == name]
        seconds = [float((reuse.read_json(x.folder / "cell.json") or {}).get("finetune_seconds") or 0) for x in mine]
        mixes[name] = {"spec": c.mixes[name].spec, "kind": c.mixes[name].kind,
                       "records": summary([x.records for x in mine]), "tokens": summary([x.tokens for x in mine]),
                       "cost": mix_cost(c.mixes[name], statistics.fmean(seconds) if seconds else 0.0),
                       "results": _results(c, per_seed)}
    for name, mix in mixes.items():
        if name == baseline:
            continue
        for test, metrics in mix["results"].items():
            for metric, entry in metrics.items():
                against = mixes[baseline]["results"].get(test, {}).get(metric)
                if against:
                    entry["vs_baseline"] = paired.versus(entry["per_seed"], against["per_seed"])
    singles = [n for n, m in c.mixes.items() if m.kind == "source"]
    ceiling = paired.ceiling(mixes, singles, next(iter(c.tests))) if len(singles) > 1 else None
    base_results = None if base is None else base["results"]
    return {"format": FORMAT, "seeds": c.seeds, "num_samples": c.num_samples, "match": c.match,
            "baseline": baseline, "model": c.recipe.model, "tests": c.tests, "generate": c.generate,
            "base": None if base_results is None else {"results": base_results}, "mixes": mixes,
            "ceiling": ceiling, "warnings": paired.untrained_warnings(mixes, base_results)}


def data_checks(c: Comparison) -> None:
    """The data checks every stage runs first (data/checks.py), before the first cell: what the mixes draw from (the
    sources of data.sources and of weights files, record files) against the validation sets and the test files. A
    mix that holds test records scores well on them for holding them, so the log names it and the count."""
    from scalebio_cli.data import checks
    from scalebio_cli.data.read import sources as data_sources
    from scalebio_cli.data.read.expand import validation_sources

    drawn: dict[str, Any] = {}
    for mix in c.mixes.values():
        for name, source in _draw_plan(c.recipe, mix)[2].items():
            label = f"--mix {mix.name}" if mix.kind == "file" else name
            if label in drawn and drawn[label].path != source.path:
                label = f"{name} (mix '{mix.name}')"
            drawn.setdefault(label, source)
    references = {s.key: s for s in validation_sources(c.recipe).values()}
    references |= {f"test set '{n}'": data_sources.from_path(f"--test {n}", p) for n, p in c.tests.items()}
    checks.before_training(c.recipe, drawn, references, keeps_all="compare")


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
