"""Probe Pruning (PP) as a dynamic backend mode: per batch, choose *which* units a candidate keeps.

Paper: Le, Diao, Wang et al., "Probe Pruning: Accelerating LLMs through Dynamic Pruning via
Model-Probing", ICLR 2025 (arXiv 2502.15618); reference code Qi-Le1/Probe_Pruning
(``src/model/hf/utils.py: generate_probe``, ``src/model/pruning_module.py: cal_*_prune_metric``,
``src/model/llama_pp.py``). A :class:`~evoprune.space.Candidate` still says *how many* KV groups,
query heads per group and MLP channels every block keeps (so the per-layer ratios are searched by
evoprune's samplers); this mode picks *which* ones for every batch. Switch a pruner to it with
``pruner.set_mode("probe", ProbeSettings(...))`` (a study does it from ``space: {mode: probe}``):
:class:`ProbeStrategy` is the mode's strategy (the interface is in :mod:`._strategy`).

Per pruned sublayer of block ``i``, on every prefill batch (``[B, S]`` tokens):

1. **Probe selection by residual importance** (follows ``generate_probe`` with the reference's
   default ``seqrank+bszrank``): ``n[b, s] = ||residual[b, s, :]||_2`` of the sublayer's residual
   input (the block input for attention, the post-attention hidden state for the MLP); the
   ``max(ceil(S * seq_ratio), 2)`` positions with the largest ``||n[:, s]||_2`` (sorted; when 10
   or fewer, the first position replaces the smallest index), then the ``ceil(B * batch_ratio)``
   sequences with the largest ``||n[b, chosen]||_2``. The probe is the layer-normalized input at
   those sequences x positions.
2. **Probing** (the reference's default ``sync`` mode: the probe runs through the block it prunes,
   not several blocks ahead -- its "a few layers ahead" is the ``asyncintra`` variant, not done
   here): attention runs q/k/v, RoPE and causal attention *among the probe positions* with the
   dense weights and stops at the ``o_proj`` input (``o_proj`` itself is skipped); the MLP runs
   ``act(gate) * up``, i.e. the ``down_proj`` input. *Departure*: the reference slices the causal
   mask as ``mask[:q_len, :q_len]`` for a probe of non-contiguous positions; here the mask entries
   of the actual probe positions are used (the model's 4-D mask sliced, or causal when none).
3. **History integration** (``cal_*_prune_metric``, dynamic ratio, not ``probefixratio``): per
   position ``s`` and input channel ``c`` of ``o_proj``/``down_proj``, the probe's
   ``p[s, c] = sum_b x[b, s, c]^2 / n_probe_sequences`` and the history ``g[s, c]`` (mean ``x^2``
   per position over the calibration sequences, then an EMA with ``momentum`` over the full
   prefill batches of the session, updated on the kept channels only -- as the reference's
   ``update_global_metric_score_distribution[_ema]``) combine as ``r = p / (p + g + 1e-6)``,
   ``X2[c] = sum_s ((1 - r) g + r p)``. ``history=False`` uses ``X2 = sum_s p``.
   *Departures*: the history is reset to the calibration state whenever a candidate is applied (so
   a candidate scores the same on the same batches in any process: evoprune's "a candidate is a
   pure value" invariant; the bench measures it against re-applying per batch); the first batch of
   a session updates the history too (the reference skips batch 0); positions beyond the history's
   length have ``g = 0`` (as the reference's zero-initialized buffer). ``use_probe=False`` scores
   from the history alone (``X2 = sum_s g``; the calibration-only ablation).
   **Padding** (as the reference's ``pad_tokens``): with an attention mask, padded tokens count
   zero in the probe ranking, positions / sequences that are all padding are never probed, the
   probe sizes are shares of the real positions and sequences, ``p`` and the history update average
   over the real tokens of each position (the reference's ``nonpad_tokens_denominator``), and a
   position where every sequence is padding keeps its history (the reference decays it) -- so a
   right-padded batch gives the same units, logits and history as the same sequences unpadded.
4. **PP importance score** (``ppwandasp``): ``score[c] = || X2[c] * W[:, c]^2 ||_2`` over the
   output rows of ``down_proj`` / ``o_proj`` (``W`` their weight); an attention head's score is the
   same L2 norm over its ``head_dim`` columns and all rows. MLP: the ``mlp_channels`` best
   channels. **GQA**, ``gqa="groups"`` (default; a *departure*): a KV group scores the sum of its
   query heads; the ``num_kv_heads`` best groups are kept, and in each the ``q_per_kv`` best query
   heads -- the static mode's unit structure, so K/V rows (and the KV cache) shrink too.
   ``gqa="reference"`` (the reference code): K/V stay whole and the ``num_kv_heads * q_per_kv``
   best query heads are kept anywhere; K/V are computed whole and each kept query head reads its
   own group's K/V (an index of the projection's output, so the cached K/V hold one copy per kept
   head: more cache memory than the reference's ``repeat_kv``, the same attention).
5. **Full inference on the kept units**: the kept rows of q/k/v (gate/up) and columns of
   o_proj (down_proj) are gathered (``index_select``, a copy per batch, as the reference's
   ``extract_*_dim_weight``) and the block's own forward runs on them: real, smaller matmuls; the
   probe, the scoring and the gathers are part of the measured time.

**Decoding with a KV cache**: a forward whose cache already holds tokens is a decode step; it
reuses the units chosen at that batch's prefill (no probe, no history update), so the cached
K/V (of the kept KV groups only) stay consistent. Under that rule cached decoding equals an
uncached recomputation of the whole sequence with the prefill's units held (:meth:`ProbeStrategy.hold`).

Blocks the candidate keeps dense run untouched (no probe), so a candidate at ratio 1.0 is the
dense model exactly. Dropped blocks/sublayers are the pruner's (as in every mode). Sparsity is
refused. Fine-tuning in this mode is not supported (the gathered weights are per-batch copies).

**Export**: :meth:`ProbeStrategy.export` writes the dense (permuted) weights, the candidate, the PP
settings and the calibration history (``mode: probe`` in the config's ``evoprune`` section);
:func:`~evoprune.pruning.load_pruned` rebuilds a pruner in this mode from
:meth:`ProbeStrategy.load_export` and applies the candidate, so the model prunes per batch again.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__ as _evoprune_version
from .._fingerprint import ids_fingerprint
from .._logging import get_logger
from .._paths import atomic_folder, new_folder
from ..space import Candidate, LayerConfig, ModelSpec, ProbeSettings
from ._calib import calibration_pass
from ._serve import EXPORT_FORMAT_VERSION
from ._strategy import LiveModel, UndoLog

__all__ = ["ProbeStrategy", "select_probe", "masked_square_mean", "pp_scores", "HISTORY_FILE"]

_log = get_logger("pruning")
HISTORY_FILE = "probe_history.safetensors"
_EPS = 1e-6


# -- the PP formulas (one copy; the mode and the tests' callers use these) ---------------------------
def select_probe(residual: torch.Tensor, settings: ProbeSettings,
                 valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(batch indices, position indices)`` of the probe, both sorted ascending (step 1).

    ``valid`` (``[B, S]`` bool, the attention mask; ``None``: no padding): padded tokens count zero
    in the ranking, positions where every sequence is padded and sequences that are all padding are
    never chosen, and the probe's sizes are shares of the positions and sequences that hold a real
    token -- so a padded batch picks the same probe as the same sequences unpadded."""
    B, S = residual.shape[0], residual.shape[1]
    norms = torch.linalg.vector_norm(residual.float(), ord=2, dim=-1)  # [B, S]
    if valid is not None:
        norms = norms * valid.to(norms.device, norms.dtype)
        cols, rows = valid.any(0).to(norms.device), valid.any(1).to(norms.device)
        S_eff, B_eff = max(int(cols.sum()), 1), max(int(rows.sum()), 1)
    else:
        cols = rows = None
        S_eff, B_eff = S, B
    n_seq = min(S_eff, max(math.ceil(S_eff * settings.seq_ratio), 2))
    pos_score = torch.linalg.vector_norm(norms, ord=2, dim=0)
    if cols is not None:
        pos_score = pos_score.masked_fill(~cols, -1.0)
    pos = _top(pos_score, n_seq)
    if n_seq <= 10 and n_seq < S_eff and (cols is None or bool(cols[0])):
        pos[0] = 0  # the reference keeps the first token in the extreme case
        pos = torch.sort(pos).values
    n_b = min(B_eff, max(math.ceil(B_eff * settings.batch_ratio), 1))
    seq_score = torch.linalg.vector_norm(norms[:, pos], ord=2, dim=1)
    if rows is not None:
        seq_score = seq_score.masked_fill(~rows, -1.0)
    seqs = _top(seq_score, n_b)
    return seqs, pos


def masked_square_mean(x: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per position and channel, the mean of ``x^2`` over the sequences whose token is real
    (``x [b, s, C]``, ``valid [b, s]`` or ``None``), as the reference's ``probe_num`` /
    ``nonpad_tokens_denominator``; and which positions hold any real token (``None``: all)."""
    sq = x.detach().float().pow(2)
    if valid is None:
        return sq.sum(0) / x.shape[0], None
    v = valid.to(sq.device, sq.dtype)
    n = v.sum(0)
    return (sq * v.unsqueeze(-1)).sum(0) / n.clamp(min=1).unsqueeze(-1), n > 0


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries (ties: lower index first), sorted ascending."""
    order = torch.sort(score, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def integrate(probe_sq: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
    """Step 3: ``X2[c]`` from the probe's ``p [s, c]`` and the history rows ``g [s, c]`` (or ``None``)."""
    if history is None:
        return probe_sq.sum(0)
    r = probe_sq / (probe_sq + history + _EPS)
    return ((1 - r) * history + r * probe_sq).sum(0)


def pp_scores(x2: torch.Tensor, w4: torch.Tensor, group: int = 1) -> torch.Tensor:
    """Step 4 from ``X2 [C]`` and ``w4[c] = sum_j W[j, c]^4``: ``||X2[c] W[:, c]^2||_2`` summed in
    squares over ``group`` consecutive columns (a head's ``head_dim``), i.e. per unit."""
    sq = (x2.double() ** 2) * w4.double()
    return sq.view(-1, group).sum(-1).sqrt()


# -- the mode ------------------------------------------------------------------------------------------
class _Layer:
    """Per-block state: stashed residuals, the probe capture and the active (gathered) weights."""

    def __init__(self) -> None:
        self.res_attn: torch.Tensor | None = None
        self.res_mlp: torch.Tensor | None = None
        self.capture = False
        self.captured: torch.Tensor | None = None
        self.active: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.cols: dict[str, torch.Tensor] = {}  # "o"/"down" -> kept input columns (history updates)
        self.spread: dict[str, torch.Tensor] = {}  # gqa reference: output columns repeated per kept query head
        self.selection: dict[str, torch.Tensor] = {}


class ProbeStrategy:
    """Probe Pruning: the strategy of the ``"probe"`` mode (made by ``pruner.set_mode("probe", settings)``).

    Args:
        live: the pruner's :class:`~._strategy.LiveModel` (its permuted dense model, adapter and
            calibration tokens).
        settings: :class:`~evoprune.space.ProbeSettings`.
        history: per-block calibration history ``{i: {"o": [P, q_heads*head_dim], "down": [P, I]}}``
            (e.g. from an export); default: computed from the calibration tokens (zeros without
            them: the probe alone scores).
    """

    mode: ClassVar[str] = "probe"

    def __init__(self, live: LiveModel, settings: ProbeSettings,
                 history: dict[int, dict[str, torch.Tensor]] | None = None,
                 calib_ids: torch.Tensor | None = None) -> None:
        if not isinstance(settings, ProbeSettings):
            raise TypeError(f"ProbeStrategy needs ProbeSettings, got {type(settings).__name__}.")
        if calib_ids is not None and (not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2):
            raise ValueError("ProbeStrategy: calib_ids must be a [sequences, seq_len] token tensor (the probe's own "
                             "calibration set, probe: {calibration: {...}}).")
        self.live = live
        self.settings = settings
        self.spec: ModelSpec = live.spec
        ids = calib_ids if calib_ids is not None else live.calib_ids
        self.calib_history = history if history is not None else self._calibrate(ids)
        if history is not None:
            self.calib_key = "given:" + str(sum(float(v.double().sum()) for d in history.values() for v in d.values()))
        else:
            self.calib_key = str(live.data_fingerprint) if calib_ids is None else ids_fingerprint(calib_ids)
        self.calib_tokens = 0 if ids is None or history is not None else int(ids.numel())
        self._w4: dict[tuple[int, str], torch.Tensor] = {}
        self._layers: dict[int, _Layer] = {}
        self._history: dict[int, dict[str, torch.Tensor]] = {}
        self._undo = UndoLog()
        self._held = False
        self._decode = False
        self._batches = 0  # history updates since apply (a value computed later depends on them)
        self._valid: torch.Tensor | None = None  # [B, S] real tokens of the current prefill (None: no padding)

    # -- calibration history ---------------------------------------------------------------------
    def _calibrate(self, ids: torch.Tensor | None) -> dict[int, dict[str, torch.Tensor]]:
        live, s = self.live, self.spec
        if ids is None:
            _log.info("probe mode without calibration tokens: empty history (the probe alone scores)")
            dev = live.device
            return {i: {"o": torch.zeros(0, s.num_heads * s.head_dim, device=dev),
                        "down": torch.zeros(0, s.intermediate_size, device=dev)} for i in range(s.num_layers)}
        sums: dict[tuple[int, str], torch.Tensor] = {}

        def add(key: tuple[int, str]):
            def fn(x: torch.Tensor) -> None:
                acc = x.detach().float().pow(2).sum(0)
                sums[key] = acc if key not in sums else sums[key] + acc

            return fn

        a = live.adapter
        inputs = [(r.linears[name], add((i, key))) for i, r in enumerate(live.refs)
                  for name, key in ((a.o, "o"), (a.down, "down"))]
        calibration_pass(live.model, ids, inputs, batch_size=live.calib_batch_size)
        n = ids.shape[0]
        return {i: {k: sums[(i, k)] / n for k in ("o", "down")} for i in range(s.num_layers)}

    # -- the strategy interface (see ._strategy) ---------------------------------------------------
    def check(self, candidate: Candidate) -> None:
        if candidate.has_sparsity:
            raise ValueError("Pruner.apply: the probe mode prunes heads and channels per batch and has no sparsity "
                             "masks; use a candidate without sparsity or pruner.set_mode('static').")

    def apply(self, candidate: Candidate) -> None:
        """Hook every pruned sublayer and start a session: the calibration history, no held selection."""
        for i, sublayer, lc in self.live.pruned_sublayers(candidate):
            self._install(i, sublayer, lc)
        self._history = {i: {k: v.clone() for k, v in self.calib_history[i].items()} for i in self._layers}
        self._batches = 0
        h = self.live.backbone.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        self._undo.push(h.remove)

    def revert(self) -> None:
        self._undo.undo()
        self._layers.clear()

    @property
    def masks(self) -> dict[nn.Parameter, torch.Tensor]:
        return {}  # no sparsity in this mode

    def materialized_linears(self, i: int, sublayer: str, lc: LayerConfig,
                             pattern: str) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        raise ValueError("Pruner.materialize: a probe-mode candidate has no fixed smaller model (its units change "
                         "per batch); export it (dense weights + widths + PP settings) or set_mode('static').")

    def export(self, pruner: Any, candidate: Candidate, path: str | os.PathLike[str], *, tokenizer: Any = None,
               format: str = "hf", dtype: str | None = None, **save_kwargs: Any) -> Path:
        """The dense (permuted) weights, the candidate, the PP settings and the calibration history."""
        from safetensors.torch import save_file  # deferred: keeps `import evoprune.pruning` cheap

        if format != "hf" or dtype is not None:
            raise ValueError("Pruner.export: a probe-mode candidate exports as an HF folder with the dense weights "
                             "(format='hf', no dtype); GGUF / Nemotron-NAS need a static candidate (set_mode('static')).")
        pruner.spec.check_candidate(candidate)
        path = new_folder(path)
        was = pruner.candidate
        pruner.revert()
        cfg = pruner.model.config
        section = {"format_version": EXPORT_FORMAT_VERSION, "evoprune_version": _evoprune_version, "mode": self.mode,
                   "candidate": candidate.to_dict(), "probe": self.settings.to_dict(),
                   "dense_model_type": pruner.adapter.model_type, "model_fingerprint": str(pruner.model_fingerprint)}
        try:
            cfg.evoprune = section
            with atomic_folder(path) as partial:
                pruner.model.save_pretrained(partial, **save_kwargs)
                tensors = {f"{i}.{k}": v.detach().to("cpu", torch.float32).contiguous()
                           for i, d in self.calib_history.items() for k, v in d.items()}
                save_file(tensors, str(partial / HISTORY_FILE))
                if tokenizer is not None:
                    tokenizer.save_pretrained(partial)
        finally:
            if "evoprune" in cfg.__dict__:
                del cfg.evoprune
            if was is not None:
                pruner.apply(was)
        return path

    @staticmethod
    def load_export(path: str | os.PathLike[str], section: dict[str, Any],
                    device: torch.device) -> tuple[ProbeSettings, dict[str, Any]]:
        """The settings and ``set_mode`` options (the history) of an export written by :meth:`export`."""
        from safetensors.torch import load_file  # deferred: keeps `import evoprune.pruning` cheap

        flat = load_file(os.path.join(os.fspath(path), HISTORY_FILE))
        layers = sorted({int(k.split(".", 1)[0]) for k in flat})
        history = {i: {k: flat[f"{i}.{k}"].to(device) for k in ("o", "down")} for i in layers}
        return ProbeSettings.from_dict(section["probe"]), {"history": history}

    # -- installation (every change goes through this strategy's undo log) -------------------------
    def _on_forward(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        filled = cache is not None and hasattr(cache, "get_seq_length") and int(cache.get_seq_length()) > 0
        self._decode = self._held or filled
        if not self._decode:
            mask = kwargs.get("attention_mask")
            valid = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            self._valid = None if valid is None or bool(valid.all()) else valid

    def _valid_for(self, shape: torch.Size) -> torch.Tensor | None:
        v = self._valid
        return v if v is not None and tuple(v.shape) == tuple(shape[:2]) else None

    def _install(self, i: int, sublayer: str, lc: LayerConfig) -> None:
        a = self.live.adapter
        r = self.live.refs[i]
        st = self._layers.setdefault(i, _Layer())
        if sublayer == "attn":
            self._hook_residual(r.attn_norm, st, "res_attn")
            dense = {"num_key_value_groups": self.spec.q_per_kv, "num_key_value_heads": self.spec.num_kv_heads,
                     "num_heads": self.spec.num_heads, "config": r.attn.config}
            orig = r.attn.forward

            def attn_forward(*args: Any, **kwargs: Any):
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                if not self._decode:
                    self._select_attn(i, lc, st, r, orig, hidden, kwargs, dense)
                elif not st.selection:
                    raise RuntimeError("probe mode: a decode step (cache already filled) before any prefill of this "
                                       "applied candidate; run the prompt through the model first.")
                if self.settings.gqa == "reference":
                    return self._reference_heads(r.attn, int(st.selection["heads"].numel()), orig, args, kwargs)
                return orig(*args, **kwargs)

            self._undo.set(r.attn, "forward", attn_forward)
            names = [a.qkv] if a.qkv else [a.q, a.k, a.v]
            for name in names + [a.o]:
                self._install_linear(i, st, r.linears[name], name, "o" if name == a.o else None)
        else:
            self._hook_residual(r.mlp_norm, st, "res_mlp")
            orig = r.mlp.forward

            def mlp_forward(*args: Any, **kwargs: Any):
                x = kwargs["hidden_states"] if "hidden_states" in kwargs else (kwargs["x"] if "x" in kwargs else args[0])
                if not self._decode:
                    self._select_mlp(i, lc, st, r, x)
                elif "mlp" not in st.selection:
                    raise RuntimeError("probe mode: a decode step before any prefill of this applied candidate.")
                return orig(*args, **kwargs)

            self._undo.set(r.mlp, "forward", mlp_forward)
            names = [a.gate_up] if a.gate_up else [a.gate, a.up]
            for name in names + [a.down]:
                self._install_linear(i, st, r.linears[name], name, "down" if name == a.down else None)

    def _hook_residual(self, norm: nn.Module, st: _Layer, attr: str) -> None:
        def pre(module, args, kwargs):
            if not self._decode:
                setattr(st, attr, args[0] if args else kwargs["hidden_states"])

        h = norm.register_forward_pre_hook(pre, with_kwargs=True)
        self._undo.push(h.remove)

    def _install_linear(self, i: int, st: _Layer, module: nn.Module, name: str, hist: str | None) -> None:
        def forward(x: torch.Tensor) -> torch.Tensor:
            wb = st.active.get(name)
            if wb is None:
                if st.capture and hist == "o":  # the probe stops at o_proj's input
                    st.captured = x
                    return x.new_zeros(*x.shape[:-1], module.out_features)
                return F.linear(x, module.weight, module.bias)
            if hist is not None and not self._decode:
                self._update_history(i, hist, x, st.cols[hist])
            out = F.linear(x, wb[0], wb[1])
            spread = st.spread.get(name)  # gqa reference: each kept query head's K/V group, whole K/V computed
            return out if spread is None else out.index_select(-1, spread)

        self._undo.set(module, "forward", forward)

    # -- selection ---------------------------------------------------------------------------------
    def _w4_of(self, i: int, key: str, w: torch.Tensor) -> torch.Tensor:
        out = self._w4.get((i, key))
        if out is None:
            out = w.detach().float().pow(4).sum(0)
            self._w4[(i, key)] = out
        return out

    def _x2(self, i: int, key: str, x: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Step 3 for the captured probe input ``x [b, s, C]`` at positions ``pos`` (``valid``: the
        probe's real tokens, ``[b, s]``; padded entries count neither in the sum nor in the mean)."""
        p, _ = masked_square_mean(x, valid)
        if not self.settings.history:
            return integrate(p, None)
        hist = self._history[i][key]
        g = torch.zeros_like(p)
        known = pos < hist.shape[0]
        if bool(known.any()):
            g[known] = hist[pos[known]].to(p.device)
        return integrate(p, g)

    def _select_attn(self, i, lc, st, r, orig, hidden, kwargs, dense) -> None:
        a, s = self.live.adapter, self.spec
        G, Q, hd = s.num_kv_heads, s.q_per_kv, s.head_dim
        nq, nkv = G * Q * hd, G * hd
        res = st.res_attn if st.res_attn is not None and st.res_attn.shape[:2] == hidden.shape[:2] else hidden
        st.res_attn = None  # hold no activations between forwards
        if not self.settings.use_probe:
            for name in ([a.qkv] if a.qkv else [a.q, a.k, a.v]) + [a.o]:
                st.active.pop(name, None)
            self._keep_heads(i, lc, st, r, self._history_x2(i, "o", hidden.shape[1]))
            return
        valid = self._valid_for(hidden.shape)
        seqs, pos = select_probe(res, self.settings, valid)
        seqs, pos = seqs.to(hidden.device), pos.to(hidden.device)
        pvalid = None if valid is None else valid.to(hidden.device).index_select(0, seqs).index_select(1, pos)
        probe = hidden.index_select(0, seqs).index_select(1, pos)
        cos, sin = kwargs["position_embeddings"]
        cos, sin = (_rows(t, seqs).index_select(1, pos) for t in (cos, sin))
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            mask = _rows(mask, seqs).index_select(2, pos).index_select(3, pos)
        elif mask is not None:
            mask = None  # not a plain tensor mask (e.g. flex attention): causal over the probe
        attn = r.attn
        pruned = {k: attn.__dict__[k] for k in dense if k in attn.__dict__}
        for name in ([a.qkv] if a.qkv else [a.q, a.k, a.v]) + [a.o]:
            st.active.pop(name, None)
        st.capture = True
        try:
            for k, v in dense.items():
                if k in pruned:
                    attn.__dict__[k] = v
            with torch.no_grad():
                orig(hidden_states=probe, position_embeddings=(cos, sin), attention_mask=mask, cache=None)
        finally:
            st.capture = False
            attn.__dict__.update(pruned)
        x2 = self._x2(i, "o", st.captured, pos, pvalid)
        st.captured = None
        self._keep_heads(i, lc, st, r, x2, seqs, pos)

    def _history_x2(self, i: int, key: str, S: int) -> torch.Tensor:
        """``X2`` from the history alone (``use_probe=False``): its rows for the batch's positions."""
        return self._history[i][key][:S].float().sum(0)

    def _keep_heads(self, i, lc, st, r, x2, seqs=None, pos=None) -> None:
        a, s = self.live.adapter, self.spec
        G, Q, hd = s.num_kv_heads, s.q_per_kv, s.head_dim
        nq, nkv = G * Q * hd, G * hd
        wo = r.weight[a.o]
        scores = pp_scores(x2, self._w4_of(i, "o", wo), hd)
        ar = torch.arange(hd, device=scores.device)
        st.spread.clear()
        if self.settings.gqa == "reference":  # K/V whole, the best query heads anywhere (the reference code)
            flat = _top(scores, lc.num_q_heads)
            kv = torch.unique(flat // Q)
            q = flat.view(1, -1)
            q_rows = (flat.view(-1, 1) * hd + ar).reshape(-1).to(wo.device)
            all_kv = torch.arange(nkv, device=wo.device)
            dup = ((flat // Q).view(-1, 1) * hd + ar).reshape(-1).to(wo.device)  # each kept head's K/V columns
            with torch.no_grad():
                if a.qkv:
                    st.active[a.qkv] = _gather(r, a.qkv, torch.cat([q_rows, nq + all_kv, nq + nkv + all_kv]))
                    n = len(q_rows)
                    st.spread[a.qkv] = torch.cat([torch.arange(n, device=wo.device), n + dup, n + nkv + dup])
                else:
                    st.active[a.q] = _gather(r, a.q, q_rows)
                    for name in (a.k, a.v):
                        st.active[name] = (r.weight[name].detach(),
                                           None if r.bias[name] is None else r.bias[name].detach())
                        st.spread[name] = dup
                st.active[a.o] = (wo.detach().index_select(1, q_rows),
                                  None if r.bias[a.o] is None else r.bias[a.o].detach())
        else:
            heads = scores.view(G, Q)
            kv = _top(heads.sum(1), lc.num_kv_heads)
            q = torch.stack([_top(heads[g], lc.q_per_kv) for g in kv.tolist()])
            flat = (kv.view(-1, 1) * Q + q).reshape(-1)
            q_rows = (flat.view(-1, 1) * hd + ar).reshape(-1).to(wo.device)
            kv_rows = (kv.view(-1, 1) * hd + ar).reshape(-1).to(wo.device)
            with torch.no_grad():
                if a.qkv:
                    st.active[a.qkv] = _gather(r, a.qkv, torch.cat([q_rows, nq + kv_rows, nq + nkv + kv_rows]))
                else:
                    st.active[a.q] = _gather(r, a.q, q_rows)
                    st.active[a.k] = _gather(r, a.k, kv_rows)
                    st.active[a.v] = _gather(r, a.v, kv_rows)
                st.active[a.o] = (wo.detach().index_select(1, q_rows),
                                  None if r.bias[a.o] is None else r.bias[a.o].detach())
        st.cols["o"] = q_rows
        probe = (0, 0) if seqs is None else (len(seqs), len(pos))
        st.selection.update(kv=kv, q=q, heads=flat, attn_probe=torch.tensor(probe))

    def _reference_heads(self, attn: nn.Module, n: int, orig: Any, args: Any, kwargs: dict[str, Any]):
        """Run the block's attention with ``n`` query heads, each with its own (repeated) K/V head."""
        over = {"num_key_value_groups": 1, "num_key_value_heads": n, "num_heads": n}
        if self.live.adapter.attn_reads_config_heads:
            cfg = copy.copy(attn.config)
            cfg.num_attention_heads = cfg.num_key_value_heads = n
            over["config"] = cfg
        saved = {k: attn.__dict__[k] for k in over if k in attn.__dict__}
        attn.__dict__.update(over)
        try:
            return orig(*args, **kwargs)
        finally:
            for k in over:
                attn.__dict__.pop(k, None)
            attn.__dict__.update(saved)

    def _select_mlp(self, i, lc, st, r, x) -> None:
        a, I = self.live.adapter, self.spec.intermediate_size
        res = st.res_mlp if st.res_mlp is not None and st.res_mlp.shape[:2] == x.shape[:2] else x
        st.res_mlp = None
        if self.settings.use_probe:
            valid = self._valid_for(x.shape)
            seqs, pos = select_probe(res, self.settings, valid)
            seqs, pos = seqs.to(x.device), pos.to(x.device)
            pvalid = None if valid is None else valid.to(x.device).index_select(0, seqs).index_select(1, pos)
            probe = x.index_select(0, seqs).index_select(1, pos)
            mlp = r.mlp
            act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn")
            with torch.no_grad():
                if a.gate_up:
                    gate, up = F.linear(probe, r.weight[a.gate_up], r.bias[a.gate_up]).chunk(2, dim=-1)
                else:
                    gate = F.linear(probe, r.weight[a.gate], r.bias[a.gate])
                    up = F.linear(probe, r.weight[a.up], r.bias[a.up])
                h = act(gate) * up
            x2 = self._x2(i, "down", h, pos, pvalid)
            n_probe = (len(seqs), len(pos))
        else:
            x2, n_probe = self._history_x2(i, "down", x.shape[1]), (0, 0)
        wd = r.weight[a.down]
        ch = _top(pp_scores(x2, self._w4_of(i, "down", wd)), lc.mlp_channels).to(wd.device)
        with torch.no_grad():
            if a.gate_up:
                st.active[a.gate_up] = _gather(r, a.gate_up, torch.cat([ch, I + ch]))
            else:
                st.active[a.gate] = _gather(r, a.gate, ch)
                st.active[a.up] = _gather(r, a.up, ch)
            st.active[a.down] = (wd.detach().index_select(1, ch),
                                 None if r.bias[a.down] is None else r.bias[a.down].detach())
        st.cols["down"] = ch
        st.selection.update(mlp=ch, mlp_probe=torch.tensor(n_probe))

    def _update_history(self, i: int, key: str, x: torch.Tensor, cols: torch.Tensor) -> None:
        m = self.settings.momentum
        if m >= 1.0 or not self.settings.history:
            return
        with torch.no_grad():
            val, real = masked_square_mean(x, self._valid_for(x.shape))  # [S, kept]; positions with a real token
            if real is not None:  # positions where every sequence is padding leave the history alone
                S = int(real.nonzero().max()) + 1 if bool(real.any()) else 0
                val, real = val[:S], real[:S]
            else:
                S = x.shape[1]
            h = self._history[i][key]
            if h.shape[0] < S:
                h = torch.cat([h, h.new_zeros(S - h.shape[0], h.shape[1])])
                self._history[i][key] = h
            ix = cols.to(h.device)
            new = m * h[:S, ix] + (1 - m) * val.to(h.device)
            if real is not None:
                new = torch.where(real.to(h.device).unsqueeze(-1), new, h[:S, ix])
            h[:S, ix] = new
            self._batches += 1

    # -- public helpers ----------------------------------------------------------------------------
    @property
    def history_moves(self) -> bool:
        """Whether prefill batches update the history (so a batch's units depend on the batches before it)."""
        return self.settings.history and self.settings.momentum < 1.0

    def cache_key(self, fresh: bool = False) -> tuple:
        """What a value computed now depends on besides the candidate and the batch itself: the
        settings, the calibration history's identity, and how many history updates this applied
        session has made (``0`` when the history cannot move; ``fresh``: as right after an apply).
        Evaluators key cached values by it."""
        return (self.mode, repr(sorted(self.settings.to_dict().items())),
                self.calib_key, self._batches if self.history_moves and not fresh else 0)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Inside: every forward reuses the units chosen at the last prefill (no probe, no history
        update), as decode steps do."""
        before = self._held
        self._held = True
        try:
            yield
        finally:
            self._held = before

    def history(self) -> dict[int, dict[str, torch.Tensor]]:
        """A copy of this session's history per pruned block (``"o"``/``"down"``: ``[positions, columns]``
        mean squared inputs: the calibration state after an apply, then its EMA over prefill batches)."""
        return {i: {k: v.clone() for k, v in d.items()} for i, d in self._history.items()}

    def selections(self) -> dict[int, dict[str, torch.Tensor]]:
        """The units chosen at the last prefill, per pruned block, in the pruner's (permuted) order:
        ``kv`` (KV groups), ``q`` (``[kv, q_per_kv]`` query heads inside each kept group), ``heads``
        (flat query heads), ``mlp`` (channels); ``attn_probe``/``mlp_probe``: probe (sequences, positions)."""
        return {i: dict(st.selection) for i, st in self._layers.items() if st.selection}


def _rows(t: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    return t if t.shape[0] == 1 else t.index_select(0, seqs.to(t.device))


def _gather(r: Any, name: str, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    w, b = r.weight[name].detach(), r.bias[name]
    return w.index_select(0, rows), None if b is None else b.detach().index_select(0, rows)
