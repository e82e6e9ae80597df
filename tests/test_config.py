from pathlib import Path

import pytest
import yaml

from scalebio_cli.errors import InputError
from scalebio_cli.recipe.load import load_recipe, parse_overrides
from scalebio_cli.recipe.schema import Recipe, SourceSpec

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, tree: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


BASE = {"model": "m", "output_dir": "out", "data": {"sources": {"a": "a.jsonl", "b": "sub/b.json"},
                                                    "validation": "v.jsonl"}}


def test_defaults_yaml_and_overrides(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, {**BASE, "reweight": {"steps": 7, "lr_u": "1e-5"}}),
                         ["reweight.lisa.layers=3", "reweight.alpha=100", "seed=5", "reweight.lr_w=1e-5",
                          "reweight.max_grad_norm=null"])
    assert recipe.reweight.steps == 7
    assert recipe.reweight.lr_u == 1e-5  # YAML reads `1e-5` as text; numbers written that way are accepted
    assert recipe.reweight.lr_w == 1e-5
    assert recipe.reweight.lisa.layers == 3 and recipe.reweight.lisa.interval == 20
    assert recipe.reweight.alpha == 100.0 and isinstance(recipe.reweight.alpha, float)
    assert recipe.reweight.max_grad_norm is None
    assert recipe.seed == 5
    assert recipe.finetune.lisa.layers == 0  # finetune default: full-parameter


def test_relative_paths_resolve_against_recipe_folder(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    recipe = load_recipe(write(tmp_path, BASE), ["data.sources.c=/abs/c.jsonl"])
    assert recipe.model == str(tmp_path / "m")
    assert recipe.output_dir == str(tmp_path / "out")
    assert {n: s.path for n, s in recipe.data.sources.items()} == {
        "a": str(tmp_path / "a.jsonl"), "b": str(tmp_path / "sub" / "b.json"), "c": "/abs/c.jsonl"}
    assert recipe.data.validation == SourceSpec(str(tmp_path / "v.jsonl"))
    assert recipe.to_dict()["data"]["sources"]["a"] == str(tmp_path / "a.jsonl")  # recorded as v1 wrote it
    assert list(recipe.data.sources) == ["a", "b", "c"]  # recipe order is the source order


def test_override_paths_resolve_against_the_current_directory(tmp_path: Path, monkeypatch) -> None:
    recipe_dir, cwd = tmp_path / "recipes", tmp_path / "work"
    recipe_dir.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    recipe = load_recipe(write(recipe_dir, BASE), ["output_dir=runs/x", "data.sources.a=data/a.jsonl",
                                                   "finetune.data=s.jsonl"])
    assert recipe.output_dir == str(cwd / "runs" / "x")
    assert recipe.data.sources["a"].path == str(cwd / "data" / "a.jsonl")
    assert recipe.data.sources["b"].path == str(recipe_dir / "sub" / "b.json")  # from the file: recipe folder
    assert recipe.finetune.data == str(cwd / "s.jsonl")


def test_hub_id_stays_when_no_such_folder(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, {**BASE, "model": "meta-llama/Llama-3.1-8B"}))
    assert recipe.model == "meta-llama/Llama-3.1-8B"


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    bad = {**BASE, "reweight": {"stepz": 3, "alpha": "lots", "batch_size": 0, "lisa": {"layers": -1}},
           "unknown_top": 1}
    with pytest.raises(InputError) as info:
        load_recipe(write(tmp_path, bad), ["reweight.lr_u=fast"])
    text = str(info.value)
    assert "unknown key 'reweight.stepz' (did you mean 'reweight.steps'?)" in text
    assert "unknown key 'unknown_top'" in text
    assert "reweight.alpha: expected a number, got 'lots'" in text
    assert "reweight.lr_u: expected a number" in text
    assert "reweight.batch_size: must be >= 1" in text
    assert "reweight.lisa.layers: must be >= 0" in text
    assert all(p.startswith(str(tmp_path / "r.yaml")) for p in info.value.problems)  # each names the file


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "expected a mapping of recipe keys"),
    ("model: [unclosed", "not valid YAML"),
    ("data: 3\nmodel: m\noutput_dir: o", "data: expected a mapping"),
    ("model: m\noutput_dir: o\nreweight:\n  steps: true", "reweight.steps: expected an integer, got True"),
    ("output_dir: o", "model: required"),
    ("model: m\noutput_dir: o\nreweight:\n  lambda_schedule: linear",
     "reweight.lambda_schedule: must be one of cosine, constant, got 'linear'"),
])
def test_malformed_recipes(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message.replace("[", r"\[")):
        load_recipe(path)


def test_bad_override_syntax() -> None:
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        parse_overrides(["reweight.steps"])
    assert parse_overrides(["a.b=1e-5", "c=true", "d=null", "e=text"]) == [
        ("a.b", "1e-5"), ("c", True), ("d", None), ("e", "text")]


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_says_how_to_run_it(path: Path) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "scalebio" in first and " reweight --config " in first and path.name in first
