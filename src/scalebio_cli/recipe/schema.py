"""The recipe schema: typed dataclasses whose field metadata is the single source of truth.

Every leaf field is declared with `setting(...)`, which says
- `affects`: the stages whose result it changes (resuming a checkpoint of such a stage with the value changed is
  refused without `--force`); `()` for keys that change how, not what (logging, micro-batching, output paths);
- `path`: whether it names a file or folder (resolved against the recipe's folder), a model (a local folder, or a
  hub id kept as written), or a mapping of names to files.

`result_keys(stage)` and `path_fields()` are derived from it; tests/test_config.py fails if a field is unclassified.
This module imports nothing heavy: it runs before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

PRECISIONS = ("auto", "fp32", "bf16")
BATCH_COMPOSITIONS = ("balanced", "pooled")
LAMBDA_OPTIMIZERS = ("adam", "sgd")
LAMBDA_SIGNALS = ("difference", "relative")
LAMBDA_SCHEDULES = ("cosine", "constant")
TRACKERS = ("tensorboard", "wandb")  # report_to values (results/tracking.py)
STAGES = ("reweight", "finetune")
RW: tuple[str, ...] = ("reweight",)
FT: tuple[str, ...] = ("finetune",)
BOTH: tuple[str, ...] = STAGES
NONE: tuple[str, ...] = ()

PathKind = Literal["file", "model", "files"]


def setting(default: Any = dataclasses.MISSING, *, affects: tuple[str, ...], path: PathKind | None = None,
            factory: Any = dataclasses.MISSING) -> Any:
    """A recipe field with its classification (see the module docstring)."""
    meta = {"affects": affects, "path": path}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def section(factory: Any, stage: str | None = None) -> Any:
    """A nested section: its own fields carry the classification; `stage` confines them to the stage that reads
    the section (the shared LisaConfig of `reweight.lisa` changes only reweight's result)."""
    return field(default_factory=factory, metadata={"section": True, "stage": stage})


@dataclass
class LisaConfig:
    """Layerwise importance sampling: train `layers` random transformer blocks at a time."""

    layers: int = setting(4, affects=BOTH)  # blocks trainable at a time (the reference's 8B script); 0 = all blocks
    interval: int = setting(20, affects=BOTH)  # steps between re-draws
    # true: the backward pass reaches the input embeddings every step (they learn, as ALGORITHM.md says); false:
    # it stops at the lowest active block (cheaper) and the input embeddings are frozen (tied heads still learn)
    train_embeddings: bool = setting(True, affects=BOTH)


def _all_linear() -> list[str]:
    return ["all-linear"]


@dataclass
class LoraConfig:
    """LoRA adapters over one frozen base model (r = 0: off). In reweight, u and w are two adapters of the same
    base; in finetune, one adapter that is merged into the saved model."""

    r: int = setting(0, affects=BOTH)  # adapter rank; 0 = full-parameter (or LISA) training
    alpha: float = setting(16.0, affects=BOTH)  # scaling: the update is (alpha / r) * B A
    dropout: float = setting(0.0, affects=BOTH)  # dropout on the adapter's input
    # module names (e.g. q_proj, v_proj), or all-linear: every linear layer of the blocks (not the LM head)
    target_modules: list[str] = setting(affects=BOTH, factory=_all_linear)


def _finetune_lisa() -> LisaConfig:
    return LisaConfig(layers=0)


SPEC_FIELDS = ("messages", "conversations", "instruction", "input", "output", "prompt", "completion", "text",
               "system")  # what `columns` may map onto (the record formats of v1)


@dataclass
class SourceSpec:
    """Where one source (or validation set) is and how to read it: written in a recipe as a plain path, or as a
    mapping of these keys. Only `path` is required."""

    # a data file, a folder of data files (Hub repository layout), a glob, a `save_to_disk` folder, or a Hub id
    path: str = ""
    name: str | None = None  # the dataset's configuration (subset)
    split: str | None = None  # default: train
    columns: dict[str, str] = field(default_factory=dict)  # FIELD: COLUMN, FIELD one of SPEC_FIELDS
    max_samples: int | None = None  # use at most this many records (a seeded choice)
    split_by: str | None = None  # one source per distinct value of this column, named NAME/VALUE
    weight: float | None = None  # validation sets only: their share of L1 (default equal)

    @property
    def is_plain(self) -> bool:
        """Only a path: what a v1 recipe wrote (and what the recipe records as a plain string)."""
        return self == SourceSpec(self.path)

    def to_plain(self) -> str | dict[str, Any]:
        """The recipe form: the path alone, or the mapping of the keys that are set."""
        if self.is_plain:
            return self.path
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, {})}


@dataclass
class DataConfig:
    # name -> source (a path, or a SourceSpec mapping); order fixes the source index
    sources: dict[str, SourceSpec] = setting(affects=BOTH, path="files", factory=dict)
    # required by reweight: one set (a path or a mapping), or several named sets {NAME: {path, weight, ...}}
    validation: SourceSpec | dict[str, SourceSpec] | None = setting(None, affects=RW, path="file")
    max_length: int = setting(1024, affects=BOTH)  # tokens per example; longer examples are cut on the right
    # tokenized-data cache; default $SCALEBIO_CACHE or ~/.cache/scalebio
    cache_dir: str | None = setting(None, affects=NONE, path="file")
    # a Jinja chat template that replaces the tokenizer's for every record (and is saved with the fine-tuned model)
    chat_template: str | None = setting(None, affects=BOTH, path="file")


@dataclass
class ReweightConfig:
    """Defaults are for a pretrained model (what every user reweights): the reference's lam step with three
    variance-reducing choices that keep its fixed point (train/source_weights.py; docs/results.md, "The lam step").
    The reference's own values are in recipes/reference.yaml."""

    steps: int = setting(300, affects=RW)
    alpha: float = setting(10.0, affects=RW)  # penalty weight
    # AdamW rates of u and w: 1e-4 suits models up to ~1B parameters (the paper: 1e-5 GPT-2, 2e-6 Llama-3-8B + LISA)
    lr_u: float = setting(1e-4, affects=RW)
    lr_w: float = setting(1e-4, affects=RW)
    lr_lambda: float = setting(5e-2, affects=RW)
    lambda_optimizer: str = setting("adam", affects=RW)  # adam (the reference) | sgd
    # what the lam gradient alpha * J^T d is made of: difference (d = m(w) - m(u), the method as written) or
    # relative (d / m(u): NOT the same objective: to first order the lam gradient of sum_k s_k log m_k, which moves
    # the fixed point against low-loss sources; kept for comparison)
    lambda_signal: str = setting("difference", affects=RW)
    # constant: lam keeps its rate after warmup (the signal grows as w moves away from u); cosine: lam's rate decays
    # with u's and w's (the reference)
    lambda_schedule: str = setting("constant", affects=RW)
    # steps u and w train on the uniform mixture before lam moves (u warms up); null: min(10, steps // 5)
    lambda_delay: int | None = setting(None, affects=RW)
    # one lam step per N steps, from the mean paired difference of those N steps (N x the examples per source)
    lambda_every: int = setting(1, affects=RW)
    tau: float = setting(1.0, affects=RW)  # alpha grows by this factor every tau_every steps (1: constant)
    tau_every: int = setting(50, affects=RW)  # steps per round of alpha growth
    batch_size: int = setting(32, affects=RW)  # training examples per step, all sources and processes together
    # validation examples per step, all processes together (the reference validates on as many as it trains on)
    val_batch_size: int = setting(32, affects=RW)
    # balanced: every source equally often in every batch (an unbiased estimate of sum_k s_k m_k, lower variance for
    # small sources); pooled: drawn from all sources pooled, proportional to their sizes (the reference's batches)
    batch_composition: str = setting("balanced", affects=RW)
    # examples per forward pass on one process (gradient accumulation: the same gradient up to rounding)
    micro_batch_size: int = setting(8, affects=NONE)
    warmup_ratio: float = setting(0.03, affects=RW)  # linear warmup, then cosine decay (u, w and lambda)
    weight_decay: float = setting(5e-4, affects=RW)  # AdamW decay of u and w (reference value)
    # clip u and w gradients at max_grad_norm * alpha; null = no clipping
    max_grad_norm: float | None = setting(1.0, affects=RW)
    log_every: int = setting(10, affects=NONE)  # steps between metrics lines and trajectory points
    gradient_checkpointing: bool = setting(False, affects=NONE)
    lisa: LisaConfig = section(LisaConfig, stage="reweight")
    lora: LoraConfig = section(LoraConfig, stage="reweight")

    @property
    def delay(self) -> int:
        """lambda_delay as run: the value written, or min(10, steps // 5) when null."""
        return min(10, self.steps // 5) if self.lambda_delay is None else self.lambda_delay


@dataclass
class FinetuneConfig:
    data: str | None = setting(None, affects=FT, path="file")  # a data file in any supported format ...
    weights: str | None = setting(None, affects=FT, path="file")  # ... or a weights.json: mix data.sources
    validation: str | None = setting(None, affects=NONE, path="file")  # periodic held-out loss
    epochs: float = setting(1.0, affects=FT)
    lr: float = setting(2e-5, affects=FT)
    batch_size: int = setting(32, affects=FT)  # examples per optimizer step, all processes together
    micro_batch_size: int = setting(8, affects=NONE)
    warmup_ratio: float = setting(0.03, affects=FT)
    weight_decay: float = setting(0.0, affects=FT)
    max_grad_norm: float | None = setting(1.0, affects=FT)
    log_every: int = setting(10, affects=NONE)
    eval_every: int = setting(100, affects=NONE)  # steps between validation losses (when `validation` is set)
    gradient_checkpointing: bool = setting(False, affects=NONE)
    lisa: LisaConfig = section(_finetune_lisa, stage="finetune")
    lora: LoraConfig = section(LoraConfig, stage="finetune")


def _attention_projections() -> list[str]:
    return ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class RhoLossConfig:
    """RHO-loss (Mindermann et al. 2022): score = a record's mean response-token loss under `model` minus under an
    irreducible-loss model (`model` fine-tuned on data.validation). null: the finetune section's value."""

    holdout_epochs: float | None = setting(None, affects=NONE)  # epochs of the irreducible model over validation
    lr: float | None = setting(None, affects=NONE)  # its learning rate
    batch_size: int | None = setting(None, affects=NONE)  # its examples per optimizer step
    micro_batch_size: int = setting(8, affects=NONE)  # records per scoring forward pass


@dataclass
class LessConfig:
    """LESS (Xia et al. 2024): LoRA warm-up on a seeded fraction of the pool, per-record LoRA gradients (Adam-
    preconditioned with each epoch checkpoint's moments), a seeded Rademacher projection, cosine to the validation
    sets' mean gradients. Published values except where marked CPU-sized (set the published ones on a GPU)."""

    warmup_fraction: float = setting(0.05, affects=NONE)  # share of the pool the warm-up trains on (published 5%)
    lora_r: int = setting(8, affects=NONE)  # CPU-sized: published 128 (the projection's cost grows with it)
    lora_alpha: float = setting(32.0, affects=NONE)  # CPU-sized with r: published 512 (alpha / r = 4 kept)
    lora_dropout: float = setting(0.1, affects=NONE)  # published
    target_modules: list[str] = setting(affects=NONE, factory=_attention_projections)  # published: q/k/v/o
    epochs: int = setting(4, affects=NONE)  # warm-up epochs = checkpoints scored (published 4)
    lr: float = setting(2e-5, affects=NONE)  # peak, linear decay after warmup (published)
    warmup_ratio: float = setting(0.03, affects=NONE)  # published
    batch_size: int = setting(32, affects=NONE)  # warm-up examples per optimizer step (published 32)
    # CPU-sized: published 8,192 (4,096 common); each record's projection costs LoRA parameters x dims
    projection_dim: int = setting(1024, affects=NONE)
    micro_batch_size: int = setting(8, affects=NONE)  # records per gradient batch


@dataclass
class SelectConfig:
    """`scalebio select`: the paper's per-record baselines (ALGORITHM.md, "The paper's baselines")."""

    # where the irreducible-loss model, warm-up checkpoints and gradient features are kept (and reused on a
    # rerun); default OUTPUT_DIR/select
    work_dir: str | None = setting(None, affects=NONE, path="file")
    rho_loss: RhoLossConfig = section(RhoLossConfig)
    less: LessConfig = section(LessConfig)


@dataclass
class CheckpointConfig:
    every: int = setting(100, affects=NONE)  # steps between checkpoints (reweight and finetune); 0 = only on signals
    keep: int = setting(2, affects=NONE)  # complete checkpoints kept


@dataclass
class Recipe:
    # a folder AutoModelForCausalLM loads (or a hub id on machines with a hub)
    model: str = setting("", affects=BOTH, path="model")
    tokenizer: str | None = setting(None, affects=BOTH, path="model")  # defaults to `model`
    output_dir: str = setting("", affects=NONE, path="file")
    seed: int = setting(0, affects=BOTH)
    precision: str = setting("auto", affects=BOTH)  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    trust_remote_code: bool = setting(False, affects=BOTH)  # run modelling code shipped inside the model folder
    # a DeepSpeed config (JSON): train u, w / the model with DeepSpeed ZeRO (an engine: the same result)
    deepspeed: str | None = setting(None, affects=NONE, path="file")
    # trackers that receive every metrics line too: tensorboard (OUTPUT_DIR/tensorboard/), wandb
    report_to: list[str] = setting(affects=NONE, factory=list)
    data: DataConfig = section(DataConfig)
    reweight: ReweightConfig = section(ReweightConfig, stage="reweight")
    finetune: FinetuneConfig = section(FinetuneConfig, stage="finetune")
    checkpoint: CheckpointConfig = section(CheckpointConfig)
    select: SelectConfig = section(SelectConfig)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what recipe.yaml and weights.json record): a source that is only a path stays a string, as
        a v1 recipe wrote it."""
        tree = dataclasses.asdict(self)
        data = self.data
        tree["data"]["sources"] = {n: spec.to_plain() for n, spec in data.sources.items()}
        if isinstance(data.validation, SourceSpec):
            tree["data"]["validation"] = data.validation.to_plain()
        elif isinstance(data.validation, dict):
            tree["data"]["validation"] = {n: spec.to_plain() for n, spec in data.validation.items()}
        return tree

    def validation_sets(self) -> dict[str, SourceSpec]:
        """The validation sets by name; one set written without a name is called `validation`."""
        val = self.data.validation
        if val is None:
            return {}
        return dict(val) if isinstance(val, dict) else {"validation": val}

    @property
    def named_validation(self) -> bool:
        """Whether data.validation names its sets (several sets, weights, per-set losses in the logs)."""
        return isinstance(self.data.validation, dict)


# ---------------------------------------------------------------------------------------------------------------
# What the metadata says, derived once: the lists other modules used to keep by hand.


def leaf_fields(cls: type = Recipe, prefix: str = "",
                scope: str | None = None) -> list[tuple[str, dataclasses.Field[Any], str | None]]:
    """Every (dotted key, field, stage scope) below `cls`, sections expanded."""
    out: list[tuple[str, dataclasses.Field[Any], str | None]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("section"):
            out += leaf_fields(hints[f.name], f"{prefix}{f.name}.", f.metadata.get("stage") or scope)
        else:
            out.append((f"{prefix}{f.name}", f, scope))
    return out


def result_keys(stage: str) -> tuple[str, ...]:
    """Dotted keys whose change alters `stage`'s result (refused on --resume without --force)."""
    return tuple(key for key, f, scope in leaf_fields()
                 if stage in f.metadata["affects"] and scope in (None, stage))


def path_fields() -> dict[str, PathKind]:
    """Dotted key -> kind of path, for every field that names a file, folder or model."""
    return {key: f.metadata["path"] for key, f, _ in leaf_fields() if f.metadata.get("path")}
