"""Plain values of the study database: canonical JSON, floats that MySQL cannot store, checked
names, and the frozen records its reads return. No SQL here.

>>> canonical_json({"b": [1, 2.5], "a": float("nan")})
'{"a":NaN,"b":[1,2.5]}'
>>> split_float(float("inf"), "value")
(None, 'inf')
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ATTR_PREFIX",
    "CANDIDATE_ATTR",
    "CANDIDATE_KEY_ATTR",
    "CLOSE_CALL_ATTR",
    "CREATOR_ATTR",
    "DUPLICATE_OF_ATTR",
    "FAIL_REASON_ATTR",
    "GROUP_ATTR",
    "INFEASIBLE_ATTR",
    "OBJECTIVE_ATTR",
    "PROMOTED_ATTR",
    "REPAIRED_ATTR",
    "RESAMPLED_ATTR",
    "RESAMPLED_REASONS",
    "SAMPLER_STATE_ATTR",
    "SOURCE_ATTR",
    "STAGE_ATTR",
    "STAGE_INDEX_ATTR",
    "STAGE_REACHED_ATTR",
    "Artifact",
    "StageOutcome",
    "StageRecord",
    "canonical_json",
    "check_name",
    "from_json",
    "is_resampled",
    "join_float",
    "naive",
    "sha256_text",
    "split_float",
]


# --------------------------------------------------------------------------- attribute names
# The one home of every ``"evoprune:*"`` Optuna attribute name: the search driver and its recorders
# write them, the database's reads, the status and the report read them.

ATTR_PREFIX = "evoprune:"
#: user attributes of a trial (see :mod:`evoprune.search`'s recorder): the candidate (``to_dict()``),
#: where it came from, its seed group, whether the driver repaired it, the last stage reached and its index
CANDIDATE_ATTR = ATTR_PREFIX + "candidate"
SOURCE_ATTR = ATTR_PREFIX + "source"
GROUP_ATTR = ATTR_PREFIX + "group"
REPAIRED_ATTR = ATTR_PREFIX + "repaired"
STAGE_REACHED_ATTR = ATTR_PREFIX + "stage_reached"
#: a close call settled on extra paired tokens (search/_evidence.py): the verdict, on the challenger's trial
CLOSE_CALL_ATTR = ATTR_PREFIX + "close_call"
STAGE_INDEX_ATTR = ATTR_PREFIX + "stage_index"
#: per-stage user attributes: ``STAGE_ATTR + stage`` (evaluator results), ``OBJECTIVE_ATTR + stage``
#: (the stage objective), ``PROMOTED_ATTR + stage`` (promoted at that stage)
STAGE_ATTR = ATTR_PREFIX + "stage:"
OBJECTIVE_ATTR = ATTR_PREFIX + "objective:"
PROMOTED_ATTR = ATTR_PREFIX + "promoted:"
#: study user attribute of the in-Optuna recorder: ``{"generation", "state"}`` of the generation sampler
SAMPLER_STATE_ATTR = ATTR_PREFIX + "sampler_state"
#: Optuna system attribute: why the reaper or the driver failed a trial
FAIL_REASON_ATTR = ATTR_PREFIX + "fail_reason"
#: Optuna user attributes the search driver sets on trials it tells without evaluating them, which
#: the database's reads (Pareto values, integrity check) must recognise: a trial outside the budget
#: (told placeholder values) and a trial that repeated an earlier candidate (told that one's values).
INFEASIBLE_ATTR = "evoprune:infeasible"
DUPLICATE_OF_ATTR = "evoprune:duplicate_of"
#: the candidate key of a trial, also as a user attribute so optuna-dashboard shows it
CANDIDATE_KEY_ATTR = "evoprune:candidate_key"
#: Optuna system attribute: the worker (``Owner.name``) that created a trial, written with the trial
#: itself, so the reaper can tell "created, not yet recorded" from "orphaned by a dead process"
CREATOR_ATTR = "evoprune:creator"
#: Optuna system attribute of a trial that is a *resampled proposal*, not a search trial: an Optuna
#: sampler's suggestion the driver told at once without evaluating it, and asked again, because it
#: was over the budget (``"over_budget"``: told its constraint violations and placeholder values),
#: repeated a candidate already seen (``"duplicate"``: told ``PRUNED``), or gave no candidate
#: (``"invalid"``: told ``FAIL``). The row stays so the sampler learns from it; reads that count
#: trials (status, show, report, check) leave it out.
RESAMPLED_ATTR = "evoprune:resampled"
RESAMPLED_REASONS = ("over_budget", "duplicate", "invalid")


def is_resampled(trial: Any) -> bool:
    """Whether a (frozen) trial is a resampled suggestion of an Optuna sampler -- told at once, never
    evaluated, not a trial of the search (system attribute :data:`RESAMPLED_ATTR`)."""
    return RESAMPLED_ATTR in trial.system_attrs


# --------------------------------------------------------------------------- JSON


def _plain(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)):
                raise TypeError(f"{where}: dict key {k!r} is not a string.")
            out[str(k)] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars, torch tensors
    if callable(tolist) and type(value).__module__.split(".")[0] in ("numpy", "torch"):
        return _plain(tolist(), where)
    raise TypeError(
        f"{where}: {type(value).__name__} is not JSON-able; store plain numbers, strings, lists and dicts."
    )


def canonical_json(value: Any, *, where: str = "value") -> str:
    """Canonical JSON text (sorted keys, no spaces) of ``value``; numpy/torch values become lists or
    numbers, non-finite floats are kept (``NaN``/``Infinity``, read back exactly by :func:`from_json`).

    >>> canonical_json({"b": [1, 2.5], "a": float("inf")})
    '{"a":Infinity,"b":[1,2.5]}'
    >>> canonical_json({"x": object()})
    Traceback (most recent call last):
    ...
    TypeError: value.x: object is not JSON-able; store plain numbers, strings, lists and dicts.
    """
    return json.dumps(_plain(value, where), sort_keys=True, separators=(",", ":"), allow_nan=True)


def from_json(text: str) -> Any:
    """The value of JSON text written by :func:`canonical_json` (``NaN``/``Infinity`` included)."""
    return json.loads(text)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def split_float(value: Any, what: str) -> tuple[float | None, str | None]:
    """A float column value and, for NaN/inf (which MySQL cannot store), its text."""
    if isinstance(value, bool) or value is None:
        raise TypeError(f"{what} must be a number, got {value!r}.")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {value!r}.") from None
    return (v, None) if math.isfinite(v) else (None, repr(v))


def join_float(value: float | None, text: str | None) -> float:
    """The float :func:`split_float` split into a column value and its text.

    >>> join_float(*split_float(float("-inf"), "x")), join_float(*split_float(0.5, "x"))
    (-inf, 0.5)
    """
    return float(text) if value is None and text else float(value if value is not None else math.nan)


def check_name(value: Any, what: str, max_len: int = 128) -> str:
    """``value`` if it is a non-empty string of at most ``max_len`` characters, else ``ValueError``."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}.")
    if len(value) > max_len:
        raise ValueError(f"{what} is longer than {max_len} characters: {value[:40]!r}...")
    return value


# --------------------------------------------------------------------------- rows as values


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """One evaluator result of one trial at one stage (as stored)."""

    trial_id: int
    stage: str
    evaluator: str
    tokens: int | None
    value: float
    seconds: float
    direction: str | None
    details: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StageOutcome:
    """A trial's objective at a stage and whether it was promoted."""

    trial_id: int
    stage: str
    stage_index: int
    objective: float
    direction: str | None
    promoted: bool | None
    seconds: float


@dataclasses.dataclass(frozen=True)
class Artifact:
    """An exported checkpoint."""

    id: int
    trial_id: int
    trial_number: int
    path: str
    sha256: str
    candidate_key: str
    candidate: dict[str, Any]
    metrics: dict[str, Any]


def naive(ts: Any) -> Any:
    """A database timestamp without its time zone (PostgreSQL's ``now()`` has one, SQLite's has none)."""
    return ts.replace(tzinfo=None) if getattr(ts, "tzinfo", None) is not None else ts
