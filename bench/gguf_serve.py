"""Serving SmolLM2-135M pruned to ~60 % params in llama.cpp: exactness and speed, dense vs pruned.

1. A short evolutionary search (``reference:smollm2-135m``, KV groups + MLP widths + block drops,
   params in [``--budget`` - 0.05, ``--budget``], KL to dense on ``--eval-tokens`` validation tokens,
   ``--generations`` generations of ``--offspring``) -- a real, if brief, search; its best trial is
   exported with ``study.export(..., format="gguf")`` (what ``evoprune export --format gguf`` runs).
2. ``verify_export`` (what ``evoprune verify-export`` runs): the prompt through evoprune's model and
   llama.cpp, ``--steps`` greedy tokens and the max logit difference.
3. llama.cpp speed (``llama-cpp-python``, ``--n-threads`` threads, f32 files) of the dense and the
   pruned GGUF, side by side in one process and interleaved (``--repeats`` rounds, best of each):
   prompt processing of ``--pp`` tokens and generation of ``--tg`` tokens, tokens/s and the ratio.

TARGETs: ``pruned_greedy_match >= 1`` (the 20 greedy tokens identical) and
``pruned_over_dense_gen_time <= params_ratio * 1.15`` (generation time follows the parameter count).

    python bench/gguf_serve.py                      # ~4 min on 2 CPU cores
    python bench/gguf_serve.py --generations 1      # quicker, a less searched candidate
    python bench/gguf_serve.py --smoke              # seconds: the tiny reference model through llama.cpp
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from _common import parse_args, print_targets

from evoprune.pruning import verify_export, write_gguf
from evoprune.pruning._serve import LlamaCppRunner


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="reference:smollm2-135m")
    ap.add_argument("--budget", type=float, default=0.62, help="max params ratio (min is budget - 0.05)")
    ap.add_argument("--generations", type=int, default=10)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--eval-tokens", type=int, default=512, help="KL tokens per candidate")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calib-sequences", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="greedy tokens compared")
    ap.add_argument("--pp", type=int, default=128, help="prompt tokens timed")
    ap.add_argument("--tg", type=int, default=64, help="generated tokens timed")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--n-threads", type=int, default=1, help="llama.cpp threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mlp-step", type=int, default=128, help="MLP channel step of the searched widths")
    return parse_args(ap, argv, smoke=dict(model="reference:tiny", budget=0.8, generations=1, offspring=2,
                                           eval_tokens=128, seq_len=64, calib_sequences=2, steps=4, pp=16, tg=8,
                                           repeats=1, mlp_step=16))


def _config(args: argparse.Namespace) -> dict:
    return {
        "model": args.model,
        "dtype": "float32",
        "device": "cpu",
        "data": {"source": "reference"},
        "calibration": {"num_sequences": args.calib_sequences, "seq_len": args.seq_len},
        "space": {"attention": "kv_groups", "mlp_step": args.mlp_step, "drop_blocks": True},
        "budget": [{"metric": "params", "max_ratio": args.budget, "min_ratio": args.budget - 0.05}],
        "stages": [{"name": "final", "evaluators": ["kl"], "eval_tokens": args.eval_tokens, "seq_len": args.seq_len}],
        "sampler": {"name": "evolutionary", "options": {"offspring": args.offspring, "init": "uniform"}},
        "objectives": ["kl"],
        "stop": {"n_generations": args.generations},
        "seed": args.seed,
        "threads": args.threads,
    }


def _time(runner: LlamaCppRunner, prompt: list[int], tg: int) -> tuple[float, float]:
    """Seconds for processing ``prompt`` and for generating ``tg`` greedy tokens after it."""
    llm = runner.llm
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(tg):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    import optuna

    import evoprune

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="evoprune-gguf-bench-") as tmp:
        print(f"== search: {args.generations} generations x {args.offspring} offspring, KL on {args.eval_tokens} "
              f"tokens, params <= {args.budget}")
        with evoprune.create_study(_config(args), storage=f"sqlite:///{tmp}/bench.db", study_name="gguf",
                                   runtime=True) as study:
            study.run()
            best = study.pareto_front()[0]
            cand = study.candidate(best.number)
            rt = study.runtime
            ratio = rt.space.ratio(cand, "params")
            kept = [cand.layers[i] for i in cand.kept_layers]
            print(f"searched: {len(study.trials())} trials in {time.time() - t_start:.0f} s; best trial {best.number} "
                  f"KL {best.values[0]:.4g}, params ratio {ratio:.3f}, {len(kept)}/{len(cand.layers)} blocks, "
                  f"KV groups {[lc.num_kv_heads for lc in kept]}, MLP {[lc.mlp_channels for lc in kept]}")
            out = study.export(best.number, f"{tmp}/pruned", format="gguf").path
            dense_path = write_gguf(rt.model, f"{tmp}/dense-f32.gguf", tokenizer=rt.tokenizer)
            tokenizer = rt.tokenizer
        pruned_path = os.path.join(out, "model-f32.gguf")
        (res,) = verify_export(out, steps=args.steps, n_threads=args.n_threads)  # float32, as served
        (res64,) = verify_export(out, steps=args.steps, n_threads=args.n_threads, reference_dtype=torch.float64)
        print(f"\n== verify-export {out}: greedy {args.steps} tokens "
              f"{'MATCH' if res.tokens_match else 'DIFFER'}, max logit difference {res.max_logit_diff:.3g}, "
              f"llama.cpp tokenizes the prompt {'alike' if res.tokenizer_match else 'DIFFERENTLY'}; against evoprune's "
              f"model in float64: {'MATCH' if res64.tokens_match else 'DIFFER'}, {res64.max_logit_diff:.3g}")
        print(f"  evoprune : {tokenizer.decode(res.reference_tokens)!r}")
        print(f"  llama.cpp: {tokenizer.decode(res.target_tokens)!r}")

        rng = np.random.default_rng(args.seed)
        prompt = [int(x) for x in rng.integers(100, len(tokenizer) - 100, args.pp)]
        n_ctx = args.pp + args.tg + 8
        runners = {name: LlamaCppRunner(path, n_ctx=n_ctx, n_threads=args.n_threads, f32_cache=False)
                   for name, path in (("dense", dense_path), ("pruned", pruned_path))}  # llama.cpp's default cache
        best_t = {k: [float("inf"), float("inf")] for k in runners}
        for _ in range(args.repeats):
            for name, runner in runners.items():
                pp, tg = _time(runner, prompt, args.tg)
                best_t[name] = [min(best_t[name][0], pp), min(best_t[name][1], tg)]
        for runner in runners.values():
            runner.close()
        sizes = {"dense": os.path.getsize(dense_path), "pruned": os.path.getsize(pruned_path)}
    print(f"\n== llama.cpp speed (f32, {args.n_threads} thread(s), best of {args.repeats}; pp {args.pp} tokens, "
          f"tg {args.tg} tokens)")
    print(f"{'model':<8} {'params ratio':>12} {'file MB':>8} {'pp tok/s':>9} {'tg tok/s':>9}")
    for name, r in (("dense", 1.0), ("pruned", ratio)):
        pp, tg = best_t[name]
        print(f"{name:<8} {r:>12.3f} {sizes[name] / 2**20:>8.1f} {args.pp / pp:>9.1f} {args.tg / tg:>9.1f}")
    pp_ratio = best_t["pruned"][0] / best_t["dense"][0]
    tg_ratio = best_t["pruned"][1] / best_t["dense"][1]
    print(f"pruned/dense time: prompt processing {pp_ratio:.3f}, generation {tg_ratio:.3f} "
          f"(params ratio {ratio:.3f}); total {time.time() - t_start:.0f} s")
    print("candidate: searched (evolutionary, see above), not a fixed rule")
    print_targets([
        ("pruned_greedy_match", float(res.tokens_match and res64.tokens_match), ">=", 1),
        ("pruned_max_logit_diff_vs_float64", res64.max_logit_diff, "<=", 1e-3),
        ("pruned_over_dense_gen_time", tg_ratio, "<=", round(ratio * 1.15, 4)),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
