"""`scalebio sample`: exact counts, replacement, determinism, and every weights-file defect refused."""

import json
import random
from pathlib import Path

import pytest

from conftest import run_cli
from scalebio_cli.files import file_sha256
from scalebio_cli.results import weights_file
from scalebio_cli.stages.sample import largest_remainder


def test_largest_remainder_exact_and_fair() -> None:
    assert largest_remainder(10, [0.33, 0.33, 0.34]) == [3, 3, 4]
    assert largest_remainder(7, [0.5, 0.5]) == [4, 3]  # tie: source order
    assert largest_remainder(100, [0.884, 0.046, 0.070]) == [88, 5, 7]
    assert largest_remainder(3, [1 / 3] * 3) == [1, 1, 1]
    rng = random.Random(0)
    for _ in range(500):
        k, n = rng.randint(1, 8), rng.randint(0, 10_000)
        w = [rng.random() for _ in range(k)]
        counts = largest_remainder(n, w)
        assert sum(counts) == n
        assert all(abs(c - n * x / sum(w)) < 1 for c, x in zip(counts, w))


@pytest.fixture()
def sources(tmp_path: Path) -> dict[str, Path]:
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"text": f"a{i}"}) + "\n" for i in range(50)))
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"prompt": f"b{i}", "completion": "x"} for i in range(30)]))
    return {"a": a, "b": b}


def make_weights(path: Path, sources: dict[str, Path], probs: dict[str, float], changes: dict | None = None) -> Path:
    doc = weights_file.build(
        weights=probs, weights_averaged=probs,
        sources={n: {"path": str(p), "num_examples": 50 if n == "a" else 30, "sha256": file_sha256(p)}
                 for n, p in sources.items()},
        validation=None, trajectory=[], steps=1, seed=0, model="m", config={})
    doc.update(changes or {})
    path.write_text(json.dumps(doc))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_counts_records_and_manifest(tmp_path: Path, sources) -> None:
    w = make_weights(tmp_path / "w.json", sources, {"a": 0.7, "b": 0.3})
    out = tmp_path / "out" / "s.jsonl"
    result = run_cli("sample", "--weights", str(w), "--num-samples", "41", "--output", str(out), "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    records = read_jsonl(out)
    assert len(records) == 41
    by_source = {n: [r for r in records if r["source"] == n] for n in ("a", "b")}
    assert len(by_source["a"]) == 29 and len(by_source["b"]) == 12  # 28.7 -> 29, 12.3 -> 12
    assert len({r["text"] for r in by_source["a"]}) == 29  # without replacement: no repeats
    assert all(set(r) == {"prompt", "completion", "source"} for r in by_source["b"])  # originals + source
    manifest = json.loads((tmp_path / "out" / "s.manifest.json").read_text())
    assert manifest["num_samples"] == 41 and manifest["counts"] == {"a": 29, "b": 12}
    assert manifest["weights_file"] == str(w) and manifest["seed"] == 3
    assert [r["source"] for r in records] != sorted(r["source"] for r in records)  # shuffled


def test_same_seed_same_output_other_seed_other_output(tmp_path: Path, sources) -> None:
    w = make_weights(tmp_path / "w.json", sources, {"a": 0.5, "b": 0.5})
    outs = []
    for name, seed in (("x", "1"), ("y", "1"), ("z", "2")):
        out = tmp_path / f"{name}.jsonl"
        assert run_cli("sample", "--weights", str(w), "-n", "20", "-o", str(out), "--seed", seed).returncode == 0
        outs.append(out.read_text())
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_replacement_and_too_small_source(tmp_path: Path, sources) -> None:
    w = make_weights(tmp_path / "w.json", sources, {"a": 0.5, "b": 0.5})
    out = tmp_path / "s.jsonl"
    result = run_cli("sample", "--weights", str(w), "-n", "100", "-o", str(out))
    assert result.returncode == 2
    assert "source 'b' has 30 records but 50 were asked for without replacement" in result.stderr
    assert "source 'a'" not in result.stderr  # 50 of 50 is fine
    assert not out.exists() and not (tmp_path / "s.manifest.json").exists()
    result = run_cli("sample", "--weights", str(w), "-n", "100", "-o", str(out), "--replacement")
    assert result.returncode == 0, result.stderr
    records = read_jsonl(out)
    assert len(records) == 100 and len({r["prompt"] for r in records if r["source"] == "b"}) <= 30


def test_uniform_and_proportional_baselines(tmp_path: Path, sources) -> None:
    args = ["--sources", f"a={sources['a']}", "--sources", f"b={sources['b']}", "-n", "16"]
    assert run_cli("sample", "--weights", "uniform", *args, "-o", str(tmp_path / "u.jsonl")).returncode == 0
    assert json.loads((tmp_path / "u.manifest.json").read_text())["counts"] == {"a": 8, "b": 8}
    assert run_cli("sample", "--weights", "proportional", *args, "-o", str(tmp_path / "p.jsonl")).returncode == 0
    assert json.loads((tmp_path / "p.manifest.json").read_text())["counts"] == {"a": 10, "b": 6}  # 50:30


@pytest.mark.parametrize("defect, message", [
    ({"format": "scalebio-weights/0"}, "format is 'scalebio-weights/0', expected 'scalebio-weights/1'"),
    ({"weights": {"a": 0.7, "b": 0.2}}, "weights sum to 0.900000000, not 1"),
    ({"weights": {"a": 1.2, "b": -0.2}}, "weights.b = -0.2 is outside [0, 1]"),
    ({"weights": {"a": 0.5, "c": 0.5}}, "weights names source 'c', which is not among its sources"),
    ({"weights": {"a": "0.5", "b": 0.5}}, "weights.a is '0.5', not a number"),
    ({"weights": {}}, "'weights' must be a non-empty mapping"),
])
def test_weights_file_defects_exit_2_and_write_nothing(tmp_path: Path, sources, defect, message) -> None:
    w = make_weights(tmp_path / "w.json", sources, {"a": 0.5, "b": 0.5}, defect)
    out = tmp_path / "s.jsonl"
    result = run_cli("sample", "--weights", str(w), "-n", "10", "-o", str(out))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and str(w) in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "s.manifest.json").exists()


def test_changed_source_file_is_refused_unless_allowed(tmp_path: Path, sources) -> None:
    w = make_weights(tmp_path / "w.json", sources, {"a": 0.5, "b": 0.5})
    with sources["a"].open("a") as f:
        f.write(json.dumps({"text": "sneaked in"}) + "\n")
    out = tmp_path / "s.jsonl"
    result = run_cli("sample", "--weights", str(w), "-n", "10", "-o", str(out))
    assert result.returncode == 2
    assert f"source 'a' changed since the weights were learned: {sources['a']}" in result.stderr
    assert not out.exists()
    result = run_cli("sample", "--weights", str(w), "-n", "10", "-o", str(out), "--allow-changed-sources")
    assert result.returncode == 0 and len(read_jsonl(out)) == 10


def test_missing_and_malformed_weights_files(tmp_path: Path, sources) -> None:
    result = run_cli("sample", "--weights", str(tmp_path / "nope.json"), "-n", "1", "-o", str(tmp_path / "o.jsonl"))
    assert result.returncode == 2 and "weights file not found" in result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = run_cli("sample", "--weights", str(bad), "-n", "1", "-o", str(tmp_path / "o.jsonl"))
    assert result.returncode == 2 and "not a valid weights file" in result.stderr
    w = make_weights(tmp_path / "w.json", sources, {"a": 0.5, "b": 0.5})
    sources["b"].unlink()
    result = run_cli("sample", "--weights", str(w), "-n", "1", "-o", str(tmp_path / "o.jsonl"))
    assert result.returncode == 2 and "source 'b' file not found" in result.stderr


def test_an_existing_output_is_replaced_only_with_force(tmp_path: Path, sources) -> None:
    w = make_weights(tmp_path / "w.json", sources, {"a": 0.5, "b": 0.5})
    out = tmp_path / "s.jsonl"
    assert run_cli("sample", "--weights", str(w), "-n", "10", "-o", str(out)).returncode == 0
    before = out.read_text()
    again = run_cli("sample", "--weights", str(w), "-n", "12", "-o", str(out), "--seed", "1")
    assert again.returncode == 2 and again.stdout == "" and "Traceback" not in again.stderr
    assert f"--output {out}: already exists; pass --force to replace it" in again.stderr
    assert out.read_text() == before
    forced = run_cli("sample", "--weights", str(w), "-n", "12", "-o", str(out), "--seed", "1", "--force")
    assert forced.returncode == 0, forced.stderr
    assert len(out.read_text().splitlines()) == 12


def write_scores(path: Path, rows: list[tuple[str, int, float | None]]) -> Path:
    path.write_text("".join(json.dumps({"source": s, "index": i, "score": v}) + "\n" for s, i, v in rows))
    return path


def test_rank_by_takes_each_sources_best_scored_records(tmp_path: Path, sources) -> None:
    """Quota a: 6, b: 4; a's best are its records 49, 48, ... (score = index), b's are the even ones (score 1), then
    the odd ones (0), lower index first among equals; an unscored record (b 0) ranks last."""
    w = make_weights(tmp_path / "w.json", sources, {"a": 0.6, "b": 0.4})
    scores = write_scores(tmp_path / "s.scores.jsonl", [("a", i, float(i)) for i in range(50)]
                          + [("b", i, float(i % 2 == 0)) for i in range(1, 30)])
    out = tmp_path / "r.jsonl"
    result = run_cli("sample", "--weights", str(w), "-n", "10", "-o", str(out), "--rank-by", str(scores))
    assert result.returncode == 0, result.stderr
    records = read_jsonl(out)
    assert sorted(r["text"] for r in records if r["source"] == "a") == sorted(f"a{i}" for i in range(44, 50))
    assert sorted(r["prompt"] for r in records if r["source"] == "b") == sorted(["b2", "b4", "b6", "b8"])
    manifest = json.loads((tmp_path / "r.manifest.json").read_text())
    assert manifest["rank_by"] == str(scores) and manifest["counts"] == {"a": 6, "b": 4}
    again = run_cli("sample", "--weights", str(w), "-n", "10", "-o", str(out), "--rank-by", str(scores), "--force",
                    "--seed", "7")  # another seed shuffles the same records
    assert again.returncode == 0 and sorted(map(json.dumps, read_jsonl(out))) == sorted(map(json.dumps, records))


def test_rank_by_with_replacement_cycles_the_ranking(tmp_path: Path, sources) -> None:
    w = make_weights(tmp_path / "w.json", sources, {"a": 0.0, "b": 1.0})
    scores = write_scores(tmp_path / "s.jsonl", [("b", i, -float(i)) for i in range(30)])
    out = tmp_path / "r.jsonl"
    result = run_cli("sample", "--weights", str(w), "-n", "45", "-o", str(out), "--rank-by", str(scores),
                     "--replacement")
    assert result.returncode == 0, result.stderr
    drawn = [r["prompt"] for r in read_jsonl(out)]
    assert sorted(drawn) == sorted([f"b{i}" for i in range(30)] + [f"b{i}" for i in range(15)])
    assert "draws repeat records" in result.stderr and "b: 45 draws of 30 distinct records (1.50" in result.stderr


@pytest.mark.parametrize("rows, message", [
    ([("a", 0, 1.0)], "no scores for source(s) b"),
    ([("a", 0, 1.0), ("b", 30, 1.0)], "source 'b' has 30 records, no record 30"),
    ([("a", 0, 1.0), ("b", 1, 1.0), ("b", 1, 2.0)], "source 'b' record 1 is scored twice"),
    ([("a", 0, "high"), ("b", 1, 1.0)], 'expected {"source": NAME, "index": RECORD, "score": NUMBER}'),
])
def test_rank_by_defects_exit_2_naming_the_file(tmp_path: Path, sources, rows, message) -> None:
    w = make_weights(tmp_path / "w.json", sources, {"a": 0.5, "b": 0.5})
    scores = write_scores(tmp_path / "s.jsonl", rows)
    out = tmp_path / "r.jsonl"
    result = run_cli("sample", "--weights", str(w), "-n", "10", "-o", str(out), "--rank-by", str(scores))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and f"--rank-by {scores}" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "r.manifest.json").exists()


def test_repeated_draws_are_noted_per_source(tmp_path: Path, sources) -> None:
    """Issue 43: 583 draws from a 150-record source went by without a word. The note gives draws per distinct
    record per source (stderr and the manifest); a draw without repeats says nothing."""
    w = make_weights(tmp_path / "w.json", sources, {"a": 0.5, "b": 0.5})
    out = tmp_path / "s.jsonl"
    result = run_cli("sample", "--weights", str(w), "-n", "120", "-o", str(out), "--replacement")
    assert result.returncode == 0, result.stderr
    repeats = json.loads((tmp_path / "s.manifest.json").read_text())["repeats"]
    drawn_b = {r["prompt"] for r in read_jsonl(out) if r["source"] == "b"}
    assert repeats["b"] == {"draws": 60, "distinct": len(drawn_b), "draws_per_record": round(60 / len(drawn_b), 3)}
    assert "draws repeat records (--replacement)" in result.stderr and "b: 60 draws of" in result.stderr
    plain = run_cli("sample", "--weights", str(w), "-n", "20", "-o", str(tmp_path / "p.jsonl"))
    assert "repeat" not in plain.stderr
    assert json.loads((tmp_path / "p.manifest.json").read_text())["repeats"] == {}


def test_min_weight_leaves_out_low_sources_and_rescales_the_rest(tmp_path: Path, sources) -> None:
    """Issue 40: weights 0.92 / 0.03 ... give each low group one record of 40; --min-weight leaves them out."""
    w = make_weights(tmp_path / "w.json", sources, {"a": 0.96, "b": 0.04})
    plain, floored = tmp_path / "p.jsonl", tmp_path / "f.jsonl"
    assert run_cli("sample", "--weights", str(w), "-n", "25", "-o", str(plain)).returncode == 0
    assert json.loads((tmp_path / "p.manifest.json").read_text())["counts"] == {"a": 24, "b": 1}
    result = run_cli("sample", "--weights", str(w), "-n", "25", "-o", str(floored), "--min-weight", "0.05")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "f.manifest.json").read_text())
    assert manifest["counts"] == {"a": 25, "b": 0} and manifest["left_out"] == ["b"]
    assert manifest["min_weight"] == 0.05 and manifest["weights"] == {"a": 0.96, "b": 0.04}  # as the run gave them
    assert {r["source"] for r in read_jsonl(floored)} == {"a"} and "left out b (0.040)" in result.stderr


def test_min_weight_above_every_weight_exits_2_writing_nothing(tmp_path: Path, sources) -> None:
    w = make_weights(tmp_path / "w.json", sources, {"a": 0.6, "b": 0.4})
    out = tmp_path / "f.jsonl"
    result = run_cli("sample", "--weights", str(w), "-n", "10", "-o", str(out), "--min-weight", "0.7")
    assert result.returncode == 2 and "every source's weight is below it (the largest is 0.6)" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists() and not (tmp_path / "f.manifest.json").exists()
