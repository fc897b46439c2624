"""The one sparsity rule: how many weights one output row keeps.

The cost model (``nonzero_params``) and the pruning backend's masks both call
:func:`kept_per_row`, so the counted and the materialized nonzeros cannot drift apart.
"""

from __future__ import annotations

import math

SPARSITY_PATTERNS: tuple[str, ...] = ("unstructured", "2:4")
"""``"unstructured"``: any level in ``[0, 1)``; ``"2:4"``: level 0 or 0.5, two of every
four consecutive inputs of a row kept (the input width must be a multiple of 4)."""


def check_sparsity(level: float, pattern: str, in_features: int | None = None) -> None:
    """Raise ``ValueError`` unless ``level`` (on a linear with ``in_features`` inputs, when known)
    is allowed by ``pattern``."""
    if pattern not in SPARSITY_PATTERNS:
        raise ValueError(f"unknown sparsity pattern {pattern!r}; use one of {SPARSITY_PATTERNS}.")
    if not 0.0 <= level < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {level!r}.")
    if pattern != "2:4" or level == 0:
        return
    if level != 0.5:
        raise ValueError(f"2:4 sparsity keeps two of every four weights, so its level must be 0 or 0.5; got {level}.")
    if in_features is not None and in_features % 4:
        raise ValueError(
            f"2:4 sparsity needs an input width divisible by 4, got {in_features}; keep a multiple of 4 "
            "(heads * head_dim, MLP channels) or set this linear's sparsity to 0."
        )


def kept_per_row(in_features: int, sparsity: float, pattern: str = "unstructured") -> int:
    """Weights kept in one output row of a linear with ``in_features`` inputs at ``sparsity``.

    ``in_features - floor(sparsity * in_features)`` (the ``1e-9`` guards against float
    products such as ``0.29 * 100 = 28.999999999999996``); with ``pattern="2:4"`` the level
    must be 0 or 0.5 and, when sparse, ``in_features`` a multiple of 4 (``ValueError`` otherwise).

    >>> kept_per_row(64, 0.5), kept_per_row(64, 0.7), kept_per_row(100, 0.29), kept_per_row(8, 0.5, "2:4")
    (32, 20, 71, 4)
    >>> kept_per_row(6, 0.5, "2:4")
    Traceback (most recent call last):
    ValueError: 2:4 sparsity needs an input width divisible by 4, got 6; ...
    """
    check_sparsity(sparsity, pattern, in_features)
    return in_features - math.floor(sparsity * in_features + 1e-9)
