"""`scalebio export`: hand a weights file to the tool users train with.

One weights file becomes a folder that the target reads: the sources normalised to the one record schema the tool
expects (data/out/normalize.py), and the tool's own mixing configuration whose probabilities are the weights, in the
weights file's source order. Tools that mix by subsampling or by record counts (axolotl, open-instruct) get the
counts that realise the weights as closely as whole records allow, and say how many records that keeps.

One stopping rule for every mixture that interleaves (hf, llamafactory): it ends when the first source runs out
(`datasets`' `first_exhausted`, LLaMA-Factory's `interleave_under`), so no record repeats and each source is drawn
with its weight's probability up to the end. What the weights mean per trainer (a probability per draw, a keep
fraction, a record count, a blend weight) is said in each exported file's header.

The folder is assembled under a temporary name and renamed when complete (files.atomic_path); the configuration
files name the final paths.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.markup import escape

from scalebio_cli.console import console, format_evidence, format_weights
from scalebio_cli.data.out.mixture import keep_fractions, largest_remainder, no_repeat_counts
from scalebio_cli.data.out.normalize import iter_conversations
from scalebio_cli.data.read.records import Turn
from scalebio_cli.data.read.sources import DataSource, iter_examples
from scalebio_cli.errors import InputError
from scalebio_cli.files import atomic_path, write_json, write_text
from scalebio_cli.results import weights_file

TARGETS = ("llamafactory", "hf", "axolotl", "open-instruct", "megatron", "nemo")
MIX_STRATEGIES = ("interleave_under", "interleave_over", "interleave_once", "concat")  # LLaMA-Factory's names
# The stopping rule of every interleaving export (see the module docstring), in each tool's own words.
HF_STOPPING = "first_exhausted"
STOPPING_RULE = ("the mixture ends when its first source runs out (no record repeats; every draw picks a source "
                 "with its weight's probability)")
_SHUFFLE_STREAM = 0xE7  # the seeded order of open-instruct's copies


@dataclass
class Mixture:
    """The weights file's sources, their files and probabilities, in the file's order."""

    weights_file: Path
    names: list[str]
    files: list[DataSource]  # each read as the reweight run read it (a path prints as itself)
    probs: list[float]
    averaged: bool
    doc: dict[str, Any]
    stems: list[str] = field(default_factory=list)  # file-system-safe, unique names of the exported files

    def __post_init__(self) -> None:
        self.stems = _safe_stems(self.names)


@dataclass
class Options:
    mix_strategy: str = "interleave_under"
    num_samples: int | None = None  # open-instruct: records in the mixture (default: the largest without repeats)
    tokenizer: str | None = None  # megatron: renders conversations to text (default: the weights file's model)
    seed: int = 0


def _safe_stems(names: list[str]) -> list[str]:
    stems: list[str] = []
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "source"
        base, k = stem, 2
        while stem in stems:
            stem, k = f"{base}-{k}", k + 1
        stems.append(stem)
    return stems


def load_mixture(path: Path, averaged: bool = False, allow_changed_sources: bool = False) -> Mixture:
    weights, doc = weights_file.load(path, allow_changed_sources, averaged)
    names = list(weights)
    total = sum(weights.values())  # within 1e-6 of 1 (checked); consumers such as numpy want it exact
    return Mixture(path.resolve(), names, list(weights_file.doc_sources(doc, names).values()),
                   [weights[n] / total for n in names], averaged, doc)


# -- writing records ---------------------------------------------------------------------------------------------


def _messages(turns: list[Turn]) -> dict[str, Any]:
    return {"messages": [{"role": t.role, "content": t.content} for t in turns]}


def _nemo_record(turns: list[Turn]) -> dict[str, Any]:
    """NeMo's SFT chat record (model.data.chat: true): the system prompt apart, turns as User/Assistant."""
    system = turns[0].content if turns[0].role == "system" else ""
    body = turns[1:] if turns[0].role == "system" else turns
    return {"system": system, "mask": "User", "type": "VALUE_TO_TEXT",
            "conversations": [{"from": t.role.capitalize(), "value": t.content} for t in body]}


def _write_lines(dst: Path, lines: Iterator[bytes], shuffle_seed: int | None = None) -> int:
    """Write JSON lines to `dst`; with a seed, in a seeded order (positioned reads from a scratch file)."""
    if shuffle_seed is None:
        with dst.open("wb") as out:
            return sum(out.write(line) > 0 for line in lines)
    offsets: list[tuple[int, int]] = []
    with tempfile.TemporaryFile(dir=dst.parent) as scratch:
        for line in lines:
            offsets.append((scratch.tell(), len(line)))
            scratch.write(line)
        scratch.flush()
        order = np.random.default_rng([shuffle_seed, _SHUFFLE_STREAM]).permutation(len(offsets))
        with dst.open("wb") as out:
            for i in order.tolist():
                out.write(os.pread(scratch.fileno(), offsets[i][1], offsets[i][0]))
    return len(offsets)


def write_sources(mix: Mixture, tmp: Path, convert: Callable[[list[Turn]], dict[str, Any]] = _messages,
                  strict: bool = False, shuffle_seed: int | None = None) -> list[int]:
    """Every source as `STEM.jsonl` in `tmp`, each record converted; returns the record counts."""
    counts = []
    for name, path, stem in zip(mix.names, mix.files, mix.stems):
        lines = ((json.dumps(convert(turns), ensure_ascii=False) + "\n").encode()
                 for _, turns in iter_conversations(path, strict))
        count = _write_lines(tmp / f"{stem}.jsonl", lines, shuffle_seed)
        if count == 0:
            raise InputError(f"{path}: source '{name}' holds no records")
        counts.append(count)
    return counts


def _yaml(header: str, data: dict[str, Any]) -> str:
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    return comment + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)


def _provenance(mix: Mixture) -> str:
    which = "weights_averaged" if mix.averaged else "weights"
    return f"from {mix.weights_file} ({which}, scalebio {mix.doc.get('version', '?')})"


# -- targets -----------------------------------------------------------------------------------------------------


def export_llamafactory(mix: Mixture, tmp: Path, out: Path, opts: Options) -> list[str]:
    """Sources as messages JSON lines, `dataset_info.json`, and `llamafactory.yaml` (the training-config lines)."""
    write_sources(mix, tmp, strict=True)
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "system_tag": "system"}
    info = {stem: {"file_name": f"{stem}.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                   "tags": tags} for stem in mix.stems}
    write_json(tmp / "dataset_info.json", info)
    config = {"dataset_dir": str(out), "dataset": ",".join(mix.stems), "mix_strategy": opts.mix_strategy,
              "interleave_probs": ",".join(repr(p) for p in mix.probs)}
    header = (f"LLaMA-Factory training-config lines {_provenance(mix)}.\n"
              "Merge them into your training YAML; interleave_probs follow the order of `dataset`: each one is the\n"
              "probability that a draw comes from that dataset.\n"
              f"interleave_under (the default, as every scalebio export): {STOPPING_RULE};\n"
              "interleave_over ends when the last runs out, repeating the records of the others.")
    write_text(tmp / "llamafactory.yaml", _yaml(header, config))
    return ["dataset_info.json", "llamafactory.yaml"]


def export_hf(mix: Mixture, tmp: Path, out: Path, opts: Options) -> list[str]:
    """Sources as `{"messages": [...]}` JSON lines, `mixture.json` and a README with the interleave snippet."""
    write_sources(mix, tmp)
    files = [str(out / f"{stem}.jsonl") for stem in mix.stems]
    write_json(tmp / "mixture.json", {"sources": mix.names, "files": files, "probabilities": mix.probs,
                                      "stopping_strategy": HF_STOPPING,
                                      "weights_file": str(mix.weights_file), "averaged": mix.averaged})
    readme = f"""# A ScaleBiO mixture for Hugging Face `datasets`

Sources {_provenance(mix)}: {format_weights(dict(zip(mix.names, mix.probs)))}.
Each `*.jsonl` holds one source as `{{"messages": [...]}}` records (TRL's SFTTrainer and torchtune read them too).
`probabilities` are the chance that each draw comes from a source; `stopping_strategy="{HF_STOPPING}"`: {STOPPING_RULE}
(the rule of every scalebio export; `all_exhausted` would go on, repeating the records of the sources that ran out).

```python
import datasets, json
mix = json.load(open("{out / 'mixture.json'}"))
parts = [datasets.load_dataset("json", data_files=f, split="train") for f in mix["files"]]
mixed = datasets.interleave_datasets(parts, probabilities=mix["probabilities"], seed=0,
                                     stopping_strategy="{HF_STOPPING}")
```
"""
    write_text(tmp / "README.md", readme)
    return ["mixture.json", "README.md"]


def export_axolotl(mix: Mixture, tmp: Path, out: Path, opts: Options) -> list[str]:
    """Sources as messages JSON lines and a `datasets:` fragment whose `weight` (axolotl's per-dataset keep
    fraction, 0 < weight <= 1) realises the probabilities; a source of probability 0 is left out."""
    sizes = write_sources(mix, tmp)
    fractions = keep_fractions(mix.probs, sizes)
    kept = [round(f * n) for f, n in zip(fractions, sizes)]
    entries, dropped = [], []
    for name, stem, frac in zip(mix.names, mix.stems, fractions):
        if frac <= 0:
            dropped.append(name)
            continue
        entries.append({"path": str(out / f"{stem}.jsonl"), "ds_type": "json", "type": "chat_template",
                        "field_messages": "messages", "split": "train", "weight": frac})
    summary = ", ".join(f"{n} {k:,} of {s:,}" for n, k, s in zip(mix.names, kept, sizes))
    header = (f"axolotl `datasets:` {_provenance(mix)}.\n"
              "weight = the fraction of each file axolotl keeps; the kept records are mixed as the weights:\n"
              f"about {sum(kept):,} records in all ({summary}).\n"
              + (f"Left out (weight 0): {', '.join(dropped)}.\n" if dropped else ""))
    write_text(tmp / "axolotl.yaml", _yaml(header, {"datasets": entries}))
    console.print(f"[dim]axolotl[/] keeps about {sum(kept):,} records: {escape(summary)}")
    return ["axolotl.yaml"]


def export_open_instruct(mix: Mixture, tmp: Path, out: Path, opts: Options) -> list[str]:
    """Sources as messages JSON lines (in a seeded order: open-instruct takes the first COUNT records of a file)
    and `dataset_mixer_list`: each file followed by its record count."""
    sizes = write_sources(mix, tmp, shuffle_seed=opts.seed)
    counts = (largest_remainder(opts.num_samples, mix.probs) if opts.num_samples is not None
              else no_repeat_counts(mix.probs, sizes))
    mixer: list[str] = []
    for stem, count in zip(mix.stems, counts):
        mixer += [str(out / f"{stem}.jsonl"), str(count)]  # a count without a dot is a number of records
    repeats = [f"{n} ({c:,} of {s:,})" for n, c, s in zip(mix.names, counts, sizes) if c > s]
    header = (f"open-instruct dataset_mixer_list {_provenance(mix)}: {sum(counts):,} records in all.\n"
              "Command-line form: --dataset_mixer_list " + " ".join(mixer) + "\n"
              + (f"Repeats records of: {', '.join(repeats)} (open-instruct upsamples).\n" if repeats else ""))
    write_text(tmp / "open-instruct.yaml", _yaml(header, {"dataset_mixer_list": mixer}))
    return ["open-instruct.yaml"]


def _renderer(mix: Mixture, opts: Options) -> Any:
    from scalebio_cli.data.tokens.render import Renderer
    from scalebio_cli.train.modeling import load_tokenizer

    config = mix.doc.get("config") or {}
    path = opts.tokenizer or config.get("tokenizer") or mix.doc.get("model")
    if not path:
        raise InputError(f"{mix.weights_file}: names no model; give --tokenizer DIR to render the text")
    template = None if opts.tokenizer else (config.get("data") or {}).get("chat_template")  # what reweight used
    tokenizer = load_tokenizer(str(path), bool(config.get("trust_remote_code", False)), template)
    return Renderer(tokenizer, max_length=1 << 30)


def export_megatron(mix: Mixture, tmp: Path, out: Path, opts: Options) -> list[str]:
    """Sources rendered to `{"text": ...}` (the tokenizer's chat template) for Megatron's preprocess_data.py, and
    the `--data-path w1 prefix1 w2 prefix2 ...` blend of the indexed datasets it will write."""
    renderer = _renderer(mix, opts)

    def text_lines(path: DataSource) -> Iterator[bytes]:
        for where, example in iter_examples(path):
            text = "".join(t for t, _ in renderer.segments(example, where))
            yield (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode()

    for name, path, stem in zip(mix.names, mix.files, mix.stems):
        if _write_lines(tmp / f"{stem}.jsonl", text_lines(path)) == 0:
            raise InputError(f"{path}: source '{name}' holds no records")
    prefixes = [str(out / "megatron" / f"{stem}_text_document") for stem in mix.stems]
    blend = " ".join(f"{p!r} {prefix}" for p, prefix in zip(mix.probs, prefixes))
    write_text(tmp / "data-path.txt", blend + "\n")
    tokenizer = renderer.tokenizer.name_or_path
    steps = "\n".join(f"python tools/preprocess_data.py --input {out / (stem + '.jsonl')} "
                      f"--output-prefix {out / 'megatron' / stem} --json-keys text --tokenizer-type "
                      f"HuggingFaceTokenizer --tokenizer-model {tokenizer} --workers 8" for stem in mix.stems)
    write_text(tmp / "README.md", f"""# A ScaleBiO blend for Megatron-LM

Sources {_provenance(mix)}, rendered to text with the chat template of `{tokenizer}`.
Build the indexed datasets (from a Megatron-LM checkout), then train with the blend:

```bash
mkdir -p {out / 'megatron'}
{steps}
pretrain_gpt.py ... --data-path $(cat {out / 'data-path.txt'})
```
""")
    return ["data-path.txt", "README.md"]


def export_nemo(mix: Mixture, tmp: Path, out: Path, opts: Options) -> list[str]:
    """Sources in NeMo's SFT chat format and `nemo.yaml`: file_names with concat_sampling_probabilities."""
    write_sources(mix, tmp, convert=_nemo_record, strict=True)
    train_ds = {"file_names": [str(out / f"{stem}.jsonl") for stem in mix.stems],
                "concat_sampling_probabilities": mix.probs}
    header = (f"NeMo SFT data config {_provenance(mix)}.\n"
              "Merge into your fine-tuning config (or pass as model.data.train_ds.* overrides).")
    write_text(tmp / "nemo.yaml", _yaml(header, {"model": {"data": {"chat": True, "train_ds": train_ds}}}))
    return ["nemo.yaml"]


EXPORTERS: dict[str, Callable[[Mixture, Path, Path, Options], list[str]]] = {
    "llamafactory": export_llamafactory, "hf": export_hf, "axolotl": export_axolotl,
    "open-instruct": export_open_instruct, "megatron": export_megatron, "nemo": export_nemo,
}


def run(weights: Path, target: str, output: Path | None = None, averaged: bool = False,
        allow_changed_sources: bool = False, opts: Options | None = None) -> Path:
    """Export `weights` for `target` into `output` (default: RUN/export-TARGET); returns the folder."""
    return run_many(weights, [target], output, averaged, allow_changed_sources, opts)[0]


def run_many(weights: Path, targets: list[str], output: Path | None = None, averaged: bool = False,
             allow_changed_sources: bool = False, opts: Options | None = None) -> list[Path]:
    """Export `weights` for every target (`--to a --to b`), each into its own folder (RUN/export-TARGET, or
    `output` for a single target); returns the folders. All or nothing: every folder is assembled under a
    temporary name and renamed into place only when all of them are complete."""
    problems = [f"--to: must be one of {', '.join(TARGETS)}, got {t!r}" for t in targets if t not in EXPORTERS]
    problems += [f"--to {t}: given twice" for t in sorted({t for t in targets if targets.count(t) > 1})]
    if len(targets) > 1 and output is not None:
        problems.append(f"--output names one folder, but {len(targets)} targets were given (--to "
                        f"{' --to '.join(targets)}): leave --output out (each goes to export-TARGET beside the "
                        "weights file) or export one target per command")
    opts = opts or Options()
    if opts.mix_strategy not in MIX_STRATEGIES:
        problems.append(f"--mix-strategy: must be one of {', '.join(MIX_STRATEGIES)}, got {opts.mix_strategy!r}")
    if not targets:
        problems.append(f"--to: name a target ({', '.join(TARGETS)})")
    if problems:
        raise InputError(problems)
    mix = load_mixture(weights, averaged, allow_changed_sources)
    outs = [(output or weights.parent / f"export-{target}").resolve() for target in targets]
    for out in outs:
        if out.exists() and not out.is_dir():
            raise InputError(f"--output {out}: exists and is not a folder (export writes a folder)")
    made: list[list[str]] = []
    with ExitStack() as stack:  # the renames happen when the block ends, only if every export succeeded
        for target, out in zip(targets, outs):
            tmp = stack.enter_context(atomic_path(out))
            tmp.mkdir()
            made.append(EXPORTERS[target](mix, tmp, out, opts))
    for target, out, files in zip(targets, outs, made):
        console.print(f"[bold green]export[/] {target}: {format_weights(dict(zip(mix.names, mix.probs)))}; "
                      f"{escape(', '.join(files))} in {escape(str(out))}")
    evidence = recorded_evidence(weights, mix.names)
    if evidence is not None:  # how sure the run was of the weights just exported
        console.print(format_evidence(evidence))
    return outs


def recorded_evidence(weights: Path, names: list[str]) -> dict[str, dict[str, Any]] | None:
    """The weights file's `evidence` for `names` when it has a readable one (files of earlier versions have none;
    a hand-edited one that does not read is left out of the log, never an error: the weights were checked)."""
    import json

    evidence = json.loads(weights.read_text(encoding="utf-8")).get("evidence")
    fields = {"advantage", "stderr", "z", "steps"}
    if (not isinstance(evidence, dict) or set(evidence) != set(names)
            or not all(isinstance(e, dict) and fields <= set(e) for e in evidence.values())
            or not all(isinstance(e[f], (int, float)) or (e[f] is None and f != "steps")
                       for e in evidence.values() for f in fields)):
        return None
    return {n: evidence[n] for n in names}

