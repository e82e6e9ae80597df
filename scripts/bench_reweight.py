"""How close is a ScaleBiO step to its floor, and what does LISA save? Prints a table, appends docs/benchmarks.md.

    python scripts/bench_reweight.py                      # CPU: 8-block Llama d=256, ~2 min on 2 cores
    python scripts/bench_reweight.py --device cuda --preset 1b

A reweight step is one forward/backward of u on B, and of w on B and V (one pass here), plus two optimizer steps
and the tiny lam step. Its floor is (2 + |V|/|B|) plain SFT steps on B with the same LISA setting, so
overhead = reweight_time / ((2 + |V|/|B|) * sft_time). Each setting runs in its own process so peak memory (RSS on
CPU, torch.cuda.max_memory_allocated on GPU) is its own; on CPU the memory reported is the peak RSS above the
process's RSS after imports and data (the interpreter and libraries are the same in every setting).

Settings: sft / reweight with LISA (2 active blocks; the backward pass reaches the embeddings, the default
`lisa.train_embeddings: true`), reweight with the backward cut at the lowest active block (`train_embeddings:
false`: embeddings frozen), with all blocks, and "reference": LISA as the reference implementations do it
(optimizer state for every parameter, never freed), and "reweight-lora": u and w as two LoRA adapters (rank
`--lora-r`, every linear layer of the blocks) over one frozen base (`reweight.lora.r`, train/lora.py);
"reweight-lora-lisa": the same adapters with LISA over them (`reweight.lora.r` with `reweight.lisa.layers`: only
the drawn blocks' adapters train, and the backward pass stops at the lowest drawn block; its time depends on the
draw, so compare medians over several draws, e.g. `--interval 1`).
`NAME-ckpt` is a setting with gradient checkpointing (run the script with `MALLOC_MMAP_THRESHOLD_=131072` to
have glibc give freed blocks back to the system); `NAME-heap-ckpt` is now the same as `NAME-ckpt` (it compared
the CLI's former CPU allocator setting with glibc's default heap); "peer-sft"
is the SFT step users already run, transformers.Trainer on the same model and examples (all blocks, the usual SFT
collator, full logits), timed per optimizer step by a callback. On a GPU the table adds model FLOPs utilisation
(MFU: 6 x parameters x tokens/s over the device's dense bf16 peak).
The timed functions are the ones the CLI runs (bilevel.bilevel_step, sft.sft_step) on prepared batches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {
    "cpu": dict(layers=8, hidden=256, heads=4, vocab=2048, seq=128, batch=16, val_batch=8, micro=16),
    "1b": dict(layers=16, hidden=2048, heads=16, vocab=32000, seq=1024, batch=16, val_batch=8, micro=4),
    # the real vocabulary: SmolLM2-135M-Instruct (scripts/get_smollm2.py), 49,152 tokens, tied head
    "smollm2": dict(layers=30, hidden=576, heads=9, vocab=49152, seq=256, batch=8, val_batch=8, micro=8),
}
SETTINGS = ["sft-lisa", "reweight-lisa", "reweight-lisa-cut", "reweight-lisa-logits", "sft-all", "reweight-all",
            "reweight-reference", "reweight-lora", "reweight-lora-lisa", "peer-sft", "reweight-lisa-heap",
            "reweight-lora-lisa-heap"]
# The real-vocabulary run: head-only vs full logits, gradient checkpointing, the peer SFT step, LoRA vs LISA.
SMOLLM2_SETTINGS = ["sft-lisa", "reweight-lisa", "reweight-lisa-logits", "sft-lisa-ckpt", "reweight-lisa-ckpt",
                    "reweight-lisa-heap-ckpt", "sft-all", "peer-sft", "reweight-lora", "reweight-lora-ckpt",
                    "reweight-lora-lisa", "reweight-lora-lisa-ckpt"]
# `NAME-ckpt`: the same setting with gradient checkpointing (`reweight.gradient_checkpointing: true`)
SETTINGS += [f"{name}-ckpt" for name in SETTINGS if name != "reweight-reference"]


# Dense bf16 peak FLOP/s of common training GPUs (vendor data sheets, no sparsity), for the MFU column.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A40": 149.7e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(setting: str, args: argparse.Namespace) -> dict:
    """Build model and data, time `steps` steps of one setting, measure its peak memory."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from scalebio_cli.data.batch_plan import BatchPlan
    from scalebio_cli.data.tokens.tokenized import TokenizedData
    from scalebio_cli.recipe.schema import LisaConfig, Recipe
    from scalebio_cli.train.bilevel import bilevel_step
    from scalebio_cli.train.distributed import DistInfo
    from scalebio_cli.train.engine import Engine
    from scalebio_cli.train.sft import sft_step
    from scalebio_cli.train.source_weights import SourceWeights

    p = PRESETS[args.preset]
    checkpointing = setting.endswith("-ckpt")
    setting = setting.removesuffix("-ckpt")
    setting = setting.removesuffix("-heap")  # the allocator is the environment's now (MALLOC_MMAP_THRESHOLD_)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dist = DistInfo(0, 1, 0, device)
    rng = np.random.default_rng(0)

    def data(n: int) -> TokenizedData:  # prompts of ~1/4 of the length, the rest response
        lengths = rng.integers(p["seq"] * 3 // 4, p["seq"] + 1, n)
        ids = rng.integers(10, p["vocab"], int(lengths.sum())).astype(np.int32)
        mask = np.concatenate([np.arange(n_) >= n_ // 4 for n_ in lengths])
        return TokenizedData(None, "", ids, mask, np.concatenate([[0], np.cumsum(lengths)]), np.arange(n), n,
                             np.asarray(lengths, dtype=np.int32), max_length=int(max(lengths)))

    sources, val = [data(256) for _ in range(4)], data(128)
    baseline = rss_bytes()  # interpreter, libraries and data: the same in every setting

    if args.preset == "smollm2":
        from scalebio_cli.train.modeling import load_model

        folder = subprocess.run([sys.executable, str(ROOT / "scripts" / "get_smollm2.py")], capture_output=True,
                                text=True, check=True).stdout.strip().splitlines()[-1]
        model = load_model(folder, dtype, device)
    else:
        config = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"],
                             intermediate_size=int(p["hidden"] * 2.6875), num_hidden_layers=p["layers"],
                             num_attention_heads=p["heads"], num_key_value_heads=p["heads"],
                             max_position_embeddings=p["seq"])
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    params = sum(x.numel() for x in model.parameters())  # the base model's (LoRA adds its adapters below)
    lisa = LisaConfig(layers=0 if setting.endswith("-all") else args.lisa, interval=args.interval,
                      train_embeddings=not setting.endswith("-cut"))
    kwargs = dict(weight_decay=0.0, max_grad_norm=10.0, total_steps=10_000, warmup_ratio=0.0, lisa=lisa, seed=0,
                  dist=dist, gradient_checkpointing=checkpointing)

    recipe = Recipe(model="bench", output_dir="")
    recipe.reweight.batch_size, recipe.reweight.val_batch_size = p["batch"], p["val_batch"]
    recipe.reweight.micro_batch_size = p["micro"]
    plan = BatchPlan(sources, [val], [1.0], recipe, dist, pad_id=0)

    if setting == "peer-sft":
        return peer_sft(model, plan, args, baseline, params, checkpointing)
    if setting.startswith("sft"):
        engines = [Engine(model, lr=1e-4, **kwargs)]
        batches = [plan.next(i) for i in range(args.steps)]  # the same B as the reweight settings
        response_tokens = [sum(m.num_loss_tokens for m in b.train) for b in batches]

        def step(i: int) -> None:
            sft_step(engines[0], batches[i].to(device).train, response_tokens[i], dist)
    elif setting in ("reweight-lora", "reweight-lora-lisa"):
        from scalebio_cli.recipe.schema import LoraConfig
        from scalebio_cli.train.factory import Copy, make_engines

        lora_kwargs = {**kwargs, "lisa": kwargs["lisa"] if setting == "reweight-lora-lisa" else LisaConfig(layers=0)}
        u, w = make_engines(model, [Copy(1e-4, 1, "u"), Copy(1e-4, 1, "w")], ds_config=None, lora_key="bench",
                            lora=LoraConfig(r=args.lora_r, target_modules=args.lora_targets), **lora_kwargs)
        engines = [u, w]
        lam = SourceWeights(len(sources), 1e-2, 10_000, 0.0, device)
        batches = [plan.next(i) for i in range(args.steps)]

        def step(i: int) -> None:
            bilevel_step(u, w, lam, batches[i].to(device), i, alpha=10.0, dist=dist)
    else:
        import copy

        u = Engine(model, lr=1e-4, **kwargs)
        w = Engine(copy.deepcopy(model), lr=1e-4, **kwargs)
        engines = [u, w]
        lam = SourceWeights(len(sources), 1e-2, 10_000, 0.0, device)
        batches = [plan.next(i) for i in range(args.steps)]

        def step(i: int) -> None:
            bilevel_step(u, w, lam, batches[i].to(device), i, alpha=10.0, dist=dist)

    if setting.endswith("-logits"):  # before head-only losses: full [b, T, vocab] logits, then a gather
        for e in engines:
            e.module.head_only = False
    if setting == "reweight-reference":
        for e in engines:  # the reference's choice: state for every parameter, never freed
            e.optimizer.release = lambda params: None
            for prm in e.model.parameters():
                e.optimizer.state[prm] = {"step": 0, "exp_avg": torch.zeros_like(prm, dtype=torch.float32),
                                          "exp_avg_sq": torch.zeros_like(prm, dtype=torch.float32),
                                          **({"master": prm.detach().float()} if prm.dtype != torch.float32 else {})}

    times = []
    for i in range(args.steps):
        for e in engines:
            e.begin_step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    measured = times[args.warmup:]
    tokens = [b.num_tokens for b in batches]
    sft_tokens = [sum(m.num_tokens for m in b.train) for b in batches]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    moved = statistics.median(sft_tokens if setting.startswith("sft") else tokens)
    return {"setting": setting + "-ckpt" * checkpointing, "median_s": statistics.median(measured), "peak_bytes": peak,
            "tokens_per_s": moved / statistics.median(measured),
            "optimizer_state_bytes": sum(e.optimizer.state_bytes() for e in engines),
            "params": params}


def peer_sft(model, plan, args: argparse.Namespace, baseline: int, params: int, checkpointing: bool) -> dict:
    """The SFT step users already run: transformers.Trainer on the same model, the same B examples per step (all
    blocks trained, AdamW, the usual SFT collator: right padding, labels -100 outside the response), its own
    full-logits loss; each optimizer step timed by a callback."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    p = PRESETS[args.preset]
    examples = []  # the u batch of each step (the examples the SFT settings train on), unpadded again
    for i in range(args.steps):
        for mb in plan.next(i).train:
            labels = torch.full_like(mb.input_ids, -100)
            labels[mb.loss_rows, mb.loss_cols + 1] = mb.loss_targets  # HF shifts labels itself
            for row, n in enumerate(mb.attention_mask.sum(dim=1).tolist()):
                examples.append({"input_ids": mb.input_ids[row, :n].tolist(), "labels": labels[row, :n].tolist()})

    def collate(rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        out = {"input_ids": torch.zeros((len(rows), width), dtype=torch.long),
               "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
               "labels": torch.full((len(rows), width), -100, dtype=torch.long)}
        for row, r in enumerate(rows):
            n = len(r["input_ids"])
            out["input_ids"][row, :n] = torch.tensor(r["input_ids"])
            out["attention_mask"][row, :n] = 1
            out["labels"][row, :n] = torch.tensor(r["labels"])
        return out

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *a, **k) -> None:
            if torch.cuda.is_available() and args.device == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k) -> None:
            if torch.cuda.is_available() and args.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    training = TrainingArguments(
        output_dir="/tmp/scalebio-bench-peer", per_device_train_batch_size=p["micro"],
        gradient_accumulation_steps=p["batch"] // p["micro"], max_steps=args.steps, learning_rate=1e-4,
        weight_decay=0.0, max_grad_norm=10.0, lr_scheduler_type="constant", optim="adamw_torch", report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=args.device == "cpu",
        bf16=args.device == "cuda", dataloader_num_workers=0, remove_unused_columns=False,
        gradient_checkpointing=checkpointing, seed=0)
    trainer = Trainer(model=model, args=training, train_dataset=examples, data_collator=collate, callbacks=[timer])
    trainer.train()
    measured = timer.times[args.warmup:]
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    tokens = statistics.median(sum(len(e["input_ids"]) for e in examples[i * p["batch"]:(i + 1) * p["batch"]])
                               for i in range(args.steps))
    state = sum(t.numel() * t.element_size() for st in trainer.optimizer.state.values() for t in st.values()
                if torch.is_tensor(t))
    return {"setting": "peer-sft" + "-ckpt" * checkpointing, "median_s": statistics.median(measured),
            "peak_bytes": peak, "tokens_per_s": tokens / statistics.median(measured),
            "optimizer_state_bytes": state, "params": params}


def summary(r: dict, p: dict, args: argparse.Namespace, mib: float) -> list[str]:
    """The ratios the targets are stated in, for the settings that ran."""
    floor = 2 + p["val_batch"] / p["batch"]
    out = []
    for kind in ("lisa", "all"):
        if f"reweight-{kind}" in r and f"sft-{kind}" in r:
            overhead = r[f"reweight-{kind}"]["median_s"] / (floor * r[f"sft-{kind}"]["median_s"])
            out.append(f"- overhead ({kind}) = reweight / ((2 + |V|/|B|) x sft) = {overhead:.3f} "
                       f"(target <= {1.10 if args.device == 'cpu' else 1.05})")
    if {"reweight-lisa", "sft-lisa"} <= set(r):
        out.append(f"- memory: LISA reweight / LISA SFT = "
                   f"{r['reweight-lisa']['peak_bytes'] / r['sft-lisa']['peak_bytes']:.2f} (target <= 2.3)")
    if {"reweight-lisa", "reweight-all"} <= set(r):
        out.append(f"- LISA vs all blocks: reweight step "
                   f"{r['reweight-all']['median_s'] / r['reweight-lisa']['median_s']:.2f}x faster, "
                   f"{r['reweight-all']['peak_bytes'] / r['reweight-lisa']['peak_bytes']:.2f}x less memory")
    if {"reweight-lisa", "reweight-lisa-cut"} <= set(r):
        out.append(f"- embeddings trained (default) vs cut at the lowest active block (`lisa.train_embeddings: "
                   f"false`): {r['reweight-lisa']['median_s'] * 1000:.1f} vs "
                   f"{r['reweight-lisa-cut']['median_s'] * 1000:.1f} ms per step, "
                   f"{r['reweight-lisa']['peak_bytes'] * mib:,.1f} vs "
                   f"{r['reweight-lisa-cut']['peak_bytes'] * mib:,.1f} MiB")
    if {"reweight-lisa", "reweight-lisa-logits"} <= set(r):
        out.append(f"- LM head only at loss positions, chunked (default) vs full logits: peak memory "
                   f"{r['reweight-lisa']['peak_bytes'] / r['reweight-lisa-logits']['peak_bytes']:.2f}x "
                   f"(target <= 0.5 on the real vocabulary), step "
                   f"{r['reweight-lisa-logits']['median_s'] / r['reweight-lisa']['median_s']:.2f}x faster")
    if {"reweight-lisa", "reweight-reference"} <= set(r):
        state = r["reweight-reference"]["optimizer_state_bytes"] / max(1, r["reweight-lisa"]["optimizer_state_bytes"])
        out.append(f"- the reference implementations' LISA (optimizer state for all parameters, never freed): "
                   f"{r['reweight-reference']['peak_bytes'] * mib:,.1f} MiB and "
                   f"{r['reweight-reference']['median_s'] * 1000:.1f} ms per step ({state:.1f}x the optimizer state)")
    for ck in ("", "-ckpt"):
        if {f"sft-all{ck}", f"peer-sft{ck}"} <= set(r):
            ratio = r[f"peer-sft{ck}"]["median_s"] / r[f"sft-all{ck}"]["median_s"]
            out.append(f"- SFT step, all blocks{' (both checkpointed)' * bool(ck)}: transformers.Trainer / ours = "
                       f"{ratio:.2f} (target >= 1.0), peak memory ours / Trainer's = "
                       f"{r[f'sft-all{ck}']['peak_bytes'] / r[f'peer-sft{ck}']['peak_bytes']:.2f}")
        if {f"reweight-lisa{ck}", f"peer-sft{ck}"} <= set(r) and args.device == "cuda":
            out.append(f"- MFU, LISA reweight / peer SFT step{' (checkpointed)' * bool(ck)}: "
                       f"{r[f'reweight-lisa{ck}']['tokens_per_s'] / r[f'peer-sft{ck}']['tokens_per_s']:.2f} "
                       "(same parameter count, so the MFU ratio is the tokens/s ratio; target >= 0.9)")
    if {"reweight-lisa-ckpt", "reweight-lisa-heap-ckpt"} <= set(r):
        fixed, heap = r["reweight-lisa-ckpt"], r["reweight-lisa-heap-ckpt"]
        out.append(f"- checkpointed, freed blocks given back vs glibc's default heap: peak memory "
                   f"{fixed['peak_bytes'] / heap['peak_bytes']:.2f}x, step {fixed['median_s'] / heap['median_s']:.2f}x"
                   " the time")
    before = r.get("reweight-lisa-logits")  # the step as it was: full logits, no checkpointing
    for name in ("reweight-lisa-heap-ckpt", "reweight-lisa-ckpt"):
        if before and name in r:
            how = "glibc's heap" if "heap" in name else "freed blocks given back"
            out.append(f"- head-only losses, checkpointing, {how}, vs the step before (full logits): peak memory "
                       f"{r[name]['peak_bytes'] / before['peak_bytes']:.2f}x (target <= 0.5 on the real "
                       f"vocabulary), step {r[name]['median_s'] / before['median_s']:.2f}x the time")
    if {"reweight-lisa-ckpt", "sft-lisa-ckpt"} <= set(r):
        overhead = r["reweight-lisa-ckpt"]["median_s"] / ((2 + p["val_batch"] / p["batch"])
                                                          * r["sft-lisa-ckpt"]["median_s"])
        out.append(f"- overhead (lisa, checkpointed) = {overhead:.3f}")
    # LoRA (adapters in every block, or LISA over them) against LISA and all-blocks reweight, like with like
    for lora_name, lora_label in (("reweight-lora", ""), ("reweight-lora-lisa", " with LISA over its adapters")):
        for other_name, other_label, target in (("reweight-lisa", "LISA", " (targets: memory <= 0.6, step <= 1.0)"),
                                                ("reweight-all", "all-blocks", "")):
            for ck, how in (("", ""), ("-ckpt", ", both checkpointed"),
                            ("-heap-ckpt", ", both checkpointed, glibc's heap")):
                if {lora_name + ck, other_name + ck} <= set(r):
                    lora, other = r[lora_name + ck], r[other_name + ck]
                    out.append(f"- LoRA r={args.lora_r}{lora_label} vs {other_label} reweight{how}: peak memory "
                               f"{lora['peak_bytes'] / other['peak_bytes']:.2f}x, step time "
                               f"{lora['median_s'] / other['median_s']:.2f}x, optimizer state "
                               f"{lora['optimizer_state_bytes'] / max(1, other['optimizer_state_bytes']):.3f}x"
                               f"{target}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default=None, choices=list(PRESETS), help="model and batch sizes")
    parser.add_argument("--lisa", type=int, default=2, help="active blocks in the LISA settings")
    parser.add_argument("--interval", type=int, default=4, help="LISA re-draw interval (short, so the median "
                                                                     "covers several draws)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lora-r", type=int, default=8, help="adapter rank of the reweight-lora setting")
    parser.add_argument("--lora-targets", nargs="+", default=["all-linear"],
                        help="modules the adapters adapt (reweight.lora.target_modules), e.g. q_proj v_proj")
    parser.add_argument("--settings", nargs="+", default=None, choices=SETTINGS,
                        help="run only these (default: all without -ckpt; preset smollm2: SMOLLM2_SETTINGS)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/benchmarks.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.preset = args.preset or ("cpu" if args.device == "cpu" else "1b")
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)))
        return

    if args.settings is None:
        args.settings = (SMOLLM2_SETTINGS if args.preset == "smollm2"
                         else [name for name in SETTINGS if not name.endswith("-ckpt")])
    results = {}
    for setting in args.settings:
        cmd = [sys.executable, __file__, "--child", setting, "--device", args.device, "--preset", args.preset,
               "--lisa", str(args.lisa), "--interval", str(args.interval), "--steps", str(args.steps),
               "--lora-r", str(args.lora_r), "--lora-targets", *args.lora_targets,
               "--warmup", str(args.warmup)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"}
                             if args.device == "cpu" else None)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{setting} failed:\n{out.stderr[-3000:]}")
        results[setting] = json.loads(line[len("RESULT "):])
        print(f"  {setting}: {results[setting]['median_s'] * 1000:.1f} ms", file=sys.stderr)

    p = PRESETS[args.preset]
    r = results
    mib = 1 / 2**20
    device_name = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores" if args.device == "cpu"
                   else __import__("torch").cuda.get_device_name())
    mem_label = "peak RSS above baseline" if args.device == "cpu" else "peak CUDA memory"
    params = next(iter(r.values()))["params"]
    lora_targets = ("all linear layers of the blocks" if args.lora_targets == ["all-linear"]
                    else ", ".join(args.lora_targets))
    lines = [
        f"### {datetime.now(timezone.utc):%Y-%m-%d} · {args.device} ({device_name}) · preset `{args.preset}`",
        "",
        f"Llama {p['layers']} blocks, d={p['hidden']}, vocab {p['vocab']}, {params / 1e6:.1f}M "
        f"parameters, {'bf16' if args.device == 'cuda' else 'fp32'}; |B|={p['batch']}, |V|={p['val_batch']}, "
        f"~{p['seq']} tokens per example, micro-batch {p['micro']}; LISA {args.lisa} blocks re-drawn every "
        f"{args.interval} steps; LoRA r={args.lora_r} ({lora_targets}); median of "
        f"{args.steps - args.warmup} steps after {args.warmup} warm-up. `python scripts/bench_reweight.py "
        f"{' '.join(sys.argv[1:])}`.",
        "",
    ]
    # Model FLOPs utilisation: 6 x parameters per token moved through a forward and backward pass (the usual
    # convention, attention left out), over the device's dense bf16 peak; GPU only.
    peak = peak_flops(device_name) if args.device == "cuda" else None
    lines += [f"| setting | step (ms) | tokens/s | {mem_label} (MiB) | optimizer state (MiB) |" + " MFU |" * bool(peak),
              "|---|---:|---:|---:|---:|" + "---:|" * bool(peak)]
    for setting in args.settings:
        x = r[setting]
        mfu = f" {6 * x['params'] * x['tokens_per_s'] / peak:.3f} |" if peak else ""
        lines.append(f"| {setting} | {x['median_s'] * 1000:.1f} | {x['tokens_per_s']:,.0f} | "
                     f"{x['peak_bytes'] * mib:,.1f} | {x['optimizer_state_bytes'] * mib:,.1f} |{mfu}")
    lines += [""] + summary(r, p, args, mib)
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        doc = ROOT / "docs" / "benchmarks.md"
        head = "# Benchmarks\n\nAppended by the scripts in `scripts/`; newest last.\n"
        existing = doc.read_text() if doc.exists() else head
        title = ("Real vocabulary: SmolLM2-135M-Instruct, head-only losses, checkpointing, the peer SFT step, LoRA"
                 if args.preset == "smollm2" else "reweight step vs its floor, LISA and LoRA memory")
        doc.write_text(existing.rstrip() + f"\n\n## {title}\n\n" + text + "\n")


if __name__ == "__main__":
    main()
