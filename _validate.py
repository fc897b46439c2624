"""Checks shared by every room's ``from_dict``: the one unknown-keys rule (one-line error saying what is
allowed). A root-level module so that ``space`` (the lowest room) and everything above it can use it.

>>> check_keys("Budget", {"metric": "params", "max_ratoi": 0.5}, ["metric", "max_ratio", "min_ratio"])
Traceback (most recent call last):
...
ValueError: Budget: unknown keys ['max_ratoi']; allowed keys are ['max_ratio', 'metric', 'min_ratio'].
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["check_keys"]


def check_keys(what: str, data: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Raise a one-line error if ``data`` is not a mapping or has keys outside ``allowed``."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{what} must be a mapping, got {type(data).__name__}: {data!r}.")
    allowed = list(allowed)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; allowed keys are {sorted(allowed)}.")
