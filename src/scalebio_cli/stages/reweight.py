"""`scalebio reweight`: learn source sampling weights with ScaleBiO (see ../shared/docs/ALGORITHM.md).

Setup (data, the two model copies u and w, the source weights), then `train`: every step draws a balanced training
batch B (every source present) and a validation batch V and takes one bilevel step (train/bilevel.py: u-step,
w-step, lam-step); LISA re-draws the trainable blocks of u and w (the same blocks) every `interval` steps. Finish
writes weights.json and weights.png.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from scalebio_cli.console import console, format_evidence, format_weights, step_progress
from scalebio_cli.data import stage_checks
from scalebio_cli.data.batch_plan import BatchPlan, StepBatches
from scalebio_cli.data.batching import Prefetcher, num_micro_batches
from scalebio_cli.data.checks import DataChecks
from scalebio_cli.data.read import hub
from scalebio_cli.data.read import sources as data_sources
from scalebio_cli.data.read.expand import recipe_sources, validation_sources
from scalebio_cli.data.read.record_reader import LAZY_MIN_RECORDS
from scalebio_cli.data.read.sources import DataSource
from scalebio_cli.data.tokens.lazy_tokens import LazyTokens
from scalebio_cli.data.tokens.render import Renderer
from scalebio_cli.data.tokens.tokenized import TokenizedData
from scalebio_cli.recipe import Recipe
from scalebio_cli.results import weights_file
from scalebio_cli.results.metrics import MetricsLog, plot_weights
from scalebio_cli.train import checkpoint, distributed, loop, verdict
from scalebio_cli.train.bilevel import StepResult, bilevel_step
from scalebio_cli.train.engine import TrainEngine
from scalebio_cli.train.factory import Copy, make_engines
from scalebio_cli.train.modeling import count_parameters, load_model, load_tokenizer, resolve_dtype
from scalebio_cli.train.placebo import Placebo, renormalise
from scalebio_cli.train.placebo import split as split_placebo
from scalebio_cli.train.settled import advice as settle_advice
from scalebio_cli.train.settled import settled as settled_state
from scalebio_cli.train.source_weights import SourceWeights
from scalebio_cli.train.stopping import FiniteGuard
from scalebio_cli.train.zero import load_deepspeed_config, zero3_loading

Tokens = TokenizedData | LazyTokens


@dataclass
class RunData:
    """The sources (split_by expanded) and validation sets a run reads, by name, and their tokens."""

    sources: dict[str, DataSource]
    vals: dict[str, DataSource]
    tokenized: list[Tokens]
    val_weights: list[float]  # normalised to sum 1

    @property
    def source_data(self) -> list[Tokens]:
        return self.tokenized[: len(self.sources)]

    @property
    def val_data(self) -> list[Tokens]:
        return self.tokenized[len(self.sources):]


def validation_weights(recipe: Recipe) -> list[float]:
    """Each validation set's share of L1: as written (default equal), normalised to sum 1."""
    raw = [spec.weight if spec.weight is not None else 1.0 for spec in recipe.validation_sets().values()]
    return [w / sum(raw) for w in raw]


def load_data(recipe: Recipe, renderer: Renderer, dist: distributed.DistInfo) -> RunData:
    """Every source and validation set, tokenized (or from the cache)."""
    sources, vals = recipe_sources(recipe), validation_sources(recipe)
    files = [(s.key, s) for s in [*sources.values(), *vals.values()]]
    tokenized = loop.load_data_files(files, renderer, recipe, dist, lazy_min_records=LAZY_MIN_RECORDS)
    return RunData(sources, vals, tokenized, validation_weights(recipe))


@dataclass
class Reweighting:
    """Everything a reweight run holds: set up once, advanced by `train`, saved by checkpoints."""

    recipe: Recipe
    dist: distributed.DistInfo
    out: Path
    names: list[str]
    sources: list[Tokens]
    data: RunData
    plan: BatchPlan
    u: TrainEngine
    w: TrainEngine
    lam: SourceWeights
    control: loop.StepControl
    start: int = 0
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    weights_sum: torch.Tensor | None = None  # sum of s over the second half (weights_averaged)
    checks: DataChecks | None = None  # duplicates, overlap with validation (weights.json)
    placebo: Placebo | None = None  # reweight.placebo: the control source, last in `names`

    @property
    def real_names(self) -> list[str]:
        """The sources of the recipe (the placebo left out)."""
        return self.names[:-1] if self.placebo is not None else self.names

    @property
    def avg_from(self) -> int:
        return self.recipe.reweight.steps // 2


def run(recipe: Recipe, resume: str | None = None, force: bool = False) -> Path:
    """Run the reweighting described by `recipe`; returns the path of weights.json.

    `resume`: None (start fresh), "auto" (the latest complete checkpoint in output_dir, if any) or a checkpoint
    folder. `force`: resume even if the recipe changed in a key that changes the result.
    """
    dist = distributed.setup(need_group=bool(recipe.deepspeed))
    try:
        start_from = checkpoint.resolve_resume(recipe.output_dir, resume)
        rw = setup(recipe, dist, start_from, force)
        if start_from is not None:
            restore(rw, start_from)
        train(rw)
        return finish(rw)
    finally:
        distributed.teardown()


def data_fingerprints(data: RunData) -> dict[str, str]:
    """The sha256 of every source's data, keyed by its recipe key (a source may itself be named `validation`)."""
    return {s.key: d.sha256 for s, d in zip([*data.sources.values(), *data.vals.values()], data.tokenized)}


def setup(recipe: Recipe, dist: distributed.DistInfo, start_from: Path | None, force: bool) -> Reweighting:
    """Data (tokenized, checked), the two model copies on their engines, the source weights."""
    cfg = recipe.reweight
    torch.manual_seed(recipe.seed)
    tokenizer = load_tokenizer(recipe.tokenizer_path, recipe.trust_remote_code,
                               recipe.data.chat_template)
    data = load_data(recipe, Renderer(tokenizer, recipe.data.max_length), dist)
    checks = stage_checks.for_reweight(recipe, data, dist.is_main, lambda: distributed.barrier(dist))
    names, sources = list(data.sources), [checks.without_dropped(n, d) for n, d in zip(data.sources, data.source_data)]
    control_source = None
    if cfg.placebo:  # a random half of the largest source as a source of its own: the run's noise floor
        names, sources, control_source = split_placebo(names, sources, recipe.seed)
    fingerprints = data_fingerprints(data)
    loop.check_resume(start_from, "reweight", recipe, fingerprints, force, dist)
    plan = BatchPlan(sources, data.val_data, data.val_weights, recipe, dist, tokenizer.pad_token_id)

    dtype = resolve_dtype(recipe.precision, dist.device)
    u, w, num_params = model_copies(recipe, dist, dtype)
    lam = SourceWeights(len(names), cfg.lr_lambda, cfg.steps, cfg.warmup_ratio, dist.device,
                        optimizer=cfg.lambda_optimizer, signal=cfg.lambda_signal, delay=cfg.delay,
                        schedule=cfg.lambda_schedule, every=cfg.lambda_every,
                        lr_scale=lambda step: loop.tau_scale(cfg, step))
    out = loop.open_run_folder(recipe, dist)
    if dist.is_main:
        lisa = (f"LISA {cfg.lisa.layers} of {len(u.lisa.blocks)} blocks every {cfg.lisa.interval} steps"
                if u.lisa.enabled else f"all {len(u.lisa.blocks)} blocks")
        if cfg.lora.r > 0:
            lisa = f"LoRA r={cfg.lora.r} adapters u and w over one frozen base" + (
                f", the adapters of {lisa}" if u.lisa.enabled else "")
        engine = "DeepSpeed" if recipe.deepspeed else ("DDP" if dist.distributed else "single process")
        console.print(f"[dim]model[/] {escape(recipe.model)} ({num_params / 1e6:.1f}M parameters, "
                      f"{dtype}, {dist.device}, {engine} x {dist.world_size}, {lisa})")
    l1_names = [f"L1_sum[{n}]" for n in data.vals] if recipe.named_validation else ["L1_sum"]
    guard = FiniteGuard([f"loss_u[{n}]" for n in names] + [f"loss_w[{n}]" for n in names] + l1_names
                        + [f"lambda[{n}]" for n in names], dist.device)
    control = loop.StepControl("reweight", recipe, out, cfg.steps, dist, fingerprints, guard)
    return Reweighting(recipe, dist, out, names, sources, data, plan, u, w, lam, control,
                       trajectory=[{"step": 0, "weights": lam.as_dict(names)}],
                       weights_sum=torch.zeros(len(names), dtype=torch.float64, device=dist.device), checks=checks,
                       placebo=control_source)


def model_copies(recipe: Recipe, dist: distributed.DistInfo,
                 dtype: torch.dtype) -> tuple[TrainEngine, TrainEngine, int]:
    """u and w on their engines (train/factory.py chooses: two full copies on our engine, DDP or DeepSpeed, or with
    `reweight.lora.r > 0` two LoRA adapters over one frozen base), and the base model's parameter count."""
    cfg = recipe.reweight
    ds_config = load_deepspeed_config(recipe.deepspeed) if recipe.deepspeed else None

    def load() -> torch.nn.Module:
        return load_model(recipe.model, dtype, dist.device, recipe.trust_remote_code)

    with zero3_loading(ds_config, dtype == torch.bfloat16, dist.world_size):  # ZeRO-3: each process its shards
        model = load()
    num_params = count_parameters(model)  # before LoRA adds its adapters
    local_batch = cfg.batch_size // dist.world_size
    # w's pass: the micro-batches of B (as u's), then those of V
    copies = [Copy(cfg.lr_u, num_micro_batches(local_batch, cfg.micro_batch_size), "u"),
              Copy(cfg.lr_w, num_micro_batches(local_batch, cfg.micro_batch_size)
                   + num_micro_batches(cfg.val_batch_size // dist.world_size, cfg.micro_batch_size), "w")]
    u, w = make_engines(model, copies, reload=load, lora=cfg.lora, lora_key="reweight.lora", lisa=cfg.lisa,
                        ds_config=ds_config, dist=dist, weight_decay=cfg.weight_decay, total_steps=cfg.steps,
                        warmup_ratio=cfg.warmup_ratio, seed=recipe.seed,
                        gradient_checkpointing=cfg.gradient_checkpointing,
                        # both objectives carry alpha * L2, so the clipping threshold scales with alpha
                        max_grad_norm=None if cfg.max_grad_norm is None else cfg.max_grad_norm * cfg.alpha)
    for engine in (u, w):  # the reference scales every rate by tau^-i in round i (lam's: SourceWeights.lr_scale)
        loop.scale_schedule(engine, lambda step: loop.tau_scale(cfg, step))
    return u, w, num_params


def checkpoint_writer(rw: Reweighting, sampler_state: dict[str, Any]) -> Callable[[Path], None]:
    """What every process writes into a checkpoint folder (StepControl.after_step decides when)."""
    def write(folder: Path) -> None:
        rw.u.save(folder, "u")
        rw.w.save(folder, "w")
        if rw.dist.is_main:
            torch.save({"lambda": rw.lam.state_dict(), "plan": sampler_state, "trajectory": rw.trajectory,
                        "weights_sum": rw.weights_sum}, folder / "trainer.pt")
        torch.save(checkpoint.rng_state(), folder / f"rng-rank{rw.dist.rank}.pt")

    return write


def restore(rw: Reweighting, start_from: Path) -> None:
    rw.start = checkpoint.meta(start_from)["step"]
    rw.u.begin_step(rw.start - 1)  # the LISA draw the checkpoint was written under, before its state comes back
    rw.w.begin_step(rw.start - 1)
    rw.u.load(start_from, "u")
    rw.w.load(start_from, "w")
    saved = checkpoint.load(start_from, "trainer")
    rw.lam.load_state_dict(saved["lambda"])
    rw.plan.load_state_dict(saved["plan"], str(start_from))
    rw.trajectory = saved["trajectory"]
    rw.weights_sum = saved["weights_sum"].to(rw.dist.device)
    checkpoint.set_rng_state(checkpoint.load(start_from, "rng", rw.dist.rank))
    loop.announce_resume(start_from, rw.start, rw.recipe.reweight.steps, rw.dist)


def train(rw: Reweighting) -> None:
    """The loop: one bilevel step per step, a metrics line every log_every steps, checkpoints and stops."""
    cfg, dist, control = rw.recipe.reweight, rw.dist, rw.control
    metrics = MetricsLog(rw.out / "metrics.jsonl", rw.start, rw.recipe) if dist.is_main else None
    throughput = loop.Throughput(rw.start, cfg.steps, "train tok/s (u+w)")  # non-padding tokens through u and w
    progress = step_progress("reweight", dist.is_main)
    task = progress.add_task("reweight", total=cfg.steps, completed=rw.start,  # pace: the bar's ETA is the log's
                             info=format_weights(rw.trajectory[-1]["weights"], 14), pace=throughput.sec_per_step)
    with progress, control.signals.installed(), Prefetcher(rw.plan.next, range(rw.start, cfg.steps)) as prefetched:
        for step in range(rw.start, cfg.steps):
            rw.u.begin_step(step)
            rw.w.begin_step(step)
            if cfg.max_grad_norm is not None and cfg.tau != 1:  # both objectives carry the alpha in force
                loop.set_clip(rw.u, cfg.max_grad_norm * alpha_at(cfg, step))
                loop.set_clip(rw.w, cfg.max_grad_norm * alpha_at(cfg, step))
            batch = prefetched.get(step).to(dist.device)
            result = bilevel_step(rw.u, rw.w, rw.lam, batch, step, alpha_at(cfg, step), dist,
                                  stop_requested=control.stop_requested)
            control.guard.observe(step + 1, torch.cat([result.m_u, result.m_w, result.l1_sums,
                                                       rw.lam.lam.detach()]))
            if step >= rw.avg_from:
                rw.weights_sum += rw.lam.probs(torch.float64)
            throughput.add(batch.num_tokens * dist.world_size)

            done = step + 1
            throughput.step(done)
            if throughput.early(done, cfg.log_every):  # what the run costs, long before its first log line
                control.guard.check()  # synchronises with the device: the time is the steps', not their queueing
                if dist.is_main:
                    progress.console.print(f"[dim]{throughput.first_steps(throughput.rate())}[/]")
                progress.update(task, info=f"{throughput.short()} · {format_weights(rw.trajectory[-1]['weights'], 14)}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                control.guard.check()
                record = metrics_record(rw, done, result, batch, throughput.rate())
                record["sec_per_step"] = throughput.sec_per_step()
                rw.trajectory.append({"step": done, "weights": record["weights"]})
                if metrics is not None:
                    metrics.write(record)
                    per_set = {k.partition("/")[2]: v for k, v in record.items() if k.startswith("val_loss/")}
                    sets = f" ({format_weights(per_set)})" if per_set else ""
                    progress.console.print(
                        f"step {done:>5}/{cfg.steps}  L1 {record['L1']:.4f}{sets}  L2(u) {record['L2_u']:.4f}  "
                        f"L2(w) {record['L2_w']:.4f}  {record['tokens_per_s']:,.0f} {throughput.unit}  "
                        f"{throughput.pace()}  | {format_weights(record['weights'])}")
                progress.update(task, info=f"{throughput.short()} · {format_weights(record['weights'], 14)}")
            progress.advance(task)
            control.after_step(done, result.stop_votes, checkpoint_writer(rw, batch.sampler_state))
    control.guard.check()


def alpha_at(cfg: Any, step: int) -> float:
    """alpha, grown by `tau` every `tau_every` steps (one round; tau = 1: constant, the reference's scripts)."""
    return cfg.alpha * cfg.tau ** (step // cfg.tau_every)


def metrics_record(rw: Reweighting, done: int, result: StepResult, batch: StepBatches,
                   tokens_per_s: float) -> dict[str, Any]:
    """One metrics.jsonl line (host-device synchronisation: only on log steps)."""
    names = rw.names
    l1 = batch.l1(result.l1_sums)
    per_set = ({f"val_loss/{n}": v for n, v in zip(rw.data.vals, l1.tolist())} if rw.recipe.named_validation
               else {})
    return {
        "step": done,
        "L1": float(torch.dot(batch.val_weights, l1)),
        **per_set,
        "L2_u": float(torch.dot(result.s, result.m_u)),
        "L2_w": float(torch.dot(result.s, result.m_w)),
        "loss_u": dict(zip(names, result.m_u.tolist())),
        "loss_w": dict(zip(names, result.m_w.tolist())),
        "weights": rw.lam.as_dict(names),
        "lambda_grad": dict(zip(names, result.lam_grad.tolist())),
        "grad_norm_u": None if result.grad_norm_u is None else float(result.grad_norm_u),
        "grad_norm_w": None if result.grad_norm_w is None else float(result.grad_norm_w),
        "lr_u": rw.u.lr, "lr_w": rw.w.lr, "lr_lambda": rw.lam.lr,
        "active_blocks": rw.u.lisa.active if rw.u.lisa.enabled else "all",
        "tokens_per_s": tokens_per_s,
    }


def finish(rw: Reweighting) -> Path:
    """weights.json (final and averaged weights, evidence, settled, provenance) and weights.png, from the main
    process; the log's last lines say what the run is sure of and whether its weights settled."""
    cfg, names, real = rw.recipe.reweight, rw.names, rw.real_names
    final = rw.lam.as_dict(names)
    averaged = dict(zip(names, (rw.weights_sum / (cfg.steps - rw.avg_from)).tolist()))
    twins = {rw.placebo.name: rw.placebo.split_from} if rw.placebo else None  # the placebo: against its twin
    evidence = rw.lam.evidence(names, evidence_batch(rw), cfg.evidence_level, twins)
    history = [list(renormalise(dict(zip(names, row)), real).values()) for row in rw.lam.history]
    trajectory = [{"step": p["step"], "weights": renormalise(p["weights"], real)} for p in rw.trajectory]
    path = rw.out / "weights.json"
    if rw.dist.is_main:
        doc = weights_file.build(
            weights=renormalise(final, real), weights_averaged=renormalise(averaged, real),
            sources={n: source_info(s, d) | (rw.checks.record(n) if rw.checks else {})
                     for (n, s), d in zip(rw.data.sources.items(), rw.data.source_data)},
            validation=validation_info(rw), trajectory=trajectory, steps=cfg.steps,
            seed=rw.recipe.seed, model=rw.recipe.model, config=rw.recipe.to_dict(),
            evidence={n: evidence[n] for n in real}, evidence_level=cfg.evidence_level,
            settled=settled_state(history, real), placebo=placebo_record(rw, final, averaged, evidence))
        weights_file.write(path, doc)
        plot_weights(rw.trajectory, rw.out / "weights.png")
        log_finish(rw, doc)
    distributed.barrier(rw.dist)
    return path


def evidence_batch(rw: Reweighting) -> int:
    """The shortest batch of lam steps the evidence's error may use: one LISA interval (the same blocks train
    throughout it, so its steps are alike), in lam steps."""
    cfg = rw.recipe.reweight
    return -(-cfg.lisa.interval // cfg.lambda_every) if rw.u.lisa.enabled else 1


def placebo_record(rw: Reweighting, final: dict[str, float], averaged: dict[str, float],
                   evidence: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """weights.json `placebo`: the control source, its weight among all the run's sources, and its verdict."""
    if rw.placebo is None:
        return None
    name = rw.placebo.name
    return rw.placebo.record() | {"weight": final[name], "weight_averaged": averaged[name],
                                  "evidence": evidence[name],
                                  "trajectory": [{"step": p["step"], "weight": p["weights"][name]}
                                                 for p in rw.trajectory]}


def log_finish(rw: Reweighting, doc: dict[str, Any]) -> None:
    """The log's last lines: weights, evidence with verdicts (and the placebo's), what a verdict would need, and
    whether the weights settled with what to do if not."""
    cfg = rw.recipe.reweight
    console.print(f"[bold green]weights[/] {format_weights(doc['weights'])}")
    console.print(f"[dim]averaged over steps {rw.avg_from + 1}-{cfg.steps}:[/] "
                  f"{format_weights(doc['weights_averaged'])}")
    control = doc.get("placebo")
    console.print(format_evidence(doc["evidence"], doc["evidence_level"], len(doc["evidence"]) + bool(control)))
    if control is not None:
        e = control["evidence"]
        p = f", p {e['p']:.2g}" if e.get("p") is not None else ""
        console.print(f"[bold]placebo[/] {escape(control['name'])} (half of {escape(control['split_from'])}, the "
                      f"same data): weight {control['weight']:.3f}, against {escape(control['split_from'])}: "
                      f"{e['verdict']}{p}  [dim]the run's noise floor: its verdict is a false alarm whenever it "
                      "is not unclear[/]")
    need = verdict.steps_for_verdict(doc["evidence"], doc["evidence_level"], cfg.lambda_every)
    if need is not None:  # the placebo is left out: unclear is what it should say
        unclear = ", ".join(escape(n) for n, e in doc["evidence"].items() if e["verdict"] == "unclear")
        batch = max(e["batch_steps"] for e in doc["evidence"].values())
        console.print(f"[yellow]unclear:[/] {unclear}; a verdict needs roughly {need + cfg.delay:,} steps (this "
                      f"run: {cfg.steps:,}; at least {verdict.MIN_BATCHES} batches of {batch} lam steps, then "
                      "enough of them for the effect)")
    line = settle_advice(doc["settled"], cfg.lambda_schedule)
    console.print(f"[yellow]{escape(line)}[/]" if line else "[dim]weights settled (no trend beyond noise over "
                  "the last quarter of the lam steps)[/]")


def source_info(source: DataSource, data: Tokens) -> dict[str, Any]:
    """weights.json `sources.NAME`: where it is, how many records were used, and how to read it again. For a lazy
    source the trainable and truncated counts are over the records tokenized (`num_tokenized`: its seeded sample
    and every record drawn)."""
    path = source.path if hub.is_hub_id(source.path) else str(Path(source.path).resolve())
    info: dict[str, Any] = {"path": path, "num_examples": data.num_records, "num_trainable": data.num_kept,
                            "num_truncated": data.num_truncated, "sha256": data.sha256}
    if data.lazy:
        info["num_tokenized"] = data.num_tokenized
    if not source.is_plain:
        info["max_samples"] = source.spec.max_samples
        info["source"] = data_sources.to_record(source)
    return info


def validation_info(rw: Reweighting) -> dict[str, Any]:
    """weights.json `validation`: the one set as a source, or each named set with its (normalised) weight."""
    infos = {n: source_info(s, d) for (n, s), d in zip(rw.data.vals.items(), rw.data.val_data)}
    if not rw.recipe.named_validation:
        return infos["validation"] if "validation" in infos else next(iter(infos.values()))
    return {n: info | {"weight": w} for (n, info), w in zip(infos.items(), rw.data.val_weights)}
