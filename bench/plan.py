"""The plan against the search it plans: peak memory and seconds, planned and measured side by side.

Per model (``--models``, default the tiny, small and SmolLM2 reference models), one study config
(the default preset on ``--seq-len`` windows, a params budget, ``--dtype``) is planned with
:func:`evoprune.plan` -- its calibration run on this machine -- and then run as a real
``evoprune search --generations N`` in a child process right after, in the same time window, so
that the other processes on a shared machine slow both alike. Measured: the child's peak
resident set (``wait4``'s ``ru_maxrss``) and the search's own seconds (the ``study.run`` line:
dense references and ``N`` generations, without loading and calibration); planned:
``plan.peak_host_bytes`` and ``plan.seconds_for(N)``.

A second part scores 16 random candidates' stage-1 KL on the SmolLM2 study (``--rank-model``) in
float32 and in bfloat16 and compares the rankings (Spearman) and the values.

TARGETs: ``plan_memory_error <= 0.25`` and ``plan_time_error <= 0.5`` (the largest relative error
over the models), ``bf16_stage1_spearman >= 0.95``.

    python bench/plan.py                                   # tiny, small, SmolLM2; ~15 min on 2 shared cores
    python bench/plan.py --smoke                           # tiny only, 2 generations; about a minute
    python bench/plan.py --models tiny --device cuda --dtype bfloat16    # on a GPU (bench/gpu.sh)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import add_common_args, distinct_random, print_targets, start

import evoprune
from evoprune.search import StudyConfig, build_runtime


def reference_folder(size: str) -> str:
    """The built reference model's folder (the studies use a fresh cache for their importance and
    dense references, so they name the folder rather than ``reference:<size>``)."""
    from evoprune.data import build_reference_model

    return str(build_reference_model(size, progress=False))


def study_config(model: str, args: argparse.Namespace, cache: str, dtype: str | None = None) -> StudyConfig:
    return StudyConfig.from_dict({
        "model": model, "preset": "default", "dtype": dtype or args.dtype, "device": args.device,
        "calibration": {"num_sequences": 8, "seq_len": args.seq_len},
        "space": {"attention": "kv_groups", "mlp_step": 64 if "smollm2" in model else 16},
        "budget": {"metric": "params", "max_ratio": 0.7}, "seed": args.seed, "cache_dir": cache,
        "threads": args.threads,
    })


def measure(model: str, args: argparse.Namespace, work: Path) -> dict:
    cache = str(work / "cache")  # a fresh cache: importance and dense references are computed, as planned
    cfg = study_config(model, args, cache)
    path = work / "study.yaml"
    path.write_text(cfg.to_yaml())
    plan = evoprune.plan(cfg)
    argv = [sys.executable, "-m", "evoprune", "search", str(path), "--generations", str(args.generations),
            "--storage", f"sqlite:///{work / 'study.db'}", "--threads", str(args.threads)]
    t0 = time.perf_counter()
    with open(work / "out.txt", "w") as fo, open(work / "err.txt", "w") as fe:
        proc = subprocess.Popen(argv, stdout=fo, stderr=fe, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    out, err = (work / "out.txt").read_text(), (work / "err.txt").read_text()
    if proc.returncode:
        raise SystemExit(f"search of {model} failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    m = re.search(r"stopped by \w+, ([0-9.]+) s;", out)
    seconds = float(m.group(1))
    return {"model": model, "plan": plan, "seconds": seconds, "wall": wall, "rss": int(usage.ru_maxrss) * 1024,
            "trials": int(re.search(r"this run (\d+) trials", out).group(1))}


def rank_agreement(model: str, args: argparse.Namespace, work: Path) -> tuple[float, float]:
    """Spearman of stage-1 KL (float32 vs bfloat16) over 16 random candidates, and the largest relative
    difference of the values."""
    from evoprune.evaluators import KLToDense

    values = {}
    cands = None
    for dtype in ("float32", "bfloat16"):
        rt = build_runtime(study_config(model, args, str(work / "cache"), dtype=dtype))
        cands = cands or distinct_random(rt.space, 16, args.seed)
        st = rt.config.stages[0]
        ctx = rt.context.for_stage(st.name, eval_tokens=st.eval_tokens, seq_len=st.seq_len)
        kl = KLToDense()
        kl.prepare(rt.model, ctx)
        vals = []
        for c in cands:
            with rt.pruner.applied(c):
                vals.append(kl.evaluate(rt.model, c, ctx).value)
        values[dtype] = np.array(vals)
        del rt
    a, b = values["float32"], values["bfloat16"]
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    print(f"  stage-1 KL float32 : {np.round(a, 4).tolist()}")
    print(f"  stage-1 KL bfloat16: {np.round(b, 4).tolist()}")
    return float(np.corrcoef(ra, rb)[0, 1]), float(np.max(np.abs(b - a) / a))


def main() -> None:
    ap = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), model=None, threads=1,
                         seq_len=128, device=True)
    ap.add_argument("--models", default="tiny,small,smollm2-135m", help="reference model sizes, comma-separated")
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rank-model", default="smollm2-135m", help="model of the float32/bfloat16 ranking check")
    ap.add_argument("--smoke", action="store_true", help="tiny only, 2 generations: seconds, not minutes")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.generations, args.rank_model = "tiny", 2, "tiny"
    start(args)
    mem_err, time_err = 0.0, 0.0
    print(f"{'model':<14} {'params':>12} {'peak RSS':>10} {'planned':>10} {'err':>6} {'search s':>9} "
          f"{'planned':>9} {'err':>6} {'trials':>6}")
    for size in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="evoprune-bench-plan-") as d:
            r = measure(reference_folder(size), args, Path(d))
        p = r["plan"]
        planned_s = p.seconds_for(args.generations)
        me = abs(p.peak_host_bytes - r["rss"]) / r["rss"]
        te = abs(planned_s - r["seconds"]) / r["seconds"]
        mem_err, time_err = max(mem_err, me), max(time_err, te)
        print(f"{size:<14} {p.params:>12,} {r['rss'] / 2**20:>8.0f}Mi {p.peak_host_bytes / 2**20:>8.0f}Mi {me:>6.2f} "
              f"{r['seconds']:>9.1f} {planned_s:>9.1f} {te:>6.2f} {r['trials']:>6}", flush=True)
        for m in p.memory:
            print(f"    {m['component']:<16} {m['host'] / 2**20:>9.1f} MiB  {m['note']}")
        print(f"    per candidate: " + ", ".join(f"{s['name']} {s['seconds_per_candidate']:.3g} s x {s['candidates']}"
                                              for s in p.stages)
              + f"; per trial in the database {p.trial_overhead_seconds:.3g} s; sampler per generation "
              f"{p.sampler_seconds:.3g} s; dense references "
              f"{sum(s['reference_seconds'] for s in p.stages):.3g} s; setup {p.setup_seconds:.3g} s "
              f"(measured wall incl. setup {r['wall']:.1f} s)")
        print(f"    convergence estimate: {p.generations} generations, {p.search_tokens:,} tokens, "
              f"{p.search_seconds:.0f} s with one worker", flush=True)
    with tempfile.TemporaryDirectory(prefix="evoprune-bench-rank-") as d:
        print(f"ranking in float32 vs bfloat16 on reference:{args.rank_model} (16 random candidates, stage 1):")
        rho, rel = rank_agreement(reference_folder(args.rank_model), args, Path(d))
    print(f"  Spearman {rho:.3f}; largest relative KL difference {rel:.3f}")
    print_targets([("plan_memory_error", mem_err, "<=", 0.25), ("plan_time_error", time_err, "<=", 0.5),
                   ("bf16_stage1_spearman", rho, ">=", 0.95)])


if __name__ == "__main__":
    main()
