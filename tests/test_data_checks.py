"""Data checks before training (issue #43, data/checks.py): duplicates, records shared between sources, exact and
near copies of validation and test records, `data.decontaminate`, and sources smaller than what a run draws."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import invoke, write_recipe
from scalebio_cli.data import checks, near_copies
from scalebio_cli.data.checks_report import reweight_draws
from scalebio_cli.data.read.sources import from_path

WORDS = [f"w{i}" for i in range(400)] + ["apples", "trains", "sum", "total", "how", "many", "ratio", "left"]


def _text(rng: random.Random, n: int = 24) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _record(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _near(record: dict, rng: random.Random) -> dict:
    """The record with one word of its question replaced (3-gram Jaccard ~0.8: a near copy, not an exact one)."""
    words = record["messages"][0]["content"].split()
    words[len(words) // 2] = "changed"
    return _record(" ".join(words), record["messages"][1]["content"])


def _shout(record: dict) -> dict:
    """The same record in capitals with doubled spaces: an exact copy once whitespace and case are normalised."""
    question, answer = (m["content"] for m in record["messages"])
    return _record("  " + question.upper().replace(" ", "  "), answer.upper() + "\n")


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Validation and test sets, and sources: `good` holds 20 validation records verbatim (case and spacing changed),
    5 repeats of its own records and 4 records also in `nearby`; `nearby` holds 15 near copies of test records and
    9 of validation records; `tiny` has 3 records."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("leaky")
    val = [_record(_text(rng), _text(rng, 6)) for _ in range(40)]
    test = [_record(_text(rng), _text(rng, 6)) for _ in range(30)]
    own = [_record(_text(rng), _text(rng, 6)) for _ in range(80)]
    other = [_record(_text(rng), _text(rng, 6)) for _ in range(80)]
    good = own + [_shout(r) for r in val[:20]] + own[:5] + other[:4]
    nearby = other + [_near(r, rng) for r in test[:15]] + [_near(r, rng) for r in val[20:29]]
    rng.shuffle(good)
    rng.shuffle(nearby)
    tiny = [_record(_text(rng), _text(rng, 6)) for _ in range(3)]
    return {"val": _write(root / "val.jsonl", val), "test": _write(root / "test.jsonl", test),
            "good": _write(root / "good.jsonl", good), "nearby": _write(root / "nearby.jsonl", nearby),
            "tiny": _write(root / "tiny.jsonl", tiny)}


def _sources(paths: dict[str, Path]) -> dict:
    return {n: from_path(f"data.sources.{n}", paths[n]) for n in ("good", "nearby", "tiny")}


# -- the hashes ---------------------------------------------------------------------------------------------------


def test_word_3grams_are_those_of_a_plain_reading() -> None:
    """chunk_shingles (numpy over a whole chunk) gives each text as many distinct 3-grams as a plain Python reading
    of its words, and the same Jaccard similarity between texts."""
    word = re.compile(r"[A-Za-z0-9_\u0080-\U0010ffff]+|[^\sA-Za-z0-9_\u0080-\U0010ffff]")
    rng = random.Random(1)
    texts = ["", "one", "a b", "what is 3+4=7 ?", "héllo wörld 你好 , x_y", "one two three four one two three"]
    texts += [" ".join(rng.choice(["a", "b", "c", "d", "1", "+", "=", "é"]) for _ in range(rng.randint(1, 30)))
              for _ in range(200)]
    texts += ["", "x y z", "", ""]  # empty texts between and after others: each word still finds its record
    sets = near_copies.split_sets(*near_copies.chunk_shingles(texts), len(texts))

    def grams(text: str) -> set:
        w = word.findall(text)
        return {tuple(w)} if 0 < len(w) < 3 else {tuple(w[i:i + 3]) for i in range(len(w) - 2)}

    plain = [grams(t) for t in texts]
    assert [len(s) for s in sets] == [len(g) for g in plain]
    for i in range(0, len(texts) - 1, 7):
        union = plain[i] | plain[i + 1]
        expected = len(plain[i] & plain[i + 1]) / len(union) if union else 1.0
        assert near_copies.jaccard(sets[i], sets[i + 1]) == pytest.approx(expected)


def test_membership_in_the_references_is_exact() -> None:
    """References.contains (a prefix table, then a search of what it lets through) answers as a plain search of
    the sorted union would, for hashes in it, hashes sharing a prefix with it, and others."""
    refs = near_copies.References({})
    rng = np.random.default_rng(0)
    refs.union = np.unique(rng.integers(0, 1 << 32, 5000, dtype=np.uint64))
    near = refs.union[:500] ^ np.uint64(1)  # same 24-bit prefix, other hash (mostly)
    queries = np.concatenate([refs.union[::3], near, rng.integers(0, 1 << 32, 20000, dtype=np.uint64)])
    assert np.array_equal(refs.contains(queries), np.isin(queries, refs.union))
    assert refs.contains(queries).sum() >= len(refs.union[::3])


def test_texts_compare_by_turns_without_case_or_spacing() -> None:
    from scalebio_cli.data.read.records import Turn

    a = [Turn("user", "What  is 2+2?"), Turn("assistant", "4\n")]
    b = [Turn("user", "what is\t2+2?"), Turn("assistant", " 4")]
    assert near_copies.record_text(a) == near_copies.record_text(b) == "user: what is 2+2? assistant: 4"
    assert near_copies.record_text(a) != near_copies.record_text([Turn("assistant", "What is 2+2?"), Turn("user", "4")])


# -- the checks, as any stage calls them --------------------------------------------------------------------------


def test_overlap_with_validation_and_test_sets_is_counted_and_named(leaky: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    """What compare calls with its test files: every source against every reference set, named in the report."""
    lines: list[tuple[str, str]] = []
    refs = {"data.validation": from_path("data.validation", leaky["val"]),
            "test set 'exam'": from_path("exam", leaky["test"])}
    result = checks.check_sources(_sources(leaky), refs, cache_dir=tmp_path,
                                  report=lambda level, text: lines.append((level, text)))
    good, nearby, tiny = (result.by_source[n].record() for n in ("good", "nearby", "tiny"))
    assert good == {"duplicates": 5, "overlap_validation": 20, "near_overlap_validation": 0,
                    "shared_with": {"nearby": 4}, "dropped": 0}
    assert nearby == {"duplicates": 0, "overlap_validation": 0, "near_overlap_validation": 24,
                      "shared_with": {"good": 4}, "dropped": 0}
    assert tiny == {"duplicates": 0, "overlap_validation": 0, "near_overlap_validation": 0, "shared_with": {},
                    "dropped": 0}
    leaks = [text for level, text in lines if level == "leak"]
    assert any("source 'good' holds 20 records of data.validation verbatim" in t for t in leaks)
    assert any("source 'nearby' holds 15 near copies" in t and "test set 'exam'" in t for t in leaks)
    assert any("source 'nearby' holds 9 near copies" in t and "data.validation" in t for t in leaks)
    assert all("data.decontaminate: true" in t for t in leaks)
    assert ("info", "good: 5 of 109 records repeat another of the source; 4 records also in 'nearby'") in lines


def test_a_second_check_reads_the_cache_and_agrees(leaky: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    refs = {"data.validation": from_path("data.validation", leaky["val"])}
    first = checks.check_sources(_sources(leaky), refs, cache_dir=tmp_path, report=None)

    def no_scan(*args: object) -> None:
        raise AssertionError("scanned again")

    monkeypatch.setattr(checks, "scan", no_scan)
    again = checks.check_sources(_sources(leaky), refs, cache_dir=tmp_path, report=None)
    assert {n: c.record() for n, c in again.by_source.items()} == {n: c.record() for n, c in first.by_source.items()}
    assert np.array_equal(again.by_source["good"].flagged, first.by_source["good"].flagged)


def test_a_scan_on_two_workers_is_the_scan_on_one(leaky: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    """A large source is scanned on every core (data/fork_map.py): chunk by chunk, in order, so the positions of the
    copies and every hash are the same as one process finds, across chunk boundaries."""
    monkeypatch.setattr(near_copies, "CHUNK", 40)
    monkeypatch.setattr(checks, "CHUNK", 40)  # 18 chunks of the 709-record source below
    rng = random.Random(1)
    val = [json.loads(line) for line in leaky["val"].read_text().splitlines()]
    records = [_record(_text(rng), _text(rng, 6)) for _ in range(650)]
    records += [_shout(r) for r in val[:30]] + [_near(r, rng) for r in val[10:39]]
    rng.shuffle(records)
    source = from_path("data.sources.big", _write(tmp_path / "big.jsonl", records))
    refs = near_copies.References({"data.validation": from_path("data.validation", leaky["val"])})
    one, two = checks.scan(source, refs, workers=1), checks.scan(source, refs, workers=2)
    assert (len(one.exact_pos), len(one.near_pos)) == (30, 29)
    for name in checks.Scan.ARRAYS:
        assert np.array_equal(getattr(one, name), getattr(two, name)), name


def test_decontaminated_records_are_never_drawn(leaky: dict[str, Path], tokenizer, tmp_path: Path) -> None:
    from scalebio_cli.data.batching import RecordSampler
    from scalebio_cli.data.tokens.render import Renderer
    from scalebio_cli.data.tokens.tokenized import load_tokenized

    refs = {"data.validation": from_path("data.validation", leaky["val"])}
    result = checks.check_sources(_sources(leaky), refs, decontaminate=True, cache_dir=tmp_path, report=None)
    good = result.by_source["good"]
    assert good.dropped == 20 == len(good.flagged)
    data = load_tokenized(leaky["good"], Renderer(tokenizer, 256), tmp_path)
    kept = result.without_dropped("good", data)
    assert result.without_dropped("tiny", data) is data  # nothing dropped: the tokens themselves
    slots = set(RecordSampler(kept, seed=0, stream=0).take(3 * data.num_records))
    dropped_slots = {s for s in data.resolve(good.flagged.tolist()) if s is not None}
    assert dropped_slots and not slots & dropped_slots
    assert len(slots) == data.num_kept - len(dropped_slots)


def test_decontamination_that_leaves_a_source_empty_is_refused(leaky: dict[str, Path], tmp_path: Path) -> None:
    from scalebio_cli.errors import InputError

    refs = {"data.validation": from_path("data.validation", leaky["val"])}
    sources = {"copy": from_path("data.sources.copy", leaky["val"]), "good": from_path("g", leaky["good"])}
    with pytest.raises(InputError, match=r"data.sources.copy: every one of its 40 records copies a record of "
                                         r"data.validation, so data.decontaminate: true leaves nothing of it"):
        checks.check_sources(sources, refs, decontaminate=True, cache_dir=tmp_path, report=None)


def test_draws_split_by_composition() -> None:
    balanced = reweight_draws(100, 24, "balanced", {"a": 10, "b": 30})
    pooled = reweight_draws(100, 24, "pooled", {"a": 10, "b": 30})
    assert balanced.per_step == {"a": 12, "b": 12} and pooled.per_step == {"a": 6, "b": 18}


# -- in a reweight run ---------------------------------------------------------------------------------------------


def _reweight(demo: Path, leaky: dict[str, Path], root: Path, *extra: str):
    data = {"sources": {n: str(leaky[n]) for n in ("good", "nearby", "tiny")}, "validation": str(leaky["val"]),
            "max_length": 128}
    recipe = write_recipe(root / "recipe.yaml", demo, data=data)
    result = invoke("reweight", "--config", recipe, "reweight.steps=2", "reweight.batch_size=6",
                    "reweight.val_batch_size=4", "reweight.log_every=1", *extra)
    assert result.returncode == 0, result.stderr
    return result.stderr, json.loads((root / "run" / "weights.json").read_text())


def test_reweight_names_leaks_and_tiny_sources_and_decontaminates(demo: Path, leaky: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    """One short run with data.decontaminate: the log and weights.json name each leak with its count, and the
    records are dropped (test_decontaminated_records_are_never_drawn checks that the sampler passes over them)."""
    stderr, doc = _reweight(demo, leaky, tmp_path, "data.decontaminate=true")
    log = " ".join(stderr.split())  # messages are one line each; the terminal may still wrap them
    assert "source 'good' holds 20 records of data.validation verbatim" in log
    assert "source 'nearby' holds 9 near copies of its records" in log and "dropped (data.decontaminate: true)" in log
    # 2 steps x 6 examples over 3 sources: 4 draws from a 3-record source
    assert "source 'tiny' has 3 records, fewer than the ~4 reweight draws from it (2 steps x 2 a step)" in log
    assert "source 'good' has" not in log  # 89 records left for 4 draws: no warning
    assert doc["sources"]["good"]["checks"] == {"duplicates": 5, "overlap_validation": 20,
                                                "near_overlap_validation": 0, "shared_with": {"nearby": 4},
                                                "dropped": 20}
    assert doc["sources"]["nearby"]["checks"] == {"duplicates": 0, "overlap_validation": 0,
                                                  "near_overlap_validation": 9, "shared_with": {"good": 4},
                                                  "dropped": 9}
    assert doc["sources"]["tiny"]["checks"]["dropped"] == 0 and doc["config"]["data"]["decontaminate"] is True


# -- in select and compare -----------------------------------------------------------------------------------------


def _leaky_recipe(demo: Path, leaky: dict[str, Path], root: Path, **sections: object) -> Path:
    data = {"sources": {n: str(leaky[n]) for n in ("good", "nearby", "tiny")}, "validation": str(leaky["val"]),
            "max_length": 256, "decontaminate": True, "cache_dir": str(root / "cache")}
    return write_recipe(root / "recipe.yaml", demo, data=data, **sections)


def test_select_checks_its_sources_before_it_scores(demo: Path, leaky: dict[str, Path], tmp_path: Path) -> None:
    """select logs the copies of validation records first, and says it keeps them (data.decontaminate is
    reweight's). Asked for more records than the pool holds, it stops (exit 2) right after loading the pool: the
    checks ran before any scoring."""
    recipe = _leaky_recipe(demo, leaky, tmp_path)
    result = invoke("select", "--config", recipe, "--method", "rho-loss", "-n", "100000", "-o", tmp_path / "s.jsonl")
    log = " ".join(result.stderr.split())
    assert result.returncode == 2 and "--num-samples: 100,000 asked for" in log, log
    assert "source 'good' holds 20 records of data.validation verbatim" in log
    assert "source 'nearby' holds 9 near copies of its records" in log
    assert "select uses every record; remove them from the source" in log and "dropped (" not in log
    assert log.index("source 'good' holds") < log.index("--num-samples")


def test_compare_checks_mixes_against_validation_and_test_sets(demo: Path, leaky: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """compare checks what its mixes draw from (data.sources, a record file) against the validation set and its
    test files before the first cell, naming the source, the set and the count."""
    recipe = _leaky_recipe(demo, leaky, tmp_path, finetune={"lr": 3e-3, "batch_size": 4, "epochs": 1,
                                                            "micro_batch_size": 4})
    result = invoke("compare", "--config", recipe, "--mix", "uniform", "--mix", f"copy={leaky['good']}",
                    "--test", f"exam={leaky['test']}", "-n", "4", "--seeds", "0", "-o", tmp_path / "cmp")
    log = " ".join(result.stderr.split())
    assert result.returncode == 0, result.stderr
    assert "source 'nearby' holds 15 near copies of its records" in log and "test set 'exam'" in log
    assert "source 'nearby' holds 9 near copies of its records" in log
    assert "source '--mix copy' holds 20 records of data.validation verbatim" in log
    assert "compare uses every record" in log
    assert log.index("holds 20 records") < log.index("cell 1 of")
