"""Recipes: typed defaults, YAML, dotted `KEY=VALUE` overrides, and every problem reported at once.

The dataclasses below are the schema. A recipe YAML overrides their defaults, command-line `a.b=value` overrides
the YAML, relative paths are resolved against the recipe file's folder, and anything unknown or out of range is an
`InputError` naming the key. This module imports nothing heavy: it runs before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scalebio_cli.errors import InputError

PRECISIONS = ("auto", "fp32", "bf16")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a recipe listing a source twice must be an error."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (names must be unique)",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


@dataclass
class LisaConfig:
    """Layerwise importance sampling: train `layers` random transformer blocks at a time."""

    layers: int = 2  # blocks trainable at a time; 0 = all blocks (no LISA)
    interval: int = 20  # steps between re-draws


@dataclass
class DataConfig:
    sources: dict[str, str] = field(default_factory=dict)  # name -> file; order fixes the source index
    validation: str | None = None  # required by reweight
    max_length: int = 512  # tokens per example; longer examples are truncated on the right
    cache_dir: str | None = None  # tokenized-data cache; default $SCALEBIO_CACHE or ~/.cache/scalebio


@dataclass
class ReweightConfig:
    steps: int = 300
    alpha: float = 10.0  # penalty weight
    lr_u: float = 1e-5
    lr_w: float = 1e-5
    lr_lambda: float = 1e-2
    batch_size: int = 32  # training examples per step, all sources and processes together
    val_batch_size: int = 16  # validation examples per step, all processes together
    micro_batch_size: int = 8  # examples per forward pass on one process (gradient accumulation)
    warmup_ratio: float = 0.03  # linear warmup, then cosine decay (u, w and lambda, as the reference)
    weight_decay: float = 5e-4  # AdamW decay of u and w (reference value)
    max_grad_norm: float | None = 1.0  # clip u and w gradients at max_grad_norm * alpha; null = no clipping
    log_every: int = 10  # steps between metrics lines and trajectory points
    gradient_checkpointing: bool = False
    lisa: LisaConfig = field(default_factory=LisaConfig)


@dataclass
class FinetuneConfig:
    data: str | None = None  # a data file in any supported format ...
    weights: str | None = None  # ... or a weights.json: mix data.sources by its weights
    validation: str | None = None  # periodic held-out loss
    epochs: float = 1.0
    lr: float = 2e-5
    batch_size: int = 32  # examples per optimizer step, all processes together
    micro_batch_size: int = 8
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    log_every: int = 10
    eval_every: int = 100  # steps between validation losses (when `validation` is set)
    gradient_checkpointing: bool = False
    lisa: LisaConfig = field(default_factory=lambda: LisaConfig(layers=0))


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (reweight and finetune); 0 = only on signals
    keep: int = 2  # complete checkpoints kept


@dataclass
class Recipe:
    model: str = ""  # a folder AutoModelForCausalLM loads (or a hub id on machines with a hub)
    tokenizer: str | None = None  # defaults to `model`
    output_dir: str = ""
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    trust_remote_code: bool = False  # run modelling code shipped inside the model folder
    deepspeed: str | None = None  # a DeepSpeed config (JSON): train u, w / the model with DeepSpeed ZeRO
    data: DataConfig = field(default_factory=DataConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, collecting problems instead of stopping at the first.


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return it converted, or record a problem."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, problems)
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping of name: value, got {_describe(value)}")
            return {}
        return {str(k): _coerce(v, val_tp, f"{key}.{k}", problems) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{key}: expected true or false, got {_describe(value)}")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"{key}: expected an integer, got {_describe(value)}")
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads `1e-5` (no dot) as a string; accept any plain number written that way.
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{key}: expected a number, got {_describe(value)}")
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{key}: expected text, got {_describe(value)}")
    else:  # pragma: no cover - schema error, not user error
        raise TypeError(f"unsupported config type {tp} at {key}")
    return None


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "recipe"
        problems.append(f"{where}: expected a mapping of keys, got {_describe(data)}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
            problems.append(f"unknown key '{dotted}'{hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{dotted}.", problems)
        else:
            coerced = _coerce(value, tp, dotted, problems)
            if coerced is not None or value is None:
                kwargs[key] = coerced
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Overrides and paths.


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=3` -> ("a.b", 3); values are YAML scalars (`3`, `1e-5`, `true`, `null`, `text`)."""
    parsed, problems = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override '{item}': expected KEY=VALUE, e.g. reweight.steps=50")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    if problems:
        raise InputError(problems)
    return parsed


def _apply_override(tree: dict[str, Any], dotted: str, value: Any, problems: list[str]) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            problems.append(f"override '{dotted}': '{'.'.join(parts[: i + 1])}' is not a section")
            return
        node = child
    node[parts[-1]] = value


def _resolve(path: str | None, base: Path) -> str | None:
    if path is None or path == "":
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve_model(path: str, base: Path) -> str:
    """A local folder resolves against the recipe folder; `org/name` that is not a local folder stays a hub id."""
    if not path:
        return path
    local = Path(_resolve(path, base))  # type: ignore[arg-type]
    looks_like_hub_id = not path.startswith((".", "/", "~")) and path.count("/") == 1
    return path if (looks_like_hub_id and not local.exists()) else str(local)


PATH_KEYS = ("model", "tokenizer", "output_dir", "deepspeed", "data.validation", "data.cache_dir", "finetune.data",
             "finetune.weights", "finetune.validation")


def _resolve_override(key: str, value: Any) -> Any:
    """A path given on the command line is relative to the current directory, as in any shell command."""
    cwd = Path.cwd()
    if key in ("model", "tokenizer") and isinstance(value, str):
        return _resolve_model(value, cwd)
    if (key in PATH_KEYS or key.startswith("data.sources.")) and isinstance(value, str):
        return _resolve(value, cwd)
    if key == "data.sources" and isinstance(value, dict):
        return {k: _resolve(v, cwd) if isinstance(v, str) else v for k, v in value.items()}
    return value


def resolve_paths(recipe: Recipe, base: Path) -> None:
    recipe.model = _resolve_model(recipe.model, base)
    if recipe.tokenizer:
        recipe.tokenizer = _resolve_model(recipe.tokenizer, base)
    recipe.output_dir = _resolve(recipe.output_dir, base) or ""
    recipe.deepspeed = _resolve(recipe.deepspeed, base)
    recipe.data.sources = {name: _resolve(p, base) or "" for name, p in recipe.data.sources.items()}
    recipe.data.validation = _resolve(recipe.data.validation, base)
    recipe.data.cache_dir = _resolve(recipe.data.cache_dir, base)
    recipe.finetune.data = _resolve(recipe.finetune.data, base)
    recipe.finetune.weights = _resolve(recipe.finetune.weights, base)
    recipe.finetune.validation = _resolve(recipe.finetune.validation, base)


# ---------------------------------------------------------------------------------------------------------------
# Values that parse but make no sense.


def _check_ranges(recipe: Recipe) -> list[str]:
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(bool(recipe.model), "model: required (a model folder AutoModelForCausalLM can load)")
    need(bool(recipe.output_dir), "output_dir: required (where outputs are written)")
    need(recipe.precision in PRECISIONS, f"precision: must be one of {', '.join(PRECISIONS)}, got {recipe.precision!r}")
    need(recipe.seed >= 0, f"seed: must be >= 0, got {recipe.seed}")
    need(recipe.data.max_length >= 8, f"data.max_length: must be >= 8 tokens, got {recipe.data.max_length}")
    for name in recipe.data.sources:
        need(bool(name.strip()), "data.sources: a source has an empty name")

    rw = recipe.reweight
    need(rw.steps >= 1, f"reweight.steps: must be >= 1, got {rw.steps}")
    need(rw.alpha > 0, f"reweight.alpha: must be > 0, got {rw.alpha}")
    for key in ("lr_u", "lr_w", "lr_lambda"):
        value = getattr(rw, key)
        need(0 < value < 10, f"reweight.{key}: must be in (0, 10), got {value}")
    for section, cfg in (("reweight", rw), ("finetune", recipe.finetune)):
        need(cfg.batch_size >= 1, f"{section}.batch_size: must be >= 1, got {cfg.batch_size}")
        need(cfg.micro_batch_size >= 1, f"{section}.micro_batch_size: must be >= 1, got {cfg.micro_batch_size}")
        need(0 <= cfg.warmup_ratio < 1, f"{section}.warmup_ratio: must be in [0, 1), got {cfg.warmup_ratio}")
        need(cfg.weight_decay >= 0, f"{section}.weight_decay: must be >= 0, got {cfg.weight_decay}")
        need(cfg.max_grad_norm is None or cfg.max_grad_norm > 0,
             f"{section}.max_grad_norm: must be > 0 or null, got {cfg.max_grad_norm}")
        need(cfg.log_every >= 1, f"{section}.log_every: must be >= 1, got {cfg.log_every}")
        need(cfg.lisa.layers >= 0, f"{section}.lisa.layers: must be >= 0 (0 = all blocks), got {cfg.lisa.layers}")
        need(cfg.lisa.interval >= 1, f"{section}.lisa.interval: must be >= 1, got {cfg.lisa.interval}")
    need(rw.val_batch_size >= 1, f"reweight.val_batch_size: must be >= 1, got {rw.val_batch_size}")
    ft = recipe.finetune
    need(ft.epochs > 0, f"finetune.epochs: must be > 0, got {ft.epochs}")
    need(0 < ft.lr < 10, f"finetune.lr: must be in (0, 10), got {ft.lr}")
    need(ft.eval_every >= 1, f"finetune.eval_every: must be >= 1, got {ft.eval_every}")
    need(recipe.checkpoint.every >= 0, f"checkpoint.every: must be >= 0 (0 = never), got {recipe.checkpoint.every}")
    need(recipe.checkpoint.keep >= 1, f"checkpoint.keep: must be >= 1, got {recipe.checkpoint.keep}")
    return problems


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply overrides, resolve paths, and check values. Raises InputError listing all problems.

    Relative paths written in the recipe resolve against the recipe file's folder; relative paths given as
    command-line overrides resolve against the current directory.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: recipe file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise InputError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None
    tree = raw if raw is not None else {}
    if not isinstance(tree, dict):
        raise InputError(f"{path}: expected a mapping of recipe keys at the top level, got {type(tree).__name__}")
    problems: list[str] = []
    for key, value in parse_overrides(overrides or []):
        _apply_override(tree, key, _resolve_override(key, value), problems)
    recipe = _build(Recipe, tree, "", problems)
    problems += _check_ranges(recipe)
    if problems:
        raise InputError([f"{path}: {p}" for p in problems])
    resolve_paths(recipe, path.resolve().parent)
    return recipe


def recipe_from_dict(tree: dict[str, Any]) -> Recipe:
    """Rebuild a resolved recipe (e.g. the `config` stored in weights.json or a checkpoint)."""
    problems: list[str] = []
    recipe = _build(Recipe, tree, "", problems)
    if problems:
        raise InputError(problems)
    return recipe
