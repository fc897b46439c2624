"""Stage-1 evaluation throughput versus the bare forward pass of the same models.

For random candidates at one parameter budget of the small reference model,
measures

* stage-1 rate: candidates per second through ``Pipeline.run_stage`` with a
  ``KLToDense`` stage (apply the candidate in place, batched forward passes on
  the stage's tokens, KL against the cached dense distributions, revert);
* bare rate: candidates per second of plain ``model(input_ids)`` forward passes
  of the *materialized* candidate (``pruner.materialize``) on the same tokens in
  the same batches (materialization not timed).

Both are measured interleaved candidate by candidate (so a noisy neighbour
hits both alike), each ``--repeats`` times, keeping the fastest, with one
intra-op thread by default (two OpenMP threads on a shared 2-core machine make
timings erratic; ``--threads 2`` on an idle one). The target: stage-1 rate
>= 0.85 x bare rate. About 2-3 minutes on 2 cores.

    python bench/eval_throughput.py                 # small reference model, 24 candidates, CPU
    python bench/eval_throughput.py --size tiny --candidates 8
    python bench/eval_throughput.py --smoke         # seconds: tiny reference model, 3 candidates
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import add_common_args, add_reference_args, distinct_random, parse_args, reference_setup, start


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reference_args(p, candidates=24)
    p.add_argument("--tokens", type=int, default=2048, help="stage-1 evaluation tokens")
    p.add_argument("--repeats", type=int, default=3)
    add_common_args(p, model=None, seq_len=256, threads=1, device=True)
    return parse_args(p, argv, smoke=dict(size="tiny", candidates=3, tokens=256, repeats=1, seq_len=64))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    args = _args(argv)
    start(args)
    from evoprune.evaluators import EvalContext, KLToDense, Pipeline, Stage

    device = torch.device(args.device)
    t_setup = time.perf_counter()
    ref = reference_setup(args.size, seq_len=args.seq_len, budget=args.budget, device=device)
    model, pruner, space, eval_ids, eval_fp = ref.model, ref.pruner, ref.space, ref.eval_ids, ref.eval_fingerprint
    cands = distinct_random(space, args.candidates, args.seed)
    ctx = EvalContext(eval_ids=eval_ids, data_fingerprint=eval_fp, pruner=pruner, batch_size=args.batch_size,
                      cache_dir=False, seed=args.seed, device=device)
    stage = Stage(name="stage1", evaluators=[KLToDense()], eval_tokens=args.tokens, seq_len=args.seq_len)
    pipe = Pipeline([stage])
    pipe.prepare(model, ctx)
    tokens = pipe.stage_context(stage, ctx).tokens
    setup_s = time.perf_counter() - t_setup

    def stage1(c):
        _sync(device)
        t0 = time.perf_counter()
        res = pipe.run_stage(stage, model, c, ctx)
        _sync(device)
        return time.perf_counter() - t0, res.objective

    def bare(small):
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in tokens.batches(args.batch_size):
                small(input_ids=b.to(device), use_cache=False)
        _sync(device)
        return time.perf_counter() - t0

    # warm-up (allocator, kernels): one of each, untimed
    stage1(cands[0])
    warm = pruner.materialize(cands[0])
    bare(warm)
    del warm

    rows = []
    for i, c in enumerate(cands):
        small = pruner.materialize(c)
        s_times, b_times = [], []
        for _ in range(args.repeats):
            s, kl = stage1(c)
            s_times.append(s)
            b_times.append(bare(small))
        del small
        rows.append((i, space.ratio(c, "params"), kl, min(s_times), min(b_times)))

    print(f"# eval_throughput: reference={args.size} device={device} threads={torch.get_num_threads()} "
          f"candidates={len(cands)} tokens={tokens.num_tokens} seq_len={tokens.seq_len} batch={args.batch_size} "
          f"repeats={args.repeats} (fastest kept) setup={setup_s:.1f}s")
    print(f"{'cand':>4} {'params':>7} {'kl':>9} {'stage1_s':>9} {'bare_s':>9} {'ratio':>6}")
    for i, pr, kl, s, b in rows:
        print(f"{i:>4} {pr:>7.3f} {kl:>9.5f} {s:>9.4f} {b:>9.4f} {b / s:>6.3f}")
    stage_total = sum(r[3] for r in rows)
    bare_total = sum(r[4] for r in rows)
    stage_rate = len(rows) / stage_total
    bare_rate = len(rows) / bare_total
    ratio = stage_rate / bare_rate
    print(f"stage-1 candidates/s: {stage_rate:.3f}   bare forward candidates/s: {bare_rate:.3f}   "
          f"median per-candidate ratio: {statistics.median(r[4] / r[3] for r in rows):.3f}")
    # end-to-end, as a search would call it (one pass, not interleaved)
    t0 = time.perf_counter()
    pipe.run_batch(cands, model, ctx)
    _sync(device)
    e2e = len(cands) / (time.perf_counter() - t0)
    print(f"run_batch end-to-end candidates/s: {e2e:.3f}")
    print(f"TARGET stage1_over_bare_throughput {ratio:.3f} >= 0.85 {'PASS' if ratio >= 0.85 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
