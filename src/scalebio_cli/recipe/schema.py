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
LAMBDA_OPTIMIZERS = ("adamw", "adam", "sgd")
LAMBDA_SIGNALS = ("difference", "relative")
LAMBDA_SCHEDULES = ("cosine", "constant")
SEED_MAX = 2**32 - 1  # what numpy and torch seeding take
TRACKERS = ("tensorboard", "wandb")  # report_to values (results/tracking.py)
STAGES = ("reweight", "finetune")
RW: tuple[str, ...] = ("reweight",)
FT: tuple[str, ...] = ("finetune",)
BOTH: tuple[str, ...] = STAGES
NONE: tuple[str, ...] = ()

PathKind = Literal["file", "model", "files"]


@dataclass(frozen=True)
class Check:
    """The values a field takes, declared with it: a range (`low`/`high`, open or closed ends) or a list of
    choices; `null`: None is allowed too; `note` follows the range in the message (what a boundary value means)."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] = ()
    null: bool = False
    note: str = ""

    def problem(self, key: str, value: Any) -> str | None:
        """None when `value` is allowed, else the message naming `key`, the allowed values and `value`."""
        if value is None and self.null:
            return None
        if self.choices:
            return None if value in self.choices else (
                f"{key}: must be one of {', '.join(self.choices)}, got {value!r}")
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        if above and below:
            return None
        return f"{key}: must be {self._range()}{' or null' if self.null else ''}{self.note}, got {value}"

    def _range(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {_number(self.low)}"
        return (f"in {'(' if self.open_low else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.open_high else ']'}")


def _number(x: float | None) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def at_least(low: float, note: str = "", null: bool = False) -> Check:
    return Check(low=low, note=note, null=null)


def above(low: float, null: bool = False) -> Check:
    return Check(low=low, open_low=True, null=null)


def within(low: float, high: float, open_low: bool = False, open_high: bool = True, note: str = "",
           null: bool = False) -> Check:
    return Check(low=low, high=high, open_low=open_low, open_high=open_high, note=note, null=null)


def one_of(*choices: str) -> Check:
    return Check(choices=choices)


RATE = within(0, 10, open_low=True)  # learning rates: (0, 10)


def setting(default: Any = dataclasses.MISSING, *, affects: tuple[str, ...], path: PathKind | None = None,
            factory: Any = dataclasses.MISSING, check: Check | None = None) -> Any:
    """A recipe field with its classification (see the module docstring) and the values it takes (`check`)."""
    meta = {"affects": affects, "path": path, "check": check}
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

    # blocks trainable at a time (the reference's 8B script); 0 = all blocks
    layers: int = setting(4, affects=BOTH, check=at_least(0, " (0 = all blocks)"))
    interval: int = setting(20, affects=BOTH, check=at_least(1))  # steps between re-draws
    # true: the backward pass reaches the input embeddings every step (they learn, as ALGORITHM.md says); false:
    # it stops at the lowest active block (cheaper) and the input embeddings are frozen (tied heads still learn)
    train_embeddings: bool = setting(True, affects=BOTH)


def _all_linear() -> list[str]:
    return ["all-linear"]


@dataclass
class LoraConfig:
    """LoRA adapters over one frozen base model (r = 0: off). In reweight, u and w are two adapters of the same
    base; in finetune, one adapter that is merged into the saved model."""

    # adapter rank; 0 = full-parameter (or LISA) training
    r: int = setting(0, affects=BOTH, check=at_least(0, " (0 = no LoRA)"))
    alpha: float = setting(16.0, affects=BOTH, check=above(0))  # scaling: the update is (alpha / r) * B A
    dropout: float = setting(0.0, affects=BOTH, check=within(0, 1))  # dropout on the adapter's input
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
    # tokens per example; longer examples are cut on the right
    max_length: int = setting(1024, affects=BOTH, check=at_least(8, " tokens"))
    # tokenized-data cache; default $SCALEBIO_CACHE or ~/.cache/scalebio
    cache_dir: str | None = setting(None, affects=NONE, path="file")
    # a Jinja chat template that replaces the tokenizer's for every record (and is saved with the fine-tuned model)
    chat_template: str | None = setting(None, affects=BOTH, path="file")
    # leave out of training the records of a source that copy (or nearly copy) a validation or test record
    # (data/checks.py; the log warns about them either way)
    decontaminate: bool = setting(False, affects=RW)


@dataclass
class ReweightConfig:
    """Defaults are for a pretrained model (what every user reweights): the reference's lam step with three
    variance-reducing choices that keep its fixed point (train/source_weights.py; docs/results.md, "The lam step").
    The reference's own values are in recipes/reference.yaml."""

    steps: int = setting(300, affects=RW, check=at_least(1))
    alpha: float = setting(10.0, affects=RW, check=above(0))  # penalty weight
    # AdamW rates of u and w: 1e-4 suits models up to ~1B parameters (the paper: 1e-5 GPT-2, 2e-6 Llama-3-8B + LISA)
    lr_u: float = setting(1e-4, affects=RW, check=RATE)
    lr_w: float = setting(1e-4, affects=RW, check=RATE)
    lr_lambda: float = setting(5e-2, affects=RW, check=RATE)
    # adamw: the reference's (torch AdamW, its default weight decay 0.01 pulling lam towards uniform); adam: the
    # same without decay; sgd
    lambda_optimizer: str = setting("adamw", affects=RW, check=one_of(*LAMBDA_OPTIMIZERS))
    # what the lam gradient alpha * J^T d is made of: difference (d = m(w) - m(u), the method as written) or
    # relative (d / m(u): NOT the same objective: to first order the lam gradient of sum_k s_k log m_k, which moves
    # the fixed point against low-loss sources; kept for comparison)
    lambda_signal: str = setting("difference", affects=RW, check=one_of(*LAMBDA_SIGNALS))
    # constant: lam keeps its rate after warmup (the signal grows as w moves away from u); cosine: lam's rate decays
    # with u's and w's (the reference)
    lambda_schedule: str = setting("constant", affects=RW, check=one_of(*LAMBDA_SCHEDULES))
    # steps u and w train on the uniform mixture before lam moves (u warms up); null: min(10, steps // 5)
    lambda_delay: int | None = setting(None, affects=RW)
    # one lam step per N steps, from the mean paired difference of those N steps (N x the examples per source)
    lambda_every: int = setting(1, affects=RW)
    # alpha grows by this factor every tau_every steps (1: constant)
    tau: float = setting(1.0, affects=RW, check=at_least(1, " (alpha grows or stays)"))
    tau_every: int = setting(50, affects=RW, check=at_least(1))  # steps per round of alpha growth
    # training examples per step, all sources and processes together
    batch_size: int = setting(32, affects=RW, check=at_least(1))
    # validation examples per step, all processes together (the reference validates on as many as it trains on)
    val_batch_size: int = setting(32, affects=RW, check=at_least(1))
    # balanced: every source equally often in every batch (an unbiased estimate of sum_k s_k m_k, lower variance for
    # small sources); pooled: drawn from all sources pooled, proportional to their sizes (the reference's batches)
    batch_composition: str = setting("balanced", affects=RW, check=one_of(*BATCH_COMPOSITIONS))
    # examples per forward pass on one process (gradient accumulation: the same gradient up to rounding)
    micro_batch_size: int = setting(8, affects=NONE, check=at_least(1))
    # linear warmup, then cosine decay (u, w and lambda)
    warmup_ratio: float = setting(0.03, affects=RW, check=within(0, 1))
    weight_decay: float = setting(5e-4, affects=RW, check=at_least(0))  # AdamW decay of u and w (reference value)
    # clip u and w gradients at max_grad_norm * alpha; null = no clipping
    max_grad_norm: float | None = setting(1.0, affects=RW, check=above(0, null=True))
    log_every: int = setting(10, affects=NONE, check=at_least(1))  # steps between metrics lines and trajectory points
    # a source is called raised or lowered when its p (two-sided, Holm-adjusted over the run's sources) is below this
    evidence_level: float = setting(0.05, affects=NONE, check=within(0, 1, open_low=True, open_high=True))
    # true: a random half of the largest source becomes a control source (identical data; weights.json `placebo`)
    placebo: bool = setting(False, affects=RW)
    gradient_checkpointing: bool = setting(False, affects=NONE)
    lisa: LisaConfig = section(LisaConfig, stage="reweight")
    lora: LoraConfig = section(LoraConfig, stage="reweight")

    @property
    def delay(self) -> int:
        """lambda_delay as run: the value written, or min(10, steps // 5) when null."""
        return min(10, self.steps // 5) if self.lambda_delay is None else self.lambda_delay


def named_sets(value: SourceSpec | dict[str, SourceSpec] | None) -> dict[str, SourceSpec]:
    """Validation sets by name (data.validation, finetune.validation); one set without a name is `validation`."""
    if value is None:
        return {}
    return dict(value) if isinstance(value, dict) else {"validation": value}


def plain_sets(value: SourceSpec | dict[str, SourceSpec] | None) -> Any:
    """The recipe form of one set or named sets (a set that is only a path stays a string)."""
    if isinstance(value, SourceSpec):
        return value.to_plain()
    if isinstance(value, dict):
        return {n: spec.to_plain() for n, spec in value.items()}
    return value


@dataclass
class FinetuneConfig:
    data: str | None = setting(None, affects=FT, path="file")  # a data file in any supported format ...
    weights: str | None = setting(None, affects=FT, path="file")  # ... or a weights.json: mix data.sources
    # periodic held-out loss: one set (a path or a mapping) or named sets {NAME: ...}, as data.validation (no weight)
    validation: SourceSpec | dict[str, SourceSpec] | None = setting(None, affects=NONE, path="file")
    epochs: float = setting(1.0, affects=FT, check=above(0))
    lr: float = setting(2e-5, affects=FT, check=RATE)
    batch_size: int = setting(32, affects=FT, check=at_least(1))  # examples per optimizer step, all processes together
    micro_batch_size: int = setting(8, affects=NONE, check=at_least(1))
    warmup_ratio: float = setting(0.03, affects=FT, check=within(0, 1))
    weight_decay: float = setting(0.0, affects=FT, check=at_least(0))
    max_grad_norm: float | None = setting(1.0, affects=FT, check=above(0, null=True))
    log_every: int = setting(10, affects=NONE, check=at_least(1))
    # steps between validation losses (when `validation` is set)
    eval_every: int = setting(100, affects=NONE, check=at_least(1))
    gradient_checkpointing: bool = setting(False, affects=NONE)
    lisa: LisaConfig = section(_finetune_lisa, stage="finetune")
    lora: LoraConfig = section(LoraConfig, stage="finetune")

    def validation_sets(self) -> dict[str, SourceSpec]:
        """The validation sets by name; one set written without a name is called `validation`."""
        return named_sets(self.validation)

    @property
    def named_validation(self) -> bool:
        """Whether finetune.validation names its sets (each set's loss is logged under its name)."""
        return isinstance(self.validation, dict)


def _attention_projections() -> list[str]:
    return ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class RhoLossConfig:
    """RHO-loss (Mindermann et al. 2022): score = a record's response loss under `model` minus under an
    irreducible-loss model: `model` fitted to a fit part of data.validation until the loss on its held-out part stops
    improving (selection/irreducible.py; docs/internals.md, "RHO-loss"). Its own defaults, not the finetune
    section's: a fine-tune keeps a model's general ability over many steps; this model must learn a few hundred
    records within tens of steps, and early stopping on held-out data guards against over-fitting."""

    # share of the validation records held out (the fit part trains, the held-out part decides when to stop)
    heldout_fraction: float = setting(0.2, affects=NONE, check=within(0, 1, open_low=True))
    holdout_epochs: int = setting(30, affects=NONE, check=at_least(1))  # most epochs over the fit part
    patience: int = setting(2, affects=NONE, check=at_least(1))  # epochs without a better held-out loss: stop
    min_steps: int = setting(50, affects=NONE, check=at_least(0))  # optimizer steps at least, whatever it does
    # AdamW, constant. Measured on SmolLM2-135M (docs/internals.md, "RHO-loss"): at 1e-4 the model over-fits 80
    # records within 10 steps and RHO-loss kept 52-55% clean; at 3e-5 it improves for two epochs and kept 66-82%.
    # Lower it for larger models (the held-out loss in the log says whether it fitted)
    lr: float = setting(3e-5, affects=NONE, check=RATE)
    batch_size: int = setting(8, affects=NONE, check=at_least(1))  # records a step (small: steps on little data)
    micro_batch_size: int = setting(8, affects=NONE, check=at_least(1))  # records per forward pass (training, scoring)
    # how a record's token losses become its score: `sum` (of base minus irreducible token losses) or `mean`
    score: str = setting("sum", affects=NONE, check=one_of("sum", "mean"))


@dataclass
class LessConfig:
    """LESS (Xia et al. 2024): LoRA warm-up on a seeded fraction of the pool, per-record LoRA gradients (Adam-
    preconditioned with each epoch checkpoint's moments), a seeded Rademacher projection, cosine to the validation
    sets' mean gradients. Published values except where marked CPU-sized (set the published ones on a GPU)."""

    # share of the pool the warm-up trains on (published 5%)
    warmup_fraction: float = setting(0.05, affects=NONE, check=within(0, 1, open_low=True, open_high=False))
    # CPU-sized: published 128 (the projection's cost grows with it)
    lora_r: int = setting(8, affects=NONE, check=at_least(1))
    # CPU-sized with r: published 512 (alpha / r = 4 kept)
    lora_alpha: float = setting(32.0, affects=NONE, check=above(0))
    lora_dropout: float = setting(0.1, affects=NONE, check=within(0, 1))  # published
    target_modules: list[str] = setting(affects=NONE, factory=_attention_projections)  # published: q/k/v/o
    epochs: int = setting(4, affects=NONE, check=at_least(1))  # warm-up epochs = checkpoints scored (published 4)
    lr: float = setting(2e-5, affects=NONE, check=RATE)  # peak, linear decay after warmup (published)
    warmup_ratio: float = setting(0.03, affects=NONE, check=within(0, 1))  # published
    batch_size: int = setting(32, affects=NONE, check=at_least(1))  # warm-up examples per optimizer step (published 32)
    # CPU-sized: published 8,192 (4,096 common); each record's projection costs LoRA parameters x dims
    projection_dim: int = setting(1024, affects=NONE, check=at_least(1))
    micro_batch_size: int = setting(8, affects=NONE, check=at_least(1))  # records per gradient batch


@dataclass
class SelectConfig:
    """`scalebio select`: the paper's per-record baselines (ALGORITHM.md, "The paper's baselines")."""

    # where the irreducible-loss model, warm-up checkpoints and gradient features are kept (and reused on a
    # rerun); default OUTPUT_DIR/select
    work_dir: str | None = setting(None, affects=NONE, path="file")
    rho_loss: RhoLossConfig = section(RhoLossConfig)
    less: LessConfig = section(LessConfig)


GROUP_SMALL = ("merge", "refuse")


def _k_sweep() -> list[int]:
    return [2, 3, 4, 5, 6, 8, 10, 12, 16]


@dataclass
class GroupConfig:
    """`scalebio group`: groups within sources (ALGORITHM.md, "Groups within a source"). Features from `model` (or
    group.model): each record's last hidden states mean-pooled over its response (and its prompt), and its response
    loss (appended so that corrupted answers separate); k-means over them (scikit-learn)."""

    # auto (the silhouette score over k_sweep, on a sample) or a number of clusters
    k: str = setting("auto", affects=NONE)
    k_sweep: list[int] = setting(affects=NONE, factory=_k_sweep)  # the k tried by k=auto
    silhouette_sample: int = setting(2000, affects=NONE, check=at_least(10))  # records the silhouette is scored on
    # the response loss's weight in the distance, per nat (1: records 1 nat apart in loss are as far apart as two a
    # standard deviation apart in every dimension of the response's hidden states)
    loss_weight: float = setting(1.0, affects=NONE, check=at_least(0))
    # the prompt's pooled hidden states next to the response's (0: left out; the response carries topic and
    # quality, while prompt templates can outweigh a corrupted answer). Model-dependent (docs/results.md, "Groups
    # within sources"): 1 split off-topic records better with SmolLM2 on the messy file (pooled sources: the same
    # direction, not sure at 3 seeds), while with the tiny demo model it mixed "." answers into the clean groups;
    # recipes/messy-file.yaml sets 1
    prompt_weight: float = setting(0.0, affects=NONE, check=at_least(0))
    # hidden dimensions kept by PCA before clustering (0: all); fewer dimensions, less noise, faster k-means
    pca_dims: int = setting(32, affects=NONE, check=at_least(0, " (0 = no PCA)"))
    # a group (source x cluster) with fewer records is merged into the cluster with the nearest centroid in its
    # source (or refused: group.small); null: reweight.batch_size
    min_size: int | None = setting(None, affects=NONE, check=at_least(1, null=True))
    small: str = setting("merge", affects=NONE, check=one_of(*GROUP_SMALL))
    # features from this model instead of `model` (a folder AutoModelForCausalLM loads, e.g. a larger one)
    model: str | None = setting(None, affects=NONE, path="model")
    micro_batch_size: int = setting(8, affects=NONE, check=at_least(1))  # records per feature forward pass
    examples: int = setting(3, affects=NONE, check=at_least(0))  # example records per group in the manifest


@dataclass
class CheckpointConfig:
    # steps between checkpoints (reweight and finetune); 0 = only on signals
    every: int = setting(100, affects=NONE, check=at_least(0, " (0 = never)"))
    keep: int = setting(2, affects=NONE, check=at_least(1))  # complete checkpoints kept


@dataclass
class Recipe:
    # a folder AutoModelForCausalLM loads (or a hub id on machines with a hub)
    model: str = setting("", affects=BOTH, path="model")
    tokenizer: str | None = setting(None, affects=BOTH, path="model")  # defaults to `model`
    output_dir: str = setting("", affects=NONE, path="file")
    seed: int = setting(0, affects=BOTH,
                        check=within(0, SEED_MAX, open_high=False, note=" (what numpy and torch seeding take)"))
    # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    precision: str = setting("auto", affects=BOTH, check=one_of(*PRECISIONS))
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
    group: GroupConfig = section(GroupConfig)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what recipe.yaml and weights.json record): a source that is only a path stays a string, as
        a v1 recipe wrote it."""
        tree = dataclasses.asdict(self)
        data = self.data
        tree["data"]["sources"] = {n: spec.to_plain() for n, spec in data.sources.items()}
        tree["data"]["validation"] = plain_sets(data.validation)
        tree["finetune"]["validation"] = plain_sets(self.finetune.validation)
        return tree

    def validation_sets(self) -> dict[str, SourceSpec]:
        """The validation sets by name; one set written without a name is called `validation`."""
        return named_sets(self.data.validation)

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


def value_problems(recipe: Recipe) -> list[str]:
    """Every field whose value its declared Check refuses, as messages naming the dotted key."""
    problems = []
    for key, f, _ in leaf_fields():
        check = f.metadata.get("check")
        if check is not None:
            value: Any = recipe
            for part in key.split("."):
                value = getattr(value, part)
            problem = check.problem(key, value)
            if problem:
                problems.append(problem)
    return problems


def path_fields() -> dict[str, PathKind]:
    """Dotted key -> kind of path, for every field that names a file, folder or model."""
    return {key: f.metadata["path"] for key, f, _ in leaf_fields() if f.metadata.get("path")}
