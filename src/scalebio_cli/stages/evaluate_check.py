"""`scalebio eval`'s up-front checks (before torch loads): something to measure, the model, the data files, the
precision, the chat template, and an output that is none of the inputs.
"""

from __future__ import annotations

from pathlib import Path

from scalebio_cli.errors import InputError
from scalebio_cli.recipe import model_checks, preflight
from scalebio_cli.recipe.schema import PRECISIONS


def check(model: Path, named: dict[str, str], output: Path | None, *, precision: str = "auto",
          chat_template: str | None = None, lm_eval: bool = False) -> None:
    """eval's inputs: something to measure, a loadable-looking model folder (or .gguf file), usable data files, a
    known precision, a valid chat template, and an output that is none of the inputs. All problems at once."""
    problems = [] if named or lm_eval else ["eval: give at least one --data NAME=FILE (or --lm-eval TASKS)"]
    if precision not in PRECISIONS:
        problems.append(f"--precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    problems += preflight.chat_template_problems("--chat-template", chat_template)
    if model.suffix != ".gguf" and not (model / "config.json").is_file():
        problems.append(f"--model {model}: not a model folder (no config.json)")
    else:
        problems += model_checks.model_folder_problems("--model", str(model))  # a .gguf file: checked as one
    for name, path in named.items():
        problems += preflight.data_file_problems(f"--data {name}", path)
    if output is not None:
        inputs = {f"--data {n}": p for n, p in named.items()} | preflight.model_files(str(model))
        problems += preflight.output_file_problems("--output", output, inputs)
    if problems:
        raise InputError(problems)
