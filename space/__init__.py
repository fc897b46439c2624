"""Search space: candidates, model facts, genes and levels, cost model, budgets (no torch models here).

>>> import numpy as np
>>> from evoprune.space import Budget, SearchSpace
>>> space = SearchSpace.from_model(
...     dict(model_type="qwen2", num_hidden_layers=4, hidden_size=64, num_attention_heads=8,
...          num_key_value_heads=4, intermediate_size=256, vocab_size=100),
...     attention="kv_groups", mlp_step=64, drop_blocks=True, sparsity_levels=(0, .5),
...     frozen_layers=(0,), budget=Budget(metric="params", max_ratio=0.7))
>>> cand = space.random(np.random.default_rng(0))      # uniform levels, then repaired into the budget
>>> space.satisfies_budget(cand) and space.candidate_from_levels(space.levels_of(cand)) == cand
True
"""

from ._candidate import ATTN_LINEARS, LINEAR_NAMES, MLP_LINEARS, SPARSITY_PATTERNS, Candidate, LayerConfig
from ._cost import LATENCY_KINDS, METRICS, Budget, CostModel, LatencyTable, kept_per_row
from ._space import ATTENTION_UNITS, GENE_KINDS, SPARSITY_GRANULARITIES, Gene, SearchSpace
from ._spec import SUPPORTED_MODEL_TYPES, ModelSpec

__all__ = [
    "ATTENTION_UNITS",
    "ATTN_LINEARS",
    "GENE_KINDS",
    "LATENCY_KINDS",
    "LINEAR_NAMES",
    "METRICS",
    "MLP_LINEARS",
    "SPARSITY_GRANULARITIES",
    "SPARSITY_PATTERNS",
    "SUPPORTED_MODEL_TYPES",
    "Budget",
    "Candidate",
    "CostModel",
    "Gene",
    "LatencyTable",
    "LayerConfig",
    "ModelSpec",
    "SearchSpace",
    "kept_per_row",
]
