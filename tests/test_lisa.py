"""LISA: block discovery, freezing, optimizer state only for active blocks, no backward below the lowest one."""

import numpy as np
import pytest
import torch
from transformers import GemmaConfig, GemmaForCausalLM, MistralConfig, MistralForCausalLM

from scalebio_cli.data.batching import collate
from scalebio_cli.recipe.schema import LisaConfig
from scalebio_cli.tiny import build_model
from scalebio_cli.train.distributed import DistInfo
from scalebio_cli.train.engine import Engine
from scalebio_cli.train.lisa import Lisa, draw_blocks
from scalebio_cli.train.modeling import find_blocks

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def tiny(tokenizer, arch: str, layers: int = 8):
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2))
    if arch == "gemma":
        return GemmaForCausalLM(GemmaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=8))
    return build_model(tokenizer, arch, layers=layers, hidden=32)


@pytest.mark.parametrize("arch, path", [("llama", "model.layers"), ("qwen2", "model.layers"),
                                        ("mistral", "model.layers"), ("gemma", "model.layers"),
                                        ("gpt2", "transformer.h"), ("gpt_neox", "gpt_neox.layers")])
def test_find_blocks_without_a_model_type_flag(tokenizer, arch: str, path: str) -> None:
    model = tiny(tokenizer, arch, layers=3)
    expected = model.get_submodule(path)
    assert find_blocks(model) is expected and len(expected) == 3


def batch_for(tokenizer, n: int = 4, length: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    examples = [(rng.integers(5, len(tokenizer), length), np.array([False] * 4 + [True] * (length - 4)))
                for _ in range(n)]
    return collate(examples, [0] * n, tokenizer.pad_token_id)


def train_steps(engine: Engine, tokenizer, steps: range) -> None:
    for step in steps:
        engine.begin_step(step)
        mb = batch_for(tokenizer, seed=step)
        sums, counts = engine(mb)
        engine.backward((sums / counts).mean())
        engine.step()


@pytest.fixture()
def engine(tokenizer) -> Engine:
    model = tiny(tokenizer, "llama", layers=8)
    model.config.tie_word_embeddings = False
    return Engine(model, lr=1e-2, weight_decay=0.0, max_grad_norm=1.0, total_steps=100, warmup_ratio=0.0,
                  lisa=LisaConfig(layers=2, interval=5), seed=3, dist=CPU)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_blocks_stay_unchanged_and_active_ones_move(engine: Engine, tokenizer) -> None:
    before = [snapshot(b) for b in engine.lisa.blocks]
    head_before = engine.model.lm_head.weight.detach().clone()
    train_steps(engine, tokenizer, range(0, 5))  # one draw
    active = engine.lisa.active
    assert len(active) == 2
    for i, block in enumerate(engine.lisa.blocks):
        after = snapshot(block)
        same = all(torch.equal(after[k], before[i][k]) for k in after)
        assert same == (i not in active), f"block {i} (active {active})"
    assert not torch.equal(engine.model.lm_head.weight, head_before)  # head always trains


def test_optimizer_state_only_for_active_blocks_and_freed_on_redraw(engine: Engine, tokenizer) -> None:
    def fp32_moments(params) -> int:
        return sum(p.numel() * 4 * 2 for p in params)  # exp_avg and exp_avg_sq

    block_params = {p for b in engine.lisa.blocks for p in b.parameters()}
    always = fp32_moments(p for p in engine.model.parameters() if p not in block_params)
    seen = set()
    for draw in range(4):
        train_steps(engine, tokenizer, range(draw * 5, draw * 5 + 5))
        active = engine.lisa.active
        seen |= set(active)
        with_state = {i for i, b in enumerate(engine.lisa.blocks)
                      for p in b.parameters() if p in engine.optimizer.state}
        assert with_state == set(active)
        expected = always + fp32_moments(p for i in active for p in engine.lisa.blocks[i].parameters())
        assert engine.optimizer.state_bytes() == expected  # follows the active blocks, not the model
    assert len(seen) > 2  # blocks were trained and released again along the way


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_no_backward_below_the_lowest_active_block(tokenizer) -> None:
    from scalebio_cli.train.losses import example_losses

    model = tiny(tokenizer, "llama", layers=8)
    lisa = Lisa(model, layers=2, interval=1, seed=0, train_embeddings=False)
    lisa.activate([3, 6])
    fired: list[int] = []
    for i, block in enumerate(lisa.blocks):
        block.register_full_backward_hook(lambda m, gi, go, i=i: fired.append(i))
    mb = batch_for(tokenizer)
    sums, counts = example_losses(model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits, mb)
    (sums / counts).mean().backward()
    assert sorted(set(fired)) == [3, 4, 5, 6, 7]  # backward stops at the lowest active block
    for i, block in enumerate(lisa.blocks):
        assert all((p.grad is not None) == (i in (3, 6)) for p in block.parameters())
    assert model.get_input_embeddings().weight.grad is None  # untied: nothing reaches it through frozen blocks
    assert model.lm_head.weight.grad is not None and model.model.norm.weight.grad is not None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_by_default_embeddings_get_the_full_backward_gradient(tokenizer, arch: str) -> None:
    """LISA with 1 of 4 blocks active (not block 0): the input (and GPT-2 position) embeddings get exactly the
    gradient a full-parameter backward gives them, every draw."""
    from scalebio_cli.train.losses import example_losses

    def embedding_grads(model, layers: int, active: list[int] | None) -> dict[str, torch.Tensor]:
        lisa = Lisa(model, layers=layers, interval=1, seed=0)
        if active is not None:
            lisa.activate(active)
        mb = batch_for(tokenizer)
        sums, counts = example_losses(model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits, mb)
        (sums / counts).mean().backward()
        names = [n for n, _ in model.named_parameters() if "wte" in n or "wpe" in n or "embed_tokens" in n]
        return {n: p.grad.clone() for n, p in model.named_parameters() if n in names}

    full = embedding_grads(tiny(tokenizer, arch, layers=4), 0, None)
    for active in ([2], [3], [1]):
        lisa_grads = embedding_grads(tiny(tokenizer, arch, layers=4), 1, active)
        assert lisa_grads.keys() == full.keys() and full
        for name in full:
            assert torch.allclose(lisa_grads[name], full[name], atol=1e-6), (name, active)


def test_cut_embeddings_stay_frozen_even_with_block_zero_active(tokenizer) -> None:
    from scalebio_cli.train.losses import example_losses

    model = tiny(tokenizer, "llama", layers=4)
    lisa = Lisa(model, layers=2, interval=1, seed=0, train_embeddings=False)
    lisa.activate([0, 2])
    mb = batch_for(tokenizer)
    sums, counts = example_losses(model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits, mb)
    (sums / counts).mean().backward()
    assert model.get_input_embeddings().weight.grad is None
    assert all(p.grad is not None for p in lisa.blocks[0].parameters())


def test_draws_are_seeded_identical_for_u_and_w_and_cover_blocks(tokenizer) -> None:
    assert draw_blocks(8, 2, seed=0, draw=5) == draw_blocks(8, 2, seed=0, draw=5)
    draws = [tuple(draw_blocks(8, 2, seed=0, draw=d)) for d in range(50)]
    assert len(set(draws)) > 10 and {i for d in draws for i in d} == set(range(8))
    u, w = tiny(tokenizer, "llama", 8), tiny(tokenizer, "llama", 8)
    lisa_u = Lisa(u, layers=2, interval=20, seed=7)
    lisa_w = Lisa(w, layers=2, interval=20, seed=7)
    for step in range(0, 200, 7):
        lisa_u.update(step)
        lisa_w.update(step)
        assert lisa_u.active == lisa_w.active == draw_blocks(8, 2, 7, step // 20)


def test_zero_layers_trains_every_block(tokenizer) -> None:
    model = tiny(tokenizer, "gpt2", layers=4)
    lisa = Lisa(model, layers=0, interval=20, seed=0)
    assert not lisa.enabled and not lisa.update(0)
    assert all(p.requires_grad for p in model.parameters())


def test_optimizer_state_follows_active_blocks_not_model_depth(tokenizer) -> None:
    """8 or 16 blocks, 2 active: the same optimizer state (the reference implementations grow with depth)."""
    sizes = {}
    for layers in (8, 16):
        model = tiny(tokenizer, "llama", layers=layers)
        engine = Engine(model, lr=1e-3, weight_decay=0.0, max_grad_norm=None, total_steps=10, warmup_ratio=0.0,
                        lisa=LisaConfig(layers=2, interval=2), seed=0, dist=CPU)
        train_steps(engine, tokenizer, range(6))  # three draws: state of earlier draws must be gone
        sizes[layers] = engine.optimizer.state_bytes()
    assert sizes[8] == sizes[16]


def test_a_model_without_a_block_list_is_a_clear_input_error() -> None:
    from scalebio_cli.errors import InputError
    from scalebio_cli.train.modeling import find_blocks

    class NoBlocks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(InputError, match=r"cannot find the transformer blocks.*lisa\.layers: 0"):
        find_blocks(NoBlocks())


def test_resuming_a_non_deepspeed_checkpoint_under_deepspeed_is_a_clear_input_error(tmp_path) -> None:
    from types import SimpleNamespace

    from scalebio_cli.errors import InputError
    from scalebio_cli.train.zero import DeepSpeedEngine

    (tmp_path / "u.pt").write_bytes(b"")  # what the plain engine writes
    with pytest.raises(InputError, match="no DeepSpeed state 'u/state'"):
        DeepSpeedEngine.load(SimpleNamespace(), tmp_path, "u")
