"""`RUN/weights.json`: the product of `scalebio reweight` (format `scalebio-weights/1`, see CONTRACT.md)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from scalebio_cli import __version__
from scalebio_cli.files import write_json

FORMAT = "scalebio-weights/1"


def build(*, weights: dict[str, float], weights_averaged: dict[str, float], sources: dict[str, dict[str, Any]],
          validation: dict[str, Any] | None, trajectory: list[dict[str, Any]], steps: int, seed: int, model: str,
          config: dict[str, Any], evidence: dict[str, dict[str, Any]] | None = None,
          evidence_level: float | None = None, settled: dict[str, Any] | None = None,
          placebo: dict[str, Any] | None = None) -> dict[str, Any]:
    """The document (CONTRACT v1-v4). `evidence` (v3) with `p` and `verdict` per source and `evidence_level` (v4);
    `settled` (v4): whether the weights stopped moving; `placebo` (v4): the control source, apart from `weights`."""
    return {
        "format": FORMAT,
        "weights": weights,
        "weights_averaged": weights_averaged,
        **({"evidence": evidence} if evidence is not None else {}),
        **({"evidence_level": evidence_level} if evidence_level is not None else {}),
        **({"settled": settled} if settled is not None else {}),
        **({"placebo": placebo} if placebo is not None else {}),
        "sources": sources,
        "validation": validation,
        "trajectory": trajectory,
        "steps": steps,
        "seed": seed,
        "model": model,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "version": __version__,
        "config": config,
    }


def write(path: Path, doc: dict[str, Any]) -> None:
    write_json(path, doc)


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads keeps the last of two equal keys silently; in a hand-edited file that hides a source."""
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise ValueError(f"the key {key!r} appears twice in one object")
        doc[key] = value
    return doc


def _read(path: Path) -> dict[str, Any]:
    import json

    from scalebio_cli.errors import InputError

    if path.is_dir():  # `--weights runs/x`: the run folder, not its result
        inside = path / "weights.json"
        raise InputError(f"{path}: a run folder, not a weights file: did you mean {inside}?" if inside.is_file()
                         else f"{path}: a folder, not a weights file (a finished reweight run folder holds "
                              "weights.json; this one has none)")
    if not path.is_file():
        from scalebio_cli.files import did_you_mean

        raise InputError(f"{path}: weights file not found{did_you_mean(path)}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_refuse_duplicates)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise InputError(f"{path}: not a valid weights file (not JSON: {exc})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise InputError(f"{path}: format is {found!r}, expected {FORMAT!r} (a weights.json written by "
                         "`scalebio reweight`)")
    return doc


def _weight_problems(path: Path, key: str, weights: dict[str, Any], sources: dict[str, Any]) -> list[str]:
    import math

    problems = []
    for name, value in weights.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            problems.append(f"{path}: {key}.{name} is {value!r}, not a number")
        elif not 0.0 <= value <= 1.0:
            problems.append(f"{path}: {key}.{name} = {value} is outside [0, 1]")
    if not problems and abs(sum(weights.values()) - 1.0) > 1e-6:
        problems.append(f"{path}: {key} sum to {sum(weights.values()):.9f}, not 1 (within 1e-6)")
    for name in weights:
        if name not in sources:
            problems.append(f"{path}: {key} names source '{name}', which is not among its sources "
                            f"({', '.join(sources)})")
    for name in sources:
        if name not in weights:
            problems.append(f"{path}: source '{name}' has no weight in '{key}'")
    return problems


def _field_problems(path: Path, name: str, info: Any) -> list[str]:
    """The fields of sources.NAME that sample relies on, each of the right type."""
    import re

    if not isinstance(info, dict) or not isinstance(info.get("path"), str) or not info["path"]:
        return [f"{path}: sources.{name} must have a 'path'"]
    problems = []
    if not isinstance(info.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", info["sha256"]):
        problems.append(f"{path}: sources.{name}.sha256 is {info.get('sha256')!r}, not a sha256 (64 hex digits)")
    count = info.get("num_examples")
    if "num_examples" in info and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        problems.append(f"{path}: sources.{name}.num_examples is {count!r}, not a count of records")
    return problems


def _recipe_problems(path: Path, doc: dict[str, Any]) -> list[str]:
    """The recorded recipe names the same sources, in the same files: a renamed source shows up here."""
    config = doc.get("config")
    recorded = config.get("data", {}).get("sources") if isinstance(config, dict) else None
    if not isinstance(recorded, dict) or not recorded:
        return []  # a file without its recipe (older, or built by hand on purpose): nothing to compare
    sources = doc["sources"]
    # a source split by a column is recorded once per value (NAME/VALUE), each naming its recipe source
    base = {name: _recipe_name(name, info) for name, info in sources.items()}
    if list(dict.fromkeys(base.values())) != list(recorded):
        return [f"{path}: sources ({', '.join(sources)}) are not the sources of its recorded recipe, "
                f"config.data.sources ({', '.join(recorded)}): was a name edited by hand?"]
    problems = []
    for name, info in sources.items():
        entry = recorded[base[name]]
        written = entry.get("path") if isinstance(entry, dict) else entry
        if isinstance(info, dict) and isinstance(written, str) and _as_path(info.get("path")) != _as_path(written):
            problems.append(f"{path}: sources.{name}.path is {info['path']} but config.data.sources.{base[name]} is "
                            f"{written}: was it edited by hand?")
    return problems


def _recipe_name(name: str, info: Any) -> str:
    source = info.get("source") if isinstance(info, dict) else None
    if isinstance(source, dict) and source.get("value") is not None:
        suffix = f"/{source['value']}"  # the value may hold a slash itself (a `group` column: SOURCE/gNN)
        return name[: -len(suffix)] if name.endswith(suffix) else name
    return name


def _as_path(value: Any) -> str:
    from scalebio_cli.data.read.hub import is_hub_id

    text = str(value)
    return text if is_hub_id(text) else str(Path(text).resolve())


def _hash_and_count(source: Path) -> tuple[str, int]:
    """sha256 and record count; one pass over a .jsonl (the hash needs every byte anyway)."""
    import hashlib

    from scalebio_cli.data.read.records import count_records
    from scalebio_cli.files import file_sha256

    if source.suffix != ".jsonl":
        return file_sha256(source), count_records(source)
    digest, count = hashlib.sha256(), 0
    with source.open("rb") as f:
        for line in f:
            digest.update(line)
            count += bool(line.strip())  # the blank-line rule of count_records
    return digest.hexdigest(), count


def _spec_hash_and_count(name: str, info: dict[str, Any]) -> tuple[str, int]:
    """sha256 and record count of a source read through its recorded spec (a folder, a Hub id, split_by, ...)."""
    from scalebio_cli.data.read import sources as data_sources

    source = data_sources.from_record(f"source '{name}'", info["path"], info["source"])
    return data_sources.fingerprint(source), data_sources.count(source)


def _file_problems(path: Path, name: str, info: dict[str, Any], allow_changed_sources: bool) -> list[str]:
    from scalebio_cli.errors import InputError

    source = Path(info["path"])
    spec = isinstance(info.get("source"), dict)
    if not spec and not source.is_file():
        from scalebio_cli.files import did_you_mean

        return [f"{path}: source '{name}' file not found: {source}{did_you_mean(source)}"]
    if allow_changed_sources:
        return []
    try:
        sha, count = _spec_hash_and_count(name, info) if spec else _hash_and_count(source)
    except InputError as exc:
        return [f"{path}: {problem}" for problem in exc.problems]
    if sha != info.get("sha256"):
        return [f"{path}: source '{name}' changed since the weights were learned: {source} no longer matches its "
                "recorded sha256 (--allow-changed-sources to sample anyway)"]
    if "num_examples" in info and info["num_examples"] != count:
        return [f"{path}: sources.{name}.num_examples is {info['num_examples']:,} but {source} holds {count:,} "
                "records (edited by hand? sample draws by this count)"]
    return []


def load(path: str | Path, allow_changed_sources: bool = False,
         averaged: bool = False) -> tuple[dict[str, float], dict[str, Any]]:
    """Read and validate a weights file. Returns (weights, document); every defect is an InputError naming it.

    Checks every field sample relies on, as a hand edit may have changed any of them: the format tag; weights
    that are numbers in [0, 1] summing to 1 (within 1e-6) over exactly the recorded sources; sources' names
    against the recorded recipe; each source's path, sha256 (the file still matches it) and num_examples (the
    file holds that many records). `allow_changed_sources` skips the two checks against the files' contents.
    """
    from scalebio_cli.errors import InputError

    path = Path(path)
    doc = _read(path)
    key = "weights_averaged" if averaged else "weights"
    weights, sources = doc.get(key), doc.get("sources")
    if not isinstance(weights, dict) or not weights:
        raise InputError(f"{path}: '{key}' must be a non-empty mapping of source name to weight")
    if not isinstance(sources, dict):
        raise InputError(f"{path}: 'sources' must map each source name to its path and sha256")
    problems = _weight_problems(path, key, weights, sources)
    fields = {name: _field_problems(path, name, info) for name, info in sources.items() if name in weights}
    problems += [p for found in fields.values() for p in found]
    if not problems:
        problems += _recipe_problems(path, doc)
    for name, found in fields.items():
        if not found:
            problems += _file_problems(path, name, sources[name], allow_changed_sources)
    if problems:
        raise InputError(problems)
    return {name: float(v) for name, v in weights.items()}, doc


def doc_sources(doc: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The sources a weights.json records (data/read/sources.DataSource), read back as the reweight run read them."""
    from scalebio_cli.data.read.sources import from_record

    return {n: from_record(f"source '{n}'", doc["sources"][n]["path"], doc["sources"][n].get("source"))
            for n in names}
