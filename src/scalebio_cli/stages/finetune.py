"""`scalebio finetune`: supervised fine-tuning on one data file, or on data.sources mixed by a weights file.

Full-parameter or LISA (`finetune.lisa.layers`), AdamW with warmup + cosine, exact gradient accumulation (the loss
is the token mean over the whole global batch, whatever the micro-batching), periodic validation loss on one set or
named sets, the training loss per source (the mixed sources, or the `source` field of the records), and a final
Hugging Face model folder in output_dir that AutoModelForCausalLM and `scalebio eval` load.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape

from scalebio_cli.console import console, format_weights, step_progress
from scalebio_cli.data.batching import CursorSampler, micro_batches, num_micro_batches, response_token_count
from scalebio_cli.data.read import source_labels
from scalebio_cli.data.read import sources as data_sources
from scalebio_cli.data.read.expand import recipe_sources
from scalebio_cli.data.read.source_labels import SourceLabels
from scalebio_cli.data.read.sources import DataSource
from scalebio_cli.data.tokens.render import Renderer
from scalebio_cli.data.tokens.tokenized import TokenizedData
from scalebio_cli.errors import InputError
from scalebio_cli.recipe import Recipe
from scalebio_cli.results import weights_file
from scalebio_cli.results.metrics import MetricsLog
from scalebio_cli.train import checkpoint, distributed, loop
from scalebio_cli.train.engine import TrainEngine
from scalebio_cli.train.factory import Copy, make_engines
from scalebio_cli.train.losses import dataset_loss
from scalebio_cli.train.modeling import load_model, load_tokenizer, resolve_dtype, save_hf_folder
from scalebio_cli.train.sft import LabelLosses, sft_step
from scalebio_cli.train.stopping import FiniteGuard
from scalebio_cli.train.zero import load_deepspeed_config, zero3_loading

_MIX_STREAM = 0xF17E  # the per-step source draw of weights mode


class TrainStream:
    """Which examples each step trains on: one file in seeded epochs, or several files mixed by weights."""

    def __init__(self, data: list[TokenizedData], weights: list[float], seed: int):
        # Renormalised in float64: a hand-edited file whose weights sum to 1 within 1e-6 must not make numpy's
        # multinomial (which checks the sum strictly) fail.
        probs = np.asarray(weights, dtype=np.float64)
        self.data, self.weights, self.seed = data, probs / probs.sum(), seed
        self.samplers = [CursorSampler(len(d), seed, k) for k, d in enumerate(data)]

    @property
    def size(self) -> int:
        return sum(len(d) for d in self.data)

    def take(self, step: int, n: int) -> list[tuple[int, int]]:
        if len(self.data) == 1:
            counts = [n]
        else:  # every step draws its source counts from its own seeded stream: resumable, rank-independent
            counts = np.random.default_rng([self.seed, _MIX_STREAM, step]).multinomial(n, self.weights).tolist()
        return [(k, int(i)) for k, c in enumerate(counts) for i in self.samplers[k].take(c)]

    def state_dict(self) -> dict[str, Any]:
        return {"cursors": [s.cursor for s in self.samplers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for sampler, cursor in zip(self.samplers, state["cursors"]):
            sampler.cursor = cursor


def training_files(recipe: Recipe) -> tuple[dict[str, DataSource], list[float]]:
    """The sources to train on and their mixing weights (one file: weight 1). data.sources are read as reweight
    read them (split_by, max_samples); without data.sources, as the weights file records them."""
    ft = recipe.finetune
    if ft.data:
        return {"data": data_sources.from_path("finetune.data", ft.data)}, [1.0]
    weights, doc = weights_file.load(ft.weights)  # type: ignore[arg-type]  (check_finetune ensured one is set)
    sources = (recipe_sources(recipe) if recipe.data.sources
               else weights_file.doc_sources(doc, list(weights)))
    if set(sources) != set(weights):
        raise InputError(f"{ft.weights}: its sources ({', '.join(weights)}) are not data.sources "
                         f"({', '.join(sources)})")
    return {n: sources[n] for n in weights}, [weights[n] for n in weights]


def validation_sources(recipe: Recipe) -> dict[str, DataSource]:
    """finetune.validation's sets by name, read as data.validation's are (`validation` for one unnamed set)."""
    ft = recipe.finetune
    return {n: DataSource(f"finetune.validation.{n}" if ft.named_validation else "finetune.validation", spec, n,
                          None, recipe.seed)
            for n, spec in ft.validation_sets().items()}


def training_labels(recipe: Recipe, files: dict[str, DataSource], data: list[TokenizedData],
                    dist: distributed.DistInfo) -> SourceLabels | None:
    """What the training loss is reported per: the sources a weights file mixes, else the `source` field of
    finetune.data's records (as `sample` and `select` write it); None when neither is there."""
    if recipe.finetune.weights:
        return source_labels.by_file(list(files), [len(d) for d in data])
    (source,) = files.values()
    labels, note = source_labels.from_field(source, data[0].record_index)
    if note and dist.is_main:
        console.print(f"[dim]data[/] {escape(note)}")
    return labels


def val_summary(losses: dict[str, float], named: bool, limit: int = 3) -> str:
    """The progress line's validation part: `val 1.2345`, or `val gsm 1.234 · alpaca 2.345 (+2)` for named sets."""
    if not losses:
        return ""
    if not named:
        return f"val {next(iter(losses.values())):.4f}"
    shown = " · ".join(f"{name} {loss:.3f}" for name, loss in list(losses.items())[:limit])
    more = f" (+{len(losses) - limit})" if len(losses) > limit else ""
    return f"val {shown}{more}"


@dataclass
class FineTuning:
    """Everything a finetune run holds: set up once, advanced by `train`."""

    recipe: Recipe
    dist: distributed.DistInfo
    out: Path
    files: dict[str, DataSource]
    mix: list[float]
    stream: TrainStream
    vals: dict[str, TokenizedData]
    labels: SourceLabels | None
    model: torch.nn.Module
    tokenizer: Any
    engine: TrainEngine
    steps: int
    control: loop.StepControl
    start: int = 0
    val_loss: dict[str, float] = field(default_factory=dict)


def run(recipe: Recipe, resume: str | None = None, force: bool = False) -> Path:
    """Fine-tune per `recipe`; returns the model folder. `resume`/`force` as for reweight."""
    dist = distributed.setup(need_group=bool(recipe.deepspeed))
    try:
        start_from = checkpoint.resolve_resume(recipe.output_dir, resume)
        ft = setup(recipe, dist, start_from, force)
        if start_from is not None:
            restore(ft, start_from)
        train(ft)
        return finish(ft)
    finally:
        distributed.teardown()


def setup(recipe: Recipe, dist: distributed.DistInfo, start_from: Path | None, force: bool) -> FineTuning:
    cfg = recipe.finetune
    files, mix = training_files(recipe)
    torch.manual_seed(recipe.seed)
    tokenizer = load_tokenizer(recipe.tokenizer_path, recipe.trust_remote_code,
                               recipe.data.chat_template)
    renderer = Renderer(tokenizer, recipe.data.max_length)
    val_sources = validation_sources(recipe)
    named: list[tuple[str, DataSource | str]] = [(s.key, s) for s in [*files.values(), *val_sources.values()]]
    data = loop.load_data_files(named, renderer, recipe, dist)
    loaded = dict(zip(files, data))
    vals = dict(zip(val_sources, data[len(files):]))
    labels = training_labels(recipe, files, data[: len(files)], dist)
    fingerprints = {n: loaded[n].sha256 for n in files}
    loop.check_resume(start_from, "finetune", recipe, fingerprints, force, dist)
    stream = TrainStream([loaded[n] for n in files], mix, recipe.seed)
    steps = max(1, math.ceil(cfg.epochs * stream.size / cfg.batch_size))

    dtype = resolve_dtype(recipe.precision, dist.device)
    ds_config = load_deepspeed_config(recipe.deepspeed) if recipe.deepspeed else None
    with zero3_loading(ds_config, dtype == torch.bfloat16, dist.world_size):
        model = load_model(recipe.model, dtype, dist.device, recipe.trust_remote_code)
    (engine,) = make_engines(model, [Copy(cfg.lr, num_micro_batches(cfg.batch_size // dist.world_size,
                                                                  cfg.micro_batch_size))],
                             lora=cfg.lora, lora_key="finetune.lora", lisa=cfg.lisa, ds_config=ds_config, dist=dist,
                             weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, total_steps=steps,
                             warmup_ratio=cfg.warmup_ratio, seed=recipe.seed,
                             gradient_checkpointing=cfg.gradient_checkpointing)
    model = engine.model  # with LoRA the peft model: validation runs through the adapter
    out = loop.open_run_folder(recipe, dist)
    if dist.is_main:
        mode = f"LISA {cfg.lisa.layers} of {len(engine.lisa.blocks)} blocks" if engine.lisa.enabled else "all blocks"
        if cfg.lora.r > 0:
            mode = f"LoRA r={cfg.lora.r} (merged into the saved model; the adapter in adapter/)" + (
                f", the adapters of {mode}" if engine.lisa.enabled else "")
        mixing = ("" if len(files) == 1
                  else f", mixed by {escape(str(cfg.weights))}: {format_weights(dict(zip(files, mix)))}")
        console.print(f"[dim]finetune[/] {escape(recipe.model)}: {steps} steps of {cfg.batch_size} examples "
                      f"({cfg.epochs:g} epochs of {stream.size:,}), {mode}{mixing}")
        if labels is not None:
            console.print(f"[dim]finetune[/] training loss per source every {cfg.log_every} steps: "
                          f"{escape(', '.join(labels.names))}")
    control = loop.StepControl("finetune", recipe, out, steps, dist, fingerprints, FiniteGuard(["loss"], dist.device))
    return FineTuning(recipe, dist, out, files, mix, stream, vals, labels, model, tokenizer, engine, steps, control)


def restore(ft: FineTuning, start_from: Path) -> None:
    ft.start = checkpoint.meta(start_from)["step"]
    ft.engine.begin_step(ft.start - 1)  # the LISA draw the checkpoint was written under
    ft.engine.load(start_from, "model")
    ft.stream.load_state_dict(checkpoint.load(start_from, "trainer")["stream"])
    checkpoint.set_rng_state(checkpoint.load(start_from, "rng", ft.dist.rank))
    loop.announce_resume(start_from, ft.start, ft.steps, ft.dist)


def checkpoint_writer(ft: FineTuning) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        ft.engine.save(folder, "model")
        if ft.dist.is_main:
            torch.save({"stream": ft.stream.state_dict()}, folder / "trainer.pt")
        torch.save(checkpoint.rng_state(), folder / f"rng-rank{ft.dist.rank}.pt")

    return write


def validate(ft: FineTuning, step: int, metrics: MetricsLog | None) -> None:
    """The held-out loss of each finetune.validation set, every eval_every steps: `val_loss` is a number for one
    unnamed set, a mapping of set name to loss for named sets."""
    if not ft.vals:
        return
    ft.val_loss = {name: dataset_loss(ft.model, data, ft.recipe.finetune.micro_batch_size,
                                      ft.tokenizer.pad_token_id, ft.dist)[0]
                   for name, data in ft.vals.items()}
    if metrics is not None:
        named = ft.recipe.finetune.named_validation
        metrics.write({"step": step, "val_loss": ft.val_loss if named else next(iter(ft.val_loss.values()))})


def step_labels(ft: FineTuning, items: list[tuple[int, int]]) -> LabelLosses | None:
    """Each example's source in the global batch (on the device), for the per-source loss of a log step."""
    if ft.labels is None:
        return None
    return LabelLosses(torch.tensor(ft.labels.of(items), dtype=torch.long, device=ft.dist.device),
                       len(ft.labels.names))


def log_step(ft: FineTuning, done: int, loss: float, by_source: LabelLosses | None, grad_norm: torch.Tensor | None,
             throughput: loop.Throughput) -> tuple[dict[str, Any], str]:
    """A log step's metrics line and the progress text (loss, validation sets)."""
    record: dict[str, Any] = {"step": done, "loss": loss, "lr": ft.engine.lr,
                              "grad_norm": None if grad_norm is None else float(grad_norm),
                              "tokens_per_s": throughput.rate(), "sec_per_step": throughput.sec_per_step()}
    if by_source is not None and ft.labels is not None:
        record["train_loss_by_source"] = by_source.means(ft.labels.names)
    val = val_summary(ft.val_loss, ft.recipe.finetune.named_validation)
    return record, f"loss {loss:.4f}" + (f" · {val}" if val else "")


def train(ft: FineTuning) -> None:
    """The loop: one SFT step on the token mean of each global batch; logs, validation, checkpoints and stops."""
    cfg, dist, control = ft.recipe.finetune, ft.dist, ft.control
    metrics = MetricsLog(ft.out / "metrics.jsonl", ft.start, ft.recipe) if dist.is_main else None
    if ft.start == 0:
        validate(ft, 0, metrics)
    throughput = loop.Throughput(ft.start, ft.steps, "train tok/s")  # non-padding training tokens
    progress = step_progress("finetune", dist.is_main)
    # pace: the bar's ETA from the estimate the log lines use
    task = progress.add_task("finetune", total=ft.steps, completed=ft.start, info="", pace=throughput.sec_per_step)
    with progress, control.signals.installed():
        for step in range(ft.start, ft.steps):
            ft.engine.begin_step(step)
            done = step + 1
            logged = done % cfg.log_every == 0 or done == ft.steps
            items = ft.stream.take(step, cfg.batch_size)
            # positions: each example's place in the global batch, where its source label is found
            micro = micro_batches(items[dist.rank:: dist.world_size], ft.stream.data, cfg.micro_batch_size,
                                  ft.tokenizer.pad_token_id, pin=dist.device.type == "cuda",
                                  positions=list(range(dist.rank, len(items), dist.world_size)))
            response_tokens = response_token_count(items, ft.stream.data)
            by_source = step_labels(ft, items) if logged else None
            loss_sum, stop_votes, grad_norm = sft_step(ft.engine, [mb.to(dist.device) for mb in micro],
                                                       response_tokens, dist, stop_requested=control.stop_requested,
                                                       by_label=by_source)
            throughput.add(sum(mb.num_tokens for mb in micro) * dist.world_size)
            control.guard.observe(done, (loss_sum / response_tokens).view(1))
            throughput.step(done)
            if throughput.early(done, cfg.log_every):  # what the run costs, long before its first log line
                control.guard.check()  # synchronises with the device
                if dist.is_main:
                    progress.console.print(f"[dim]{throughput.first_steps(throughput.rate())}[/]")
                progress.update(task, info=throughput.short())
            if done % cfg.eval_every == 0 or done == ft.steps:
                validate(ft, done, metrics)
            if logged:
                control.guard.check()
                record, info = log_step(ft, done, float(loss_sum) / response_tokens, by_source, grad_norm, throughput)
                if metrics is not None:
                    metrics.write(record)
                progress.update(task, info=f"{throughput.short()} · {escape(info)}")
                if dist.is_main:
                    progress.console.print(f"step {done:>5}/{ft.steps}  {escape(info)}  lr {ft.engine.lr:.2e}  "
                                           f"{record['tokens_per_s']:,.0f} {throughput.unit}  {throughput.pace()}")
            progress.advance(task)
            control.after_step(done, stop_votes, checkpoint_writer(ft))
    control.guard.check()


def finish(ft: FineTuning) -> Path:
    """The Hugging Face folder (with the run's recipe.yaml beside it), written by the main process."""
    weights = ft.engine.full_state_dict()  # collective under ZeRO-3: every process takes part
    if ft.dist.is_main and ft.recipe.finetune.lora.r > 0:
        from scalebio_cli.train.lora import save_merged

        save_merged(ft.engine, ft.tokenizer, ft.out, weights)  # weights: None, or gathered from ZeRO-3's shards
    elif ft.dist.is_main:
        save_hf_folder(ft.model, ft.tokenizer, ft.out, weights)
        validation = "" if not ft.val_loss else " (validation loss " + ", ".join(
            f"{name} {loss:.4f}" if ft.recipe.finetune.named_validation else f"{loss:.4f}"
            for name, loss in ft.val_loss.items()) + ")"
        console.print(f"[bold green]saved[/] {escape(str(ft.out))}{validation}")
    distributed.barrier(ft.dist)
    return ft.out
