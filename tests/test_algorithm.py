"""The math of one step: per-source loss normalisation, exact accumulation, the lam gradient, the optimizer."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scalebio_cli.data.batching import CursorSampler, balanced_counts, collate, micro_batches
from scalebio_cli.data.tokens.tokenized import TokenizedData
from scalebio_cli.tiny import build_model
from scalebio_cli.train.losses import example_losses
from scalebio_cli.train.optim import AdamW, warmup_cosine
from scalebio_cli.train.source_weights import SourceWeights, lambda_gradient, paired_difference

ALL = torch.ones(3, dtype=torch.bool)  # every source present in the step's batch


def fake_data(rng: np.random.Generator, n: int, vocab: int) -> TokenizedData:
    """n examples of random length, each with a random-length prompt (not trainable) and response."""
    ids, masks, offsets = [], [], [0]
    for _ in range(n):
        prompt, response = int(rng.integers(2, 9)), int(rng.integers(1, 7))
        ids.append(rng.integers(5, vocab, prompt + response))
        masks.append(np.array([False] * prompt + [True] * response))
        offsets.append(offsets[-1] + prompt + response)
    return TokenizedData(path=None, sha256="", ids=np.concatenate(ids).astype(np.int32),
                         trainable=np.concatenate(masks), offsets=np.array(offsets), record_index=np.arange(n),
                         num_records=n, full_lengths=np.diff(offsets).astype(np.int32), max_length=64)


@pytest.fixture(scope="module")
def model(tokenizer):
    m = build_model(tokenizer, "llama", layers=2, hidden=32)
    m.eval()  # no dropout anyway; eval for clarity
    return m


def test_example_losses_are_response_token_means(model, tokenizer) -> None:
    rng = np.random.default_rng(0)
    data = fake_data(rng, 5, len(tokenizer))
    batch = collate([data.example(i) for i in range(5)], [0, 1, 0, 1, 1], pad_id=tokenizer.pad_token_id)
    sums, counts = example_losses(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch)
    for i in range(5):
        ids, mask = data.example(i)
        logits = model(input_ids=torch.tensor(ids[None].astype(np.int64))).logits[0]
        positions = [t for t in range(1, len(ids)) if mask[t]]
        manual = [F.cross_entropy(logits[t - 1], torch.tensor(int(ids[t]))).item() for t in positions]
        assert counts[i].item() == len(positions)
        # Padding and batch neighbours do not change an example's loss.
        assert sums[i].item() / counts[i].item() == pytest.approx(sum(manual) / len(manual), rel=1e-5)


def test_per_source_means_weight_examples_not_tokens() -> None:
    # Source 0: examples with mean losses 1 (over 1 token) and 3 (over 9 tokens) -> m_0 = 2, not 2.8.
    per_example = torch.tensor([1.0, 3.0, 5.0])
    source = torch.tensor([0, 0, 1])
    counts = torch.tensor([2.0, 1.0])
    sums = torch.zeros(2).index_add_(0, source, per_example)
    assert (sums / counts).tolist() == [2.0, 5.0]


def test_micro_batching_gives_the_whole_batch_gradient(model, tokenizer) -> None:
    """alpha * sum_k s_k m_k over one big batch == the sum of coefficient-weighted micro-batch losses."""
    rng = np.random.default_rng(1)
    sources = [fake_data(rng, 12, len(tokenizer)), fake_data(rng, 12, len(tokenizer))]
    items = [(0, i) for i in range(5)] + [(1, i) for i in range(7)]
    alpha, s = 10.0, torch.tensor([0.3, 0.7])
    counts = torch.tensor([5.0, 7.0])

    def grads(micro_batch_size: int) -> list[torch.Tensor]:
        model.zero_grad()
        coef = alpha * s / counts
        for mb in micro_batches(items, sources, micro_batch_size, tokenizer.pad_token_id):
            sums, n = example_losses(model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits, mb)
            (coef[mb.source] * sums / n).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    def reference() -> list[torch.Tensor]:
        model.zero_grad()
        means = []
        for k in range(2):
            losses = []
            for src, i in items:
                if src == k:
                    mb = collate([sources[k].example(i)], [k], tokenizer.pad_token_id)
                    sums, n = example_losses(model(input_ids=mb.input_ids).logits, mb)
                    losses.append(sums[0] / n[0])
            means.append(torch.stack(losses).mean())
        (alpha * (s[0] * means[0] + s[1] * means[1])).backward()
        return [p.grad.clone() for p in model.parameters()]

    ref = reference()
    for size in (1, 3, 12):
        for g, r in zip(grads(size), ref):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_lambda_gradient_equals_autograd() -> None:
    torch.manual_seed(0)
    for k in (2, 3, 7):
        lam = torch.randn(k, dtype=torch.float64, requires_grad=True)
        m_w, m_u = torch.rand(k, dtype=torch.float64) * 3, torch.rand(k, dtype=torch.float64) * 3
        alpha = 7.5
        s = torch.softmax(lam, 0)
        (alpha * (torch.dot(s, m_w) - torch.dot(s, m_u))).backward()
        analytic = lambda_gradient(torch.softmax(lam.detach(), 0), paired_difference(m_w, m_u), alpha)
        torch.testing.assert_close(analytic, lam.grad, rtol=1e-12, atol=1e-12)
        jacobian = torch.diag(s.detach()) - torch.outer(s.detach(), s.detach())
        torch.testing.assert_close(analytic, alpha * jacobian.T @ (m_w - m_u), rtol=1e-12, atol=1e-12)


def test_source_weights_move_towards_the_source_w_is_better_on() -> None:
    weights = SourceWeights(3, lr=0.1, total_steps=10, warmup_ratio=0.0, device=torch.device("cpu"))
    assert weights.probs().tolist() == pytest.approx([1 / 3] * 3)
    for t in range(10):
        weights.observe(t, m_w=torch.tensor([1.0, 2.0, 2.0]), m_u=torch.tensor([2.0, 2.0, 2.5]), present=ALL,
                        alpha=10.0)
    s = weights.probs()
    assert s[0] > s[2] > s[1]  # d = m_w - m_u = [-1, 0, -0.5]: w gains most on source 0, none on 1
    assert s.sum().item() == pytest.approx(1.0)


def test_adamw_matches_torch_adamw_in_fp32() -> None:
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = AdamW(a, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, foreach=True)
    for _ in range(6):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_adamw_keeps_fp32_master_for_bf16_and_releases_state() -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    opt = AdamW([p], lr=1e-4)
    for _ in range(3):
        p.grad = torch.full_like(p, 1.0)
        opt.step()
    master = opt.state[p]["master"]
    assert master.dtype == torch.float32 and opt.state[p]["exp_avg"].dtype == torch.float32
    # 1 - 3e-4 is not representable in bf16 (the update would vanish); the master copy keeps it.
    assert master[0].item() == pytest.approx(1 - 3e-4, rel=1e-5)
    assert p[0].item() == master[0].to(torch.bfloat16).item()
    saved = opt.state_dict()
    opt.release([p])
    assert opt.state_bytes() == 0
    opt.load_state_dict(saved)
    assert opt.state[p]["master"].dtype == torch.float32  # torch's loader would have cast it to bf16


def test_warmup_cosine_shape() -> None:
    f = warmup_cosine(100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_samplers_are_balanced_seeded_and_cover_every_example() -> None:
    assert balanced_counts(10, 3, 0) == [4, 3, 3]
    assert balanced_counts(10, 3, 1) == [3, 4, 3]  # the remainder rotates
    assert sum(balanced_counts(32, 5, 7)) == 32
    a, b = CursorSampler(10, seed=3, stream=1), CursorSampler(10, seed=3, stream=1)
    first = np.concatenate([a.take(4), a.take(6)])
    assert sorted(first.tolist()) == list(range(10))  # one epoch = a permutation
    assert b.take(10).tolist() == first.tolist()  # same seed, same order
    resumed = CursorSampler(10, seed=3, stream=1, cursor=a.cursor)
    assert resumed.take(5).tolist() == a.take(5).tolist()  # the cursor is the whole state
    assert CursorSampler(10, seed=3, stream=2).take(10).tolist() != first.tolist()


def test_pooled_batches_follow_source_sizes(model, tokenizer) -> None:
    """batch_composition: pooled (the reference's batches): counts follow the source sizes, seeded per step (what a
    source absent from a step does to lam: test_lam_step.py)."""
    from scalebio_cli.data.batch_plan import BatchPlan
    from scalebio_cli.recipe.schema import Recipe
    from scalebio_cli.train.distributed import DistInfo

    rng = np.random.default_rng(3)
    sources = [fake_data(rng, 300, len(tokenizer)), fake_data(rng, 100, len(tokenizer)), fake_data(rng, 4, 50)]
    recipe = Recipe(model="m", output_dir="o")
    recipe.reweight.batch_size, recipe.reweight.batch_composition = 8, "pooled"
    cpu = DistInfo(0, 1, 0, torch.device("cpu"))
    plan = BatchPlan(sources, [fake_data(rng, 10, len(tokenizer))], [1.0], recipe, cpu, 0)
    counts = np.array([plan.next(step).source_counts.tolist() for step in range(200)])
    share = counts.sum(axis=0) / counts.sum()
    assert np.allclose(share, [300 / 404, 100 / 404, 4 / 404], atol=0.03)
    assert (counts[:, 2] == 0).any()  # the small source is absent from some batches
    again = BatchPlan(sources, [fake_data(rng, 10, len(tokenizer))], [1.0], recipe, cpu, 0)
    assert again.next(0).source_counts.tolist() == counts[0].tolist()  # seeded per step: resumable


def test_hand_edited_mixture_weights_are_renormalised(tokenizer) -> None:
    from scalebio_cli.stages.finetune import TrainStream

    rng = np.random.default_rng(4)
    stream = TrainStream([fake_data(rng, 20, len(tokenizer)), fake_data(rng, 20, len(tokenizer))],
                         [0.7000004, 0.3000004], seed=0)  # sums to 1 + 8e-7: passes the weights-file check
    assert len(stream.take(0, 10)) == 10  # numpy's multinomial would reject the raw weights


def test_lambda_options_relative_signal_delay_and_sgd() -> None:
    s = torch.tensor([0.5, 0.3, 0.2])
    m_u, m_w = torch.tensor([2.0, 0.1, 1.0]), torch.tensor([1.8, 0.12, 1.1])
    relative = lambda_gradient(s, paired_difference(m_w, m_u, "relative"), alpha=1.0)
    d = (m_w - m_u) / m_u
    assert torch.allclose(relative, s * (d - torch.dot(s, d)))
    # w is 20% worse than u on the tiny-loss source 1 and 10% worse on source 2: the relative signal takes most
    # weight from source 1, the raw difference (0.02 vs 0.1) from source 2
    raw = lambda_gradient(s, paired_difference(m_w, m_u), alpha=1.0)
    assert int(relative.argmax()) == 1 and int(raw.argmax()) == 2

    delayed = SourceWeights(3, 0.1, 10, 0.5, torch.device("cpu"), delay=2)
    for t in range(2):
        delayed.observe(t, m_w, m_u, ALL, alpha=1.0)
    assert torch.equal(delayed.lam.detach(), torch.zeros(3))  # uniform while u and w warm up
    delayed.observe(2, m_w, m_u, ALL, alpha=1.0)
    assert not torch.equal(delayed.lam.detach(), torch.zeros(3))
    # lam's schedule starts when lam does: its first step takes the first warmup rate, not one spent in the delay
    assert delayed.lr == pytest.approx(0.1 * warmup_cosine(8, 0.5)(0))

    sgd = SourceWeights(3, 0.1, 10, 0.0, torch.device("cpu"), optimizer="sgd")
    grad = sgd.observe(0, m_w, m_u, ALL, alpha=1.0)
    assert torch.allclose(sgd.lam.detach(), -0.1 * grad)  # plain gradient descent: the step follows |grad|


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-tied"])
def test_head_only_losses_and_gradients_equal_the_full_logits_path(tokenizer, arch: str) -> None:
    """The LM head applied only at loss positions, in chunks under checkpointing (never the full logits): the
    same per-example losses and the same gradients as full logits + gather, for tied and untied heads."""
    from scalebio_cli.train.losses import ResponseLoss, response_losses

    def fresh():
        model = build_model(tokenizer, arch.split("-")[0], layers=2, hidden=32)
        if arch == "llama-tied":
            model.lm_head.weight = model.model.embed_tokens.weight
        return model

    rng = np.random.default_rng(5)
    data = fake_data(rng, 6, len(tokenizer))
    batch = collate([data.example(i) for i in range(6)], [0] * 6, pad_id=tokenizer.pad_token_id)
    weights = torch.linspace(0.5, 2.0, 6)
    results = []
    for head_only in (False, True):
        model = fresh()
        loss = ResponseLoss(model, chunk_tokens=5)  # several chunks, the last one partial
        assert loss.head_only
        loss.head_only = head_only
        sums, counts = response_losses(loss, batch)
        (weights * sums / counts).sum().backward()
        results.append((sums.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full_sums, full_grads), (sums, grads) = results
    assert torch.allclose(sums, full_sums, atol=1e-5, rtol=1e-5)
    assert full_grads.keys() == grads.keys()
    for name in full_grads:
        assert torch.allclose(grads[name], full_grads[name], atol=1e-5, rtol=1e-4), name


def test_a_source_named_validation_keeps_its_own_fingerprint(tokenizer) -> None:
    from dataclasses import replace

    from scalebio_cli.data.read.sources import from_path
    from scalebio_cli.stages.reweight import RunData, data_fingerprints

    rng = np.random.default_rng(6)
    source, val = fake_data(rng, 4, len(tokenizer)), fake_data(rng, 4, len(tokenizer))
    data = RunData({"validation": from_path("data.sources.validation", "a.jsonl")},
                   {"validation": from_path("data.validation", "v.jsonl")},
                   [replace(source, sha256="a" * 64), replace(val, sha256="b" * 64)], [1.0])
    prints = data_fingerprints(data)
    assert prints == {"data.sources.validation": "a" * 64, "data.validation": "b" * 64}  # neither hides the other


def test_lambda_schedule_constant_keeps_the_rate_cosine_decays_it() -> None:
    m_w, m_u = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([2.0, 2.0, 2.5])
    rates = {}
    for schedule in ("cosine", "constant"):
        weights = SourceWeights(3, 0.1, 10, 0.0, torch.device("cpu"), schedule=schedule)
        for t in range(10):
            weights.observe(t, m_w, m_u, ALL, alpha=1.0)
        rates[schedule] = weights.lr
    assert rates["constant"] == pytest.approx(0.1) and rates["cosine"] < 0.01
