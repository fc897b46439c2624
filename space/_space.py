"""`SearchSpace`: which genes are searched, their ordered levels, validity, budgets.

Level convention (EvoPress style): every gene has levels ``0 .. top``; **level 0
is dense** and each higher level is more compressed. Concretely, per decoder
block ``i`` that is not frozen:

==================  =============================================================
gene name           levels (values in ``Gene.levels``)
==================  =============================================================
``Li.block``        ``(1, 0)``: kept, dropped whole (``drop_blocks=True``)
``Li.attn``         kept attention units, descending from dense, then ``0`` if
                    ``drop_attention``; units are KV groups (``"kv_groups"``) or
                    query heads per KV group (``"q_per_group"``)
``Li.mlp``          kept MLP channels ``I, I-step, ..., mlp_min``, then ``0`` if
                    ``drop_mlp``
                    (``linear_ranks``: levels ``-r`` before the drop level, a fitted map)
``Li.sparsity``     sparsity of every linear of the block, ascending from 0
                    (``sparsity_granularity="layer"``)
``Li.q.sparsity``   ... one gene per linear ``q k v o gate up down``
                    (``sparsity_granularity="linear"``)
==================  =============================================================

Genes are ordered layer by layer, and inside a layer as in the table. A gene with
a single level is not a gene (nothing to choose). Neighbouring width levels
differ by the same number of units in every layer, so one step of a gene costs
the same in every layer (see :meth:`SearchSpace.step_savings`); the final "drop"
level also removes the sublayer's norm and is therefore not an equal step.

Budgets bound costs (``params``, ``flops``, ...) or counts: "drop exactly 3
blocks" is ``Budget(metric="dropped_blocks", exactly=3)`` on a space with
``drop_blocks=True``, "drop 2 attention and 2 MLP sublayers" is
``(Budget(metric="dropped_attn", exactly=2), Budget(metric="dropped_mlp", exactly=2))``
on a space with ``drop_attention=True, drop_mlp=True`` (see
:data:`~evoprune.space.COUNT_METRICS`). Random candidates, repair, level switches
and :meth:`SearchSpace.enumerate` keep every count.

``SearchSpace`` is assembled from three modules: this one (options, genes, costs
and budgets, serialization), :mod:`._levels` (levels <-> candidates, validation,
Optuna params) and :mod:`._moves` (uniform/random candidates, cheapest candidates,
step savings, budget repair, slack filling, enumeration).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .._validate import check_keys
from ._candidate import LINEAR_NAMES, Candidate, JsonValue
from ._cost import COUNT_METRICS, Budget, CostModel, LatencyTable
from ._levels import LevelsMixin
from ._mode import check_level_methods, resolve_mode
from ._moves import MovesMixin
from ._reach import ReachMixin
from ._spec import ModelSpec

ATTENTION_UNITS: tuple[str, ...] = ("kv_groups", "q_per_group")
"""Values of ``SearchSpace.attention`` (besides ``None``: attention width not searched)."""

SPARSITY_GRANULARITIES: tuple[str, ...] = ("layer", "linear")

GENE_KINDS: tuple[str, ...] = ("block", "attn", "mlp", "sparsity") + tuple(f"{n}.sparsity" for n in LINEAR_NAMES)
"""Gene kinds; a gene's name is ``f"L{layer}.{kind}"``."""

_SPACE_JSON_VERSION = 1
_STEPS = (256, 128, 64, 32, 16, 8, 4, 2, 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gene:
    """One searched decision: ``levels[0]`` is dense, higher indices compress more.

    Attributes:
        name: ``f"L{layer}.{kind}"``, e.g. ``"L3.mlp"`` or ``"L3.q.sparsity"``.
        kind: one of :data:`GENE_KINDS`.
        layer: index of the decoder block in the dense model.
        levels: the value at each level: kept units for ``attn`` (KV groups or
            query heads per group, ``0`` = dropped), kept channels for ``mlp``
            (``0`` = dropped), ``1``/``0`` (kept/dropped) for ``block``, the
            sparsity for ``*sparsity`` kinds.
    """

    name: str
    kind: str
    layer: int
    levels: tuple[Any, ...]

    @property
    def top(self) -> int:
        """Highest (most compressed) level index."""
        return len(self.levels) - 1

    @property
    def linear(self) -> str | None:
        """The logical linear of a per-linear sparsity gene, else ``None``."""
        return self.kind.split(".")[0] if self.kind.endswith(".sparsity") and "." in self.kind else None

    @property
    def drops(self) -> bool:
        """Whether the top level removes the sublayer (or block)."""
        return self.kind in ("block", "attn", "mlp") and self.levels[-1] == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchSpace(JsonValue, LevelsMixin, MovesMixin, ReachMixin):
    """The searched genes of one dense model, their levels, budgets and costs.

    Build it with :meth:`from_model` (a transformers model, config, dict or
    :class:`ModelSpec`); every argument is keyword-only and validated::

        >>> import numpy as np
        >>> from evoprune.space import Budget, ModelSpec, SearchSpace
        >>> spec = ModelSpec.from_config(dict(model_type="llama", num_hidden_layers=4, hidden_size=64,
        ...     num_attention_heads=8, num_key_value_heads=4, intermediate_size=256, vocab_size=100))
        >>> space = SearchSpace.from_model(spec, mlp_step=64, drop_blocks=True, frozen_layers=(0, -1),
        ...                                budget=Budget(metric="params", max_ratio=0.8))
        >>> [g.name for g in space.genes]
        ['L1.block', 'L1.attn', 'L1.mlp', 'L2.block', 'L2.attn', 'L2.mlp']
        >>> space.gene("L1.attn").levels, space.gene("L1.mlp").levels
        ((4, 3, 2, 1), (256, 192, 128, 64))
        >>> c = space.candidate_from_levels({"L1.mlp": 2, "L2.block": 1})
        >>> c.layers[1].mlp_channels, c.layers[2].dropped
        (128, True)
        >>> space.levels_of(c)
        {'L1.block': 0, 'L1.attn': 0, 'L1.mlp': 2, 'L2.block': 1, 'L2.attn': 0, 'L2.mlp': 0}
        >>> space.satisfies_budget(space.dense())
        False
        >>> r = space.repair(space.dense(), np.random.default_rng(0))
        >>> space.satisfies_budget(r), space.cost(r, "params") <= 0.8 * space.cost(space.dense(), "params")
        (True, True)
        >>> SearchSpace.from_json(space.to_json()) == space
        True

    Say exactly what to drop with count budgets; :meth:`random` lands next to the
    budget boundary, and small spaces can be listed with :meth:`enumerate`::

        >>> spec8 = ModelSpec.from_config(dict(model_type="llama", num_hidden_layers=8, hidden_size=64,
        ...     num_attention_heads=8, num_key_value_heads=4, intermediate_size=256, vocab_size=100))
        >>> depth = SearchSpace.from_model(spec8, attention=None, mlp=False, drop_blocks=True,
        ...                                budget=Budget(metric="dropped_blocks", exactly=3))
        >>> len(depth.random(0).kept_layers), len(list(depth.enumerate()))  # 8 choose 3
        (5, 56)
        >>> sub = SearchSpace.from_model(spec8, attention=None, mlp=False, drop_attention=True, drop_mlp=True,
        ...     budget=(Budget(metric="dropped_attn", exactly=2), Budget(metric="dropped_mlp", exactly=2)))
        >>> c = sub.random(0)
        >>> sum(l.attn_dropped for l in c.layers), sum(l.mlp_dropped for l in c.layers), len(list(sub.enumerate()))
        (2, 2, 784)
        >>> width = SearchSpace.from_model(spec8, mlp_step=32, budget=Budget(metric="params", max_ratio=0.8))
        >>> 0.75 < width.ratio(width.random(0), "params") <= 0.8   # slack filled up to the budget
        True

    Args:
        spec: the dense model's :class:`ModelSpec`.
        attention: ``"kv_groups"`` (keep k whole KV groups, each with all its
            query heads), ``"q_per_group"`` (keep m query heads in every KV group;
            all KV groups kept) or ``None`` (attention width not searched).
        attn_levels: kept units to offer (KV groups or query heads per group),
            must include the dense count; default: every count from dense to 1.
        mlp: search the MLP width.
        mlp_step: channels per MLP level step; must divide ``intermediate_size``.
            Default: the largest of 256, 128, ..., 1 that divides it and gives at
            least 8 levels.
        mlp_min: narrowest kept MLP width, a multiple of ``mlp_step`` (default ``mlp_step``).
        drop_attention, drop_mlp: add a top level that removes the sublayer.
        drop_blocks: add a ``Li.block`` gene whose level 1 removes the block.
        sparsity_levels: unstructured sparsity levels, ascending from 0.0, e.g.
            ``(0, .25, .5, .7)``; empty = sparsity not searched.
        sparsity_granularity: ``"layer"`` (one gene per block) or ``"linear"``
            (one gene per linear).
        pattern_2_4: use 2:4 semi-structured sparsity (levels must be ``(0, 0.5)``,
            the default when ``sparsity_levels`` is empty).
        frozen_layers: block indices (negative counts from the end) kept dense.
        budget: a :class:`Budget`, a sequence of them (one per metric) or ``None``;
            stored as a tuple, cost budgets first (in the order given), then count
            budgets (``dropped_blocks``, ``dropped_attn``, ``dropped_mlp``,
            ``dropped_sublayers``: whole numbers, e.g. ``Budget(metric="dropped_blocks",
            exactly=3)``; they need genes that drop what they count).
        seq_len: context length for the ``"flops"`` metric.
        kv_dtype_bytes: bytes per KV-cache element for ``"kv_bytes"``.
        latency: a :class:`LatencyTable` for the ``"latency"`` metric.
        mode: ``"static"`` (default: the top-k units by calibration importance) or ``"probe"``
            (the widths are applied per batch by Probe Pruning, see :mod:`evoprune.space._mode`).
        probe: :class:`~evoprune.space._mode.ProbeSettings` or its dict (probe mode only).
        linear_ranks: ranks of fitted linear maps that may replace what ``drop_*`` drops
            (``hidden_size``: full matrix), each a level ``-rank`` before a drop level.
        sparsity_method: where the sparsity levels come from. ``"auto"`` (default): ``"sparsegpt"`` in a
            static space with sparsity genes, else ``None``. ``"sparsegpt"`` (OBS reconstruction, the
            best-measuring: ``bench/levels.py``), ``"wanda"`` or ``"magnitude"`` (masks only): a level
            database built once (``evoprune.pruning``); with width genes the levels are computed on
            each width level's weights. ``None``: Wanda masks computed per candidate (no database; what
            a study config created before sparsegpt became the default keeps).
        width_method: ``None`` (default: slices) or ``"slice"`` / ``"obs"`` (o_proj / down_proj's kept
            columns updated by least squares) from the level database.
        level_dtype: the level database's storage dtype (``"float32"``, ``"float16"``, ``"bfloat16"``).
        level_inputs: where SparseGPT's Hessians come from: ``"dense"`` (default: the dense model's
            calibration inputs) or ``"sequential"`` (inputs through the earlier blocks compressed at
            the same level, as SparseGPT's script; needs ``sparsity_method: sparsegpt``).

    Attributes (derived, not compared): ``genes`` (tuple of :class:`Gene`) and
    ``cost_model`` (:class:`CostModel`).
    """

    spec: ModelSpec
    attention: str | None = "kv_groups"
    attn_levels: tuple[int, ...] | None = None
    mlp: bool = True
    mlp_step: int | None = None
    mlp_min: int | None = None
    drop_attention: bool = False
    drop_mlp: bool = False
    drop_blocks: bool = False
    sparsity_levels: tuple[float, ...] = ()
    sparsity_granularity: str = "layer"
    pattern_2_4: bool = False
    frozen_layers: tuple[int, ...] = ()
    budget: Any = ()
    seq_len: int = 2048
    kv_dtype_bytes: int = 2
    latency: LatencyTable | None = None
    mode: str = "static"
    probe: Any = None
    linear_ranks: tuple[int, ...] = ()
    sparsity_method: str | None = "auto"
    width_method: str | None = None
    level_dtype: str = "float32"
    level_inputs: str = "dense"
    genes: tuple[Gene, ...] = dataclasses.field(init=False, compare=False, repr=False)
    cost_model: CostModel = dataclasses.field(init=False, compare=False, repr=False)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_model(cls, model_or_config: Any, **options: Any) -> "SearchSpace":
        """Build a space for a transformers model or config, a config dict, or a :class:`ModelSpec`."""
        spec = model_or_config if isinstance(model_or_config, ModelSpec) else ModelSpec.from_config(model_or_config)
        return cls(spec=spec, **options)

    def __post_init__(self) -> None:
        spec = self.spec
        if not isinstance(spec, ModelSpec):
            raise TypeError(
                f"SearchSpace.spec must be a ModelSpec, got {type(spec).__name__}; use SearchSpace.from_model(model)."
            )
        for name in ("mlp", "drop_attention", "drop_mlp", "drop_blocks", "pattern_2_4"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SearchSpace.{name} must be True or False, got {getattr(self, name)!r}.")
        self._set("attn_levels", self._resolve_attention())
        step, mlp_min = self._resolve_mlp()
        self._set("mlp_step", step)
        self._set("mlp_min", mlp_min)
        self._set("sparsity_levels", self._resolve_sparsity())
        self._set("linear_ranks", self._resolve_linear())
        self._set("frozen_layers", self._resolve_frozen())
        self._set("probe", resolve_mode(self.mode, self.probe, sparsity=bool(self.sparsity_levels)))
        if self.sparsity_method == "auto":
            self._set("sparsity_method", "sparsegpt" if self.sparsity_levels and self.mode == "static" else None)
        check_level_methods(self.sparsity_method, self.width_method, self.level_dtype, mode=self.mode,
                            level_inputs=self.level_inputs)
        for name in ("seq_len", "kv_dtype_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SearchSpace.{name} must be a positive int, got {value!r}.")
        if self.latency is not None and not isinstance(self.latency, LatencyTable):
            raise TypeError("SearchSpace.latency must be a LatencyTable (see LatencyTable.fit) or None.")
        self._set("cost_model", CostModel(spec, seq_len=self.seq_len, kv_dtype_bytes=self.kv_dtype_bytes,
                                          latency_table=self.latency,
                                          kv_whole=self.probe is not None and self.probe.gqa == "reference"))
        self._set("budget", self._resolve_budget())
        self._build_genes()
        self._check_budget_reachable()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _resolve_attention(self) -> tuple[int, ...] | None:
        spec = self.spec
        if self.attention is None:
            if self.attn_levels is not None:
                raise ValueError("SearchSpace: attn_levels needs attention='kv_groups' or 'q_per_group'.")
            return None
        if self.attention not in ATTENTION_UNITS:
            raise ValueError(
                f"SearchSpace.attention must be one of {ATTENTION_UNITS} or None, got {self.attention!r}."
            )
        dense = spec.num_kv_heads if self.attention == "kv_groups" else spec.q_per_kv
        unit = "KV groups" if self.attention == "kv_groups" else "query heads per KV group"
        if self.attn_levels is None:
            if dense == 1:
                other = "q_per_group" if self.attention == "kv_groups" else "kv_groups"
                raise ValueError(
                    f"SearchSpace: attention={self.attention!r} has nothing to search: the model has 1 {unit[:-1]}. "
                    f"Use attention={other!r} or attention=None."
                )
            return tuple(range(dense, 0, -1))
        levels = _int_tuple("attn_levels", self.attn_levels)
        for u in levels:
            if u <= 0:
                raise ValueError(
                    f"SearchSpace.attn_levels must be positive ({unit} kept); use drop_attention=True to allow 0."
                )
            if u > dense:
                raise ValueError(
                    f"SearchSpace.attn_levels: {u} {unit} is more than the dense model has ({dense})."
                )
        if len(set(levels)) != len(levels):
            raise ValueError(f"SearchSpace.attn_levels has duplicates: {levels}.")
        if dense not in levels:
            raise ValueError(
                f"SearchSpace.attn_levels must include the dense width {dense} (level 0 is dense); got {levels}."
            )
        if len(levels) == 1 and not self.drop_attention:
            raise ValueError(
                "SearchSpace.attn_levels offers only the dense width; add narrower widths or use attention=None."
            )
        return tuple(sorted(levels, reverse=True))

    def _resolve_mlp(self) -> tuple[int | None, int | None]:
        size = self.spec.intermediate_size
        if not self.mlp:
            if self.mlp_step is not None or self.mlp_min is not None:
                raise ValueError("SearchSpace: mlp_step/mlp_min are only used with mlp=True.")
            return None, None
        step = self.mlp_step
        if step is None:
            step = next((s for s in _STEPS if size % s == 0 and size // s >= 8), 1)
            if self.pattern_2_4 and step % 4:
                raise ValueError(
                    f"SearchSpace: no automatic mlp_step that is a multiple of 4 divides intermediate_size={size}; "
                    "pass mlp_step or mlp=False."
                )
        if isinstance(step, bool) or not isinstance(step, int) or step <= 0:
            raise ValueError(f"SearchSpace.mlp_step must be a positive int, got {step!r}.")
        if size % step:
            divisors = [d for d in _STEPS if size % d == 0]
            raise ValueError(
                f"SearchSpace.mlp_step={step} does not divide intermediate_size={size}, so MLP steps would not be "
                f"equal; choose a divisor such as {divisors[0]}."
            )
        if self.pattern_2_4 and step % 4:
            raise ValueError(
                f"SearchSpace: with pattern_2_4 the MLP widths feed down_proj in groups of 4; "
                f"mlp_step={step} must be a multiple of 4."
            )
        mlp_min = step if self.mlp_min is None else self.mlp_min
        if isinstance(mlp_min, bool) or not isinstance(mlp_min, int) or mlp_min <= 0:
            raise ValueError(
                f"SearchSpace.mlp_min must be a positive int, got {mlp_min!r}; use drop_mlp=True to allow 0 channels."
            )
        if mlp_min > size:
            raise ValueError(f"SearchSpace.mlp_min={mlp_min} exceeds intermediate_size={size}.")
        if mlp_min % step:
            raise ValueError(
                f"SearchSpace.mlp_min={mlp_min} must be a multiple of mlp_step={step} (levels are {size}, "
                f"{size - step}, ...)."
            )
        if mlp_min == size and not self.drop_mlp:
            raise ValueError(
                f"SearchSpace: mlp_min={mlp_min} leaves only the dense MLP width; lower it or use mlp=False."
            )
        return step, mlp_min

    @property
    def uses_levels(self) -> bool:
        """Whether candidates take their weights from a level database (``sparsity_method`` or ``width_method`` set)."""
        return self.sparsity_method is not None or self.width_method is not None

    def _resolve_sparsity(self) -> tuple[float, ...]:
        if self.sparsity_granularity not in SPARSITY_GRANULARITIES:
            raise ValueError(
                f"SearchSpace.sparsity_granularity must be one of {SPARSITY_GRANULARITIES}, "
                f"got {self.sparsity_granularity!r}."
            )
        raw = tuple(self.sparsity_levels or ())
        if self.pattern_2_4 and not raw:
            raw = (0.0, 0.5)
        levels = []
        for value in raw:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"SearchSpace.sparsity_levels must be numbers in [0, 1), got {value!r}.")
            levels.append(float(value))
        if not levels:
            return ()
        if len(set(levels)) != len(levels):
            raise ValueError(f"SearchSpace.sparsity_levels has duplicates: {tuple(levels)}.")
        if 0.0 not in levels:
            raise ValueError(
                f"SearchSpace.sparsity_levels must include 0.0 (level 0 is dense); got {tuple(levels)}."
            )
        if len(levels) == 1:
            raise ValueError("SearchSpace.sparsity_levels=(0.0,) searches nothing; add levels such as 0.5 or pass ().")
        levels.sort()
        if self.pattern_2_4:
            if levels != [0.0, 0.5]:
                raise ValueError(
                    f"SearchSpace: pattern_2_4 keeps 2 of every 4 weights, so sparsity_levels must be (0.0, 0.5); "
                    f"got {tuple(levels)}."
                )
            if self.spec.hidden_size % 4 or self.spec.head_dim % 4:
                raise ValueError("SearchSpace: pattern_2_4 needs hidden_size and head_dim divisible by 4.")
        return tuple(levels)

    def _resolve_linear(self) -> tuple[int, ...]:
        h = self.spec.hidden_size
        ranks = _int_tuple("linear_ranks", self.linear_ranks or ())
        for r in ranks:
            if not 1 <= r <= h:
                raise ValueError(f"SearchSpace.linear_ranks: rank {r} is not in 1..{h} (the hidden size; {h}: full).")
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"SearchSpace.linear_ranks has duplicates: {ranks}.")
        if ranks and not (self.drop_attention or self.drop_mlp or self.drop_blocks):
            raise ValueError("SearchSpace.linear_ranks replace what is dropped: add drop_blocks, drop_attention or drop_mlp.")
        if ranks and self.mode != "static":
            raise ValueError("SearchSpace.linear_ranks needs mode: static (probe mode cannot hold linear maps).")
        return tuple(sorted(ranks, reverse=True))

    def _resolve_frozen(self) -> tuple[int, ...]:
        n = self.spec.num_layers
        out = set()
        for i in _int_tuple("frozen_layers", self.frozen_layers):
            if not -n <= i < n:
                raise ValueError(f"SearchSpace.frozen_layers: {i} is out of range for a model with {n} layers.")
            out.add(i % n)
        return tuple(sorted(out))

    def _resolve_budget(self) -> tuple[Budget, ...]:
        raw = self.budget
        if raw is None:
            budgets: tuple[Budget, ...] = ()
        elif isinstance(raw, Budget):
            budgets = (raw,)
        elif isinstance(raw, Iterable) and not isinstance(raw, (str, Mapping)):
            budgets = tuple(raw)
        else:
            raise TypeError(f"SearchSpace.budget must be a Budget, a sequence of Budgets or None, got {raw!r}.")
        seen = set()
        for b in budgets:
            if not isinstance(b, Budget):
                raise TypeError(f"SearchSpace.budget entries must be Budget objects, got {b!r}.")
            if b.metric in seen:
                raise ValueError(
                    f"SearchSpace.budget has two budgets on {b.metric!r}; merge them into one Budget "
                    "(it takes both a min_ and a max_ bound)."
                )
            if b.metric == "latency" and self.latency is None:
                raise ValueError("a 'latency' budget needs a measured table: pass latency=LatencyTable(...).")
            seen.add(b.metric)
        # cost budgets first: code that takes "the" budget ratio from the first budget sees a cost
        return tuple(b for b in budgets if not b.is_count) + tuple(b for b in budgets if b.is_count)

    def _build_genes(self) -> None:
        spec = self.spec
        genes: list[Gene] = []
        layer_genes: list[dict[str, int]] = []
        attn_values: tuple[int, ...] = ()
        if self.attention is not None:
            attn_values = tuple(self.attn_levels or ())
        elif self.drop_attention:
            attn_values = (spec.num_kv_heads,)
        linear = tuple(-r for r in self.linear_ranks)
        if self.drop_attention:
            attn_values = attn_values + linear + (0,)
        mlp_values: tuple[int, ...] = ()
        if self.mlp:
            assert self.mlp_step is not None and self.mlp_min is not None
            mlp_values = tuple(range(spec.intermediate_size, self.mlp_min - 1, -self.mlp_step))
        elif self.drop_mlp:
            mlp_values = (spec.intermediate_size,)
        if self.drop_mlp:
            mlp_values = mlp_values + linear + (0,)
        per_layer: list[tuple[str, tuple[Any, ...]]] = []
        if self.drop_blocks:
            per_layer.append(("block", (1, *linear, 0)))
        if len(attn_values) > 1:
            per_layer.append(("attn", attn_values))
        if len(mlp_values) > 1:
            per_layer.append(("mlp", mlp_values))
        if self.sparsity_levels:
            if self.sparsity_granularity == "layer":
                per_layer.append(("sparsity", self.sparsity_levels))
            else:
                per_layer.extend((f"{n}.sparsity", self.sparsity_levels) for n in LINEAR_NAMES)
        for i in range(spec.num_layers):
            index: dict[str, int] = {}
            if i not in self.frozen_layers:
                for kind, values in per_layer:
                    index[kind] = len(genes)
                    genes.append(Gene(name=f"L{i}.{kind}", kind=kind, layer=i, levels=values))
            layer_genes.append(index)
        if not genes:
            raise ValueError(
                "SearchSpace searches nothing: every layer is frozen or no gene is enabled; unfreeze layers or "
                "enable attention/mlp widths, drop_* or sparsity_levels."
            )
        self._set("genes", tuple(genes))
        self._set("_layer_genes", tuple(layer_genes))
        self._set("_gene_index", {g.name: k for k, g in enumerate(genes)})
        self._set("_dense_layer", spec.dense_layer())
        self._set("_dense_costs", {})

    # ------------------------------------------------------------------ genes and levels

    def gene(self, name: str) -> Gene:
        """The gene called ``name`` (e.g. ``"L3.mlp"``)."""
        try:
            return self.genes[self._gene_index[name]]
        except KeyError:
            raise KeyError(f"no gene {name!r} in this space; genes look like {self.genes[0].name!r}.") from None

    @property
    def gene_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.genes)

    def genes_of_kind(self, kind: str) -> tuple[Gene, ...]:
        """All genes of one kind (``"attn"``, ``"mlp"``, ``"block"``, ``"sparsity"``, ``"q.sparsity"``, ...)."""
        if kind not in GENE_KINDS:
            raise ValueError(f"unknown gene kind {kind!r}; use one of {GENE_KINDS}.")
        return tuple(g for g in self.genes if g.kind == kind)

    @property
    def num_configurations(self) -> int:
        """Number of level assignments (some give the same candidate, e.g. genes of a dropped block)."""
        return math.prod(g.top + 1 for g in self.genes)

    # ------------------------------------------------------------------ costs and budgets

    def cost(self, candidate: Candidate, metric: str) -> float:
        """``cost_model.cost(candidate, metric)`` (see :class:`CostModel`)."""
        return self.cost_model.cost(candidate, metric)

    def dense_cost(self, metric: str) -> float:
        """The dense model's cost in ``metric``: the reference of ratios and budget ratios.

        For a count metric (:data:`COUNT_METRICS`; the dense model drops nothing) it is
        what this space can drop (:meth:`max_count` without keeping a block), so
        :meth:`ratio` is the fraction of droppable blocks/sublayers dropped.
        """
        cache = self._dense_costs  # type: ignore[attr-defined]
        if metric not in cache:
            if metric in COUNT_METRICS:
                cache[metric] = self.max_count(metric, keep_one=False)
            else:
                cache[metric] = self.cost_model.cost(self.spec.dense_candidate(), metric)
        return cache[metric]

    def ratio(self, candidate: Candidate, metric: str) -> float:
        """``cost(candidate) / dense_cost(metric)`` (``0.0`` for a count the space cannot drop)."""
        dense = self.dense_cost(metric)
        cost = self.cost(candidate, metric)
        return cost / dense if dense or metric not in COUNT_METRICS else 0.0

    def budget_bounds(self) -> tuple[tuple[str, float | None, float | None], ...]:
        """``((metric, lo, hi), ...)`` of the budgets in absolute units."""
        return tuple((b.metric, *b.bounds(self.dense_cost(b.metric))) for b in self.budget)

    def constraints(self, candidate: Candidate) -> dict[str, float]:
        """Budget violations as Optuna constraint values (feasible when all ``<= 0``).

        Keys ``f"{metric}_max"`` / ``f"{metric}_min"``; values are
        ``(cost - hi) / dense`` and ``(lo - cost) / dense``. Pass them to
        ``trial.set_constraint(key, value)`` (or let :meth:`suggest` do it).
        """
        out: dict[str, float] = {}
        for metric, lo, hi in self.budget_bounds():
            cost, dense = self.cost(candidate, metric), self.dense_cost(metric)
            if hi is not None:
                out[f"{metric}_max"] = (cost - hi) / dense
            if lo is not None:
                out[f"{metric}_min"] = (lo - cost) / dense
        return out

    def satisfies_budget(self, candidate: Candidate) -> bool:
        """Whether every budget holds (``True`` without budgets)."""
        for metric, lo, hi in self.budget_bounds():
            cost = self.cost(candidate, metric)
            if (hi is not None and cost > hi) or (lo is not None and cost < lo):
                return False
        return True

    # ------------------------------------------------------------------ serialization

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description; :meth:`from_dict` rebuilds an equal space with identical genes."""
        return {
            "version": _SPACE_JSON_VERSION,
            "spec": self.spec.to_dict(),
            "attention": self.attention,
            "attn_levels": None if self.attn_levels is None else list(self.attn_levels),
            "mlp": self.mlp,
            "mlp_step": self.mlp_step,
            "mlp_min": self.mlp_min,
            "drop_attention": self.drop_attention,
            "drop_mlp": self.drop_mlp,
            "drop_blocks": self.drop_blocks,
            "sparsity_levels": list(self.sparsity_levels),
            "sparsity_granularity": self.sparsity_granularity,
            "pattern_2_4": self.pattern_2_4,
            "frozen_layers": list(self.frozen_layers),
            "budget": [b.to_dict() for b in self.budget],
            "seq_len": self.seq_len,
            "kv_dtype_bytes": self.kv_dtype_bytes,
            "latency": None if self.latency is None else self.latency.to_dict(),
            # written only in probe mode: static spaces keep their JSON (and key) unchanged
            **({"mode": self.mode, "probe": self.probe.to_dict()} if self.mode != "static" else {}),
            **({"linear_ranks": list(self.linear_ranks)} if self.linear_ranks else {}),
            # written only when set: spaces without a level database keep their JSON (and key) unchanged
            # written when set, or when a sparse space has none (from_dict's default would be "auto")
            **({"sparsity_method": self.sparsity_method}
               if self.sparsity_method is not None or self.sparsity_levels else {}),
            **({"width_method": self.width_method} if self.width_method is not None else {}),
            **({"level_dtype": self.level_dtype} if self.level_dtype != "float32" else {}),
            **({"level_inputs": self.level_inputs} if self.level_inputs != "dense" else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SearchSpace":
        data = dict(data)
        version = data.pop("version", _SPACE_JSON_VERSION)
        if version != _SPACE_JSON_VERSION:
            raise ValueError(
                f"SearchSpace JSON version {version} is not supported (expects {_SPACE_JSON_VERSION}); upgrade evoprune."
            )
        if "spec" not in data:
            raise ValueError("SearchSpace.from_dict needs a 'spec' entry (as written by to_dict()).")
        check_keys("SearchSpace.from_dict", data, (f.name for f in dataclasses.fields(cls) if f.init))
        data["spec"] = ModelSpec.from_dict(data["spec"])
        if data.get("attn_levels") is not None:
            data["attn_levels"] = tuple(data["attn_levels"])
        for key in ("sparsity_levels", "frozen_layers", "linear_ranks"):
            if key in data:
                data[key] = tuple(data[key])
        data["budget"] = tuple(Budget.from_dict(b) for b in data.get("budget") or ())
        if data.get("latency") is not None:
            data["latency"] = LatencyTable.from_dict(data["latency"])
        return cls(**data)


def _int_tuple(what: str, values: Any) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"SearchSpace.{what} must be a sequence of ints, got {values!r}.")
    out = tuple(values)
    for v in out:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"SearchSpace.{what} must contain ints, got {v!r}.")
    return tuple(int(v) for v in out)
