"""Time `scalebio sample` drawing 1,000,000 records; prints a table and appends it to docs/benchmarks.md.

    python scripts/bench_sample.py [--records 1000000] [--no-record]

Writes four sources of chat records (3 x .jsonl, 1 x .json list; 1.5M records, ~0.5 GB together) into a temporary
folder, a weights file for them, then runs the real CLI once without and once with replacement, measuring wall
time and the child's peak RSS (the files are streamed: memory must stay far below their size).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"a": 500_000, "b": 400_000, "c": 350_000, "d": 250_000}
WEIGHTS = {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1}


def write_sources(folder: Path) -> dict[str, Path]:
    paths = {}
    def record(name: str, i: int) -> dict:
        return {"messages": [{"role": "user", "content": f"Question {i} from {name}: what is {i} + 7?"},
                             {"role": "assistant", "content": f"{i} + 7 = {i + 7}. The answer is {i + 7}."}]}

    for name, n in SIZES.items():
        if name == "d":
            path = folder / f"{name}.json"
            with path.open("w") as f:
                f.write("[\n" + ",\n".join(json.dumps(record(name, i)) for i in range(n)) + "\n]\n")
        else:
            path = folder / f"{name}.jsonl"
            with path.open("w") as f:
                f.writelines(json.dumps(record(name, i)) + "\n" for i in range(n))
        paths[name] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/benchmarks.md")
    args = parser.parse_args()

    from scalebio_cli.files import file_sha256
    from scalebio_cli.results import weights_file

    exe = str(Path(sys.executable).parent / "scalebio")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        paths = write_sources(folder)
        total_bytes = sum(p.stat().st_size for p in paths.values())
        w = folder / "weights.json"
        weights_file.write(w, weights_file.build(
            weights=WEIGHTS, weights_averaged=WEIGHTS,
            sources={n: {"path": str(p), "num_examples": SIZES[n], "sha256": file_sha256(p)} for n, p in paths.items()},
            validation=None, trajectory=[], steps=0, seed=0, model="bench", config={}))
        for replacement in (False, True):
            out = folder / f"out-{replacement}.jsonl"
            flag = "--replacement" if replacement else "--no-replacement"
            start = time.perf_counter()
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            subprocess.run([exe, "sample", "--weights", str(w), "-n", str(args.records), "-o", str(out), flag,
                            "--seed", "0"], check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            peak = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) * 1024
            lines = sum(1 for _ in out.open())
            assert lines == args.records, lines
            rows.append((flag, seconds, peak, out.stat().st_size))
    text = "\n".join([
        f"### {datetime.now(timezone.utc):%Y-%m-%d} · {os.cpu_count()} CPU cores",
        "",
        f"{args.records:,} records drawn from 4 sources ({sum(SIZES.values()):,} records, {total_bytes / 2**20:,.0f} "
        f"MiB: 3 .jsonl + 1 .json list), weights {WEIGHTS}; the real CLI, including its start-up and the sha256 "
        "check of every source. `python scripts/bench_sample.py`.",
        "",
        "| mode | wall time (s) | records/s | peak RSS (MiB) | output (MiB) |",
        "|---|---:|---:|---:|---:|",
        *[f"| `{flag}` | {s:.1f} | {args.records / s:,.0f} | {peak / 2**20:,.0f} | {size / 2**20:,.0f} |"
          for flag, s, peak, size in rows],
    ])
    print(text)
    if not args.no_record:
        doc = ROOT / "docs" / "benchmarks.md"
        header = "# Benchmarks\n\nAppended by the scripts in `scripts/`; newest last.\n"
        existing = doc.read_text() if doc.exists() else header
        doc.write_text(existing.rstrip() + "\n\n## sample: 1,000,000 records, streamed\n\n" + text + "\n")


if __name__ == "__main__":
    main()
