"""`scalebio finetune`'s up-front checks (before torch loads; the pieces shared by every stage are
recipe/preflight.py's): exactly one of finetune.data and finetune.weights, batch size over the processes, the model,
outputs, DeepSpeed file, LoRA, the data and validation sets, trackers, chat template, and a weights file's sources.
"""

from __future__ import annotations

from pathlib import Path

from scalebio_cli.data.read.sources import DataSource
from scalebio_cli.errors import InputError
from scalebio_cli.recipe import model_checks, preflight
from scalebio_cli.recipe.schema import Recipe
from scalebio_cli.train import process
from scalebio_cli.train.deepspeed_config import deepspeed_problems


def check(recipe: Recipe, where: str | Path = "recipe") -> None:
    ft = recipe.finetune
    problems = []
    if bool(ft.data) == bool(ft.weights):
        problems.append("finetune: set exactly one of finetune.data (a data file) and finetune.weights (a "
                        "weights.json to mix data.sources by)")
    if ft.batch_size % process.world_size():
        problems.append(f"finetune.batch_size: {ft.batch_size} does not divide over {process.world_size()} processes")
    problems += model_checks.model_problems(recipe, "finetune") + preflight.output_dir_problems(recipe.output_dir)
    problems += preflight.run_products_problems(recipe, "finetune")
    problems += preflight.other_stage_problems(recipe.output_dir, "finetune")
    problems += deepspeed_problems(recipe.deepspeed, recipe, "finetune", process.world_size())
    problems += model_checks.lora_problems(recipe, "finetune")
    problems += preflight.data_file_problems("finetune.data", ft.data)
    for name, spec in ft.validation_sets().items():  # each set read as data.validation's are
        key = f"finetune.validation.{name}" if ft.named_validation else "finetune.validation"
        problems += preflight.source_problems(DataSource(key, spec, name, None, recipe.seed))
    problems += preflight.tracking_problems(recipe.report_to)
    problems += preflight.chat_template_problems("data.chat_template", recipe.data.chat_template)
    if ft.weights:
        from scalebio_cli.results import weights_file

        try:
            weights, doc = weights_file.load(ft.weights)
        except InputError as exc:
            problems += [f"finetune.weights: {p}" for p in exc.problems]
        else:
            sources, found = (preflight.recipe_source_problems(recipe, validation=False) if recipe.data.sources
                              else (weights_file.doc_sources(doc, list(weights)), []))
            problems += found
            if set(sources) != set(weights) and not found:
                problems.append(f"finetune.weights: its sources ({', '.join(weights)}) are not data.sources "
                                f"({', '.join(sources)})")
            if not recipe.data.sources:
                for source in sources.values():
                    problems += preflight.source_problems(source)
    preflight.raise_problems(problems, where)
