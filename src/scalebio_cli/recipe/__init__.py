"""The recipe: its schema (typed dataclasses, field metadata), how a YAML file becomes one, and the up-front checks
of what it names. Nothing here imports torch."""

from scalebio_cli.recipe.load import dump_recipe, load_recipe
from scalebio_cli.recipe.schema import Recipe

__all__ = ["Recipe", "dump_recipe", "load_recipe"]
