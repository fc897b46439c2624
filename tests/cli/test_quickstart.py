"""studies/quickstart.py runs end to end (one generation) and ends with the report's path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quickstart_one_generation(reference_tiny, tmp_path, capsys):
    """Runs on a fresh machine too: the ``reference_tiny`` fixture builds the model into the cache first."""
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "studies" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    assert quickstart.main(["--generations", "1", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"report: {(tmp_path / 'quickstart-report.html').resolve()}"
    assert (tmp_path / "quickstart-report.html").stat().st_size > 100_000
    assert any(line.startswith("  stop n_generations: 1 / 15") for line in lines)
    assert any(line.startswith("  trial ") for line in lines)  # the Pareto front
