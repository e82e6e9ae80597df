"""Build the bundled demo once (cached): a tiny Llama-style model with its own tokenizer, and demo data.

    python scripts/build_demo.py [--out demo] [--force]

Writes demo/data/{clean.jsonl, noisy.json, offtopic.parquet, val.jsonl, test.jsonl} and demo/model/ (a Hugging
Face folder). recipes/demo.yaml points at them. A second call does nothing unless --force is given.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from scalebio_cli.tiny import corpus_texts, make_demo_data, save_tiny_model
from scalebio_cli.tiny_layouts import build_layouts

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "demo")
    parser.add_argument("--force", action="store_true", help="rebuild even if the demo exists")
    args = parser.parse_args()
    marker = args.out / ".complete"
    if marker.exists() and not args.force:
        print(f"demo already built in {args.out} (use --force to rebuild)")
        return
    shutil.rmtree(args.out, ignore_errors=True)
    paths = make_demo_data(args.out / "data")
    save_tiny_model(args.out / "model", corpus_texts(list(paths.values())), arch="llama", layers=4, hidden=64)
    build_layouts(args.out / "layouts", args.out / "data")  # the same data as users keep it (recipes/data-forms.yaml)
    marker.touch()
    print(f"demo built in {args.out}: model/ and data/ ({', '.join(p.name for p in paths.values())})")


if __name__ == "__main__":
    main()
