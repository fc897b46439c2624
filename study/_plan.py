"""`plan`: what a study will cost before it starts -- memory per worker, FLOPs and time per candidate,
stage and generation, the expected length of a default-schedule search, and how many workers help.

The plan reads the model's ``config.json`` only (no weights: a Llama-3.1-8B or 70B config file is
enough) and the study config's stages, space and budgets::

    from evoprune.search import StudyConfig
    from evoprune.study import plan
    p = plan(StudyConfig.from_yaml("studies/reference_small.yaml"))             # measures on this CPU
    p = plan(cfg, device="cuda", gpu_memory=80, gpu_tflops=989, gpu_bandwidth=3350)   # an H100's figures
    print("\\n".join(p.lines()))

Memory of one worker, by component (bytes; ``dt`` the study dtype's bytes per element, ``P`` the
dense model's parameters, ``V`` the vocabulary, ``b`` a stage's sequences per forward after
:func:`evoprune.evaluators.KLToDense`, ``T`` its ``seq_len``):

- ``runtime``: Python, torch, transformers, Optuna, the tokenizer and the token data. Measured
  (resident set after loading them) when the plan runs a calibration, else
  :data:`RUNTIME_BYTES`; on a GPU also the CUDA context (:data:`CUDA_CONTEXT_BYTES`, device side).
- ``weights``: ``P * dt`` (the cost model's exact dense parameter count).
- ``load``: loading converts dtypes through the host: a checkpoint stored in another dtype is read
  whole (its bytes, memory-mapped) next to the converted weights -- a transient of the load only.
- ``dense reference``: every stage's reference (:func:`evoprune.evaluators.reference_nbytes`:
  full distribution or top-k), held in host memory up to the cache bound, plus the largest one again
  (its batches and their concatenation coexist while it is computed); all of it on disk.
- ``activations``: the largest stage's forward: fp32 logits twice (``b*T*V*4`` each: the logits and
  the reused log-softmax buffer) plus the logits in the model dtype, hidden states
  ``b*T*(4*H + 3*I)*dt`` and attention scores ``b*heads*T*T*dt``.
- ``calibration``: the importance pass (``calibration.batch_size`` sequences): the base model's
  forward (no logits), fp32 statistics per linear input column and fp32 copies of a block's input
  and output; ``taylor`` runs the whole model with its loss and adds weight gradients, saved
  activations and the logits.
- ``level database``: compressed weights of database-backed levels (SparseGPT levels, OBS widths;
  :meth:`~evoprune.pruning.LevelSettings.nbytes` from the shapes) on disk under the cache; the files
  are memory-mapped and an applied candidate's linears hold one stored level each, so one worker
  keeps about the prunable linears' size in the storage dtype resident (and copies of it on a GPU).
- ``fine-tune``: trained parameters' backup (``dt``), fp32 masters and their gradients when
  ``dt < 4``, model-dtype gradients, AdamW's two fp32 moments (``8`` bytes each parameter), and the
  saved activations and logits of a training step.

Time: the forward FLOPs per token of the cost model (:meth:`~evoprune.space.CostModel.flops` at
the stage's ``seq_len``) for the dense model and for a typical candidate of the budget (the
space's uniform candidate at the first budget's ratio), turned into seconds either by a short
calibration run on this machine (the dense model's forward and KL kernels timed on the stage
shapes) or by device figures
(``gpu_tflops`` at :data:`MFU` of peak, ``gpu_bandwidth`` at :data:`BANDWIDTH_EFFICIENCY`; the
slower of compute and memory traffic per batch). Candidates per stage per generation: the first
stage's ``offspring``; a ``top_k`` promotion ``k``; a racing promotion (``race``) half its
``max_count`` (rounded up; measured on the reference models: 2-3 of 4, 1 of 2); no promotion:
all. A stage that ``extends`` another pays only its new tokens. Besides compute, every trial pays
its database work (claim, trial, candidate and stage rows: timed on a temporary SQLite study with
evoprune's recorder; 0.05 s assumed without a calibration run) and every generation the
sampler's own work (mutation pool, surrogate ranking, budget repair: timed on random scores, no
model involved) -- on the tiny reference model these two are most of a generation.

Convergence (an estimate, not a promise): the default schedule stops once a generation brings no
new incumbent, at least ``patience_fraction`` more tokens were spent since the incumbent took
over than it took to find it, and ``explored`` of the incumbent's one-switch neighbourhood was
proposed. The plan takes the neighbourhood of a typical candidate (``N`` one-up-one-down pairs
of genes of one kind), assumes the incumbent is found after exploring ``explored * N`` neighbours
and the stop needs ``patience_fraction`` as much again: ``G = 1 + ceil((1 + patience_fraction) *
explored * N / offspring) + patience`` generations. A config with ``stop: {n_generations}`` uses
that instead.

Workers: ``w`` workers on one database share a generation's candidates stage by stage
(:class:`~evoprune.search.Searcher` claims), so a generation takes ``sum_s ceil(n_s / w) * t_s``
plus ``ceil(offspring / w)`` trials' database work plus the sampler's seconds.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._logging import get_logger
from .._device import DTYPE_BYTES, torch_dtype_name
from ..search import StudyConfig
from ._plan_measure import (BANDWIDTH_EFFICIENCY, MFU, _available_bytes, _figures_seconds, _measure,
                            _sampler_seconds, _trial_overhead, ckpt_bytes_seconds)

__all__ = ["Plan", "plan"]

_log = get_logger("study.plan")

#: host bytes of a worker process besides the model when the plan measures nothing (Python, torch,
#: transformers, Optuna, SQLAlchemy, a tokenizer and the reference corpus' tokens; measured 0.43 GiB)
RUNTIME_BYTES = 512 * 2**20
#: device bytes of a CUDA context (cuBLAS/cuDNN workspaces included), per worker
CUDA_CONTEXT_BYTES = 600 * 2**20
#: convergence estimate when the config has no usable evolutionary options
_DEFAULT_OFFSPRING = 16


@dataclasses.dataclass
class Plan:
    """What :func:`plan` found; :meth:`lines` prints it, :meth:`to_dict` gives JSON."""

    model: str
    model_type: str
    params: int
    dtype: str
    device: str
    memory: list[dict[str, Any]]
    peak_host_bytes: int
    peak_device_bytes: int
    stages: list[dict[str, Any]]
    setup_seconds: float | None  # loading and the importance calibration (dense references: per stage)
    trial_overhead_seconds: float | None
    sampler_seconds: float | None  # a generation sampler proposing one generation (no model involved)
    generation_seconds: float | None
    generation_tokens: int
    first_generation_seconds: float | None  # the initial candidate(s): no sampler work
    second_generation_seconds: float | None  # the first evolved one: the sampler has no scores yet
    generations: int
    generations_source: str
    search_tokens: int
    search_seconds: float | None
    workers: list[dict[str, Any]]
    time_source: str
    dense_reference_disk_bytes: int
    kv_bytes_per_token: int = 0
    level_database_bytes: int = 0
    gpu_memory_bytes: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        """Whether one worker fits ``gpu_memory`` (``None``: no memory given)."""
        if self.gpu_memory_bytes is None:
            return None
        return self.peak_device_bytes <= self.gpu_memory_bytes

    def seconds_for(self, generations: int) -> float | None:
        """Planned search seconds for ``generations`` generations (dense references included, no setup)."""
        if self.generation_seconds is None or self.first_generation_seconds is None or \
                self.second_generation_seconds is None:
            return None
        ref = sum(s["reference_seconds"] or 0.0 for s in self.stages)
        second = self.second_generation_seconds if generations > 1 else 0.0
        return ref + self.first_generation_seconds + second + max(0, generations - 2) * self.generation_seconds

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        g = lambda b: f"{b / 2**30:.3f} GiB"  # noqa: E731
        s = lambda x: "?" if x is None else (f"{x:.3g} s" if x < 600 else f"{x / 3600:.2f} h")  # noqa: E731
        out = [f"plan for {self.model} ({self.model_type}, {self.params:,} parameters) in {self.dtype} on "
               f"{self.device}; time from {self.time_source}",
               "memory of one worker (peak of loading, calibration and search):",
               f"  {'component':<18} {'host':>12} {'device':>12}  note"]
        for m in self.memory:
            out.append(f"  {m['component']:<18} {g(m['host']):>12} {g(m['device']):>12}  {m['note']}")
        out.append(f"  {'peak':<18} {g(self.peak_host_bytes):>12} {g(self.peak_device_bytes):>12}"
                   + ("" if self.fits is None else f"  {'fits' if self.fits else 'does NOT fit'} in "
                                                  f"{g(self.gpu_memory_bytes)}"))
        out.append(f"dense reference on disk: {g(self.dense_reference_disk_bytes)}; level database: "
                   f"{g(self.level_database_bytes)}; KV cache of the dense model (serving, not the search): "
                   f"{self.kv_bytes_per_token:,} bytes per token")
        out.append(f"  {'stage':<8} {'tokens':>8} {'new':>8} {'seq':>5} {'batch':>5} {'GFLOP/tok':>10} "
                   f"{'cand/gen':>8} {'s/cand':>9} {'reference':>9}")
        for st in self.stages:
            out.append(f"  {st['name']:<8} {st['tokens']:>8} {st['new_tokens']:>8} {st['seq_len']:>5} {st['batch']:>5} "
                       f"{st['flops_per_token'] / 1e9:>10.4g} {st['candidates']:>8} {s(st['seconds_per_candidate']):>9} "
                       f"{s(st['reference_seconds']):>9}")
        out.append(f"setup (load, calibration): {s(self.setup_seconds)}; per trial in the database: "
                   f"{s(self.trial_overhead_seconds)}; the sampler per generation: {s(self.sampler_seconds)}")
        out.append(f"per generation: {self.generation_tokens:,} forward tokens, {s(self.generation_seconds)}")
        out.append(f"search: {self.generations} generations ({self.generations_source}): {self.search_tokens:,} tokens, "
                   f"{s(self.search_seconds)} with one worker")
        if self.workers:
            out.append("workers on one database: " + ", ".join(
                f"{w['workers']}: {s(w['search_seconds'])} (x{w['speedup']:.2f})" for w in self.workers))
        out.extend(f"note: {n}" for n in self.notes)
        return out


# --------------------------------------------------------------------------- inputs


def _model_config(config: StudyConfig) -> tuple[Any, str | None]:
    """The model's transformers config (no weights) and its folder (``None`` for a hub id)."""
    from ..data import REFERENCE_SIZES
    from ..search import load_model_config, resolve_model_path

    model = config.model
    if model.startswith("reference:") and model.partition(":")[2] in REFERENCE_SIZES:
        path = _built_reference(model.partition(":")[2], config.cache_dir)
        if path is None:
            raise ValueError(f"{model} is not built yet; build it once with `evoprune reference-model --size "
                             f"{model.partition(':')[2]}` (the plan reads its config.json).")
    else:
        path = resolve_model_path(model, cache_dir=config.cache_dir)
    cfg = load_model_config(model, path)
    return cfg, (path if Path(path).expanduser().is_dir() else None)


def _built_reference(size: str, cache_dir: str | None) -> str | None:
    from ..data import built_reference_model

    path = built_reference_model(size, cache_dir=cache_dir)
    return None if path is None else str(path)


def _checkpoint_dtype(model_config: Any) -> str:
    return torch_dtype_name("auto", model_config)


def _promoted(promote: Mapping[str, Any] | None, n: int) -> int:
    """Expected candidates a stage sends on out of ``n`` (see the module docstring)."""
    if n <= 0:
        return 0
    if not promote:
        return n
    lo = int(promote.get("min_count", 1) or 0)
    if "top_k" in promote:
        k = int(promote["top_k"])
    elif "top_fraction" in promote:
        k = math.ceil(float(promote["top_fraction"]) * n)
    elif "race" in promote:
        k = math.ceil(int(promote.get("max_count", n) or n) / 2)
    else:
        k = n
    return max(min(k, n), min(lo, n))


def _neighbourhood(space: Any, cand: Any) -> int:
    """One-switch pairs (one gene up a level, another of the same kind down) of ``cand``."""
    levels = space.levels_of(cand)
    by_kind: dict[str, tuple[int, int]] = {}
    for g in space.genes:
        lv = int(levels[g.name])
        up, down = by_kind.get(g.kind, (0, 0))
        by_kind[g.kind] = (up + (lv < g.top), down + (lv > 0))
    return sum(u * d for u, d in by_kind.values())


# --------------------------------------------------------------------------- memory


def _stage_shapes(config: StudyConfig, vocab: int) -> list[tuple[Any, int, int | None]]:
    """``(stage, sequences per forward, top_k)`` of the stages that score tokens."""
    from ..evaluators import KL_LOGITS_BYTES_PER_FORWARD as LOGITS_BYTES_PER_FORWARD, resolve_top_k

    out = []
    for st in config.stages:
        if not st.eval_tokens:
            continue
        b = max(1, min(config.eval_batch_size, LOGITS_BYTES_PER_FORWARD // (st.seq_len * vocab * 4)))
        kl = [e for e in st.evaluators if e["type"] == "kl"]
        top_k = resolve_top_k(kl[0].get("top_k", "auto") if kl else "auto", vocab, st.eval_tokens)
        out.append((st, b, top_k))
    return out


def _forward_bytes(spec: Any, b: int, t: int, dt: int, *, logits_fp32: int = 2) -> int:
    """Working memory of one inference forward of ``b x t`` tokens (see the module docstring)."""
    v, h, i = spec.vocab_size, spec.hidden_size, spec.intermediate_size
    heads = spec.num_heads
    logits = b * t * v * (logits_fp32 * 4 + (dt if dt != 4 else 0))
    return logits + b * t * (4 * h + 3 * i) * dt + b * heads * t * t * dt


def _memory(config: StudyConfig, space: Any, spec: Any, dtype: str, device: str, ckpt_dtype: str,
            runtime_bytes: int) -> tuple[list[dict[str, Any]], int, int, int, int]:
    from ..evaluators import kl_cache_bytes_limit as cache_bytes_limit, reference_nbytes

    dt = DTYPE_BYTES[dtype]
    cuda = device.startswith("cuda")
    params = space.cost_model.params(spec.dense_candidate())
    weights = params * dt
    rows: list[dict[str, Any]] = []

    def add(component: str, host: int, dev: int, note: str, phase: str) -> None:
        rows.append({"component": component, "host": int(host), "device": int(dev), "note": note, "phase": phase})

    add("runtime", runtime_bytes, CUDA_CONTEXT_BYTES if cuda else 0,
        "Python, torch, transformers, Optuna, tokenizer, token data" + (" + CUDA context" if cuda else ""), "all")
    # the weights pass through the host on their way to a GPU
    add("weights", weights, weights if cuda else 0, f"{params:,} parameters x {dt} bytes ({dtype})", "all")
    convert = ckpt_dtype != dtype
    ckpt = params * DTYPE_BYTES.get(ckpt_dtype, 4)
    add("load", ckpt if convert else 0, 0,
        f"checkpoint in {ckpt_dtype} read next to the {dtype} weights" if convert else "weights memory-mapped as stored",
        "load")
    vocab = spec.vocab_size
    shapes = _stage_shapes(config, vocab)
    refs = [reference_nbytes(st.eval_tokens, vocab, k) for st, _, k in shapes]
    ref_total = sum(refs)
    ref_mem = min(ref_total, cache_bytes_limit())
    # computing a reference holds its batches and their concatenation at once: the largest one twice
    add("dense reference", ref_mem + max(refs, default=0), 0, f"{len(shapes)} stage reference(s), "
        + ", ".join(f"{st.name}: {'full' if k is None else f'top-{k}'}" for st, _, k in shapes)
        + (f"; {ref_total / 2**30:.2f} GiB capped at the cache bound" if ref_total > ref_mem else "")
        + "; the largest twice while it is computed", "search")
    act = max((_forward_bytes(spec, b, st.seq_len, dt) for st, b, _ in shapes), default=0)
    big = max(shapes, key=lambda x: _forward_bytes(spec, x[1], x[0].seq_len, dt), default=None)
    add("activations", 0 if cuda else act, act if cuda else 0,
        "" if big is None else f"stage {big[0].name}: {big[1]} x {big[0].seq_len} tokens per forward", "step")
    cal = config.calibration
    bc, tc = cal.batch_size, cal.seq_len
    stats = spec.num_layers * (2 * spec.hidden_size + spec.num_heads * spec.head_dim
                               + spec.intermediate_size) * 4 * 2
    # the base model's forward (no logits) and fp32 copies of a block's input and output (influence)
    calib = _forward_bytes(spec, bc, tc, dt, logits_fp32=0) - bc * tc * vocab * (dt if dt != 4 else 0) + stats \
        + 2 * bc * tc * spec.hidden_size * 4
    note = f"{bc} x {tc} tokens per forward, fp32 statistics"
    if cal.method == "taylor":  # the whole model with its loss (fp32 logits), weight gradients, saved activations
        calib += weights + spec.num_layers * bc * tc * (8 * spec.hidden_size + 4 * spec.intermediate_size) * dt \
            + bc * tc * vocab * (dt + 4)
        note += ", weight gradients and saved activations (taylor)"
    add("calibration", 0 if cuda else calib, calib if cuda else 0, note, "calibration")
    level_bytes = 0
    if space.uses_levels:
        from ..pruning._levels import layer_numel, levels_from_space

        levels = levels_from_space(space)
        level_bytes = levels.nbytes(spec)
        # the files are memory-mapped; an applied candidate's linears hold one stored level each
        linear = spec.num_layers * layer_numel(spec)
        resident = linear * DTYPE_BYTES[levels.dtype]
        add("level database", resident, linear * dt if cuda else 0,
            f"{levels.sparsity_method} sparsity, {levels.width_method} widths, {levels.dtype}: "
            f"{level_bytes / 2**30:.2f} GiB on disk under the cache's levels/, built once before the first trial; "
            "memory-mapped, one level per linear resident", "search")
    else:
        add("level database", 0, 0, "no database-backed levels in this space", "all")
    ft = [st for st in config.stages if st.finetune_tokens]
    fine = 0
    if ft:
        st = max(ft, key=lambda s: s.seq_len * int(s.finetune.get("batch_size", 4)))
        n = params if st.finetune.get("train", "all") == "all" else \
            spec.num_layers * 2 * spec.hidden_size + spec.hidden_size + spec.vocab_size * spec.hidden_size
        master = 4 + 4 if dt != 4 else 0  # fp32 master copy and its gradient
        bf, tf = int(st.finetune.get("batch_size", 4)), st.seq_len
        saved = spec.num_layers * bf * tf * (8 * spec.hidden_size + 4 * spec.intermediate_size) * dt
        fine = n * (dt + master + dt + 8) + saved + bf * tf * vocab * (dt + 4 + 4)
        add("fine-tune", 0 if cuda else fine, fine if cuda else 0,
            f"stage {st.name}: {n:,} trained parameters: backup, {'fp32 masters, ' if master else ''}gradients, "
            f"AdamW moments (fp32), {bf} x {tf} tokens of saved activations", "step")
    else:
        add("fine-tune", 0, 0, "no stage fine-tunes", "step")
    host, dev = _peaks(rows)
    return rows, host, dev, ref_total, level_bytes


def _peaks(rows: list[dict[str, Any]]) -> tuple[int, int]:
    """Peak host and device bytes: the components of every phase plus the largest phase of its own
    (the search: its dense references and the larger of an evaluation forward and a fine-tune step)."""
    out = []
    for side in ("host", "device"):
        base = sum(r[side] for r in rows if r["phase"] == "all")
        search = sum(r[side] for r in rows if r["phase"] == "search") + max(
            (r[side] for r in rows if r["phase"] == "step"), default=0)
        own = {ph: sum(r[side] for r in rows if r["phase"] == ph) for ph in ("load", "calibration")}
        out.append(base + max(search, own["load"], own["calibration"]))
    return out[0], out[1]


# --------------------------------------------------------------------------- the plan


def plan(config: Any, *, device: str | None = None, dtype: str | None = None, gpu_memory: float | None = None,
         gpu_tflops: float | None = None, gpu_bandwidth: float | None = None, measure: bool | None = None,
         trial_seconds: float | None = None) -> Plan:
    """The plan of study ``config`` (a :class:`StudyConfig`, a dict or a YAML/JSON path); see the module
    docstring for every formula.

    Args:
        device, dtype: plan for these instead of the config's (``"cuda"`` plans for a GPU; with
            ``gpu_tflops`` and ``gpu_bandwidth`` this machine need not have one).
        gpu_memory: the GPU's memory in GiB: the plan says whether one worker fits.
        gpu_tflops, gpu_bandwidth: the device's peak dense TFLOPS in the study dtype and its memory
            bandwidth in GB/s; times come from these (at :data:`MFU` and :data:`BANDWIDTH_EFFICIENCY`).
        measure: run the calibration on this machine (default: when no device figures are given,
            the device exists here and the model fits in memory).
        trial_seconds: database seconds per trial (default: measured on a temporary SQLite file when
            measuring, else 0.05 s).

    Raises:
        ValueError: a config, model config, device or dtype that cannot be planned (one line).
    """
    from ..search import space_from_config

    if isinstance(config, (str, os.PathLike)):
        config = StudyConfig.from_file(config)
    elif isinstance(config, Mapping):
        config = StudyConfig.from_dict(config)
    if not isinstance(config, StudyConfig):
        raise TypeError(f"plan needs a StudyConfig, a dict or a config file, got {type(config).__name__}.")
    if (gpu_tflops is None) != (gpu_bandwidth is None):
        raise ValueError("give --gpu-tflops and --gpu-bandwidth together (the card's peak TFLOPS in the study dtype "
                         "and its memory bandwidth in GB/s), or neither to measure on this machine.")
    for name, value in (("gpu_memory", gpu_memory), ("gpu_tflops", gpu_tflops), ("gpu_bandwidth", gpu_bandwidth)):
        if value is not None and not value > 0:
            raise ValueError(f"{name.replace('_', '-')} must be a positive number, got {value:g}.")
    config = config.replace(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
    model_config, folder = _model_config(config)
    from ..search import check_model_config

    check_model_config(config, model_config)
    space = space_from_config(config, model_config)
    spec = space.spec
    dev = config.device if config.device != "auto" else ("cuda" if gpu_tflops is not None else "auto")
    figures = gpu_tflops is not None
    if not figures or measure:
        from .._device import check_device, check_dtype

        dev = check_device(dev)
        dtype_name = check_dtype(config.dtype, dev, model_config)
    else:
        dtype_name = torch_dtype_name(config.dtype, model_config)
    dt = DTYPE_BYTES[dtype_name]
    ckpt_dtype = _checkpoint_dtype(model_config)
    cm = space.cost_model
    dense = spec.dense_candidate()
    params = cm.params(dense)
    weights = params * dt
    shapes = _stage_shapes(config, spec.vocab_size)
    notes: list[str] = []
    if measure is None:
        measure = not figures and weights * 2 < _available_bytes(dev)
        if not figures and not measure:
            notes.append(f"the model ({weights / 2**30:.1f} GiB in {dtype_name}) is too large to time on {dev} here; "
                         "give --gpu-tflops and --gpu-bandwidth for times")
    measured = _measure(config, folder, dtype_name, dev, shapes) if measure else None
    runtime_bytes = measured["runtime_bytes"] if measured else RUNTIME_BYTES
    rows, peak_host, peak_dev, ref_disk, level_bytes = _memory(config, space, spec, dtype_name, dev, ckpt_dtype,
                                                               runtime_bytes)
    if not dev.startswith("cuda"):
        peak_dev = 0

    # a typical candidate of the budget: the mean FLOPs ratio and neighbourhood of a few random ones
    import numpy as np

    rng = np.random.default_rng(config.seed)
    sample = [space.random(rng) for _ in range(8)]
    neighbours = sum(_neighbourhood(space, c) for c in sample) / len(sample)
    options = dict(config.sampler.options) if config.sampler.name == "evolutionary" else {}
    offspring = int(options.get("offspring", _DEFAULT_OFFSPRING))
    n_trials_seconds = trial_seconds
    if n_trials_seconds is None:
        n_trials_seconds = _trial_overhead(config, space) if measured else 0.05
    sampler_first, sampler_s = _sampler_seconds(config, space) if (measured or figures) else (None, None)

    stages, n_in = [], offspring
    prev_tokens: dict[str, int] = {}
    gen_tokens = 0
    first_tokens = 0
    for st, b, top_k in shapes:
        t = st.seq_len
        new = st.eval_tokens - (prev_tokens.get(st.extends, 0) if st.extends else 0)
        prev_tokens[st.name] = st.eval_tokens
        ratio = sum(cm.flops(c, seq_len=t) for c in sample) / len(sample) / cm.flops(dense, seq_len=t)
        flops_tok = cm.flops(dense, seq_len=t)
        n_batches = math.ceil(math.ceil(new / t) / b)
        ref_batches = math.ceil(math.ceil(st.eval_tokens / t) / b)
        if measured:
            t_fwd, t_kern = measured["forward"][(b, t)], measured["kernel"][(b, t, top_k)]
        elif figures:
            t_fwd, t_kern = _figures_seconds(flops_tok, b * t, weights, spec.vocab_size, dt, gpu_tflops, gpu_bandwidth,
                                              spec.num_layers)
        else:
            t_fwd = t_kern = None
        per_cand = None if t_fwd is None else n_batches * (t_fwd * ratio + t_kern)
        ref_s = None if t_fwd is None else ref_batches * (t_fwd + t_kern)
        if st.finetune_tokens and per_cand is not None:
            per_cand += 3 * t_fwd * ratio * st.finetune_tokens / (b * t)  # forward + backward ~ 3 forwards
        stages.append({"name": st.name, "tokens": st.eval_tokens, "new_tokens": new, "seq_len": t, "batch": b,
                       "top_k": top_k, "flops_per_token": flops_tok, "candidate_flops_ratio": ratio,
                       "candidates": n_in, "seconds_per_candidate": per_cand, "reference_seconds": ref_s,
                       "finetune_tokens": st.finetune_tokens})
        gen_tokens += n_in * (new + st.finetune_tokens)
        first_tokens += new + st.finetune_tokens
        n_in = _promoted(st.promote, n_in)
    trials = offspring
    timed = all(s["seconds_per_candidate"] is not None for s in stages)

    def gen_seconds(workers: int, first: bool = False, sampler: float | None = None) -> float | None:
        if not timed:
            return None
        total = sum((1 if first else math.ceil(s["candidates"] / workers)) * s["seconds_per_candidate"]
                    for s in stages)
        return total + (1 if first else math.ceil(trials / workers)) * n_trials_seconds + \
            (0.0 if first else (sampler_s if sampler is None else sampler) or 0.0)

    generation_s, first_s = gen_seconds(1), gen_seconds(1, first=True)
    second_s = gen_seconds(1, sampler=sampler_first)
    patience = options.get("patience", 1)
    if config.stop.n_generations is not None and (patience is None or not options):
        generations, source = config.stop.n_generations, "the config's stop"
    elif options and patience is not None:
        frac, explored = float(options.get("patience_fraction", 0.5)), float(options.get("explored", 0.5))
        generations = 1 + math.ceil((1 + frac) * explored * neighbours / max(1, offspring)) + int(patience)
        source = f"estimated convergence stop: {neighbours:.0f} one-switch neighbours, {offspring} offspring"
        if config.stop.n_generations is not None and config.stop.n_generations < generations:
            generations, source = config.stop.n_generations, "the config's stop (before the estimated convergence)"
    else:
        generations, source = 10, "no stop rule in the config: 10 generations shown"
    search_tokens = first_tokens + (generations - 1) * gen_tokens + sum(s["tokens"] for s in stages)
    calib_s = setup_s = None
    if measured or figures:
        cal = config.calibration
        key = (cal.batch_size, cal.seq_len)
        t_cal = measured["forward"][key] if measured else _figures_seconds(
            cm.flops(dense, seq_len=cal.seq_len), cal.batch_size * cal.seq_len, weights, spec.vocab_size, dt,
            gpu_tflops, gpu_bandwidth, spec.num_layers)[0]
        calib_s = math.ceil(cal.num_sequences / cal.batch_size) * t_cal * (3 if cal.method == "taylor" else 1)
        load_s = measured["load_seconds"] if measured else ckpt_bytes_seconds(params, ckpt_dtype)
        setup_s = load_s + calib_s
    p = Plan(model=config.model, model_type=spec.model_type, params=params, dtype=dtype_name, device=dev,
             memory=rows, peak_host_bytes=peak_host, peak_device_bytes=peak_dev, stages=stages,
             setup_seconds=setup_s, trial_overhead_seconds=n_trials_seconds, sampler_seconds=sampler_s, generation_seconds=generation_s,
             generation_tokens=gen_tokens, first_generation_seconds=first_s, generations=generations,
             generations_source=source, second_generation_seconds=second_s, search_tokens=search_tokens, search_seconds=None, workers=[],
             time_source=("a calibration run on this machine" if measured else
                          f"device figures ({gpu_tflops:g} TFLOPS at {MFU:.0%}, {gpu_bandwidth:g} GB/s at "
                          f"{BANDWIDTH_EFFICIENCY:.0%})" if figures else "nothing (no times)"),
             dense_reference_disk_bytes=ref_disk, level_database_bytes=level_bytes,
             kv_bytes_per_token=cm.kv_bytes(dense) // cm.kv_dtype_bytes * dt,
             gpu_memory_bytes=None if gpu_memory is None else int(gpu_memory * 2**30), notes=notes)
    if timed:
        p.search_seconds = (setup_s or 0.0) + (p.seconds_for(generations) or 0.0)
        best = None
        w = 1
        while w <= max(1, offspring):
            g = gen_seconds(w)
            total = (setup_s or 0.0) + sum(s["reference_seconds"] or 0.0 for s in stages) + first_s + \
                (gen_seconds(w, sampler=sampler_first) if generations > 1 else 0.0) + max(0, generations - 2) * g
            p.workers.append({"workers": w, "generation_seconds": g, "search_seconds": total,
                              "speedup": p.search_seconds / total})
            if best is not None and total > 0.95 * best:
                break
            best = total
            w *= 2
    if p.fits is False:
        p.notes.append("one worker does not fit the GPU: lower eval_batch_size, use top_k KL, bfloat16, or a larger GPU")
    return p
