"""LISA under DeepSpeed ZeRO: a block that becomes active again starts from fresh Adam state (train/zero.py).

ZeRO steps every parameter group every step (frozen blocks with zero gradients and rate 0), so a block frozen for a
while carries decayed moments and a grown step count; the engine zeroes them when the block is drawn again. Finding
a group's state reaches into DeepSpeed internals, so these tests run the real ZeRO-2 and ZeRO-3 optimizers in this
process (a one-rank gloo group) and check the reset function on stand-ins whose internals are missing or empty.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from scalebio_cli.data.batching import collate
from scalebio_cli.recipe.schema import LisaConfig
from scalebio_cli.train.distributed import DistInfo
from scalebio_cli.train.lisa import draw_blocks
from scalebio_cli.train.zero import group_partitions, reset_group_state

BLOCKS = 4


@pytest.fixture(scope="module")
def one_rank() -> Iterator[DistInfo]:
    """A one-process gloo group in this process (what `distributed.setup(need_group=True)` makes for DeepSpeed),
    torn down after the module with the environment it needed."""
    pytest.importorskip("deepspeed")
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as env:
        for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                               LOCAL_RANK="0", DS_ACCELERATOR="cpu").items():
            env.setenv(key, value)
        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("gloo")
        try:
            yield DistInfo(0, 1, 0, torch.device("cpu"))
        finally:
            if owned:
                dist.destroy_process_group()


def away_and_back_seed() -> tuple[int, int]:
    """A seed whose 1-of-4 draws (interval 1) go block b, another block, block b: (seed, b)."""
    for seed in range(100):
        d = [draw_blocks(BLOCKS, 1, seed, i)[0] for i in range(3)]
        if d[0] == d[2] != d[1]:
            return seed, d[0]
    raise AssertionError("no such seed")  # pragma: no cover


def adam_state(engine, group: int) -> list[dict]:
    inner = engine.ds.optimizer.optimizer
    return [inner.state.get(t) for t in group_partitions(engine.ds.optimizer, group, engine.stage)]


def train_step(engine, tokenizer, step: int) -> None:
    rng = np.random.default_rng(step)
    examples = [(rng.integers(5, len(tokenizer), 12), np.array([False] * 4 + [True] * 8)) for _ in range(4)]
    with engine.sync_context(True):
        sums, counts = engine(collate(examples, [0] * 4, tokenizer.pad_token_id))
        engine.backward((sums / counts).mean())
    engine.step()


@pytest.mark.parametrize("stage", [2, 3])
def test_a_block_drawn_again_starts_from_fresh_adam_state(one_rank: DistInfo, tokenizer, stage: int) -> None:
    from scalebio_cli.tiny import build_model
    from scalebio_cli.train.zero import DeepSpeedEngine

    seed, block = away_and_back_seed()
    torch.manual_seed(0)
    engine = DeepSpeedEngine(build_model(tokenizer, "llama", layers=BLOCKS, hidden=32), lr=1e-2, weight_decay=0.0,
                             max_grad_norm=1.0, total_steps=10, warmup_ratio=0.0,
                             lisa=LisaConfig(layers=1, interval=1), seed=seed, dist=one_rank,
                             ds_config={"zero_optimization": {"stage": stage}}, micro_batches=1)
    assert engine.stage == stage
    for step in range(2):  # `block` trains at step 0, is frozen at step 1 (stepped with zero gradients, rate 0)
        engine.begin_step(step)
        assert engine.lisa.active == draw_blocks(BLOCKS, 1, seed, step)
        train_step(engine, tokenizer, step)
    away = adam_state(engine, block)
    assert away and all(s and float(s["step"]) == 2 and s["exp_avg"].any() and s["exp_avg_sq"].any() for s in away)

    engine.begin_step(2)  # drawn again
    assert engine.lisa.active == [block]
    for state in adam_state(engine, block):
        assert float(state["step"]) == 0
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    train_step(engine, tokenizer, 2)
    assert all(float(s["step"]) == 1 for s in adam_state(engine, block))  # its first update's bias correction

    rest = BLOCKS  # the group after the blocks: head, norm, embeddings; stepped every time, never reset
    assert all(float(s["step"]) == 3 and s["exp_avg"].any() for s in adam_state(engine, rest))
    reset_group_state(engine.ds.optimizer, rest, stage, stepped=True)
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any()
               for s in adam_state(engine, rest))


def _stepped_adamw(groups: list[list[torch.Tensor]]) -> torch.optim.AdamW:
    optimizer = torch.optim.AdamW([{"params": g} for g in groups], lr=1e-2)
    for t in (t for g in groups for t in g):
        t.grad = torch.ones_like(t)
    optimizer.step()
    return optimizer


def test_reset_group_state_zeroes_exactly_its_group_and_refuses_what_it_cannot_find() -> None:
    a, b, c = (torch.zeros(3, requires_grad=True) for _ in range(3))
    # ZeRO-3's shape: sub-groups (a, c) of group 0 and b of group 1, found through its private attributes
    zero3 = SimpleNamespace(optimizer=_stepped_adamw([[a, c], [b]]), sub_group_to_group_id={0: 0, 1: 1, 2: 0},
                            fp32_partitioned_groups_flat=[a, b, c])
    reset_group_state(zero3, 0, stage=3, stepped=True)
    state = zero3.optimizer.state
    assert all(float(state[t]["step"]) == 0 and not state[t]["exp_avg"].any() for t in (a, c))
    assert float(state[b]["step"]) == 1 and state[b]["exp_avg"].any()
    # every other stage: the inner optimizer's own param groups name the tensors it steps
    zero2 = SimpleNamespace(optimizer=_stepped_adamw([[a], [b]]))
    reset_group_state(zero2, 1, stage=2, stepped=True)
    assert float(zero2.optimizer.state[b]["step"]) == 0 and float(zero2.optimizer.state[a]["step"]) == 1

    renamed = SimpleNamespace(optimizer=zero3.optimizer, sub_group_to_group_id={0: 0, 1: 1, 2: 0})
    with pytest.raises(RuntimeError, match="has no attribute 'fp32_partitioned_groups_flat'"):
        reset_group_state(renamed, 0, stage=3, stepped=True)
    unstepped = SimpleNamespace(optimizer=torch.optim.AdamW([a, b], lr=1e-2))
    reset_group_state(unstepped, 0, stage=2, stepped=False)  # nothing stepped yet: already fresh
    with pytest.raises(RuntimeError, match="group 0 has no optimizer state after steps were taken"):
        reset_group_state(unstepped, 0, stage=2, stepped=True)
    elsewhere = SimpleNamespace(optimizer=zero3.optimizer, sub_group_to_group_id={0: 0},
                                fp32_partitioned_groups_flat=[a])
    with pytest.raises(RuntimeError, match="no optimizer tensors for parameter group 1"):
        reset_group_state(elsewhere, 1, stage=3, stepped=True)
    not_adam = SimpleNamespace(optimizer=torch.optim.SGD([a], lr=1e-2, momentum=0.9))
    a.grad = torch.ones_like(a)
    not_adam.optimizer.step()
    with pytest.raises(RuntimeError, match="no step, exp_avg, exp_avg_sq"):
        reset_group_state(not_adam, 0, stage=2, stepped=True)


def test_the_deepspeed_upper_bound_is_pinned() -> None:
    """train/zero.py reads DeepSpeed internals tested on 0.19: both extras that install DeepSpeed cap it."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for extra in ("deepspeed", "dev"):
        (spec,) = [d for d in extras[extra] if d.startswith("deepspeed")]
        assert "<0.20" in spec, (extra, spec)


# -- every shipped DeepSpeed config against the plain engine ---------------------------------------------------------

SHIPPED = sorted((Path(__file__).resolve().parent.parent / "recipes" / "deepspeed").glob("*.json"))


def plain_and_deepspeed(one_rank: DistInfo, tokenizer, ds_config: dict, steps: int) -> tuple[dict, dict]:
    """The weights after `steps` LISA steps (1 of 4 blocks, re-drawn every 3 steps, so blocks come back and start
    fresh) of our plain engine and of a DeepSpeedEngine under `ds_config`, from the same weights and batches.

    The rate is a fine-tuning one (3e-4): at 1e-2 this tiny model's Adam steps turn float-rounding differences into
    whole-step differences (a fresh block's update is g / (|g| + eps), about sign(g), where |g| is near eps), so
    engines that agree to 1e-6 at 3e-4 drift apart by 1e-2 there, ZeRO-3 against the plain engine included."""
    from scalebio_cli.tiny import build_model
    from scalebio_cli.train.engine import Engine
    from scalebio_cli.train.zero import DeepSpeedEngine

    common = dict(lr=3e-4, weight_decay=0.01, max_grad_norm=1.0, total_steps=steps, warmup_ratio=0.1,
                  lisa=LisaConfig(layers=1, interval=3), seed=1, dist=one_rank)
    plain = Engine(build_model(tokenizer, "llama", layers=BLOCKS, hidden=32), **common)
    deep = DeepSpeedEngine(build_model(tokenizer, "llama", layers=BLOCKS, hidden=32), ds_config=ds_config,
                           micro_batches=1, **common)
    for engine in (plain, deep):
        for step in range(steps):
            engine.begin_step(step)
            train_step(engine, tokenizer, step)
    return plain.full_state_dict(), deep.full_state_dict()


# Slow-marked (~35 s of CPU each, 90 s on a busy machine): `make test` runs the offload recipe to its first step
# (tests/test_recipes_start.py) and CPU Adam's LISA reset (below); tests/test_distributed.py compares ZeRO-2/3.
@pytest.mark.slow
@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.stem)
def test_each_shipped_deepspeed_config_runs_and_matches_the_plain_engine(one_rank: DistInfo, tokenizer,
                                                                          config: Path) -> None:
    """40 steps with LISA re-draws: the shipped config (its optimizer offload included, stepped by DeepSpeed's CPU
    Adam) learns the plain engine's weights within 1e-4 (measured: 4e-6 offload, 2e-6 ZeRO-3)."""
    from scalebio_cli.train.deepspeed_config import load_deepspeed_config

    ds_config = load_deepspeed_config(config)
    plain, deep = plain_and_deepspeed(one_rank, tokenizer, ds_config, steps=40)
    assert plain.keys() == deep.keys()
    worst = max((plain[k].float() - deep[k].float()).abs().max().item() for k in plain)
    moved = max((plain[k].float() - p0).abs().max().item() for k, p0 in initial_weights(tokenizer).items())
    assert worst < 1e-4, (config.name, worst)
    assert moved > 1e-3  # the 40 steps did train (the comparison is not of two untouched models)


def initial_weights(tokenizer) -> dict[str, torch.Tensor]:
    from scalebio_cli.tiny import build_model

    return {k: v.float() for k, v in build_model(tokenizer, "llama", layers=BLOCKS, hidden=32).state_dict().items()}


def test_offload_steps_with_deepspeeds_cpu_adam_and_resets_lisa_state(one_rank: DistInfo, tokenizer) -> None:
    """ZeRO-Offload refuses a torch optimizer: the engine hands DeepSpeed its CPU Adam, whose per-tensor state LISA's
    reset zeroes like torch's (a block drawn again starts fresh)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from scalebio_cli.tiny import build_model
    from scalebio_cli.train.deepspeed_config import load_deepspeed_config
    from scalebio_cli.train.zero import DeepSpeedEngine

    seed, block = away_and_back_seed()
    engine = DeepSpeedEngine(build_model(tokenizer, "llama", layers=BLOCKS, hidden=32), lr=1e-2, weight_decay=0.0,
                             max_grad_norm=1.0, total_steps=10, warmup_ratio=0.0,
                             lisa=LisaConfig(layers=1, interval=1), seed=seed, dist=one_rank,
                             ds_config=load_deepspeed_config(SHIPPED[[p.stem for p in SHIPPED].index("zero3_offload")]),
                             micro_batches=1)
    assert isinstance(engine.ds.optimizer.optimizer, DeepSpeedCPUAdam)
    for step in range(2):
        engine.begin_step(step)
        train_step(engine, tokenizer, step)
    assert all(s and int(s["step"]) == 2 and s["exp_avg"].any() for s in adam_state(engine, block))
    engine.begin_step(2)  # drawn again
    assert all(int(s["step"]) == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any()
               for s in adam_state(engine, block))
    train_step(engine, tokenizer, 2)
    assert all(int(s["step"]) == 1 for s in adam_state(engine, block))


def test_the_private_deepspeed_internals_scalebio_reads_are_there(one_rank: DistInfo, tokenizer) -> None:
    """train/zero.py reads three private DeepSpeed names (commented there with the version they were read from):
    ZeRO-3's sub-group map and fp32 partitions (LISA's state reset) and the engine's 16-bit consolidation (the
    gathered weights). A DeepSpeed that moves any of them fails here, on a real ZeRO-3 engine, by name."""
    from scalebio_cli.tiny import build_model
    from scalebio_cli.train.zero import _ZERO3_ATTRIBUTES, DeepSpeedEngine, gathered_state_dict

    model = build_model(tokenizer, "llama", layers=2, hidden=32)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    engine = DeepSpeedEngine(model, lr=1e-3, weight_decay=0.0, max_grad_norm=None, total_steps=1, warmup_ratio=0.0,
                             lisa=LisaConfig(layers=0, interval=1), seed=0, dist=one_rank,
                             ds_config={"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}},
                             micro_batches=1)
    for name in _ZERO3_ATTRIBUTES:
        assert hasattr(engine.ds.optimizer, name), f"DeepSpeed's ZeRO-3 optimizer no longer has {name}"
    groups = engine.ds.optimizer.sub_group_to_group_id
    assert sorted(set(groups.values())) == list(range(len(engine.ds.optimizer.param_groups)))
    assert len(engine.ds.optimizer.fp32_partitioned_groups_flat) == len(groups)
    assert hasattr(engine.ds, "_zero3_consolidated_16bit_state_dict")
    gathered = gathered_state_dict(engine.ds, one_rank)  # the partitioned weights, whole again, with their names
    assert gathered is not None and set(expected) <= set(gathered)
    assert all(torch.equal(gathered[k], expected[k]) for k in expected)


def test_lora_under_zero3_clips_each_adapter_with_one_collective_per_step(one_rank: DistInfo, tokenizer,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA under ZeRO-3 (train/zero_adapters.py; tested here, in this module's process group): each adapter's
    norm comes from the local gradient partitions and one all-reduce for all adapters (not a gather per tensor),
    and each adapter ends clipped to max_grad_norm by its own norm."""
    pytest.importorskip("peft")
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from scalebio_cli.recipe.schema import LisaConfig, LoraConfig
    from scalebio_cli.tiny import build_model
    from scalebio_cli.train.factory import Copy, make_engines
    from test_zero import train_step

    model = build_model(tokenizer, "llama", layers=2, hidden=32)
    engines = make_engines(model, [Copy(1e-3, 1, "u"), Copy(1e-3, 1, "w")],
                           lora=LoraConfig(r=4), lora_key="reweight.lora", lisa=LisaConfig(layers=0, interval=1),
                           ds_config={"zero_optimization": {"stage": 3}}, dist=one_rank, weight_decay=0.0,
                           max_grad_norm=1e-4, total_steps=2, warmup_ratio=0.0, seed=0)
    pair = engines[0].adapters
    calls: list[str] = []
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast"):
        original = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    clip = pair._clip_zero3
    seen: dict[str, float] = {}

    def counted(params):
        calls.clear()
        for adapter, ps in params.items():  # the norms before clipping, from whole gradients (test only)
            seen[adapter] = float(torch.stack([safe_get_full_grad(p).float().pow(2).sum() for p in ps]).sum().sqrt())
        calls.clear()
        clip(params)
        seen["calls"] = list(calls)
        for adapter, ps in params.items():
            seen[f"{adapter} after"] = float(torch.stack([safe_get_full_grad(p).float().pow(2).sum()
                                                          for p in ps]).sum().sqrt())

    monkeypatch.setattr(pair, "_clip_zero3", counted)
    for engine in engines:
        engine.begin_step(0)
    for step, engine in enumerate(engines):
        pair.boundary(engine.adapter, True)
        train_step(engine, tokenizer, step)
    assert seen["calls"] == ["all_reduce"]
    for adapter in ("u", "w"):
        assert seen[adapter] > 1e-4  # clipping was needed
        assert abs(seen[f"{adapter} after"] - 1e-4) < 1e-7, seen
        assert abs(float(pair.norms[adapter]) - seen[adapter]) <= 1e-6 * seen[adapter]
