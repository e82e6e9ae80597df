"""The first GPU run, measuring everything at once (`make gpu-check`): reweight on a ~1B Llama built from a config,
bf16, as three engines, each a few steps: one GPU plain (our engine, LISA), LoRA + ZeRO-3 (recipes/deepspeed/
zero3.json) and ZeRO-3 with the optimizer offloaded to the CPU (zero3_offload.json, DeepSpeed's CPU Adam).
Per engine: seconds per step and tokens/s (from metrics.jsonl, the last logged step, after warm-up), peak CUDA
memory (torch.cuda.max_memory_allocated in the run's process) beside scripts/estimate_memory.py's figure for the
same engine, model and sizes. The table replaces its section of docs/benchmarks.md.

    python scripts/gpu_check.py                          # one GPU, ~1.1B parameters (~5-8 min, most of it the
                                                         # offload run and CPU Adam's first build)
    python scripts/gpu_check.py --device cpu --tiny --out /tmp/b.md   # the reduced form tests/test_gpu_check.py runs

Each engine runs in its own process (`--child`), as users run it: DeepSpeed keeps process-wide state, and peak
memory must be the run's own. The model and data are built locally (no hub); the tokenizer is the demo's byte-level
BPE (512 tokens), so the 1B model's embedding is small and its parameters are the blocks'.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
GIB = 2**30
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
# (label, scripts/estimate_memory.py engine, recipe changes)
ENGINES = [
    ("plain, LISA 2 blocks", "ddp", {}),
    ("LoRA r=16 + ZeRO-3", "lora-zero3", {"deepspeed": "zero3.json", "lora": 16}),
    ("ZeRO-3 + optimizer offload", "zero3-offload", {"deepspeed": "zero3_offload.json"}),
]
FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=4, max_position_embeddings=2048)  # TinyLlama-1.1B's shape
TINY = dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)


def sizes(tiny: bool) -> dict[str, int]:
    return (dict(steps=2, batch=4, val=2, micro=2, seq=64) if tiny
            else dict(steps=8, batch=16, val=8, micro=4, seq=1024))


def build(folder: Path, tiny: bool, dtype: str) -> tuple[Path, dict[str, Path], object]:
    """Demo data and a Llama of the chosen shape saved as a Hugging Face folder; its config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from scalebio_cli.tiny import build_tokenizer, corpus_texts, make_demo_data

    data = make_demo_data(folder / "data", per_source=200, num_val=100, num_test=10)
    tokenizer = build_tokenizer(corpus_texts(list(data.values())))
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **(TINY if tiny else FULL))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder / "model", data, config


def recipe(folder: Path, model: Path, data: dict[str, Path], size: dict[str, int], changes: dict, device: str) -> Path:
    import yaml

    rw = {"steps": size["steps"], "batch_size": size["batch"], "val_batch_size": size["val"],
          "micro_batch_size": size["micro"], "log_every": size["steps"], "lambda_delay": 0,
          "gradient_checkpointing": True, "lisa": {"layers": 0 if changes.get("lora") else 2, "interval": 20}}
    if changes.get("lora"):
        rw["lora"] = {"r": changes["lora"], "alpha": 2 * changes["lora"]}
    tree = {"model": str(model), "output_dir": str(folder / "run"), "seed": 0,
            "precision": "bf16" if device == "cuda" else "fp32",
            "data": {"sources": {n: str(data[n]) for n in ("clean", "noisy", "offtopic")},
                     "validation": str(data["val"]), "max_length": size["seq"]}, "reweight": rw}
    if changes.get("deepspeed"):
        tree["deepspeed"] = str(ROOT / "recipes" / "deepspeed" / changes["deepspeed"])
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def child(out: Path, args: list[str]) -> None:
    """Run one `scalebio` command in this process; write its peak CUDA memory and seconds to `out`."""
    import torch

    from scalebio_cli import cli

    start, code = time.perf_counter(), 0
    try:
        cli.app(args, prog_name="scalebio", standalone_mode=False)
    except SystemExit as exc:
        code = int(exc.code or 0)
    except Exception as exc:  # record what failed; the table says so instead of losing the other engines
        code = 1
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    peak = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None
    out.write_text(json.dumps({"code": code, "seconds": time.perf_counter() - start, "peak_gib": peak}))


def run_engine(folder: Path, recipe_path: Path, size: dict[str, int], timeout: float) -> dict:
    out = folder / "child.json"
    result = subprocess.run([sys.executable, __file__, "--child", str(out), "reweight", "--config", str(recipe_path)],
                            capture_output=True, text=True, timeout=timeout)
    got = json.loads(out.read_text()) if out.is_file() else {"code": result.returncode}
    if got["code"] != 0:
        got["error"] = (result.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
        return got
    rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in rows if r.get("tokens_per_s")][-1]
    got["tokens_per_s"] = last["tokens_per_s"]
    return got


def estimated(config: object, engine: str, size: dict[str, int]) -> float:
    import estimate_memory

    counts = estimate_memory.counts_of(config)
    return estimate_memory.estimate(counts, engine, 1, 2, size["micro"], size["seq"], r=16)["total"]


def table(rows: list[dict], params: float, device: str, size: dict[str, int], command: str) -> str:
    lines = [BEGIN, "## First GPU check (`make gpu-check`, scripts/gpu_check.py)", "",
             f"Reweight on a {params / 1e6:,.1f}M-parameter Llama built from a config, {device}, "
             f"{size['steps']} steps of {size['batch']} + {size['val']} records x {size['seq']} tokens "
             f"(micro-batches of {size['micro']}, gradient checkpointing). Command: `{command}`.", "",
             "| engine | s/step (at most) | tokens/s | peak memory | estimate (scripts/estimate_memory.py) | run |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("code"):
            lines.append(f"| {r['label']} | - | - | - | {r['estimate']:.1f} GiB | failed: {r.get('error', '')} |")
            continue
        # tokens a step passes at most (u's batch, w's batch and validation, each padded to max_length) over the
        # tokens/s the run logged: an upper bound of the step time, since short records are not padded that far
        tokens = (2 * size["batch"] + size["val"]) * size["seq"]
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f} GiB"
        lines.append(f"| {r['label']} | {tokens / r['tokens_per_s']:.2f} | {r['tokens_per_s']:,.0f} | {peak} | "
                     f"{r['estimate']:.1f} GiB | {r['seconds']:.0f} s in all |")
    return "\n".join(lines + ["", END]) + "\n"


def write_section(out: Path, section: str) -> None:
    text = out.read_text() if out.is_file() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):].lstrip("\n")
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    out.write_text(text)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(Path(sys.argv[2]), sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-block model and 2 steps (the suite's reduced form)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per engine run")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (use --device cpu --tiny for the reduced form)")
    size = sizes(args.tiny)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        root = Path(scratch)
        model, data, config = build(root, args.tiny, "bfloat16" if args.device == "cuda" else "float32")
        import estimate_memory

        params = estimate_memory.counts_of(config)["total"]
        rows = []
        for label, engine, changes in ENGINES:
            folder = root / engine
            folder.mkdir()
            path = recipe(folder, model, data, size, changes, args.device)
            got = run_engine(folder, path, size, args.timeout)
            rows.append({"label": label, "estimate": estimated(config, engine, size), **got})
            print(f"{label}: {got}", flush=True)
    command = "python scripts/gpu_check.py" + (" --device cpu --tiny" if args.tiny else "")
    write_section(args.out, table(rows, params, args.device, size, command))
    print(f"wrote {args.out}")
    if any(r.get("code") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
