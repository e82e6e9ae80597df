"""The catalogue of bad inputs: what each one is, how to produce it, and what the user must be told.

Used by test_bad_input.py (each must exit 2, name the file/key/line, print no traceback, leave no output) and by
scripts/write_reliability_doc.py (docs/reliability.md shows the message each case actually gets).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass
class Case:
    id: str
    kind: str  # what is bad: recipe, data file, model folder, weights file, command line
    what: str  # the defect, in words
    setup: Callable[[Path, Path], tuple[list[str], Path]]  # (tmp, demo) -> (CLI args, output that must not appear)
    expect: list[str]  # fragments of stderr: the message and where it points ({tmp} and {demo} are filled in)


def recipe(tmp: Path, demo: Path, sources: dict | None = None, **top) -> Path:
    tree = {
        "model": str(demo / "model"), "output_dir": str(tmp / "run"),
        "data": {"sources": sources or {"clean": str(demo / "data" / "clean.jsonl"),
                                        "noisy": str(demo / "data" / "noisy.json")},
                 "validation": str(demo / "data" / "val.jsonl"), "max_length": 64},
        "reweight": {"steps": 2, "batch_size": 4, "val_batch_size": 2},
    }
    for key, value in top.items():
        node = tree
        *parents, leaf = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def reweight(tmp: Path, demo: Path, *extra: str, **top) -> tuple[list[str], Path]:
    return ["reweight", "--config", str(recipe(tmp, demo, **top)), *extra], tmp / "run" / "weights.json"


def with_source(tmp: Path, demo: Path, name: str, content: str | bytes) -> tuple[list[str], Path]:
    bad = tmp / name
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    return reweight(tmp, demo, sources={"clean": str(demo / "data" / "clean.jsonl"), "bad": str(bad)})


def with_model(tmp: Path, demo: Path, drop: str | None = None, replace: dict | None = None) -> tuple[list[str], Path]:
    import shutil

    model = tmp / "model"
    shutil.copytree(demo / "model", model)
    if drop:
        (model / drop).unlink()
    for name, text in (replace or {}).items():
        (model / name).write_text(text)
    return reweight(tmp, demo, model=str(model))


def weights_doc(tmp: Path, demo: Path, **changes) -> tuple[list[str], Path]:
    from scalebio_cli.files import file_sha256
    from scalebio_cli.results import weights_file

    srcs = {"clean": demo / "data" / "clean.jsonl", "noisy": demo / "data" / "noisy.json"}
    doc = weights_file.build(weights={"clean": 0.6, "noisy": 0.4}, weights_averaged={"clean": 0.6, "noisy": 0.4},
                             sources={n: {"path": str(p), "num_examples": 600, "sha256": file_sha256(p)}
                                      for n, p in srcs.items()},
                             validation=None, trajectory=[], steps=1, seed=0, model="m", config={})
    doc.update(changes)
    w = tmp / "weights.json"
    w.write_text(json.dumps(doc))
    out = tmp / "sample.jsonl"
    return ["sample", "--weights", str(w), "--num-samples", "10", "--output", str(out)], out


def changed_source(tmp: Path, demo: Path) -> tuple[list[str], Path]:
    import shutil

    copy = tmp / "clean.jsonl"
    shutil.copy(demo / "data" / "clean.jsonl", copy)
    args, out = weights_doc(tmp, demo)
    w = Path(args[2])
    doc = json.loads(w.read_text())
    from scalebio_cli.files import file_sha256

    doc["sources"]["clean"] = {"path": str(copy), "num_examples": 600, "sha256": file_sha256(copy)}
    w.write_text(json.dumps(doc))
    copy.write_text(copy.read_text().replace("answer", "ANSWER", 1))
    return args, out


def cut_model(tmp: Path, demo: Path) -> Path:
    """A copy of the model whose model.safetensors was cut short (a copy interrupted, a full disk)."""
    import shutil

    model = tmp / "model"
    shutil.copytree(demo / "model", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return model


def cut_weights(tmp: Path, demo: Path) -> tuple[list[str], Path]:
    return reweight(tmp, demo, model=str(cut_model(tmp, demo)))


def raw_recipe(tmp: Path, demo: Path, sources_yaml: str, *extra: str) -> tuple[list[str], Path]:
    """A recipe written as text, for what YAML typing does to source names."""
    body = (f"model: {demo}/model\noutput_dir: {tmp}/run\ndata:\n  sources:\n{sources_yaml}"
            f"  validation: {demo}/data/val.jsonl\n  max_length: 64\nreweight: {{steps: 2, batch_size: 4, "
            "val_batch_size: 2}\n")
    return ["reweight", "--config", str(text(tmp, "r.yaml", body)), *extra], tmp / "run"


def eval_on(tmp: Path, demo: Path, content: str, *extra: str) -> tuple[list[str], Path]:
    data = text(tmp, "e.jsonl", content)
    return ["eval", "--model", str(demo / "model"), "--data", f"e={data}", "-o", str(tmp / "r.json"), *extra], \
        tmp / "r.json"


def edited_weights(tmp: Path, demo: Path, edit: Callable[[dict], None]) -> tuple[list[str], Path]:
    """A weights file as reweight writes it (with its recipe), then edited by hand."""
    args, out = weights_doc(tmp, demo)
    w = Path(args[2])
    doc = json.loads(w.read_text())
    doc["config"] = {"data": {"sources": {n: info["path"] for n, info in doc["sources"].items()}}}
    edit(doc)
    w.write_text(json.dumps(doc))
    return args, out


NO_ASSISTANT = json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]})


def text(tmp: Path, name: str, content: str) -> Path:
    path = tmp / name
    path.write_text(content)
    return path


CASES = [
    # -- recipes ---------------------------------------------------------------------------------------------
    Case("recipe-missing", "recipe", "the recipe file does not exist",
         lambda t, d: (["reweight", "--config", str(t / "nope.yaml")], t / "run" / "weights.json"),
         ["{tmp}/nope.yaml: recipe file not found"]),
    Case("recipe-not-yaml", "recipe", "the recipe is not valid YAML",
         lambda t, d: (["reweight", "--config", str(text(t, "r.yaml", "model: [a\n"))], t / "run"),
         ["{tmp}/r.yaml:2: not valid YAML"]),
    Case("recipe-unknown-key", "recipe", "a misspelt key",
         lambda t, d: reweight(t, d, reweight__stepz=3),
         ["{tmp}/recipe.yaml: unknown key 'reweight.stepz' (did you mean 'reweight.steps'?)"]),
    Case("recipe-wrong-type", "recipe", "a number key holding text",
         lambda t, d: reweight(t, d, reweight__alpha="lots"),
         ["{tmp}/recipe.yaml: reweight.alpha: expected a number, got 'lots'"]),
    Case("recipe-out-of-range", "recipe", "a learning rate out of range",
         lambda t, d: reweight(t, d, reweight__lr_lambda=0),
         ["{tmp}/recipe.yaml: reweight.lr_lambda: must be in (0, 10), got 0.0"]),
    Case("recipe-bad-choice", "recipe", "an unknown precision",
         lambda t, d: reweight(t, d, precision="fp8"),
         ["{tmp}/recipe.yaml: precision: must be one of auto, fp32, bf16, got 'fp8'"]),
    Case("recipe-duplicate-source", "recipe", "two sources with the same name",
         lambda t, d: (["reweight", "--config", str(text(t, "r.yaml", f"model: {d}/model\noutput_dir: {t}/run\n"
                                                          f"data:\n  sources:\n    a: {d}/data/clean.jsonl\n"
                                                          f"    a: {d}/data/noisy.json\n"))], t / "run"),
         ["{tmp}/r.yaml:6: not valid YAML: duplicate key 'a'"]),
    Case("one-source", "recipe", "reweight with a single source",
         lambda t, d: reweight(t, d, sources={"clean": str(d / "data" / "clean.jsonl")}),
         ["{tmp}/recipe.yaml: data.sources: reweight needs at least 2 sources, got 1"]),
    Case("no-validation", "recipe", "reweight without a validation set",
         lambda t, d: reweight(t, d, data__validation=None),
         ["data.validation: reweight needs a validation file"]),
    Case("batch-smaller-than-sources", "recipe", "fewer examples per step than sources",
         lambda t, d: reweight(t, d, reweight__batch_size=1),
         ["reweight.batch_size: 1 is less than the 2 sources"]),
    Case("override-syntax", "command line", "an override without '='",
         lambda t, d: reweight(t, d, "reweight.steps"),
         ["override 'reweight.steps': expected KEY=VALUE"]),
    # -- data files ------------------------------------------------------------------------------------------
    Case("source-missing", "data file", "a source file that does not exist",
         lambda t, d: reweight(t, d, sources={"clean": str(d / "data" / "clean.jsonl"), "gone": str(t / "gone.jsonl")}),
         ["data.sources.gone: file not found: {tmp}/gone.jsonl"]),
    Case("source-unsupported-type", "data file", "a .txt source",
         lambda t, d: with_source(t, d, "bad.txt", "text\nhello\n"),
         ["data.sources.bad: unsupported file type '.txt' ({tmp}/bad.txt)"]),
    Case("record-not-json", "data file", "a broken JSON line",
         lambda t, d: with_source(t, d, "bad.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": \n'),
         ["data.sources.bad: {tmp}/bad.jsonl:3: not valid JSON"]),
    Case("record-unknown-format", "data file", "a record of no known format",
         lambda t, d: with_source(t, d, "bad.jsonl", '{"text": "ok"}\n{"ask": "q", "reply": "a"}\n'),
         ["data.sources.bad: {tmp}/bad.jsonl:2: unknown record format (keys: ['ask', 'reply'])"]),
    Case("record-bad-role", "data file", "a conversation turn with an unknown role",
         lambda t, d: with_source(t, d, "bad.json", json.dumps([{"messages": [{"role": "robot", "content": "x"}]}])),
         ["data.sources.bad: {tmp}/bad.json[0]: messages[0] has unknown role 'robot'"]),
    Case("record-wrong-type", "data file", "a field of the wrong type",
         lambda t, d: with_source(t, d, "bad.jsonl", '{"prompt": "p", "completion": 42}\n'),
         ["data.sources.bad: {tmp}/bad.jsonl:1: 'completion' must be a string, got int"]),
    Case("json-not-a-list", "data file", "a .json file holding one object instead of a list",
         lambda t, d: with_source(t, d, "bad.json", '{"text": "one record"}'),
         ["data.sources.bad: {tmp}/bad.json: a .json data file must hold a list of records"]),
    Case("source-empty", "data file", "an empty source",
         lambda t, d: with_source(t, d, "bad.jsonl", ""),
         ["data.sources.bad: {tmp}/bad.jsonl holds no records"]),
    Case("source-not-utf8", "data file", "a source that is not UTF-8 text",
         lambda t, d: with_source(t, d, "bad.jsonl", b'{"text": "\xff\xfe"}\n'),
         ["data.sources.bad: {tmp}/bad.jsonl: not UTF-8 text"]),
    Case("no-room-for-a-response", "data file", "max_length too short for any response token",
         lambda t, d: reweight(t, d, data__max_length=8),
         ["data.sources.clean: no record of {demo}/data/clean.jsonl keeps a response token within data.max_length=8",
          "data.validation: no record of"]),
    # -- model folders ---------------------------------------------------------------------------------------
    Case("model-missing", "model folder", "a model folder that does not exist",
         lambda t, d: reweight(t, d, model=str(t / "no-model")),
         ["model: folder not found: {tmp}/no-model"]),
    Case("model-no-config", "model folder", "a folder without config.json",
         lambda t, d: with_model(t, d, drop="config.json"),
         ["model: {tmp}/model is not a model folder (no config.json)"]),
    Case("model-no-weights", "model folder", "a folder without weights",
         lambda t, d: with_model(t, d, drop="model.safetensors"),
         ["model: {tmp}/model has no weights"]),
    Case("model-bad-config", "model folder", "a config.json that is not JSON",
         lambda t, d: with_model(t, d, replace={"config.json": "{oops"}),
         ["model: {tmp}/model/config.json is not valid JSON"]),
    Case("model-no-tokenizer", "model folder", "a model folder without tokenizer files",
         lambda t, d: _no_tokenizer(t, d),
         ["model: {tmp}/model has no tokenizer files"]),
    # -- weights files (sample) ------------------------------------------------------------------------------
    Case("weights-format", "weights file", "a wrong format tag",
         lambda t, d: weights_doc(t, d, format="scalebio-weights/0"),
         ["{tmp}/weights.json: format is 'scalebio-weights/0', expected 'scalebio-weights/1'"]),
    Case("weights-sum", "weights file", "weights that do not sum to 1",
         lambda t, d: weights_doc(t, d, weights={"clean": 0.6, "noisy": 0.6}),
         ["{tmp}/weights.json: weights sum to 1.200000000, not 1"]),
    Case("weights-negative", "weights file", "a negative weight",
         lambda t, d: weights_doc(t, d, weights={"clean": 1.5, "noisy": -0.5}),
         ["{tmp}/weights.json: weights.noisy = -0.5 is outside [0, 1]"]),
    Case("weights-unknown-source", "weights file", "a weight for a source the file does not list",
         lambda t, d: weights_doc(t, d, weights={"clean": 0.6, "mystery": 0.4}),
         ["{tmp}/weights.json: weights names source 'mystery', which is not among its sources"]),
    Case("weights-changed-source", "weights file", "a source file edited after reweighting",
         changed_source,
         ["{tmp}/weights.json: source 'clean' changed since the weights were learned: {tmp}/clean.jsonl"]),
    Case("weights-not-json", "weights file", "a weights file that is not JSON",
         lambda t, d: (["sample", "--weights", str(text(t, "w.json", "{")), "-n", "3", "-o", str(t / "s.jsonl")],
                       t / "s.jsonl"),
         ["{tmp}/w.json: not a valid weights file (not JSON"]),
    Case("sample-source-too-small", "weights file", "more samples than a source has, without replacement",
         lambda t, d: (weights_doc(t, d)[0][:4] + ["1200", "--output", str(t / "sample.jsonl")], t / "sample.jsonl"),
         ["source 'clean' has 600 records but 720 were asked for without replacement"]),
    Case("deepspeed-config-missing", "recipe", "a DeepSpeed config file that does not exist",
         lambda t, d: reweight(t, d, deepspeed=str(t / "zero9.json")),
         ["deepspeed: config file not found: {tmp}/zero9.json"]),
    Case("deepspeed-bad-stage", "recipe", "a DeepSpeed config with an impossible ZeRO stage",
         lambda t, d: reweight(t, d, deepspeed=str(text(t, "z.json", '{"zero_optimization": {"stage": 5}}'))),
         ["deepspeed: {tmp}/z.json: zero_optimization.stage must be 0, 1, 2 or 3, got 5"]),
    Case("deepspeed-mistyped-value", "recipe", "a DeepSpeed setting of the wrong type (DeepSpeed's own validation)",
         lambda t, d: reweight(t, d, deepspeed=str(text(t, "z.json", '{"zero_optimization": {"stage": 3, '
                                                       '"stage3_max_live_parameters": "lots"}}'))),
         ["deepspeed: {tmp}/z.json: zero_optimization.stage3_max_live_parameters: Input should be a valid integer"]),
    Case("deepspeed-nvme-without-path", "recipe", "a DeepSpeed NVMe offload without nvme_path",
         lambda t, d: reweight(t, d, deepspeed=str(text(t, "z.json", '{"zero_optimization": {"stage": 3, '
                                                       '"offload_optimizer": {"device": "nvme"}}}'))),
         ["deepspeed: {tmp}/z.json: zero_optimization.offload_optimizer.device is \"nvme\" but no nvme_path is set"]),
    Case("deepspeed-clipping-not-the-recipes", "recipe",
         "a DeepSpeed gradient_clipping other than the recipe's max_grad_norm (the recipe owns it)",
         lambda t, d: reweight(t, d, deepspeed=str(text(t, "z.json", '{"gradient_clipping": 0.5}'))),
         ["deepspeed: {tmp}/z.json: gradient_clipping is 0.5, but the recipe's reweight.max_grad_norm is 1.0"]),
    # -- other commands --------------------------------------------------------------------------------------
    Case("finetune-no-data", "recipe", "finetune with neither finetune.data nor finetune.weights",
         lambda t, d: (["finetune", "--config", str(recipe(t, d))], t / "run" / "config.json"),
         ["finetune: set exactly one of finetune.data"]),
    Case("eval-not-a-model", "model folder", "eval of a folder that holds no model",
         lambda t, d: (["eval", "--model", str(t), "--data", f"x={d / 'data' / 'test.jsonl'}", "-o",
                        str(t / "r.json")], t / "r.json"),
         ["--model {tmp}: not a model folder (no config.json)"]),
    Case("resume-not-a-checkpoint", "command line", "--resume pointing at a folder that is no checkpoint",
         lambda t, d: reweight(t, d, "--resume", str(t)),
         ["--resume {tmp}: not a complete checkpoint folder"]),
    # -- damaged model folders (issue 19, class 1) -----------------------------------------------------------
    Case("model-weights-cut-short", "model folder", "a model.safetensors cut short",
         cut_weights, ["model: {tmp}/model/model.safetensors is cut short: its tensors need"]),
    Case("model-config-not-object", "model folder", "a config.json that is valid JSON but a list",
         lambda t, d: with_model(t, d, replace={"config.json": "[1, 2]"}),
         ["model: {tmp}/model/config.json must hold a JSON object ({{...}}), got a list"]),
    Case("model-tokenizer-not-tokenizer", "model folder", "a tokenizer.json that is JSON but no tokenizer",
         lambda t, d: with_model(t, d, replace={"tokenizer.json": '{"vocab": [1, 2, 3]}'}),
         ["model: {tmp}/model/tokenizer.json is not a tokenizer"]),
    Case("eval-model-cut-short", "model folder", "eval of a model whose weights were cut short",
         lambda t, d: (["eval", "--model", str(cut_model(t, d)), "--data", f"x={d / 'data' / 'test.jsonl'}", "-o",
                        str(t / "r.json")], t / "r.json"),
         ["--model: {tmp}/model/model.safetensors is cut short"]),
    # -- numbers that pass a naive range check (class 2) -----------------------------------------------------
    Case("recipe-nan", "recipe", "a float key holding .nan",
         lambda t, d: reweight(t, d, reweight__alpha=float("nan")),
         ["{tmp}/recipe.yaml: reweight.alpha: must be a finite number, got nan"]),
    Case("override-inf", "command line", "an override setting a float to -.inf",
         lambda t, d: reweight(t, d, "reweight.weight_decay=-.inf"),
         ["reweight.weight_decay: must be a finite number, got -inf"]),
    Case("override-overflow", "command line", "an override whose number overflows a float (1e999)",
         lambda t, d: reweight(t, d, "finetune.epochs=1e999"),
         ["finetune.epochs: must be a finite number, got '1e999'"]),
    Case("recipe-seed-too-large", "recipe", "a seed beyond what numpy and torch seeding take",
         lambda t, d: reweight(t, d, seed=2**32),
         ["seed: must be in [0, 4294967295]"]),
    Case("recipe-int-overflow", "recipe", "an integer beyond int64",
         lambda t, d: reweight(t, d, reweight__steps=10**30),
         ["reweight.steps: 1e+30 is too large"]),
    Case("lisa-more-layers-than-model", "recipe", "lisa.layers above the model's number of blocks",
         lambda t, d: reweight(t, d, reweight__lisa={"layers": 9, "interval": 2}),
         ["reweight.lisa.layers: 9 is more than the 4 transformer blocks of {demo}/model"]),
    Case("lora-lisa-more-layers-than-model", "recipe", "LISA over LoRA adapters drawing more blocks than the model has",
         lambda t, d: reweight(t, d, reweight__lora={"r": 8}, reweight__lisa={"layers": 5, "interval": 2}),
         ["reweight.lisa.layers: 5 is more than the 4 transformer blocks of {demo}/model"]),
    Case("lora-negative-rank", "recipe", "a negative LoRA rank",
         lambda t, d: reweight(t, d, "finetune.lora.r=-4"),
         ["finetune.lora.r: must be >= 0 (0 = no LoRA), got -4"]),
    Case("lora-with-zero1", "recipe", "LoRA under DeepSpeed ZeRO-1 (its adapters share one engine: ZeRO-2/3 only)",
         lambda t, d: reweight(t, d, "reweight.lora.r=8", "reweight.lisa.layers=0",
                               deepspeed=str(text(t, "z.json", '{"zero_optimization": {"stage": 1}}'))),
         ["reweight.lora.r: LoRA under DeepSpeed runs with ZeRO-2 or ZeRO-3 (the adapters of a run share one engine); "
          "{tmp}/z.json sets stage 1"]),
    Case("max-length-beyond-model", "recipe", "data.max_length above the model's max_position_embeddings",
         lambda t, d: reweight(t, d, data__max_length=4096),
         ["data.max_length: 4096 is more than the 1024 positions {demo}/model was built for"]),
    # -- names that collide after YAML typing (class 3) ------------------------------------------------------
    Case("source-names-same-string", "recipe", "sources `1:` and `\"1\":` (a number and a text)",
         lambda t, d: raw_recipe(t, d, f"    1: {d}/data/clean.jsonl\n    \"1\": {d}/data/noisy.json\n"),
         ["data.sources: the names 1 (int) and '1' (str) are both the name '1'"]),
    Case("source-names-case", "recipe", "sources `Clean` and `clean`",
         lambda t, d: raw_recipe(t, d, f"    Clean: {d}/data/clean.jsonl\n    clean: {d}/data/noisy.json\n"),
         ["data.sources: the names 'Clean' (str) and 'clean' (str) differ only in case or Unicode form"]),
    Case("source-names-unicode", "recipe", "sources `ﬁle` (a ligature) and `file` (NFKC-equal)",
         lambda t, d: raw_recipe(t, d, f"    ﬁle: {d}/data/clean.jsonl\n    file: {d}/data/noisy.json\n"),
         ["data.sources: the names 'ﬁle' (str) and 'file' (str) differ only in case or Unicode form"]),
    # -- records that cannot train (class 4) -----------------------------------------------------------------
    Case("chats-without-assistant", "data file", "a source whose conversations have no assistant turn",
         lambda t, d: with_source(t, d, "bad.jsonl", NO_ASSISTANT + "\n" + NO_ASSISTANT + "\n"),
         ["data.sources.bad: no record of {tmp}/bad.jsonl can be trained on: {tmp}/bad.jsonl:1: the conversation "
          "has no assistant turn (nor does the other record)"]),
    Case("sample-uniform-unusable-source", "data file", "sample --weights uniform from a source nothing can train on",
         lambda t, d: (["sample", "--weights", "uniform", "--sources", f"a={text(t, 'a.jsonl', NO_ASSISTANT)}",
                        "--sources", f"b={d / 'data' / 'clean.jsonl'}", "-n", "4", "-o", str(t / "s.jsonl")],
                       t / "s.jsonl"),
         ["--sources a: no record of {tmp}/a.jsonl can be trained on: {tmp}/a.jsonl:1: the conversation has no "
          "assistant turn"]),
    # -- degenerate evaluation data (class 6) ----------------------------------------------------------------
    Case("eval-empty-data", "data file", "eval of an empty data file",
         lambda t, d: eval_on(t, d, ""), ["--data e: {tmp}/e.jsonl holds no records"]),
    Case("eval-no-response-tokens", "data file", "eval where no record keeps a response token within --max-length",
         lambda t, d: eval_on(t, d, json.dumps({"prompt": "word " * 40, "completion": "x"}) + "\n",
                              "--max-length", "8"),
         ["--data e: no record of {tmp}/e.jsonl keeps a response token within --max-length=8"]),
    # -- hand-edited weights files (class 8) -----------------------------------------------------------------
    Case("weights-num-examples-edited", "weights file", "a source's num_examples edited by hand",
         lambda t, d: edited_weights(t, d, lambda doc: doc["sources"]["clean"].update(num_examples=500)),
         ["{tmp}/weights.json: sources.clean.num_examples is 500 but {demo}/data/clean.jsonl holds 600 records"]),
    Case("weights-sha-not-a-hash", "weights file", "a sha256 edited into something that is no hash",
         lambda t, d: edited_weights(t, d, lambda doc: doc["sources"]["noisy"].update(sha256="abc")),
         ["{tmp}/weights.json: sources.noisy.sha256 is 'abc', not a sha256"]),
    Case("weights-renamed-source", "weights file", "a source renamed in weights and sources but not in the recipe",
         lambda t, d: edited_weights(t, d, _rename_clean),
         ["{tmp}/weights.json: sources (tidy, noisy) are not the sources of its recorded recipe"]),
    Case("weights-duplicate-key", "weights file", "a weights file naming a source twice",
         lambda t, d: _duplicate_weight(t, d), ["{tmp}/weights.json: not a valid weights file", "appears twice"]),
]


def qa_source(tmp: Path, demo: Path, category: str | None = None, **spec) -> tuple[list[str], Path]:
    """A question/answer source (a .jsonl, or with `repo` a folder laid out like a Hub dataset) given as a mapping."""
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i + 1}", **({"category": category} if category else {})}
            for i in range(8)]
    path = tmp / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if spec.pop("repo", False):
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp / "repo"
        (path / "data").mkdir(parents=True)
        for split in ("train", "test"):
            pq.write_table(pa.Table.from_pylist(rows), path / "data" / f"{split}-00000-of-00001.parquet")
    return reweight(tmp, demo, sources={"clean": str(demo / "data" / "clean.jsonl"),
                                        "qa": {"path": str(path), **spec}})


def _weighted_validation(tmp: Path, demo: Path) -> tuple[list[str], Path]:
    val = str(demo / "data" / "val.jsonl")
    return reweight(tmp, demo, data__validation={"math": {"path": val, "weight": 0}, "chat": {"path": val,
                                                                                              "weight": 1}})


DATA_FORM_CASES = [
    Case("map-missing-column", "data file", "a column map naming a column the data does not have",
         lambda t, d: qa_source(t, d, columns={"prompt": "questoin", "completion": "answer"}),
         ["data.sources.qa.columns.prompt: column 'questoin' is not in {tmp}/qa.jsonl; its columns: answer, "
          "question"]),
    Case("split-by-absent", "data file", "split_by naming a column the data does not have",
         lambda t, d: qa_source(t, d, split_by="category"),
         ["data.sources.qa.split_by: column 'category' is not in {tmp}/qa.jsonl; its columns: answer, question"]),
    Case("split-by-one-value", "data file", "split_by on a column with a single value",
         lambda t, d: qa_source(t, d, category="math", split_by="category"),
         ["data.sources.qa.split_by: column 'category' of {tmp}/qa.jsonl has only the value 'math'"]),
    Case("split-not-found", "data file", "a split the dataset folder does not have",
         lambda t, d: qa_source(t, d, repo=True, split="validation"),
         ["data.sources.qa: split 'validation' not found in {tmp}/repo; its splits: ", "train", "test"]),
    Case("max-samples-negative", "recipe", "a negative max_samples",
         lambda t, d: qa_source(t, d, max_samples=-3),
         ["data.sources.qa.max_samples: must be >= 1 (or null for all records), got -3"]),
    Case("validation-weight-not-positive", "recipe", "a validation set weighted 0",
         _weighted_validation, ["data.validation.math.weight: must be > 0, got 0.0"]),
    Case("hub-id-offline", "data file", "a Hub dataset id while offline (HF_HUB_OFFLINE)",
         lambda t, d: reweight(t, d, sources={"clean": str(d / "data" / "clean.jsonl"),
                                              "hub": "nobody/no-such-dataset"}),
         ["data.sources.hub: 'nobody/no-such-dataset' is not a local path, so it names a Hub dataset, but the Hub "
          "cannot be reached offline"]),
]
CASES += DATA_FORM_CASES


def _rename_clean(doc: dict) -> None:
    for key in ("weights", "weights_averaged", "sources"):
        doc[key] = {("tidy" if n == "clean" else n): v for n, v in doc[key].items()}


def _duplicate_weight(tmp: Path, demo: Path) -> tuple[list[str], Path]:
    args, out = weights_doc(tmp, demo)
    w = Path(args[2])
    w.write_text(w.read_text().replace('"weights": {"clean": 0.6,', '"weights": {"clean": 0.6, "clean": 0.1,', 1))
    return args, out


def _no_tokenizer(tmp: Path, demo: Path) -> tuple[list[str], Path]:
    import shutil

    model = tmp / "model"
    shutil.copytree(demo / "model", model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    return reweight(tmp, demo, model=str(model))


# -- issue 19: classes of hostile input, where each is fixed, and what tests it ------------------------------


@dataclass
class HostileClass:
    name: str
    fix: str  # the module(s) and function(s) that own the fix
    cases: list[str]  # ids of CASES above
    tests: list[str]  # `module::test` in tests/ (test_hostile.py checks that each exists)


HOSTILE = [
    HostileClass("Damaged model folders and tokenizers",
                 "recipe/model_folder.py (safetensors_problem, weights_problems, tokenizer_problems), "
                 "recipe/model_checks.py model_folder_problems; train/modeling.py load_model/load_tokenizer wrap "
                 "errors",
                 ["model-weights-cut-short", "model-config-not-object", "model-tokenizer-not-tokenizer",
                  "eval-model-cut-short"],
                 ["test_hostile::test_damaged_shards_and_pickles_are_named",
                  "test_hostile::test_load_errors_behind_preflight_become_input_errors",
                  "test_fuzz::test_fuzz_model_folders"]),
    HostileClass("Numbers that pass a naive range check",
                 "recipe/load.py _coerce (finite floats, int64), _check_ranges (seed <= 2**32-1); "
                 "recipe/model_checks.py model_fit_problems (lisa.layers, data.max_length vs config.json)",
                 ["recipe-nan", "override-inf", "override-overflow", "recipe-seed-too-large", "recipe-int-overflow",
                  "lisa-more-layers-than-model", "max-length-beyond-model"],
                 ["test_hostile::test_non_finite_floats_are_refused_in_any_spelling",
                  "test_hostile::test_integers_out_of_range_for_their_consumers",
                  "test_hostile::test_finetune_lisa_layers_beyond_the_model_is_refused_before_any_output",
                  "test_fuzz::test_fuzz_recipes"]),
    HostileClass("Names that collide after YAML typing",
                 "recipe/load.py name_clashes (via _coerce for every mapping; cli._parse_named_files for --sources, "
                 "--data)",
                 ["source-names-same-string", "source-names-case", "source-names-unicode"],
                 ["test_hostile::test_source_names_that_are_one_name_are_refused",
                  "test_hostile::test_named_files_on_the_command_line_are_folded_too"]),
    HostileClass("Records that cannot train",
                 "recipe/preflight.py data_file_problems (records.has_response), run for every command: "
                 "stages/sample.py check_sample, stages/evaluate_check.py check",
                 ["chats-without-assistant", "sample-uniform-unusable-source"],
                 ["test_hostile::test_a_few_chats_without_assistant_are_named_and_skipped",
                  "test_hostile::test_eval_of_chats_without_assistant_is_refused", "test_fuzz::test_fuzz_records"]),
    HostileClass("An output that is one of the inputs",
                 "files.py same_file/clobbered_input; recipe/preflight.py output_file_problems, "
                 "stages/sample.py check_sample, stages/evaluate_check.py check, run_products_problems",
                 [],
                 ["test_hostile::test_sample_output_naming_a_source_is_refused",
                  "test_hostile::test_sample_output_naming_the_weights_or_validation_file_is_refused",
                  "test_hostile::test_eval_output_naming_a_data_or_model_file_is_refused",
                  "test_hostile::test_finetune_output_dir_that_is_the_base_model_is_refused"]),
    HostileClass("Empty or degenerate evaluation data",
                 "stages/evaluate_check.py check; stages/evaluate.py run (no response token, non-finite loss), "
                 "perplexity",
                 ["eval-empty-data", "eval-no-response-tokens"],
                 ["test_hostile::test_perplexity_never_overflows_to_inf",
                  "test_hostile::test_eval_of_a_model_with_nan_weights_writes_no_results"]),
    HostileClass("Resume after a crash",
                 "results/metrics.py MetricsLog (torn lines dropped); train/checkpoint.py config_differences "
                 "(reordered sources), meta/load (damaged files named)",
                 [],
                 ["test_hostile::test_resume_drops_a_torn_metrics_line_and_goes_on",
                  "test_hostile::test_resume_refuses_changed_sources",
                  "test_hostile::test_resume_refuses_a_source_changed_in_content",
                  "test_hostile::test_a_damaged_checkpoint_file_is_named", "test_fuzz::test_fuzz_checkpoint_files"]),
    HostileClass("A weights file edited by hand",
                 "results/weights_file.py load (_field_problems, _recipe_problems, _file_problems, duplicate keys)",
                 ["weights-num-examples-edited", "weights-sha-not-a-hash", "weights-renamed-source",
                  "weights-duplicate-key"],
                 ["test_hostile::test_allow_changed_sources_stays_the_escape", "test_fuzz::test_fuzz_weights_files"]),
    HostileClass("A fresh run over another run",
                 "results/run_folder.py check_fresh_start (refused; --resume auto or --force, which deletes the old "
                 "checkpoints)",
                 [],
                 ["test_hostile::test_a_fresh_run_over_another_runs_checkpoints_is_refused",
                  "test_hostile::test_force_starts_over_without_mixing_checkpoints"]),
    HostileClass("Two runs into one output folder at once",
                 "results/run_folder.py locked/claim/claim_output_file (fcntl.flock, rank 0 only), called by cli.py",
                 [],
                 ["test_hostile::test_a_second_run_into_a_held_folder_is_refused_at_once",
                  "test_hostile::test_a_second_sample_into_the_same_output_is_refused",
                  "test_hostile::test_a_stale_lock_of_a_dead_process_is_taken_over",
                  "test_hostile::test_only_rank_0_takes_the_lock",
                  "test_hostile::test_two_real_runs_the_second_is_refused_and_the_lock_dies_with_the_first"]),
]
