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

from scalebio_cli.data.records import EXTENSIONS, iter_examples
from scalebio_cli.errors import InputError
from scalebio_cli.recipe.load import looks_like_hub_id
from scalebio_cli.recipe.schema import Recipe
from scalebio_cli.train import process

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def data_file_problems(key: str, path: str | None) -> list[str]:
    """Exists, readable, a supported type, and every record parses into a known format (first bad one named)."""
    if not path:
        return []
    p = Path(path)
    if not p.exists():
        return [f"{key}: file not found: {p}"]
    if not p.is_file():
        return [f"{key}: not a file: {p}"]
    if not os.access(p, os.R_OK):
        return [f"{key}: not readable (permissions): {p}"]
    if p.suffix not in EXTENSIONS:
        return [f"{key}: unsupported file type '{p.suffix}' ({p}); use {', '.join(EXTENSIONS)}"]
    try:
        count = sum(1 for _ in iter_examples(p))
    except InputError as exc:
        return [f"{key}: {problem}" for problem in exc.problems]
    return [] if count else [f"{key}: {p} holds no records"]


def model_folder_problems(key: str, path: str, need_weights: bool = True) -> list[str]:
    p = Path(path)
    if p.suffix == ".gguf":  # one file holds weights, tokenizer and chat template
        if not p.is_file():
            return [f"{key}: GGUF file not found: {p}"]
        with p.open("rb") as f:
            magic = f.read(4)
        return [] if magic == b"GGUF" else [f"{key}: {p} is not a GGUF file (it does not start with 'GGUF')"]
    if not p.exists():
        return [] if looks_like_hub_id(path) else [f"{key}: folder not found: {p}"]
    if not p.is_dir():
        return [f"{key}: not a folder: {p}"]
    problems = []
    if need_weights:
        config = p / "config.json"
        if not config.is_file():
            problems.append(f"{key}: {p} is not a model folder (no config.json)")
        else:
            try:
                json.loads(config.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                problems.append(f"{key}: {config} is not valid JSON ({exc})")
        if not any((p / name).is_file() for name in WEIGHT_FILES) and not list(p.glob("model-*.safetensors")):
            problems.append(f"{key}: {p} has no weights (expected {' or '.join(WEIGHT_FILES[:2])})")
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"{key}: {p} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                        "set `tokenizer:` to a folder that has them")
    return problems


def output_dir_problems(path: str) -> list[str]:
    p = Path(path)
    existing = next((q for q in [p, *p.parents] if q.exists()), None)
    if existing is None or not existing.is_dir():
        return [f"output_dir: cannot create {p} ({existing} is not a folder)"]
    if not os.access(existing, os.W_OK):
        return [f"output_dir: cannot write into {existing} (permissions)"]
    return []


def deepspeed_problems(path: str | None) -> list[str]:
    if not path:
        return []
    import importlib.util

    problems = []
    if importlib.util.find_spec("deepspeed") is None:
        problems.append("deepspeed: this recipe trains with DeepSpeed, which is not installed "
                        "(pip install 'scalebio-cli[deepspeed]')")
    p = Path(path)
    if not p.is_file():
        return problems + [f"deepspeed: config file not found: {p}"]
    try:
        config = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return problems + [f"deepspeed: {p} is not valid JSON ({exc})"]
    stage = config.get("zero_optimization", {}).get("stage", 0) if isinstance(config, dict) else None
    if stage not in (0, 1, 2, 3):
        problems.append(f"deepspeed: {p}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return problems


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
        return [f"{key}: file not found: {p}"]
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


def _models(recipe: Recipe) -> list[str]:
    problems = model_folder_problems("model", recipe.model, need_weights=True)
    if recipe.tokenizer:
        problems = [p for p in problems if "tokenizer files" not in p]
        problems += model_folder_problems("tokenizer", recipe.tokenizer, need_weights=False)
    return problems


def _raise(problems: list[str], where: str | Path) -> None:
    if problems:
        raise InputError([f"{where}: {p}" for p in problems])


def check_reweight(recipe: Recipe, where: str | Path = "recipe") -> None:
    data, rw = recipe.data, recipe.reweight
    problems = []
    if len(data.sources) < 2:
        problems.append(f"data.sources: reweight needs at least 2 sources, got {len(data.sources)}")
    if not data.validation:
        problems.append("data.validation: reweight needs a validation file (what the model should become good at)")
    if rw.batch_composition == "balanced" and rw.batch_size < len(data.sources):
        problems.append(f"reweight.batch_size: {rw.batch_size} is less than the {len(data.sources)} sources; "
                        "every source must appear in every batch")
    for key in ("batch_size", "val_batch_size"):
        if getattr(rw, key) % process.world_size():
            problems.append(f"reweight.{key}: {getattr(rw, key)} does not divide over {process.world_size()} processes")
    problems += _models(recipe) + output_dir_problems(recipe.output_dir) + deepspeed_problems(recipe.deepspeed)
    problems += tracking_problems(recipe.report_to) + chat_template_problems("data.chat_template", data.chat_template)
    for name, path in data.sources.items():
        problems += data_file_problems(f"data.sources.{name}", path)
    problems += data_file_problems("data.validation", data.validation)
    _raise(problems, where)


def check_finetune(recipe: Recipe, where: str | Path = "recipe") -> None:
    ft = recipe.finetune
    problems = []
    if bool(ft.data) == bool(ft.weights):
        problems.append("finetune: set exactly one of finetune.data (a data file) and finetune.weights (a "
                        "weights.json to mix data.sources by)")
    if ft.batch_size % process.world_size():
        problems.append(f"finetune.batch_size: {ft.batch_size} does not divide over {process.world_size()} processes")
    problems += _models(recipe) + output_dir_problems(recipe.output_dir) + deepspeed_problems(recipe.deepspeed)
    problems += data_file_problems("finetune.data", ft.data) + data_file_problems("finetune.validation", ft.validation)
    problems += tracking_problems(recipe.report_to)
    problems += chat_template_problems("data.chat_template", recipe.data.chat_template)
    if ft.weights:
        from scalebio_cli.results import weights_file

        try:
            weights, doc = weights_file.load(ft.weights)
        except InputError as exc:
            problems += [f"finetune.weights: {p}" for p in exc.problems]
        else:
            sources = recipe.data.sources or {n: doc["sources"][n]["path"] for n in weights}
            if set(sources) != set(weights):
                problems.append(f"finetune.weights: its sources ({', '.join(weights)}) are not data.sources "
                                f"({', '.join(sources)})")
            for name, path in sources.items():
                problems += data_file_problems(f"data.sources.{name}", path)
    _raise(problems, where)
