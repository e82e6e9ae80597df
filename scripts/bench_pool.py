"""A pool of millions: reweight's time to the first step and peak RSS on two 1,000,000-record JSON-lines sources,
then `sample` and `select` on it (issue 41, item 6).

    python scripts/bench_pool.py [--records 1000000] [--select-records 40000] [--no-record]

Writes two chat sources of `--records` records each (bench_data.py's records: instruct-math's training records
repeated with a numbered variant, or synthetic math text when that folder is absent; no two records alike, none
shared between the sources) and a 50-record validation set (instruct-math's val.json, distinct from the pool) into
a temporary folder, builds a 2-block Llama over a tiny BPE (scalebio_cli.tiny), then runs the real CLI, each
command a fresh process with an empty token cache, timed from its start, its peak RSS from GNU time's %M (the
largest process of the command's tree):
1. the floor: one plain pass over both files, `json.loads` of every line (what reading the records once costs);
2. `scalebio reweight` (2 steps) on the pool: seconds to the first step's log line, peak RSS; the same on a pool a
   tenth the size, so that memory per record shows (what grows with the records, against the 16-byte line index);
3. `scalebio sample -n --sample` from the weights that run wrote, on both pools;
4. `scalebio select --method rho-loss -n --select-n` on the first `--select-records` records of the pool (half from
   each source: select tokenizes and scores every record, far beyond ~20 minutes for 2M records on 2 CPU cores),
   with the time per record it took and that rate extended to the whole pool.
Targets: time to the first step at most the floor plus 60 s; reweight's and sample's memory growing by at most
64 bytes a record (a few index arrays; the records themselves are ~1 KB each). Prints a table and replaces the
section between `<!-- bench_pool: begin -->` and `<!-- bench_pool: end -->` in docs/benchmarks.md.
Disk: ~1 KB a record (~2 GB for the default pool) plus the subset and its token cache, all removed at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import ENV, INSTRUCT_MATH, base_records, write_jsonl, write_section

from scalebio_cli.data.read.record_reader import LAZY_MIN_RECORDS

BEGIN, END = "<!-- bench_pool: begin -->", "<!-- bench_pool: end -->"
SLACK_S = 60.0  # target: time to the first step <= reading the files once + this
BYTES_PER_RECORD = 64  # target: memory growth per record of the pool (the line index alone is 16)
SCALEBIO = Path(sys.executable).with_name("scalebio")
GNU_TIME = Path("/usr/bin/time")  # its %M: the peak RSS of its child's tree, not counting this process's own

READ_ONCE = """
import json, sys
n = 0
for name in sys.argv[1:]:
    with open(name, "rb") as f:
        for line in f:
            if line.strip():
                json.loads(line)
                n += 1
print(n)
"""


def run(cmd: list[str], env: dict[str, str], first: str | None = None) -> dict:
    """Run `cmd` (stdout and stderr merged): its seconds, the seconds to the first line matching `first`, its peak
    RSS in MiB (the largest process of its tree) and its output. The peak comes from GNU time where there is one:
    wait4's ru_maxrss of a child forked from this process starts at this process's own RSS (torch loaded)."""
    rss_file = None
    if GNU_TIME.is_file():
        fd, rss_file = tempfile.mkstemp(prefix="bench_pool-rss-", suffix=".txt")
        os.close(fd)
        cmd = [str(GNU_TIME), "-f", "%M", "-o", rss_file, *cmd]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **ENV, "COLUMNS": "200", **env})
    seen, log = None, []
    assert proc.stdout is not None
    for line in proc.stdout:
        log.append(f"{time.perf_counter() - start:8.1f}s {line}")
        if seen is None and first is not None and re.match(first, line):
            seen = time.perf_counter() - start
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode or (first is not None and seen is None):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n" + "".join(log[-40:]))
    rss_kb = usage.ru_maxrss
    if rss_file is not None:
        rss_kb = int(Path(rss_file).read_text().split()[-1])
        os.unlink(rss_file)
    return {"seconds": seconds, "first": seen, "rss": rss_kb / 1024, "log": "".join(log)}


def cli(*args: object) -> list[str]:
    head = [str(SCALEBIO)] if SCALEBIO.is_file() else [sys.executable, "-m", "scalebio_cli"]
    return head + [str(a) for a in args]


def write_validation(path: Path, n: int = 50) -> str:
    """`n` validation records unlike the pool's: instruct-math's val.json, or synthetic ones."""
    val = INSTRUCT_MATH / "val.json"
    if val.is_file():
        records = json.loads(val.read_text(encoding="utf-8"))[:n]
        origin = f"the first {n} records of ../shared/data/instruct-math/val.json"
    else:
        records = [{"items": [{"from": "human", "value": f"What is {i} plus {2 * i + 1}?"},
                              {"from": "gpt", "value": f"{i} + {2 * i + 1} = {3 * i + 1}. The answer is {3 * i + 1}."}]}
                   for i in range(100_000, 100_000 + n)]
        origin = f"{n} synthetic addition records"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return origin


def build_model(folder: Path, data: Path) -> str:
    """bench_data's 2-block Llama (hidden 64), over a tiny BPE: SmolLM2's 49,152-token head would make select's
    scoring (a forward pass of every record under two models) ~20x slower per record, which is the model's cost,
    not the pool's."""
    from scalebio_cli import tiny

    tokenizer = tiny.build_tokenizer(tiny.corpus_texts([data])[:5000], vocab_size=2000)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tiny.build_model(tokenizer, layers=2, hidden=64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return "a tiny BPE from scalebio_cli.tiny (vocab 2,000, chat template)"


def head(src: Path, dst: Path, n: int) -> None:
    with src.open("rb") as f, dst.open("wb") as g:
        g.writelines(itertools.islice(f, n))


def recipe(folder: Path, model: Path, sources: dict[str, Path], val: Path, select_n: int = 0) -> Path:
    """A CPU-sized recipe: 2 reweight steps; select's work (and everything cached) inside `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"model": str(model), "output_dir": str(folder / "run"), "seed": 0,
           "data": {"sources": {k: str(v) for k, v in sources.items()}, "validation": str(val), "max_length": 256,
                    "cache_dir": str(folder / "cache")},
           "reweight": {"steps": 2, "batch_size": 8, "val_batch_size": 4, "micro_batch_size": 8, "log_every": 1,
                        "lisa": {"layers": 1, "interval": 1}},
           "select": {"work_dir": str(folder / "select"),  # the irreducible-loss model: a few steps (not a result)
                      "rho_loss": {"micro_batch_size": 32, "holdout_epochs": 2, "min_steps": 0}}}
    path = folder / "recipe.yaml"
    path.write_text(json.dumps(doc), encoding="utf-8")  # JSON is YAML
    return path


def save_logs(m: dict, folder: Path | None) -> None:
    """Each command's output, every line stamped with the seconds since its start, as `folder/NAME.log`."""
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for pool in ("big", "small"):
        for command, result in m.get(pool, {}).items():
            (folder / f"{command}-{pool}.log").write_text(result["log"], encoding="utf-8")
    for name in ("read", "select"):
        if name in m:
            (folder / f"{name}.log").write_text(m[name]["log"], encoding="utf-8")


def pool_runs(folder: Path, model: Path, sources: dict[str, Path], val: Path, sample_n: int) -> dict:
    """reweight then sample on one pool, each cold (its own cache folder)."""
    env = {"SCALEBIO_CACHE": str(folder / "cache")}
    rec = recipe(folder, model, sources, val)
    out = {"reweight": run(cli("reweight", "--config", rec), env, first=r"\s*step\s+1/")}
    out["sample"] = run(cli("sample", "--weights", folder / "run" / "weights.json", "-n", sample_n,
                            "-o", folder / "sampled.jsonl"), env)
    lines = sum(1 for _ in (folder / "sampled.jsonl").open("rb"))
    if lines != sample_n:
        raise SystemExit(f"sample wrote {lines:,} records, asked {sample_n:,}")
    return out


def measure(args: argparse.Namespace) -> dict:
    base, origin = base_records()
    m: dict = {"origin": origin}
    small_n = max(args.records // 10, 1)
    with tempfile.TemporaryDirectory(prefix="bench_pool-") as scratch:
        folder = Path(scratch)
        files = {"a": folder / "a.jsonl", "b": folder / "b.jsonl"}
        t = time.perf_counter()
        write_jsonl(files["a"], base, args.records)
        write_jsonl(files["b"], base[::-1], args.records)
        m["written"] = time.perf_counter() - t
        m["pool_mb"] = sum(f.stat().st_size for f in files.values()) / 1e6
        val = folder / "val.jsonl"
        m["val"] = write_validation(val)
        m["which"] = build_model(folder / "model", files["a"])
        model = folder / "model"
        print(f"pool written ({m['pool_mb']:,.0f} MB in {m['written']:.0f} s); reading it once", file=sys.stderr)

        m["read"] = run([sys.executable, "-c", READ_ONCE, *map(str, files.values())], {})
        if int(m["read"]["log"].split()[-1]) != 2 * args.records:
            raise SystemExit(f"read {m['read']['log']!r} records, wrote {2 * args.records:,}")
        print(f"read once: {m['read']['seconds']:.1f} s; reweight and sample on the pool", file=sys.stderr)
        m["big"] = pool_runs(folder / "big", model, files, val, args.sample)

        print("reweight and sample on a tenth of the pool", file=sys.stderr)
        small = {k: folder / f"small-{k}.jsonl" for k in files}
        for k in files:
            head(files[k], small[k], small_n)
        m["small"] = pool_runs(folder / "small", model, small, val, args.sample)
        for f in small.values():
            f.unlink()

        m["select_records"] = min(args.select_records, 2 * args.records)
        half = m["select_records"] // 2
        subset = {k: folder / f"sel-{k}.jsonl" for k in files}
        for k in files:
            head(files[k], subset[k], half)
        print(f"select rho-loss on {2 * half:,} records", file=sys.stderr)
        sel = folder / "select"
        rec = recipe(sel, model, subset, val)
        m["select"] = run(cli("select", "--config", rec, "--method", "rho-loss", "-n", args.select_n,
                              "-o", sel / "selected.jsonl"), {"SCALEBIO_CACHE": str(sel / "cache")})
        m["select_records"] = 2 * half
    return m


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM"


def rows(m: dict, args: argparse.Namespace) -> tuple[list[tuple[str, str, str]], dict]:
    n, small_n = 2 * args.records, 2 * max(args.records // 10, 1)
    read, big, small, sel = m["read"], m["big"], m["small"], m["select"]
    first = big["reweight"]["first"]
    over = first - read["seconds"]
    grew = {k: (big[k]["rss"] - small[k]["rss"]) * 2**20 / (n - small_n) for k in ("reweight", "sample")}
    met = {"first": over <= SLACK_S, **{k: v <= BYTES_PER_RECORD for k, v in grew.items()}}

    def yes(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    per_record = sel["seconds"] / m["select_records"]
    out = [
        (f"read the pool once: a plain Python pass, `json.loads` of each of the {n:,} lines ({m['pool_mb']:,.0f} MB)",
         f"{read['seconds']:.1f} s ({n / read['seconds']:,.0f} records/s), peak RSS {read['rss']:,.0f} MiB", "floor"),
        (f"`scalebio reweight`, {n:,} records: start to the first step (cold cache)",
         f"{first:.1f} s: the floor + {over:.1f} s (2 steps done at {big['reweight']['seconds']:.1f} s)",
         f"{yes(met['first'])} (<= floor + {SLACK_S:.0f} s)"),
        (f"`scalebio reweight`: peak RSS, {n:,} / {small_n:,} records",
         f"{big['reweight']['rss']:,.0f} / {small['reweight']['rss']:,.0f} MiB: "
         f"{per_record_text(grew['reweight'])}",
         f"{yes(met['reweight'])} (<= {BYTES_PER_RECORD} bytes per record)"),
        (f"`scalebio reweight`, {small_n:,} records: start to the first step",
         f"{small['reweight']['first']:.1f} s", ""),
        (f"`scalebio sample -n {args.sample:,}` from that run's weights, {n:,} records",
         f"{big['sample']['seconds']:.1f} s, peak RSS {big['sample']['rss']:,.0f} MiB", ""),
        (f"`scalebio sample -n {args.sample:,}`, {small_n:,} records: peak RSS",
         f"{small['sample']['rss']:,.0f} MiB ({small['sample']['seconds']:.1f} s): {per_record_text(grew['sample'])}",
         f"{yes(met['sample'])} (<= {BYTES_PER_RECORD} bytes per record)"),
        (f"`scalebio select --method rho-loss -n {args.select_n:,}` on a subset: the first "
         f"{m['select_records'] // 2:,} records of each source ({m['select_records']:,})",
         f"{sel['seconds']:.1f} s ({per_record * 1e3:.2f} ms per record; at that rate the whole pool: "
         f"~{per_record * n / 60:,.0f} min), peak RSS {sel['rss']:,.0f} MiB",
         "the whole pool" if m["select_records"] >= n else
         f"a subset ({m['select_records']:,} of {n:,} records)"
         + (": the whole pool is beyond ~20 min here" if per_record * n > 20 * 60 else "")),
    ]
    return out, met


def per_record_text(grew: float) -> str:
    return f"{grew:,.0f} byte{'' if round(grew) == 1 else 's'} per record"


def phases(log: str) -> str:
    """Where reweight's time to the first step went, from its stamped log (empty when a line is missing)."""
    stamps = [(float(t), rest) for t, rest in re.findall(r"^\s*([0-9.]+)s (.*)$", log, flags=re.M)]
    checks = next((t for t, rest in stamps if rest.startswith("checks ")), None)
    model = next((t for t, rest in stamps if rest.startswith("model ")), None)
    step = next((t for t, rest in stamps if re.match(r"\s*step\s+1/", rest)), None)
    data = max((t for t, rest in stamps if rest.startswith("data ") and checks is not None and t <= checks),
               default=None)
    if None in (checks, model, step, data):
        return ""
    return (f"the sources indexed, a seeded sample of each checked and tokenized, the validation set tokenized: "
            f"{data:.1f} s; the data checks over every record (data/checks.py: each record parsed, hashed, its word "
            f"3-grams compared with the validation set's): {checks - data:.1f} s; the model loaded: "
            f"{model - checks:.1f} s; the first step: {step - model:.1f} s")


def render(m: dict, args: argparse.Namespace, when: str, load_start: float, load_end: float) -> str:
    """The section of docs/benchmarks.md."""
    table_rows, met = rows(m, args)
    went = phases(m["big"]["reweight"]["log"])
    if went:
        table_rows.insert(2, ("where reweight's time to the first step went", went, ""))
    table = "| measure | result | target |\n|---|---|---|\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in table_rows)
    command = "python scripts/bench_pool.py" + "".join(
        f" --{k.replace('_', '-')} {getattr(args, k)}" for k in ("records", "sample", "select_records", "select_n"))
    verdict = "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in
                        zip(("time to first step", "reweight's memory", "sample's memory"), met.values()))
    lazy = ("" if args.records // 10 >= LAZY_MIN_RECORDS else
            f" NB: sources under {LAZY_MIN_RECORDS:,} records are tokenized whole, not read lazily: the tenth-size "
            "pool is not comparable at this --records.")
    shared = "other jobs shared the cores" if load_start >= 1.0 else "nothing else ran"
    prose = (
        f"Measured {when} on {machine()} (load average {load_start:.2f} at the start, {load_end:.2f} at the end, "
        f"the benchmark's own processes included; {shared}); command: `{command}`. The pool: two JSON-lines "
        f"sources of {args.records:,} "
        f"records each ({m['pool_mb']:,.0f} MB; {m['origin']}, each prompt with a variant number, sharegpt "
        f"`items`), validation: {m['val']}; model: a 2-block Llama (hidden 64) over {m['which']}; max_length 256. "
        "Each row is the real CLI in a fresh process with an empty token cache (the files themselves in the OS page "
        "cache, just written, for the floor as for the commands), its peak RSS GNU time's %M (the largest process of "
        f"its tree). Writing the pool took {m['written']:.0f} s (not counted). select's irreducible-loss model trains "
        f"2 epochs (a few steps: a cost measure, not a selection).{lazy} Memory per record: the peak RSS of the same "
        "command on a pool a tenth the size (the first records of each source) subtracted, over the records between "
        f"them. Targets (issue 41): reweight's first step within {SLACK_S:.0f} s of reading the files once; memory "
        f"growing by at most {BYTES_PER_RECORD} bytes a record (an index: reweight's line index is 16 bytes a "
        f"record, its data checks' hashes 8). {verdict}.")
    return (f"## A pool of millions (`make bench-pool`, scripts/bench_pool.py)\n\n{textwrap.fill(prose, 120)}\n\n"
            f"{table}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000, help="records of each of the two sources")
    parser.add_argument("--sample", type=int, default=100_000,
                        help="records `sample` draws (-n; at most a tenth of --records: the same on both pools)")
    parser.add_argument("--select-records", type=int, default=40_000,
                        help="records select scores (the first half of each source; at most the whole pool)")
    parser.add_argument("--select-n", type=int, default=1_000, help="records select keeps (-n)")
    parser.add_argument("--no-record", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--logs", type=Path, help="write each command's output here (lines stamped with seconds)")
    args = parser.parse_args()
    if args.records < 10:
        parser.error("--records: at least 10")
    args.sample = min(args.sample, max(args.records // 10, 1))  # the same -n on both pools

    load_start = os.getloadavg()
    m = measure(args)
    save_logs(m, args.logs)
    text = render(m, args, datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), load_start[0],
                  os.getloadavg()[0])
    print(text)
    if not args.no_record:
        write_section(text, BEGIN, END)


if __name__ == "__main__":
    main()
