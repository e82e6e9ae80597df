"""Fuzzing the input boundary with hypothesis: whatever comes in, the CLI succeeds or exits 2 with one message
paragraph and no traceback, and a failed command leaves no output behind.

Aimed at the cheap paths, so no model trains per example: recipes (loading, overrides, preflight, the run-folder
claim; the stage itself is replaced by a stub once everything up front has passed), data records (parsing, sample,
tokenization), weights files (sample), checkpoint files and metrics logs (resume), model folders (preflight, then
the loaders). Profiles: `ci` (default: fixed seed, few examples, about 30 s) and `slow` (HYPOTHESIS_PROFILE=slow).
The number of generated cases is counted per target and printed at the end (and written to the file named by
SCALEBIO_FUZZ_REPORT, which scripts/write_reliability_doc.py reads).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from scalebio_cli import cli
from scalebio_cli.errors import InputError

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture,
          HealthCheck.large_base_example]
settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
settings.register_profile("slow", max_examples=400, deadline=None, suppress_health_check=_QUIET, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CASES: Counter[str] = Counter()  # generated cases per target
OUTCOMES: Counter[str] = Counter()  # how the CLI ended them: a harness that only ever exits 2 tests little


@pytest.fixture(scope="module", autouse=True)
def _report_case_count(request: pytest.FixtureRequest):
    yield
    total = sum(CASES.values())
    line = (f"fuzz cases: {total} ({', '.join(f'{k} {v}' for k, v in sorted(CASES.items()))}); CLI outcomes: "
            f"{', '.join(f'{k} {v}' for k, v in sorted(OUTCOMES.items()))}")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n{line}")
    if os.environ.get("SCALEBIO_FUZZ_REPORT"):
        Path(os.environ["SCALEBIO_FUZZ_REPORT"]).write_text(json.dumps({"total": total, "cases": CASES,
                                                                        "outcomes": OUTCOMES}))


@contextmanager
def scratch() -> Any:
    with tempfile.TemporaryDirectory(prefix="fuzz-") as d:
        yield Path(d)


def invoke(*args: Any):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def assert_contract(result, outputs: list[Path], target: str) -> None:
    """Exit 0, or exit 2 with `error:` lines forming one paragraph; never a traceback; no output after a failure."""
    OUTCOMES[f"{target} exit {result.exit_code}"] += 1
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}\n{result.output}")
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        message = result.output[result.output.index("error:"):]
        assert message.strip() and "\n\n" not in message.strip(), message
        for out in outputs:
            assert not out.exists(), f"{out} left behind after: {message}"
    for out in outputs:  # no temporary siblings either way
        if out.parent.is_dir():
            assert not [p.name for p in out.parent.iterdir() if ".tmp-" in p.name]


# -- shared small inputs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Short copies of the demo sources (fast to parse per example) and the demo model."""
    root = tmp_path_factory.mktemp("fuzz-small")
    out = {"model": demo / "model"}
    for name in ("clean.jsonl", "val.jsonl"):
        lines = (demo / "data" / name).read_text().splitlines(keepends=True)[:30]
        (root / name).write_text("".join(lines))
        out[name.split(".")[0]] = root / name
    records = json.loads((demo / "data" / "noisy.json").read_text())[:30]
    (root / "noisy.json").write_text(json.dumps(records))
    out["noisy"] = root / "noisy.json"
    return out


# -- recipes ---------------------------------------------------------------------------------------------------

ODD_NUMBERS = st.sampled_from([".nan", ".NaN", "-.inf", ".Inf", "1e999", "1.0e+999", "nan", "-0.0", "0x10", "1_000",
                               "1:30", "0o17", "2**40", "9223372036854775808", "-9223372036854775809", "4294967296",
                               "1.0e+300", "~", "''", "[]", "{}", "!!binary aGk=", "!!python/object:os.system ls",
                               "&a 3", "*a", "yes", "on", "NULL", "\"\\u0000\""])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=4), SCALARS, max_size=2))
KEYS = st.sampled_from(["seed", "precision", "model", "tokenizer", "output_dir", "trust_remote_code", "deepspeed",
                        "data.max_length", "data.validation", "data.cache_dir", "data.sources", "reweight.steps",
                        "reweight.alpha", "reweight.lr_u", "reweight.lr_lambda", "reweight.batch_size",
                        "reweight.val_batch_size", "reweight.micro_batch_size", "reweight.warmup_ratio",
                        "reweight.max_grad_norm", "reweight.lisa.layers", "reweight.lisa.interval", "reweight.lisa",
                        "finetune.data", "finetune.weights", "finetune.epochs", "finetune.lr", "finetune.lisa.layers",
                        "checkpoint.every", "checkpoint.keep", "reweight.stepz", "data.srcs", "lisa", "data",
                        "reweight", "a.b.c", ""])
NAMES = st.text(alphabet=st.sampled_from(list("aAbB1_-./ é\u0065\u0301ﬁSSß\u212b\u00c5\t")), min_size=0, max_size=6)


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


@st.composite
def recipes(draw: st.DrawFn, small: dict[str, Path], out: Path) -> tuple[str, list[str]]:
    files = [str(small["clean"]), str(small["noisy"]), str(small["val"]), "missing.jsonl", str(small["model"])]
    names = draw(st.lists(st.one_of(NAMES, st.integers(-3, 3), st.booleans()), min_size=0, max_size=4))
    tree: dict[str, Any] = {
        "model": str(small["model"]), "output_dir": str(out),
        "data": {"sources": {n: draw(st.sampled_from(files)) for n in names} or
                 {"clean": str(small["clean"]), "noisy": str(small["noisy"])},
                 "validation": str(small["val"]), "max_length": 64},
        "reweight": {"steps": 2, "batch_size": 4, "val_batch_size": 2},
        "finetune": {"data": str(small["clean"])},
    }
    for key, value in draw(st.lists(st.tuples(KEYS, VALUES), max_size=draw(st.sampled_from([0, 0, 1, 3])))):
        if key:
            _set(tree, key, value)
    text = yaml.safe_dump(tree, allow_unicode=True, sort_keys=False)
    raw_lines = st.lists(st.tuples(KEYS.filter(bool), ODD_NUMBERS), max_size=draw(st.sampled_from([0, 0, 2])))
    for key, raw in draw(raw_lines):
        text += f"{key.split('.')[0]}: {raw}\n"  # raw YAML spellings, also duplicate top-level keys
    if not draw(st.integers(0, 4)):
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["", "\t", ": :", "\x00", "\ufeff", "- x\n", "  y: [\n"])) + text[cut:]
    overrides = [f"{k}={v}" for k, v in draw(st.lists(st.tuples(KEYS, ODD_NUMBERS | st.integers(0, 9).map(str)),
                                                       max_size=draw(st.sampled_from([0, 0, 2]))))]
    return text, overrides


def test_fuzz_recipes(small: dict[str, Path]) -> None:
    from scalebio_cli.stages import finetune, reweight

    def stub(recipe: Any, resume: Any, force: Any) -> Path:
        return Path(recipe.output_dir) / "weights.json"  # everything up front passed; train nothing

    @given(data=st.data(), command=st.sampled_from(["reweight", "finetune"]))
    def check(data: st.DataObject, command: str) -> None:
        CASES["recipes"] += 1
        with scratch() as tmp:
            out = tmp / "run"
            text, overrides = data.draw(recipes(small, out))
            (tmp / "r.yaml").write_text(text, encoding="utf-8")
            result = invoke(command, "--config", tmp / "r.yaml", *overrides)
            assert_contract(result, [out], "recipes")
            assert not out.exists()  # the claim's lock folder is gone again (the stub wrote nothing)

    with mock.patch.object(reweight, "run", stub), mock.patch.object(finetune, "run", stub):
        check()


# -- data records ----------------------------------------------------------------------------------------------

GOOD_TEXTS = st.one_of(st.text(max_size=30), st.just(""), st.just("x" * 100_000), st.just("\u202e\ufeff\x00"))
TEXTS = st.one_of(GOOD_TEXTS, st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2))
ROLES = st.sampled_from(["system", "user", "assistant", "human", "gpt", "ASSISTANT", "robot", "", 3, None])


@st.composite
def turns(draw: st.DrawFn, role_key: str, text_key: str) -> Any:
    turn = {role_key: draw(ROLES), text_key: draw(TEXTS)}
    for key in draw(st.lists(st.sampled_from([role_key, text_key]), max_size=1)):
        turn.pop(key, None)
    return turn if draw(st.integers(0, 9)) else draw(SCALARS)


@st.composite
def good_records(draw: st.DrawFn) -> Any:
    """Records of every format, well formed, with odd but legal text (empty, huge, control characters)."""
    kind = draw(st.sampled_from(["messages", "sharegpt", "alpaca", "prompt", "text"]))
    text = draw(GOOD_TEXTS)
    if kind == "messages":
        return {"messages": [{"role": "user", "content": draw(GOOD_TEXTS)}, {"role": "assistant", "content": text}]}
    if kind == "sharegpt":
        return {"conversations": [{"from": "human", "value": draw(GOOD_TEXTS)}, {"from": "gpt", "value": text}]}
    if kind == "alpaca":
        return {"instruction": draw(GOOD_TEXTS), "input": draw(GOOD_TEXTS), "output": text}
    return {"prompt": draw(GOOD_TEXTS), "completion": text} if kind == "prompt" else {"text": text}


@st.composite
def records(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) < 8:
        return draw(good_records())
    kind = draw(st.sampled_from(["messages", "sharegpt", "alpaca", "prompt", "text", "other"]))
    if kind == "messages":
        record: Any = {"messages": draw(st.lists(turns("role", "content"), max_size=4))}
    elif kind == "sharegpt":
        record = {draw(st.sampled_from(["conversations", "items"])): draw(st.lists(turns("from", "value"), max_size=4))}
    elif kind == "alpaca":
        record = {"instruction": draw(TEXTS), "input": draw(TEXTS), "output": draw(TEXTS)}
    elif kind == "prompt":
        record = {"prompt": draw(TEXTS), "completion": draw(TEXTS)}
    elif kind == "text":
        record = {"text": draw(TEXTS)}
    else:
        return draw(VALUES)
    for key in draw(st.lists(st.sampled_from(sorted(record)), max_size=1)):
        del record[key]
    return record


@st.composite
def data_files(draw: st.DrawFn) -> tuple[str, bytes]:
    items = draw(st.lists(records(), max_size=5))
    suffix = draw(st.sampled_from([".jsonl", ".json"]))
    if suffix == ".jsonl":
        lines = [json.dumps(r).encode() for r in items]
        body = b"\n".join(lines) + draw(st.sampled_from([b"\n", b"", b"\n\n", b"\n \t\n"]))
    else:
        body = json.dumps(items).encode()
    damage = draw(st.sampled_from(["none"] * 6 + ["cut", "bytes", "bom"]))
    if damage == "cut" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif damage == "bytes":
        at = draw(st.integers(0, len(body)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\xe2\x80", b"\xa0", b"\x1c\n", b"\xc2\xa0\n"]))
        body = body[:at] + junk + body[at:]
    elif damage == "bom":
        body = b"\xef\xbb\xbf" + body
    return suffix, body


def test_fuzz_records(small: dict[str, Path], tokenizer: Any) -> None:
    from scalebio_cli.data.read.records import count_records, iter_records
    from scalebio_cli.data.tokens.render import Renderer
    from scalebio_cli.data.tokens.tokenized import load_tokenized
    from scalebio_cli.recipe.preflight import data_file_problems

    @given(file=data_files(), n=st.integers(0, 8), replacement=st.booleans())
    def check(file: tuple[str, bytes], n: int, replacement: bool) -> None:
        CASES["records"] += 1
        with scratch() as tmp:
            path = tmp / f"data{file[0]}"
            path.write_bytes(file[1])
            out = tmp / "out" / "s.jsonl"
            result = invoke("sample", "--weights", "uniform", "--sources", f"a={path}", "--sources",
                            f"b={small['clean']}", "-n", n, "-o", out, *(["--replacement"] if replacement else []))
            assert_contract(result, [out, out.with_name("s.manifest.json")], "records")
            if result.exit_code == 0:
                lines = out.read_text().splitlines()
                assert len(lines) == n and all(json.loads(line)["source"] in ("a", "b") for line in lines)
            if not data_file_problems("a", str(path)):
                assert count_records(path) == sum(1 for _ in iter_records(path))  # sample's count = the parse
                with contextlib.suppress(InputError):  # e.g. a template that cannot mask this chat: named, exit 2
                    load_tokenized(path, Renderer(tokenizer, 64), cache_dir=tmp / "cache")

    check()


# -- weights files ---------------------------------------------------------------------------------------------

FIELDS = ["format", "weights", "weights.a", "weights.b", "weights.c", "weights_averaged.a", "sources",
          "sources.a", "sources.a.path", "sources.a.sha256", "sources.a.num_examples", "sources.b.num_examples",
          "sources.c", "config", "config.data.sources", "config.data.sources.a", "validation", "model"]


def _weights_doc(small: dict[str, Path]) -> dict[str, Any]:
    from scalebio_cli.files import file_sha256
    from scalebio_cli.results import weights_file

    paths = {"a": small["clean"], "b": small["noisy"]}
    return weights_file.build(weights={"a": 0.75, "b": 0.25}, weights_averaged={"a": 0.5, "b": 0.5},
                              sources={n: {"path": str(p), "num_examples": 30, "sha256": file_sha256(p)}
                                       for n, p in paths.items()},
                              validation={"path": str(small["val"])}, trajectory=[], steps=1, seed=0,
                              model=str(small["model"]), config={"data": {"sources": {n: str(p)
                                                                                      for n, p in paths.items()}}})


def test_fuzz_weights_files(small: dict[str, Path]) -> None:
    base = _weights_doc(small)

    @given(edits=st.lists(st.tuples(st.sampled_from(FIELDS), st.one_of(VALUES, st.just("<delete>"))), max_size=2),
           damage=st.sampled_from(["none"] * 4 + ["cut", "flip", "duplicate"]), where=st.floats(0, 1),
           n=st.integers(0, 40), flags=st.lists(st.sampled_from(["--averaged", "--allow-changed-sources",
                                                                 "--replacement"]), unique=True, max_size=3))
    def check(edits: list, damage: str, where: float, n: int, flags: list[str]) -> None:
        CASES["weights files"] += 1
        doc = json.loads(json.dumps(base))
        for dotted, value in edits:
            *parents, leaf = dotted.split(".")
            node = doc
            for part in parents:
                node = node.setdefault(part, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                if value == "<delete>":
                    node.pop(leaf, None)
                else:
                    node[leaf] = value
        text = json.dumps(doc)
        at = int(where * len(text))
        if damage == "cut":
            text = text[:at]
        elif damage == "flip":
            text = text[:at] + chr((ord(text[at]) + 1) % 128 if at < len(text) else 65) + text[at + 1:]
        elif damage == "duplicate":
            text = text.replace('"weights": {', '"weights": {"b": 0.5, ', 1)
        with scratch() as tmp:
            (tmp / "w.json").write_text(text)
            out = tmp / "s.jsonl"
            result = invoke("sample", "--weights", tmp / "w.json", "-n", n, "-o", out, *flags)
            assert_contract(result, [out, tmp / "s.manifest.json"], "weights files")
            if result.exit_code == 0:
                assert len(out.read_text().splitlines()) == n

    check()


# -- checkpoints and metrics logs ------------------------------------------------------------------------------


def test_fuzz_checkpoint_files() -> None:
    import torch

    from scalebio_cli.results.metrics import MetricsLog
    from scalebio_cli.train import checkpoint

    meta = {"step": 4, "stage": "reweight", "config": {"seed": 0, "data": {"sources": {"a": "/a"}}},
            "data_sha256": {"a": "0" * 64}, "world_size": 1}
    with scratch() as tmp:
        torch.save({"lambda": torch.zeros(2), "plan": {"sources": [1, 2]}}, tmp / "trainer.pt")
        trainer = (tmp / "trainer.pt").read_bytes()
    lines = [json.dumps({"step": s, "L1": 1.0}) for s in range(1, 7)]

    @given(target=st.sampled_from(["meta", "trainer", "metrics"]), edits=st.lists(st.tuples(
        st.sampled_from(["step", "stage", "config", "data_sha256", "config.data"]), VALUES), max_size=2),
        cut=st.floats(0, 1), flip=st.one_of(st.none(), st.integers(0, 10**6)), start=st.integers(0, 8))
    def check(target: str, edits: list, cut: float, flip: int | None, start: int) -> None:
        CASES["checkpoints and metrics"] += 1
        info = json.loads(json.dumps(meta))
        for key, value in edits:
            if "." not in key or isinstance(info.get("config"), dict):
                _set(info, key, value)
        blobs = {"meta": json.dumps(info).encode(), "trainer": trainer, "metrics": "\n".join(lines).encode()}
        blob = blobs[target]
        if cut < 0.5:
            blob = blob[: int(cut * 2 * len(blob))]
        if flip is not None and blob:
            i = flip % len(blob)
            blob = blob[:i] + bytes([blob[i] ^ 0x5A]) + blob[i + 1:]
        blobs[target] = blob
        with scratch() as tmp:
            ckpt = tmp / "checkpoints" / "step-000004"
            ckpt.mkdir(parents=True)
            (ckpt / "meta.json").write_bytes(blobs["meta"])
            (ckpt / "trainer.pt").write_bytes(blobs["trainer"])
            (tmp / "metrics.jsonl").write_bytes(blobs["metrics"])
            try:
                found = checkpoint.resolve_resume(tmp, "auto")
                checkpoint.check_resumable(found, "reweight", meta["config"], meta["data_sha256"], ("seed",), False)
                checkpoint.load(found, "trainer")
            except InputError:
                pass  # named damage: exit 2
            MetricsLog(tmp / "metrics.jsonl", start)  # a torn log never stops a resume
            kept = [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines()]
            assert all(r["step"] <= start for r in kept) if start else kept == []

    check()


# -- model folders ---------------------------------------------------------------------------------------------


def test_fuzz_model_folders(small: dict[str, Path]) -> None:
    import torch

    from scalebio_cli.recipe.model_checks import model_folder_problems
    from scalebio_cli.train.modeling import load_model, load_tokenizer

    files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    originals = {name: (small["model"] / name).read_bytes() for name in files}

    @given(name=st.sampled_from(files), damage=st.sampled_from(["cut", "flip", "header", "json"]),
           where=st.floats(0, 1), value=VALUES)
    @settings(max_examples=max(5, settings().max_examples // 2))  # a model load per example
    def check(name: str, damage: str, where: float, value: Any) -> None:
        CASES["model folders"] += 1
        blob = originals[name]
        header_end = 8 + int.from_bytes(blob[:8], "little") if name.endswith(".safetensors") else len(blob)
        at = int(where * ((header_end if damage == "header" else len(blob)) - 1))
        if damage == "cut":
            blob = blob[:at]
        elif damage in ("flip", "header"):
            blob = blob[:at] + bytes([blob[at] ^ 0x21]) + blob[at + 1:]
        else:
            blob = json.dumps(value).encode()
        with scratch() as tmp:
            model = tmp / "model"
            shutil.copytree(small["model"], model)
            (model / name).write_bytes(blob)
            if model_folder_problems("model", str(model)):
                return  # named up front: exit 2
            try:  # what preflight let through must load, or fail as named bad input
                load_tokenizer(str(model))
                load_model(str(model), torch.float32, torch.device("cpu"))
            except InputError:
                pass

    check()
