"""Compressed levels with reconstruction: SparseGPT sparsity and OBS widths from the level database.

SmolLM2-135M (``reference:smollm2-135m``), one torch thread by default. Data as in
``bench/real_model.py``: calibration tokens from the calibration split (``--calib-sequences`` x
``--seq-len``, the Hessians of SparseGPT / OBS and the Wanda norms), KL on the validation split,
perplexity on the held-out *test* split (``--test-tokens``).

Sparsity (``--sparsities``, default 70 % of the prunable linears' weights zero; the budget is
that uniform setting's ``nonzero_params``): uniform Wanda, uniform SparseGPT, OWL on SparseGPT levels,
and the evolutionary search (``--sparse-tokens`` forward tokens each, first parents OWL + uniform) on
Wanda levels and on SparseGPT levels; uniform SparseGPT with sequential inputs (``level_inputs:
sequential``, its own database; only with ``--sequential``). Per-block levels are the target +- ``--level-span`` steps of
``--level-step``; one SparseGPT level database holds every level of both targets.

Widths (``--width-ratios``, default 0.7 of the params; KV groups + MLP channels in steps of
``--mlp-step``): uniform, and with ``--width-search`` evolutionary (``--width-tokens``), with
``width_method: slice`` and ``obs``. ``--no-widths`` / ``--no-search`` / ``--no-sparsity`` skip parts.

The default size is the one every TARGET needs (70 %, 0.7 params, levels +-1 step: about 12-15
minutes on 2 cores with a cold cache); ``--full`` is the size of ``docs/results.md`` (50 % and 70 %,
0.5 and 0.7 params, +-2 steps, the evolutionary width rows: 35-40 minutes).

Also measured: the level databases' build seconds and bytes, and stage-1 throughput (KL evaluations
incl. apply/revert, candidates/s) against bare forwards of the same candidates in the sparse space,
with per-candidate Wanda masks (before) and with SparseGPT levels from the database (after).

    python bench/levels.py                    # the TARGETs: 12-15 minutes on 2 cores
    python bench/levels.py --full             # every row of docs/results.md: 35-40 minutes
    python bench/levels.py --no-widths --sparse-tokens 10000
    python bench/levels.py --smoke            # seconds, tiny reference model
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time

import torch
from _common import add_common_args, parse_args, print_targets, start
from real_model import Scorer, _config, _evolve, _print_rows, _restrict, _row, _sparse_budget, _throughput

from evoprune._paths import cache_folder
from evoprune.baselines import owl, owl_scores, uniform
from evoprune.data import load_reference_corpus, write_lmeval_tasks
from evoprune.pruning import levels_from_space
from evoprune.search import build_runtime
from evoprune.space import Budget


def _levels(target: float, args) -> tuple[float, ...]:
    return tuple(round(target + j * args.level_step, 9) for j in range(-args.level_span, args.level_span + 1)
                 if 0 < target + j * args.level_step < 1)


def _forget_scores(rt, *contexts) -> None:
    """Drop the KL window cache: it is keyed by candidate, and the same candidate has other weights now."""
    for ctx in (rt.context, *contexts):
        ctx.shared.pop("kl_windows", None)


def _use(rt, space, method: str | None, args, info: dict, *contexts) -> None:
    """Switch the runtime's pruner to ``method``'s levels of ``space`` (None: per-candidate Wanda / slices)."""
    _forget_scores(rt, *contexts)
    if method is None or method == "slice":  # slices need no database: the same weights as the plain strategy
        rt.pruner.use_levels(None)
        return
    kind = "width" if method in ("obs", "slice") else "sparsity"
    settings = levels_from_space(space, sparsity_method=None if kind == "width" else method.split("-")[0],
                                 width_method=method if kind == "width" else None, dtype=args.level_dtype)
    if method == "sparsegpt-seq":  # Hessians from the inputs through the earlier blocks at the same level
        settings = dataclasses.replace(settings, inputs="sequential")
    t0 = time.time()
    rt.pruner.use_levels(settings, cache_dir=cache_folder("levels", args.cache_dir), progress=False)
    lv = rt.pruner.levels
    if lv["digest"] not in info:
        stored = rt.pruner.strategy.db
        elements = sum(int(t.numel()) for i in settings.layers() for t in stored.load(i).values())
        info[lv["digest"]] = dict(method=method, seconds=time.time() - t0, bytes=lv["bytes"], elements=elements,
                                  built=lv["built_layers"], itemsize=stored.dtype.itemsize)
        print(f"  level database {method}: {lv['bytes'] / 2**20:.0f} MiB ({elements:,} stored elements, "
              f"{lv['dtype']}) ready in {time.time() - t0:.0f}s ({lv['built_layers']} layers computed) at {lv['path']}")


def _all_levels(space, args):
    """The sparse space with every level of every target: the one SparseGPT database of the bench."""
    union = tuple(sorted({0.0, *[v for s in args.sparsities for v in _levels(s, args)]}))
    return dataclasses.replace(space, sparsity_levels=union, budget=())


def sparsity_part(rt, args, score, targets, info) -> None:
    space0 = rt.space
    all_levels = _all_levels(space0, args)
    _use(rt, all_levels, "sparsegpt", args, info)
    rt.pruner.use_levels(None)
    t0 = time.time()
    scores = owl_scores(rt.pruner, rt.calib_ids, m=args.owl_m)
    t_owl = time.time() - t0
    results = {}
    for sparsity in args.sparsities:
        space = dataclasses.replace(space0, sparsity_levels=(0.0,) + _levels(sparsity, args))
        space = dataclasses.replace(space, budget=_sparse_budget(space, sparsity))
        rt.space = space
        print(f"\n-- {sparsity:.0%} of the linears' weights zero (levels {space.sparsity_levels[1]:.3f}.."
              f"{space.sparsity_levels[-1]:.3f})")
        rows = [_row("dense", None, 0, 0, score(None), rt, "nonzero_params")]
        u = uniform(space)
        o = owl(space, rt.pruner, scores=scores, lam=args.owl_lambda)
        _use(rt, space, None, args, info, score.kl_ctx)
        rows.append(_row("uniform Wanda", u, 0, 0, score(u), rt, "nonzero_params"))
        if args.search:
            evo, used, sec = _evolve(rt, space, args.sparse_tokens - scores["tokens"], args.seed, args.offspring,
                                     init=[o, u])
            rows.append(_row("evo Wanda", evo, used + scores["tokens"], sec, score(evo), rt, "nonzero_params"))
        _use(rt, all_levels, "sparsegpt", args, info, score.kl_ctx)
        rows.append(_row("uniform SparseGPT", u, 0, 0, score(u), rt, "nonzero_params"))
        rows.append(_row("OWL SparseGPT", o, scores["tokens"], t_owl, score(o), rt, "nonzero_params"))
        if args.sequential:
            _use(rt, all_levels, "sparsegpt-seq", args, info, score.kl_ctx)
            rows.append(_row("uniform SparseGPT seq", u, 0, 0, score(u), rt, "nonzero_params"))
            _use(rt, all_levels, "sparsegpt", args, info, score.kl_ctx)
        if args.search:
            evo, used, sec = _evolve(rt, space, args.sparse_tokens - scores["tokens"], args.seed, args.offspring,
                                     init=[o, u])
            rows.append(_row("evo SparseGPT", evo, used + scores["tokens"], sec, score(evo), rt, "nonzero_params"))
        rt.pruner.use_levels(None)
        _print_rows(rows, "nonzero_params")
        results[sparsity] = {r[0]: r[4] for r in rows}
    top = max(args.sparsities)
    r = results[top]
    tag = round(100 * top)
    targets.append((f"sparsegpt_over_wanda_uniform_{tag}", r["uniform SparseGPT"] / r["uniform Wanda"], "<=", 0.3))
    if args.sequential:
        targets.append((f"sequential_sparsegpt_over_wanda_uniform_{tag}",
                        r["uniform SparseGPT seq"] / r["uniform Wanda"], "<=", 0.3))
    if args.search:
        targets.append((f"evo_sparsegpt_over_uniform_sparsegpt_{tag}", r["evo SparseGPT"] / r["uniform SparseGPT"],
                        "<=", 0.95))
        targets.append((f"evo_sparsegpt_over_evo_wanda_{tag}", r["evo SparseGPT"] / r["evo Wanda"], "<=", 0.3))
    rt.space = space0


def width_part(rt, args, score, targets, info) -> None:
    space0 = rt.space
    base = _restrict(space0, attention="kv_groups", attn_levels=None, mlp=True, mlp_step=args.mlp_step,
                     mlp_min=None, sparsity_levels=(), budget=())
    results = {}
    for ratio in args.width_ratios:
        space = dataclasses.replace(base, budget=(Budget(metric="params", max_ratio=ratio,
                                                         min_ratio=ratio - args.width_band),))
        rt.space = space
        print(f"\n-- widths at {ratio:.2f} of the params (KV groups, MLP channels in steps of {args.mlp_step})")
        rows = [_row("dense", None, 0, 0, score(None), rt)]
        u = uniform(space)
        for method in ("slice", "obs"):
            _use(rt, base, method, args, info, score.kl_ctx)
            rows.append(_row(f"uniform {method}", u, 0, 0, score(u), rt))
            if args.search and args.width_search:
                evo, used, sec = _evolve(rt, space, args.width_tokens, args.seed, args.offspring, init=[u])
                rows.append(_row(f"evo {method}", evo, used, sec, score(evo), rt))
        rt.pruner.use_levels(None)
        _print_rows(rows)
        results[ratio] = {r[0]: r[4] for r in rows}
    top = max(args.width_ratios)
    targets.append((f"obs_over_slice_uniform_width_{round(100 * top)}",
                    results[top]["uniform obs"] / results[top]["uniform slice"], "<=", 0.65))
    rt.space = space0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-sequences", type=int, default=64)
    ap.add_argument("--screen-tokens", type=int, default=256)
    ap.add_argument("--final-tokens", type=int, default=2048)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--sparsities", type=lambda v: [float(x) for x in v.split(",")], default=[0.7])
    ap.add_argument("--level-step", type=float, default=1 / 16)
    ap.add_argument("--level-span", type=int, default=1, help="levels per side of each target")
    ap.add_argument("--sparse-tokens", type=int, default=20_000, help="search budget per method and sparsity")
    ap.add_argument("--owl-m", type=float, default=5.0)
    ap.add_argument("--owl-lambda", type=float, default=0.08)
    ap.add_argument("--width-ratios", type=lambda v: [float(x) for x in v.split(",")], default=[0.7])
    ap.add_argument("--width-search", action="store_true", help="add the evolutionary width rows")
    ap.add_argument("--full", action="store_true",
                    help="the docs/results.md size: --sparsities 0.5,0.7 --width-ratios 0.5,0.7 --level-span 2 "
                         "--width-search (flags given explicitly win)")
    ap.add_argument("--width-band", type=float, default=0.05)
    ap.add_argument("--mlp-step", type=int, default=128)
    ap.add_argument("--width-tokens", type=int, default=20_000, help="search budget per method and ratio")
    ap.add_argument("--no-widths", dest="widths", action="store_false", help="skip the width rows")
    ap.add_argument("--no-sparsity", dest="sparsity", action="store_false",
                    help="skip the sparsity rows (with --no-widths: only the throughput and database lines)")
    ap.add_argument("--no-search", dest="search", action="store_false", help="skip the evolutionary rows")
    ap.add_argument("--sequential", action="store_true",
                    help="add the uniform SparseGPT rows with sequential inputs (level_inputs: sequential; its own "
                         "database, about 17 min to build on 2 cores)")
    ap.add_argument("--level-dtype", default="float32")
    ap.add_argument("--cache-dir", default=None, help="evoprune cache root (the level databases go to levels/)")
    ap.add_argument("--test-tokens", type=int, default=4096)
    ap.add_argument("--cloze-limit", type=int, default=0)
    ap.add_argument("--throughput-candidates", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    add_common_args(ap, model="reference:smollm2-135m", seq_len=128, threads=1)
    if "--full" in (sys.argv[1:] if argv is None else argv):
        ap.set_defaults(sparsities=[0.5, 0.7], width_ratios=[0.5, 0.7], level_span=2, width_search=True)
    args = parse_args(ap, argv, smoke=dict(model="reference:tiny", calib_sequences=4, screen_tokens=64,
                                           final_tokens=128, offspring=2, sparse_tokens=600, width_tokens=600,
                                           mlp_step=16, test_tokens=512, throughput_candidates=2, batch_size=2,
                                           seq_len=64, level_step=0.125, level_span=1, width_search=True))
    t_start = start(args)
    tmp = None
    if args.cache_dir is None and "--smoke" in (sys.argv[1:] if argv is None else argv):
        tmp = tempfile.TemporaryDirectory(prefix="evoprune-bench-levels-")
        args.cache_dir = tmp.name
    space = {"attention": None, "mlp": False, "sparsity_levels": [0.0, *_levels(args.sparsities[0], args)],
             "sparsity_method": None}  # the bench switches the levels itself (_use)
    rt = build_runtime(_config(args, space))
    tasks = tempfile.TemporaryDirectory(prefix="evoprune-bench-tasks-")
    write_lmeval_tasks(tasks.name, load_reference_corpus())
    score = Scorer(rt, args, tasks.name)
    print(f"model {rt.model_path}: {rt.space.spec.num_layers} blocks; torch threads {torch.get_num_threads()}; "
          f"calibration {tuple(rt.calib_ids.shape)}; test windows {tuple(score.windows.shape)}")
    targets: list[tuple[str, float, str, float]] = []
    info: dict[str, dict] = {}

    # stage-1 throughput in a sparse space: per-candidate Wanda masks, then SparseGPT levels from the database
    sparse = dataclasses.replace(rt.space, sparsity_levels=(0.0,) + _levels(args.sparsities[0], args))
    rt.pruner.use_levels(None)
    before, bare_before = _throughput(rt, sparse, args)
    _use(rt, _all_levels(rt.space, args), "sparsegpt", args, info)
    after, bare_after = _throughput(rt, sparse, args)
    rt.pruner.use_levels(None)
    print(f"stage 1 in a sparse space: Wanda masks per candidate {before:.3f} candidates/s vs bare forwards "
          f"{bare_before:.3f} (ratio {before / bare_before:.3f}); SparseGPT levels from the database {after:.3f} vs "
          f"{bare_after:.3f} (ratio {after / bare_after:.3f})")

    if args.sparsity:
        sparsity_part(rt, args, score, targets, info)
    if args.widths:
        width_part(rt, args, score, targets, info)
    print("\nlevel databases:")
    ratio = 0.0
    for digest, d in info.items():
        r = d["bytes"] / (d["elements"] * d["itemsize"])
        ratio = max(ratio, r)
        print(f"  {d['method']:10s} {digest}  {d['bytes'] / 2**20:8.1f} MiB  {d['seconds']:6.0f}s  "
              f"bytes / (elements x {d['itemsize']}) = {r:.4f}")
    targets.append(("stage1_over_bare_forward_sparse", after / bare_after, ">=", 0.85))
    targets.append(("level_db_bytes_over_weights_times_levels", ratio, "<=", 1.05))
    print(f"\ntotal {time.time() - t_start:.0f}s")
    print_targets(targets)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
