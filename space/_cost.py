"""Cost model: exact parameter counts, nonzero parameters, FLOPs, KV-cache bytes and latency.

Every metric is additive over blocks: ``cost = base + sum(layer_cost(layer))``, and
a block's cost is the sum of its attention part and its MLP part (each part
includes the norm in front of it). The search space relies on this to compute
exact per-step costs, the cheapest reachable candidate and fast budget repair.

Formulas (``H`` hidden size, ``hd`` head dim, ``V`` vocab, ``nq``/``nkv`` kept
query/KV heads, ``C`` kept MLP channels, ``T`` the cost model's ``seq_len``):

``params``
    ``V*H`` (embeddings) ``+ V*H`` (lm_head, unless tied) ``+ H`` (final norm),
    plus per block with attention kept: ``H`` (input_layernorm)
    ``+ H*nq*hd + 2*H*nkv*hd + nq*hd*H`` (q, k, v, o weights)
    ``+ nq*hd + 2*nkv*hd`` if the model has q/k/v biases ``+ H`` if it has an o bias
    ``+ 2*hd`` for Qwen3's q_norm/k_norm; per block with the MLP kept:
    ``H`` (post_attention_layernorm) ``+ 3*H*C`` (gate, up, down)
    ``+ 2*C + H`` if the model has MLP biases. Fused projections (Phi-3's
    ``qkv_proj``/``gate_up_proj``) have the same counts. This equals
    ``sum(p.numel() for p in model.parameters())`` of the materialized model.
``nonzero_params``
    ``params`` with each kept linear weight of shape ``(out, in)`` at sparsity
    ``s`` counted as ``out * kept_per_row(in, s)``, i.e. ``out * (in - floor(s * in))``
    (pruned per output row, as Wanda/SparseGPT do; 2:4 is ``s = 0.5`` and needs
    ``in`` divisible by 4). :func:`kept_per_row` is the rule the pruning masks
    use too. Embeddings, lm_head, norms and biases stay dense.
``flops``
    Forward FLOPs per token at context length ``T``: ``2 *`` (every kept linear
    weight ``+ V*H`` for the lm_head, tied or not) ``+ 4 * nq * hd * (T + 1) / 2``
    per block with attention (``q.k`` scores and the weighted sum of values, each
    ``2 * nq * hd`` FLOPs per attended position, over the average causal context
    ``(T + 1) / 2``). Biases, norms, activations and softmax are ignored;
    sparsity does not reduce FLOPs (dense kernels).
``kv_bytes``
    KV-cache bytes per token: ``2 * nkv * hd * kv_dtype_bytes`` summed over
    blocks that keep attention.
``latency``
    ``LatencyTable.base + sum(lookup("attn", nq) + lookup("mlp", C))`` over kept
    sublayers (needs a measured :class:`LatencyTable`).

Count metrics (:data:`COUNT_METRICS`, for budgets such as "drop exactly 3 blocks";
not cost objectives, so :attr:`CostModel.metrics` and :meth:`CostModel.costs` leave
them out): ``dropped_blocks`` (blocks removed whole), ``dropped_attn`` / ``dropped_mlp``
(attention / MLP sublayers removed, a dropped block's included) and
``dropped_sublayers`` (``dropped_attn + dropped_mlp``). They are additive over
blocks too (``0`` outside the blocks and for the dense model). A block or sublayer
replaced by a fitted linear map is not dropped: it counts 0 and costs
:meth:`CostModel.linear_cost` (its matrix or low-rank pair and its input norm).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .._validate import check_keys
from ._candidate import ATTN_LINEARS, MLP_LINEARS, Candidate, LayerConfig
from ._sparsity import kept_per_row
from ._spec import ModelSpec

METRICS: tuple[str, ...] = ("params", "nonzero_params", "flops", "kv_bytes", "latency")
"""Cost metrics understood by :class:`CostModel` and :class:`Budget` (and usable as objectives)."""

COUNT_METRICS: tuple[str, ...] = ("dropped_blocks", "dropped_attn", "dropped_mlp", "dropped_sublayers")
"""Count metrics for :class:`Budget` (e.g. ``Budget(metric="dropped_blocks", exactly=3)``): how many
blocks / attention sublayers / MLP sublayers / sublayers a candidate removes. Not objectives."""

BUDGET_METRICS: tuple[str, ...] = METRICS + COUNT_METRICS
"""Every metric a :class:`Budget` may bound."""

LATENCY_KINDS: tuple[str, ...] = ("attn", "mlp")


# --------------------------------------------------------------------------- latency


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatencyTable:
    """Measured latency of sublayers by width, usable as the ``"latency"`` metric.

    Args:
        entries: ``{(kind, width): seconds}`` (or ``((kind, width, seconds), ...)``),
            ``kind`` is ``"attn"`` (``width`` = query heads kept) or ``"mlp"``
            (``width`` = MLP channels kept). Normalized to a sorted tuple of triples.
        base: seconds spent outside the blocks (embeddings, final norm, lm_head).

    Use one unit and one measuring setup (batch, sequence length, device) for
    every entry. :meth:`lookup` interpolates linearly between measured widths and
    extrapolates from the two nearest ones (clamped at 0); a dropped sublayer
    (width 0) costs 0. Build one from raw timings with :meth:`fit`::

        >>> t = LatencyTable.fit([("mlp", 64, 2.0), ("mlp", 64, 2.2), ("mlp", 128, 4.0),
        ...                       ("attn", 8, 3.0), ("base", 0, 1.0)])
        >>> t.lookup("mlp", 64), t.lookup("mlp", 96), t.lookup("mlp", 0), t.base
        (2.1, 3.05, 0.0, 1.0)
        >>> LatencyTable.from_dict(t.to_dict()) == t
        True
    """

    entries: tuple[tuple[str, int, float], ...]
    base: float = 0.0

    def __post_init__(self) -> None:
        raw: Iterable[Any]
        if isinstance(self.entries, Mapping):
            raw = [(k[0], k[1], v) for k, v in self.entries.items()]
        else:
            raw = self.entries
        seen: dict[tuple[str, int], float] = {}
        for entry in raw:
            try:
                kind, width, seconds = entry
            except (TypeError, ValueError):
                raise ValueError(
                    f"LatencyTable.entries: expected (kind, width, seconds) or {{(kind, width): seconds}}, got {entry!r}."
                ) from None
            if kind not in LATENCY_KINDS:
                raise ValueError(f"LatencyTable: unknown kind {kind!r}; use one of {LATENCY_KINDS}.")
            if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
                raise ValueError(f"LatencyTable: width must be a positive int, got {width!r} for {kind!r}.")
            if (kind, width) in seen:
                raise ValueError(f"LatencyTable: ({kind!r}, {width}) given twice; use LatencyTable.fit to aggregate repeats.")
            seen[(kind, width)] = _check_seconds(f"LatencyTable[{kind!r}, {width}]", seconds)
        object.__setattr__(self, "entries", tuple((k, w, s) for (k, w), s in sorted(seen.items())))
        object.__setattr__(self, "base", _check_seconds("LatencyTable.base", self.base))

    def widths(self, kind: str) -> tuple[int, ...]:
        """Measured widths of ``kind``, ascending."""
        return tuple(w for k, w, _ in self.entries if k == kind)

    def lookup(self, kind: str, width: int) -> float:
        """Seconds for one ``kind`` sublayer of ``width`` (0 when ``width`` is 0)."""
        if kind not in LATENCY_KINDS:
            raise ValueError(f"LatencyTable.lookup: unknown kind {kind!r}; use one of {LATENCY_KINDS}.")
        if width == 0:
            return 0.0
        points = [(w, s) for k, w, s in self.entries if k == kind]
        if not points:
            raise ValueError(
                f"LatencyTable has no {kind!r} measurements; measure at least the dense {kind} width."
            )
        for w, s in points:
            if w == width:
                return s
        if len(points) == 1:
            w, s = points[0]
            return s * width / w
        if width < points[0][0]:
            (w0, s0), (w1, s1) = points[0], points[1]
        elif width > points[-1][0]:
            (w0, s0), (w1, s1) = points[-2], points[-1]
        else:
            i = next(i for i, (w, _) in enumerate(points) if w > width)
            (w0, s0), (w1, s1) = points[i - 1], points[i]
        return max(0.0, s0 + (s1 - s0) * (width - w0) / (w1 - w0))

    @classmethod
    def fit(
        cls, measurements: Iterable[Sequence[Any]], *, base: float | None = None, monotone: bool = True
    ) -> "LatencyTable":
        """Aggregate raw ``(kind, width, seconds)`` timings into a table.

        Repeats are reduced to their median. ``kind="base"`` rows (width ignored)
        give :attr:`base` unless ``base`` is passed. With ``monotone`` (default)
        each kind is made non-decreasing in width by isotonic regression, so noise
        never makes a narrower sublayer look slower.
        """
        groups: dict[tuple[str, int], list[float]] = {}
        base_rows: list[float] = []
        for row in measurements:
            try:
                kind, width, seconds = row
            except (TypeError, ValueError):
                raise ValueError(f"LatencyTable.fit: expected (kind, width, seconds) rows, got {row!r}.") from None
            if kind == "base":
                base_rows.append(_check_seconds("LatencyTable.fit base row", seconds))
                continue
            groups.setdefault((kind, width), []).append(_check_seconds(f"LatencyTable.fit[{kind!r}, {width}]", seconds))
        if not groups:
            raise ValueError("LatencyTable.fit: no 'attn' or 'mlp' measurements given.")
        table = {key: statistics.median(values) for key, values in groups.items()}
        if monotone:
            for kind in {k for k, _ in table}:
                keys = sorted(k for k in table if k[0] == kind)
                weights = [len(groups[k]) for k in keys]
                for key, value in zip(keys, _isotonic([table[k] for k in keys], weights)):
                    table[key] = value
        if base is None:
            base = statistics.median(base_rows) if base_rows else 0.0
        return cls(entries=table, base=base)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "entries": [{"kind": k, "width": w, "seconds": s} for k, w, s in self.entries],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LatencyTable":
        try:
            entries = tuple((e["kind"], e["width"], e["seconds"]) for e in data["entries"])
        except (KeyError, TypeError):
            raise ValueError("LatencyTable.from_dict: expected {'base': ..., 'entries': [{kind, width, seconds}]}.") from None
        return cls(entries=entries, base=data.get("base", 0.0))


def _count_value(what: str, value: Any) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a whole number >= 0, got {value!r}; e.g. exactly=3.")
    return value


def _check_seconds(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0 (seconds), got {value!r}.")
    return float(value)


def _isotonic(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Weighted least-squares non-decreasing fit (pool adjacent violators).

    Kept by hand: numpy has no isotonic fit, and scipy (``scipy.optimize.isotonic_regression``,
    scipy >= 1.12) is not a runtime dependency of evoprune for these dozen lines."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values, weights):
        blocks.append([float(v), float(w), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    out: list[float] = []
    for mean, _, count in blocks:
        out.extend([mean] * int(count))
    return out


# --------------------------------------------------------------------------- budget


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    """A bound on one cost metric, relative to the dense model or absolute.

    Give an upper bound (``max_ratio`` or ``max_value``), a lower bound
    (``min_ratio`` or ``min_value``) or both (a band, e.g. "between 45 % and
    50 % of the dense parameters")::

        >>> Budget(metric="params", max_ratio=0.5).bounds(1000)
        (None, 500.0)
        >>> Budget(metric="flops", min_ratio=0.4, max_value=900).bounds(1000)
        (400.0, 900.0)

    Count budgets (:data:`COUNT_METRICS`) say how many blocks or sublayers to drop: a
    whole number as ``exactly`` (stored as ``min_value == max_value``), ``max_value``
    and/or ``min_value``; a ratio there is a fraction of what the space can drop::

        >>> Budget(metric="dropped_blocks", exactly=3) == Budget(metric="dropped_blocks", min_value=3, max_value=3)
        True
        >>> Budget(metric="dropped_attn", exactly=2).bounds(8)
        (2, 2)

    Args:
        metric: one of :data:`METRICS` or :data:`COUNT_METRICS`.
        max_ratio, max_value: upper bound as a fraction of the dense cost, or absolute.
        min_ratio, min_value: lower bound as a fraction of the dense cost, or absolute.
        exactly: count metrics only: drop exactly this many (sets both ``min_value``
            and ``max_value``; ``exactly`` itself is then ``None``).
    """

    metric: str
    max_ratio: float | None = None
    max_value: float | None = None
    min_ratio: float | None = None
    min_value: float | None = None
    exactly: int | None = None

    def __post_init__(self) -> None:
        if self.metric not in BUDGET_METRICS:
            raise ValueError(f"Budget.metric must be one of {BUDGET_METRICS}, got {self.metric!r}.")
        count = self.metric in COUNT_METRICS
        unit = self.metric.partition("_")[2] if count else ""
        if self.exactly is not None:
            if not count:
                raise ValueError(
                    f"Budget.exactly is for count metrics {COUNT_METRICS}; for {self.metric!r} give a band "
                    "(min_ratio and max_ratio)."
                )
            if any(getattr(self, n) is not None for n in ("max_ratio", "max_value", "min_ratio", "min_value")):
                raise ValueError("Budget: give exactly=... alone, or min_value/max_value, not both.")
            exact = _count_value(f"Budget.exactly ({unit} to drop)", self.exactly)
            object.__setattr__(self, "min_value", exact)
            object.__setattr__(self, "max_value", exact)
            object.__setattr__(self, "exactly", None)
        for name in ("max_ratio", "max_value", "min_ratio", "min_value"):
            value = getattr(self, name)
            if value is None:
                continue
            if count and name.endswith("_value"):
                object.__setattr__(self, name, _count_value(f"Budget.{name} ({unit} dropped)", value))
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Budget.{name} must be a finite number >= 0, got {value!r}.")
            object.__setattr__(self, name, float(value))
        if self.max_ratio is not None and self.max_value is not None:
            raise ValueError("Budget: give max_ratio or max_value, not both.")
        if self.min_ratio is not None and self.min_value is not None:
            raise ValueError("Budget: give min_ratio or min_value, not both.")
        if self.max_ratio is None and self.max_value is None and self.min_ratio is None and self.min_value is None:
            raise ValueError("Budget needs a bound: pass max_ratio=... (e.g. 0.5) or max_value=..., or a min_.")
        if not count and (self.max_ratio == 0.0 or self.max_value == 0.0):
            raise ValueError("Budget: an upper bound of 0 cannot be met; use a positive max_ratio/max_value.")
        if self.max_ratio is not None and self.min_ratio is not None and self.min_ratio > self.max_ratio:
            raise ValueError(f"Budget: min_ratio={self.min_ratio} exceeds max_ratio={self.max_ratio}.")
        if self.max_value is not None and self.min_value is not None and self.min_value > self.max_value:
            raise ValueError(f"Budget: min_value={self.min_value} exceeds max_value={self.max_value}.")

    @property
    def is_count(self) -> bool:
        """Whether this budget bounds a count (:data:`COUNT_METRICS`) rather than a cost."""
        return self.metric in COUNT_METRICS

    def bounds(self, dense_cost: float) -> tuple[float | None, float | None]:
        """``(lo, hi)`` in absolute units given the dense model's cost (``None`` = unbounded); for a
        count metric ``dense_cost`` is what the space can drop (:meth:`SearchSpace.dense_cost`)."""
        hi = self.max_value if self.max_ratio is None else self.max_ratio * dense_cost
        lo = self.min_value if self.min_ratio is None else self.min_ratio * dense_cost
        return lo, hi

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Budget":
        check_keys("Budget.from_dict", data, (f.name for f in dataclasses.fields(cls)))
        return cls(**dict(data))


# --------------------------------------------------------------------------- cost model


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Costs of candidates of one dense model (see the module docstring for formulas).

    >>> from evoprune.space import ModelSpec
    >>> spec = ModelSpec.from_config(dict(model_type="llama", num_hidden_layers=2, hidden_size=64,
    ...     num_attention_heads=8, num_key_value_heads=4, intermediate_size=96, vocab_size=97))
    >>> cost = CostModel(spec, seq_len=128)
    >>> dense = spec.dense_candidate()
    >>> # embed + lm_head + final norm + 2 * (2 norms + q,k,v,o (64*64 + 2*32*64 + 64*64) + 3*64*96)
    >>> cost.params(dense) == 2 * 97 * 64 + 64 + 2 * (2 * 64 + 3 * 64 * 64 + 3 * 64 * 96)
    True
    >>> cost.params(dense)
    74176
    >>> cost.kv_bytes(dense)  # 2 layers * 2 (k and v) * 4 heads * 8 dims * 2 bytes
    256
    >>> half = dense.replace_layer(1, mlp_channels=48)
    >>> cost.params(dense) - cost.params(half)  # 48 channels * 3 * 64
    9216

    Args:
        spec: the dense model's :class:`ModelSpec`.
        seq_len: context length ``T`` for :meth:`flops`.
        kv_dtype_bytes: bytes per KV-cache element (2 for fp16/bf16).
        latency_table: measured :class:`LatencyTable` for the ``"latency"`` metric.
        kv_whole: K/V stay whole whatever the candidate's KV groups (Probe Pruning's ``gqa: reference``):
            ``k``/``v`` weights, FLOPs and KV cache count the model's KV heads, the candidate keeps
            ``num_kv_heads * q_per_kv`` query heads. These are the reference's costs; evoprune's
            implementation computes one K/V copy per kept query head (docs/probe-pruning.md).
    """

    spec: ModelSpec
    _: dataclasses.KW_ONLY
    seq_len: int = 2048
    kv_dtype_bytes: int = 2
    latency_table: LatencyTable | None = None
    kv_whole: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.spec, ModelSpec):
            raise TypeError(f"CostModel needs a ModelSpec (ModelSpec.from_config(config)), got {type(self.spec).__name__}.")
        for name in ("seq_len", "kv_dtype_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"CostModel.{name} must be a positive int, got {value!r}.")
        if self.latency_table is not None and not isinstance(self.latency_table, LatencyTable):
            raise TypeError("CostModel.latency_table must be a LatencyTable (see LatencyTable.fit).")

    @property
    def metrics(self) -> tuple[str, ...]:
        """Metrics this cost model can compute (``"latency"`` only with a table)."""
        return METRICS if self.latency_table is not None else METRICS[:-1]

    def _check_metric(self, metric: str) -> None:
        if metric not in BUDGET_METRICS:
            raise ValueError(f"unknown cost metric {metric!r}; use one of {METRICS} (or a count {COUNT_METRICS}).")
        if metric == "latency" and self.latency_table is None:
            raise ValueError("the 'latency' metric needs a measured table: pass latency=LatencyTable(...).")

    # ---- parts -------------------------------------------------------------

    def base_cost(self, metric: str, *, seq_len: int | None = None) -> float:
        """Cost outside the decoder blocks (embeddings, final norm, lm_head)."""
        self._check_metric(metric)
        if metric in COUNT_METRICS:
            return 0
        s = self.spec
        vh = s.vocab_size * s.hidden_size
        if metric in ("params", "nonzero_params"):
            return vh + (0 if s.tie_word_embeddings else vh) + s.hidden_size
        if metric == "flops":
            return 2 * vh
        if metric == "kv_bytes":
            return 0
        assert self.latency_table is not None
        return self.latency_table.base

    def attn_cost(
        self, num_kv_heads: int, q_per_kv: int, metric: str, *, sparsity: Mapping[str, float] | None = None,
        seq_len: int | None = None, pattern: str = "unstructured",
    ) -> float:
        """Cost of one attention sublayer (with its input norm); 0 when dropped.

        ``sparsity`` maps ``"q"``, ``"k"``, ``"v"``, ``"o"`` to levels (missing = 0) of the
        sparsity ``pattern``.
        """
        if num_kv_heads == 0:
            return 0
        s = self.spec
        h, hd = s.hidden_size, s.head_dim
        nq = num_kv_heads * q_per_kv
        q_out, kv_out = nq * hd, (s.num_kv_heads if self.kv_whole else num_kv_heads) * hd
        if metric == "kv_bytes":
            return 2 * kv_out * self.kv_dtype_bytes
        if metric == "latency":
            self._check_metric(metric)
            assert self.latency_table is not None
            return self.latency_table.lookup("attn", nq)
        shapes = s.attn_shapes(num_kv_heads, q_per_kv, kv_heads=s.num_kv_heads if self.kv_whole else None)
        if metric == "flops":
            t = self.seq_len if seq_len is None else seq_len
            return 2 * sum(r * c for _, r, c in shapes) + 2 * nq * hd * (t + 1)
        extra = h + (2 * hd if s.qk_norm else 0) + (q_out + 2 * kv_out if s.qkv_bias else 0) + (h if s.o_bias else 0)
        return self._weights_cost(shapes, extra, metric, sparsity, pattern)

    def mlp_cost(
        self, channels: int, metric: str, *, sparsity: Mapping[str, float] | None = None,
        pattern: str = "unstructured",
    ) -> float:
        """Cost of one MLP sublayer (with its input norm); 0 when dropped.

        ``sparsity`` maps ``"gate"``, ``"up"``, ``"down"`` to levels (missing = 0) of the
        sparsity ``pattern``.
        """
        if channels == 0:
            return 0
        s = self.spec
        h = s.hidden_size
        if metric == "kv_bytes":
            return 0
        if metric == "latency":
            self._check_metric(metric)
            assert self.latency_table is not None
            return self.latency_table.lookup("mlp", channels)
        shapes = s.mlp_shapes(channels)
        if metric == "flops":
            return 2 * sum(r * c for _, r, c in shapes)
        extra = h + (2 * channels + h if s.mlp_bias else 0)
        return self._weights_cost(shapes, extra, metric, sparsity, pattern)

    def linear_cost(self, rank: int, metric: str) -> float:
        """Cost of one fitted linear replacement of ``rank`` (with the input norm it keeps); 0 for rank 0.

        ``params``/``nonzero_params``: ``h*h + h`` at full rank, ``2*h*rank + h`` below it; ``flops``: twice
        the matrix parameters; ``kv_bytes``: 0; ``latency``: an MLP of the same multiply-adds in the table
        (``ceil(matrix params / (3 h))`` channels), an approximation."""
        if rank <= 0:
            return 0
        h = self.spec.hidden_size
        matrix = sum(r * c for _, r, c in self.spec.linear_shapes(rank))
        if metric in ("params", "nonzero_params"):
            return matrix + h
        if metric == "flops":
            return 2 * matrix
        if metric == "kv_bytes":
            return 0
        self._check_metric(metric)
        assert self.latency_table is not None
        return self.latency_table.lookup("mlp", -(-matrix // (3 * h)))

    def _weights_cost(self, shapes: Any, extra: int, metric: str, sparsity: Mapping[str, float] | None,
                      pattern: str) -> int:
        """``params`` / ``nonzero_params`` of a sublayer's linears ``(name, rows, in_features)`` plus
        ``extra`` (norms, biases: never sparse)."""
        if metric == "params":
            return sum(r * c for _, r, c in shapes) + extra
        if metric == "nonzero_params":
            sp = sparsity or {}
            return sum(r * kept_per_row(c, sp.get(n, 0.0), pattern) for n, r, c in shapes) + extra
        self._check_metric(metric)
        raise AssertionError(metric)

    def layer_cost(
        self, layer: LayerConfig, metric: str, *, seq_len: int | None = None, pattern: str = "unstructured"
    ) -> float:
        """Cost of one block: attention part + MLP part (``pattern``: the candidate's sparsity pattern)."""
        self._check_metric(metric)
        if metric in COUNT_METRICS:
            return _layer_count(layer, metric)
        attn_sp = mlp_sp = None
        if metric == "nonzero_params":
            attn_sp = {n: layer.sparsity_of(n) for n in ATTN_LINEARS}
            mlp_sp = {n: layer.sparsity_of(n) for n in MLP_LINEARS}
        return self.attn_cost(
            layer.num_kv_heads, layer.q_per_kv, metric, sparsity=attn_sp, seq_len=seq_len, pattern=pattern
        ) + self.mlp_cost(layer.mlp_channels, metric, sparsity=mlp_sp, pattern=pattern) + (
            self.linear_cost(layer.attn_linear, metric) + self.linear_cost(layer.mlp_linear, metric)
            + self.linear_cost(layer.block_linear, metric) if layer.replaced else 0)

    # ---- totals ------------------------------------------------------------

    def cost(self, candidate: Candidate, metric: str, *, seq_len: int | None = None) -> float:
        """Total cost of ``candidate`` in ``metric`` (ints except for latency).

        Raises ``ValueError`` for a 2:4 candidate whose sparse linears' widths are not
        multiples of 4 (see :meth:`ModelSpec.check_sparsity`)."""
        self._check_metric(metric)
        if candidate.num_layers != self.spec.num_layers:
            raise ValueError(
                f"candidate has {candidate.num_layers} layers but the model has {self.spec.num_layers}."
            )
        self.spec.check_sparsity(candidate)
        pattern = candidate.sparsity_pattern
        return self.base_cost(metric, seq_len=seq_len) + sum(
            self.layer_cost(layer, metric, seq_len=seq_len, pattern=pattern) for layer in candidate.layers
        )

    def params(self, candidate: Candidate) -> int:
        """Exact parameter count of the materialized model."""
        return int(self.cost(candidate, "params"))

    def nonzero_params(self, candidate: Candidate) -> int:
        """Parameters left nonzero after sparsity (embeddings, norms, biases dense)."""
        return int(self.cost(candidate, "nonzero_params"))

    def flops(self, candidate: Candidate, *, seq_len: int | None = None) -> int:
        """Forward FLOPs per token at context length ``seq_len`` (default: the model's)."""
        if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0):
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}.")
        return int(self.cost(candidate, "flops", seq_len=seq_len))

    def kv_bytes(self, candidate: Candidate) -> int:
        """KV-cache bytes per token."""
        return int(self.cost(candidate, "kv_bytes"))

    def latency(self, candidate: Candidate) -> float:
        """Predicted latency from the :class:`LatencyTable`."""
        return float(self.cost(candidate, "latency"))

    def costs(self, candidate: Candidate) -> dict[str, float]:
        """Every available metric of ``candidate``."""
        return {m: self.cost(candidate, m) for m in self.metrics}

    def dense_cost(self, metric: str) -> float:
        return self.cost(self.spec.dense_candidate(), metric)

    def ratio(self, candidate: Candidate, metric: str) -> float:
        """``cost(candidate) / cost(dense)`` (cost metrics only: the dense model drops nothing)."""
        if metric in COUNT_METRICS:
            raise ValueError(
                f"CostModel.ratio: {metric!r} is a count (the dense model drops nothing); use cost(), or "
                "SearchSpace.ratio (the fraction of what the space can drop)."
            )
        return self.cost(candidate, metric) / self.dense_cost(metric)

    # ---- serialization -----------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "seq_len": self.seq_len,
            "kv_dtype_bytes": self.kv_dtype_bytes,
            "latency_table": None if self.latency_table is None else self.latency_table.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CostModel":
        table = data.get("latency_table")
        return cls(
            ModelSpec.from_dict(data["spec"]),
            seq_len=data.get("seq_len", 2048),
            kv_dtype_bytes=data.get("kv_dtype_bytes", 2),
            latency_table=None if table is None else LatencyTable.from_dict(table),
        )


def _layer_count(layer: LayerConfig, metric: str) -> int:
    """``layer``'s contribution to a count metric (see the module docstring)."""
    # a part replaced by a fitted linear map is not dropped (it still computes something)
    if layer.block_linear:
        return 0
    attn = int(layer.attn_dropped and not layer.attn_linear)
    mlp = int(layer.mlp_dropped and not layer.mlp_linear)
    if metric == "dropped_blocks":
        return int(layer.dropped)
    if metric == "dropped_attn":
        return attn
    if metric == "dropped_mlp":
        return mlp
    return attn + mlp
