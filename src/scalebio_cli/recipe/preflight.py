"""Up-front checks of a stage's inputs, before torch is imported or any model is loaded.

A bad input must never cost a run: everything here is cheap (seconds, a streaming parse of every data file) and
runs first, and every problem is reported at once. Token-level checks (does any record keep a response token
within max_length?) need the tokenizer and run next, still before the model loads (reweight.load_data).
"""

from __future__ import annotations

import json
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
from scalebio_cli.recipe.load import looks_like_hub_id
from scalebio_cli.recipe.schema import Recipe
from scalebio_cli.train import process

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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


def model_folder_problems(key: str, path: str, need_weights: bool = True, need_tokenizer: bool = True) -> list[str]:
    """Exists, has a config (a JSON object), undamaged weight files and a loadable-looking tokenizer."""
    p = Path(path)
    if p.suffix == ".gguf":  # one file holds weights, tokenizer and chat template
        if not p.is_file():
            return [f"{key}: GGUF file not found: {p}{did_you_mean(p)}"]
        with p.open("rb") as f:
            magic = f.read(4)
        return [] if magic == b"GGUF" else [f"{key}: {p} is not a GGUF file (it does not start with 'GGUF')"]
    if not p.exists():
        if looks_like_hub_id(path):
            return hub_model_problems(key, path, "config.json" if need_weights else "tokenizer_config.json")
        return [f"{key}: folder not found: {p}{did_you_mean(p)}"]
    if not p.is_dir():
        return [f"{key}: not a folder: {p}"]
    problems = []
    if need_weights:
        config = p / "config.json"
        if not config.is_file():
            problems.append(f"{key}: {p} is not a model folder (no config.json)")
        else:
            _, problem = model_folder.read_json_object(config)
            problems += [f"{key}: {problem}"] if problem else []
        if not any((p / name).is_file() for name in WEIGHT_FILES) and not list(p.glob("model-*.safetensors")):
            problems.append(f"{key}: {p} has no weights (expected {' or '.join(WEIGHT_FILES[:2])})")
        else:
            problems += [f"{key}: {problem}" for problem in model_folder.weights_problems(p)]
    return problems + (_tokenizer_files(key, p) if need_tokenizer else [])


HUB_PROBE_SECONDS = 3.0  # how long a Hub id waits for the Hub to answer before the run is refused


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the Hub opens within `timeout` seconds (name lookup included: it runs in a
    thread, since a lookup ignores socket timeouts)."""
    import socket
    import threading
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def hub_model_problems(key: str, repo_id: str, probe_file: str = "config.json") -> list[str]:
    """`org/name` that is no local folder names a Hub model: fine when the Hugging Face cache holds it or the Hub
    answers; otherwise refused now (exit 2), not after the loader's retries and a traceback."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, probe_file), str):
            return []  # downloaded before: transformers loads it from the cache
    except Exception:  # an id the Hub client rejects is reported below like any unreachable one
        pass
    if _hub_offline():
        why = "the Hub is off (HF_HUB_OFFLINE is set) and the Hugging Face cache does not hold it"
    elif not _hub_reachable():
        host = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        why = f"the Hub ({host}) cannot be reached and the Hugging Face cache does not hold it"
    else:
        return []
    return [f"{key}: '{repo_id}' is not a local path, so it names a Hub model, but {why}; set `{key}:` to a local "
            "model folder or a .gguf file (download it where a hub is reachable, e.g. `hf download "
            f"{repo_id} --local-dir DIR`)"]


def _tokenizer_files(key: str, p: Path) -> list[str]:
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        return [f"{key}: {p} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                "set `tokenizer:` to a folder that has them"]
    return [f"{key}: {problem}" for problem in model_folder.tokenizer_problems(p)]


def model_fit_problems(recipe: Recipe, stage: str) -> list[str]:
    """Values that are only wrong for this model (read from its config.json, before any weight loads)."""
    config, _ = model_folder.read_json_object(Path(recipe.model) / "config.json")
    if config is None:
        return []  # a hub id, or a config problem reported by model_folder_problems
    problems = []
    blocks, positions = model_folder.num_blocks(config), model_folder.max_positions(config)
    layers = (recipe.reweight if stage == "reweight" else recipe.finetune).lisa.layers
    if blocks is not None and layers > blocks:
        problems.append(f"{stage}.lisa.layers: {layers} is more than the {blocks} transformer blocks of "
                        f"{recipe.model}; use at most {blocks} (or 0 for all blocks)")
    if positions is not None and recipe.data.max_length > positions:
        problems.append(f"data.max_length: {recipe.data.max_length} is more than the {positions} positions "
                        f"{recipe.model} was built for (config.json); use at most {positions}")
    return problems


def lora_problems(recipe: Recipe, stage: str) -> list[str]:
    """LoRA (`STAGE.lora.r > 0`, with LISA over its adapters when `STAGE.lisa.layers > 0`) runs on our engine (one
    process or several) or on one DeepSpeed engine with ZeRO-2/3 (train/zero_adapters.py), and needs peft."""
    cfg = recipe.reweight if stage == "reweight" else recipe.finetune
    if cfg.lora.r <= 0:
        return []
    problems = []
    if recipe.deepspeed:
        zero_stage = deepspeed_stage(recipe.deepspeed)
        if zero_stage is not None and zero_stage not in (2, 3):
            problems.append(f"{stage}.lora.r: LoRA under DeepSpeed runs with ZeRO-2 or ZeRO-3 (the adapters of a run "
                            f"share one engine); {recipe.deepspeed} sets stage {zero_stage}")
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        problems.append(f"{stage}.lora.r: LoRA needs peft, which is not installed (pip install 'scalebio-cli[lora]')")
    return problems


def output_dir_problems(path: str) -> list[str]:
    p = Path(path)
    existing = next((q for q in [p, *p.parents] if q.exists()), None)
    if existing is None or not existing.is_dir():
        return [f"output_dir: cannot create {p} ({existing} is not a folder)"]
    if not os.access(existing, os.W_OK):
        return [f"output_dir: cannot write into {existing} (permissions)"]
    return []


def deepspeed_stage(path: str) -> int | None:
    """The ZeRO stage a DeepSpeed config file sets (0 when it sets none), or None when the file cannot be read
    (train/deepspeed_config.deepspeed_problems reports that)."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return config.get("zero_optimization", {}).get("stage", 0) if isinstance(config, dict) else None


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


def model_problems(recipe: Recipe, stage: str) -> list[str]:
    """The model and tokenizer folders, and whether the model fits the recipe (lisa.layers, data.max_length)."""
    problems = model_folder_problems("model", recipe.model, need_weights=True, need_tokenizer=not recipe.tokenizer)
    if recipe.tokenizer:
        problems += model_folder_problems("tokenizer", recipe.tokenizer, need_weights=False)
    return problems + model_fit_problems(recipe, stage)


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
