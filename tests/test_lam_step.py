"""The lam step as signal, not noise (ALGORITHM.md, "Noise in the lam step"):
- u's and w's per-source losses are paired, so the first lam gradient is exactly zero (dropout on);
- a source absent from a step's batch gets no gradient there, so a tiny pooled source neither climbs nor sinks;
- `lambda_every` takes one lam step from the mean paired difference of N steps;
- the live lam step is `lambda_gradient` with the reference's optimizer (AdamW, decay 0.01) and tau's rates;
- the evidence per source carries p and a verdict, and a no-signal run calls nothing (tests/test_verdict.py
  simulates the estimator alone);
- the sampling rule does not depend on what the token cache holds.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import invoke, write_recipe
from scalebio_cli.errors import InputError
from scalebio_cli.train.source_weights import SourceWeights, lambda_gradient, paired_difference

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
    d = paired_difference(m_w, m_u)
    grad = lambda_gradient(s, d, alpha=2.0, present=present)
    assert grad[3] == 0
    # the present sources see exactly the gradient of the three-source problem with s renormalised over them
    s3 = s[:3] / s[:3].sum()
    assert torch.allclose(grad[:3] / s[:3], lambda_gradient(s3, d[:3], alpha=2.0) / s3, atol=1e-6)
    # the reference's rule gave the absent source -alpha * s_3 * (s.d): pushed up whenever L2(w) > L2(u)
    assert lambda_gradient(s, d, alpha=2.0)[3] != 0


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
    expected = lambda_gradient(torch.full((3,), 1 / 3), mean, alpha=1.0)
    assert torch.allclose(grad, expected, atol=1e-6)
    assert torch.allclose(every.lam.detach(), -0.1 * expected, atol=1e-7)
    assert len(every.advantages) == 1


def test_the_live_lam_step_is_lambda_gradient_with_the_references_adamw(monkeypatch) -> None:
    """SourceWeights steps with the very function the gradient tests check, and its default optimizer is the
    reference's: torch's AdamW with its default weight decay 0.01 (lam's optimizer is built before the reference
    sets u's and w's decay)."""
    from scalebio_cli.train import source_weights

    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return lambda_gradient(*args, **kwargs)

    monkeypatch.setattr(source_weights, "lambda_gradient", spy)
    ours = SourceWeights(3, lr=0.1, total_steps=5, warmup_ratio=0.0, device=CPU, schedule="constant")
    lam = torch.zeros(3, requires_grad=True)
    torch_adamw = torch.optim.AdamW([lam], lr=0.1)
    assert torch_adamw.defaults["weight_decay"] == 0.01
    m_u, ones = torch.full((3,), 2.0), torch.ones(3, dtype=torch.bool)
    for t, d in enumerate([[0.3, -0.1, 0.0], [0.2, 0.1, -0.2], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]):
        grad = ours.observe(t, m_u + torch.tensor(d), m_u, ones, alpha=1.0)
        lam.grad = grad.clone()
        torch_adamw.step()
        assert torch.allclose(ours.lam.detach(), lam.detach(), atol=1e-7)
    assert len(calls) == 4
    plain = SourceWeights(3, lr=0.1, total_steps=5, warmup_ratio=0.0, device=CPU, optimizer="adam")
    assert isinstance(plain.optimizer, torch.optim.Adam) and not isinstance(plain.optimizer, torch.optim.AdamW)


def test_tau_scales_every_rate_and_the_clipping_follows_alpha(demo: Path, tmp_path: Path) -> None:
    """The reference divides every rate by tau in each round in which alpha grows by tau; the clipping threshold
    is max_grad_norm x the alpha in force (train/loop.py)."""
    from types import SimpleNamespace

    from scalebio_cli.train import loop

    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    result = invoke("reweight", "--config", str(recipe), "reweight.steps=4", "reweight.log_every=1",
                    "reweight.tau=2", "reweight.tau_every=2", "reweight.warmup_ratio=0",
                    "reweight.lambda_schedule=constant")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(tmp_path / "run")
    base = rows[0]["lr_lambda"]
    assert [r["lr_lambda"] / base for r in rows] == pytest.approx([1, 1, 0.5, 0.5])
    u_rates = [r["lr_u"] for r in rows]  # cosine over 4 steps, then halved from step 3
    assert u_rates[2] / u_rates[1] < 0.6 and u_rates[3] < u_rates[2]
    cfg = SimpleNamespace(tau=2.0, tau_every=2, alpha=10.0)
    assert [loop.tau_scale(cfg, step) for step in range(5)] == [1, 1, 0.5, 0.5, 0.25]
    engine = SimpleNamespace(max_grad_norm=10.0)
    loop.set_clip(engine, 40.0)
    assert engine.max_grad_norm == 40.0
    pair = SimpleNamespace(adapters=SimpleNamespace(max_grad_norm=1.0))
    loop.set_clip(pair, 3.0)
    assert pair.adapters.max_grad_norm == 3.0


def test_the_reference_recipe_is_the_references_lam_step() -> None:
    """recipes/reference.yaml: LISA's default of the reference (2 layers every 20 steps), no warmup and no
    clipping (the GPT-2 script has neither), cosine rates, AdamW on lam, pooled batches."""
    import yaml

    from scalebio_cli.recipe.schema import ReweightConfig

    path = Path(__file__).resolve().parent.parent / "recipes" / "reference.yaml"
    ref = yaml.safe_load(path.read_text())["reweight"]
    assert ref["lisa"] == {"layers": 2, "interval": 20}
    assert ref["warmup_ratio"] == 0 and ref["max_grad_norm"] is None
    assert ref["lambda_schedule"] == "cosine" and ref["batch_composition"] == "pooled"
    assert ref.get("lambda_optimizer", ReweightConfig().lambda_optimizer) == "adamw"


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
    """Every source gets p and a verdict at the recipe's level; 12 steps under LISA's 20-step blocks are too few
    batches for an error: no stderr, "unclear", and the log says roughly how many steps a verdict needs. (The batches
    of a run without LISA: test_no_signal_calls_no_source.)"""
    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    result = invoke("reweight", "--config", str(recipe), "reweight.steps=12", "reweight.log_every=6",
                    "reweight.evidence_level=0.01")
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((tmp_path / "run" / "weights.json").read_text())
    evidence = doc["evidence"]
    assert set(evidence) == {"clean", "noisy", "offtopic"} and doc["evidence_level"] == 0.01
    for e in evidence.values():
        assert e["steps"] == 12 and e["stderr"] is None and e["p"] is None and e["verdict"] == "unclear"
        assert e["batch_steps"] == 20 and e["batches"] == 0
    assert "verdict from t at p < 0.01" in result.stderr and "a verdict needs roughly 80 steps" in result.stderr
    # 12 lam steps cannot show that a weight levelled off (the demo's 200 can: test_reweight_cli)
    assert doc["settled"]["all"] is False and not any(doc["settled"]["by_source"].values())


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


def no_signal_sources(demo: Path, folder: Path) -> tuple[dict[str, str], str]:
    """The demo's clean source split four ways: three sources and a validation set of one distribution."""
    records = [json.loads(line) for line in (demo / "data" / "clean.jsonl").read_text().splitlines()]
    order = np.random.default_rng(0).permutation(len(records))
    parts = [[records[i] for i in order[k::4]] for k in range(4)]
    sources = {f"part{k}": write_jsonl(folder / f"part{k}.jsonl", parts[k]) for k in range(3)}
    return sources, write_jsonl(folder / "val.jsonl", parts[3])


@pytest.mark.parametrize("composition", ["balanced", pytest.param("pooled", marks=pytest.mark.slow)])
def test_no_signal_calls_no_source(demo: Path, tmp_path: Path, composition: str) -> None:
    """Sources drawn from one distribution (one file split three ways, the validation set drawn from it too): the
    run cannot tell them apart, and its verdicts must say so. Without LISA (its 20-step floor would leave a short
    run without batches) the error rests on the series' own correlation."""
    sources, val = no_signal_sources(demo, tmp_path)
    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    result = invoke("reweight", "--config", str(recipe), "reweight.steps=48", "reweight.log_every=48",
                    f"reweight.batch_composition={composition}", f"data.sources={json.dumps(sources)}",
                    f"data.validation={val}", "reweight.lisa.layers=0")
    assert result.returncode == 0, result.stderr[-3000:]
    evidence = json.loads((tmp_path / "run" / "weights.json").read_text())["evidence"]
    assert all(e["batches"] >= 4 for e in evidence.values()), evidence
    assert all(e["verdict"] == "unclear" for e in evidence.values()), evidence
    for e in evidence.values():  # without LISA the batches follow the series' own correlation time
        assert e["batch_steps"] == max(1, math.ceil(4 * e["autocorrelation_time"] - 1e-9))
        assert e["batches"] == 48 // e["batch_steps"]
        assert e["z"] == pytest.approx(e["advantage"] / e["stderr"]) and e["p"] >= 0.05  # unclear: p at the level
        assert e["t"] == pytest.approx(e["contrast"] / e["contrast_stderr"])
