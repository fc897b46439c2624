"""Importance scores of KV groups, query heads and MLP channels, plus block influence.

All scores are in the dense checkpoint's original order (before the
:class:`~evoprune.pruning.Pruner` permutes the model) and accumulated in fp32.

Methods:

* ``"activation"`` (Minitron / Wanda style, needs calibration tokens):
  query head ``h``: ``||X_o[:, h]||_2``, the L2 norm over all calibration tokens
  and the head's ``head_dim`` channels of the ``o_proj`` input; KV group: sum of
  its query heads; MLP channel ``c``: ``||X_down[:, c]||_2 * ||W_down[:, c]||_2``.
* ``"magnitude"`` (no data): head ``h``: ``sqrt(||W_q[h]||^2 + ||W_o[:, h]||^2)``;
  KV group: sum of its query heads; MLP channel ``c``:
  ``sqrt(||W_gate[c]||^2 + ||W_up[c]||^2 + ||W_down[:, c]||^2)``.
* ``"taylor"`` (needs calibration tokens, runs a backward pass): first-order
  Taylor estimate ``|sum(W * dL/dW)|`` over the weights of a unit (head: its
  ``q`` rows and ``o`` columns; KV group: its query heads plus its ``k``/``v``
  rows; channel: its ``gate``/``up`` rows and ``down`` column).

With calibration tokens the same pass also records, per block, ShortGPT's block
influence ``mean_tokens(1 - cos(block input, block output))`` and the same
quantity for the attention and MLP sublayers, and the per-input-column norms
``||X||_2`` of every linear (for Wanda sparsity masks). Without calibration the
influences are NaN and the norms are ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .._fingerprint import ids_fingerprint, model_fingerprint  # noqa: F401  (model_fingerprint: for the pruner)
from .._logging import get_logger
from ._adapters import ArchAdapter

__all__ = ["Importance", "IMPORTANCE_METHODS", "IMPORTANCE_VERSION"]

IMPORTANCE_METHODS: tuple[str, ...] = ("activation", "magnitude", "taylor")
IMPORTANCE_VERSION = 1
NORM_KEYS: tuple[str, ...] = ("attn_in", "o_in", "mlp_in", "down_in")

_log = get_logger("pruning")


@dataclasses.dataclass(frozen=True, eq=False)
class Importance:
    """Scores of one dense model (original, unpermuted order; fp32, on CPU).

    Attributes:
        method: ``"activation"``, ``"magnitude"`` or ``"taylor"``.
        kv_group: ``[num_layers, num_kv_heads]``.
        q_head: ``[num_layers, num_kv_heads, q_per_kv]`` (query heads grouped by their KV head).
        mlp_channel: ``[num_layers, intermediate_size]``.
        block_influence: ``[num_layers]``, ShortGPT ``1 - cos(block in, block out)``; a
            low value means the block changes little and is a candidate for dropping.
        attn_influence, mlp_influence: ``[num_layers]``, the same per sublayer.
        input_norms: ``||X||_2`` per input column: ``"attn_in"`` ``[L, hidden]`` (q/k/v input),
            ``"o_in"`` ``[L, heads * head_dim]``, ``"mlp_in"`` ``[L, hidden]`` (gate/up input),
            ``"down_in"`` ``[L, intermediate]``.
        num_tokens: calibration tokens seen (0 without calibration).
    """

    method: str
    kv_group: torch.Tensor
    q_head: torch.Tensor
    mlp_channel: torch.Tensor
    block_influence: torch.Tensor
    attn_influence: torch.Tensor
    mlp_influence: torch.Tensor
    input_norms: dict[str, torch.Tensor]
    num_tokens: int = 0

    @property
    def num_layers(self) -> int:
        return int(self.kv_group.shape[0])

    def orders(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(kv_order [L, G], q_order [L, G, Q], mlp_order [L, I])``: original indices in
        descending importance (stable: ties keep the lower index first). ``q_order[l, g]``
        ranks the query heads inside original KV group ``g``."""
        kv = torch.sort(self.kv_group, dim=-1, descending=True, stable=True).indices
        q = torch.sort(self.q_head, dim=-1, descending=True, stable=True).indices
        mlp = torch.sort(self.mlp_channel, dim=-1, descending=True, stable=True).indices
        return kv, q, mlp

    # -- serialization -----------------------------------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "kv_group": self.kv_group,
            "q_head": self.q_head,
            "mlp_channel": self.mlp_channel,
            "block_influence": self.block_influence,
            "attn_influence": self.attn_influence,
            "mlp_influence": self.mlp_influence,
        }
        out.update({f"norm.{k}": v for k, v in self.input_norms.items()})
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}

    def save(self, path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> Path:
        """Write a safetensors file (atomically: temp file + rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"method": self.method, "num_tokens": str(self.num_tokens), "version": str(IMPORTANCE_VERSION)}
        meta.update(metadata or {})
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(self.to_tensors(), tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Importance":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("version") != str(IMPORTANCE_VERSION):
            raise ValueError(f"importance file {path} has version {meta.get('version')}, expected {IMPORTANCE_VERSION}.")
        return cls(
            method=meta["method"],
            kv_group=tensors["kv_group"],
            q_head=tensors["q_head"],
            mlp_channel=tensors["mlp_channel"],
            block_influence=tensors["block_influence"],
            attn_influence=tensors["attn_influence"],
            mlp_influence=tensors["mlp_influence"],
            input_norms={k: tensors[f"norm.{k}"] for k in NORM_KEYS},
            num_tokens=int(meta.get("num_tokens", "0")),
        )

    @classmethod
    def identity(cls, spec: Any) -> "Importance":
        """Scores whose order is the model's own (e.g. a loaded probe export, already permuted): a
        pruner given them permutes nothing. ``spec``: the model's :class:`~evoprune.space.ModelSpec`."""
        L, G, Q, I = spec.num_layers, spec.num_kv_heads, spec.q_per_kv, spec.intermediate_size
        nan = torch.full((L,), float("nan"))

        def desc(n: int) -> torch.Tensor:
            return -torch.arange(n, dtype=torch.float32)

        return cls("magnitude", desc(G).repeat(L, 1), desc(Q).repeat(L, G, 1), desc(I).repeat(L, 1),
                   nan, nan.clone(), nan.clone(), _unit_norms(spec), 0)


def _unit_norms(spec: Any) -> dict[str, torch.Tensor]:
    """Input norms of all ones (no calibration: Wanda scores become magnitudes)."""
    L = spec.num_layers
    return {"attn_in": torch.ones(L, spec.hidden_size), "o_in": torch.ones(L, spec.num_heads * spec.head_dim),
            "mlp_in": torch.ones(L, spec.hidden_size), "down_in": torch.ones(L, spec.intermediate_size)}


# -- fingerprints ----------------------------------------------------------------------------------
# model_fingerprint and ids_fingerprint live in evoprune._fingerprint (the one copy); the pruner
# reaches them through this module.


def data_fingerprint(calib_ids: torch.Tensor | None) -> str:
    """:func:`~evoprune._fingerprint.ids_fingerprint` of the calibration tokens, ``"none"`` without them
    (their shape is part of :func:`cache_key`)."""
    return "none" if calib_ids is None else ids_fingerprint(calib_ids)


def cache_key(*, model_fp: str, data_fp: str, method: str, calib_shape: tuple[int, ...] | None) -> str:
    payload = {
        "version": IMPORTANCE_VERSION,
        "model": model_fp,
        "data": data_fp,
        "method": method,
        "calib_shape": list(calib_shape) if calib_shape is not None else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


# -- computation -----------------------------------------------------------------------------------
def _get(root: torch.nn.Module, path: str) -> Any:
    return root.get_submodule(path) if path else root


def decoder_layers(model: torch.nn.Module, adapter: ArchAdapter) -> torch.nn.ModuleList:
    return _get(model, adapter.layers)


def _linear_weights(layer: torch.nn.Module, adapter: ArchAdapter, spec: Any) -> dict[str, torch.Tensor]:
    """Logical name -> dense weight (rows for q/k/v/gate/up, full matrix for o/down)."""
    attn = getattr(layer, adapter.attn)
    mlp = getattr(layer, adapter.mlp)
    nq = spec.num_heads * spec.head_dim
    nkv = spec.num_kv_heads * spec.head_dim
    out: dict[str, torch.Tensor] = {}
    if adapter.qkv:
        w = getattr(attn, adapter.qkv).weight
        out["q"], out["k"], out["v"] = w[:nq], w[nq : nq + nkv], w[nq + nkv : nq + 2 * nkv]
    else:
        out["q"] = getattr(attn, adapter.q).weight
        out["k"] = getattr(attn, adapter.k).weight
        out["v"] = getattr(attn, adapter.v).weight
    out["o"] = getattr(attn, adapter.o).weight
    inter = spec.intermediate_size
    if adapter.gate_up:
        w = getattr(mlp, adapter.gate_up).weight
        out["gate"], out["up"] = w[:inter], w[inter : 2 * inter]
    else:
        out["gate"] = getattr(mlp, adapter.gate).weight
        out["up"] = getattr(mlp, adapter.up).weight
    out["down"] = getattr(mlp, adapter.down).weight
    return out


def _group_sq(w: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """Sum of squares of ``w`` split into ``groups`` equal blocks along ``dim`` -> [groups]."""
    sq = w.detach().float().pow(2)
    sq = sq.sum(dim=1 - dim)
    return sq.reshape(groups, -1).sum(-1)


def _magnitude_scores(layers, adapter, spec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    L, G, Q, I = spec.num_layers, spec.num_kv_heads, spec.q_per_kv, spec.intermediate_size
    q_head = torch.zeros(L, G * Q)
    mlp = torch.zeros(L, I)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            w = _linear_weights(layer, adapter, spec)
            q_head[i] = (_group_sq(w["q"], G * Q, 0) + _group_sq(w["o"], G * Q, 1)).sqrt().cpu()
            mlp[i] = (
                _group_sq(w["gate"], I, 0) + _group_sq(w["up"], I, 0) + _group_sq(w["down"], I, 1)
            ).sqrt().cpu()
    q_head = q_head.reshape(L, G, Q)
    return q_head.sum(-1), q_head, mlp


class _Recorder:
    """Forward hooks that accumulate input norms and block influences in fp32."""

    def __init__(self, layers, adapter: ArchAdapter, spec: Any) -> None:
        self.adapter = adapter
        self.spec = spec
        L = spec.num_layers
        nq = spec.num_heads * spec.head_dim
        self.sq = {
            "attn_in": [None] * L,
            "o_in": [None] * L,
            "mlp_in": [None] * L,
            "down_in": [None] * L,
        }
        self.dims = {"attn_in": spec.hidden_size, "o_in": nq, "mlp_in": spec.hidden_size, "down_in": spec.intermediate_size}
        self.infl_sum = torch.zeros(3, L, dtype=torch.float64)
        self.tokens = [0] * L
        self._h_in: dict[int, torch.Tensor] = {}
        self._attn_out: dict[int, torch.Tensor] = {}
        self.handles: list[Any] = []
        for i, layer in enumerate(layers):
            attn = getattr(layer, adapter.attn)
            mlp = getattr(layer, adapter.mlp)
            q_mod = getattr(attn, adapter.qkv or adapter.q)
            up_mod = getattr(mlp, adapter.gate_up or adapter.gate)
            self.handles += [
                q_mod.register_forward_pre_hook(self._norm_hook(i, "attn_in")),
                getattr(attn, adapter.o).register_forward_pre_hook(self._norm_hook(i, "o_in")),
                up_mod.register_forward_pre_hook(self._norm_hook(i, "mlp_in")),
                getattr(mlp, adapter.down).register_forward_pre_hook(self._norm_hook(i, "down_in")),
                layer.register_forward_pre_hook(self._layer_in_hook(i), with_kwargs=True),
                attn.register_forward_hook(self._attn_out_hook(i)),
                layer.register_forward_hook(self._layer_out_hook(i), with_kwargs=True),
            ]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _norm_hook(self, i: int, key: str):
        def hook(module, args):
            x = args[0].detach()
            s = x.float().pow(2).reshape(-1, x.shape[-1]).sum(0)
            acc = self.sq[key][i]
            self.sq[key][i] = s if acc is None else acc + s.to(acc.device)

        return hook

    def _layer_in_hook(self, i: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self._h_in[i] = h.detach()

        return hook

    def _attn_out_hook(self, i: int):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            self._attn_out[i] = out.detach()

        return hook

    def _layer_out_hook(self, i: int):
        def hook(module, args, kwargs, output):
            y = output[0] if isinstance(output, (tuple, list)) else output
            h = self._h_in.pop(i).float()
            a = self._attn_out.pop(i, None)
            y = y.detach().float().to(h.device)
            mid = h + a.float().to(h.device) if a is not None else h
            hidden = h.shape[-1]
            h2, m2, y2 = h.reshape(-1, hidden), mid.reshape(-1, hidden), y.reshape(-1, hidden)
            vals = [
                (1 - F.cosine_similarity(h2, y2, dim=-1)).sum(),
                (1 - F.cosine_similarity(h2, m2, dim=-1)).sum(),
                (1 - F.cosine_similarity(m2, y2, dim=-1)).sum(),
            ]
            for k, v in enumerate(vals):
                self.infl_sum[k, i] += float(v)
            self.tokens[i] += h2.shape[0]

        return hook

    def norms(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, per_layer in self.sq.items():
            rows = []
            for s in per_layer:
                if s is None:
                    raise RuntimeError(
                        f"calibration did not reach every decoder block ({key}); is the model's forward standard?"
                    )
                rows.append(s.sqrt().cpu())
            out[key] = torch.stack(rows)
        return out

    def influences(self) -> torch.Tensor:
        tokens = torch.tensor(self.tokens, dtype=torch.float64).clamp_min(1)
        return (self.infl_sum / tokens).float()


def _validate_calib(calib_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    if not isinstance(calib_ids, torch.Tensor):
        raise TypeError(f"calib_ids must be a LongTensor [n, seq_len], got {type(calib_ids).__name__}.")
    if calib_ids.dim() != 2 or calib_ids.shape[0] < 1 or calib_ids.shape[1] < 1:
        raise ValueError(
            f"calib_ids must be a 2-D LongTensor [n_sequences, seq_len] with an explicit sequence length, "
            f"got shape {tuple(calib_ids.shape)}."
        )
    if calib_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"calib_ids must hold integer token ids, got dtype {calib_ids.dtype}.")
    lo, hi = int(calib_ids.min()), int(calib_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"calib_ids has token ids in [{lo}, {hi}] outside the vocabulary [0, {vocab_size}).")
    return calib_ids.long()


def compute_importance(
    model: torch.nn.Module,
    adapter: ArchAdapter,
    spec: Any,
    calib_ids: torch.Tensor | None,
    method: str,
    batch_size: int,
) -> Importance:
    """Score the dense (unpermuted) ``model``; see the module docstring for the formulas."""
    if method not in IMPORTANCE_METHODS:
        raise ValueError(f"method must be one of {IMPORTANCE_METHODS}, got {method!r}.")
    layers = decoder_layers(model, adapter)
    L = spec.num_layers
    if len(layers) != L:
        raise ValueError(f"the model has {len(layers)} decoder blocks but its config says {L}.")
    if calib_ids is None:
        if method == "taylor":
            raise ValueError("method='taylor' needs calib_ids (it runs a backward pass on them).")
        kv, qh, mlp = _magnitude_scores(layers, adapter, spec)
        nan = torch.full((L,), float("nan"))
        return Importance("magnitude", kv, qh, mlp, nan, nan.clone(), nan.clone(), _unit_norms(spec), 0)

    calib_ids = _validate_calib(calib_ids, spec.vocab_size)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and calib_ids.shape[1] > max_pos:
        raise ValueError(f"calibration seq_len {calib_ids.shape[1]} exceeds max_position_embeddings={max_pos}.")
    device = model.get_input_embeddings().weight.device
    recorder = _Recorder(layers, adapter, spec)
    was_training = model.training
    model.eval()
    taylor_params: list[tuple[torch.nn.Parameter, bool]] = []
    try:
        if method == "taylor":
            flags = [(p, p.requires_grad) for p in model.parameters()]
            for p, _ in flags:
                p.requires_grad_(False)
            taylor_params = flags
            for layer in layers:
                for w in _linear_modules(layer, adapter):
                    w.weight.requires_grad_(True)
                    w.weight.grad = None
        base = getattr(model, "base_model", model)
        for start in range(0, calib_ids.shape[0], batch_size):
            batch = calib_ids[start : start + batch_size].to(device)
            if method == "taylor":
                with torch.enable_grad():
                    out = model(input_ids=batch, labels=batch, use_cache=False)
                    out.loss.backward()
            else:
                with torch.no_grad():
                    base(input_ids=batch, use_cache=False)
        norms = recorder.norms()
        infl = recorder.influences()
        G, Q, I, hd = spec.num_kv_heads, spec.q_per_kv, spec.intermediate_size, spec.head_dim
        q_head = torch.zeros(L, G * Q)
        mlp = torch.zeros(L, I)
        kv_extra = torch.zeros(L, G)
        with torch.no_grad():
            for i, layer in enumerate(layers):
                if method == "activation":
                    q_head[i] = norms["o_in"][i].pow(2).reshape(G * Q, hd).sum(-1).sqrt()
                    w_down = _linear_weights(layer, adapter, spec)["down"]
                    col = w_down.detach().float().pow(2).sum(0).sqrt().cpu()
                    mlp[i] = norms["down_in"][i] * col
                else:
                    q_head[i], kv_extra[i], mlp[i] = _taylor_layer(layer, adapter, spec)
        q_head = q_head.reshape(L, G, Q)
        kv = q_head.sum(-1) + kv_extra
        return Importance(
            method,
            kv,
            q_head,
            mlp,
            infl[0].clone(),
            infl[1].clone(),
            infl[2].clone(),
            norms,
            int(calib_ids.numel()),
        )
    finally:
        recorder.remove()
        for p, flag in taylor_params:
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)


def _linear_modules(layer, adapter: ArchAdapter) -> list[torch.nn.Module]:
    attn = getattr(layer, adapter.attn)
    mlp = getattr(layer, adapter.mlp)
    return [getattr(attn, n) for n in adapter.attn_linears] + [getattr(mlp, n) for n in adapter.mlp_linears]


def _taylor_layer(layer, adapter: ArchAdapter, spec: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-unit ``|sum(W * grad)|`` for one block -> (q heads [H], kv extra [G], mlp [I])."""
    G, Q, I, hd = spec.num_kv_heads, spec.q_per_kv, spec.intermediate_size, spec.head_dim
    H = G * Q
    attn = getattr(layer, adapter.attn)
    mlp = getattr(layer, adapter.mlp)

    def wg(mod):
        w = mod.weight
        if w.grad is None:
            return torch.zeros_like(w, dtype=torch.float32)
        return (w.detach().float() * w.grad.float())

    nq, nkv = H * hd, G * hd
    if adapter.qkv:
        prod = wg(getattr(attn, adapter.qkv))
        pq, pk, pv = prod[:nq], prod[nq : nq + nkv], prod[nq + nkv : nq + 2 * nkv]
    else:
        pq, pk, pv = (wg(getattr(attn, n)) for n in (adapter.q, adapter.k, adapter.v))
    po = wg(getattr(attn, adapter.o))
    heads = pq.sum(1).reshape(H, hd).sum(-1) + po.sum(0).reshape(H, hd).sum(-1)
    kv_extra = (pk.sum(1).reshape(G, hd).sum(-1)).abs() + (pv.sum(1).reshape(G, hd).sum(-1)).abs()
    if adapter.gate_up:
        prod = wg(getattr(mlp, adapter.gate_up))
        pg, pu = prod[:I], prod[I : 2 * I]
    else:
        pg, pu = wg(getattr(mlp, adapter.gate)), wg(getattr(mlp, adapter.up))
    pd = wg(getattr(mlp, adapter.down))
    channels = pg.sum(1).abs() + pu.sum(1).abs() + pd.sum(0).abs()
    return heads.abs().cpu(), kv_extra.cpu(), channels.cpu()
