"""`bench/gpu.sh` runs its steps on a CPU too (`--device cpu --quick`): the device line, the CUDA
tests (skipped here), `evoprune plan`, bench/plan.py, eval_throughput and apply_overhead, and the
TARGET summary (issue 28; no GPU is lent to the test machines)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_script_runs_every_step_on_cpu(reference_tiny):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--device", "cpu", "--quick"],
                          capture_output=True, text=True, timeout=1800, env=dict(os.environ, PYTHON=sys.executable))
    out = proc.stdout
    assert proc.returncode == 0, (out[-3000:], proc.stderr[-2000:])
    for section in ("=== device ===", "=== CUDA tests", "=== evoprune plan", "=== bench/plan.py",
                    "=== bench/eval_throughput.py on cpu", "=== bench/apply_overhead.py on cpu", "=== summary (cpu) ==="):
        assert section in out, section
    assert "bfloat16: runs on cpu (bfloat16)" in out
    assert re.search(r"plan for reference:tiny \(llama, [\d,]+ parameters\) in bfloat16 on cpu", out)
    summary = out.split("=== summary (cpu) ===")[1]
    for name in ("plan_memory_error", "plan_time_error", "bf16_stage1_spearman", "stage1_over_bare_throughput"):
        assert re.search(rf"^TARGET {name} \S+ (<=|>=) \S+ (PASS|FAIL)$", summary, re.M), name
    assert "--- exit" not in out
