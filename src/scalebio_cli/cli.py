"""The `scalebio` command line: parse, load and check the recipe, call the stage. No training logic here.

Heavy libraries (torch, transformers) are imported inside the commands, so `--help` and bad-input errors are
instant. Exit status: 0 success, 2 bad usage / recipe / input data (message on stderr, no traceback), 1 anything
else.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import typer.core

from scalebio_cli import __version__
from scalebio_cli.errors import InputError, TrainingStopped
from scalebio_cli.recipe.schema import DataConfig
from scalebio_cli.train import process

app = typer.Typer(
    name="scalebio",
    help="Learn how much of each training source to use (ScaleBiO data reweighting), then sample, fine-tune "
    "and evaluate with those weights.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: rich's option tables cut names at 80 columns (`--no-replaceme…`); click wraps the text
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

T = TypeVar("T")

OVERRIDES_HELP = "Recipe overrides KEY=VALUE by dotted path, e.g. reweight.steps=50 output_dir=/tmp/run."
ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Recipe YAML file.", show_default=False)]
OverridesArg = Annotated[list[str] | None, typer.Argument(help=OVERRIDES_HELP, show_default=False)]
ResumeOption = Annotated[str | None, typer.Option(
    "--resume", help="Continue from a checkpoint: `auto` (the latest complete one in output_dir; start fresh if "
                     "none) or a checkpoint folder.", show_default=False)]
ForceOption = Annotated[bool, typer.Option(
    "--force", help="Resume even if the recipe differs from the checkpoint's in keys that change the result; "
                    "without --resume, start over in an output_dir that holds another run (deleting its "
                    "checkpoints).")]


def recipe_key_hint(option: str, args: list[str], stage: str) -> str | None:
    """`did you mean reweight.steps=5 ?` for a flag that names a recipe key (`--steps 5`, `--lr=1e-5`), or None.

    Keys of the command's own section come first, then top-level keys, then the other sections'."""
    from scalebio_cli.recipe.schema import leaf_fields

    name = option.lstrip("-").replace("-", "_")
    if not name:
        return None
    keys = [key for key, _, _ in leaf_fields()]
    found = [k for k in keys if k == name or k.endswith("." + name)]
    if not found:
        return None
    found.sort(key=lambda k: (0 if k.startswith(stage + ".") else 1 if "." not in k else 2, k.count("."), k))
    value = "VALUE"
    for i, arg in enumerate(args):
        if arg.startswith(option + "="):
            value = arg.partition("=")[2]
        elif arg == option and i + 1 < len(args) and not args[i + 1].startswith("-"):
            value = args[i + 1]
    return " or ".join(f"{k}={value}" for k in found[:3])


class RecipeCommand(typer.core.TyperCommand):
    """A command whose unknown flags may be recipe keys written as flags: say the KEY=VALUE spelling."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        given = list(args)  # the parser consumes `args`
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:  # click's NoSuchOption: Typer >= 0.26 carries its own click, so matched by name
            if type(exc).__name__ != "NoSuchOption":
                raise
            hint = recipe_key_hint(getattr(exc, "option_name", ""), given, self.name or "")
            if hint is None:
                raise
            usage_error = next(c for c in type(exc).__mro__ if c.__name__ == "UsageError")
            raise usage_error(f"No such option {getattr(exc, 'option_name', '')}; did you mean {hint} ? (recipe "
                              "keys are given as KEY=VALUE)", ctx) from None


def _fail(problems: list[str]) -> None:
    from rich.markup import escape

    from scalebio_cli.console import console

    for problem in problems:  # problems quote user text (paths, `file.json[3]`, names): never read it as markup
        console.print(f"[bold red]error:[/] {escape(problem)}")


def guarded(fn: Callable[[], T]) -> T:
    """Run a command body, turning InputError into exit status 2 with its message (no traceback)."""
    try:
        return fn()
    except InputError as exc:
        _fail(exc.problems)
        raise typer.Exit(2) from None
    except TrainingStopped as exc:
        _fail([str(exc)])
        raise typer.Exit(exc.exit_code) from None  # 130 after a SIGINT (Ctrl-C), else 1
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


def _already_complete(recipe: Any, stage: str, resume: str | None) -> Path | None:
    """`--resume auto` on a finished run of this recipe: its result, at once (nothing is loaded or recomputed)."""
    if resume != "auto":
        return None
    from scalebio_cli.results import run_folder

    result = run_folder.finished_result(Path(recipe.output_dir), stage, recipe.to_dict())
    if result is not None and process.is_main():
        from rich.markup import escape

        from scalebio_cli.console import console

        console.print(f"[bold green]already complete:[/] {escape(str(result))} (this {stage} run finished; "
                      "nothing to resume)")
    return result


@app.command(cls=RecipeCommand)
def reweight(config: ConfigOption, overrides: OverridesArg = None, resume: ResumeOption = None,
             force: ForceOption = False) -> None:
    """Learn sampling weights over data.sources with ScaleBiO; writes OUTPUT_DIR/weights.json.

    Also writes metrics.jsonl (per log step: losses, per-source losses of u and w, weights, learning rates,
    tokens/s through u and w, s/step) and weights.png. Prints the weights file's path on stdout. With --resume auto,
    a finished run of the same recipe is not recomputed: its weights file is printed at once.
    """

    def body() -> Any:
        from scalebio_cli.recipe import load_recipe
        from scalebio_cli.stages.reweight_check import check as check_reweight

        recipe = load_recipe(config, overrides)
        done = _already_complete(recipe, "reweight", resume)
        if done is not None:
            return done
        check_reweight(recipe, config)
        from scalebio_cli.results import run_folder
        from scalebio_cli.stages import reweight as stage

        with run_folder.claim(recipe.output_dir, "reweight", resume, force, recipe.to_dict()):  # one run per folder
            result = stage.run(recipe, resume, force)
            run_folder.mark_finished(Path(recipe.output_dir), "reweight", result, recipe.to_dict())
            return result

    _print_result(guarded(body))


def _parse_named_files(items: list[str], option: str) -> dict[str, str]:
    from scalebio_cli.recipe.load import name_clashes

    named: dict[str, str] = {}
    problems: list[str] = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            problems.append(f"{option} {item!r}: expected NAME=FILE")
        elif name in named:
            problems.append(f"{option}: the name '{name}' is given twice")
        else:
            named[name] = str(Path(path).expanduser().resolve())
    problems += name_clashes(option, list(named))
    if problems:
        raise InputError(problems)
    return named


@app.command()
def sample(
    weights: Annotated[str, typer.Option(help="A weights.json from `scalebio reweight`, or `uniform`, or "
                                              "`proportional` (to source sizes; needs --sources or --config).",
                                         show_default=False)],
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=0, help="Records to draw in total.",
                                             show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .jsonl, or .parquet (the type follows "
                                                                 "the extension; a .manifest.json is written beside "
                                                                 "it).", show_default=False)],
    seed: Annotated[int, typer.Option(help="Seed of the draw and the shuffle.")] = 0,
    replacement: Annotated[bool, typer.Option("--replacement/--no-replacement",
                                              help="Allow a record to be drawn more than once.")] = False,
    averaged: Annotated[bool, typer.Option("--averaged", help="Use weights_averaged (mean over the second half "
                                                              "of the run) instead of the final weights.")] = False,
    allow_changed_sources: Annotated[bool, typer.Option(help="Sample even if a source file no longer matches the "
                                                             "sha256 recorded in the weights file.")] = False,
    sources: Annotated[list[str] | None, typer.Option("--sources", help="NAME=FILE, repeatable: the sources for "
                                                                        "uniform/proportional weights.")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="Take the sources for uniform/proportional weights from this recipe's data.sources.")
    ] = None,
    record_format: Annotated[str, typer.Option(
        "--format", help="original: each record unchanged plus \"source\"; messages: every record normalised to "
                         "{\"messages\": [...], \"source\": ...} (one schema for LLaMA-Factory, axolotl, TRL).")
    ] = "original",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file (and its manifest).")
                     ] = False,
    rank_by: Annotated[Path | None, typer.Option("--rank-by", help="A `select --scores` file: each source's quota "
                                                 "is its best-scored records instead of a random draw.",
                                                 show_default=False)] = None,
    min_weight: Annotated[float, typer.Option("--min-weight", min=0.0, max=1.0, help="Leave out every source "
                                              "(or group) whose weight is below this; the rest share N in "
                                              "proportion to their weights.")] = 0.0,
) -> None:
    """Draw N records from the sources in proportion to their weights; writes OUT.jsonl and OUT.manifest.json.

    Counts are round(N * weight) with largest-remainder rounding (they add up to N); each record is written
    unchanged plus a "source" field, shuffled with --seed. Prints the output path on stdout.
    """

    def body() -> Path:
        from scalebio_cli.results import run_folder
        from scalebio_cli.stages import sample as stage

        if record_format not in stage.FORMATS:
            raise InputError(f"--format: must be one of {', '.join(stage.FORMATS)}, got {record_format!r}")
        if weights in ("uniform", "proportional"):
            if config is not None:
                from scalebio_cli.data.read.expand import recipe_sources
                from scalebio_cli.recipe import load_recipe

                draw = stage.baseline_draw(weights, recipe_sources(load_recipe(config)), output,
                                           {"the recipe": str(config)})
            else:
                from scalebio_cli.data.read.sources import from_path

                named = _parse_named_files(sources or [], "--sources")
                draw = stage.baseline_draw(weights, {n: from_path(f"--sources {n}", p) for n, p in named.items()},
                                           output)
        elif sources or config:
            raise InputError("--sources/--config go with --weights uniform|proportional; a weights file names its "
                             "own sources")
        else:
            draw = stage.weights_file_draw(weights, output, allow_changed_sources, averaged)
        with run_folder.claim_output_file(output.resolve()):
            if output.exists() and not force:  # checked after the inputs: an output that is an input says so
                raise InputError(f"--output {output}: already exists; pass --force to replace it (and its "
                                 "manifest), or choose another file")
            stage.run(draw.probs, draw.sources, num_samples, output.resolve(), seed, replacement, draw.label,
                      draw.sizes, record_format, rank_by.resolve() if rank_by is not None else None,
                      min_weight=min_weight)
        return output

    _print_result(guarded(body))


@app.command()
def export(
    weights: Annotated[Path, typer.Argument(help="A weights.json from `scalebio reweight`.", show_default=False)],
    to: Annotated[list[str], typer.Option("--to", help="llamafactory, hf, axolotl, open-instruct, megatron or "
                                          "nemo; repeat it to export for several tools at once.",
                                          show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder to write (replaced as a whole); "
                                                "default: export-TARGET beside the weights file (the only choice "
                                                "with several --to).")] = None,
    averaged: Annotated[bool, typer.Option("--averaged", help="Use weights_averaged instead of the final "
                                                              "weights.")] = False,
    mix_strategy: Annotated[str, typer.Option(help="llamafactory: interleave_under (stop when the first source "
                                              "runs out), interleave_over, interleave_once or concat.")
                            ] = "interleave_under",
    num_samples: Annotated[int | None, typer.Option("--num-samples", "-n", min=1, help="open-instruct: records in "
                                                    "the mixture (default: the most that repeat no record).")
                           ] = None,
    tokenizer: Annotated[str | None, typer.Option(help="megatron: the tokenizer whose chat template renders the "
                                                  "text (default: the weights file's model).")] = None,
    seed: Annotated[int, typer.Option(help="open-instruct: seed of the order of the exported files.")] = 0,
    allow_changed_sources: Annotated[bool, typer.Option(help="Export even if a source file no longer matches the "
                                                             "sha256 recorded in the weights file.")] = False,
) -> None:
    """Write a folder the target tool trains from: the sources in one record schema plus the tool's mixing config,
    whose probabilities are the weights (same order). Prints the folder on stdout (one line per --to).
    """

    def body() -> list[Path]:
        from scalebio_cli.stages import export as stage

        opts = stage.Options(mix_strategy=mix_strategy, num_samples=num_samples, tokenizer=tokenizer, seed=seed)
        return stage.run_many(weights, to, output, averaged, allow_changed_sources, opts)

    for folder in guarded(body):
        _print_result(folder)


@app.command(cls=RecipeCommand)
def finetune(config: ConfigOption, overrides: OverridesArg = None, resume: ResumeOption = None,
             force: ForceOption = False) -> None:
    """Fine-tune `model` on finetune.data (or data.sources mixed by finetune.weights); writes a Hugging Face model
    folder to OUTPUT_DIR.

    Full-parameter, or LISA with finetune.lisa.layers > 0. Also writes metrics.jsonl (loss, lr, tokens/s, the loss
    per source when records carry `source`, and the loss of each finetune.validation set). Refuses an OUTPUT_DIR
    holding another stage's run, even with --force. Prints OUTPUT_DIR on stdout.
    """

    def body() -> Any:
        from scalebio_cli.recipe import load_recipe
        from scalebio_cli.stages.finetune_check import check as check_finetune

        recipe = load_recipe(config, overrides)
        done = _already_complete(recipe, "finetune", resume)
        if done is not None:
            return done
        check_finetune(recipe, config)
        from scalebio_cli.results import run_folder
        from scalebio_cli.stages import finetune as stage

        with run_folder.claim(recipe.output_dir, "finetune", resume, force, recipe.to_dict()):  # one run per folder
            result = stage.run(recipe, resume, force)
            run_folder.mark_finished(Path(recipe.output_dir), "finetune", result, recipe.to_dict())
            return result

    _print_result(guarded(body))


@app.command(name="eval")
def evaluate(
    model: Annotated[Path, typer.Option(help="A model folder (e.g. the output_dir of `scalebio finetune`), or a "
                                              ".gguf file.",
                                        show_default=False)],
    data: Annotated[list[str] | None, typer.Option(help="NAME=FILE, repeatable: data files to measure on.",
                                                   show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the results to this JSON file.")] = None,
    generate: Annotated[bool, typer.Option("--generate", help="Also greedy-generate answers and report exact-match "
                                           "accuracy on records with a checkable final answer (#### 42, \\boxed{}, "
                                           "a trailing number).")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Generation length limit.")] = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per forward pass.")] = 8,
    max_length: Annotated[int, typer.Option(min=8, help="Tokens per example (longer ones are truncated): use the "
                                            "recipe's data.max_length, so eval loss matches reweight's validation "
                                            "loss.")] = DataConfig().max_length,
    lm_eval: Annotated[str | None, typer.Option("--lm-eval", help="Comma-separated lm-evaluation-harness tasks: "
                                                "names, or paths to local task YAML files.")] = None,
    lm_eval_limit: Annotated[int | None, typer.Option(help="Examples per lm-eval task (for quick checks).")] = None,
    precision: Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), fp32 or bf16.")] = "auto",
    chat_template: Annotated[Path | None, typer.Option(help="A Jinja chat template that replaces the model's for "
                                                       "rendering every record (as the recipe's "
                                                       "data.chat_template).")] = None,
) -> None:
    """Mean response-token loss and perplexity of MODEL on each data file (and more, on request).

    Prints a table on stderr; with --output writes {"model": ..., "results": {NAME: {"loss", "perplexity",
    "num_examples", ...}}} and prints its path on stdout, without it prints that JSON on stdout.
    """

    def body() -> Any:
        from scalebio_cli.stages.evaluate_check import check as check_eval

        named = _parse_named_files(data or [], "--data")
        template = str(chat_template.resolve()) if chat_template else None
        check_eval(model, named, output, precision=precision, chat_template=template, lm_eval=bool(lm_eval))
        from scalebio_cli.console import console
        from scalebio_cli.stages import evaluate as stage

        tasks = [t.strip() for t in lm_eval.split(",") if t.strip()] if lm_eval else None
        doc = stage.run(str(model.resolve()), named, output=output.resolve() if output else None,
                        batch_size=batch_size, max_length=max_length, generate=generate,
                        max_new_tokens=max_new_tokens, lm_eval_tasks=tasks, lm_eval_limit=lm_eval_limit,
                        precision=precision, chat_template=template)
        console.print(stage.format_table(doc), soft_wrap=False)  # a table wraps its cells to the terminal
        for task, metrics in doc.get("lm_eval", {}).items():
            console.print(f"lm-eval {task}: " + ", ".join(f"{k} {v}" for k, v in metrics.items()), markup=False)
        return output if output is not None else doc

    result = guarded(body)
    if isinstance(result, Path):
        _print_result(result)
    elif result is not None and process.is_main():
        typer.echo(json.dumps(result, indent=2))  # no --output: the results themselves go to the pipe


@app.command(name="select")
def select_records(
    config: ConfigOption,
    method: Annotated[str, typer.Option(help="rho-loss (reducible holdout loss) or less (validation-gradient "
                                             "similarity): the paper's per-record baselines.", show_default=False)],
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", help="Records to keep in total (the "
                                             "highest-scoring over all sources).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .jsonl, or .parquet (a .manifest.json with "
                                         "every selected record's score is written beside it).", show_default=False)],
    overrides: OverridesArg = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the output's shuffle, LESS's warm-up subset and "
                                                  "projection (default: the recipe's seed).")] = None,
    record_format: Annotated[str, typer.Option("--format", help="original: each record unchanged plus \"source\"; "
                                               "messages: every record normalised to {\"messages\": [...]}.")
                             ] = "original",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file (and its manifest).")
                     ] = False,
    scores: Annotated[Path | None, typer.Option("--scores", help="Also write every pool record's score to this "
                                                "JSON-lines file (source, index, score), for `sample --rank-by`.",
                                                show_default=False)] = None,
) -> None:
    """Choose N records of data.sources for data.validation with RHO-loss or LESS; writes OUT as `sample` does.

    Settings under the recipe key `select` (select.rho_loss.*, select.less.*). The irreducible-loss model (RHO-loss)
    and the warm-up checkpoints and gradient scores (LESS) are kept in select.work_dir (default OUTPUT_DIR/select)
    and reused by a rerun with the same settings. Prints the output path on stdout.
    """

    def body() -> Path:
        from scalebio_cli.recipe import load_recipe
        from scalebio_cli.stages import select as stage

        recipe = load_recipe(config, overrides)
        out = output.resolve()
        scores_out = scores.resolve() if scores is not None else None
        stage.check(recipe, config, method, num_samples, out, record_format, force, scores_out)
        from scalebio_cli.results import run_folder

        with run_folder.claim_output_file(out):
            stage.run(recipe, method, num_samples, out, recipe.seed if seed is None else seed, record_format,
                      scores_out)
        return output

    _print_result(guarded(body))


@app.command(name="group")
def group_records(
    config: ConfigOption,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .jsonl, or .parquet: every record of "
                                         "data.sources plus \"group\": \"SOURCE/gNN\" (a .manifest.json with "
                                         "the groups, their sizes and example records is written beside it).",
                                         show_default=False)],
    overrides: OverridesArg = None,
    k: Annotated[str | None, typer.Option("--k", help="Number of clusters, or auto (the best silhouette score "
                                          "over group.k_sweep). Default: the recipe's group.k (auto).",
                                          show_default=False)] = None,
    record_format: Annotated[str, typer.Option("--format", help="original: each record unchanged plus \"group\"; "
                                               "messages: every record normalised to {\"messages\": [...]} (one "
                                               "schema, for sources read through a column map).")] = "original",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file (and its manifest).")
                     ] = False,
) -> None:
    """Split data.sources into groups reweight can weigh: cluster every record by the model's view of it (its
    mean-pooled hidden states and its response loss) and write it with "group": "SOURCE/gNN".

    Then `data.sources.NAME: {path: OUT, split_by: group}` makes every group a source for reweight, sample, export,
    compare and report. Settings under the recipe key `group`; features are cached and resumed. Prints the output
    path on stdout.
    """

    def body() -> Path:
        from scalebio_cli.recipe import load_recipe
        from scalebio_cli.stages import group as stage

        recipe = load_recipe(config, overrides)
        out = output.resolve()
        stage.check(recipe, config, k, out, record_format, force)
        from scalebio_cli.results import run_folder

        with run_folder.claim_output_file(out):
            stage.run(recipe, k, out, record_format)
        return output

    _print_result(guarded(body))


def _seed_list(given: list[str], extra: list[str]) -> list[int]:
    """`--seeds 0 1 2` (the values after the first land among the positional arguments), `--seeds 0,1,2`, or
    `--seeds 0 --seeds 1`."""
    seeds = []
    for token in [t for g in given for t in g.split(",")] + extra:
        try:
            seeds.append(int(token))
        except ValueError:
            raise InputError(f"--seeds: {token!r} is not an integer") from None
    return seeds


@app.command()
def compare(
    config: ConfigOption,
    mix: Annotated[list[str], typer.Option("--mix", help="NAME=SPEC, repeatable. SPEC: a weights.json, uniform, "
                                           "proportional (over data.sources), source:SOURCE (one source alone), "
                                           "or a sample/select output file (N of its records per seed). "
                                           "`--mix uniform` alone means uniform=uniform.",
                                           show_default=False)],
    test: Annotated[list[str], typer.Option("--test", help="NAME=FILE, repeatable: held-out data to evaluate on.",
                                            show_default=False)],
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", help="Distinct records every mix trains on "
                                             "per seed.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder: cells/, compare.json, compare.md, "
                                         "compare.png.", show_default=False)],
    overrides: OverridesArg = None,
    seeds: Annotated[list[str] | None, typer.Option("--seeds", help="Seeds (of sampling and fine-tuning): "
                                                    "--seeds 0 1 2, or 0,1,2. Default 0 1 2.")] = None,
    generate: Annotated[bool, typer.Option("--generate", help="Also exact-match accuracy from greedy generation "
                                           "(as `eval --generate`).")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Generation length limit.")] = 256,
    force: Annotated[bool, typer.Option("--force", help="Redo every cell, finished or not.")] = False,
    baseline: Annotated[str | None, typer.Option("--baseline", help="The mix every other is compared with, seed "
                                                 "by seed (default: uniform if given, else the first mix).",
                                                 show_default=False)] = None,
    match: Annotated[str, typer.Option("--match", help="records: every mix trains on N records; tokens: on the "
                                       "same response tokens per seed (the smallest N-record draw's).")
                     ] = "records",
) -> None:
    """Compare mixtures as a paired experiment: for every mix and seed k, draw N records, fine-tune `model` with
    the recipe's finetune section under seed k, evaluate on every test file; the base model too; each mix's
    paired difference to the baseline with a 95% interval, its records, tokens and cost.

    Finished cells are reused while everything they read is unchanged. Prints DIR/compare.json on stdout.
    """

    def body() -> Path:
        from scalebio_cli.comparing.cells import Comparison
        from scalebio_cli.comparing.mixes import parse_mixes
        from scalebio_cli.recipe import load_recipe
        from scalebio_cli.stages import compare as stage

        extra = [o for o in overrides or [] if o.lstrip("-").isdigit()]
        recipe = load_recipe(config, [o for o in overrides or [] if o not in extra])
        seed_list = _seed_list(seeds or [], extra) if seeds or extra else [0, 1, 2]
        mixes = parse_mixes(mix)
        tests = _parse_named_files(test, "--test")
        out = output.resolve()
        stage.check(recipe, config, mixes, tests, num_samples, seed_list, out, baseline, match)
        from scalebio_cli.results import run_folder
        from scalebio_cli.stages import evaluate as eval_stage
        from scalebio_cli.stages import finetune as finetune_stage
        from scalebio_cli.stages import sample as sample_stage

        out.mkdir(parents=True, exist_ok=True)
        comparison = Comparison(recipe, mixes, tests, num_samples, seed_list, out, generate, max_new_tokens,
                                force, baseline, match)
        with run_folder.locked(out / run_folder.LOCK_NAME, "scalebio compare"):
            return stage.run(comparison, stage.Stages(sample_stage, finetune_stage, eval_stage))

    _print_result(guarded(body))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A reweight run folder (its output_dir).", show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="The HTML file to write "
                                                "(default: RUN/report.html).")] = None,
    evals: Annotated[list[str] | None, typer.Option("--eval", help="NAME=RESULT.json, repeatable: results of "
                                                    "`scalebio eval` to compare side by side.")] = None,
) -> None:
    """One self-contained HTML page of a run: weights, losses, lambda gradients and learning rates over the steps,
    the final and averaged weights with source sizes, the recipe, and (with --eval) held-out results.
    Prints the page's path on stdout.
    """

    def body() -> Path:
        from scalebio_cli.stages import report as stage

        named = _parse_named_files(evals or [], "--eval")
        return stage.run(run_dir.resolve(), output.resolve() if output else None, named)

    _print_result(guarded(body))


def _print_result(path: Path) -> None:
    """The output path goes to stdout (for pipes), once, from the main process."""
    if process.is_main():
        typer.echo(str(path))


def main() -> None:
    # Set at program start, never as a side effect of importing a module.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Typer's own usage errors (unknown option, missing --config) already exit with status 2.
    app(prog_name="scalebio")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
