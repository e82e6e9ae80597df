"""`data.chat_template`: one Jinja file renders every record and is saved with the fine-tuned model."""

from __future__ import annotations

from pathlib import Path

from conftest import ROOT, invoke, run_cli, write_recipe


def test_finetune_saves_exactly_the_recipe_template(demo: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    template = ROOT / "recipes" / "templates" / "chatml.jinja"
    recipe = write_recipe(tmp_path / "r.yaml", demo, finetune={"data": str(demo / "data" / "clean.jsonl"),
                                                               "epochs": 0.1, "batch_size": 16, "lr": 1e-3})
    result = invoke("finetune", "--config", str(recipe), f"data.chat_template={template}",
                    f"output_dir={tmp_path / 'ft'}")
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(result.stdout.strip())
    assert tokenizer.chat_template == template.read_text()
    assert tokenizer.chat_template != AutoTokenizer.from_pretrained(demo / "model").chat_template
    assert "chat_template:" in (tmp_path / "ft" / "recipe.yaml").read_text()


def test_a_broken_template_is_refused_before_any_model_loads(demo: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }")
    recipe = write_recipe(tmp_path / "r.yaml", demo, finetune={"data": str(demo / "data" / "clean.jsonl")})
    result = run_cli("finetune", "--config", str(recipe), f"data.chat_template={bad}")
    assert result.returncode == 2 and f"data.chat_template: {bad}:1: not a valid Jinja template" in result.stderr
    missing = run_cli("reweight", "--config", str(recipe), f"data.chat_template={tmp_path / 'none.jinja'}")
    assert missing.returncode == 2 and "data.chat_template: file not found" in missing.stderr


def test_shipped_templates_render_incrementally(tokenizer) -> None:
    import copy

    from scalebio_cli.data.read.records import Turn
    from scalebio_cli.data.tokens.render import Renderer

    turns = [Turn("system", "Be brief."), Turn("user", "hi"), Turn("assistant", "yo"), Turn("user", "more"),
             Turn("assistant", "ok")]
    for name in ("chatml", "llama3"):
        tok = copy.deepcopy(tokenizer)
        tok.chat_template = (ROOT / "recipes" / "templates" / f"{name}.jinja").read_text()
        segments = Renderer(tok, 512).segments(turns)  # raises if a prefix does not render to a prefix
        assert [text for text, train in segments if train] in (["yo<|im_end|>\n", "ok<|im_end|>\n"],
                                                               ["yo<|eot_id|>", "ok<|eot_id|>"])
