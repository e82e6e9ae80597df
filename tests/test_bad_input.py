"""Every kind of bad input: exit status 2, one clear message naming the file/key/line, no traceback, no output."""

from pathlib import Path

import pytest

from bad_inputs import CASES, Case
from conftest import run_cli


def test_the_catalogue_is_broad() -> None:
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)
    assert {c.kind for c in CASES} >= {"recipe", "data file", "model folder", "weights file", "command line"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, demo: Path, tmp_path: Path) -> None:
    args, output = case.setup(tmp_path, demo)
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    for fragment in case.expect:
        assert fragment.format(tmp=tmp_path, demo=demo) in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not output.exists()
    assert not (tmp_path / "run").exists()  # nothing at all where outputs would go
