"""A recipe's sources and validation sets as DataSources: `split_by` expanded into one source per value (named
NAME/VALUE), every problem of the recipe's sources at once.
"""

from __future__ import annotations

from typing import Any

from scalebio_cli.data.read.sources import DataSource, open_table, value_name
from scalebio_cli.errors import InputError
from scalebio_cli.recipe.schema import SourceSpec


def expand(name: str, spec: SourceSpec, seed: int, key: str | None = None) -> list[DataSource]:
    """One source, or one per distinct value of `split_by` (named NAME/VALUE, sorted)."""
    key = key or f"data.sources.{name}"
    if spec.split_by is None:
        return [DataSource(key, spec, name, None, seed)]
    table = open_table(DataSource(key, spec, name))
    present = table.column_names()
    if spec.split_by not in present:
        raise InputError(f"{key}.split_by: column '{spec.split_by}' is not in {spec.path}; its columns: "
                         f"{', '.join(present)}")
    values = sorted({value_name(v) for v in table.column(spec.split_by)})
    if len(values) < 2:
        raise InputError(f"{key}.split_by: column '{spec.split_by}' of {spec.path} has only "
                         f"{'the value ' + repr(values[0]) if values else 'no values'}; split_by needs at least two "
                         "(or drop split_by to use the source whole)")
    return [DataSource(f"data.sources.{name}/{v}", spec, f"{name}/{v}", v, seed) for v in values]


def expand_all(specs: dict[str, SourceSpec], seed: int) -> dict[str, DataSource]:
    """Every source of a recipe by name, split_by expanded; all problems at once."""
    out: dict[str, DataSource] = {}
    problems: list[str] = []
    for name, spec in specs.items():
        try:
            for source in expand(name, spec, seed):
                out[source.name] = source
        except InputError as exc:
            problems += exc.problems
    if problems:
        raise InputError(problems)
    return out


def recipe_sources(recipe: Any) -> dict[str, DataSource]:
    """A recipe's sources by name (split_by expanded)."""
    return expand_all(recipe.data.sources, recipe.seed)


def validation_sources(recipe: Any) -> dict[str, DataSource]:
    """A recipe's validation sets by name (`validation` for one set written without a name)."""
    named = recipe.named_validation
    return {n: DataSource(f"data.validation.{n}" if named else "data.validation", spec, n, None, recipe.seed)
            for n, spec in recipe.validation_sets().items()}
