"""How well do cheap stage values predict expensive ones?

On the small reference model, for random candidates at one parameter budget
(about 50 % of the dense parameters), computes

* KL to dense on the stage-1 token set (2k tokens), on a middle set (8k) and
  on the final set (64k by default; ``--final-tokens`` scales it down when the
  run must be shorter, and the table says what was used);
* for a subset spread over the stage-1 ranking, KL on a held-out set before and
  after a brief fine-tune (``FineTuned``);

and prints Spearman rank correlations (stage-1 vs final, middle vs final, KL
before vs after fine-tuning), plus, for promotion sizes k, whether the final
best candidate survives a top-k cut at stage 1, and how many of the final top
8 do. The last line is the target: Spearman(stage-1, final) >= 0.7.

    python bench/stage_fidelity.py                   # small reference, 64 candidates (~15 min on 2 busy cores)
    python bench/stage_fidelity.py --final-tokens 16384 --ft-candidates 8
    python bench/stage_fidelity.py --smoke          # seconds: tiny reference model, 4 candidates
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import scipy.stats
import torch
from _common import add_common_args, add_reference_args, distinct_random, parse_args, reference_setup, start


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reference_args(p, candidates=64)
    p.add_argument("--stage1-tokens", type=int, default=2048)
    p.add_argument("--mid-tokens", type=int, default=8192, help="0 to skip the middle stage")
    p.add_argument("--final-tokens", type=int, default=65536)
    p.add_argument("--final-top-k", type=int, default=0, help="top-k KL for the final stage (0: full)")
    p.add_argument("--ft-candidates", type=int, default=16, help="fine-tuned subset size (0 to skip)")
    p.add_argument("--ft-tokens", type=int, default=16384)
    p.add_argument("--ft-lr", type=float, default=1e-4)
    p.add_argument("--ft-eval-tokens", type=int, default=8192)
    add_common_args(p, model=None, seq_len=256, threads=1, device=True)
    return parse_args(p, argv, smoke=dict(size="tiny", candidates=4, stage1_tokens=256, mid_tokens=512,
                                          final_tokens=1024, ft_candidates=2, ft_tokens=256, ft_eval_tokens=256,
                                          seq_len=64))


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when one side is constant."""
    if np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(scipy.stats.spearmanr(a, b).statistic)


def main(argv=None) -> int:
    args = _args(argv)
    start(args)
    from evoprune.evaluators import EvalContext, FineTuned, KLToDense, Pipeline, Stage

    t_start = time.perf_counter()
    device = torch.device(args.device)
    ref = reference_setup(args.size, seq_len=args.seq_len, budget=args.budget, device=device,
                          train=bool(args.ft_candidates))
    model, pruner, space = ref.model, ref.pruner, ref.space
    eval_ids, eval_fp, train_ids, train_fp = ref.eval_ids, ref.eval_fingerprint, ref.train_ids, ref.train_fingerprint
    cands = distinct_random(space, args.candidates, args.seed)
    final_tokens = min(args.final_tokens, (eval_ids.numel() // args.seq_len) * args.seq_len)
    ctx = EvalContext(eval_ids=eval_ids, train_ids=train_ids, data_fingerprint=f"{eval_fp[:16]}-{train_fp[:16]}",
                      pruner=pruner, batch_size=args.batch_size, cache_dir=False, seed=args.seed, device=device)
    top_k = args.final_top_k or None
    stages = [Stage(name="stage1", evaluators=[KLToDense()], eval_tokens=args.stage1_tokens, seq_len=args.seq_len)]
    if args.mid_tokens:
        stages.append(Stage(name="mid", evaluators=[KLToDense()], eval_tokens=args.mid_tokens, seq_len=args.seq_len))
    stages.append(Stage(name="final", evaluators=[KLToDense(top_k=top_k)], eval_tokens=final_tokens,
                        seq_len=args.seq_len))
    pipe = Pipeline(stages)
    t0 = time.perf_counter()
    pipe.prepare(model, ctx)
    prep_s = time.perf_counter() - t0
    setup_s = time.perf_counter() - t_start

    # every candidate through every stage (no promotion: we want all values)
    values: dict[str, list[float]] = {s.name: [] for s in stages}
    seconds: dict[str, float] = {s.name: 0.0 for s in stages}
    for c in cands:
        for s in stages:
            r = pipe.run_stage(s, model, c, ctx)
            values[s.name].append(r.objective)
            seconds[s.name] += r.seconds

    # fine-tune subset: spread over the stage-1 ranking
    ft_rows: dict[int, tuple[float, float, float]] = {}
    ft_s = 0.0
    if args.ft_candidates:
        order = np.argsort(values["stage1"])
        pick = sorted({int(order[round(i * (len(order) - 1) / max(1, args.ft_candidates - 1))])
                       for i in range(min(args.ft_candidates, len(order)))})
        ft_stage = Stage(name="finetune", evaluators=[KLToDense()], eval_tokens=args.ft_eval_tokens,
                         seq_len=args.seq_len)
        ft_pipe = Pipeline([ft_stage])
        ft_pipe.prepare(model, ctx)
        ft_ctx = ft_pipe.stage_context(ft_stage, ctx)
        wrapped = FineTuned([ft_stage.evaluators[0]], tokens=args.ft_tokens, lr=args.ft_lr,
                            batch_size=args.batch_size)
        t0 = time.perf_counter()
        for i in pick:
            before = ft_pipe.run_stage(ft_stage, model, cands[i], ctx).objective
            with pruner.applied(cands[i]):
                pairs = dict(wrapped.evaluate_all(model, cands[i], ft_ctx))
            ft_rows[i] = (before, pairs["kl"].value, pairs["finetune"].value)
        ft_s = time.perf_counter() - t0

    names = [s.name for s in stages]
    print(f"# stage_fidelity: reference={args.size} device={device} threads={torch.get_num_threads()} "
          f"candidates={len(cands)} params band=[{args.budget - 0.05:.2f}, {args.budget:.2f}] seq_len={args.seq_len}")
    print("# tokens: " + ", ".join(f"{s.name}={s.eval_tokens}" for s in stages)
          + (" (final scaled down from 65536)" if final_tokens < 65536 else "")
          + (f", final top_k={top_k}" if top_k else ", final full KL"))
    if ft_rows:
        print(f"# fine-tune: {len(ft_rows)} candidates spread over the stage-1 ranking, {args.ft_tokens} train tokens, "
              f"lr={args.ft_lr}, KL before/after on {args.ft_eval_tokens} held-out tokens")
    print(f"# time: setup {setup_s:.0f}s (dense references {prep_s:.0f}s), "
          + ", ".join(f"{n} {seconds[n]:.0f}s ({seconds[n] / len(cands):.2f}s/cand)" for n in names)
          + (f", fine-tune {ft_s:.0f}s" if ft_rows else ""))
    header = f"{'cand':>4} {'params':>7} " + " ".join(f"{'kl_' + n:>12}" for n in names)
    if ft_rows:
        header += f" {'ft_before':>10} {'ft_after':>10} {'ft_loss':>8}"
    print(header)
    for i, c in enumerate(cands):
        line = f"{i:>4} {space.ratio(c, 'params'):>7.3f} " + " ".join(f"{values[n][i]:>12.5f}" for n in names)
        if i in ft_rows:
            b, a, loss = ft_rows[i]
            line += f" {b:>10.5f} {a:>10.5f} {loss:>8.3f}"
        print(line)

    final = values["final"]
    rho1 = spearman(values["stage1"], final)
    print(f"spearman(stage1 {stages[0].eval_tokens} tok, final {final_tokens} tok) = {rho1:.3f}")
    if args.mid_tokens:
        print(f"spearman(mid {args.mid_tokens} tok, final {final_tokens} tok) = {spearman(values['mid'], final):.3f}")
    if ft_rows:
        idx = sorted(ft_rows)
        b = [ft_rows[i][0] for i in idx]
        a = [ft_rows[i][1] for i in idx]
        print(f"spearman(KL before fine-tune, KL after fine-tune) = {spearman(b, a):.3f} "
              f"(n={len(idx)}; mean KL {np.mean(b):.4f} -> {np.mean(a):.4f})")
        print(f"spearman(stage1 KL, KL after fine-tune) = {spearman([values['stage1'][i] for i in idx], a):.3f}")
    # close calls: rank agreement among the best quarter (by final KL), as in late search generations
    q = max(4, len(final) // 4)
    top_q = np.argsort(final)[:q]
    for n in names[:-1]:
        print(f"spearman({n}, final) among the final best {q} = "
              f"{spearman([values[n][i] for i in top_q], [final[i] for i in top_q]):.3f}")
    best = int(np.argmin(final))
    top8 = set(np.argsort(final)[:8].tolist())
    for n in names[:-1]:
        order = list(np.argsort(values[n]))
        need = order.index(best) + 1
        recall = {k: len(top8 & set(order[:k])) for k in (4, 8, 16, 32) if k <= len(order)}
        print(f"{n}: final best is rank {need} of {len(order)}; final top-8 kept by a top-k cut: "
              + ", ".join(f"k={k}: {v}/8" for k, v in recall.items()))
    print(f"TARGET spearman_stage1_final {rho1:.3f} >= 0.7 {'PASS' if rho1 >= 0.7 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
