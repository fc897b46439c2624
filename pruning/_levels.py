"""Compressed levels from a level database: SparseGPT / Wanda / magnitude sparsity, OBS-compensated widths.

:class:`LevelStrategy` is the static strategy (the first ``k`` heads / channels by importance, as
prefix views) whose kept slices hold weights computed once and stored in a
:class:`~._leveldb.LevelDB` instead of the dense ones (it overrides only
:meth:`~._static.StaticStrategy._kept`, so apply, materialize and every export use the same
weights). ``pruner.use_levels(LevelSettings(...))`` switches a pruner to it; the search runtime
does so when the space sets ``sparsity_method`` or ``width_method``.

What the database holds, per decoder block, for the levels the space can choose there
(:func:`levels_from_space`):

* ``"<linear>@s<level>"`` for every linear and sparsity level: the whole (dense-shaped) weight
  compressed by ``sparsity_method`` -- ``sparsegpt`` (:func:`~._obs.sparsegpt`, the Hessian of the
  linear's dense calibration inputs), ``wanda`` or ``magnitude`` (masks only). Every method keeps
  each output row independent, so a candidate's narrower q/k/v/gate/up rows are the same rows of the
  stored weight (a view with the dense slice's strides); fused ``qkv_proj`` / ``gate_up_proj`` are
  compressed whole, which is the same per row.
* ``"<o_proj>@h<kv>x<m>"`` and ``"<down_proj>@c<channels>"`` with ``width_method: obs``: the kept
  input columns updated by least squares to reconstruct the dense output (:func:`~._obs.obs_columns`).

* ``"<o_proj>@h<kv>x<m>@s<level>"`` and ``"<down_proj>@c<channels>@s<level>"`` with
  ``sparsity_method: sparsegpt`` in a space with width genes: SparseGPT run on the width level's
  weight (sliced, or OBS-compensated) with the Hessian of its kept inputs ``H[K, K]``.

Width and sparsity compose like this: sparsity levels are computed on the width level's weights.
q/k/v/gate/up take their rows from the stored sparse weight (rows are independent, so that *is*
SparseGPT of the narrower weight); o_proj / down_proj at a narrower width take the stored pair
above (SparseGPT) or the width level's weight with a Wanda (or magnitude) mask computed on it on
the fly.

Stored zeros are exactly the pruned weights: a kept weight that is (or rounds to, in float16) zero
is stored as the smallest normal number of its sign, so ``weight != 0`` is the keep-mask and the
nonzero counts are exactly the cost model's. Hessians come from the dense model's calibration
inputs (EvoPress's database choice), collected for the layers being built in one calibration pass;
with ``inputs="sequential"`` (SparseGPT's own script) block ``i``'s at level ``s`` come from the
inputs carried through blocks ``0 .. i-1`` with their stored level-``s`` weights, layer by layer on
cached hidden states (:meth:`LevelStrategy._sequential`, built in order).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._logging import get_logger
from ..space import Candidate, LayerConfig
from ._calib import calibration_pass, capture_layer_inputs, run_layer
from ._leveldb import LEVEL_DTYPES, LevelDB
from ._masks import pack_mask, unpack_mask, wanda_mask
from ._obs import obs_columns, sparsegpt, sparsegpt_factor
from ._static import StaticStrategy, _head_index, _LinearPlan, _Part
from ._strategy import LiveModel

__all__ = ["LEVEL_INPUTS", "LEVEL_SPARSITY_METHODS", "LEVEL_WIDTH_METHODS", "LevelSettings", "LevelStrategy", "levels_from_space"]

_log = get_logger("pruning")

LEVEL_SPARSITY_METHODS = ("sparsegpt", "wanda", "magnitude")
LEVEL_WIDTH_METHODS = ("obs", "slice")
LEVEL_INPUTS = ("dense", "sequential")
#: the most bytes of float32 Hessians one calibration pass of a (dense-input) build collects: layers
#: are built in chunks of that size, each chunk one pass over the calibration tokens (SmolLM2-135M: 13.4
#: MB a layer, all 30 in one pass; Llama-3.1-8B: 1.0 GB a layer, 2 per pass)
HESSIAN_BYTES = 2 * 2**30


@dataclasses.dataclass(frozen=True)
class LevelSettings:
    """What a level database holds and how it is computed.

    Args:
        sparsity_method: ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``.
        width_method: ``"obs"`` (least-squares compensated o_proj / down_proj) or ``"slice"``.
        sparsity: ``{block: sparsity levels > 0}`` to store.
        heads: ``{block: ((kv groups, query heads per group), ...)}`` narrower attention widths.
        mlp: ``{block: (channels, ...)}`` narrower MLP widths.
        pattern: ``"unstructured"`` or ``"2:4"``.
        dtype: storage dtype (``"float32"``, ``"float16"``, ``"bfloat16"``).
        blocksize, percdamp: SparseGPT's block size and dampening (fraction of the mean Hessian diagonal).
        obs_percdamp: dampening of the width least squares.
        inputs: where SparseGPT's Hessians come from: ``"dense"`` (default: the dense model's
            calibration inputs, EvoPress's choice) or ``"sequential"`` (per sparsity level ``s``, the
            calibration inputs propagated through the earlier blocks compressed at ``s``, as
            SparseGPT's own script; sparsegpt sparsity only, no OBS widths).
        selection: SparseGPT's unstructured mask choice, ``"row"`` (default: every row keeps its
            cost-model count; measured best on SmolLM2) or ``"block"`` (the reference code's; every
            logical linear keeps exactly its count).
    """

    sparsity_method: str = "sparsegpt"
    width_method: str = "slice"
    sparsity: Mapping[int, tuple[float, ...]] = dataclasses.field(default_factory=dict)
    heads: Mapping[int, tuple[tuple[int, int], ...]] = dataclasses.field(default_factory=dict)
    mlp: Mapping[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    pattern: str = "unstructured"
    dtype: str = "float32"
    blocksize: int = 128
    percdamp: float = 0.01
    obs_percdamp: float = 0.0
    selection: str = "row"
    inputs: str = "dense"

    def __post_init__(self) -> None:
        if self.inputs not in LEVEL_INPUTS:
            raise ValueError(f"level inputs must be one of {LEVEL_INPUTS}, got {self.inputs!r}.")
        if self.inputs == "sequential" and (self.sparsity_method != "sparsegpt" or self.width_method == "obs"):
            raise ValueError("level inputs 'sequential' need sparsity_method sparsegpt and no OBS widths (width_method "
                             "obs is not supported with sequential inputs); use inputs: dense.")
        if self.sparsity_method not in LEVEL_SPARSITY_METHODS:
            raise ValueError(f"sparsity_method must be one of {LEVEL_SPARSITY_METHODS}, got {self.sparsity_method!r}.")
        if self.width_method not in LEVEL_WIDTH_METHODS:
            raise ValueError(f"width_method must be one of {LEVEL_WIDTH_METHODS}, got {self.width_method!r}.")
        if self.dtype not in LEVEL_DTYPES:
            raise ValueError(f"level dtype must be one of {sorted(LEVEL_DTYPES)}, got {self.dtype!r}.")
        if self.selection not in ("row", "block"):
            raise ValueError(f"selection must be 'row' or 'block', got {self.selection!r}.")
        norm = {k: {int(i): tuple(v) for i, v in getattr(self, k).items() if v} for k in ("sparsity", "heads", "mlp")}
        norm["heads"] = {i: tuple(tuple(int(x) for x in h) for h in v) for i, v in norm["heads"].items()}
        for k, v in norm.items():
            object.__setattr__(self, k, v)

    def key(self) -> dict[str, Any]:
        """The level set and method, JSON-able (part of the database key)."""
        width = self.width_method == "obs" or self._pairs()
        return {"method": f"{self.sparsity_method}+{self.width_method}", "pattern": self.pattern,
                "blocksize": self.blocksize, "percdamp": self.percdamp, "obs_percdamp": self.obs_percdamp,
                "selection": self.selection,
                "sparsity": {str(i): list(v) for i, v in sorted(self.sparsity.items())},
                "heads": {str(i): [list(h) for h in v] for i, v in sorted(self.heads.items())} if width else {},
                "mlp": {str(i): list(v) for i, v in sorted(self.mlp.items())} if width else {},
                **({"inputs": self.inputs} if self.inputs != "dense" else {})}  # dense databases keep their key

    def _pairs(self) -> bool:
        """Whether SparseGPT levels of the narrower o_proj / down_proj widths are stored too."""
        return self.sparsity_method == "sparsegpt" and bool(self.sparsity) and bool(self.heads or self.mlp)

    def nbytes(self, spec: Any) -> int:
        """The bytes of the stored tensors of a database of these settings for a model of ``spec`` (a
        :class:`~evoprune.space.ModelSpec`), from shapes alone; the files add a header each."""
        total = 0
        for i in self.layers():
            levels = len(self.sparsity.get(i, ()))
            narrow = sum(_numel(spec.attn_shapes(k, m)[-1:]) for k, m in self.heads.get(i, ())) \
                + sum(_numel(spec.mlp_shapes(c)[-1:]) for c in self.mlp.get(i, ()))  # o_proj, down_proj
            stored_narrow = (self.width_method == "obs") + (levels if self._pairs() else 0)
            total += levels * layer_numel(spec) + narrow * stored_narrow
        return total * LEVEL_DTYPES[self.dtype][0].itemsize

    def layers(self) -> list[int]:
        """The blocks with anything to store."""
        keys = set(self.sparsity) | ((set(self.heads) | set(self.mlp)) if self.width_method == "obs" else set())
        return sorted(keys)


def _numel(shapes: Any) -> int:
    return sum(out_f * in_f for _, out_f, in_f in shapes)


def layer_numel(spec: Any) -> int:
    """The weights of one dense decoder block's prunable linears (q, k, v, o, gate, up, down)."""
    return _numel(spec.attn_shapes(spec.num_kv_heads, spec.q_per_kv) + spec.mlp_shapes(spec.intermediate_size))


def levels_from_space(space: Any, *, sparsity_method: str | None = None, width_method: str | None = None,
                      dtype: str | None = None) -> LevelSettings:
    """The :class:`LevelSettings` of a :class:`~evoprune.space.SearchSpace`: its methods and storage
    dtype (``space.sparsity_method`` ... unless given) and every level its genes can choose, per block."""
    spec = space.spec
    sparsity: dict[int, set[float]] = {}
    heads: dict[int, set[tuple[int, int]]] = {}
    mlp: dict[int, set[int]] = {}
    for g in space.genes:
        if g.kind.endswith("sparsity"):
            sparsity.setdefault(g.layer, set()).update(float(v) for v in g.levels if v > 0)
        elif g.kind == "attn":
            dense = spec.num_kv_heads if space.attention == "kv_groups" else spec.q_per_kv
            units = {int(v) for v in g.levels if 0 < v < dense}
            heads.setdefault(g.layer, set()).update(
                (u, spec.q_per_kv) if space.attention == "kv_groups" else (spec.num_kv_heads, u) for u in units)
        elif g.kind == "mlp":
            mlp.setdefault(g.layer, set()).update(int(v) for v in g.levels if 0 < v < spec.intermediate_size)
    return LevelSettings(
        sparsity_method=sparsity_method or getattr(space, "sparsity_method", None) or "sparsegpt",
        width_method=width_method or getattr(space, "width_method", None) or "slice",
        sparsity={i: tuple(sorted(v)) for i, v in sparsity.items()},
        heads={i: tuple(sorted(v)) for i, v in heads.items()}, mlp={i: tuple(sorted(v)) for i, v in mlp.items()},
        pattern="2:4" if space.pattern_2_4 else "unstructured",
        dtype=dtype or getattr(space, "level_dtype", None) or "float32",
        inputs=getattr(space, "level_inputs", None) or "dense")


def _s(level: float) -> str:
    return repr(float(level))


def _keep_nonzero(w: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w`` with pruned entries exactly 0 and kept entries never 0 once stored in ``dtype``."""
    tiny = torch.finfo(dtype).tiny
    rounded = w.to(dtype)
    fix = keep & (rounded == 0)
    if fix.any():
        w = torch.where(fix, torch.where(w < 0, -tiny, tiny).to(w.dtype), w)
    return torch.where(keep, w, torch.zeros_like(w))


class LevelStrategy(StaticStrategy):
    """The static strategy with stored, compressed weights in the kept slices (see the module docs)."""

    mode = "static"

    def __init__(self, live: LiveModel, settings: LevelSettings, *, mask_cache_bytes: int | None = None,
                 progress: bool = False, cache_dir: str | os.PathLike[str] | None = None) -> None:
        if not isinstance(settings, LevelSettings):
            raise TypeError(f"LevelStrategy needs LevelSettings, got {type(settings).__name__}.")
        super().__init__(live, None, mask_cache_bytes=mask_cache_bytes)
        self.levels = settings
        self.cache_dir = None if cache_dir is None else str(Path(cache_dir).expanduser())
        self._db_params: list[nn.Parameter] = []
        key = {"model": live.model_fingerprint, "calibration": live.data_fingerprint,
               "calib_shape": None if live.calib_ids is None else list(live.calib_ids.shape),
               "model_type": live.spec.model_type, **settings.key()}
        if settings.sparsity_method == "sparsegpt" or settings.width_method == "obs":
            if live.calib_ids is None:
                raise ValueError(f"{settings.sparsity_method}/{settings.width_method} levels need calibration "
                                 "tokens; give the Pruner calib_ids or use sparsity_method: magnitude.")
        self.db = LevelDB(cache_dir, key, live.spec.num_layers, dtype=settings.dtype)
        self._build(progress)

    # -- building ----------------------------------------------------------------------------------
    def _groups(self, i: int) -> dict[str, str]:
        """Linear attribute name -> its input group (``attn_in``, ``o_in``, ``mlp_in``, ``down_in``)."""
        a = self.live.adapter
        out = {n: "attn_in" for n in ([a.qkv] if a.qkv else [a.q, a.k, a.v])}
        out[a.o] = "o_in"
        out.update({n: "mlp_in" for n in ([a.gate_up] if a.gate_up else [a.gate, a.up])})
        out[a.down] = "down_in"
        return out

    def _row_parts(self, name: str) -> list[int]:
        """Rows of each logical linear in linear ``name`` (q, k, v of a fused ``qkv_proj``; gate, up)."""
        a, s = self.live.adapter, self.live.spec
        rows = self.live.refs[0].weight[name].shape[0]
        if name == a.qkv:
            nkv = s.num_kv_heads * s.head_dim
            return [rows - 2 * nkv, nkv, nkv]
        if name == a.gate_up:
            return [rows // 2, rows // 2]
        return [rows]

    def _hessians(self, layers: list[int]) -> dict[tuple[int, str], torch.Tensor]:
        """``X^T X`` of every input group of ``layers`` on the dense model's calibration inputs."""
        live, a = self.live, self.live.adapter
        hs: dict[tuple[int, str], torch.Tensor] = {}
        hooks = []
        for i in layers:
            r = live.refs[i]
            first = {"attn_in": a.qkv or a.q, "o_in": a.o, "mlp_in": a.gate_up or a.gate, "down_in": a.down}
            for group, name in first.items():
                def fn(x: torch.Tensor, key=(i, group)) -> None:
                    x = x.detach().reshape(-1, x.shape[-1]).float()  # on the model's device
                    h = x.T @ x
                    hs[key] = hs[key] + h if key in hs else h
                hooks.append((r.linears[name], fn))
        assert live.calib_ids is not None
        calibration_pass(live.model, live.calib_ids, hooks, batch_size=live.calib_batch_size)
        return hs

    def _compute(self, i: int, hs: dict[tuple[int, str], torch.Tensor],
                 levels: tuple[float, ...] | None = None) -> dict[str, torch.Tensor]:
        """Layer ``i``'s stored tensors (sparsity ``levels``: default all of the layer's) from the Hessians ``hs``."""
        st, live = self.levels, self.live
        r, a, s = live.refs[i], live.adapter, live.spec
        dt = self.db.dtype
        out: dict[str, torch.Tensor] = {}
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        sparse = st.sparsity.get(i, ()) if levels is None else levels
        for name, group in self._groups(i).items():
            w = r.weight[name].detach().float()
            if st.sparsity_method == "sparsegpt" and sparse:
                if group not in factors:  # one factorisation per input group, for every level
                    factors[group] = sparsegpt_factor(hs[(i, group)], st.percdamp)
                # every level at once (stacked); each logical part keeps its count
                parts = [sparsegpt(p, None, sparse, st.pattern, blocksize=st.blocksize, return_mask=True,
                                   factor=factors[group], selection=st.selection)
                         for p in w.split(self._row_parts(name), 0)]
                for k, level in enumerate(sparse):
                    new, keep = torch.cat([p[k][0] for p in parts]), torch.cat([p[k][1] for p in parts])
                    out[f"{name}@s{_s(level)}"] = _keep_nonzero(new, keep, dt)
                continue
            norm = None if st.sparsity_method == "magnitude" else live.input_norms[group][i]
            for level in sparse:
                keep, new = wanda_mask(w, norm, level, st.pattern), w
                keep = torch.ones(w.shape, dtype=torch.bool, device=w.device) if keep is None else keep
                out[f"{name}@s{_s(level)}"] = _keep_nonzero(new, keep, dt)
        obs, pairs = st.width_method == "obs", st.sparsity_method == "sparsegpt" and bool(sparse)
        if not (obs or pairs):
            return out
        narrow = [(a.o, "o_in", f"{a.o}@h{kv}x{m}", _head_index(kv, m, s.q_per_kv, s.head_dim))
                  for kv, m in st.heads.get(i, ())]
        narrow += [(a.down, "down_in", f"{a.down}@c{mc}", torch.arange(mc)) for mc in st.mlp.get(i, ())]
        for name, group, key, kept in narrow:
            w, h = r.weight[name].detach().float(), hs[(i, group)]
            kept = kept.to(w.device)
            base = obs_columns(w, h, kept, percdamp=st.obs_percdamp) if obs else w[:, kept].contiguous()
            if obs and levels is None:
                out[key] = base
            if pairs:  # sparsegpt levels of the narrower weight: the Hessian of its kept inputs
                stacked = sparsegpt(base, None, sparse, st.pattern, blocksize=st.blocksize, return_mask=True,
                                    factor=sparsegpt_factor(h[kept][:, kept], st.percdamp), selection=st.selection)
                for level, (new, keep) in zip(sparse, stacked, strict=True):
                    out[f"{key}@s{_s(level)}"] = _keep_nonzero(new, keep, dt)
        return out

    def _sequential(self) -> Any:
        """``compute(i)`` of a sequential build (see :class:`LevelSettings`): per sparsity level, the
        calibration hidden states are carried layer by layer (each decoder layer called on its own with
        the keyword arguments of one dense pass); block ``i``'s Hessians at level ``s`` come from its
        linears' inputs with the block dense, on the states that went through blocks ``0 .. i-1`` with
        their *stored* level-``s`` weights (dense where a block has no level ``s``). Layers are built in
        order, so a resumed build re-propagates through the finished layers' stored weights."""
        st, live, a = self.levels, self.live, self.live.adapter
        levels = sorted({v for vs in st.sparsity.values() for v in vs})
        state: dict[str, Any] = {"pos": 0}
        first = {"attn_in": a.qkv or a.q, "o_in": a.o, "mlp_in": a.gate_up or a.gate, "down_in": a.down}

        @torch.no_grad()
        def forward(j: int, hidden: list[torch.Tensor], level: float | None, hook: Any = None) -> list[torch.Tensor]:
            """Layer ``j`` on ``hidden`` (with its stored ``level`` weights, dense for ``None``); its outputs."""
            r = live.refs[j]
            swap = {n: self._stored(j, f"{n}@s{_s(level)}", r.weight[n]) for n in self._groups(j)} \
                if level is not None else {}
            saved = {n: r.weight[n].detach().clone() for n in swap}
            handles = [] if hook is None else [r.linears[n].register_forward_pre_hook(hook(g)) for g, n in first.items()]
            try:
                for n, w in swap.items():
                    r.weight[n].data.copy_(w)
                return [run_layer(r.layer, h, kw) for h, kw in zip(hidden, state["kw"][j], strict=True)]
            finally:
                for hnd in handles:
                    hnd.remove()
                for n, w in saved.items():
                    r.weight[n].data.copy_(w)

        def compute(i: int) -> dict[str, torch.Tensor]:
            if "h" not in state:
                assert live.calib_ids is not None
                h0, kw = capture_layer_inputs(live.model, [r.layer for r in live.refs], live.calib_ids,
                                              batch_size=live.calib_batch_size)
                state.update(h={level: h0 for level in levels}, kw=kw)
            while state["pos"] < i:  # every level's states through the finished layer (stored weights)
                j, have = state["pos"], st.sparsity.get(state["pos"], ())
                state["h"] = {level: forward(j, h, level if any(math.isclose(level, v) for v in have) else None)
                              for level, h in state["h"].items()}
                state["pos"] += 1
            out: dict[str, torch.Tensor] = {}
            for level in st.sparsity.get(i, ()):
                hs: dict[tuple[int, str], torch.Tensor] = {}

                def hook(group: str) -> Any:
                    def fn(module: nn.Module, args: tuple) -> None:
                        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                        hs[(i, group)] = hs[(i, group)] + x.T @ x if (i, group) in hs else x.T @ x
                    return fn

                forward(i, state["h"][level], None, hook)  # the block dense, on its inputs at this level
                out.update(self._compute(i, hs, (level,)))
            return out

        return compute

    def _build(self, progress: bool) -> None:
        layers = self.levels.layers()
        need_h = self.levels.sparsity_method == "sparsegpt" or self.levels.width_method == "obs"
        cache: dict[tuple[int, str], torch.Tensor] = {}
        bar = None
        if progress and layers:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(layers), desc="level database", unit="layer", leave=False)

        s = self.live.spec
        per_layer = 4 * (2 * s.hidden_size ** 2 + (s.num_heads * s.head_dim) ** 2 + s.intermediate_size ** 2)

        def compute(i: int) -> dict[str, torch.Tensor]:
            if need_h and not any(k[0] == i for k in cache):
                # one calibration pass for as many of the next unfinished layers as HESSIAN_BYTES holds
                todo = [j for j in layers if j > i and not self.db.done(j)]
                cache.clear()
                cache.update(self._hessians([i] + todo[: max(0, HESSIAN_BYTES // per_layer - 1)]))
            out = self._compute(i, cache)
            for g in ("attn_in", "o_in", "mlp_in", "down_in"):
                cache.pop((i, g), None)
            return out

        sequential = self.levels.inputs == "sequential"
        try:
            built = self.db.build(layers, self._sequential() if sequential else compute, ordered=sequential,
                                  progress=None if bar is None else bar.update)
        finally:
            if bar is not None:
                bar.close()
        for i in layers:  # map every layer now: the first candidates pay no page faults
            self.db.load(i)
        _log.info("level database ready", extra={"fields": {**self.db.info(), "layers": len(layers),
                                                            "computed": len(built)}})

    # -- the strategy ------------------------------------------------------------------------------
    def check(self, candidate: Candidate) -> None:
        st, s = self.levels, self.live.spec
        if candidate.sparsity_pattern != st.pattern and any(
                lc.sparsity_of(n) > 0 for lc in candidate.layers for n in ("q", "k", "v", "o", "gate", "up", "down")):
            raise ValueError(f"the level database holds {st.pattern} sparsity, the candidate asks for "
                             f"{candidate.sparsity_pattern}; rebuild the levels for that pattern.")
        for i, sublayer, lc in self.live.pruned_sublayers(candidate):
            names = ("q", "k", "v", "o") if sublayer == "attn" else ("gate", "up", "down")
            narrow = (lc.num_kv_heads, lc.q_per_kv) != (s.num_kv_heads, s.q_per_kv) if sublayer == "attn" \
                else lc.mlp_channels != s.intermediate_size
            for n in names:
                level = lc.sparsity_of(n)
                if level <= 0:
                    continue
                if narrow and n in ("o", "down") and st.sparsity_method != "sparsegpt":
                    continue  # a Wanda / magnitude mask of the narrower weight, computed on the fly
                if not any(math.isclose(level, v) for v in st.sparsity.get(i, ())):
                    raise ValueError(f"block {i}: sparsity {level} is not in the level database (it holds "
                                     f"{list(st.sparsity.get(i, ()))}); build the levels from the space you search.")
            if (st.width_method == "obs" or (st.sparsity_method == "sparsegpt" and any(
                    lc.sparsity_of(n) > 0 for n in ("o", "down")))) and narrow:
                ok = ((lc.num_kv_heads, lc.q_per_kv) in st.heads.get(i, ())) if sublayer == "attn" \
                    else lc.mlp_channels in st.mlp.get(i, ())
                if not ok:
                    raise ValueError(f"block {i}: the {sublayer} width of this candidate is not in the level database; "
                                     "build the levels from the space you search.")

    def revert(self) -> None:
        super().revert()
        self._db_params.clear()

    @property
    def masks(self) -> dict[nn.Parameter, torch.Tensor]:
        out = super().masks
        for p in self._db_params:
            out[p] = p.detach() != 0
        return out

    def _plans(self, i: int, sublayer: str, lc: LayerConfig) -> list[_LinearPlan]:
        plans = super()._plans(i, sublayer, lc)
        for plan in plans:
            for part in plan.parts:
                part.linear = plan.name  # type: ignore[attr-defined]
        return plans

    def _narrow(self, part: _Part) -> bool:
        """Whether ``part`` is an o_proj / down_proj slice narrower than dense (its columns changed)."""
        return part.logical in ("o", "down") and part.shape2d[1] != self.live.refs[part.key[0]].weight[part.linear].shape[1]  # type: ignore[attr-defined]

    def _stored(self, i: int, name: str, like: torch.Tensor) -> torch.Tensor:
        t = self.db.load(i)[name]
        return t if (t.dtype, t.device) == (like.dtype, like.device) else t.to(like.device, like.dtype)

    def _kept(self, part: _Part, lc: LayerConfig, pattern: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        i, name = part.key[0], part.linear  # type: ignore[attr-defined]
        level = lc.sparsity_of(part.logical)
        dense = self.live.refs[i].weight[name]
        if self._narrow(part):
            key = f"{name}@h{part.key[2]}x{part.key[3]}" if part.logical == "o" else f"{name}@c{part.key[2]}"
            if level > 0 and self.levels.sparsity_method == "sparsegpt":
                return self._stored(i, f"{key}@s{_s(level)}", dense), None
            w = self._stored(i, key, dense) if self.levels.width_method == "obs" else part.weight
            return w, self._fly_mask(part, w, level, pattern)
        if level <= 0:
            return part.weight, None
        full = self._stored(i, f"{name}@s{_s(level)}", dense)
        view = full.as_strided(part.weight.size(), part.weight.stride(),
                               full.storage_offset() + part.weight.storage_offset() - dense.storage_offset())
        return view, None

    def _fly_mask(self, part: _Part, w: torch.Tensor, level: float, pattern: str) -> torch.Tensor | None:
        """A Wanda / magnitude keep-mask of a narrower o_proj / down_proj weight, cached bit-packed."""
        if level <= 0:
            return None
        key = part.key + (float(level), pattern, self.levels.sparsity_method, self.levels.width_method, str(w.device))
        hit, packed = self.mask_cache.get(key)
        if hit:
            return unpack_mask(*packed)
        norm = None if self.levels.sparsity_method == "magnitude" else part.norm
        mask = wanda_mask(w.reshape(part.shape2d), norm, level, pattern).reshape(w.shape)
        self.mask_cache.put(key, pack_mask(mask))
        return mask

    def _install(self, module: nn.Module, plan: _LinearPlan, lc: LayerConfig, pattern: str) -> None:
        super()._install(module, plan, lc, pattern)
        single = len(plan.parts) == 1
        for part in plan.parts:
            if lc.sparsity_of(part.logical) > 0 and (self.levels.sparsity_method == "sparsegpt"
                                                     or not self._narrow(part)):
                self._db_params.append(module._parameters["weight" if single else f"weight_{part.logical}"])

    def info(self) -> dict[str, Any]:
        """The database a study used (for ``evoprune show`` and the report)."""
        return {**self.db.info(), "sparsity_method": self.levels.sparsity_method,
                "width_method": self.levels.width_method}
