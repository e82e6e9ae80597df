"""compare's cells: the comparison, one (mix, seed) cell, and the content keys that decide reuse (results/reuse.py:
the sha256 of everything a cell read, and its resolved settings).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from scalebio_cli.comparing.mixes import Mix, draw_plan
from scalebio_cli.recipe import Recipe
from scalebio_cli.results import reuse

MATCH = ("records", "tokens")
_CONTENT_KEYS = ("model", "tokenizer", "data.sources", "finetune.data", "finetune.weights")  # hashed, not named


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
        _, _, named = draw_plan(recipe, mix)
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
