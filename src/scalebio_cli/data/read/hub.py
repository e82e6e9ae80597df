"""Loading through `datasets`: a folder laid out like a Hub dataset repository, a configuration of one, a glob, a
`save_to_disk` folder, `.csv`, `.arrow`, gzip/zstd JSON lines, a Hub id. `datasets` is imported only here, and
only then; each split is loaded once per process and served as a tables.HFTable.
"""

from __future__ import annotations

import functools
import glob
import os
from pathlib import Path
from typing import Any

from scalebio_cli.data.read.tables import BUILDERS, COMPRESSIONS, SUPPORTED, HFTable
from scalebio_cli.errors import InputError
from scalebio_cli.files import did_you_mean
from scalebio_cli.recipe.schema import SourceSpec

_GLOB = "*?["


def is_hub_id(path: str) -> bool:
    from scalebio_cli.recipe.load import looks_like_dataset_id

    return looks_like_dataset_id(path) and not Path(path).exists()


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def local_files(path: str) -> tuple[str, ...]:
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
    files = local_files(path)
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
def load_split(path: str, name: str | None, split: str | None, key: str) -> HFTable:
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
