"""`scalebio reweight`'s up-front checks (before torch loads; the pieces shared by every stage are
recipe/preflight.py's): at least two sources and a validation set, batch sizes that hold every source and every
validation set and divide over the processes, the model, outputs, DeepSpeed file, LoRA, trackers and chat template.
"""

from __future__ import annotations

from pathlib import Path

from scalebio_cli.recipe import model_checks, preflight
from scalebio_cli.recipe.schema import Recipe
from scalebio_cli.train import process
from scalebio_cli.train.deepspeed_config import deepspeed_problems


def check(recipe: Recipe, where: str | Path = "recipe") -> None:
    data, rw = recipe.data, recipe.reweight
    expanded, data_problems = preflight.recipe_source_problems(recipe, validation=True)
    problems = []
    num_sources = len(expanded) if expanded or not data.sources else len(data.sources)
    if num_sources < 2:
        problems.append(f"data.sources: reweight needs at least 2 sources, got {num_sources}")
    if not data.validation:
        problems.append("data.validation: reweight needs a validation file (what the model should become good at)")
    if rw.batch_composition == "balanced" and rw.batch_size < num_sources:
        problems.append(f"reweight.batch_size: {rw.batch_size} is less than the {num_sources} sources; "
                        "every source must appear in every batch")
    num_val = len(recipe.validation_sets())
    if rw.val_batch_size < num_val:
        problems.append(f"reweight.val_batch_size: {rw.val_batch_size} is less than the {num_val} validation sets; "
                        "every set must appear in every step")
    for key in ("batch_size", "val_batch_size"):
        if getattr(rw, key) % process.world_size():
            problems.append(f"reweight.{key}: {getattr(rw, key)} does not divide over {process.world_size()} processes")
    problems += model_checks.model_problems(recipe, "reweight") + preflight.output_dir_problems(recipe.output_dir)
    problems += preflight.run_products_problems(recipe, "reweight")
    problems += deepspeed_problems(recipe.deepspeed, recipe, "reweight", process.world_size())
    problems += model_checks.lora_problems(recipe, "reweight")
    problems += preflight.tracking_problems(recipe.report_to)
    problems += preflight.chat_template_problems("data.chat_template", data.chat_template)
    preflight.raise_problems(problems + data_problems, where)
