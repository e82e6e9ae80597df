"""Estimate GPU memory per process for `scalebio reweight`, from exact parameter counts (no weights downloaded).

    python scripts/estimate_memory.py                                   # the shipped large-model recipes
    python scripts/estimate_memory.py --arch llama3-8b --gpus 8 --lisa 2 --micro 4 --seq 1024

The architecture is instantiated on PyTorch's meta device (shapes only), so counts are exact: per block, input
embedding, LM head, the rest. Memory, in bytes, for bf16 training of two model copies (u and w):

  weights            2 copies x P x 2                          (ZeRO-3: / N)
  gradients          2 copies x T x 2 (bf16)                   (ZeRO-2/3: / N; T = P under ZeRO)
  optimizer          2 copies x T x 12 (fp32 master, m, v)     (ZeRO-2/3: / N, or on the CPU with offload)
  activations        micro-batch x seq x hidden x 2 per block kept with gradient checkpointing, one block's
                     full activations (~ 20 x micro x seq x hidden x 2, plus attention with SDPA/flash: linear in
                     seq), and the logits in fp32 for the loss (micro x seq x vocab x 6)

where P are all parameters and T the trainable ones: with our engine (single GPU or DDP) T = n_active blocks +
embeddings + head + norms (LISA frees the rest's optimizer state); under ZeRO, DeepSpeed keeps optimizer partitions
for every parameter, so T = P, sharded over N processes. DDP adds gradient buckets (~T x 2). These are estimates:
allocator fragmentation and communication buffers add several GiB.

LoRA (`reweight.lora.r`): ONE frozen bf16 base (P x 2; ZeRO-3: / N) and two adapters u and w of A parameters each
(r x (in + out) per adapted linear layer; peft keeps them in fp32): adapters 2 x A x 4, gradients of one adapter
at a time A x 4 (plus the same again for the all-reduce under several processes), optimizer 2 x A x 8 (m, v; no
master copy for fp32 adapters); activations as above. `lora` is what runs today (one process or DDP);
`lora-zero3` (the base sharded with ZeRO-3) is an estimate of a configuration scalebio refuses for now (exit 2).
"""

from __future__ import annotations

import argparse

ARCHS = {
    "llama3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
    "qwen2.5-32b": ("qwen2", dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                                  num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                                  tie_word_embeddings=False)),
    "llama3-70b": ("llama", dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)),
    "llama-1b": ("llama", dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
                               num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)),
}
GIB = 2**30


def counts(arch: str) -> dict[str, int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    family, kwargs = ARCHS[arch]
    cls, config_cls = (LlamaForCausalLM, LlamaConfig) if family == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    with torch.device("meta"):
        model = cls(config_cls(**kwargs))
    from scalebio_cli.train.modeling import find_blocks

    blocks = find_blocks(model)
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in blocks[0].parameters())
    # r = 1 adapter parameters of every linear layer of the blocks (peft's all-linear, the recipe default)
    lora_per_rank = sum(m.in_features + m.out_features for m in blocks.modules() if isinstance(m, torch.nn.Linear))
    return {"total": total, "block": block, "blocks": len(blocks), "hidden": kwargs["hidden_size"],
            "vocab": kwargs["vocab_size"], "outside": total - block * len(blocks), "lora_per_rank": lora_per_rank}


def _activations(c: dict[str, int], micro: int, seq: int) -> float:
    return (c["blocks"] * micro * seq * c["hidden"] * 2 + 20 * micro * seq * c["hidden"] * 2
            + micro * seq * c["vocab"] * 6)


def estimate_lora(c: dict[str, int], engine: str, gpus: int, r: int, micro: int, seq: int) -> dict[str, float]:
    """One frozen bf16 base, two fp32 adapters of rank r (all linear layers), their AdamW state."""
    adapter = r * c["lora_per_rank"]
    weights = c["total"] * 2 / (gpus if engine == "lora-zero3" else 1) + 2 * adapter * 4
    grads = adapter * 4 * (2 if gpus > 1 else 1)
    optimizer = 2 * adapter * 8
    activations = _activations(c, micro, seq)
    return {"weights": weights / GIB, "gradients": grads / GIB, "optimizer": optimizer / GIB,
            "activations": activations / GIB, "total": (weights + grads + optimizer + activations) / GIB,
            "cpu_optimizer": 0.0, "adapter": adapter}


def estimate(c: dict[str, int], engine: str, gpus: int, lisa: int, micro: int, seq: int,
             r: int = 8) -> dict[str, float]:
    if engine.startswith("lora"):
        return estimate_lora(c, engine, gpus, r, micro, seq)
    zero = {"ddp": 0, "zero2": 2, "zero3": 3, "zero3-offload": 3}[engine]
    trainable = c["total"] if zero else (lisa or c["blocks"]) * c["block"] + c["outside"]
    shard = gpus if zero else 1
    weights = 2 * c["total"] * 2 / (gpus if zero == 3 else 1)
    grads = 2 * trainable * 2 / shard + (2 * trainable * 2 if engine == "ddp" and gpus > 1 else 0)
    optimizer = 0.0 if engine == "zero3-offload" else 2 * trainable * 12 / shard
    activations = _activations(c, micro, seq)
    return {"weights": weights / GIB, "gradients": grads / GIB, "optimizer": optimizer / GIB,
            "activations": activations / GIB, "total": (weights + grads + optimizer + activations) / GIB,
            "cpu_optimizer": (2 * c["total"] * 12 / GIB) if engine == "zero3-offload" else 0.0}


def table(arch: str, settings: list[tuple[str, int]], lisa: int, micro: int, seq: int, r: int = 8) -> str:
    c = counts(arch)
    lora = (f"; LoRA r={r} on every linear layer of the blocks: {r * c['lora_per_rank'] / 1e6:.0f}M parameters "
            "per adapter" if any(e.startswith("lora") for e, _ in settings) else "")
    lines = [f"{arch}: {c['total'] / 1e9:.2f}B parameters, {c['blocks']} blocks of {c['block'] / 1e6:.0f}M, "
             f"{c['outside'] / 1e6:.0f}M outside the blocks (embeddings, head, norm); LISA {lisa} blocks{lora}; "
             f"micro-batch {micro} x {seq} tokens, gradient checkpointing, bf16.", "",
             "| engine | GPUs | weights | gradients | optimizer | activations | per GPU | CPU (offload) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for engine, gpus in settings:
        e = estimate(c, engine, gpus, lisa, micro, seq, r)
        cpu = f"{e['cpu_optimizer']:.0f} GiB" if e["cpu_optimizer"] else "-"
        lines.append(f"| {engine} | {gpus} | {e['weights']:.1f} | {e['gradients']:.1f} | {e['optimizer']:.1f} | "
                     f"{e['activations']:.1f} | **{e['total']:.0f} GiB** | {cpu} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(ARCHS))
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--lisa", type=int, default=2)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--lora-r", type=int, default=8, help="adapter rank of the lora rows")
    args = parser.parse_args()
    if args.arch:
        settings = [("ddp", 1), ("ddp", args.gpus), ("zero2", args.gpus), ("zero3", args.gpus),
                    ("zero3-offload", args.gpus), ("lora", 1), ("lora", args.gpus), ("lora-zero3", args.gpus)]
        print(table(args.arch, settings, args.lisa, args.micro, args.seq, args.lora_r))
        return
    print(table("llama3-8b", [("ddp", 1), ("ddp", 8), ("zero2", 8), ("zero3", 8), ("lora", 1), ("lora", 8)],
                2, 4, 1024, args.lora_r))
    print()
    print(table("qwen2.5-32b", [("zero3", 8), ("zero3-offload", 8), ("lora", 1), ("lora-zero3", 8)], 2, 2, 1024,
                args.lora_r))
    print()
    print(table("llama3-70b", [("zero3", 8), ("zero3-offload", 8), ("lora-zero3", 8)], 2, 2, 1024, args.lora_r))


if __name__ == "__main__":
    main()
