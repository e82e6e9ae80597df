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
"""

from __future__ import annotations

import argparse

ARCHS = {
    "llama3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
    "qwen2.5-32b": ("qwen2", dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                                  num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                                  tie_word_embeddings=False)),
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
    return {"total": total, "block": block, "blocks": len(blocks), "hidden": kwargs["hidden_size"],
            "vocab": kwargs["vocab_size"], "outside": total - block * len(blocks)}


def estimate(c: dict[str, int], engine: str, gpus: int, lisa: int, micro: int, seq: int) -> dict[str, float]:
    zero = {"ddp": 0, "zero2": 2, "zero3": 3, "zero3-offload": 3}[engine]
    trainable = c["total"] if zero else (lisa or c["blocks"]) * c["block"] + c["outside"]
    shard = gpus if zero else 1
    weights = 2 * c["total"] * 2 / (gpus if zero == 3 else 1)
    grads = 2 * trainable * 2 / shard + (2 * trainable * 2 if engine == "ddp" and gpus > 1 else 0)
    optimizer = 0.0 if engine == "zero3-offload" else 2 * trainable * 12 / shard
    activations = (c["blocks"] * micro * seq * c["hidden"] * 2 + 20 * micro * seq * c["hidden"] * 2
                   + micro * seq * c["vocab"] * 6)
    return {"weights": weights / GIB, "gradients": grads / GIB, "optimizer": optimizer / GIB,
            "activations": activations / GIB, "total": (weights + grads + optimizer + activations) / GIB,
            "cpu_optimizer": (2 * c["total"] * 12 / GIB) if engine == "zero3-offload" else 0.0}


def table(arch: str, settings: list[tuple[str, int]], lisa: int, micro: int, seq: int) -> str:
    c = counts(arch)
    lines = [f"{arch}: {c['total'] / 1e9:.2f}B parameters, {c['blocks']} blocks of {c['block'] / 1e6:.0f}M, "
             f"{c['outside'] / 1e6:.0f}M outside the blocks (embeddings, head, norm); LISA {lisa} blocks, "
             f"micro-batch {micro} x {seq} tokens, gradient checkpointing, bf16.", "",
             "| engine | GPUs | weights | gradients | optimizer | activations | per GPU | CPU (offload) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for engine, gpus in settings:
        e = estimate(c, engine, gpus, lisa, micro, seq)
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
    args = parser.parse_args()
    if args.arch:
        settings = [("ddp", 1), ("ddp", args.gpus), ("zero2", args.gpus), ("zero3", args.gpus),
                    ("zero3-offload", args.gpus)]
        print(table(args.arch, settings, args.lisa, args.micro, args.seq))
        return
    print(table("llama3-8b", [("ddp", 1), ("ddp", 8), ("zero2", 8), ("zero3", 8)], 2, 4, 1024))
    print()
    print(table("qwen2.5-32b", [("zero3", 8), ("zero3-offload", 8)], 2, 2, 1024))


if __name__ == "__main__":
    main()
