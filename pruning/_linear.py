"""Fitted linear replacements: what is dropped is replaced by a closed-form least-squares map.

A block or an attention / MLP sublayer at a ``linear`` level (``LayerConfig.attn_linear``,
``mlp_linear``, ``block_linear``) is replaced by ``x @ A`` of its *normed* input ``x`` (the input
the sublayer reads; for a block, the attention-normed input, the way llama.cpp's ``deci``
architecture runs "linear attention" as one ``wo`` matrix), fitted on the dense model's calibration
tokens to the sublayer's output (for a block: the block's whole residual update ``out - in``):

    A = (X^T X + lambda I)^-1 X^T Y,   lambda = ridge * trace(X^T X) / hidden

One calibration pass records ``X^T X`` and ``X^T Y`` (fp64) of every block's parts; no gradient
training. Rank ``r`` below ``hidden`` is the reduced-rank regression: with ``W`` the top ``r``
eigenvectors of ``Yhat^T Yhat = A^T X^T X A``, ``A_r = (A W) W^T`` (``U = A W``, ``V = W^T``), the
best rank-r map in the same least-squares sense. The fit's residual share
``|Y - X A|^2 / |Y|^2`` is kept with it.

Fits are stored the way compressed levels are: in the level database
(:class:`~evoprune.pruning._leveldb.LevelDB`) under ``<cache>/levels/<key digest>/``, one file per
block, keyed by the model and calibration fingerprints, the calibration shape, the ridge and the
format (``kind: linear_fits``), written atomically with a sha256 sidecar, checked when first read (a
corrupt file is fitted again) and memory-mapped. :func:`fitted_linear` is the one way in.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._logging import get_logger
from ._adapters import ArchAdapter
from ._calib import calibration_pass
from ._leveldb import LevelDB, LevelDBError

__all__ = ["LINEAR_PARTS", "LinearFits", "fit_linear", "fitted_linear", "low_rank"]

_log = get_logger("pruning")

#: What a linear map can replace: the attention sublayer, the MLP sublayer, the whole block.
LINEAR_PARTS: tuple[str, ...] = ("attn", "mlp", "block")
_FORMAT = 1
#: Default ridge, relative to the mean diagonal of ``X^T X``.
DEFAULT_RIDGE = 1e-4


def fit_linear(xtx: torch.Tensor, xty: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """The ridge least-squares ``A`` (``[h_in, h_out]``) with ``Y ~ X A`` from ``X^T X`` and ``X^T Y`` (fp64).

    ``ridge=0`` is the plain least-squares solution (``torch.linalg.lstsq(X, Y)`` for full-rank ``X``)."""
    xtx, xty = xtx.double(), xty.double()
    h = xtx.shape[0]
    lam = float(ridge) * float(torch.diagonal(xtx).mean()) if ridge else 0.0
    reg = xtx + lam * torch.eye(h, dtype=xtx.dtype, device=xtx.device) if lam else xtx
    try:
        return torch.linalg.solve(reg, xty)
    except RuntimeError:  # singular without a ridge: the minimum-norm solution
        return torch.linalg.lstsq(reg, xty).solution


def low_rank(a: torch.Tensor, xtx: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U [h, r], V [r, h])`` of the reduced-rank regression: ``U @ V`` is the best rank-``r`` map in the
    least-squares sense of ``a``'s fit (projection on the top eigenvectors of ``a^T xtx a``)."""
    gram = a.T.double() @ xtx.double() @ a.double()
    _, vecs = torch.linalg.eigh((gram + gram.T) / 2)
    w = vecs[:, -rank:].flip(-1)  # top r, descending
    return a.double() @ w, w.T


class LinearFits:
    """The fitted maps of one (permuted, dense) model and its calibration tokens.

    ``stats(layer, part)`` -> ``{"A": [h, h] fp32 (x @ A), "xtx": [h, h] fp64, "residual": [] }`` computed
    for every block in one calibration pass on first use, then kept in memory and (with ``folder``)
    on disk. :meth:`weights` gives a :class:`~._modules.LinearReplacement`'s state dict for a rank.
    """

    def __init__(self, model: nn.Module, adapter: ArchAdapter, refs: list[Any], calib_ids: torch.Tensor | None, *,
                 key: dict[str, Any], folder: Path | None, batch_size: int = 8, ridge: float = DEFAULT_RIDGE) -> None:
        self.model, self.adapter, self.refs = model, adapter, refs
        self.calib_ids, self.batch_size, self.ridge = calib_ids, batch_size, float(ridge)
        self.key = {**key, "kind": "linear_fits", "ridge": self.ridge, "format": _FORMAT,
                    "calib_shape": None if calib_ids is None else list(calib_ids.shape)}
        #: the level database holding the fits (``folder``: the levels cache folder; ``None``: in memory only)
        self.db = LevelDB(folder, self.key, len(refs)) if folder is not None else None
        self._fits: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self._checked: set[int] = set()

    # -- the store (the level database) --------------------------------------------------------------
    def _load(self, layer: int) -> None:
        db = self.db
        if db is None or db.path is None or not (db.path / "manifest.json").exists():
            return
        if layer not in self._checked:  # once per process: a file that fails its checksum is deleted and refitted
            db.verify([layer])
            self._checked.add(layer)
        if not db.done(layer):
            return
        for name, t in db.load(layer).items():
            part, _, field = name.partition(".")
            self._fits.setdefault((layer, part), {})[field] = t

    def _store(self, layer: int) -> None:
        if self.db is None:
            return
        tensors = {f"{part}.{field}": t for (i, part), fit in self._fits.items() if i == layer
                   for field, t in fit.items()}
        try:
            self.db.store(layer, tensors)
        except LevelDBError as exc:  # a full or read-only cache: the fits stay in memory for this process
            _log.warning("linear fits not stored: %s", exc)
            return
        self._checked.add(layer)

    def has(self, layer: int, part: str) -> bool:
        if (layer, part) not in self._fits:
            self._load(layer)
        return (layer, part) in self._fits

    # -- fitting -----------------------------------------------------------------------------------
    def ensure(self, needed: Iterable[tuple[int, str]]) -> None:
        """Fit every ``(layer, part)`` of ``needed`` not yet known -- and, in the same calibration pass, that part
        of every other block not yet known (a search soon needs them all; one pass instead of one per new
        block). Must run on the dense model."""
        missing = sorted({(i, p) for i, p in needed if not self.has(i, p)})
        if not missing:
            return
        wanted = {p for _, p in missing}
        missing = sorted({(i, p) for i in range(len(self.refs)) for p in wanted if not self.has(i, p)})
        if self.calib_ids is None:
            raise ValueError("linear levels are fitted on calibration tokens: give the Pruner calib_ids.")
        parts = {p for _, p in missing}
        layers = sorted({i for i, _ in missing})
        _log.info("fitting linear replacements", extra={"fields": {"layers": len(layers), "parts": sorted(parts)}})
        acc: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        handles = []
        inputs: list[tuple[nn.Module, Any]] = []

        def add(i: int, part: str, x: torch.Tensor, y: torch.Tensor) -> None:
            x2 = x.reshape(-1, x.shape[-1]).double()
            y2 = y.reshape(-1, y.shape[-1]).double()
            a = acc.setdefault((i, part), {"xtx": 0, "xty": 0, "yty": 0})
            a["xtx"] = a["xtx"] + x2.T @ x2
            a["xty"] = a["xty"] + x2.T @ y2
            a["yty"] = a["yty"] + (y2 * y2).sum()

        for i in layers:
            r = self.refs[i]
            seen: dict[str, torch.Tensor] = {}

            def layer_pre(mod, args, kwargs, seen=seen):
                seen["in"] = args[0] if args else kwargs["hidden_states"]

            def attn_hook(mod, args, kwargs, out, i=i, seen=seen):
                x = args[0] if args else kwargs["hidden_states"]
                seen["attn_x"] = x
                if "attn" in parts:
                    add(i, "attn", x, out[0] if isinstance(out, tuple) else out)

            def mlp_hook(mod, args, out, i=i):
                add(i, "mlp", args[0], out)

            def layer_hook(mod, args, kwargs, out, i=i, seen=seen):
                y = out[0] if isinstance(out, tuple) else out
                add(i, "block", seen["attn_x"], y - seen["in"])

            handles.append(r.attn.register_forward_hook(attn_hook, with_kwargs=True))
            if "mlp" in parts:
                handles.append(r.mlp.register_forward_hook(mlp_hook))
            if "block" in parts:
                handles.append(r.layer.register_forward_pre_hook(layer_pre, with_kwargs=True))
                handles.append(r.layer.register_forward_hook(layer_hook, with_kwargs=True))
        try:
            calibration_pass(self.model, self.calib_ids, inputs, batch_size=self.batch_size)
        finally:
            for h in handles:
                h.remove()
        for i, part in missing:
            a = acc[(i, part)]
            fit = fit_linear(a["xtx"], a["xty"], self.ridge)
            resid = a["yty"] - 2 * (fit * a["xty"]).sum() + (fit * (a["xtx"] @ fit)).sum()
            self._fits[(i, part)] = {"A": fit.float(), "xtx": a["xtx"].float(),
                                     "residual": (resid / a["yty"].clamp_min(1e-300)).float().reshape(())}
        for i in layers:
            self._store(i)

    def residual_share(self, layer: int, part: str) -> float:
        """``|Y - X A|^2 / |Y|^2`` of the full-rank fit on the calibration tokens."""
        return float(self._fits[(layer, part)]["residual"])

    def weights(self, layer: int, part: str, rank: int, *, dtype: torch.dtype,
                device: torch.device) -> dict[str, torch.Tensor]:
        """The :class:`~._modules.LinearReplacement` state dict of ``(layer, part)`` at ``rank``."""
        if not self.has(layer, part):
            self.ensure([(layer, part)])
        fit = self._fits[(layer, part)]
        a = fit["A"].double()
        h = a.shape[0]
        if rank >= h:
            return {"A.weight": a.T.to(dtype=dtype, device=device).contiguous()}
        u, v = low_rank(a, fit["xtx"], rank)
        return {"U.weight": u.T.to(dtype=dtype, device=device).contiguous(),
                "V.weight": v.T.to(dtype=dtype, device=device).contiguous()}


def fitted_linear(fits: LinearFits, layer: int, part: str, rank: int, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The one way to a fitted map: ``fits`` (a model and calibration fingerprint's store), block ``layer``,
    ``part`` (``"attn"``, ``"mlp"``, ``"block"``) at ``rank`` -> the replacement module's tensors."""
    if part not in LINEAR_PARTS:
        raise ValueError(f"linear part must be one of {LINEAR_PARTS}, got {part!r}.")
    return fits.weights(layer, part, rank, dtype=dtype, device=torch.device(device))
