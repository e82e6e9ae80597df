"""Estimate GPU memory per process, and host RAM, for `scalebio reweight`, from exact parameter counts (no weights
downloaded).

    python scripts/estimate_memory.py                                   # the shipped large-model recipes
    python scripts/estimate_memory.py --arch llama3-8b --gpus 8 --lisa 2 --micro 4 --seq 1024 --lora-r 16

The architecture is instantiated on PyTorch's meta device (shapes only), so counts are exact: per block, input
embedding, LM head, the rest, the size of every parameter (for ZeRO-3's persistence threshold) and the shape of
every linear layer LoRA adapts. N = GPUs (one process each), P = all parameters, T = trained parameters,
micro x seq = tokens per forward pass (the recipe's micro_batch_size x data.max_length). Bytes per GPU:

Two whole model copies u and w (engines ddp, zero2, zero3, zero3-offload), bf16:
  weights            2 copies x P x 2                          (ZeRO-3: / N)
  gradients          2 copies x T x 2 (bf16)                   (ZeRO-2/3: / N; offload: in host RAM; DDP with N > 1:
                                                                + 2 x T x 2 for its gradient buckets)
  optimizer          2 copies x T x 12 (fp32 master, m, v)     (ZeRO-2/3: / N; offload: in host RAM)
where with our engine (single GPU or DDP) T = n_active blocks + embeddings + head + norms (LISA frees the rest's
optimizer state); under ZeRO, DeepSpeed keeps optimizer partitions for every parameter, so T = P.

LoRA (`reweight.lora.r`): ONE frozen base and two adapters u and w of A = r x sum(in + out) parameters each, over
the adapted linear layers (all-linear: every linear layer of the blocks, the recipe default; not the LM head).
  lora (our engine; one process, or several that all-reduce the adapter gradients themselves):
    base P x 2; adapters in fp32 as peft makes them, 2 x A x 4; gradients of one adapter at a time A x 4 (and the
    same again for the flat all-reduce with several processes); optimizer 2 x A x 8 (m, v; no master copy).
  lora-zero2, lora-zero3 (DeepSpeed; its bf16 mode trains bf16 weights through fp32 master copies):
    weights     base P x 2, frozen (ZeRO-3: / N; ZeRO-2 holds it whole on every GPU) + adapters 2 x A x 2 (ZeRO-3: / N)
    gradients   2 x A x 2 / N (bf16; ZeRO-2 and ZeRO-3 keep only their partition)
    optimizer   2 x A x 12 / N (fp32 master, m, v)
  assuming DeepSpeed casts the adapters to bf16 as it does every parameter in bf16 mode (kept in fp32, as peft
  makes them, they would add 2 x A x 2 / N). `lora-zero2`/`lora-zero3` estimate a configuration that preflight
  refuses until LoRA under DeepSpeed lands (exit 2 today).

Activations (every engine), with gradient checkpointing: each block's input, blocks x micro x seq x hidden x 2; one
block's activations during its recompute and backward, ~20 x micro x seq x hidden x 2 (Llama-style blocks, SDPA or
flash attention: linear in seq; LoRA on a frozen base saves the same inputs of the linear layers, plus A's r-wide
outputs, under 1 MiB, left out); and the loss: train/losses.py sends at most HEAD_CHUNK_TOKENS (1,024) loss tokens
at a time through the LM head and recomputes them in backward, ~12 bytes per logit at the peak (the fp32
log-softmax kept for backward, its gradient, the input gradient): min(micro x seq, 1024) x vocab x 12.

ZeRO buffers (from the DeepSpeed config the recipe names, recipes/deepspeed/*.json, as DeepSpeed 0.19 allocates):
  gathered (ZeRO-3)  a module's parameters are gathered whole just before it runs and the next ones prefetched; in
                     flight at most max(largest module, min(one block + stage3_prefetch_bucket_size,
                     stage3_max_live_parameters)) x 2; the largest module is the embedding or the head (vocab x
                     hidden, gathered whole for its matmul); with gradient checkpointing a block stays gathered from
                     its recompute through its backward (stage3_max_reuse_distance). Parameters of at most
                     stage3_param_persistence_threshold elements (norms, biases, the small LoRA matrices) stay whole
                     on every GPU: their elements x 2 x (1 - 1/N) beyond the partition. With N = 1 nothing is
                     gathered: the partition is the whole parameter, which DeepSpeed uses in place.
  reduce buckets     per DeepSpeed engine (one per whole copy u, w; one for both LoRA adapters, which share an
                     engine: train/zero_adapters.py): ZeRO-3 reduce_bucket_size x 2 (contiguous_gradients);
                     ZeRO-2 2 x reduce_bucket_size x 2 (overlap_comm double-buffers it).
  optimizer step     the fp32 gradient of one parameter group's partition: largest group / N x 4 (LISA's groups: one
                     per block, one for the rest; LoRA: one per adapter and block). On the CPU with offload.

Host RAM (node), the larger of
  loading            under ZeRO-3 rank 0 reads the whole checkpoint into host memory (transformers 5's ZeRO-3 path;
                     the other ranks make meta tensors, then every rank keeps its shard): P x 2; otherwise every
                     process loads the whole model on the CPU before moving it to its GPU: up to N x P x 2 (less
                     where processes share the safetensors pages);
  offload_optimizer  per copy T x 18: fp32 master, m, v, and the gradient partitions, which DeepSpeed keeps on the
                     CPU too, in bf16 and in fp32 (ZeRO-3 keeps an fp32 gradient buffer per sub-group for the CPU
                     step); pinned with pin_memory: true.
Not counted: CUDA context and NCCL buffers (~1-2 GiB per GPU), allocator fragmentation (several GiB at scale), the
runtime and tokenized data in host RAM (a few GiB per process). Estimates, not measurements: tests/test_gpu.py
compares one with a measured peak on a GPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

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
    # TinyLlama-1.1B's shape: the model tests/test_gpu.py builds to measure LoRA + ZeRO-3 against this estimate
    "llama-1.1b": ("llama", dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                 num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)),
}
# The DeepSpeed config each engine stands for: the shipped ones a recipe names with `deepspeed:`
DEEPSPEED = Path(__file__).resolve().parent.parent / "recipes" / "deepspeed"
DS_FILES = {"zero2": "zero2.json", "zero3": "zero3.json", "zero3-offload": "zero3_offload.json"}
# DeepSpeed's defaults for what a config leaves out (deepspeed/runtime/zero/config.py)
DS_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9,
               "stage3_param_persistence_threshold": 1e5, "overlap_comm": False, "contiguous_gradients": True}
GIB = 2**30


def counts(arch: str) -> dict[str, Any]:
    from transformers import LlamaConfig, Qwen2Config

    family, kwargs = ARCHS[arch]
    return counts_of((LlamaConfig if family == "llama" else Qwen2Config)(**kwargs))


def counts_of(config: Any) -> dict[str, Any]:
    """Parameter counts of the causal LM a transformers config describes (built on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    from scalebio_cli.train.modeling import find_blocks

    blocks = find_blocks(model)
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in blocks[0].parameters())
    # every linear layer of the blocks (peft's all-linear, the recipe default): (in, out) per layer
    linears = [(m.in_features, m.out_features) for m in blocks.modules() if isinstance(m, torch.nn.Linear)]
    return {"total": total, "block": block, "blocks": len(blocks), "hidden": config.hidden_size,
            "vocab": config.vocab_size, "outside": total - block * len(blocks),
            "lora_per_rank": sum(i + o for i, o in linears), "linears": linears,
            "largest_module": max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
            "numels": [p.numel() for p in model.parameters()]}


def deepspeed_settings(engine: str) -> dict[str, Any]:
    """The zero_optimization section of the DeepSpeed config `engine` stands for, DeepSpeed's defaults filled in."""
    name = DS_FILES.get(engine.removeprefix("lora-"))
    if name is None:
        return {}
    zero = json.loads((DEEPSPEED / name).read_text())["zero_optimization"]
    return {**DS_DEFAULTS, **zero}


def _activations(c: dict[str, Any], micro: int, seq: int) -> float:
    from scalebio_cli.train.losses import HEAD_CHUNK_TOKENS

    return (c["blocks"] * micro * seq * c["hidden"] * 2 + 20 * micro * seq * c["hidden"] * 2
            + min(micro * seq, HEAD_CHUNK_TOKENS) * c["vocab"] * 12)


def _zero_buffers(c: dict[str, Any], ds: dict[str, Any], gpus: int, largest_group: float,
                  persistent: float, block: float, engines: int = 2) -> float:
    """Gathered and persistent parameters (ZeRO-3), the engines' reduce buckets (two whole copies: an engine each;
    LoRA: one engine for both adapters), the step's fp32 group gradient. `persistent`: elements of all copies'
    parameters under the persistence threshold; `block`: one block's."""
    stage = ds["stage"]
    bucket = ds["reduce_bucket_size"] * 2 * (2 if stage == 2 and ds["overlap_comm"] else 1)
    buckets = engines * bucket if ds["contiguous_gradients"] else 0.0
    step = 0.0 if "offload_optimizer" in ds else largest_group / gpus * 4
    if stage != 3:
        return buckets + step
    in_flight = max(c["largest_module"], min(block + ds["stage3_prefetch_bucket_size"],
                                             ds["stage3_max_live_parameters"]))
    # one process: DeepSpeed points a "gathered" parameter at its partition, the whole tensor (no copy)
    return (in_flight * 2 if gpus > 1 else 0.0) + persistent * 2 * (1 - 1 / gpus) + buckets + step


def _small(numels: list[int], ds: dict[str, Any]) -> int:
    return sum(n for n in numels if n <= ds["stage3_param_persistence_threshold"])


def estimate_lora(c: dict[str, Any], engine: str, gpus: int, r: int, micro: int, seq: int,
                  ds: dict[str, Any] | None = None) -> dict[str, float]:
    """One frozen bf16 base, two adapters of rank r (all linear layers of the blocks), their AdamW state."""
    adapter = r * c["lora_per_rank"]
    activations = _activations(c, micro, seq)
    load = c["total"] * 2 * (1 if engine == "lora-zero3" else gpus)
    if engine == "lora":
        weights = c["total"] * 2 + 2 * adapter * 4
        grads = adapter * 4 * (2 if gpus > 1 else 1)
        optimizer = 2 * adapter * 8
        buffers = 0.0
    else:
        ds = ds or deepspeed_settings(engine)
        zero3 = ds["stage"] == 3
        weights = (c["total"] * 2 + 2 * adapter * 2) / (gpus if zero3 else 1)
        grads = 2 * adapter * 2 / gpus
        optimizer = 2 * adapter * 12 / gpus
        small = [n for i, o in c["linears"] for n in (r * i, r * o)]  # A: r x in, B: out x r
        persistent = _small(c["numels"], ds) + 2 * _small(small, ds)
        per_block = 2 * adapter / c["blocks"]  # both adapters' share of one block
        buffers = _zero_buffers(c, ds, gpus, adapter / c["blocks"], persistent, c["block"] + per_block, engines=1)
    total = weights + grads + optimizer + activations + buffers
    return {"weights": weights / GIB, "gradients": grads / GIB, "optimizer": optimizer / GIB,
            "activations": activations / GIB, "buffers": buffers / GIB, "total": total / GIB, "host": load / GIB,
            "adapter": adapter}


def estimate(c: dict[str, Any], engine: str, gpus: int, lisa: int, micro: int, seq: int,
             r: int = 16, ds: dict[str, Any] | None = None) -> dict[str, float]:
    """GiB per GPU by kind (weights, gradients, optimizer, activations, buffers), their total, and the node's host
    RAM (`host`). `ds`: the zero_optimization settings (default: the shipped config the engine stands for)."""
    if engine.startswith("lora"):
        return estimate_lora(c, engine, gpus, r, micro, seq, ds)
    ds = ds or deepspeed_settings(engine)
    zero = ds.get("stage", 0)
    offload = "offload_optimizer" in ds
    trainable = c["total"] if zero else (lisa or c["blocks"]) * c["block"] + c["outside"]
    shard = gpus if zero else 1
    weights = 2 * c["total"] * 2 / (gpus if zero == 3 else 1)
    grads = 0.0 if offload else 2 * trainable * 2 / shard + (2 * trainable * 2 if engine == "ddp" and gpus > 1 else 0)
    optimizer = 0.0 if offload else 2 * trainable * 12 / shard
    activations = _activations(c, micro, seq)
    largest_group = max(c["block"], c["outside"])  # LISA's parameter groups: one per block, one for the rest
    buffers = _zero_buffers(c, ds, gpus, largest_group, 2 * _small(c["numels"], ds), c["block"]) if zero else 0.0
    load = c["total"] * 2 * (1 if zero == 3 else gpus)
    host = max(load, 2 * trainable * 18) if offload else load
    total = weights + grads + optimizer + activations + buffers
    return {"weights": weights / GIB, "gradients": grads / GIB, "optimizer": optimizer / GIB,
            "activations": activations / GIB, "buffers": buffers / GIB, "total": total / GIB, "host": host / GIB}


def table(arch: str, settings: list[tuple[str, int]], lisa: int, micro: int, seq: int, r: int = 16) -> str:
    c = counts(arch)
    lora = (f"; LoRA r={r} on every linear layer of the blocks: {r * c['lora_per_rank'] / 1e6:.0f}M parameters "
            "per adapter" if any(e.startswith("lora") for e, _ in settings) else "")
    lines = [f"{arch}: {c['total'] / 1e9:.2f}B parameters, {c['blocks']} blocks of {c['block'] / 1e6:.0f}M, "
             f"{c['outside'] / 1e6:.0f}M outside the blocks (embeddings, head, norm); LISA {lisa} blocks{lora}; "
             f"micro-batch {micro} x {seq} tokens, gradient checkpointing, bf16. GiB:", "",
             "| engine | GPUs | weights | gradients | optimizer | activations | ZeRO buffers | per GPU "
             "| host RAM (node) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for engine, gpus in settings:
        e = estimate(c, engine, gpus, lisa, micro, seq, r)
        lines.append(f"| {engine} | {gpus} | {e['weights']:.1f} | {e['gradients']:.1f} | {e['optimizer']:.1f} | "
                     f"{e['activations']:.1f} | {e['buffers']:.1f} | **{e['total']:.0f} GiB** | {e['host']:.0f} GiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(ARCHS))
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--lisa", type=int, default=2)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--lora-r", type=int, default=16, help="adapter rank of the lora rows")
    args = parser.parse_args()
    if args.arch:
        settings = [("ddp", 1), ("ddp", args.gpus), ("zero2", args.gpus), ("zero3", args.gpus),
                    ("zero3-offload", args.gpus), ("lora", 1), ("lora", args.gpus), ("lora-zero2", args.gpus),
                    ("lora-zero3", args.gpus)]
        print(table(args.arch, settings, args.lisa, args.micro, args.seq, args.lora_r))
        return
    # recipes/llama3-8b-math.yaml: micro-batch 4; recipes/qwen2.5-32b-math.yaml, recipes/llama3-70b-lora.yaml: 2
    print(table("llama3-8b", [("ddp", 1), ("ddp", 8), ("zero2", 8), ("zero3", 8), ("lora", 1), ("lora", 8),
                              ("lora-zero2", 8), ("lora-zero3", 8)], 2, 4, 1024, args.lora_r))
    print()
    print(table("qwen2.5-32b", [("zero3", 8), ("zero3-offload", 8), ("lora", 1), ("lora-zero2", 8),
                                ("lora-zero3", 8)], 2, 2, 1024, args.lora_r))
    print()
    print(table("llama3-70b", [("zero3", 8), ("zero3-offload", 8), ("lora-zero2", 8), ("lora-zero3", 8)], 2, 2, 1024,
                args.lora_r))


if __name__ == "__main__":
    main()
