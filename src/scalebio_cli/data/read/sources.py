"""Sources where users keep them: a recipe's source spec (recipe/schema.SourceSpec) as records.

Plain local `.json`/`.jsonl`/`.parquet` files keep records.py's fast streaming readers and their line-numbered
messages (`file.jsonl:17`). Everything else (a folder laid out like a Hub dataset repository, a configuration of
one, a glob, a `save_to_disk` folder, `.csv`, `.arrow`, gzip/zstd JSON lines, a Hub id) goes through `datasets`,
imported only then. On top of either: the column map (`columns`), one value of a `split_by` column, and a seeded
choice of at most `max_samples` records. A source's records are then the chosen rows, in file order.

A `DataSource` is recorded in weights.json (`to_record`) so that `sample` and `finetune` read it back the same way
(`from_record`); its `fingerprint` hashes the underlying files, as the sha256 of a plain file always did.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scalebio_cli.data.read import records
from scalebio_cli.data.read.records import Example, Turn
from scalebio_cli.errors import InputError
from scalebio_cli.files import did_you_mean, file_sha256
from scalebio_cli.recipe.schema import SourceSpec

COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
SUPPORTED = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
_GLOB = "*?["
_CHOICE_STREAM = 0x3A5  # max_samples's seeded choice


@dataclass(frozen=True)
class DataSource:
    """One source as a stage reads it: the spec, plus which value of `split_by` it keeps and the seed of its
    `max_samples` choice (the recipe's seed; the choice also depends on `name`)."""

    key: str  # how messages name it: data.sources.NAME, data.validation, --data NAME, ...
    spec: SourceSpec
    name: str = ""
    value: str | None = None  # the value of spec.split_by this source keeps
    seed: int = 0

    @property
    def path(self) -> str:
        return self.spec.path

    def __str__(self) -> str:  # messages name a source by its path
        return self.spec.path

    @property
    def is_plain(self) -> bool:
        """A plain local file read as in v1 (weights.json records nothing more than its path)."""
        return self.spec.is_plain and self.value is None and plain_file(self.spec) is not None


def from_path(key: str, path: str | os.PathLike[str]) -> DataSource:
    return DataSource(key, SourceSpec(str(path)))


def suffix(path: str) -> str:
    """`.jsonl`, or `.jsonl.gz` for a compressed file."""
    p = Path(path)
    if p.suffix in COMPRESSIONS:
        return Path(p.stem).suffix + p.suffix
    return p.suffix


def plain_file(spec: SourceSpec) -> Path | None:
    """The file, when records.py reads it directly: a local .json/.jsonl/.parquet, no configuration, split train."""
    p = Path(spec.path)
    if p.suffix in records.EXTENSIONS and spec.name is None and spec.split in (None, "train") and p.is_file():
        return p
    return None


def is_hub_id(path: str) -> bool:
    from scalebio_cli.recipe.load import looks_like_dataset_id

    return looks_like_dataset_id(path) and not Path(path).exists()


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


# ---------------------------------------------------------------------------------------------------------------
# Tables: the rows under a source, before split_by and max_samples.


class PlainTable:
    """A local .json/.jsonl/.parquet file, streamed by records.py."""

    def __init__(self, path: Path):
        self.path = path

    def __len__(self) -> int:
        return records.count_records(self.path)

    def rows(self) -> Iterator[tuple[str, Any]]:
        return records.iter_records(self.path)

    def column_names(self) -> list[str]:
        if self.path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(self.path).schema_arrow.names)
        first = next(iter(self.rows()), (None, None))[1]
        return sorted(first) if isinstance(first, dict) else []

    def column(self, name: str) -> list[Any]:
        return [r.get(name) if isinstance(r, dict) else None for _, r in self.rows()]

    def fingerprint(self) -> str:
        return file_sha256(self.path)


class HFTable:
    """One split of a `datasets.Dataset` (loaded once per process: see `_load`)."""

    def __init__(self, label: str, dataset: Any, files: tuple[str, ...]):
        self.label, self.dataset, self.files = label, dataset, files

    def __len__(self) -> int:
        return len(self.dataset)

    def rows(self, indices: list[int] | None = None) -> Iterator[tuple[str, Any]]:
        ds = self.dataset if indices is None else self.dataset.select(indices)
        for i, row in enumerate(ds):
            yield f"{self.label} row {i if indices is None else indices[i]}", row

    def column_names(self) -> list[str]:
        return list(self.dataset.column_names)

    def column(self, name: str) -> list[Any]:
        return list(self.dataset[name])

    def fingerprint(self) -> str:
        """The underlying files (name and content); datasets' own fingerprint for a dataset with no local files."""
        digest = hashlib.sha256()
        for f in self.files:
            digest.update(f"{Path(f).name}\0{file_sha256(f)}\0".encode())
        if not self.files:
            digest.update(str(self.dataset._fingerprint).encode())
        return digest.hexdigest()


def _local_files(path: str) -> tuple[str, ...]:
    """The files a local path stands for: the file, a glob's matches, or every file below a folder (hidden
    folders, e.g. a `.cache`, left out)."""
    if any(c in path for c in _GLOB):
        return tuple(sorted(f for f in glob.glob(path, recursive=True) if Path(f).is_file()))
    p = Path(path)
    if p.is_file():
        return (str(p),)
    if p.is_dir():
        return tuple(sorted(str(f) for f in p.rglob("*") if f.is_file()
                            and not any(part.startswith(".") for part in f.relative_to(p).parts)))
    return ()


def _builder(files: tuple[str, ...], where: str) -> str:
    """The datasets builder for files of one type (compressed JSON lines read as JSON)."""
    def base(f: str) -> str:
        p = Path(f)
        return Path(p.stem).suffix if p.suffix in COMPRESSIONS else p.suffix

    kinds = {BUILDERS.get(base(f)) for f in files}
    if len(kinds) != 1 or None in kinds:
        raise InputError(f"{where}: cannot tell how to read {', '.join(files[:3])}: use files of one type "
                         f"({', '.join(SUPPORTED)})")
    return kinds.pop()


def _datasets() -> Any:
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    return datasets


def _load_dict(spec: SourceSpec, key: str) -> tuple[Any, tuple[str, ...]]:
    """The dataset (a DatasetDict, or a Dataset for a `save_to_disk` folder of one) and its local files."""
    datasets = _datasets()
    path = spec.path
    files = _local_files(path)
    p = Path(path)
    try:
        if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
            return datasets.load_from_disk(path), files
        if p.is_dir():
            return datasets.load_dataset(path, name=spec.name), files
        if files:  # a file or a glob
            return datasets.load_dataset(_builder(files, key), data_files=list(files), name=spec.name), files
        if not is_hub_id(path):
            raise InputError(f"{key}: file not found: {path}{did_you_mean(path)}")
        return datasets.load_dataset(path, name=spec.name), ()
    except InputError:
        raise
    except ConnectionError as exc:
        why = ("the Hub cannot be reached offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and it is not in "
               "the datasets cache" if _offline() else f"the Hub cannot be reached ({exc})")
        raise InputError(f"{key}: '{path}' is not a local path, so it names a Hub dataset, but {why}; use a local "
                         "copy (a folder, a file or a save_to_disk folder) or unset HF_HUB_OFFLINE") from None
    except FileNotFoundError as exc:
        raise InputError(f"{key}: {path}: {exc}") from None
    except Exception as exc:  # datasets raises many types (ValueError for a missing configuration, ...)
        raise InputError(f"{key}: cannot read {path} with datasets: {type(exc).__name__}: {exc}") from None


@functools.lru_cache(maxsize=32)
def _load(path: str, name: str | None, split: str | None, key: str) -> HFTable:
    """One split of a dataset, loaded once per process (preflight, tokenization and sample all read it)."""
    spec = SourceSpec(path, name, split)
    loaded, files = _load_dict(spec, key)
    split = spec.split or "train"
    if hasattr(loaded, "keys"):  # a DatasetDict
        splits = list(loaded.keys())
        if split not in splits and spec.split is None and len(splits) == 1:
            split = splits[0]  # one split under another name (e.g. a folder of test-*.parquet only)
        if split not in splits:
            raise InputError(f"{key}: split '{split}' not found in {spec.path}; its splits: {', '.join(splits)} "
                             "(set `split:`)")
        dataset = loaded[split]
    else:
        if spec.split not in (None, "train"):
            raise InputError(f"{key}: split '{spec.split}' not found in {spec.path}: a save_to_disk folder of one "
                             "dataset has no splits (leave `split:` out)")
        dataset = loaded
    label = spec.path + (f" [{spec.name}]" if spec.name else "") + f" ({split})"
    return HFTable(label, dataset, files)


def open_table(source: DataSource) -> PlainTable | HFTable:
    plain = plain_file(source.spec)
    if plain is not None:
        return PlainTable(plain)
    p = Path(source.path)
    if p.suffix in records.EXTENSIONS and p.is_file() and source.spec.split not in (None, "train"):
        raise InputError(f"{source.key}: split '{source.spec.split}' not found in {p}; a single file has one split: "
                         "train")
    return _load(source.spec.path, source.spec.name, source.spec.split, source.key)


# ---------------------------------------------------------------------------------------------------------------
# The chosen rows, their records and examples.


def _choice_seed(seed: int, name: str) -> list[int]:
    return [seed, _CHOICE_STREAM, int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)]


def value_name(value: Any) -> str:
    return str(value)


def selected_rows(source: DataSource, table: PlainTable | HFTable | None = None) -> np.ndarray | None:
    """Row indices of the table this source keeps (sorted), or None for all of them."""
    spec = source.spec
    if source.value is None and spec.max_samples is None:
        return None
    table = table or open_table(source)
    if source.value is not None:
        values = table.column(spec.split_by or "")
        rows = np.asarray([i for i, v in enumerate(values) if value_name(v) == source.value], dtype=np.int64)
    else:
        rows = np.arange(len(table), dtype=np.int64)
    if spec.max_samples is not None and len(rows) > spec.max_samples:
        rng = np.random.default_rng(_choice_seed(source.seed, source.name or source.key))
        rows = np.sort(rng.choice(rows, spec.max_samples, replace=False))
    return rows


def count(source: DataSource) -> int:
    table = open_table(source)
    rows = selected_rows(source, table)
    return len(table) if rows is None else len(rows)


def iter_records(source: DataSource) -> Iterator[tuple[str, Any]]:
    """`(location, raw record)` of every chosen row, in file order."""
    table = open_table(source)
    yield from _chosen(table, selected_rows(source, table))


def _chosen(table: PlainTable | HFTable, rows: np.ndarray | None) -> Iterator[tuple[str, Any]]:
    if rows is None:
        return table.rows()
    if isinstance(table, HFTable):
        return table.rows(rows.tolist())
    return _pick(table.rows(), rows.tolist())


def _pick(stream: Iterator[tuple[str, Any]], wanted: list[int]) -> Iterator[tuple[str, Any]]:
    targets = iter(wanted)
    target = next(targets, None)
    for index, item in enumerate(stream):
        if target is None:
            return
        if index == target:
            yield item
            target = next(targets, None)


def records_at(source: DataSource, positions: list[int]) -> Iterator[tuple[int, Any]]:
    """`(position, raw record)` for sorted unique positions among the source's chosen records (what sample draws)."""
    table = open_table(source)
    rows = selected_rows(source, table)
    underlying = positions if rows is None else rows[positions].tolist()
    stream = table.rows(underlying) if isinstance(table, HFTable) else _pick(table.rows(), underlying)
    for position, (_, record) in zip(positions, stream):
        yield position, record


def _mapped(record: Any, columns: dict[str, str], where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a record with columns, got {type(record).__name__}")
    missing = [f"'{c}' (columns.{f})" for f, c in columns.items() if c not in record]
    if missing:
        raise InputError(f"{where}: column {', '.join(missing)} missing; its columns: {', '.join(sorted(record))}")
    return {f: record[c] for f, c in columns.items()}


def to_example(record: Any, columns: dict[str, str], where: str) -> Example:
    """One raw record as an example: through the column map when there is one (a mapped `system` column becomes
    the conversation's system turn), else by the record's own format."""
    if not columns:
        return records.to_example(record, where)
    mapped = _mapped(record, columns, where)
    system = mapped.pop("system", None)
    example = records.to_example(mapped, where)
    if system is not None and not isinstance(example, str):
        if not isinstance(system, str):
            raise InputError(f"{where}: the system column '{columns['system']}' must hold text")
        if system.strip():
            example = [Turn("system", system), *example]
    return example


def iter_examples(source: DataSource) -> Iterator[tuple[str, Example]]:
    for where, record in iter_records(source):
        yield where, to_example(record, source.spec.columns, where)


@dataclass
class RecordChunk:
    """Consecutive records of a source as read, and its column map: `examples()` makes examples of them. The records
    of a plain `.jsonl` file come as their lines, unparsed: parsing the JSON is most of the cost of reading, so a
    parallel pass leaves it to the worker process that makes the examples."""

    columns: dict[str, str]
    parsed: list[tuple[str, Any]] = field(default_factory=list)  # (location, record)
    path: Path | None = None  # the file of `lines`
    lines: list[tuple[int, str]] = field(default_factory=list)  # (line number, line), as records.iter_jsonl_lines

    def __len__(self) -> int:
        return len(self.parsed) + len(self.lines)

    def records(self) -> Iterator[tuple[str, Any]]:
        yield from self.parsed
        for lineno, line in self.lines:
            yield records.parse_jsonl_line(self.path or "", lineno, line)

    def examples(self) -> list[tuple[str, Example]]:
        return [(where, to_example(record, self.columns, where)) for where, record in self.records()]


def iter_record_chunks(source: DataSource, size: int) -> Iterator[RecordChunk]:
    """The records of `iter_records(source)`, `size` at a time (a plain `.jsonl` file read whole: as lines)."""
    table = open_table(source)
    rows = selected_rows(source, table)
    columns = source.spec.columns
    if rows is None and isinstance(table, PlainTable) and table.path.suffix == ".jsonl":
        for lines in _parts(records.iter_jsonl_lines(table.path), size):
            yield RecordChunk(columns, path=table.path, lines=lines)
    else:
        for parsed in _parts(_chosen(table, rows), size):
            yield RecordChunk(columns, parsed=parsed)


def _parts(stream: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """`stream` in lists of `size`. An error reading it comes after a list of what was read before it, so that a
    pass over the lists reports the first bad record, as a pass over iter_examples does."""
    part: list[Any] = []
    try:
        for item in stream:
            part.append(item)
            if len(part) >= size:
                yield part
                part = []
    except Exception:
        if part:
            yield part
        raise
    if part:
        yield part


def fingerprint(source: DataSource) -> str:
    """The sha256 of the data under the source (a plain file: its sha256, as in v1)."""
    return open_table(source).fingerprint()


def content_key(source: DataSource, data_sha256: str) -> str:
    """What the tokens depend on beyond the tokenizer: the data and, for a spec, how it is read and chosen."""
    if source.is_plain:
        return data_sha256
    how = json.dumps(to_record(source), sort_keys=True)
    return hashlib.sha256(f"{data_sha256}|{how}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# split_by, up-front checks, and what weights.json records.


def expand(name: str, spec: SourceSpec, seed: int, key: str | None = None) -> list[DataSource]:
    """One source, or one per distinct value of `split_by` (named NAME/VALUE, sorted)."""
    key = key or f"data.sources.{name}"
    if spec.split_by is None:
        return [DataSource(key, spec, name, None, seed)]
    table = open_table(DataSource(key, spec, name))
    present = table.column_names()
    if spec.split_by not in present:
        raise InputError(f"{key}.split_by: column '{spec.split_by}' is not in {spec.path}; its columns: "
                         f"{', '.join(present)}")
    values = sorted({value_name(v) for v in table.column(spec.split_by)})
    if len(values) < 2:
        raise InputError(f"{key}.split_by: column '{spec.split_by}' of {spec.path} has only "
                         f"{'the value ' + repr(values[0]) if values else 'no values'}; split_by needs at least two "
                         "(or drop split_by to use the source whole)")
    return [DataSource(f"data.sources.{name}/{v}", spec, f"{name}/{v}", v, seed) for v in values]


def expand_all(specs: dict[str, SourceSpec], seed: int) -> dict[str, DataSource]:
    """Every source of a recipe by name, split_by expanded; all problems at once."""
    out: dict[str, DataSource] = {}
    problems: list[str] = []
    for name, spec in specs.items():
        try:
            for source in expand(name, spec, seed):
                out[source.name] = source
        except InputError as exc:
            problems += exc.problems
    if problems:
        raise InputError(problems)
    return out


def recipe_sources(recipe: Any) -> dict[str, DataSource]:
    """A recipe's sources by name (split_by expanded)."""
    return expand_all(recipe.data.sources, recipe.seed)


def validation_sources(recipe: Any) -> dict[str, DataSource]:
    """A recipe's validation sets by name (`validation` for one set written without a name)."""
    named = recipe.named_validation
    return {n: DataSource(f"data.validation.{n}" if named else "data.validation", spec, n, None, recipe.seed)
            for n, spec in recipe.validation_sets().items()}


def column_problems(source: DataSource) -> list[str]:
    """Mapped columns that the data does not have (named with the source, the column and the columns present)."""
    columns = source.spec.columns
    if not columns:
        return []
    present = open_table(source).column_names()
    return [f"{source.key}.columns.{f}: column '{c}' is not in {source.path}; its columns: {', '.join(present)}"
            for f, c in columns.items() if c not in present]


def to_record(source: DataSource) -> dict[str, Any]:
    """How to read the source again (weights.json `sources.NAME.source`)."""
    spec = {k: v for k, v in dataclasses.asdict(source.spec).items() if v not in (None, {}) and k != "weight"}
    return {"spec": spec, "value": source.value, "seed": source.seed, "name": source.name}


def from_record(key: str, path: str, info: Any) -> DataSource:
    """The inverse of to_record (a plain path when weights.json recorded nothing more)."""
    if not isinstance(info, dict) or not isinstance(info.get("spec"), dict):
        return from_path(key, path)
    try:
        spec = SourceSpec(**{k: v for k, v in info["spec"].items() if k in {f.name for f in
                                                                           dataclasses.fields(SourceSpec)}})
    except TypeError as exc:
        raise InputError(f"{key}: the recorded source cannot be read back ({exc})") from None
    value = info.get("value")
    return DataSource(key, spec, str(info.get("name") or ""), None if value is None else str(value),
                      int(info.get("seed") or 0))


def doc_sources(doc: dict[str, Any], names: list[str]) -> dict[str, DataSource]:
    """The sources a weights.json records, read back as the reweight run read them."""
    return {n: from_record(f"source '{n}'", doc["sources"][n]["path"], doc["sources"][n].get("source"))
            for n in names}
