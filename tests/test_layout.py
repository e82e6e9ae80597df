"""The architecture holds: recipe fields classified, stages independent, no import cycle, no long functions."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from scalebio_cli.recipe.load import dump_recipe, load_recipe
from scalebio_cli.recipe.schema import STAGES, Recipe, leaf_fields, path_fields, result_keys

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "scalebio_cli"
MAX_FUNCTION_LINES = 80


def test_every_recipe_field_is_classified() -> None:
    """A new recipe key must say whether it changes a result and whether it is a path, or --resume could silently
    accept a change that alters the result."""
    for key, f, _ in leaf_fields():
        assert "affects" in f.metadata, f"{key}: declare it with setting(..., affects=...)"
        assert set(f.metadata["affects"]) <= set(STAGES), key
        assert f.metadata.get("path") in (None, "file", "model", "files"), key


def test_result_keys_are_derived_per_stage() -> None:
    reweight, finetune = result_keys("reweight"), result_keys("finetune")
    assert {"model", "seed", "data.sources", "data.validation", "reweight.alpha", "reweight.lisa.layers"} <= set(
        reweight)
    assert not any(k.startswith("finetune.") for k in reweight)
    assert {"model", "seed", "finetune.lr", "finetune.lisa.layers", "data.max_length"} <= set(finetune)
    assert not any(k.startswith("reweight.") for k in finetune)
    for neutral in ("reweight.log_every", "reweight.micro_batch_size", "output_dir", "checkpoint.every"):
        assert neutral not in reweight
    assert path_fields()["model"] == "model" and path_fields()["data.sources"] == "files"


def test_a_new_field_is_picked_up_without_editing_any_list() -> None:
    from scalebio_cli.recipe import schema

    @dataclasses.dataclass
    class Extended(schema.ReweightConfig):
        new_knob: float = schema.setting(1.0, affects=schema.RW)

    keys = [k for k, f, _ in leaf_fields(Extended, "reweight.", "reweight") if "reweight" in f.metadata["affects"]]
    assert "reweight.new_knob" in keys


def test_recipe_yaml_round_trips(tmp_path: Path) -> None:
    tree = {"model": "m", "output_dir": "out", "data": {"sources": {"a": "a.jsonl", "b": "b.jsonl"}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tree))
    recipe = load_recipe(tmp_path / "r.yaml", ["reweight.steps=7"])
    (tmp_path / "again.yaml").write_text(dump_recipe(recipe))
    assert load_recipe(tmp_path / "again.yaml") == recipe
    assert isinstance(recipe, Recipe)


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scalebio_cli"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("scalebio_cli"))
    return {m for m in found if m in known and m != name}


def test_stages_never_import_each_other_and_there_is_no_cycle() -> None:
    modules = _modules()
    graph = {name: _imports(name, tree, set(modules)) for name, tree in modules.items()}
    for name, deps in graph.items():
        if name.startswith("scalebio_cli.stages."):
            others = {d for d in deps if d.startswith("scalebio_cli.stages.")}
            assert not others, f"{name} imports the stage(s) {others}"
        if not name.startswith(("scalebio_cli.cli", "scalebio_cli.stages")):
            assert not {d for d in deps if d.startswith("scalebio_cli.stages")}, f"{name} imports a stage"

    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                pytest.fail(f"import cycle: {' -> '.join([*path, node, dep])}")
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_no_function_is_longer_than_80_lines() -> None:
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, long
