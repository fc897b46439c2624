"""Probe Pruning against its published baselines on SmolLM2-135M (issue 25), with its ablations.

Model ``reference:smollm2-135m`` (9 query heads in 3 KV groups, 1,536 MLP channels, 30 blocks).
Calibration (importance, FLAP, Wanda-sp and the PP history) from the reference corpus's calibration
split; perplexity on its held-out *test* split (windows of ``--seq-len``, batches of ``--batch-size``:
PP chooses its units per batch). For each pruning ratio ``r`` in ``--ratios`` (20 % and 40 % of the
head + MLP weights) the uniform setting is PP's default: blocks ``0 .. --dense-blocks-1`` dense (the
reference's ``skip_layers``), every other block keeps 6 of 9 query heads (K/V whole) and the MLP
channels (a multiple of ``--mlp-step``) that bring the pruned share of head + MLP weights nearest ``r``.
Every other row has at most its parameters. Rows per ratio:

* **Wanda-sp** -- uniform widths, units by ``||X_j|| * sum_i |W_ij|`` (baselines.structured_pruner);
* **FLAP+comp** -- FLAP's fluctuation metric and adaptive widths at the same params, with the bias
  compensation (baselines.with_zero_biases / compensated: transformers' attention_bias / mlp_bias);
* **static searched** -- the evolutionary search over per-layer widths in static mode (evoprune's
  activation importance), perplexity on validation windows, ``--search-tokens`` forward tokens;
* **PP uniform [ref]** / **PP uniform [groups]** -- the uniform widths with Probe Pruning,
  ``gqa: reference`` (K/V whole, heads anywhere, as the reference code) and ``gqa: groups``;
* **PP FLAP ratios** -- FLAP's widths with PP units (the reference's ``flapratio``), ``gqa: reference``;
* **PP searched** -- the same search in probe mode (``gqa: reference``), same token budget;
* ablations of PP uniform [ref]: **history only** (no probe, ``use_probe: false``), **full-batch
  probe** (``seq_ratio = batch_ratio = 1``: the paper's upper bound), **no history**
  (``history: false``), **reset per batch** (the candidate re-applied for every batch, so the
  history never carries from one batch to the next; every other PP row carries it across the
  test batches of one apply).

Columns: test perplexity and its increase over dense; prefill time vs dense at ``B x S`` and
``1 x 2S`` (8 x 256 and 1 x 512; random tokens; every timed row in each of ``--repeats`` interleaved
rounds, the minimum counts; the noise line gives the spread of the dense timings); the probe's share
of the matmul FLOPs (torch's FlopCounterMode, the same forward with the units held subtracted) at
both shapes (reported, not a target); the degradation per runtime reduction
``(ppl / dense - 1) / (1 - time / dense time)`` at ``B x S`` (the paper's metric; inf when the
row is not faster than dense); at the largest ratio the local cloze task through lm-eval in probe
mode (right-padded loglikelihood batches, masked).

TARGETs (at the largest ratio): ``pp_degradation_per_runtime_over_best_static <= 1.0`` (best of the
PP rows over the best of Wanda-sp, FLAP+comp, static searched); ``pp_searched_ppl_over_static_searched
<= 0.9``; ``pp_searched_ppl_over_pp_uniform <= 0.95``; ``padded_equals_unpadded 1 >= 1`` (a
right-padded batch of test windows gives the unpadded logits on the real tokens and the same units).

    python bench/probe_pruning.py            # ~15 min on 2 CPU cores, 1 torch thread
    python bench/probe_pruning.py --smoke    # seconds: the tiny reference model, small counts
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import tempfile
import time

import optuna
import torch
from _common import add_common_args, parse_args, print_targets, start
from torch.utils.flop_counter import FlopCounterMode

from evoprune.baselines import compensated, flap, input_means, structured_pruner, with_zero_biases
from evoprune.data import load_reference_corpus, tokenized_split, write_lmeval_tasks
from evoprune.evaluators import LMEval, perplexity
from evoprune.search import EvolutionarySampler, Searcher, StudyConfig, build_runtime
from evoprune.space import Budget, Candidate, LayerConfig, ProbeSettings
from evoprune.storage.internal import ATTR_PREFIX


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
        "objectives": ["ppl"], "eval_batch_size": args.batch_size, "seed": args.seed, "threads": args.threads,
    })


def _lin(spec, c: Candidate) -> int:
    """Head + MLP weights a candidate keeps (q/o per query head, k/v per KV group, gate/up/down per channel)."""
    hd, D = spec.head_dim, spec.hidden_size
    return sum(lc.num_q_heads * hd * D * 2 + lc.num_kv_heads * hd * D * 2 + 3 * lc.mlp_channels * D for lc in c.layers)


def _uniform(spec, ratio: float, dense_blocks: int, step: int) -> Candidate:
    full = LayerConfig(num_kv_heads=spec.num_kv_heads, q_per_kv=spec.q_per_kv, mlp_channels=spec.intermediate_size)
    dense = Candidate(layers=(full,) * spec.num_layers)
    best = None
    for m in range(step, spec.intermediate_size + 1, step):
        cut = LayerConfig(num_kv_heads=spec.num_kv_heads, q_per_kv=max(1, spec.q_per_kv - 1), mlp_channels=m)
        c = Candidate(layers=(full,) * dense_blocks + (cut,) * (spec.num_layers - dense_blocks))
        gap = abs(1 - _lin(spec, c) / _lin(spec, dense) - ratio)
        if best is None or gap < best[0]:
            best = (gap, c)
    return best[1]


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
    done = [t for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get(ATTR_PREFIX + "stage_reached") == "final" and t.values]
    best = min(done, key=lambda t: t.values[0])
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


def _padded_equals_unpadded(model, pruner, cand, windows: torch.Tensor, real: int, pad: int) -> tuple[int, float]:
    """Two batches from a fresh apply each: the windows cut to ``real`` tokens, then right-padded by ``pad``."""
    ids = windows[:4, :real]
    mask = torch.cat([torch.ones(4, real, dtype=torch.long), torch.zeros(4, pad, dtype=torch.long)], 1)
    padded = torch.cat([ids, torch.zeros(4, pad, dtype=ids.dtype)], 1)
    out = []
    for batch, m in ((ids, None), (padded, mask)):
        with pruner.applied(cand), torch.no_grad():
            logits = model(batch, attention_mask=m, use_cache=False).logits[:, :real]
            batch2 = model(batch, attention_mask=m, use_cache=False).logits[:, :real]  # after one history update
            out.append((logits, batch2, pruner.probe.selections(), pruner.probe.history()))
    (a, a2, sel_a, h_a), (b, b2, sel_b, h_b) = out
    diff = float(max((a - b).abs().max(), (a2 - b2).abs().max()))
    if any(not torch.allclose(h_a[i][k], h_b[i][k], atol=1e-5, rtol=1e-4) for i in h_a for k in h_a[i]):
        return 0, diff
    diff = float((a - b).abs().max())
    same = all(torch.equal(v, sel_b[i][k]) for i, d in sel_a.items() for k, v in d.items())
    return int(same and diff < 1e-3), diff


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4], help="pruned share of head+MLP weights")
    ap.add_argument("--calib-sequences", type=int, default=16)
    ap.add_argument("--test-tokens", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dense-blocks", type=int, default=3, help="leading blocks kept dense (PP's skip_layers 0-2)")
    ap.add_argument("--search-tokens", type=int, default=10_240, help="forward tokens of each search")
    ap.add_argument("--offspring", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2, help="timing rounds (all rows interleaved; the minimum counts)")
    ap.add_argument("--cloze-limit", type=int, default=40, help="cloze items at the largest ratio (0: skip)")
    ap.add_argument("--seq-ratio", type=float, default=0.5, help="PP probe: share of the positions")
    ap.add_argument("--batch-ratio", type=float, default=0.05, help="PP probe: share of the sequences")
    ap.add_argument("--mlp-step", type=int, default=64, help="MLP channel step of the widths")
    ap.add_argument("--time-shapes", type=int, nargs=2, default=[8, 256], metavar=("B", "S"),
                    help="timed prefill shapes: B x S and 1 x 2S")
    add_common_args(ap, model="reference:smollm2-135m", seq_len=256, threads=1)
    args = parse_args(ap, argv, smoke=dict(model="reference:tiny", calib_sequences=4, test_tokens=256, batch_size=4,
                                           mlp_step=16, dense_blocks=1, search_tokens=384, offspring=2, repeats=1,
                                           cloze_limit=4, seq_len=32, time_shapes=[4, 32]))
    for what, ok in (("--ratios", all(0 < r < 1 for r in args.ratios)), ("--test-tokens", args.test_tokens > 0),
                     ("--batch-size", args.batch_size > 0), ("--repeats", args.repeats > 0),
                     ("--search-tokens", args.search_tokens > 0), ("--cloze-limit", args.cloze_limit >= 0)):
        if not ok:
            ap.error(f"{what} out of range (ratios in (0, 1), counts positive)")
    t_start = start(args)
    rt = build_runtime(_config(args))
    model, pruner, spec = rt.model, rt.pruner, rt.space.spec
    calib = rt.calib_ids
    test_ids, _ = tokenized_split(rt.tokenizer, "test", load_reference_corpus())
    L = args.seq_len
    n = max(args.batch_size, min(args.test_tokens, test_ids.numel()) // L)
    windows = test_ids[: n * L].view(n, L)
    g = torch.Generator().manual_seed(args.seed)
    b, s = args.time_shapes
    big, wide = f"{b}x{s}", f"1x{2 * s}"
    shapes = {big: torch.randint(0, spec.vocab_size, (b, s), generator=g),
              wide: torch.randint(0, spec.vocab_size, (1, 2 * s), generator=g)}
    import transformers

    fresh = lambda: transformers.AutoModelForCausalLM.from_pretrained(rt.model_path, dtype=torch.float32).eval()  # noqa: E731
    t0 = time.time()
    wanda = structured_pruner(fresh(), calib, "wanda_sp")
    flap_p = structured_pruner(with_zero_biases(fresh()), calib, "flap")
    means = input_means(flap_p, calib)
    t_scores = time.time() - t0
    base = ProbeSettings(seq_ratio=args.seq_ratio, batch_ratio=args.batch_ratio, gqa="reference")
    variants = {"ref": base, "groups": dataclasses.replace(base, gqa="groups"),
                "full": dataclasses.replace(base, seq_ratio=1.0, batch_ratio=1.0),
                "nohist": dataclasses.replace(base, history=False),
                "histonly": dataclasses.replace(base, use_probe=False)}
    pruner.set_mode("probe", base)
    history = pruner.probe.calib_history  # one dense calibration pass, shared by every variant
    print(f"model {rt.model_path}: {spec.num_layers} blocks, {sum(p.numel() for p in model.parameters()):,} params; "
          f"torch threads {torch.get_num_threads()}; test windows {tuple(windows.shape)}; Wanda-sp/FLAP scores "
          f"{t_scores:.0f}s; probe {base.to_dict()}", flush=True)

    def use(kind: str, cand, variant: str | None = None):
        """A context manager: the row's model with its candidate applied."""
        if kind == "wanda":
            return wanda.applied(cand)
        if kind == "flap":
            return compensated(flap_p, cand, means)
        if cand is None:
            pruner.set_mode("static")
            return contextlib.nullcontext(model)
        if kind == "static":
            pruner.set_mode("static")
        else:
            pruner.set_mode("probe", variants[variant], history=history)
        return pruner.applied(cand)

    rows: dict[str, dict] = {}
    plans: dict[float, list] = {}
    dense_ppl = perplexity(model, windows, batch_size=args.batch_size)
    rows["dense"] = {"ppl": dense_ppl, "plan": ("static", None, None), "timed": True, "share": {}, "extra": "",
                     "params": 1.0}
    for r in args.ratios:
        uni = _uniform(spec, r, args.dense_blocks, args.mlp_step)
        dense_c = rt.space.dense()
        pr = 1 - _lin(spec, uni) / _lin(spec, dense_c)
        space_s = dataclasses.replace(rt.space, budget=(Budget(metric="params", max_value=rt.space.cost(uni, "params")),))
        f_cand = flap(space_s, flap_p, calib)
        pruner.set_mode("static")
        s_cand, s_used, s_sec = _search(rt, space_s, args.search_tokens, [uni, f_cand], args)
        pruner.set_mode("probe", base, history=history)
        p_cand, p_used, p_sec = _search(rt, dataclasses.replace(space_s, mode="probe", probe=base),
                                        args.search_tokens, [uni, f_cand], args)
        tag = f"{round(r * 100)}%"
        print(f"  {tag}: uniform prunes {pr:.3f} of head+MLP weights (MLP {uni.layers[-1].mlp_channels}); "
              f"searches static {s_used:,} tok {s_sec:.0f}s, PP {p_used:,} tok {p_sec:.0f}s", flush=True)
        plan = [("Wanda-sp", ("wanda", uni, None), True, ""), ("FLAP+comp", ("flap", f_cand, None), True, "bias comp."),
                ("static searched", ("static", s_cand, None), True, f"{s_used:,} tok"),
                ("PP uniform [ref]", ("probe", uni, "ref"), True, "gqa reference"),
                ("PP uniform [groups]", ("probe", uni, "groups"), True, "gqa groups"),
                ("PP FLAP ratios", ("probe", f_cand, "ref"), True, "flapratio"),
                ("PP searched", ("probe", p_cand, "ref"), True, f"{p_used:,} tok"),
                ("abl: history only", ("probe", uni, "histonly"), False, "no probe"),
                ("abl: full-batch probe", ("probe", uni, "full"), False, "upper bound"),
                ("abl: no history", ("probe", uni, "nohist"), False, "probe alone"),
                ("abl: reset per batch", ("probe", uni, "ref"), False, "re-applied every batch")]
        plans[r] = plan
        for name, (kind, cand, variant), timed, extra in plan:
            t0 = time.time()
            with use(kind, cand, variant) as m:
                if name == "abl: reset per batch":
                    nll = 0.0
                    for j in range(0, windows.shape[0], args.batch_size):
                        pruner.apply(cand)
                        nll += math.log(perplexity(m, windows[j: j + args.batch_size], batch_size=args.batch_size)) \
                            * windows[j: j + args.batch_size].shape[0]
                    ppl = math.exp(nll / windows.shape[0])
                else:
                    ppl = perplexity(m, windows, batch_size=args.batch_size)
                share = {}
                if name == "PP uniform [ref]":
                    for k, ids in shapes.items():
                        total = _flops(m, ids)
                        with pruner.probe.hold():
                            share[k] = (total - _flops(m, ids)) / total
            rows[f"{tag} {name}"] = {"ppl": ppl, "plan": (kind, cand, variant), "timed": timed, "share": share,
                                     "extra": extra, "params": space_s.ratio(cand, "params"), "ratio": r}
            print(f"  {tag} {name}: ppl {ppl:.2f} ({time.time() - t0:.0f}s)", flush=True)
    for _ in range(args.repeats):  # interleaved rounds: a busy moment on the shared machine hits every row alike
        for row in rows.values():
            if row["timed"]:
                with use(*row["plan"]) as m:
                    for k, ids in shapes.items():
                        row.setdefault("times", {}).setdefault(k, []).append(_time(m, ids))
    top = max(args.ratios)
    tag_top = f"{round(top * 100)}%"
    if args.cloze_limit:
        with tempfile.TemporaryDirectory() as tasks_dir:
            write_lmeval_tasks(tasks_dir, load_reference_corpus())
            from evoprune.data._lmeval_tasks import CLOZE_TASK  # the local cloze task's name

            cloze = LMEval([CLOZE_TASK], metric="acc", include_path=[tasks_dir], include_defaults=False,
                           limit=args.cloze_limit, batch_size=args.batch_size)
            for key in ["dense"] + [f"{tag_top} {k}" for k in ("Wanda-sp", "FLAP+comp", "static searched",
                                                               "PP uniform [ref]", "PP searched")]:
                with use(*rows[key]["plan"]) as m:
                    rows[key]["cloze"] = cloze.evaluate(m, rows[key]["plan"][1], rt.context).value
    pruner.set_mode("probe", base, history=history)
    pad_ok, pad_diff = _padded_equals_unpadded(model, pruner, _uniform(spec, top, args.dense_blocks, args.mlp_step),
                                               windows, min(L, 64) - 8, 24)

    dense = rows["dense"]
    tmin = {k: min(v) for k, v in dense["times"].items()}
    noise = max((max(v) - min(v)) / min(v) for v in dense["times"].values())
    print(f"\n{'method':<26} {'params':>6} {'test ppl':>9} {'incr':>7} {'t ' + big:>8} {'t ' + wide:>8} "
          f"{'probe FLOPs ' + big + '/' + wide:>22} {'degr/rt':>8} {'cloze':>6}  notes")
    for name, row in rows.items():
        row["incr"] = row["ppl"] / dense["ppl"] - 1
        rel = {k: min(row["times"][k]) / tmin[k] for k in shapes} if row["timed"] else {}
        red = 1 - rel[big] if rel else float("nan")
        row["dpr"] = (row["incr"] / red if red > 0 else math.inf) if rel and name != "dense" else float("nan")
        share = "/".join(f"{row['share'][k]:.3f}" for k in shapes) if row["share"] else "-"
        t = lambda k: f"{rel[k]:.3f}" if rel else "-"  # noqa: E731
        cz = f"{row['cloze']:.3f}" if "cloze" in row else "-"
        print(f"{name:<26} {row['params']:>6.3f} {row['ppl']:>9.2f} {row['incr']:>7.3f} {t(big):>8} {t(wide):>8} "
              f"{share:>22} {row['dpr']:>8.3f} {cz:>6}  {row['extra']}")
    print(f"(dense prefill: {big} {tmin[big]:.2f}s, {wide} {tmin[wide]:.2f}s; timing noise: the dense rounds spread "
          f"{noise:.1%}; padded vs unpadded max |logit diff| {pad_diff:.2e})")
    for r in args.ratios:
        tag = f"{round(r * 100)}%"
        for name in ("FLAP+comp", "static searched", "PP searched"):
            c = rows[f"{tag} {name}"]["plan"][1]
            print(f"  {tag} {name}: KV groups {[lc.num_kv_heads for lc in c.layers]}, "
                  f"query heads {[lc.num_q_heads for lc in c.layers]}, "
                  f"MLP {[lc.mlp_channels for lc in c.layers]}")
    R = lambda k: rows[f"{tag_top} {k}"]  # noqa: E731
    best = lambda names: min(R(k)["dpr"] for k in names)  # noqa: E731
    b_static = best(("Wanda-sp", "FLAP+comp", "static searched"))
    b_pp = best(("PP uniform [ref]", "PP FLAP ratios", "PP searched"))
    targets = [
        ("pp_degradation_per_runtime_over_best_static", b_pp / b_static if math.isfinite(b_static) and b_static > 0
         else math.inf, "<=", 1.0),
        ("pp_searched_ppl_over_static_searched", R("PP searched")["ppl"] / R("static searched")["ppl"], "<=", 0.9),
        ("pp_searched_ppl_over_pp_uniform", R("PP searched")["ppl"] / R("PP uniform [ref]")["ppl"], "<=", 0.95),
        ("padded_equals_unpadded", pad_ok, ">=", 1),
    ]
    print(f"\ntotal {time.time() - t_start:.0f}s")
    print_targets(targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
