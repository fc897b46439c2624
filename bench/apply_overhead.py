#!/usr/bin/env python
"""Bench: cost of evaluating a candidate in place (apply + forward + revert) vs a bare forward
of the same candidate materialized, and peak memory over many apply/revert cycles.

    python bench/apply_overhead.py                 # defaults sized for a 2-core CPU, a few minutes
    python bench/apply_overhead.py --device cuda   # GPU variant (memory from the CUDA allocator)
    python bench/apply_overhead.py --smoke         # seconds: a random-init tiny Llama, small counts

Targets (last lines, one per target):
    TARGET apply_eval_revert_over_materialized_forward <ratio> <= 1.15 PASS|FAIL
    TARGET peak_memory_over_dense_model <ratio> <= 1.5 PASS|FAIL

Timing: several random candidates keeping ~50 % of the decoder-block parameters (non-uniform
heads/KV groups/channels, some dropped sublayers, some with unstructured or 2:4 sparsity).
For each repetition and candidate (shuffled, interleaved) it times
``pruner.apply(c); model(ids); pruner.revert()`` and ``materialized(ids)`` on the same tokens;
the ratio is sum of per-candidate medians (applied) / sum of per-candidate medians
(materialized). The first, cold apply (sparsity masks not yet in the LRU) is reported apart.

Memory: ``tracemalloc`` only sees Python objects, not torch's C++ allocations, so on CPU the
bench reads the process's resident set size from ``/proc/self/status`` (``VmRSS``, and the
high-water mark ``VmHWM``, reset through ``/proc/self/clear_refs`` right before the cycles).
The probe runs in a fresh process whose Pruner loads its scores from the disk cache written
by the timing part, so no calibration pass leaves allocator slack behind. With the model and
pruner resident (``before``) it runs 100 apply/forward/revert cycles (small forward, 20
candidates, half of them sparse, so the mask LRU fills) and reports
``(dense bytes + (peak - before)) / dense bytes``: 1.0 is the bare dense model, the excess is
everything apply/revert keeps or allocates (views, masks, LRU, bookkeeping, allocator slack).
On CUDA the same ratio uses ``torch.cuda.memory_allocated``/``max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _common import parse_args, tiny_llama  # noqa: E402  (bench/ is on sys.path)

from evoprune.space import Candidate, LayerConfig, ModelSpec

# the small reference model's shape (evoprune reference-model --size small)
FALLBACK_SHAPE = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)


def load_small_model(*, build_reference: bool = False, seed: int = 0, tiny: bool = False) -> tuple[Any, str]:
    """The small reference model if it is built (or ``build_reference``), else a random-init Llama
    of the same shape (``tiny``: a random-init tiny Llama, for ``--smoke``). Returns ``(model, description)``."""
    import transformers

    if tiny:
        return tiny_llama(seed), "random-init tiny Llama (--smoke)"

    reason = ""
    try:
        from evoprune.data._reference_model import MARKER_FILE, build_reference_model, reference_model_dir

        try:
            built = (Path(reference_model_dir("small", seed)) / MARKER_FILE).is_file()
        except Exception as exc:  # corpus not available offline, ...
            built, reason = False, f"{type(exc).__name__}: {exc}"
        if built or build_reference:
            path = build_reference_model("small", seed=seed, progress=False)
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            return model.eval(), f"reference model 'small' from {path}"
        reason = reason or "not built yet (run `evoprune reference-model --size small` or pass --build-reference)"
    except ImportError as exc:
        reason = f"evoprune.data unavailable ({exc})"
    cfg = transformers.LlamaConfig(**FALLBACK_SHAPE)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval(), f"random-init Llama of the small reference shape ({reason})"


def block_params(spec: ModelSpec, layer: LayerConfig) -> int:
    """Parameters of one decoder block under ``layer`` (same formula as the cost model)."""
    h, hd = spec.hidden_size, spec.head_dim
    n = 0
    if not layer.attn_dropped:
        nq, nkv = layer.num_q_heads * hd, layer.num_kv_heads * hd
        n += h + 2 * h * nq + 2 * h * nkv + ((nq + 2 * nkv) if spec.qkv_bias else 0) + (h if spec.o_bias else 0)
        n += 2 * hd if spec.qk_norm else 0
    if not layer.mlp_dropped:
        n += h + 3 * h * layer.mlp_channels
    return n


def block_fraction(spec: ModelSpec, cand: Candidate) -> float:
    dense = block_params(spec, spec.dense_layer()) * spec.num_layers
    return sum(block_params(spec, lc) for lc in cand.layers) / dense


def random_half_candidates(spec: ModelSpec, n: int, seed: int, *, sparse_every: int = 3) -> list[Candidate]:
    """``n`` random candidates keeping 45-55 % of the decoder-block parameters (non-uniform
    heads, KV groups and channels, some dropped sublayers); every ``sparse_every``-th also has
    unstructured sparsity on some linears, and one of those uses 2:4."""
    rng = random.Random(seed)
    out: list[Candidate] = []
    while len(out) < n:
        sparse = sparse_every > 0 and len(out) % sparse_every == sparse_every - 1
        pattern = "2:4" if sparse and len(out) // sparse_every % 2 == 1 else "unstructured"
        layers = []
        for _ in range(spec.num_layers):
            drop_attn = rng.random() < 0.1
            drop_mlp = rng.random() < 0.1
            kv = 0 if drop_attn else rng.randint(1, spec.num_kv_heads)
            m = 0 if drop_attn else rng.randint(1, spec.q_per_kv)
            mc = 0 if drop_mlp else rng.randint(spec.intermediate_size // 8, spec.intermediate_size)
            if pattern == "2:4" and mc:
                mc -= mc % 4  # 2:4 needs input widths divisible by 4
            level = 0.0
            if sparse:
                level = 0.5 if pattern == "2:4" else rng.choice((0.0, 0.3, 0.5))
            layers.append(LayerConfig(num_kv_heads=kv, q_per_kv=m, mlp_channels=mc, sparsity=level))
        if all(lc.dropped for lc in layers):
            continue
        cand = Candidate(layers=tuple(layers), sparsity_pattern=pattern)
        if 0.45 <= block_fraction(spec, cand) <= 0.55:
            out.append(cand)
    return out


def forward_flops(spec: ModelSpec, cand: Candidate, seq_len: int) -> float:
    """Forward FLOPs per sequence (2 per multiply-add): every linear, the LM head, and causal
    attention scores/values (average context ``(seq_len + 1) / 2``)."""
    h, hd = spec.hidden_size, spec.head_dim
    per_token = 2.0 * h * spec.vocab_size  # lm_head
    ctx = (seq_len + 1) / 2
    for lc in cand.layers:
        if not lc.attn_dropped:
            nq, nkv = lc.num_q_heads * hd, lc.num_kv_heads * hd
            per_token += 2.0 * (2 * h * nq + 2 * h * nkv)
            per_token += 2.0 * 2 * lc.num_q_heads * hd * ctx
        if not lc.mlp_dropped:
            per_token += 2.0 * 3 * h * lc.mlp_channels
    return per_token * seq_len


def target_line(name: str, value: float, op: str, limit: float) -> str:
    ok = value <= limit if op == "<=" else value >= limit
    return f"TARGET {name} {value:.3f} {op} {limit} {'PASS' if ok else 'FAIL'}"


# -- memory probes ---------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    kb = _status_kb("VmHWM")
    return None if kb is None else kb * 1024


def param_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


MMAP_THRESHOLD = 65536  # bytes; buffers at least this big are mmapped (and unmapped when freed)


def memory_probe(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in a fresh process: model + Pruner (scores from the disk cache, no calibration pass),
    then ``args.cycles`` apply/forward/revert cycles; reports RSS (CPU) or allocator (CUDA) peaks."""
    from evoprune.pruning import Pruner

    device = torch.device(args.device)
    rss_start = rss_bytes()
    model, _ = load_small_model(build_reference=args.build_reference, seed=args.seed, tiny=args.smoke)
    model.to(device)
    spec = ModelSpec.from_config(model.config)
    dense_bytes = param_bytes(model)
    gen = torch.Generator().manual_seed(args.seed)
    calib = torch.randint(0, spec.vocab_size, (args.calib, args.seq_len), generator=gen)
    pruner = Pruner(model, calib.to(device), cache_dir=args.memory_probe)
    if not pruner.cache_hit:
        raise SystemExit("memory probe: expected an importance cache hit")
    pool = random_half_candidates(spec, 20, args.seed + 1, sparse_every=2)
    ids = torch.randint(0, spec.vocab_size, (1, 32), generator=gen).to(device)
    with torch.no_grad():  # warm the kernels / allocator once on the dense model
        model(input_ids=ids, use_cache=False)
    out: dict[str, Any] = {"cycles": args.cycles, "pool": len(pool), "dense_bytes": dense_bytes}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = rss_bytes() or 0
        have_hwm = reset_peak_rss()
    samples = []
    t0 = time.perf_counter()
    for cycle in range(args.cycles):
        pruner.apply(pool[cycle % len(pool)])
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        samples.append(rss_bytes() or 0)
        pruner.revert()
    out["cycle_ms"] = (time.perf_counter() - t0) / args.cycles * 1e3
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        out.update(kind="cuda", before=before, peak=peak)
    else:
        hwm = peak_rss_bytes() if have_hwm else None
        peak = max(hwm or 0, max(samples))
        out.update(kind="cpu", before=before, peak=peak, rss_start=rss_start,
                   peak_source="VmHWM" if hwm else "sampled VmRSS")
    out["ratio"] = (dense_bytes + max(0, peak - before)) / dense_bytes
    out["lru_masks"] = len(pruner.strategy.mask_cache)
    out["lru_bytes"] = pruner.strategy.mask_cache.nbytes
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", type=int, default=6, help="random ~50%% candidates to time")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per candidate (interleaved)")
    ap.add_argument("--batch", type=int, default=8, help="evaluation sequences per forward")
    ap.add_argument("--seq-len", type=int, default=256, help="evaluation sequence length")
    ap.add_argument("--calib", type=int, default=16, help="calibration sequences (seq-len tokens each)")
    ap.add_argument("--cycles", type=int, default=100, help="apply/revert cycles for the memory probe")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 default: stable timings on a shared 2-core machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--build-reference", action="store_true", help="train the small reference model if missing")
    ap.add_argument("--memory-probe", metavar="CACHE_DIR", help=argparse.SUPPRESS)
    args = parse_args(ap, argv, smoke=dict(candidates=2, reps=2, batch=2, seq_len=32, calib=4, cycles=10))

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from evoprune.pruning import Pruner

    if args.memory_probe:
        print(json.dumps(memory_probe(args)))
        return 0
    model, where = load_small_model(build_reference=args.build_reference, seed=args.seed, tiny=args.smoke)
    model.to(device)
    spec = ModelSpec.from_config(model.config)
    dense_bytes = param_bytes(model)
    print(f"model: {where}")
    print(f"  {spec.num_layers} layers, hidden {spec.hidden_size}, {spec.num_heads} heads / {spec.num_kv_heads} kv, "
          f"intermediate {spec.intermediate_size}, vocab {spec.vocab_size}; {dense_bytes / 2**20:.1f} MiB fp32 params")
    print(f"device {device}, torch threads {torch.get_num_threads()}, tokens per forward {args.batch}x{args.seq_len}")

    gen = torch.Generator().manual_seed(args.seed)
    calib = torch.randint(0, spec.vocab_size, (args.calib, args.seq_len), generator=gen)
    ids = torch.randint(0, spec.vocab_size, (args.batch, args.seq_len), generator=gen).to(device)
    import tempfile

    cache_dir = Path(tempfile.mkdtemp(prefix="evoprune-bench-"))
    t0 = time.perf_counter()
    pruner = Pruner(model, calib.to(device), calib_batch_size=4, cache_dir=cache_dir)
    print(f"importance ({pruner.method}, {calib.numel()} calibration tokens): {time.perf_counter() - t0:.2f}s")

    cands = random_half_candidates(spec, args.candidates, args.seed)
    smalls = [pruner.materialize(c) for c in cands]

    def eval_applied(c: Candidate) -> float:
        t = time.perf_counter()
        pruner.apply(c)
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        pruner.revert()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    def eval_small(m: torch.nn.Module) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            m(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    cold = [eval_applied(c) for c in cands]  # first apply computes the sparsity masks
    for m in smalls:
        eval_small(m)
    applied_t: list[list[float]] = [[] for _ in cands]
    small_t: list[list[float]] = [[] for _ in cands]
    rng = random.Random(args.seed)
    for rep in range(args.reps):
        order = list(range(len(cands)))
        rng.shuffle(order)
        for k in order:
            if rep % 2:
                applied_t[k].append(eval_applied(cands[k]))
                small_t[k].append(eval_small(smalls[k]))
            else:
                small_t[k].append(eval_small(smalls[k]))
                applied_t[k].append(eval_applied(cands[k]))

    print()
    print(f"{'cand':>4} {'blocks kept':>11} {'pattern':>12} {'sparse':>6} {'cold ms':>8} {'applied ms':>10} "
          f"{'materialized ms':>15} {'ratio':>6}")
    sum_a = sum_m = 0.0
    ratios = []
    for k, c in enumerate(cands):
        a_med, m_med = statistics.median(applied_t[k]), statistics.median(small_t[k])
        sum_a += a_med
        sum_m += m_med
        ratios.append(a_med / m_med)
        print(f"{k:>4} {block_fraction(spec, c):>10.1%} {c.sparsity_pattern:>12} {str(c.has_sparsity):>6} "
              f"{cold[k] * 1e3:>8.1f} {a_med * 1e3:>10.1f} {m_med * 1e3:>15.1f} {a_med / m_med:>6.3f}")
    overall = sum_a / sum_m
    print(f"overall (sum of medians): applied {sum_a * 1e3:.1f} ms / materialized {sum_m * 1e3:.1f} ms = {overall:.3f}; "
          f"per-candidate max {max(ratios):.3f}")
    bare_apply = []
    for c in cands:
        t = time.perf_counter()
        pruner.apply(c)
        pruner.revert()
        bare_apply.append(time.perf_counter() - t)
    print(f"apply+revert alone (masks cached): median {statistics.median(bare_apply) * 1e3:.2f} ms")

    # -- memory over many apply/revert cycles, in a fresh process ---------------------------------
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", str(cache_dir),
           "--cycles", str(args.cycles), "--seq-len", str(args.seq_len), "--calib", str(args.calib),
           "--threads", str(args.threads), "--device", args.device, "--seed", str(args.seed)]
    if args.build_reference:
        cmd.append("--build-reference")
    if args.smoke:
        cmd.append("--smoke")
    def run_probe(extra_env: dict[str, str]) -> dict[str, Any]:
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **extra_env})
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            raise SystemExit("memory probe failed")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    mib = 2**20
    probes = [("default glibc malloc policy", run_probe({}))]
    if device.type != "cuda":
        probes.append((f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}", run_probe({"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})))
    print()
    first = probes[0][1]
    print(f"memory (fresh process, scores from the disk cache): {first['cycles']} apply/forward/revert cycles "
          f"over {first['pool']} candidates (half sparse), {first['cycle_ms']:.1f} ms per cycle; mask LRU at the end: "
          f"{first['lru_masks']} masks, {first['lru_bytes'] / mib:.2f} MiB bit-packed; dense params "
          f"{first['dense_bytes'] / mib:.1f} MiB")
    print(f"  {'allocator':<34} {'before MiB':>10} {'peak MiB':>9} {'extra MiB':>9} {'ratio':>6}")
    for label, probe in probes:
        extra = max(0, probe["peak"] - probe["before"])
        label = label if probe["kind"] != "cuda" else "CUDA caching allocator (allocated)"
        print(f"  {label:<34} {probe['before'] / mib:>10.1f} {probe['peak'] / mib:>9.1f} {extra / mib:>9.2f} "
              f"{probe['ratio']:>6.3f}   ({probe.get('peak_source', 'max_memory_allocated')})")
    mem_ratio = probes[-1][1]["ratio"]
    if device.type != "cuda":
        print("  ratio = (dense + peak - before) / dense. The default policy's excess is mostly glibc keeping freed")
        print("  tensor buffers in its heap (glibc raises its mmap threshold after big frees; malloc_trim(0) gives")
        print("  it back); with a fixed mmap threshold freed buffers leave the RSS, so that row (the TARGET) tracks")
        print("  what apply/revert really holds: active masks, the packed-mask LRU, per-forward masked weights.")
    print()
    print(target_line("apply_eval_revert_over_materialized_forward", overall, "<=", 1.15))
    print(target_line("peak_memory_over_dense_model", mem_ratio, "<=", 1.5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
