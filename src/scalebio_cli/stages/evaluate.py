"""`scalebio eval`: response-token loss and perplexity per data file (and per source, when the records carry the
`source` field that `sample` and `select` write); exact-match accuracy from greedy generation; lm-evaluation-harness
tasks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from torch import nn

from scalebio_cli.console import console, step_progress
from scalebio_cli.data.out.answers import extract_answer, math_verify_equal
from scalebio_cli.data.read.sources import from_path, iter_examples
from scalebio_cli.errors import InputError
from scalebio_cli.train import distributed
from scalebio_cli.train.losses import dataset_totals

# End-of-turn markers of common chat templates: generation stops at any of them, not only at EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer: Any, renderer: Any, path: Path, batch_size: int, max_new_tokens: int,
                device: torch.device, show_progress: bool = True) -> dict[str, Any]:
    """Greedy generation on every record whose reference answer is checkable; accuracy of the extracted answers,
    compared as normalised strings (`accuracy`) and as mathematical objects by math-verify (`accuracy_math_verify`:
    fractions, LaTeX, `\\boxed{}`, units), both reported while the first is being replaced."""
    prompts, references, raw_references = [], [], []
    for _, example in iter_examples(from_path(str(path), path)):
        if isinstance(example, str) or not any(t.role == "assistant" for t in example):
            continue
        last = max(i for i, t in enumerate(example) if t.role == "assistant")
        reference = extract_answer(example[last].content)
        if reference is None:
            continue
        prompts.append(renderer.encode_prompt(example[: last + 1])[-renderer.max_length:])
        references.append(reference)
        raw_references.append(example[last].content)
    if not prompts:
        return {"accuracy": None, "accuracy_math_verify": None, "num_checked": 0}
    stop = sorted({tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN if t in tokenizer.get_vocab()}
                  | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
    was_training = model.training
    model.eval()
    correct = verified = 0
    progress = step_progress("generate", enabled=show_progress)
    task = progress.add_task("generate", total=len(prompts), info=path.name)
    with progress:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start: start + batch_size]
            width = max(len(p) for p in chunk)
            # Left padding: every prompt ends where generation starts.
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, p in enumerate(chunk):
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
            for row, ref in enumerate(references[start: start + batch_size]):
                text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
                correct += int(extract_answer(text) == ref)
                verified += int(math_verify_equal(raw_references[start + row], text))
            done = start + len(chunk)
            progress.update(task, completed=done, info=f"{path.name}: {correct}/{done} correct")
    model.train(was_training)
    return {"accuracy": correct / len(prompts), "accuracy_math_verify": verified / len(prompts),
            "num_checked": len(prompts)}


def perplexity(loss: float) -> float | None:
    """exp(loss), or None where it overflows a float (JSON has no inf; math.exp raises past ~709.78)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return None


def loss_entry(model: nn.Module, data: Any, source: Any, batch_size: int, pad_id: int,
               dist: distributed.DistInfo) -> dict[str, Any]:
    """Loss, perplexity, examples and tokens of one data file; with `by_source` (same keys per source) when its
    records carry a `source` field. One pass over the data either way."""
    from scalebio_cli.data.read.source_labels import from_field

    labels, _ = from_field(source, data.record_index)
    names = labels.names if labels is not None else []
    of_example = labels.per_file[0] if labels is not None else None
    totals = dataset_totals(model, data, batch_size, pad_id, dist, of_example, len(names))
    loss = totals[0] / totals[1] if totals[1] else float("nan")
    entry: dict[str, Any] = {"loss": loss, "perplexity": perplexity(loss), "num_examples": len(data),
                             "num_tokens": int(totals[1])}
    if labels is not None and of_example is not None:
        sums, tokens = totals[2: 2 + len(names)], totals[2 + len(names):]
        examples = [int((of_example == k).sum()) for k in range(len(names))]
        entry["by_source"] = {n: {"loss": s / t, "perplexity": perplexity(s / t), "num_examples": e,
                                  "num_tokens": int(t)}
                              for n, s, t, e in zip(names, sums, tokens, examples) if t > 0}
    return entry


# -- the command -----------------------------------------------------------------------------------------------


def run(model_dir: str, data: dict[str, str], *, output: Path | None, batch_size: int = 8, max_length: int = 1024,
        generate: bool = False, max_new_tokens: int = 256, lm_eval_tasks: list[str] | None = None,
        lm_eval_limit: int | None = None, precision: str = "auto", trust_remote_code: bool = False,
        chat_template: str | None = None) -> dict[str, Any]:
    from scalebio_cli.data.tokens.render import Renderer
    from scalebio_cli.data.tokens.tokenized import describe, load_tokenized, truncation_warning
    from scalebio_cli.files import write_json
    from scalebio_cli.train.modeling import load_model, load_tokenizer, resolve_dtype

    dist = distributed.setup()
    tokenizer = load_tokenizer(model_dir, trust_remote_code, chat_template)
    renderer = Renderer(tokenizer, max_length)
    tokenized = {name: load_tokenized(path, renderer) for name, path in data.items()}
    # A file with no response token left would give a loss of 0/0: say so before the model loads.
    empty = [f"--data {name}: no record of {data[name]} keeps a response token within --max-length={max_length} "
             "(raise --max-length, or check that records have responses)"
             for name, d in tokenized.items() if not len(d)]
    if empty:
        raise InputError(empty)
    if dist.is_main:
        console.print(f"[dim]eval[/] {escape(model_dir)}: max_length {max_length}")
        for name, tok in tokenized.items():
            console.print(f"[dim]data[/] {describe(name, tok)}")
            warning = truncation_warning(name, tok)
            if warning:
                console.print(f"[bold yellow]warning:[/] {warning}")
    model = load_model(model_dir, resolve_dtype(precision, dist.device), dist.device, trust_remote_code)
    results: dict[str, Any] = {}
    for name, path in data.items():
        entry = loss_entry(model, tokenized[name], from_path(f"--data {name}", path), batch_size,
                           tokenizer.pad_token_id, dist)
        if not math.isfinite(entry["loss"]):  # finite inputs, so the weights are not: a damaged (or diverged) model
            raise InputError(f"--model {model_dir}: its loss on --data {name} is {entry['loss']} (non-finite): the "
                             "model's weights hold NaN or inf values; no results written")
        if generate:
            entry.update(exact_match(model, tokenizer, renderer, Path(path), batch_size, max_new_tokens, dist.device,
                                     show_progress=dist.is_main))
        results[name] = entry
    doc: dict[str, Any] = {"model": str(model_dir), "results": results}
    if lm_eval_tasks:
        del model  # lm-eval loads its own copy
        doc["lm_eval"] = run_lm_eval(model_dir, lm_eval_tasks, lm_eval_limit, batch_size, precision, dist.device)
    if output is not None and dist.is_main:
        write_json(output, doc)
    return doc


def run_lm_eval(model_dir: str, tasks: list[str], limit: int | None, batch_size: int, precision: str,
                device: torch.device) -> dict[str, Any]:
    """lm-evaluation-harness on the model: task names, or paths to local task YAML files (offline)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise InputError("--lm-eval needs lm-evaluation-harness: pip install lm-eval") from None
    import yaml

    names, include = [], []
    for task in tasks:
        path = Path(task)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise InputError(f"--lm-eval: task file not found: {path}")
            spec = yaml.safe_load(path.read_text())
            if not isinstance(spec, dict) or "task" not in spec:
                raise InputError(f"--lm-eval: {path} has no 'task' name")
            names.append(spec["task"])
            include.append(str(path.resolve().parent))
        else:
            names.append(task)
    manager = TaskManager(include_path=sorted(set(include)) or None)
    from scalebio_cli.train.modeling import resolve_dtype

    dtype = "bfloat16" if resolve_dtype(precision, device) == torch.bfloat16 else "float32"
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype={dtype}", tasks=names,
                                  task_manager=manager, limit=limit, batch_size=batch_size, device=str(device))
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
            for task, metrics in out["results"].items()}


def format_table(doc: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"eval: {doc['model']}", title_justify="left")
    for column in ("data", "loss", "perplexity", "examples", "accuracy", "math-verify"):
        table.add_column(column, justify="left" if column == "data" else "right")
    for name, r in doc["results"].items():
        acc, verified = r.get("accuracy"), r.get("accuracy_math_verify")
        table.add_row(escape(name), f"{r['loss']:.4f}", f"{r['perplexity']:.2f}" if r["perplexity"] else "-",
                      f"{r['num_examples']:,}",
                      "-" if acc is None else f"{acc:.3f} ({r['num_checked']})",
                      "-" if verified is None else f"{verified:.3f}")
        for source, s in (r.get("by_source") or {}).items():  # loss only: accuracy is not split by source
            table.add_row(f"[dim]{escape(name)} / {escape(source)}[/]", f"{s['loss']:.4f}",
                          f"{s['perplexity']:.2f}" if s["perplexity"] else "-", f"{s['num_examples']:,}", "", "")
    return table
