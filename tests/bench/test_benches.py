"""Every bench runs: ``python bench/NAME.py --smoke`` exits 0 and ends with well-formed TARGET lines.

The benches are found by globbing ``bench/*.py`` (helpers such as ``_common.py`` excluded), so a new
bench without ``--smoke`` (or one that a library change broke) fails here. ``--smoke`` runs a bench in
seconds on a tiny model with small counts; its TARGETs may then FAIL (the sizes are far below what
the targets are about), but every line must be printed and well-formed:
``TARGET <name> <value> <op> <limit> PASS|FAIL``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import SERVERS

ROOT = Path(__file__).resolve().parents[2]
BENCHES = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))
TARGET = re.compile(r"^TARGET (?P<name>\S+) (?P<value>\S+) (?P<op><=|>=|==|<|>) (?P<limit>\S+) (?P<verdict>PASS|FAIL)$")

# benches that drive a study on a PostgreSQL server (a fresh database each, dropped afterwards)
NEEDS_SERVER = {"faults", "soak", "workers"}
# benches whose smoke run still starts several `evoprune` processes one after another (each pays
# the torch/transformers imports): more than ~20 s on 2 cores
SLOW = {"crash_resume", "faults", "soak", "workers"}


def _server_skip_reason() -> str | None:
    import sqlalchemy as sa

    engine = sa.create_engine(SERVERS["postgresql"], poolclass=sa.pool.NullPool)
    try:
        with engine.connect():
            return None
    except sa.exc.OperationalError as exc:
        return f"no postgresql server answers: {str(exc.orig).splitlines()[0]}"
    finally:
        engine.dispose()


def test_every_bench_is_found():
    assert len(BENCHES) >= 18 and "_common" not in BENCHES and "crash_resume" in BENCHES


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in BENCHES])
def test_bench_smoke_prints_its_targets(name, reference_tiny, tmp_path):
    """``reference_tiny`` builds the tiny reference model into the cache first (the smoke runs use it)."""
    extra: list[str] = []
    if name in NEEDS_SERVER:
        reason = _server_skip_reason()
        if reason:
            pytest.skip(reason)
        extra = ["--server", SERVERS["postgresql"]]
    if name == "gguf_serve":
        pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (the dev extra has it)")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", EVOPRUNE_LOG_LEVEL="WARNING",
               TMPDIR=str(tmp_path))  # temporary folders a bench leaves behind land in tmp_path
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--smoke", *extra], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    first = next((i for i, line in enumerate(lines) if line.startswith("TARGET")), None)
    assert first is not None, f"{name} --smoke printed no TARGET line:\n{proc.stdout[-3000:]}"
    closing = lines[first:]
    bad = [line for line in closing if not TARGET.match(line)]
    assert not bad, f"{name}: not a well-formed TARGET line (or output after the TARGET lines): {bad}"
    names = [TARGET.match(line)["name"] for line in closing]
    assert len(names) == len(set(names)), f"{name}: a TARGET printed twice: {names}"
