"""The lam step as signal, not noise (ALGORITHM.md, "Noise in the lam step"):
- u's and w's per-source losses are paired, so the first lam gradient is exactly zero (dropout on);
- a source absent from a step's batch gets no gradient there, so a tiny pooled source neither climbs nor sinks;
- `lambda_every` takes one lam step from the mean paired difference of N steps;
- the evidence per source is calibrated (small |z| under no signal, large under signal);
- the sampling rule does not depend on what the token cache holds.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import invoke, write_recipe
from scalebio_cli.errors import InputError
from scalebio_cli.train.source_weights import SourceWeights, lambda_gradient, summarize

CPU = torch.device("cpu")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def with_dropout(demo: Path, folder: Path) -> Path:
    """A copy of the demo model with attention dropout on: u's and w's passes must draw the same masks."""
    shutil.copytree(demo / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config["attention_dropout"] = 0.2
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_first_lam_gradient_is_exactly_zero_with_dropout(demo: Path, tmp_path: Path) -> None:
    """u and w start equal, so their first per-source losses must be bitwise equal: the same micro-batches of B
    (w's validation examples in micro-batches of their own), the same dropout masks."""
    recipe = write_recipe(tmp_path / "recipe.yaml", demo, model=str(with_dropout(demo, tmp_path / "model")))
    result = invoke("reweight", "--config", str(recipe), "reweight.steps=3", "reweight.log_every=1",
                    "reweight.micro_batch_size=5")
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = metrics(tmp_path / "run")[:2]
    assert first["loss_u"] == first["loss_w"]
    assert set(first["lambda_grad"].values()) == {0.0}
    assert first["weights"] == pytest.approx(dict.fromkeys(first["weights"], 1 / 3), abs=0)  # lam did not move
    assert set(second["lambda_grad"].values()) != {0.0}  # after one step u and w differ: a real signal


def test_a_source_absent_from_a_step_gets_no_gradient() -> None:
    s = torch.softmax(torch.tensor([0.3, -0.2, 0.1, 0.0]), 0)
    m_u, m_w = torch.tensor([2.0, 1.5, 1.0, 0.0]), torch.tensor([1.8, 1.6, 0.9, 0.0])  # source 3 had no example
    present = torch.tensor([True, True, True, False])
    grad = lambda_gradient(s, m_w, m_u, alpha=2.0, present=present)
    assert grad[3] == 0
    # the present sources see exactly the gradient of the three-source problem with s renormalised over them
    s3 = s[:3] / s[:3].sum()
    assert torch.allclose(grad[:3] / s[:3], lambda_gradient(s3, m_w[:3], m_u[:3], alpha=2.0) / s3, atol=1e-6)
    # the reference's rule gave the absent source -alpha * s_3 * (s.d): pushed up whenever L2(w) > L2(u)
    assert lambda_gradient(s, m_w, m_u, alpha=2.0)[3] != 0


def _pooled_run(absent_gives_nothing: bool, shift: float, steps: int = 200) -> float:
    """Four sources drawn from one distribution, one of them with 1% of the records, pooled batches of 32; each
    step's paired difference is the same for every source (plus sampling noise) and shifted by `shift`. Returns
    the small source's final weight."""
    rng = np.random.default_rng(0)
    lam = SourceWeights(4, lr=2e-2, total_steps=steps, warmup_ratio=0.0, device=CPU)
    pool = np.array([0.33, 0.33, 0.33, 0.01])
    for step in range(steps):
        counts = rng.multinomial(32, pool)
        d = torch.tensor([shift + rng.normal(0, 0.05) / np.sqrt(max(n, 1)) for n in counts], dtype=torch.float32)
        present = torch.tensor(counts > 0)
        m_u = torch.full((4,), 2.0)
        m_w = m_u + d
        if not absent_gives_nothing:  # the reference: an absent source's means are 0, and it is counted anyway
            m_u, m_w = torch.where(present, m_u, 0.0), torch.where(present, m_w, 0.0)
            present = torch.ones(4, dtype=torch.bool)
        lam.observe(step, m_w, m_u, present, alpha=1.0)
    return float(lam.probs()[3])


@pytest.mark.parametrize("shift", [0.05, -0.05])
def test_a_tiny_identical_source_neither_climbs_nor_sinks_in_pooled_batches(shift: float) -> None:
    assert 0.15 < _pooled_run(True, shift) < 0.35  # uniform: 0.25
    reference = _pooled_run(False, shift)
    assert reference > 0.5 if shift > 0 else reference < 0.1  # what the reference's rule does to it


def test_lambda_every_steps_once_from_the_mean_paired_difference() -> None:
    every = SourceWeights(3, lr=0.1, total_steps=9, warmup_ratio=0.0, device=CPU, every=3, optimizer="sgd")
    ones = torch.ones(3, dtype=torch.bool)
    m_u = torch.tensor([2.0, 2.0, 2.0])
    diffs = [torch.tensor([-0.3, 0.1, 0.0]), torch.tensor([0.1, 0.1, 0.2]), torch.tensor([-0.1, 0.4, 0.1])]
    for t, d in enumerate(diffs[:2]):
        every.observe(t, m_u + d, m_u, ones, alpha=1.0)
        assert torch.equal(every.lam.detach(), torch.zeros(3))  # no lam step inside the window
    grad = every.observe(2, m_u + diffs[2], m_u, ones, alpha=1.0)
    mean = torch.stack(diffs).mean(0)
    expected = lambda_gradient(torch.full((3,), 1 / 3), m_u + mean, m_u, alpha=1.0)
    assert torch.allclose(grad, expected, atol=1e-6)
    assert torch.allclose(every.lam.detach(), -0.1 * expected, atol=1e-7)
    assert len(every.advantages) == 1


def test_evidence_is_small_under_noise_and_large_under_signal() -> None:
    rng = np.random.default_rng(1)
    null = [summarize(rng.normal(0, 1, 60))["z"] for _ in range(200)]
    assert np.mean(np.abs(null) > 3) < 0.05  # calibrated: |z| > 3 is rare when there is nothing to find
    assert summarize(rng.normal(0.5, 1, 60))["z"] > 3
    # correlated steps (u and w drift together): batch means widen the error a naive standard error would give
    ar = np.zeros(400)
    for t in range(1, 400):
        ar[t] = 0.9 * ar[t - 1] + rng.normal()
    assert summarize(ar)["stderr"] > 2 * ar.std(ddof=1) / np.sqrt(len(ar))
    # ... and never below the plain standard error: a few batch means that happen to agree claim no precision
    alternating = np.tile([1.0, -1.0], 30) + 0.1
    assert summarize(alternating)["stderr"] >= alternating.std(ddof=1) / np.sqrt(60)
    assert summarize(np.array([]))["z"] is None and summarize(np.array([0.3]))["stderr"] is None


def test_lam_state_resumes_exactly() -> None:
    ones = torch.ones(3, dtype=torch.bool)
    a = SourceWeights(3, lr=0.1, total_steps=8, warmup_ratio=0.25, device=CPU, every=2, delay=1)
    b = SourceWeights(3, lr=0.1, total_steps=8, warmup_ratio=0.25, device=CPU, every=2, delay=1)
    rng = np.random.default_rng(2)
    series = [torch.tensor(rng.normal(0, 0.1, 3), dtype=torch.float32) for _ in range(8)]
    for t in range(4):
        a.observe(t, 2 + series[t], torch.full((3,), 2.0), ones, alpha=1.0)
    saved = io.BytesIO()  # through bytes, as a checkpoint goes through a file (no tensor shared with `a`)
    torch.save(a.state_dict(), saved)
    saved.seek(0)
    b.load_state_dict(torch.load(saved))
    for t in range(4, 8):
        a.observe(t, 2 + series[t], torch.full((3,), 2.0), ones, alpha=1.0)
        b.observe(t, 2 + series[t], torch.full((3,), 2.0), ones, alpha=1.0)
    assert torch.equal(a.lam, b.lam) and a.advantages == b.advantages


def test_weights_json_carries_evidence(demo: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    result = invoke("reweight", "--config", str(recipe), "reweight.steps=12", "reweight.log_every=6")
    assert result.returncode == 0, result.stderr[-3000:]
    evidence = json.loads((tmp_path / "run" / "weights.json").read_text())["evidence"]
    assert set(evidence) == {"clean", "noisy", "offtopic"}
    for e in evidence.values():
        assert e["steps"] == 12 and e["stderr"] > 0 and e["z"] == pytest.approx(e["advantage"] / e["stderr"])
    assert "evidence" in result.stderr and "z" in result.stderr


def test_a_cursor_saved_under_another_sampling_rule_is_refused(tokenizer) -> None:
    from scalebio_cli.data.batch_plan import BatchPlan
    from scalebio_cli.recipe.schema import Recipe
    from scalebio_cli.train.distributed import DistInfo
    from test_algorithm import fake_data

    rng = np.random.default_rng(3)
    plan = BatchPlan([fake_data(rng, 10, len(tokenizer))] * 2, [fake_data(rng, 5, len(tokenizer))], [1.0],
                     Recipe(model="m", output_dir="o"), DistInfo(0, 1, 0, CPU), 0)
    plan.load_state_dict(plan.state_dict())
    with pytest.raises(InputError, match="older version"):
        plan.load_state_dict({"sources": [3, 4], "validation": 2}, "ckpt/step-000010")


def test_weights_do_not_depend_on_what_the_cache_holds(demo: Path, tmp_path: Path, monkeypatch) -> None:
    """A source read lazily (cold cache, large source) and the same source tokenized whole (an eval or finetune
    filled the cache) are drawn by one rule: bitwise the same weights, skipped records included."""
    from transformers import AutoTokenizer

    from scalebio_cli.data.tokens import tokenized
    from scalebio_cli.data.tokens.render import Renderer
    from scalebio_cli.stages import reweight

    records = [json.loads(line) for line in (demo / "data" / "clean.jsonl").read_text().splitlines()]
    long_prompt = {"messages": [{"role": "user", "content": "count " * 80},
                                {"role": "assistant", "content": "done."}]}  # cut by max_length: skipped
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in [*records[:150], *[long_prompt] * 30, *records[150:]]))
    monkeypatch.setattr(reweight, "LAZY_MIN_RECORDS", 50)  # mixed.jsonl counts as a large source
    sources = {"mixed": str(mixed), "noisy": str(demo / "data" / "noisy.json")}
    weights = []
    cache = tmp_path / "cache"
    for run in ("cold", "filled"):
        recipe = write_recipe(tmp_path / run / "recipe.yaml", demo)
        result = invoke("reweight", "--config", str(recipe), "reweight.steps=6", "reweight.log_every=3",
                        f"data.cache_dir={cache}", f"data.sources={json.dumps(sources)}")
        assert result.returncode == 0, result.stderr[-3000:]
        read = "mixed: 630 records, tokenized as drawn" if run == "cold" else "mixed: 600 examples"
        assert read in result.stderr
        weights.append(json.loads((recipe.parent / "run" / "weights.json").read_text())["weights"])
        if run == "cold":  # what `scalebio eval` / `finetune` leave behind: the whole source in the cache
            renderer = Renderer(AutoTokenizer.from_pretrained(demo / "model"), 64)
            assert tokenized.load_tokenized(mixed, renderer, cache).num_skipped == 30
    assert weights[0] == weights[1]


def conversations(records: list[dict], n: int, seed: int) -> list[dict]:
    """Chat records of 1-3 turns drawn from `records`: lengths that vary as instruct-math's do."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        turns = [m for i in rng.integers(0, len(records), int(rng.integers(1, 4))) for m in records[i]["messages"]]
        out.append({"messages": turns})
    return out


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("composition", ["balanced", pytest.param("pooled", marks=pytest.mark.slow)])
def test_no_signal_keeps_every_z_small(demo: Path, tmp_path: Path, composition: str) -> None:
    """Sources drawn from one distribution (one file split three ways, the validation set drawn from it too): the
    run cannot tell them apart, and its evidence must say so."""
    records = [json.loads(line) for line in (demo / "data" / "clean.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(records))
    parts = [[records[i] for i in order[k::4]] for k in range(4)]
    sources = {f"part{k}": write_jsonl(tmp_path / f"part{k}.jsonl", parts[k]) for k in range(3)}
    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    result = invoke("reweight", "--config", str(recipe), "reweight.steps=48", "reweight.log_every=48",
                    f"reweight.batch_composition={composition}", f"data.sources={json.dumps(sources)}",
                    f"data.validation={write_jsonl(tmp_path / 'val.jsonl', parts[3])}")
    assert result.returncode == 0, result.stderr[-3000:]
    evidence = json.loads((tmp_path / "run" / "weights.json").read_text())["evidence"]
    assert all(abs(e["z"]) < 3 for e in evidence.values()), evidence
