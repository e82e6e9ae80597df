"""Data preparation: cold records/s against the bare Rust tokenizer, time to the first reweight step on 1,000,000
records, RSS of 1 vs 2 processes.

    python scripts/bench_data.py [--records 60000] [--big 1000000] [--no-record]

Writes instruct-math-like chat records (the training records of all five sources of ../shared/data/instruct-math
repeated with a numbered variant appended to each prompt, or synthetic math text when that folder is absent) into
a temporary folder, then:
1. cold preparation: `load_tokenized` of `--records` records into an empty cache, with the SmolLM2-135M-Instruct
   tokenizer and its chat template (a tiny `scalebio_cli.tiny` tokenizer when the SmolLM2 folder is absent: said
   in the table), on one process and on every core, with the CPU time per record (all processes: steadier than
   the wall clock on a busy machine); against it, the bare Rust tokenizer on the same cores: the same texts,
   rendered beforehand, tokenized by the same number of forked workers, each calling
   `backend_tokenizer.encode_batch` on chunks of the same size (nothing else: no reading, parsing, rendering,
   token location or cache). Target: cold preparation on every core at >= 0.6x that rate (the two alternated,
   fastest of `--repeats` runs each);
2. time from process start to the first reweight step: the real CLI (a 2-block model over that tokenizer) on a
   `--big`-record JSON-lines source plus a small one, cold cache;
3. peak RSS per process: 1, then 2 processes at once mapping the cached tokens of (1) and reading every token;
   PSS (the process's share of shared pages) too, which is where sharing the cache shows.
Prints a table and replaces the section between `<!-- bench_data: begin -->` and `<!-- bench_data: end -->` in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTRUCT_MATH = ROOT.parent / "shared" / "data" / "instruct-math"
SMOLLM2 = Path.home() / ".cache" / "scalebio" / "models" / "SmolLM2-135M-Instruct"
BEGIN, END = "<!-- bench_data: begin -->", "<!-- bench_data: end -->"
ENV = {"HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def base_records() -> tuple[list[dict], str]:
    """Chat records to repeat, and where they come from."""
    files = sorted(INSTRUCT_MATH.glob("train_*.json"))
    if files:
        out = []
        for f in files:
            out += json.loads(f.read_text(encoding="utf-8"))
        return out, f"the {len(out):,} training records of ../shared/data/instruct-math, repeated"
    out = [{"items": [{"from": "human", "value": f"Solve: what is {i} times {i + 3}, then plus {i % 7}? " * 3},
                      {"from": "gpt", "value": f"{i} x {i + 3} = {i * (i + 3)}; plus {i % 7} gives "
                                               f"{i * (i + 3) + i % 7}. The answer is {i * (i + 3) + i % 7}. " * 4}]}
           for i in range(5000)]
    return out, "synthetic math records (../shared/data/instruct-math absent)"


def write_jsonl(path: Path, base: list[dict], n: int) -> None:
    """`n` records: the base records cycled, each prompt with its own variant number (no two records alike)."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            rec = base[i % len(base)]
            turns = rec.get("items") or rec.get("conversations") or []
            turns = [dict(t) for t in turns]
            if turns:
                turns[0]["value"] = f"{turns[0]['value']} (variant {i})"
            f.write(json.dumps({"items": turns}, ensure_ascii=False) + "\n")


def build_model(folder: Path, data: Path) -> str:
    """A 2-block Llama over the SmolLM2 tokenizer (or a tiny one); returns which tokenizer."""
    from scalebio_cli import tiny

    if (SMOLLM2 / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(SMOLLM2))
        which = "SmolLM2-135M-Instruct (49,152 tokens, its chat template)"
    else:
        texts = tiny.corpus_texts([data])[:5000]
        tokenizer = tiny.build_tokenizer(texts, vocab_size=2000)
        which = "a tiny BPE from scalebio_cli.tiny (SmolLM2 folder absent; vocab 2,000, chat template)"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = tiny.build_model(tokenizer, layers=2, hidden=64)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return which


CPU_TIME = """
import resource, time
def cpu():  # this process's CPU seconds and its (finished) children's
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime
"""

COLD_CHILD = CPU_TIME + """
import sys
from scalebio_cli.train.modeling import load_tokenizer
from scalebio_cli.data.tokens.render import Renderer
from scalebio_cli.data.tokens.tokenized import load_tokenized
model, data, cache, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
r = Renderer(load_tokenizer(model), 1024)
t, c = time.perf_counter(), cpu()
d = load_tokenized(data, r, cache_dir=cache, workers=workers)
assert not d.from_cache
print(time.perf_counter() - t, cpu() - c, d.num_records, int(d.full_lengths.sum()))
"""

# The same rendered texts through `backend_tokenizer.encode_batch` alone, on `workers` forked processes that each
# take chunks of encode_chunks.CHUNK texts (what the cold pass's workers get), the texts inherited by the fork.
BARE_CHILD = CPU_TIME + """
import multiprocessing, sys
from scalebio_cli.data.tokens.encode_chunks import CHUNK
from scalebio_cli.data.read.records import iter_examples
from scalebio_cli.data.tokens.render import Renderer
from scalebio_cli.train.modeling import load_tokenizer
model, data, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
renderer = Renderer(load_tokenizer(model), 1024)
items = [(example, where) for where, example in iter_examples(data)]
texts = ["".join(text for text, _ in segments) for segments in renderer.segments_many(items)]
backend = renderer.tokenizer.backend_tokenizer
def tokens(start):
    return sum(len(e) for e in backend.encode_batch(texts[start:start + CHUNK], add_special_tokens=False))
t, c = time.perf_counter(), cpu()
with multiprocessing.get_context("fork").Pool(workers) as pool:
    total = sum(pool.imap(tokens, range(0, len(texts), CHUNK)))
print(time.perf_counter() - t, cpu() - c, len(texts), total)
"""


def run_child(code: str, *args: object) -> tuple[float, float, int, int]:
    """A child process (nothing warm): its seconds, CPU seconds (worker processes included, which a busy machine
    changes less than the seconds), records and tokens (untruncated)."""
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], check=True, capture_output=True, text=True,
                         env={**os.environ, **ENV}).stdout.split()
    return float(out[0]), float(out[1]), int(out[2]), int(out[3])


def cold_preparation(model: Path, data: Path, cache: Path, workers: int) -> tuple[float, float, int, int]:
    """`load_tokenized` of `data` into an empty cache."""
    return run_child(COLD_CHILD, model, data, cache, workers)


def bare_tokenizer(model: Path, data: Path, workers: int) -> tuple[float, float, int, int]:
    """The Rust tokenizer alone on the texts of `data`, rendered beforehand (not timed)."""
    return run_child(BARE_CHILD, model, data, workers)


def first_step(model: Path, big: Path, small: Path, val: Path, folder: Path) -> tuple[float, float]:
    """Seconds from starting `scalebio reweight` to its first step's log line, and to its exit."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "recipe.yaml"
    recipe.write_text(json.dumps({
        "model": str(model), "output_dir": str(folder / "run"), "seed": 0,
        "data": {"sources": {"big": str(big), "small": str(small)}, "validation": str(val), "max_length": 256,
                 "cache_dir": str(folder / "cache")},
        "reweight": {"steps": 2, "batch_size": 8, "val_batch_size": 4, "micro_batch_size": 8, "log_every": 1,
                     "lisa": {"layers": 1, "interval": 1}}}))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "scalebio_cli", "reweight", "--config", str(recipe)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **ENV, "COLUMNS": "200"})
    first = None
    log = []
    assert proc.stdout is not None
    for line in proc.stdout:
        log.append(line)
        if first is None and re.match(r"\s*step\s+1/", line):
            first = time.perf_counter() - start
    proc.wait()
    if proc.returncode or first is None:
        raise SystemExit("reweight failed:\n" + "".join(log[-30:]))
    return first, time.perf_counter() - start


RSS_CHILD = """
import sys, time
import numpy as np
from pathlib import Path
from scalebio_cli.data.tokens import token_cache
arrays, meta = token_cache.read(Path(sys.argv[1]), ("ids", "trainable", "offsets"))
ids, mask = arrays["ids"], arrays["trainable"]
if sys.argv[2] == "copy":
    ids, mask = np.array(ids), np.array(mask)
total = int(ids.sum(dtype=np.int64)) + int(mask.sum())  # every page read
time.sleep(2.0)  # both processes hold the data at once
def field(path, key):
    return next(int(l.split()[1]) for l in open(path) if l.startswith(key))
print(field("/proc/self/status", "VmHWM:"), field("/proc/self/smaps_rollup", "Pss:"), ids.nbytes + mask.nbytes)
"""


def cache_entry(model: Path, data: Path, cache: Path) -> Path:
    """The token-cache folder of `data` (the children read it without loading a tokenizer: RSS is the data's)."""
    from scalebio_cli.data.read import sources as data_sources
    from scalebio_cli.data.tokens import token_cache
    from scalebio_cli.data.tokens.render import Renderer
    from scalebio_cli.data.tokens.tokenized import cache_key
    from scalebio_cli.train.modeling import load_tokenizer

    source = data_sources.from_path("data", str(data))
    key = cache_key(source, Renderer(load_tokenizer(str(model)), 1024), data_sources.fingerprint(source))
    return token_cache.entry(cache, key)


def peak_rss(entry: Path, processes: int, mode: str) -> list[tuple[int, int, int]]:
    procs = [subprocess.Popen([sys.executable, "-c", RSS_CHILD, str(entry), mode],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, **ENV}) for _ in range(processes)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"RSS child failed ({p.returncode})")
        out.append(tuple(int(x) for x in stdout.split()))
    return out  # type: ignore[return-value]


def write_section(text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the section between `begin` and `end` in docs/benchmarks.md (append it when absent)."""
    doc = ROOT / "docs" / "benchmarks.md"
    old = doc.read_text(encoding="utf-8") if doc.is_file() else "# Benchmarks\n"
    section = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + section + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + section + "\n"
    doc.write_text(new, encoding="utf-8")


def measure(args: argparse.Namespace, workers: int) -> dict:
    """Every measurement, in a temporary folder."""
    base, origin = base_records()
    m: dict = {"origin": origin}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        data = folder / "prep.jsonl"
        write_jsonl(data, base, args.records)
        m["which"] = build_model(folder / "model", data)
        model = folder / "model"
        m["serial"] = cold_preparation(model, data, folder / "cache-serial", 1)
        # Alternated, each the fastest of `--repeats` runs: the ratio should not be a change in the machine's load.
        parallel, bare = [], []
        for k in range(args.repeats):
            parallel.append(cold_preparation(model, data, folder / f"cache-{k}", workers))
            bare.append(bare_tokenizer(model, data, workers))
        m["parallel"], m["bare"] = min(parallel), min(bare)
        if m["bare"][3] != m["parallel"][3]:
            raise SystemExit(f"the bare tokenizer gave {m['bare'][3]:,} tokens, preparation {m['parallel'][3]:,}")
        entry = cache_entry(model, data, folder / "cache-0")
        m["rss1"], m["rss2"] = peak_rss(entry, 1, "mmap"), peak_rss(entry, 2, "mmap")
        m["copy1"], m["copy2"] = peak_rss(entry, 1, "copy"), peak_rss(entry, 2, "copy")
        big = folder / "big.jsonl"
        t = time.perf_counter()
        write_jsonl(big, base, args.big)
        m["written"] = time.perf_counter() - t
        small, val = folder / "small.jsonl", folder / "val.jsonl"
        write_jsonl(small, base[::-1], 2000)
        write_jsonl(val, base[1::7], 500)
        m["first"], m["total"] = first_step(model, big, small, val, folder / "first")
        m["big_mb"] = big.stat().st_size / 1e6
    return m


def rows(m: dict, records: int, big: int, workers: int) -> list[tuple[str, str]]:
    def rate(name: str) -> str:
        seconds, cpu = m[name][:2]
        return (f"{records / seconds:,.0f} records/s ({seconds:.1f} s for {records:,}; "
                f"{cpu / records * 1e6:,.0f} µs CPU per record, all processes)")

    mb = 1024  # kB per MiB
    rss1, rss2, copy1, copy2 = m["rss1"], m["rss2"], m["copy1"], m["copy2"]
    ratio = m["bare"][0] / m["parallel"][0]  # same records: the ratio of records/s
    return [
        ("cold preparation, 1 process", rate("serial")),
        (f"cold preparation, {workers} worker processes", rate("parallel")),
        (f"bare Rust tokenizer, {workers} forked worker processes: `backend_tokenizer.encode_batch` on the same "
         "texts, rendered beforehand, chunks of 512", rate("bare")),
        (f"cold preparation / bare tokenizer, {workers} workers each (target >= 0.6)", f"**{ratio:.2f}**"),
        (f"start to first reweight step, {big:,}-record .jsonl ({m['big_mb']:,.0f} MB), cold cache",
         f"{m['first']:.1f} s (run of 2 steps done at {m['total']:.1f} s)"),
        ("peak RSS per process, 1 process (token data memory-mapped)", f"{rss1[0][0] / mb:,.0f} MiB "
         f"(PSS {rss1[0][1] / mb:,.0f} MiB)"),
        ("peak RSS per process, 2 processes (token data memory-mapped)",
         " / ".join(f"{r[0] / mb:,.0f} MiB (PSS {r[1] / mb:,.0f} MiB)" for r in rss2)),
        ("for comparison: each process copies the tokens into its memory (what `.npz` did), 1 / 2 processes",
         f"{copy1[0][0] / mb:,.0f} MiB (PSS {copy1[0][1] / mb:,.0f}) / "
         + " / ".join(f"{r[0] / mb:,.0f} MiB (PSS {r[1] / mb:,.0f})" for r in copy2)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=60_000, help="records of the cold-preparation file")
    parser.add_argument("--big", type=int, default=1_000_000, help="records of the time-to-first-step source")
    parser.add_argument("--repeats", type=int, default=2, help="runs of the two rows compared (fastest counts)")
    parser.add_argument("--no-record", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    from scalebio_cli.data.fork_map import default_workers

    load_start = os.getloadavg()
    workers = default_workers()
    m = measure(args, workers)
    load_end = os.getloadavg()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table = "| measure | result |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in
                                                           rows(m, args.records, args.big, workers))
    text = f"""## Data preparation (`make bench-data`, scripts/bench_data.py)

Measured {when} on {os.cpu_count()} CPU cores (load average {load_start[0]:.2f} at the
start, {load_end[0]:.2f} at the end). Records: {m['origin']}, each prompt with a variant number; tokenizer:
{m['which']}; max_length 1024 (preparation) and 256 (first step). Cold preparation is `load_tokenized` into an
empty cache in a fresh process (reading, parsing, rendering, tokenizing, locating the response tokens, writing
the cache); the bare tokenizer row is the fair floor on the same cores: the same number of forked workers, each
tokenizing chunks of the same pre-rendered texts with the Rust tokenizer and nothing else (same token count,
checked); these two rows ran alternately, {args.repeats} times each, the fastest run counted. Token data of the
RSS rows: {m['rss1'][0][2] / 2**20:,.0f} MiB of ids and masks ({args.records:,} records), read in full by each
process (a child that maps the cache entry and reads every token, nothing else: no tokenizer, no torch); RSS
counts the shared page-cache pages of the mapped files in every process, PSS splits them between the processes
that share them. Writing the {args.big:,}-record file took {m['written']:.0f} s (not counted).

{table}
"""
    print(text)
    if not args.no_record:
        write_section(text)


if __name__ == "__main__":
    main()
