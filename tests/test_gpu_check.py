"""scripts/gpu_check.py (`make gpu-check`), the first GPU run's script, in its reduced form: every engine it measures
(plain, LoRA + ZeRO-3, ZeRO-3 + optimizer offload) runs to the end on a tiny model on the CPU and gets its row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytest.importorskip("deepspeed")
pytest.importorskip("peft")


@pytest.mark.slow  # three runs in their own processes (~60 s of CPU)
def test_gpu_check_runs_every_engine_in_its_reduced_form(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nkept\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--tiny",
                             "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n")  # the rest of the document is left alone
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| engine")]
    assert [r.split(" | ")[0] for r in rows] == ["| plain, LISA 2 blocks", "| LoRA r=16 + ZeRO-3",
                                                 "| ZeRO-3 + optimizer offload"]
    assert not any("failed" in r for r in rows)


def test_the_section_is_replaced_not_appended(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nbefore\n")
    for n in (1, 2):
        gpu_check.write_section(out, f"{gpu_check.BEGIN}\nrun {n}\n{gpu_check.END}\n")
    out.write_text(out.read_text() + "\nafter\n")
    gpu_check.write_section(out, f"{gpu_check.BEGIN}\nrun 3\n{gpu_check.END}\n")
    assert out.read_text() == f"# Benchmarks\n\nbefore\n\n{gpu_check.BEGIN}\nrun 3\n{gpu_check.END}\nafter\n"
