"""The `scalebio` command line: parse, load and check the recipe, call the stage. No training logic here.

Heavy libraries (torch, transformers) are imported inside the commands, so `--help` and bad-input errors are
instant. Exit status: 0 success, 2 bad usage / recipe / input data (message on stderr, no traceback), 1 anything
else.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from scalebio_cli import __version__
from scalebio_cli.errors import InputError

app = typer.Typer(
    name="scalebio",
    help="Learn how much of each training source to use (ScaleBiO data reweighting), then sample, fine-tune "
    "and evaluate with those weights.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

T = TypeVar("T")

OVERRIDES_HELP = "Recipe overrides KEY=VALUE by dotted path, e.g. reweight.steps=50 output_dir=/tmp/run."
ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Recipe YAML file.", show_default=False)]
OverridesArg = Annotated[list[str] | None, typer.Argument(help=OVERRIDES_HELP, show_default=False)]


def _fail(problems: list[str]) -> None:
    from scalebio_cli.console import console

    for problem in problems:
        console.print(f"[bold red]error:[/] {problem}", markup=True, soft_wrap=True, highlight=False)


def guarded(fn: Callable[[], T]) -> T:
    """Run a command body, turning InputError into exit status 2 with its message (no traceback)."""
    try:
        return fn()
    except InputError as exc:
        _fail(exc.problems)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"scalebio {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass


@app.command()
def reweight(config: ConfigOption, overrides: OverridesArg = None) -> None:
    """Learn sampling weights over data.sources with ScaleBiO; writes OUTPUT_DIR/weights.json.

    Also writes metrics.jsonl (per log step: losses, per-source losses of u and w, weights, learning rates,
    tokens/s) and weights.png. Prints the weights file's path on stdout.
    """

    def body() -> Any:
        from scalebio_cli.config import load_recipe
        from scalebio_cli.validate import check_reweight

        recipe = load_recipe(config, overrides)
        check_reweight(recipe, config)
        from scalebio_cli import reweight as stage  # torch and transformers load only now

        return stage.run(recipe)

    _print_result(guarded(body))


def _print_result(path: Path) -> None:
    """The output path goes to stdout (for pipes), once, from the main process."""
    if os.environ.get("RANK", "0") == "0":
        typer.echo(str(path))


def main() -> None:
    # Typer's own usage errors (unknown option, missing --config) already exit with status 2.
    app(prog_name="scalebio")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
