"""Data laid out the way users keep it, built from the demo data (tiny.make_demo_data): a Hub dataset repository
(parquet shards under data/), a repository with configurations, a save_to_disk folder, a .csv, gzip JSON lines with a
category column, and two validation sets in other schemas. For the tests and recipes/data-forms.yaml (built by
scripts/build_demo.py into demo/layouts)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def _qa(messages: list[dict[str, str]]) -> tuple[str, str]:
    return messages[0]["content"], messages[1]["content"]


def build_layouts(root: Path, demo_data: Path, limit: int = 120) -> dict[str, Path]:
    """Write every layout under `root` from the demo's data folder; returns them by name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    clean = [json.loads(line) for line in (demo_data / "clean.jsonl").read_text().splitlines()][:limit]
    noisy = json.loads((demo_data / "noisy.json").read_text())[:limit]
    offtopic = pq.read_table(demo_data / "offtopic.parquet").to_pylist()[:limit]
    val = [json.loads(line) for line in (demo_data / "val.jsonl").read_text().splitlines()]
    out: dict[str, Path] = {}

    # GSM8K-like Hub repository: question/answer columns, train in two shards, a test split
    repo = root / "gsm_repo"
    (repo / "data").mkdir(parents=True, exist_ok=True)
    qa = [_qa(r["messages"]) for r in clean]
    half = len(qa) // 2
    for i, part in enumerate((qa[:half], qa[half:])):
        pq.write_table(pa.table({"question": [q for q, _ in part], "answer": [a for _, a in part]}),
                       repo / "data" / f"train-{i:05d}-of-00002.parquet")
    pq.write_table(pa.table({"question": [q for q, _ in qa[:20]], "answer": [a for _, a in qa[:20]]}),
                   repo / "data" / "test-00000-of-00001.parquet")
    out["gsm_repo"] = repo

    # a repository with configurations, each with its own files (README.md metadata, as on the Hub)
    cfg = root / "cfg_repo"
    for name, rows in (("noisy", noisy), ("offtopic", offtopic)):
        (cfg / name).mkdir(parents=True, exist_ok=True)
        with (cfg / name / "train.jsonl").open("w") as f:
            for r in rows:
                prompt = r.get("instruction") or r.get("prompt")
                f.write(json.dumps({"query": prompt, "response": r.get("output") or r.get("completion")}) + "\n")
    (cfg / "README.md").write_text("---\nconfigs:\n- config_name: noisy\n  data_files:\n  - split: train\n"
                                   "    path: noisy/train.jsonl\n- config_name: offtopic\n  data_files:\n"
                                   "  - split: train\n    path: offtopic/train.jsonl\n---\n# two subsets\n")
    out["cfg_repo"] = cfg

    # a save_to_disk folder with its own column names (mapped in the recipe)
    import datasets

    datasets.disable_progress_bars()
    saved = root / "saved"
    datasets.Dataset.from_dict({"q": [r["prompt"] for r in offtopic],
                                "a": [r["completion"] for r in offtopic]}).save_to_disk(str(saved))
    out["saved"] = saved

    # a csv (alpaca columns) and gzip JSON lines of a mixture with a category column
    csv = root / "noisy.csv"
    import csv as csv_module

    with csv.open("w", newline="") as f:
        writer = csv_module.writer(f)
        writer.writerow(["instruction", "input", "output"])
        for r in noisy:
            writer.writerow([r["instruction"], r["input"] or "", r["output"]])
    out["csv"] = csv
    mixed = root / "mixed.jsonl.gz"
    with gzip.open(mixed, "wt") as f:
        for i, (q, a) in enumerate(qa):
            f.write(json.dumps({"prompt": q, "completion": a, "category": "math"}) + "\n")
            p = offtopic[i % len(offtopic)]
            f.write(json.dumps({"prompt": p["prompt"], "completion": p["completion"], "category": "words"}) + "\n")
    out["mixed"] = mixed

    # two validation sets in other schemas: an input/output file and a messages file
    (root / "val_math.jsonl").write_text("".join(json.dumps({"input": q, "output": a}) + "\n"
                                                 for q, a in (_qa(r["messages"]) for r in val[:60])))
    (root / "val_chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val[60:120]))
    out["val_math"], out["val_chat"] = root / "val_math.jsonl", root / "val_chat.jsonl"
    return out
