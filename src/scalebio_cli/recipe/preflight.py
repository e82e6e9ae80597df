"""Up-front checks of a stage's inputs that every stage shares, before torch is imported or any model is loaded:
data files and sources, outputs that would replace an input, trackers, chat templates. The model's are
recipe/model_checks.py's; each stage's own are beside it (stages/*_check.py, or the stage's `check`).

A bad input must never cost a run: everything here is cheap (seconds, a streaming parse of every data file) and
runs first, and every problem is reported at once. Token-level checks (does any record keep a response token
within max_length?) need the tokenizer and run next, still before the model loads (reweight.load_data).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rich.markup import escape

from scalebio_cli.console import console
from scalebio_cli.data.read import hub, tables
from scalebio_cli.data.read import sources as data_sources
from scalebio_cli.data.read.expand import recipe_sources, validation_sources
from scalebio_cli.data.read.records import AUTO_COLUMNS, detect_format, has_response
from scalebio_cli.data.read.sources import DataSource
from scalebio_cli.errors import InputError
from scalebio_cli.files import clobbered_input, did_you_mean
from scalebio_cli.recipe import model_folder
from scalebio_cli.recipe.schema import Recipe
from scalebio_cli.train import process


def data_file_problems(key: str, path: str | None) -> list[str]:
    """A data path given as a plain path (finetune.data, eval's --data, sample's --sources): see source_problems."""
    return source_problems(data_sources.from_path(key, path)) if path else []


def _where_problems(source: DataSource) -> list[str]:
    """Exists (or is a Hub id), readable, a supported type; columns and split present. [] when readable."""
    key, p = source.key, Path(source.path)
    if tables.plain_file(source.spec) is None:
        if p.is_file() and tables.suffix(str(p)) not in tables.SUPPORTED:
            return [f"{key}: unsupported file type '{p.suffix}' ({p}); use {', '.join(tables.SUPPORTED)}, a "
                    "folder of them, a save_to_disk folder or a Hub dataset id"]
        if p.exists() and not os.access(p, os.R_OK):
            return [f"{key}: not readable (permissions): {p}"]
        if any(c in source.path for c in "*?[") and not hub.local_files(source.path):
            return [f"{key}: no file matches {source.path}"]
        if not p.exists() and not hub.is_hub_id(source.path):
            return [f"{key}: file not found: {p}{did_you_mean(p)}"]
        try:
            data_sources.open_table(source)
        except InputError as exc:
            return exc.problems
        return data_sources.column_problems(source)
    if not os.access(p, os.R_OK):
        return [f"{key}: not readable (permissions): {p}"]
    return data_sources.column_problems(source) if source.spec.columns else []


def source_problems(source: DataSource) -> list[str]:
    """Readable (see _where_problems), and every record parses into a known format (first bad one named); says in
    the log when records are read by a common schema (question/answer, ...) rather than a format of their own."""
    key = source.key
    problems = _where_problems(source)
    if problems:
        return problems
    count, unusable, auto = 0, [], None
    try:
        sampled = _sampled_records(source)
        for where, record in (data_sources.iter_records(source) if sampled is None else sampled[1]):
            example = data_sources.to_example(record, source.spec.columns, where)
            if count == 0 and not source.spec.columns and detect_format(record) in AUTO_COLUMNS:
                auto = AUTO_COLUMNS[detect_format(record)]  # type: ignore[index]
            count += 1
            if not has_response(example):
                unusable.append(where)
    except InputError as exc:
        return [f"{key}: {problem}" for problem in exc.problems]
    label = source.path if sampled is None else f"a seeded sample of {count:,} of the {sampled[0]:,} records of " \
        f"{source.path}"
    if not count:
        return [f"{key}: {source.path} holds no records"]
    if len(unusable) == count:
        others = {1: "", 2: " (nor does the other record)"}.get(count, f" (nor do the other {count - 1:,} records)")
        return [f"{key}: no record of {label} can be trained on: {unusable[0]}: the conversation has no assistant "
                f"turn{others}; the response must be an assistant/gpt turn"]
    if process.is_main():
        if auto:
            console.print(f"[dim]data[/] {escape(key)}: no column map; reading the columns {auto[0]}/{auto[1]} as "
                          "prompt/completion (set `columns:` to map others)")
        if sampled is not None:
            console.print(f"[dim]data[/] {escape(key)}: {sampled[0]:,} records; checked a seeded sample of "
                          f"{count:,} up front, the others as they are drawn")
        if unusable:
            of = "records" if sampled is None else "sampled records"
            console.print(f"[yellow]warning:[/] {escape(key)}: {len(unusable):,} of {count:,} {of} have no "
                          f"assistant turn and are skipped (first: {escape(unusable[0])})")
    return []


# A source large enough to be read lazily (record_reader.LAZY_MIN_RECORDS) is checked on a seeded sample of its
# records, not parsed whole; the rest are checked as they are read.
SAMPLED_CHECK_SIZE = 10_000
_SAMPLE_STREAM = 0xC4EC


def _sampled_records(source: DataSource) -> tuple[int, list[tuple[str, object]]] | None:
    """(record count, a seeded sample of the records with the first and the last) of a large source; None to
    parse the source whole."""
    from scalebio_cli.data.read import record_reader

    if not record_reader.may_read_lazily(source, record_reader.LAZY_MIN_RECORDS):
        return None
    reader = record_reader.RecordReader(source, "", cache_dir=None)
    n = reader.num_records
    if n < record_reader.LAZY_MIN_RECORDS:
        return None
    import numpy as np

    chosen = np.random.default_rng([0, _SAMPLE_STREAM]).choice(n, min(n, SAMPLED_CHECK_SIZE - 2), replace=False)
    positions = np.unique(np.concatenate([[0, n - 1], chosen])).tolist()
    return n, reader.read(positions)


def recipe_source_problems(recipe: Recipe, validation: bool) -> tuple[dict[str, DataSource], list[str]]:
    """data.sources (split_by expanded) and, with `validation`, the validation sets: every one checked."""
    problems: list[str] = []
    try:
        expanded = recipe_sources(recipe)
    except InputError as exc:
        expanded, problems = {}, exc.problems
    for source in expanded.values():
        problems += source_problems(source)
    for source in (validation_sources(recipe).values() if validation else []):
        problems += source_problems(source)
    return expanded, problems


def output_dir_problems(path: str) -> list[str]:
    p = Path(path)
    existing = next((q for q in [p, *p.parents] if q.exists()), None)
    if existing is None or not existing.is_dir():
        return [f"output_dir: cannot create {p} ({existing} is not a folder)"]
    if not os.access(existing, os.W_OK):
        return [f"output_dir: cannot write into {existing} (permissions)"]
    return []


TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # report_to name -> the module it needs


def tracking_problems(names: list[str]) -> list[str]:
    import importlib.util

    return [f"report_to: {name} is not installed (pip install 'scalebio-cli[tracking]', or pip install "
            f"{TRACKER_MODULES[name]})" for name in names
            if name in TRACKER_MODULES and importlib.util.find_spec(TRACKER_MODULES[name]) is None]


def chat_template_problems(key: str, path: str | None) -> list[str]:
    """The file exists and parses as Jinja the way transformers compiles chat templates."""
    if not path:
        return []
    p = Path(path)
    if not p.is_file():
        return [f"{key}: file not found: {p}{did_you_mean(p)}"]
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [f"{key}: cannot read {p} ({exc})"]
    if not text.strip():
        return [f"{key}: {p} is empty"]
    import jinja2.ext
    import jinja2.sandbox

    # transformers adds a `{% generation %}` block tag for assistant masks; plain Jinja does not know it
    source = re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", text)
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(extensions=[jinja2.ext.loopcontrols])
    try:
        env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        return [f"{key}: {p}:{exc.lineno}: not a valid Jinja template ({exc.message})"]
    return []


def raise_problems(problems: list[str], where: str | Path) -> None:
    """Every problem at once, each named with the recipe file (exit 2)."""
    if problems:
        raise InputError([f"{where}: {p}" for p in problems])


# ---------------------------------------------------------------------------------------------------------------
# Outputs that would replace an input.


def output_file_problems(option: str, output: Path, inputs: dict[str, str]) -> list[str]:
    """`output` must not be an existing folder, nor any of `inputs` under another spelling, link or hard link."""
    if output.is_dir():
        return [f"{option} {output}: is a folder; name the file to write"]
    clobbered = clobbered_input(output, inputs)
    if clobbered:
        return [f"{option} {output}: is {clobbered} ({inputs[clobbered]}), an input of this command; writing "
                "there would destroy it: choose another output file"]
    return []


def model_files(path: str | None) -> dict[str, str]:
    """Every file of a local model folder, labelled for output_file_problems."""
    folder = Path(path) if path else None
    if folder is None or not folder.is_dir():
        return {}
    return {f"{f.name} of the model {folder}": str(f) for f in sorted(folder.iterdir()) if f.is_file()}


def run_products_problems(recipe: Recipe, stage: str) -> list[str]:
    """Files the run writes into output_dir must not be its inputs; finetune must not write over its base model."""
    out = Path(recipe.output_dir)
    problems = []
    for key in ("model", "tokenizer"):
        value = getattr(recipe, key)
        if stage == "finetune" and value and Path(value).is_dir() and clobbered_input(out, {key: value}):
            problems.append(f"output_dir: {out} is the {key} folder; the fine-tuned model would be written over "
                            "it: choose another output_dir")
    inputs = {f"data.sources.{n}": spec.path for n, spec in recipe.data.sources.items()}
    inputs |= {(f"data.validation.{n}" if recipe.named_validation else "data.validation"): spec.path
               for n, spec in recipe.validation_sets().items()}
    inputs |= {f"finetune.validation.{n}": spec.path for n, spec in recipe.finetune.validation_sets().items()}
    inputs |= {"finetune.data": recipe.finetune.data or "",
               "finetune.weights": recipe.finetune.weights or "", "deepspeed": recipe.deepspeed or ""}
    products = ("weights.json", "weights.png") if stage == "reweight" else model_folder.MODEL_FILES
    for name in (*products, "metrics.jsonl"):
        clobbered = clobbered_input(out / name, inputs)
        if clobbered:
            problems.append(f"{clobbered}: {inputs[clobbered]} is where this run writes its {name}: move the input "
                            "or choose another output_dir")
    return problems


def other_stage_problems(output_dir: str, stage: str) -> list[str]:
    """A folder that holds another stage's run is refused, even with --force: the new run would write its
    metrics.jsonl, recipe.yaml and finished.json beside the other run's results (which --force, clearing only
    checkpoints, keeps), and `report` would then draw a page of the two mixed."""
    from scalebio_cli.results import run_folder

    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    run = run_folder.held_run(folder)
    other, held = (run.stage, list(run.held)) if run is not None else (None, [])
    if other in (None, stage) and (folder / "compare.json").is_file():
        other, held = "compare", ["compare.json"]
    if other in (None, stage) and (folder / "weights.json").is_file() and stage != "reweight":
        other = "reweight"  # a weights.json that records no recipe is still reweight's result
    if other in (None, stage):
        return []
    marker = folder / run_folder.FINISHED_NAME
    if marker.is_file():
        held.append(f"{marker.name} of stage {other}")
    return [f"output_dir {folder}: holds a {other} run ({', '.join(held)}); a {stage} run there would mix its "
            "metrics.jsonl, recipe.yaml and finished.json with that run's (--force clears only checkpoints, never "
            f"another stage's results): choose another output_dir, e.g. output_dir={folder}-{stage}"]
