"""Search space: candidates, model facts, genes and levels, cost model, budgets (no torch models here).

>>> import numpy as np
>>> from evoprune.space import Budget, SearchSpace
>>> space = SearchSpace.from_model(
...     dict(model_type="qwen2", num_hidden_layers=4, hidden_size=64, num_attention_heads=8,
...          num_key_value_heads=4, intermediate_size=256, vocab_size=100),
...     attention="kv_groups", mlp_step=64, drop_blocks=True, sparsity_levels=(0, .5),
...     frozen_layers=(0,), budget=Budget(metric="params", max_ratio=0.7))
>>> cand = space.random(np.random.default_rng(0))      # repaired into the budget, slack filled up to it
>>> space.satisfies_budget(cand) and space.candidate_from_levels(space.levels_of(cand)) == cand
True

Count budgets say exactly what to drop (:data:`COUNT_METRICS`), e.g. "drop exactly 3 blocks":

>>> depth = SearchSpace.from_model(
...     dict(model_type="qwen2", num_hidden_layers=8, hidden_size=64, num_attention_heads=8,
...          num_key_value_heads=4, intermediate_size=256, vocab_size=100),
...     attention=None, mlp=False, drop_blocks=True, budget=Budget(metric="dropped_blocks", exactly=3))
>>> len(depth.random(0).kept_layers), sum(1 for _ in depth.enumerate())
(5, 56)

Budgets accept the metrics in :data:`BUDGET_METRICS` (:data:`METRICS` plus the counts);
:func:`resolve_mode` validates a space's ``mode`` and ``probe`` options (``"static"`` or
``"probe"``, :class:`ProbeSettings`; see :data:`PRUNING_MODES`).

Architectures come from one registry (:func:`get_arch`, :data:`SUPPORTED_MODEL_TYPES`);
``evoprune.pruning.register_adapter`` adds one. :func:`kept_per_row` is the one
sparsity rule shared by the cost model and the pruning masks.
"""

from typing import Any

from ._archs import ArchFacts, find_arch, get_arch, register_arch, registered_archs, registered_model_types  # noqa: F401
from ._candidate import ATTN_LINEARS, LINEAR_NAMES, MLP_LINEARS, Candidate, LayerConfig  # noqa: F401
from ._cost import BUDGET_METRICS, COUNT_METRICS, LATENCY_KINDS, METRICS, Budget, CostModel, LatencyTable  # noqa: F401
from ._space import ATTENTION_UNITS, GENE_KINDS, SPARSITY_GRANULARITIES, Gene, SearchSpace  # noqa: F401
from ._mode import PRUNING_MODES, ProbeSettings, resolve_mode  # noqa: F401
from ._sparsity import SPARSITY_PATTERNS, kept_per_row
from ._spec import ModelSpec

# Also importable, not part of the advertised API: ATTENTION_UNITS, ATTN_LINEARS, LATENCY_KINDS,
# MLP_LINEARS, SPARSITY_GRANULARITIES (option values, documented where they are used);
# registered_model_types (evoprune.pruning exports it); and the registry's writer side that
# evoprune.pruning's adapters build on: register_arch, registered_archs, find_arch.
__all__ = [
    "BUDGET_METRICS",
    "COUNT_METRICS",
    "GENE_KINDS",
    "LINEAR_NAMES",
    "METRICS",
    "PRUNING_MODES",
    "SPARSITY_PATTERNS",
    "SUPPORTED_MODEL_TYPES",
    "ArchFacts",
    "Budget",
    "Candidate",
    "CostModel",
    "Gene",
    "LatencyTable",
    "LayerConfig",
    "ModelSpec",
    "ProbeSettings",
    "SearchSpace",
    "get_arch",
    "kept_per_row",
    "resolve_mode",
]


def __getattr__(name: str) -> Any:
    if name == "SUPPORTED_MODEL_TYPES":  # derived from the registry: follows register_adapter
        return registered_model_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
