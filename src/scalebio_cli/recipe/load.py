"""Reading a recipe: YAML, dotted `KEY=VALUE` overrides, relative paths, range checks, all problems at once.

A recipe YAML overrides the schema's defaults (schema.py), command-line `a.b=value` overrides the YAML, relative
paths are resolved against the recipe file's folder, and anything unknown or out of range is an `InputError`
naming the key. Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
import unicodedata
from pathlib import Path
from typing import Any

import yaml

from scalebio_cli.errors import InputError
from scalebio_cli.files import did_you_mean
from scalebio_cli.recipe.schema import (
    SPEC_FIELDS,
    TRACKERS,
    PathKind,
    Recipe,
    SourceSpec,
    path_fields,
    value_problems,
)


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


# ---------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, collecting problems instead of stopping at the first.


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


# What consumes the integers: numpy arrays and torch tensors of int64 (steps, sizes, cursors), and the seeding of
# numpy's legacy generator and of Python's `random`-compatible streams, which take 32-bit seeds.
INT64_MAX = 2**63 - 1


def fold_name(name: str) -> str:
    """The form under which two names are the same to a case-insensitive, normalising file system (macOS, Windows)
    or to a reader: Unicode NFKC (`ﬁ` = `fi`, full-width digits = ASCII digits) and case folded."""
    return unicodedata.normalize("NFKC", name).casefold()


def name_clashes(key: str, names: list[Any]) -> list[str]:
    """Problems for names of one mapping that are one name once typed as text (`1` and `'1'`) or folded."""
    problems: list[str] = []
    seen: dict[str, Any] = {}
    for name in names:
        folded = fold_name(str(name))
        if folded in seen:
            other = seen[folded]
            how = ("are both the name" if str(other) == str(name)
                   else "differ only in case or Unicode form, which file systems and readers fold into")
            problems.append(f"{key}: the names {_describe(other)} and {_describe(name)} {how} {str(name)!r}; "
                            "rename one (names must stay distinct as text, whatever the case)")
        else:
            seen[folded] = name
    return problems


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return it converted, or record a problem."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # data.validation: one set (a path, or a mapping with `path`) or several named sets
            named = isinstance(value, dict) and "path" not in value
            return _coerce(value, next(a for a in inner if (typing.get_origin(a) is dict) == named), key, problems)
        return _coerce(value, inner[0], key, problems)
    if tp is SourceSpec:
        return _source_spec(value, key, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # `report_to: tensorboard` (or the override report_to=tensorboard) means one item
            value = [value]
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {_describe(value)}")
            return []
        return [_coerce(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping of name: value, got {_describe(value)}")
            return {}
        clashes = name_clashes(key, list(value))
        if clashes:  # `str(k)` below would silently keep only the last of two such names
            problems.extend(clashes)
            return {}
        return {str(k): _coerce(v, val_tp, f"{key}.{k}", problems) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{key}: expected true or false, got {_describe(value)}")
    elif tp is int:
        number = value if isinstance(value, int) and not isinstance(value, bool) else None
        if isinstance(value, float) and value.is_integer():
            number = int(value)
        if number is None:
            problems.append(f"{key}: expected an integer, got {_describe(value)}")
        elif abs(number) > INT64_MAX:  # would overflow the int64 arrays and tensors that hold it
            problems.append(f"{key}: {number:.3g} is too large (at most {INT64_MAX:,})")
        else:
            return number
    elif tp is float:
        number = _float(value)
        if number is None:
            problems.append(f"{key}: expected a number, got {_describe(value)}")
        elif not math.isfinite(number):  # `.inf`, `.nan`, `1e999`: pass every `x > 0` style check, poison training
            problems.append(f"{key}: must be a finite number, got {value!r}")
        else:
            return number
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{key}: expected text, got {_describe(value)}")
    else:  # pragma: no cover - schema error, not user error
        raise TypeError(f"unsupported config type {tp} at {key}")
    return None


_SPEC_KEYS = [f.name for f in dataclasses.fields(SourceSpec)]


def _source_spec(value: Any, key: str, problems: list[str]) -> SourceSpec | None:
    """A source or validation set: a path, or a mapping of SourceSpec's keys (each checked, named by its key)."""
    if isinstance(value, str):
        return SourceSpec(value)
    if not isinstance(value, dict):
        problems.append(f"{key}: expected a path or a mapping with `path` (and name, split, columns, max_samples, "
                        f"split_by), got {_describe(value)}")
        return None
    before = len(problems)
    for k in value:
        if k not in _SPEC_KEYS:
            close = difflib.get_close_matches(str(k), _SPEC_KEYS, n=1)
            hint = f" (did you mean '{key}.{close[0]}'?)" if close else f" (known keys: {', '.join(_SPEC_KEYS)})"
            problems.append(f"unknown key '{key}.{k}'{hint}")
    if not isinstance(value.get("path"), str) or not value["path"]:
        problems.append(f"{key}.path: required (a file, folder, glob or Hub dataset id), got "
                        f"{_describe(value.get('path'))}")
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(SourceSpec)
    for k in _SPEC_KEYS:
        if k in value and value[k] is not None:
            kwargs[k] = _coerce(value[k], hints[k], f"{key}.{k}", problems)
    for fld in kwargs.get("columns") or {}:
        if fld not in SPEC_FIELDS:
            problems.append(f"{key}.columns.{fld}: not a record field; map columns onto {', '.join(SPEC_FIELDS)}")
    if isinstance(kwargs.get("max_samples"), int) and kwargs["max_samples"] < 1:
        problems.append(f"{key}.max_samples: must be >= 1 (or null for all records), got {kwargs['max_samples']}")
    if isinstance(kwargs.get("weight"), float) and not kwargs["weight"] > 0:
        problems.append(f"{key}.weight: must be > 0, got {kwargs['weight']}")
    return SourceSpec(**kwargs) if len(problems) == before else None


def _float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float range
            return math.inf
    if isinstance(value, str):
        # PyYAML reads `1e-5` (no dot) as a string; accept any plain number written that way.
        try:
            return float(value)
        except ValueError:
            return None
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
            before = len(problems)
            coerced = _coerce(value, tp, dotted, problems)
            if len(problems) == before:  # a refused value keeps the default: `seed: null` must not reach the checks
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
        if isinstance(child, str) and dotted.startswith(("data.sources.", "data.validation", "finetune.validation")) \
                and i >= 1:
            child = node[part] = {"path": child}  # data.sources.NAME.max_samples=9 on a source written as a path
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


def looks_like_hub_id(path: str) -> bool:
    """`org/name`, not written as a path: a model (or dataset) on a hub, unless a local folder has that name."""
    return not path.startswith((".", "/", "~")) and path.count("/") == 1


def _resolve_model(path: str | None, base: Path) -> str | None:
    """A local folder resolves against `base`; `org/name` that is not a local folder stays a hub id."""
    if not path:
        return path
    local = Path(_resolve(path, base))  # type: ignore[arg-type]
    return path if (looks_like_hub_id(path) and not local.exists()) else str(local)


DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".gz", ".zst", ".bz2", ".xz")


def looks_like_dataset_id(path: str) -> bool:
    """`org/name` that is neither a glob nor a data file's name: a Hub dataset, unless a local path has that name."""
    return looks_like_hub_id(path) and not any(c in path for c in "*?[") and not path.endswith(DATA_SUFFIXES)


def _resolve_data_path(path: str, base: Path) -> str:
    local = _resolve(path, base) or path
    return path if (looks_like_dataset_id(path) and not Path(local).exists()) else local


def _resolve_data(spec: SourceSpec, base: Path) -> SourceSpec:
    """A data path resolves against `base` (globs too); `org/name` that is not a local path stays a Hub id."""
    return dataclasses.replace(spec, path=_resolve_data_path(spec.path, base))


def _resolve_kind(kind: PathKind, value: Any, base: Path) -> Any:
    if isinstance(value, SourceSpec):
        return _resolve_data(value, base)
    if kind == "model" and isinstance(value, str):
        return _resolve_model(value, base)
    if kind == "file" and isinstance(value, str):
        return _resolve(value, base)
    if kind in ("files", "file") and isinstance(value, dict):
        return {k: _resolve_kind(kind, v, base) if isinstance(v, SourceSpec) else
                (_resolve(v, base) if isinstance(v, str) else v) for k, v in value.items()}
    return value


def _resolve_override(key: str, value: Any) -> Any:
    """A path given on the command line is relative to the current directory, as in any shell command."""
    kinds = path_fields()
    if key in ("data.validation", "finetune.validation") and isinstance(value, str):
        return _resolve_data_path(value, Path.cwd())
    if key in kinds:
        return _resolve_kind(kinds[key], value, Path.cwd())
    parts = key.split(".")
    data_path = key.startswith(("data.sources.", "data.validation.", "finetune.validation.")) and isinstance(
        value, str) and (
        parts[-1] == "path" or (len(parts) == 3 and not (parts[1] == "validation" and parts[2] in _SPEC_KEYS)))
    if data_path:  # data.sources.NAME=FILE, data.sources.NAME.path=FILE, data.validation.NAME=FILE
        return _resolve_data_path(value, Path.cwd())
    return value


def _get(recipe: Any, dotted: str) -> tuple[Any, str]:
    *parents, leaf = dotted.split(".")
    for part in parents:
        recipe = getattr(recipe, part)
    return recipe, leaf


def resolve_paths(recipe: Recipe, base: Path) -> None:
    """Make every path field of `recipe` absolute (relative ones are relative to `base`)."""
    for key, kind in path_fields().items():
        owner, leaf = _get(recipe, key)
        setattr(owner, leaf, _resolve_kind(kind, getattr(owner, leaf), base))


# ---------------------------------------------------------------------------------------------------------------
# Values that parse but make no sense.


def _check_ranges(recipe: Recipe) -> list[str]:
    """The values each field declares (schema's `check`), then what only several fields together decide."""
    problems: list[str] = value_problems(recipe)

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(bool(recipe.model), "model: required (a model folder AutoModelForCausalLM can load)")
    need(bool(recipe.output_dir), "output_dir: required (where outputs are written)")
    for name, spec in recipe.data.sources.items():
        need(bool(name.strip()), "data.sources: a source has an empty name")
        need(bool(spec.path), f"data.sources.{name}: the path is empty")
        need(spec.weight is None, f"data.sources.{name}.weight: only validation sets have a weight (sources get "
             "theirs from reweight)")
    for name, spec in recipe.validation_sets().items():
        key = f"data.validation.{name}" if recipe.named_validation else "data.validation"
        need(bool(name.strip()), "data.validation: a validation set has an empty name")
        need(spec.split_by is None, f"{key}.split_by: only sources are split by a column (name the validation "
             "sets one by one instead)")
    given = [spec.weight is not None for spec in recipe.validation_sets().values()]
    need(all(given) or not any(given), "data.validation: give every validation set a weight, or none (equal "
         "weights)")
    ft = recipe.finetune
    for name, spec in ft.validation_sets().items():
        key = f"finetune.validation.{name}" if ft.named_validation else "finetune.validation"
        need(bool(name.strip()), "finetune.validation: a validation set has an empty name")
        need(spec.split_by is None, f"{key}.split_by: only sources are split by a column (name the validation "
             "sets one by one instead)")
        need(spec.weight is None, f"{key}.weight: finetune reports each validation set's loss on its own, so a "
             "weight means nothing here; drop it")
    for name in recipe.report_to:
        need(name in TRACKERS, f"report_to: unknown tracker {name!r} (use {' and/or '.join(TRACKERS)})")
    need(len(set(recipe.report_to)) == len(recipe.report_to), "report_to: a tracker is named twice")

    rw = recipe.reweight
    for section, cfg in (("reweight", rw), ("finetune", recipe.finetune)):
        lora = cfg.lora
        need(bool(lora.target_modules) and all(str(m).strip() for m in lora.target_modules),
             f"{section}.lora.target_modules: needs module names (e.g. [q_proj, v_proj]) or all-linear, got "
             f"{lora.target_modules!r}")
    need(0 <= rw.delay < rw.steps, f"reweight.lambda_delay: must be in [0, reweight.steps), got {rw.lambda_delay}")
    need(1 <= rw.lambda_every <= rw.steps - rw.delay, "reweight.lambda_every: must be in [1, reweight.steps - "
         f"reweight.lambda_delay] (at least one lam step), got {rw.lambda_every}")
    return problems


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply overrides, resolve paths, and check values. Raises InputError listing all problems.

    Relative paths written in the recipe resolve against the recipe file's folder; relative paths given as
    command-line overrides resolve against the current directory.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: recipe file not found{did_you_mean(path)}")
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


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (what `recipe.yaml` in a run's folder holds): loads back to `recipe`."""
    return ("# the fully resolved recipe this run ran (after overrides; paths absolute)\n"
            + yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True))
