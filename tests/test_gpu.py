"""On a CUDA device: the bilevel step in bf16 follows the fp32 CPU step (within bf16 noise), and a reweight run
through the CLI is deterministic up to that noise. Skipped without a GPU (conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli, write_recipe

pytestmark = pytest.mark.gpu


def _step(device: str, dtype: torch.dtype, tokenizer) -> torch.Tensor:
    from scalebio_cli.data.batch_plan import StepBatches
    from scalebio_cli.data.batching import collate
    from scalebio_cli.recipe.schema import LisaConfig
    from scalebio_cli.tiny import build_model
    from scalebio_cli.train.bilevel import bilevel_step
    from scalebio_cli.train.distributed import DistInfo
    from scalebio_cli.train.engine import Engine
    from scalebio_cli.train.source_weights import SourceWeights

    dev = torch.device(device)
    dist = DistInfo(0, 1, 0, dev)
    engines = []
    for _ in range(2):
        model = build_model(tokenizer, "llama", layers=2, hidden=64).to(dev, dtype)
        engines.append(Engine(model, lr=1e-3, weight_decay=0.0, max_grad_norm=None, total_steps=4,
                              warmup_ratio=0.0, lisa=LisaConfig(layers=0), seed=0, dist=dist))
    gen = torch.Generator().manual_seed(0)
    examples = [(torch.randint(5, len(tokenizer), (12,), generator=gen).numpy().astype("int32"),
                 torch.tensor([False] * 6 + [True] * 6).numpy()) for _ in range(6)]
    train = [collate(examples[:4], [0, 1, 0, 1], tokenizer.pad_token_id)]
    val = [collate(examples[4:], [2, 2], tokenizer.pad_token_id)]
    batch = StepBatches(train, val, torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0]), torch.tensor([2.0, 2.0]),
                        val_tokens=torch.tensor([10.0]), val_weights=torch.tensor([1.0]), num_tokens=0,
                        sampler_state={}).to(dev)
    lam = SourceWeights(2, 1e-2, 4, 0.0, dev)
    start = [p.detach().float().cpu().clone() for p in engines[0].model.parameters()]
    for step in range(3):  # the third step's losses come from models two updates away from the start
        result = bilevel_step(engines[0], engines[1], lam, batch, step, alpha=10.0, dist=dist)
    moved = max((p.detach().float().cpu() - q).abs().max().item() for p, q in zip(engines[0].model.parameters(),
                                                                                   start))
    return torch.cat([result.m_u, result.m_w]).float().cpu(), moved


def test_bf16_cuda_steps_follow_the_fp32_cpu_steps(tokenizer) -> None:
    """After two updates (not before any), bf16 on CUDA gives the fp32 CPU losses within bf16 noise, and the
    weights did move on both (a step that changed nothing would pass a loss comparison trivially)."""
    cpu, moved_cpu = _step("cpu", torch.float32, tokenizer)
    cuda, moved_cuda = _step("cuda", torch.bfloat16, tokenizer)
    assert moved_cpu > 1e-4 and moved_cuda > 1e-4
    assert torch.allclose(cpu, cuda, rtol=2e-2, atol=2e-2), (cpu, cuda)


def test_cuda_reweight_runs_are_repeatable(demo: Path, tmp_path: Path) -> None:
    weights = []
    for run in ("a", "b"):
        recipe = write_recipe(tmp_path / run / "recipe.yaml", demo)
        result = run_cli("reweight", "--config", str(recipe), "reweight.steps=20")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "cuda" in result.stderr
        weights.append(json.loads((recipe.parent / "run" / "weights.json").read_text())["weights"])
    assert max(abs(weights[0][k] - weights[1][k]) for k in weights[0]) < 1e-2
