"""Probe Pruning (dynamic, per batch) vs static structured pruning on SmolLM2-135M, side by side.

Model ``reference:smollm2-135m``; calibration and KL tokens from the reference corpus's calibration /
validation splits, perplexity on its held-out *test* split (windows of ``--seq-len``, batches of
``--batch-size``: PP chooses its units per batch of 8 x 256).

Budget: 40 % of the attention-head + MLP-channel weights pruned, in PP's default setting (the
reference code's ``skip_layers``: blocks 0-2 stay dense, the others are pruned more). SmolLM2 has 3 KV
groups of 3 query heads; the uniform setting keeps, in blocks 3-29, 2 query heads in every group (all
KV groups, as PP's reference code, which leaves K/V unpruned under GQA) and 768 of 1536 MLP
channels: 39.4 % of those weights overall. Every other row has at most its parameters. Rows:

* dense;
* static uniform -- the uniform widths, units = the top-k by evoprune's calibration importance
  (``activation``: ``||X||`` per head, ``||X_down|| * ||W_down col||`` per channel: Wanda-structured);
* static FLAP -- FLAP-style per-layer widths (:func:`evoprune.search.flap`: FLAP's fluctuation
  scores, standardized, one global threshold) at the same params, units as above;
* PP uniform / PP FLAP widths -- the same two width settings, units chosen per batch by Probe
  Pruning (reference defaults: probe = 5 % of the sequences x 50 % of the positions, history EMA
  0.99; "FLAP widths" is the reference's ``flapratio`` variant);
* static searched / PP searched -- the evolutionary search over per-layer widths (query heads per
  group, MLP step 64) at params <= the uniform setting, perplexity on validation windows (a screen
  on 4 windows, the final on 8: one batch of 8 x 256; with KL to dense instead, both searches of an
  earlier run ended next to FLAP's widths, whose test perplexity is 2.5x the uniform one's), the same
  number of forward tokens each (``--search-tokens``), first parents = the uniform and the FLAP setting.

Columns: test perplexity; its increase over dense (ppl / dense - 1); measured prefill time vs dense
at batch 8 x 256 and 1 x 512 (random tokens; every row timed in each of ``--repeats`` interleaved
rounds, the minimum counts; PP's probe, scoring and weight gathers included); the probe's share of
the matmul FLOPs of a PP forward (the FLOPs of the same forward with the units held, subtracted;
torch's FlopCounterMode); degradation per unit runtime reduction ``(ppl / dense - 1) / (1 - time /
dense time)`` at 8 x 256 (lower is better; the paper's metric).

TARGETs: ``pp_degradation_per_runtime_over_static`` (the better of PP uniform / PP FLAP widths over
the better of static uniform / static FLAP) ``<= 1.0``; ``searched_pp_ppl_over_uniform_pp <= 0.95``;
``probe_flops_share`` (PP uniform, 8 x 256) ``<= 0.05``.

    python bench/probe_pruning.py            # ~12 min on 2 CPU cores, 1 torch thread
    python bench/probe_pruning.py --smoke    # seconds: the tiny reference model, small counts
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import optuna
import torch
from _common import add_common_args, parse_args, print_targets, start
from torch.utils.flop_counter import FlopCounterMode

from evoprune.data import load_reference_corpus, tokenized_split
from evoprune.evaluators import perplexity
from evoprune.baselines import flap, flap_scores
from evoprune.search import EvolutionarySampler, Searcher, StudyConfig, build_runtime
from evoprune.storage.internal import ATTR_PREFIX
from evoprune.space import Budget, Candidate, LayerConfig, ProbeSettings


def _config(args) -> StudyConfig:
    L = args.seq_len
    return StudyConfig.from_dict({
        "model": args.model,
        "calibration": {"num_sequences": args.calib_sequences, "seq_len": L},
        "space": {"attention": "q_per_group", "mlp_step": args.mlp_step},
        "stages": [
            {"name": "screen", "evaluators": ["ppl"], "eval_tokens": 4 * L, "seq_len": L, "promote": {"top_k": 1}},
            {"name": "final", "evaluators": ["ppl"], "eval_tokens": args.batch_size * L, "seq_len": L},
        ],
        "objectives": ["ppl"],
        "eval_batch_size": args.batch_size,
        "seed": args.seed,
        "threads": args.threads,
    })


def _uniform(spec, mlp: int, dense_blocks: int) -> Candidate:
    """PP's default setting: blocks ``0 .. dense_blocks-1`` dense (the reference's ``skip_layers``), every other
    block keeps ``q_per_kv - 1`` query heads per KV group and ``mlp`` channels."""
    full = LayerConfig(num_kv_heads=spec.num_kv_heads, q_per_kv=spec.q_per_kv, mlp_channels=spec.intermediate_size)
    cut = LayerConfig(num_kv_heads=spec.num_kv_heads, q_per_kv=spec.q_per_kv - 1, mlp_channels=mlp)
    return Candidate(layers=(full,) * dense_blocks + (cut,) * (spec.num_layers - dense_blocks))


def _search(rt, space, tokens: int, init: list[Candidate], args) -> tuple[Candidate, int, float]:
    rt.space = space
    rt.pipeline.prepare(rt.model, rt.context)  # dense references: outside the token budget
    study = optuna.create_study(directions=rt.directions)
    sampler = EvolutionarySampler(offspring=args.offspring, seed=args.seed, init=init, patience=None)
    searcher = Searcher(rt, study, sampler, progress=False)
    t0, used = time.time(), 0
    while used < tokens:
        st = searcher.run(max_tokens=tokens - used)
        used += st.tokens
        if st.tokens == 0 or st.stopped_by in ("exhausted", "converged"):
            break
    best = min((t for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get(ATTR_PREFIX + "stage_reached") == "final" and t.values), key=lambda t: t.values[0])
    return Candidate.from_dict(best.user_attrs[ATTR_PREFIX + "candidate"]), used, time.time() - t0


def _time(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        return time.perf_counter() - t0


def _flops(model, ids: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(ids, use_cache=False)
    return fc.get_total_flops()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-sequences", type=int, default=16)
    ap.add_argument("--test-tokens", type=int, default=6144)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--mlp", type=int, default=768, help="MLP channels kept (of 1536) in the pruned blocks")
    ap.add_argument("--dense-blocks", type=int, default=3, help="leading blocks kept dense (PP's skip_layers 0-2)")
    ap.add_argument("--search-tokens", type=int, default=24_000, help="forward tokens of each search")
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="timing rounds (all rows interleaved; the minimum counts)")
    ap.add_argument("--seq-ratio", type=float, default=0.5, help="PP probe: share of the positions")
    ap.add_argument("--batch-ratio", type=float, default=0.05, help="PP probe: share of the sequences")
    ap.add_argument("--mlp-step", type=int, default=64, help="MLP channel step of the searched widths")
    ap.add_argument("--time-shapes", type=int, nargs=2, default=[8, 256], metavar=("B", "S"),
                    help="timed prefill shapes: B x S and 1 x 2S")
    add_common_args(ap, model="reference:smollm2-135m", seq_len=256, threads=1)
    args = parse_args(ap, argv, smoke=dict(model="reference:tiny", calib_sequences=4, test_tokens=512, batch_size=4,
                                           mlp=112, mlp_step=16, dense_blocks=1, search_tokens=1024, offspring=3, repeats=1,
                                           seq_len=32, time_shapes=[4, 32]))
    t_start = start(args)
    rt = build_runtime(_config(args))
    model, pruner, spec = rt.model, rt.pruner, rt.space.spec
    settings = ProbeSettings(seq_ratio=args.seq_ratio, batch_ratio=args.batch_ratio)
    test_ids, _ = tokenized_split(rt.tokenizer, "test", load_reference_corpus())
    L = args.seq_len
    n = min(args.test_tokens, test_ids.numel()) // L
    windows = test_ids[: n * L].view(n, L)
    g = torch.Generator().manual_seed(args.seed)
    b, s = args.time_shapes  # timed prefill shapes: b x s and 1 x 2s (8 x 256 and 1 x 512 by default)
    big, wide = f"{b}x{s}", f"1x{2 * s}"
    shapes = {big: torch.randint(0, spec.vocab_size, (b, s), generator=g),
              wide: torch.randint(0, spec.vocab_size, (1, 2 * s), generator=g)}
    uni = _uniform(spec, args.mlp, args.dense_blocks)
    space_static = dataclasses.replace(rt.space, budget=(Budget(metric="params", max_value=rt.space.cost(uni, "params")),))
    space_pp = dataclasses.replace(space_static, mode="probe", probe=settings)
    lin = lambda c: sum(lc.num_q_heads * spec.head_dim * spec.hidden_size * 2  # noqa: E731
                        + lc.num_kv_heads * spec.head_dim * spec.hidden_size * 2
                        + 3 * lc.mlp_channels * spec.hidden_size for lc in c.layers)
    print(f"model {rt.model_path}: {spec.num_layers} blocks, {sum(p.numel() for p in model.parameters()):,} params; "
          f"torch threads {torch.get_num_threads()}; test windows {tuple(windows.shape)}; the budget prunes "
          f"{1 - lin(uni) / lin(space_static.dense()):.3f} of the head+MLP weights (uniform: blocks "
          f"0-{args.dense_blocks - 1} dense, then {spec.q_per_kv - 1}/{spec.q_per_kv} query heads per group and "
          f"{args.mlp}/{spec.intermediate_size} channels), params {space_static.ratio(uni, 'params'):.3f} of dense; "
          f"probe {settings.to_dict()}", flush=True)

    t0 = time.time()
    pruner.set_mode("static")
    f_cand = flap(space_static, pruner, scores=flap_scores(pruner, rt.calib_ids))
    t_flap = time.time() - t0
    s_cand, s_used, s_sec = _search(rt, space_static, args.search_tokens, [uni, f_cand], args)
    print(f"  static search {s_used:,} tokens {s_sec:.0f}s", flush=True)
    pruner.set_mode("probe", settings)
    p_cand, p_used, p_sec = _search(rt, space_pp, args.search_tokens, [uni, f_cand], args)
    print(f"  PP search {p_used:,} tokens {p_sec:.0f}s", flush=True)
    plan = [("dense", None, "static", ""), ("static uniform", uni, "static", ""),
            ("static FLAP", f_cand, "static", f"FLAP widths, scores {t_flap:.0f}s"),
            ("PP uniform", uni, "probe", ""), ("PP FLAP widths", f_cand, "probe", "FLAP's widths"),
            ("static searched", s_cand, "static", f"{s_used:,} tok {s_sec:.0f}s"),
            ("PP searched", p_cand, "probe", f"{p_used:,} tok {p_sec:.0f}s")]
    rows: dict[str, dict] = {}

    def applied(cand, mode):
        pruner.set_mode(mode, settings if mode == "probe" else None)
        return pruner.applied(cand) if cand is not None else _nullctx(model)

    for name, cand, mode, extra in plan:
        t0 = time.time()
        with applied(cand, mode):
            ppl = perplexity(model, windows, batch_size=args.batch_size)
            share = {}
            if mode == "probe":
                for k, ids in shapes.items():
                    total = _flops(model, ids)
                    with pruner.probe.hold():
                        held = _flops(model, ids)
                    share[k] = (total - held) / total
        rows[name] = {"ppl": ppl, "share": share, "extra": extra, "times": {k: [] for k in shapes},
                      "params": 1.0 if cand is None else space_static.ratio(cand, "params")}
        print(f"  {name}: ppl {ppl:.2f} ({time.time() - t0:.0f}s)", flush=True)
    for _ in range(args.repeats):  # interleaved rounds: a busy moment on a shared machine hits every row alike
        for name, cand, mode, _extra in plan:
            with applied(cand, mode):
                for k, ids in shapes.items():
                    rows[name]["times"][k].append(_time(model, ids))

    dense = rows["dense"]
    tmin = {name: {k: min(v) for k, v in r["times"].items()} for name, r in rows.items()}
    print(f"\n{'method':<16} {'params':>6} {'test ppl':>9} {'ppl incr':>8} {'t ' + big:>8} {'t ' + wide:>8} "
          f"{'probe FLOPs ' + big + '/' + wide:>24} {'degr/runtime':>12}  notes")
    for name, r in rows.items():
        r["incr"] = r["ppl"] / dense["ppl"] - 1
        r["rel"] = {k: tmin[name][k] / tmin["dense"][k] for k in shapes}
        red = 1 - r["rel"][big]
        r["dpr"] = r["incr"] / red if name != "dense" and red > 0 else float("nan")
        share = "/".join(f"{r['share'][k]:.3f}" for k in shapes) if r["share"] else "-"
        print(f"{name:<16} {r['params']:>6.3f} {r['ppl']:>9.2f} {r['incr']:>8.3f} {r['rel'][big]:>8.3f} "
              f"{r['rel'][wide]:>8.3f} {share:>24} {r['dpr']:>12.3f}  {r['extra']}")
    print(f"(dense prefill: {big} {tmin['dense'][big]:.2f}s, {wide} {tmin['dense'][wide]:.2f}s)")
    for name, c in (("FLAP", f_cand), ("static searched", s_cand), ("PP searched", p_cand)):
        print(f"  {name}: query heads {[lc.num_q_heads for lc in c.layers]}, MLP {[lc.mlp_channels for lc in c.layers]}")
    best = lambda names: min(rows[k]["dpr"] for k in names)  # noqa: E731
    targets = [
        ("pp_degradation_per_runtime_over_static",
         best(("PP uniform", "PP FLAP widths")) / best(("static uniform", "static FLAP")), "<=", 1.0),
        ("searched_pp_ppl_over_uniform_pp", rows["PP searched"]["ppl"] / rows["PP uniform"]["ppl"], "<=", 0.95),
        ("probe_flops_share", rows["PP uniform"]["share"][big], "<=", 0.05),
    ]
    print(f"\ntotal {time.time() - t_start:.0f}s")
    print_targets(targets)
    return 0


class _nullctx:
    def __init__(self, model) -> None:
        self.model = model

    def __enter__(self):
        return self.model

    def __exit__(self, *exc) -> None:
        return None


if __name__ == "__main__":
    sys.exit(main())
