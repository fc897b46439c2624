"""The calibration run of :func:`evoprune.study.plan` (timings on this machine) and the device-figure
time model; the formulas are in :mod:`evoprune.study._plan`'s docstring."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .._logging import get_logger
from .._device import DTYPE_BYTES
from ..search import StudyConfig

_log = get_logger("study.plan")

#: with device figures: share of the peak FLOPs a batched forward reaches (model FLOPs utilization)
MFU = 0.5
#: with device figures: share of the peak memory bandwidth reached
BANDWIDTH_EFFICIENCY = 0.8
#: with device figures: seconds of kernel launches per decoder block and forward (about 15 kernels)
LAUNCH_SECONDS_PER_BLOCK = 15 * 8e-6


def _has_weights(folder: str | None) -> bool:
    if folder is None:
        return False
    p = Path(folder).expanduser()
    return any(p.glob("*.safetensors")) or any(p.glob("*.bin"))


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _median_seconds(fn: Any, reps: int) -> float:
    fn()  # warm-up (allocations, kernels)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _trial_overhead(config: StudyConfig, space: Any, reps: int = 5) -> float:
    """Seconds of one trial's database work on a temporary SQLite study (WAL, as studies open theirs):
    the candidate's claim, ``ask`` with its gene params, the candidate row, one stage record and
    result per stage, the stage history read, ``tell`` -- what a worker pays per candidate besides
    compute (evoprune's own recorder; nothing is evaluated)."""
    import tempfile

    import numpy as np
    import optuna

    from .._optuna_private import trial_id
    from ._study import create_study

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = np.random.default_rng(0)
    dists = space.optuna_distributions()
    names = [st.name for st in config.stages]
    try:
        with tempfile.TemporaryDirectory(prefix="evoprune-plan-") as d, \
                create_study(config, storage=f"sqlite:///{d}/plan.db", study_name="plan") as study:
            rec, opt = study.recorder, study.optuna_study

            def one() -> None:
                cand = space.random(rng)
                rec.claim(cand.key + str(rng.integers(1 << 30)))
                trial = opt.ask(dists)
                tid = trial_id(trial)
                rec.record_candidate(tid, cand)
                for i, name in enumerate(names[:1]):
                    rec.record_stage(tid, name, "kl", 2048, 0.1, 0.01, {"token_set": "plan"})
                    rec.record_stage_result(tid, name, i, 0.1, False)
                    rec.stage_history(name)
                opt.tell(trial, state=optuna.trial.TrialState.PRUNED)

            seconds = _median_seconds(one, reps)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return seconds


def _sampler_seconds(config: StudyConfig, space: Any, generations: int = 2) -> tuple[float, float]:
    """Seconds a generation sampler takes to propose the first evolved generation and a later one
    (mutation pool, surrogate ranking once it has scores, budget repair), timed on random scores;
    0 for Optuna's samplers (per trial, inside the database overhead)."""
    import numpy as np

    from ..search import make_sampler

    sampler, _ = make_sampler(config.sampler.name, config.sampler.options, seed=config.seed, space=space)
    if not hasattr(sampler, "ask_generation"):
        return 0.0, 0.0
    if hasattr(sampler, "setup"):
        sampler.setup(space)
    rng = np.random.default_rng(0)
    times = []
    for g in range(generations + 1):
        start = time.perf_counter()
        props = sampler.ask_generation(lambda key: True)
        if g:
            times.append(time.perf_counter() - start)
        scored = [(p.candidate, float(rng.uniform(0.1, 1.0))) for p in props]
        if hasattr(sampler, "observe_generation"):
            sampler.observe_generation(scored, tokens=1)
        sampler.tell_generation(scored[:2])
    return (times[0], times[-1]) if times else (0.0, 0.0)


def _measure(config: StudyConfig, folder: str | None, dtype: str, device: str, shapes: list, reps: int = 5
             ) -> dict[str, Any]:
    """The calibration run: tokenizer and data, then the model (its weights, or random weights of
    its config), its forward and KL kernels timed on every stage shape, and a database trial."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import load_splits
    from ..evaluators import forward_logits as _forward_logits, kl_kernel
    from .._device import torch_dtype

    out: dict[str, Any] = {}
    tok_src = config.tokenizer or folder
    if tok_src is not None:
        try:
            tok = AutoTokenizer.from_pretrained(tok_src)
            load_splits(config.data, tok, cache_dir=config.cache_dir, vocab_size=None)
        except (OSError, ValueError, KeyError) as exc:
            _log.warning("plan: no tokenizer or data (%s); the runtime memory is measured without them", exc)
    out["runtime_bytes"] = _rss_bytes() + 64 * 2**20  # + the first forward's code and allocator pages
    start = time.perf_counter()
    if _has_weights(folder):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype))
    else:
        from transformers import AutoConfig

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder or config.model),
                                                 dtype=torch_dtype(dtype))
    model.to(device).eval()
    out["load_seconds"] = time.perf_counter() - start
    vocab = int(model.config.vocab_size)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fwd: dict[tuple[int, int], float] = {}
    kern: dict[tuple[int, int, Any], float] = {}
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for st, b, top_k in shapes + [(config.calibration, config.calibration.batch_size, None)]:
            key = (b, st.seq_len)
            ids = torch.randint(0, vocab, key, generator=gen).to(device)
            if key not in fwd:
                fwd[key] = _median_seconds(lambda: (_forward_logits(model, ids), sync()), reps)
            if (b, st.seq_len, top_k) not in kern and hasattr(st, "eval_tokens"):
                kernel = kl_kernel(_forward_logits(model, ids), top_k)
                kern[(b, st.seq_len, top_k)] = _median_seconds(lambda: (kernel(), sync()), reps)
    out["forward"], out["kernel"] = fwd, kern
    del model
    return out


def _figures_seconds(flops_tok: float, tokens: int, weights: int, vocab: int, dt: int, tflops: float,
                     bandwidth: float, blocks: int) -> tuple[float, float]:
    """``(forward, kl kernel)`` seconds of one batch of ``tokens`` tokens from device figures."""
    compute = flops_tok * tokens / (tflops * 1e12 * MFU) + blocks * LAUNCH_SECONDS_PER_BLOCK
    traffic = (weights + tokens * vocab * (dt + 8)) / (bandwidth * 1e9 * BANDWIDTH_EFFICIENCY)
    kernel = tokens * vocab * 12 / (bandwidth * 1e9 * BANDWIDTH_EFFICIENCY)
    return max(compute, traffic), kernel



def ckpt_bytes_seconds(params: int, ckpt_dtype: str, disk_gbps: float = 2.0) -> float:
    """Load seconds assumed with device figures: the checkpoint read at ``disk_gbps`` GB/s."""
    return params * DTYPE_BYTES.get(ckpt_dtype, 4) / (disk_gbps * 1e9)


def _available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return 8 * 2**30
