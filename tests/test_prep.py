"""Preparation proportional to what a run uses: the parallel and lazy paths give the reference tokens, the
memory-mapped cache is reused and rebuilt when damaged, and skipped records are passed over the same way
everywhere (tokenized.py, encode_chunks.py, lazy_tokens.py, token_cache.py, batching.RecordSampler)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scalebio_cli.data.batching import CursorSampler, RecordSampler
from scalebio_cli.data.read.sources import from_path
from scalebio_cli.data.tokens.lazy_tokens import LazyTokens
from scalebio_cli.data.tokens.render import Renderer
from scalebio_cli.data.tokens.tokenized import load_all, load_tokenized
from scalebio_cli.errors import InputError


def _records(n: int) -> list[dict]:
    """Chat, alpaca and prompt/completion records; every 7th one with a prompt too long to keep a response token
    at max_length 32, every 5th one cut by it."""
    out = []
    for i in range(n):
        prompt = ("apple " * 60) if i % 7 == 3 else f"What is {i} + {i % 9}?"
        answer = f"{i + i % 9}" + (" and so on" * 8 if i % 5 == 0 else "")
        if i % 3 == 0:
            out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
        elif i % 3 == 1:
            out.append({"instruction": prompt, "output": answer})
        else:
            out.append({"prompt": prompt, "completion": answer})
    return out


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" + ("\n" if i % 11 == 0 else "") for i, r in
                            enumerate(_records(300))))  # blank lines: record positions are not line numbers
    return path


def _examples(data) -> list[tuple[list[int], list[bool]]]:
    return [tuple(np.asarray(a).tolist() for a in data.example(i)) for i in range(len(data))]


def test_parallel_path_gives_the_serial_tokens(data_file: Path, tmp_path: Path, tokenizer) -> None:
    """(test_prep_exact checks the serial tokens against a reference encoding.)"""
    renderer = Renderer(tokenizer, 32)
    serial = load_tokenized(data_file, renderer, tmp_path / "c1", workers=1)
    parallel = load_tokenized(data_file, renderer, tmp_path / "c2", workers=2)
    for name in ("ids", "trainable", "offsets", "record_index", "full_lengths"):
        assert np.array_equal(getattr(serial, name), getattr(parallel, name)), name
    assert serial.num_skipped == len([i for i in range(300) if i % 7 == 3]) and serial.num_truncated > 0


def test_cache_is_memory_mapped_and_a_damaged_entry_is_rebuilt(data_file: Path, tmp_path: Path, tokenizer) -> None:
    renderer = Renderer(tokenizer, 32)
    first = load_tokenized(data_file, renderer, tmp_path / "cache")
    again = load_tokenized(data_file, renderer, tmp_path / "cache")
    assert again.from_cache and isinstance(again.ids, np.memmap) and np.array_equal(again.ids, first.ids)
    (entry,) = (tmp_path / "cache" / "tokenized").iterdir()
    ids = entry / "ids.npy"
    ids.write_bytes(ids.read_bytes()[: len(ids.read_bytes()) // 2])  # a truncated file
    rebuilt = load_tokenized(data_file, renderer, tmp_path / "cache")
    assert not rebuilt.from_cache and np.array_equal(rebuilt.ids, first.ids)
    (entry / "meta.json").write_text("{not json")
    assert not load_tokenized(data_file, renderer, tmp_path / "cache").from_cache
    assert load_tokenized(data_file, renderer, tmp_path / "cache").from_cache  # and whole again


def test_lazy_tokens_match_the_full_pass_and_skip_the_same_records(data_file: Path, tmp_path: Path,
                                                                   tokenizer) -> None:
    renderer = Renderer(tokenizer, 32)
    full = load_tokenized(data_file, renderer, tmp_path / "cache")
    source = from_path("data.sources.mixed", data_file)
    lazy = LazyTokens(source, full.sha256, renderer, tmp_path / "cache")
    assert lazy.num_records == full.num_records == 300
    positions = list(range(299, -1, -3)) + list(range(300))  # out of order, repeated
    for position, lazy_slot, full_slot in zip(positions, lazy.resolve(positions), full.resolve(positions)):
        assert (lazy_slot is None) == (full_slot is None), position
        if lazy_slot is not None:
            assert all(np.array_equal(a, b) for a, b in zip(lazy.example(lazy_slot), full.example(full_slot)))
    assert lazy.num_tokenized == 300 and lazy.num_kept == len(full) and lazy.num_truncated == full.num_truncated
    # Two processes, each with its own lazy copy, draw the same examples (the global batch's counts agree).
    other = LazyTokens(source, full.sha256, renderer, tmp_path / "cache")
    a, b, c = (RecordSampler(d, seed=0, stream=1) for d in (full, lazy, other))
    for _ in range(40):  # past an epoch: 40 x 9 > 300
        draws = [a.take(9), b.take(9), c.take(9)]
        tokens = [[d.example(s)[0].tolist() for s in draw] for d, draw in zip((full, lazy, other), draws)]
        assert tokens[0] == tokens[1] == tokens[2]
    assert a.cursor == b.cursor == c.cursor > 40 * 9  # the skipped records are counted in the cursor


def test_record_sampler_draws_the_example_permutation_when_nothing_is_skipped(demo: Path, tmp_path: Path,
                                                                              tokenizer) -> None:
    data = load_tokenized(demo / "data" / "clean.jsonl", Renderer(tokenizer, 64), tmp_path / "cache")
    assert data.num_skipped == 0  # so the demo's draws (and weights) are those of a sampler over examples
    records, examples = RecordSampler(data, seed=0, stream=2), CursorSampler(len(data), seed=0, stream=2)
    assert [records.take(7) for _ in range(200)] == [examples.take(7).tolist() for _ in range(200)]


def test_load_all_reads_large_sources_lazily_and_names_a_sample_without_response(data_file: Path, tmp_path: Path,
                                                                                   tokenizer) -> None:
    logs, warnings = [], []
    (lazy,) = load_all([("data.sources.mixed", str(data_file))], Renderer(tokenizer, 32), tmp_path / "cache",
                       lazy_min_records=100, log=logs.append, warn=warnings.append)
    assert lazy.lazy and lazy.num_tokenized == 300  # the seeded sample is the whole of a small source
    assert "tokenized as drawn" in logs[0] and "of a seeded sample of 300" in warnings[0]
    hopeless = tmp_path / "long.jsonl"
    hopeless.write_text("".join(json.dumps({"prompt": "apple " * 60, "completion": "5"}) + "\n"
                                for _ in range(150)))
    with pytest.raises(InputError, match=r"no record of a seeded sample of 150 records of .*long\.jsonl keeps a "
                                         r"response token within data\.max_length=32"):
        load_all([("data.sources.long", str(hopeless))], Renderer(tokenizer, 32), tmp_path / "cache",
                 lazy_min_records=100)


def test_preflight_checks_a_sample_of_a_large_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scalebio_cli.data.read import record_reader
    from scalebio_cli.data.read.sources import from_path as source_at
    from scalebio_cli.recipe import preflight

    monkeypatch.setattr(record_reader, "LAZY_MIN_RECORDS", 100)
    monkeypatch.setattr(preflight, "SAMPLED_CHECK_SIZE", 50)
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"prompt": f"What is {i} plus one, written out in words please?", "completion": "x"})
             for i in range(400)]
    path.write_text("\n".join(lines) + "\n")
    assert preflight.source_problems(source_at("data.sources.big", path)) == []
    path.write_text("\n".join(lines[:-1] + ['{"prompt": ']) + "\n")  # the last record is always checked
    (problem,) = preflight.source_problems(source_at("data.sources.big", path))
    assert f"{path}:400: not valid JSON" in problem


def test_a_cold_pass_over_a_large_source_reports_progress(data_file: Path, tmp_path: Path, tokenizer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A long cold pass shows a progress bar (the records to come, then each chunk's records); a pass from the
    cache, or over a small source, shows none."""
    from scalebio_cli.data import fork_map

    shown: list[tuple[str, object]] = []

    def progress(key: str, total):
        shown.append((key, total))
        return lambda records: shown.append((key, records))

    renderer = Renderer(tokenizer, 32)
    small = load_all([("small", str(data_file))], renderer, tmp_path / "cache-small", progress=progress)
    assert not shown and small[0].num_records == 300
    monkeypatch.setattr(fork_map, "PARALLEL_MIN_RECORDS", 5)  # the file counts as large: bytes >= 5 x 800
    (data,) = load_all([("big", str(data_file))], renderer, tmp_path / "cache", progress=progress)
    assert shown[0] == ("big", 300) and sum(n for _, n in shown[1:]) == 300 == data.num_records
    shown.clear()
    load_all([("big", str(data_file))], renderer, tmp_path / "cache", progress=progress)
    assert not shown
