"""Every shipped recipe starts: `scalebio reweight --config recipes/X.yaml` with only the model and the data swapped
for tiny local ones (same architecture family, built here) and the sizes cut to one step, runs its first step and
writes its weights. Everything else is the recipe's own: precision, its DeepSpeed file (offload included), LoRA,
LISA, gradient checkpointing, chat template, schedules. A recipe that cannot start fails here, not on a GPU node.

One process (a one-rank group for DeepSpeed), CPU; two of them slow-marked (SLOW_STARTS), but every recipe passes the
checks that run before the model loads in `make test`. DeepSpeed recipes run in a subprocess each (DeepSpeed keeps
process-wide state); the offload recipe steps with DeepSpeed's CPU Adam, compiled on a machine's first run
(~2 min, then cached in .cache/torch_extensions) and loaded in seconds after that.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, invoke, run_cli

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
# the model a recipe names -> the tiny architecture of its family (a new family must be added here, or the test
# below fails saying so)
FAMILIES = {r"qwen": "qwen2", r"llama|smollm": "llama", r"demo/model|path/to/model": "llama"}


def family(model: str) -> str:
    for pattern, arch in FAMILIES.items():
        if re.search(pattern, model, re.IGNORECASE):
            return arch
    raise AssertionError(f"no tiny architecture for the model {model!r}: add its family to FAMILIES")


@pytest.fixture(scope="module")
def tiny_models(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny model folder per architecture family the recipes use (4 blocks: every recipe's LISA fits)."""
    from scalebio_cli.tiny import corpus_texts, save_tiny_model

    root = tmp_path_factory.mktemp("families")
    texts = corpus_texts(sorted((demo / "data").glob("*.jsonl")))
    return {arch: save_tiny_model(root / arch, texts, arch=arch, layers=4, hidden=32)
            for arch in sorted(set(FAMILIES.values()))}


def start_overrides(recipe: Path, demo: Path, tiny: dict[str, Path], out: Path) -> list[str]:
    """The recipe's model and data replaced by tiny local ones, one step of small batches; nothing else changed."""
    data = demo / "data"
    sources = json.dumps({"clean": str(data / "clean.jsonl"), "noisy": str(data / "noisy.json")})
    model = yaml.safe_load(recipe.read_text())["model"]
    return [f"model={tiny[family(model)]}", f"output_dir={out}", f"data.sources={sources}",
            f"data.validation={data / 'val.jsonl'}", "data.max_length=256", "reweight.steps=1",
            "reweight.batch_size=4", "reweight.val_batch_size=2", "reweight.micro_batch_size=2",
            "reweight.log_every=1", "reweight.lambda_delay=0"]


def test_every_recipe_names_a_known_family() -> None:
    assert RECIPES
    for recipe in RECIPES:
        family(yaml.safe_load(recipe.read_text())["model"])


def _deepspeed(recipe: Path) -> bool:
    return bool(yaml.safe_load(recipe.read_text()).get("deepspeed"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_passes_preflight_on_a_tiny_model(recipe: Path, demo: Path, tiny_models,
                                                               tmp_path: Path) -> None:
    """Every check that runs before a model loads (its DeepSpeed file by DeepSpeed's own validation included)."""
    from scalebio_cli.recipe.load import load_recipe
    from scalebio_cli.stages.reweight_check import check as check_reweight

    check_reweight(load_recipe(recipe, start_overrides(recipe, demo, tiny_models, tmp_path / "run")), recipe)


# The two DeepSpeed recipes without offload are slow-marked (~35 s of CPU each): the preflight test above covers
# their files, tests/test_zero.py and tests/test_zero_lora.py their engines; the offload recipe, the one DeepSpeed
# refused at its first step, runs in `make test`.
SLOW_STARTS = {"llama3-8b-math", "llama3-70b-lora"}


@pytest.mark.parametrize("recipe", [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.stem in SLOW_STARTS
                                                 else []) for p in RECIPES])
def test_every_shipped_recipe_starts_and_takes_its_first_step(recipe: Path, demo: Path, tiny_models,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    args = ["reweight", "--config", str(recipe), *start_overrides(recipe, demo, tiny_models, out)]
    if _deepspeed(recipe):
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                 str(ROOT / ".cache" / "torch_extensions")))
        result = run_cli(*args)
    else:
        result = invoke(*args)
    assert result.returncode == 0, result.stderr[-4000:]
    weights = json.loads((out / "weights.json").read_text())
    assert weights["steps"] == 1 and set(weights["weights"]) == {"clean", "noisy"}
