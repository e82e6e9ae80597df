"""Does response length drive RHO-loss's score? One irreducible-loss model, one pass of each model over the pool, then
every scoring rule on the same token losses: the share of `clean` in the top third, each source's mean score and
response length, and the rank correlation of score with response length within each source.

    python scripts/study_rho_length.py --case tiny|alpaca [--per-source N] [--num-val N] [--seed S] [KEY=VALUE ...]

tiny: the test suite's case (a 2-block Llama trained from scratch, arithmetic / reversal); alpaca: SmolLM2-135M-
Instruct on GPT4-LLM-Cleaned clean / "." / shuffled-words (scripts/cases/denoising.py). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases.denoising import tiny_pairs, write_alpaca_case, write_case

ROOT = Path(__file__).resolve().parent.parent
ALPACA = ROOT.parent / "shared" / "data" / "instruct-math" / "train_GPT4-LLM-Cleaned.json"
SMOLLM2 = Path.home() / ".cache" / "scalebio" / "models" / "SmolLM2-135M-Instruct"


def build(case: str, work: Path, per_source: int, num_val: int, seed: int) -> dict:
    if case == "tiny":
        from scalebio_cli.tiny import corpus_texts, save_tiny_model

        paths = write_case(work / "data", tiny_pairs(seed), per_source, num_val, seed)
        save_tiny_model(work / "model", corpus_texts(list(paths.values())), layers=2, hidden=64, vocab_size=400)
        return {"model": str(work / "model"), "data": {"max_length": 48}, "paths": paths,
                "select": {"rho_loss": {"lr": 1e-2}}}
    paths = write_alpaca_case(work / "data", ALPACA, per_source, num_val, seed)
    return {"model": str(SMOLLM2), "data": {"max_length": 128}, "paths": paths, "select": {}}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 2 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=("tiny", "alpaca"), default="tiny")
    parser.add_argument("--per-source", type=int, default=48)
    parser.add_argument("--num-val", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from scalebio_cli.recipe import load_recipe
    from scalebio_cli.selection import rho_loss
    from scalebio_cli.selection.pool import load_pool, token_losses
    from scalebio_cli.train import distributed
    from scalebio_cli.train.modeling import load_model, resolve_dtype

    work = Path(tempfile.mkdtemp(prefix="rho-length-"))
    built = build(args.case, work, args.per_source, args.num_val, args.seed)
    paths = built.pop("paths")
    recipe_tree = {**built, "output_dir": str(work / "run"), "seed": args.seed,
                   "data": {**built["data"], "sources": {n: str(paths[n]) for n in ("clean", "dot", "shuffled")},
                            "validation": str(paths["val"])}}
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe_tree))
    recipe = load_recipe(work / "recipe.yaml", args.overrides)
    dist = distributed.setup()
    pool = load_pool(recipe, dist)
    model_dir, fit = rho_loss.irreducible_model(recipe, pool, dist, args.seed, work / "select")
    dtype = resolve_dtype(recipe.precision, dist.device)
    sums, counts = {}, {}
    for label, path in (("base", recipe.model), ("il", str(model_dir))):
        model = load_model(path, dtype, dist.device)
        for n, d in pool.sources.items():
            sums[label, n], counts[n] = token_losses(model, d, 8, pool.pad_id, dist.device, lambda k: None, dist)
    names = list(pool.sources)
    k = pool.size // 3
    print(f"\n{args.case}, seed {args.seed}: {pool.size} records, top {k}; IL held-out loss "
          f"{fit['heldout_loss_before']:.3f} -> {fit['heldout_loss_after']:.3f} in {fit['steps']} steps\n")
    print("| rule | clean in top third | " + " | ".join(f"{n}: mean score / rho(score, length)" for n in names)
          + " |\n|---|---:|" + "---:|" * len(names))
    for rule in ("mean", "sum"):
        scores = {n: rho_loss.reducible(sums["base", n], sums["il", n], counts[n], rule) for n in names}
        everything = np.concatenate([scores[n] for n in names])
        which = np.concatenate([np.full(len(scores[n]), j) for j, n in enumerate(names)])
        top = which[np.argsort(-everything, kind="stable")[:k]]
        cells = [f"{scores[n].mean():+.3f} / {spearman(scores[n], counts[n]):+.2f}" for n in names]
        print(f"| {rule} | {np.mean(top == 0):.0%} ({(top == 1).sum()} dot, {(top == 2).sum()} shuffled) | "
              + " | ".join(cells) + " |")
    print("\nresponse tokens (mean): " + ", ".join(f"{n} {counts[n].mean():.1f}" for n in names))


if __name__ == "__main__":
    main()
