#!/usr/bin/env python
"""Bench: CPU latency of exported (materialized) pruned models vs the dense model.

    python bench/speedup.py            # defaults sized for a 2-core CPU, a few minutes

Four candidates cut 25 % and 50 % of the decoder-block parameters

* by depth: drop the blocks with the lowest ShortGPT block influence (from the pruner's
  calibration pass), and
* by width: the same KV groups / query heads / MLP channels in every block, chosen so that
  attention and MLP shrink by about the same fraction.

Each is exported with ``Pruner.export`` and loaded back with ``load_pruned`` (what a user
gets), then dense and pruned forwards (prefill, ``--batch`` x ``--seq-len`` tokens, no KV
cache) are timed interleaved; medians are compared. The FLOPs ratio counts every linear,
the LM head and causal attention (scores and values at the average context length).

Targets (last lines, one per candidate): latency ratio <= 1.1 x FLOPs ratio, printed as
``TARGET latency_over_flops_<kind>_<cut> <latency ratio / FLOPs ratio> <= 1.1 PASS|FAIL``; and
what the search's ``Latency`` evaluator reports for the 50 % depth cut (it materializes the
candidate itself and times it against the dense model, prefill, the same tokens):
``TARGET latency_evaluator_depth_50 <ratio> <= 0.85 PASS|FAIL``.

    python bench/speedup.py --smoke    # seconds: a random-init tiny Llama, small counts
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from apply_overhead import (  # noqa: E402  (the benches share their helpers)
    block_params,
    forward_flops,
    load_small_model,
    target_line,
)
from _common import parse_args  # noqa: E402

from evoprune.space import Candidate, LayerConfig, ModelSpec  # noqa: E402


def depth_candidate(spec: ModelSpec, influence: torch.Tensor, cut: float) -> Candidate:
    """Drop the ``round(cut * L)`` blocks with the lowest block influence."""
    n_drop = round(cut * spec.num_layers)
    scores = torch.nan_to_num(influence.float(), nan=0.0)
    order = torch.sort(scores, stable=True).indices.tolist()
    drop = set(order[:n_drop])
    dense, gone = spec.dense_layer(), LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0)
    return Candidate(layers=tuple(gone if i in drop else dense for i in range(spec.num_layers)))


def width_candidate(spec: ModelSpec, cut: float) -> Candidate:
    """One uniform block shape keeping ``1 - cut`` of the block parameters; the attention keep
    fraction is the head configuration closest to ``1 - cut``, the MLP takes the rest."""
    keep = 1.0 - cut
    dense_block = block_params(spec, spec.dense_layer())
    target = keep * dense_block
    best = None
    for kv in range(1, spec.num_kv_heads + 1):
        for m in range(1, spec.q_per_kv + 1):
            frac = kv * m / spec.num_heads
            key = (abs(frac - keep), -kv)
            if best is None or key < best[0]:
                best = (key, kv, m)
    _, kv, m = best
    attn_only = block_params(spec, LayerConfig(num_kv_heads=kv, q_per_kv=m, mlp_channels=0))
    per_channel = 3 * spec.hidden_size
    mc = int(round((target - attn_only - spec.hidden_size) / per_channel / 8)) * 8
    mc = max(8, min(spec.intermediate_size, mc))
    layer = LayerConfig(num_kv_heads=kv, q_per_kv=m, mlp_channels=mc)
    return Candidate(layers=(layer,) * spec.num_layers)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=9, help="timed forwards per model (interleaved)")
    ap.add_argument("--calib", type=int, default=16, help="calibration sequences for the block influence")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 default: stable timings on a shared 2-core machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--build-reference", action="store_true", help="train the small reference model if missing")
    args = parse_args(ap, argv, smoke=dict(batch=2, seq_len=32, reps=2, calib=4))

    torch.set_num_threads(args.threads)
    from evoprune.pruning import Pruner, load_pruned

    model, where = load_small_model(build_reference=args.build_reference, seed=args.seed, tiny=args.smoke)
    spec = ModelSpec.from_config(model.config)
    print(f"model: {where}")
    print(f"  {spec.num_layers} layers, hidden {spec.hidden_size}, {spec.num_heads} heads / {spec.num_kv_heads} kv, "
          f"intermediate {spec.intermediate_size}, vocab {spec.vocab_size}")
    print(f"CPU, torch threads {torch.get_num_threads()}, prefill {args.batch}x{args.seq_len} tokens, {args.reps} reps")
    gen = torch.Generator().manual_seed(args.seed)
    calib = torch.randint(0, spec.vocab_size, (args.calib, args.seq_len), generator=gen)
    ids = torch.randint(0, spec.vocab_size, (args.batch, args.seq_len), generator=gen)
    pruner = Pruner(model, calib, calib_batch_size=4)

    cands = {
        "depth_25": depth_candidate(spec, pruner.importance.block_influence, 0.25),
        "depth_50": depth_candidate(spec, pruner.importance.block_influence, 0.50),
        "width_25": width_candidate(spec, 0.25),
        "width_50": width_candidate(spec, 0.50),
    }
    root = Path(tempfile.mkdtemp(prefix="evoprune-speedup-"))
    models: dict[str, torch.nn.Module] = {"dense": model}
    for name, cand in cands.items():
        models[name] = load_pruned(pruner.export(cand, root / name)).eval()

    def timed(m: torch.nn.Module) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            m(input_ids=ids, use_cache=False)
        return time.perf_counter() - t

    for m in models.values():  # warm-up
        timed(m)
    times: dict[str, list[float]] = {k: [] for k in models}
    rng = random.Random(args.seed)
    for _ in range(args.reps):
        order = list(models)
        rng.shuffle(order)
        for k in order:
            times[k].append(timed(models[k]))

    dense_cand = spec.dense_candidate()
    dense_flops = forward_flops(spec, dense_cand, args.seq_len)
    dense_block = block_params(spec, spec.dense_layer()) * spec.num_layers
    dense_params = sum(p.numel() for p in model.parameters())
    t_dense = statistics.median(times["dense"])
    print()
    print(f"{'model':<9} {'shape':<34} {'block params':>12} {'all params':>10} {'FLOPs':>6} {'ms':>8} "
          f"{'latency':>8} {'lat/FLOPs':>9}")
    print(f"{'dense':<9} {'':<34} {1:>12.1%} {1:>10.1%} {1:>6.3f} {t_dense * 1e3:>8.1f} {1:>8.3f} {1:>9.3f}")
    lines = []
    for name, cand in cands.items():
        kept_block = sum(block_params(spec, lc) for lc in cand.layers) / dense_block
        all_params = sum(p.numel() for p in models[name].parameters()) / dense_params
        flops = forward_flops(spec, cand, args.seq_len) / dense_flops
        lat = statistics.median(times[name]) / t_dense
        if name.startswith("depth"):
            shape = f"{len(cand.kept_layers)}/{spec.num_layers} blocks kept"
        else:
            lc = cand.layers[0]
            shape = f"kv {lc.num_kv_heads} x q {lc.q_per_kv}, mlp {lc.mlp_channels}"
        print(f"{name:<9} {shape:<34} {kept_block:>12.1%} {all_params:>10.1%} {flops:>6.3f} "
              f"{statistics.median(times[name]) * 1e3:>8.1f} {lat:>8.3f} {lat / flops:>9.3f}")
        lines.append(target_line(f"latency_over_flops_{name}", lat / flops, "<=", 1.1))
    print("(FLOPs and latency are ratios to the dense model; the target is latency ratio <= 1.1 x FLOPs ratio)")

    # the search's Latency evaluator on the 50 % depth cut: it materializes the candidate and times it
    # against its own dense timing (medians); its ratio tracks the exported model's
    from evoprune.evaluators import EvalContext, Latency

    lat_eval = Latency(batch_size=args.batch, seq_len=args.seq_len, warmup=1, repeats=args.reps)
    ctx = EvalContext(pruner=pruner)
    lat_eval.prepare(model, ctx)
    with pruner.applied(cands["depth_50"]):
        res = lat_eval.evaluate(model, cands["depth_50"], ctx)
    print(f"Latency evaluator, depth_50: candidate {res.details['candidate_s'] * 1e3:.1f} ms / dense "
          f"{res.details['dense_s'] * 1e3:.1f} ms = {res.value:.3f} (exported model above: "
          f"{statistics.median(times['depth_50']) / t_dense:.3f})")
    lines.append(target_line("latency_evaluator_depth_50", res.value, "<=", 0.85))
    print()
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
