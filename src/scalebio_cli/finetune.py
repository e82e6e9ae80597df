"""`scalebio finetune`: supervised fine-tuning on one data file, or on data.sources mixed by a weights file.

Full-parameter or LISA (`finetune.lisa.layers`), AdamW with warmup + cosine, exact gradient accumulation (the loss
is the token mean over the whole global batch, whatever the micro-batching), periodic validation loss, and a final
Hugging Face model folder in output_dir that AutoModelForCausalLM and `scalebio eval` load.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape

from scalebio_cli import checkpoint, distributed, weights_file
from scalebio_cli.batching import CursorSampler, MicroBatch, micro_batches, num_micro_batches, response_token_count
from scalebio_cli.config import Recipe
from scalebio_cli.console import console, format_weights, step_progress
from scalebio_cli.dataset import TokenizedData, load_all
from scalebio_cli.engine import TrainEngine, load_deepspeed_config, make_engine, zero3_loading
from scalebio_cli.errors import InputError, TrainingStopped
from scalebio_cli.evaluate import dataset_loss
from scalebio_cli.losses import example_losses
from scalebio_cli.metrics import MetricsLog
from scalebio_cli.modeling import load_model, load_tokenizer, resolve_dtype
from scalebio_cli.render import Renderer
from scalebio_cli.stopping import FiniteGuard, StopSignals, StopVote

_MIX_STREAM = 0xF17E  # the per-step source draw of weights mode


class TrainStream:
    """Which examples each step trains on: one file in seeded epochs, or several files mixed by weights."""

    def __init__(self, data: list[TokenizedData], weights: list[float], seed: int):
        self.data, self.weights, self.seed = data, np.asarray(weights, dtype=np.float64), seed
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


def sft_step(engine: TrainEngine, micro: list[MicroBatch], response_tokens: int, dist: distributed.DistInfo,
             stop_requested: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One optimizer step on the token-mean loss of the global batch; no host-device synchronisation.

    Returns (global token-loss sum, processes asking to stop, gradient norm).
    """
    loss_sum = torch.zeros((), dtype=torch.float32, device=dist.device)
    for i, mb in enumerate(micro):
        with engine.sync_context(i == len(micro) - 1):
            sums, _ = example_losses(engine(mb), mb)
            engine.backward(sums.sum() / response_tokens)
        loss_sum += sums.detach().sum()
    grad_norm = engine.step()
    vote = torch.full((1,), float(stop_requested), device=dist.device)
    totals = distributed.all_reduce_sum(torch.cat([loss_sum.view(1), vote]), dist)
    return totals[0], totals[1], grad_norm


def training_files(recipe: Recipe) -> tuple[dict[str, str], list[float]]:
    """The files to train on and their mixing weights (one file: weight 1)."""
    ft = recipe.finetune
    if ft.data:
        return {"data": ft.data}, [1.0]
    weights, doc = weights_file.load(ft.weights)  # type: ignore[arg-type]  (check_finetune ensured one is set)
    sources = recipe.data.sources or {n: doc["sources"][n]["path"] for n in weights}
    if set(sources) != set(weights):
        raise InputError(f"{ft.weights}: its sources ({', '.join(weights)}) are not data.sources "
                         f"({', '.join(sources)})")
    return {n: sources[n] for n in weights}, [weights[n] for n in weights]


# Recipe keys that change the fine-tuned model: resuming with any of them changed needs --force.
RESULT_KEYS = ("model", "tokenizer", "seed", "precision", "trust_remote_code", "data.max_length", "finetune.data",
               "finetune.weights", "finetune.epochs", "finetune.lr", "finetune.batch_size", "finetune.warmup_ratio",
               "finetune.weight_decay", "finetune.max_grad_norm", "finetune.lisa")


def run(recipe: Recipe, resume: str | None = None, force: bool = False) -> Path:
    """Fine-tune per `recipe`; returns the model folder. `resume`/`force` as for reweight."""
    dist = distributed.setup(need_group=bool(recipe.deepspeed))
    try:
        return _run(recipe, dist, resume, force)
    finally:
        distributed.teardown()


def _run(recipe: Recipe, dist: distributed.DistInfo, resume: str | None, force: bool) -> Path:
    ft = recipe.finetune
    out = Path(recipe.output_dir)
    start_from = checkpoint.resolve_resume(out, resume)
    files, mix = training_files(recipe)
    torch.manual_seed(recipe.seed)

    tokenizer = load_tokenizer(recipe.tokenizer_path, recipe.trust_remote_code)
    renderer = Renderer(tokenizer, recipe.data.max_length)
    keys = ["finetune.data" if len(files) == 1 else f"data.sources.{n}" for n in files]
    named = list(zip(keys, files.values())) + ([("finetune.validation", ft.validation)] if ft.validation else [])
    data = load_all(named, renderer, recipe.data.cache_dir, is_main=dist.is_main,
                    barrier=lambda: distributed.barrier(dist), log=lambda line: console.print(f"[dim]data[/] {line}"))
    loaded = dict(zip(files, data))
    val = data[-1] if ft.validation else None
    fingerprints = {n: loaded[n].sha256 for n in files}
    if start_from is not None:
        accepted = checkpoint.check_resumable(start_from, "finetune", recipe.to_dict(), fingerprints, RESULT_KEYS,
                                              force)
        if accepted and dist.is_main:
            console.print(f"[yellow]resuming despite differences (--force):[/] {escape('; '.join(accepted))}")
    stream = TrainStream([loaded[n] for n in files], mix, recipe.seed)
    steps = max(1, math.ceil(ft.epochs * stream.size / ft.batch_size))

    dtype = resolve_dtype(recipe.precision, dist.device)
    ds_config = load_deepspeed_config(recipe.deepspeed) if recipe.deepspeed else None
    with zero3_loading(ds_config, dtype == torch.bfloat16, dist.world_size):
        model = load_model(recipe.model, dtype, dist.device, recipe.trust_remote_code)
    engine = make_engine(model, lr=ft.lr, weight_decay=ft.weight_decay, max_grad_norm=ft.max_grad_norm,
                         total_steps=steps, warmup_ratio=ft.warmup_ratio, lisa=ft.lisa, seed=recipe.seed, dist=dist,
                         gradient_checkpointing=ft.gradient_checkpointing, ds_config=ds_config,
                         micro_batches=num_micro_batches(ft.batch_size // dist.world_size, ft.micro_batch_size))
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        mode = f"LISA {ft.lisa.layers} of {len(engine.lisa.blocks)} blocks" if engine.lisa.enabled else "all blocks"
        mixing = ("" if len(files) == 1
                  else f", mixed by {escape(str(ft.weights))}: {format_weights(dict(zip(files, mix)))}")
        console.print(f"[dim]finetune[/] {escape(recipe.model)}: {steps} steps of {ft.batch_size} examples "
                      f"({ft.epochs:g} epochs of {stream.size:,}), {mode}{mixing}")
    start = 0
    if start_from is not None:
        start = checkpoint.meta(start_from)["step"]
        engine.begin_step(start - 1)  # the LISA draw the checkpoint was written under
        engine.load(start_from, "model")
        stream.load_state_dict(checkpoint.load(start_from, "trainer")["stream"])
        checkpoint.set_rng_state(checkpoint.load(start_from, "rng", dist.rank))
        if dist.is_main:
            console.print(f"[bold]resumed[/] from {escape(str(start_from))} (step {start} of {steps})")
    metrics = MetricsLog(out / "metrics.jsonl", start) if dist.is_main else None
    guard = FiniteGuard(["loss"], dist.device)
    signals = StopSignals()
    stop_vote = StopVote(signals, dist.distributed)

    def validate(step: int) -> float | None:
        if val is None:
            return None
        loss, _ = dataset_loss(model, val, ft.micro_batch_size, tokenizer.pad_token_id, dist)
        if metrics is not None:
            metrics.write({"step": step, "val_loss": loss})
        return loss

    val_loss = validate(0) if start == 0 else None
    tokens, last_time = 0, time.perf_counter()
    progress = step_progress("finetune", dist.is_main)
    task = progress.add_task("finetune", total=steps, completed=start, info="")
    with progress, signals.installed():
        for step in range(start, steps):
            engine.begin_step(step)
            items = stream.take(step, ft.batch_size)
            micro = micro_batches(items[dist.rank:: dist.world_size], stream.data, ft.micro_batch_size,
                                  tokenizer.pad_token_id, pin=dist.device.type == "cuda")
            response_tokens = response_token_count(items, stream.data)
            loss_sum, stop_votes, grad_norm = sft_step(engine, [mb.to(dist.device) for mb in micro], response_tokens,
                                                       dist, stop_requested=signals.received is not None)
            tokens += sum(mb.num_tokens for mb in micro) * dist.world_size
            guard.observe(step + 1, (loss_sum / response_tokens).view(1))

            done = step + 1
            if done % ft.eval_every == 0 or done == steps:
                val_loss = validate(done)
            if done % ft.log_every == 0 or done == steps:
                guard.check()
                now = time.perf_counter()
                record = {"step": done, "loss": float(loss_sum) / response_tokens, "lr": engine.lr,
                          "grad_norm": None if grad_norm is None else float(grad_norm),
                          "tokens_per_s": tokens / (now - last_time)}
                tokens, last_time = 0, now
                if metrics is not None:
                    metrics.write(record)
                info = f"loss {record['loss']:.4f}" + ("" if val_loss is None else f" · val {val_loss:.4f}")
                progress.update(task, info=info)
                if dist.is_main:
                    progress.console.print(f"step {done:>5}/{steps}  {info}  lr {engine.lr:.2e}  "
                                           f"{record['tokens_per_s']:,.0f} tok/s")
            progress.advance(task)

            stop = stop_vote(stop_votes)
            periodic = recipe.checkpoint.every and done % recipe.checkpoint.every == 0
            if (stop or periodic) and done < steps:
                guard.check()
                def write(folder: Path) -> None:
                    engine.save(folder, "model")
                    if dist.is_main:
                        torch.save({"stream": stream.state_dict()}, folder / "trainer.pt")
                    torch.save(checkpoint.rng_state(), folder / f"rng-rank{dist.rank}.pt")

                path = checkpoint.save(out, done, {"stage": "finetune", "config": recipe.to_dict(),
                                                   "data_sha256": fingerprints},
                                       recipe.checkpoint.keep, dist, write)
                if stop:
                    raise TrainingStopped(f"stopped by {signals.received or 'a signal on another process'} after "
                                          f"step {done} of {steps}; checkpoint saved to {path}; continue with "
                                          "--resume auto")

    guard.check()
    weights = engine.full_state_dict()  # collective under ZeRO-3: every process takes part
    if dist.is_main:
        save_model(model, tokenizer, out, weights)
        validation = "" if val_loss is None else f" (validation loss {val_loss:.4f})"
        console.print(f"[bold green]saved[/] {escape(str(out))}{validation}")
    distributed.barrier(dist)
    return out


MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def save_model(model: torch.nn.Module, tokenizer: Any, out: Path, state_dict: dict[str, Any] | None = None) -> None:
    """Write a Hugging Face folder into `out` without ever leaving a half-written model there.

    Files are saved into a temporary folder first and moved in with config.json last: a folder that has
    config.json is complete.
    """
    tmp = Path(tempfile.mkdtemp(prefix=".model-tmp-", dir=out))
    try:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for stale in MODEL_FILES:  # a previous model's files must not mix with the new ones
            (out / stale).unlink(missing_ok=True)
        for shard in out.glob("model-*-of-*.safetensors"):
            shard.unlink()
        for name in sorted((p.name for p in tmp.iterdir()), key=lambda n: n == "config.json"):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
