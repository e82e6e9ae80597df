"""The LM head + cross-entropy at the loss positions, three ways, on one batch of loss tokens (forward + backward).

    python scripts/bench_head.py [--tokens 1024] [--hidden 576] [--vocab 49152] [--device cpu|cuda]

- full: `cross_entropy(linear(h, W))` over all loss tokens at once (the [tokens, vocab] logits and their gradient
  exist in full);
- chunked loop (what train/losses.ResponseLoss does): 256-token chunks under activation checkpointing, so one
  chunk's logits exist at a time, in forward and in backward (the head's forward runs twice);
- torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions (torch's chunked kernel).
Prints time and peak memory per variant and appends the table to docs/benchmarks.md. Each variant runs in its own
process so that its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("full", "chunked-loop", "torch-linear-cross-entropy")


def child(variant: str, args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    device = torch.device(args.device)
    torch.manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, device=device) * 0.02).requires_grad_()
    hidden = torch.randn(args.tokens, args.hidden, device=device, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def chunk_ce(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(h, weight), t, reduction="none")

    def loss() -> torch.Tensor:
        if variant == "full":
            return chunk_ce(hidden, targets).sum()
        if variant == "chunked-loop":
            return torch.cat([checkpoint(chunk_ce, h, t, use_reentrant=False)
                              for h, t in zip(hidden.split(256), targets.split(256))]).sum()
        return F.linear_cross_entropy(hidden, weight, targets, reduction="sum",
                                      options=torch.nn.LinearCrossEntropyOptions())

    times, value = [], 0.0
    for _ in range(args.repeats):
        weight.grad = hidden.grad = None
        start = time.perf_counter()
        out = loss()
        out.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        value = float(out.detach())
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
    return {"variant": variant, "ms": statistics.median(times) * 1000, "peak_mib": peak / 2**20, "loss": value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)))
        return
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--child", variant, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{variant} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(line[len("RESULT "):]))
    lines = [f"### {datetime.now(timezone.utc):%Y-%m-%d} · {args.device} · {args.tokens} loss tokens, hidden "
             f"{args.hidden}, vocab {args.vocab:,}", "", f"`python scripts/bench_head.py {' '.join(sys.argv[1:])}`",
             "", "| variant | fwd+bwd (ms) | peak memory above baseline (MiB) | loss |", "|---|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['ms']:,.0f} | {r['peak_mib']:,.0f} | {r['loss']:.4f} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        doc = ROOT / "docs" / "benchmarks.md"
        doc.write_text(doc.read_text().rstrip() + "\n\n## LM head + cross-entropy at the loss positions\n\n" + text
                       + "\n")


if __name__ == "__main__":
    main()
