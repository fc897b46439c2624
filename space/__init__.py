"""Search space: candidates, model facts, cost model (no torch models here)."""

from ._candidate import ATTN_LINEARS, LINEAR_NAMES, MLP_LINEARS, SPARSITY_PATTERNS, Candidate, LayerConfig
from ._spec import SUPPORTED_MODEL_TYPES, ModelSpec

__all__ = [
    "ATTN_LINEARS",
    "LINEAR_NAMES",
    "MLP_LINEARS",
    "SPARSITY_PATTERNS",
    "SUPPORTED_MODEL_TYPES",
    "Candidate",
    "LayerConfig",
    "ModelSpec",
]
