"""The parts of a study config: data, calibration, stages, sampler and stop sections, and the
shared validation helpers (:mod:`evoprune.search._config` assembles them into :class:`StudyConfig`)."""

from __future__ import annotations

import contextvars
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .._device import DTYPE_BYTES
from .._validate import check_keys as _check_keys
from ..evaluators import check_window_offsets, normalize_windows
from ..space import METRICS

SAMPLER_NAMES: tuple[str, ...] = ("evolutionary", "tpe", "nsgaii", "random", "gp", "qmc")
"""Built-in sampler names; anything else must be an import path ``"pkg.mod:Class"``."""

_DTYPES = (*DTYPE_BYTES, "auto")  # the dtypes evoprune computes in (one list: _device.DTYPE_BYTES)
_EVALUATOR_TYPES = ("kl", "ppl", "latency", "cost", "lm_eval")
_DATA_SOURCES = ("reference", "text", "hub")
#: Evaluator types that score the stage's evaluation tokens (so eval_tokens must be >= 1).
_TOKEN_EVALUATORS = ("kl", "ppl")


def _pos_int(what: str, value: Any, *, zero: bool = False) -> int:
    low = 0 if zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an int >= {low}, got {value!r}.")
    return value


def _jsonable(what: str, value: Any) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be JSON-able (numbers, strings, lists, dicts), got {value!r}.") from None


def _from(cls: type, what: str, value: Any) -> Any:
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if not isinstance(value, Mapping):
        raise TypeError(f"StudyConfig.{what} must be a mapping or a {cls.__name__}, got {type(value).__name__}.")
    _check_keys(f"StudyConfig.{what}", value, [f.name for f in dataclasses.fields(cls)])
    return cls(**dict(value))


#: ``False`` while :meth:`StudyConfig.from_stored` reads a config back from a study database: the checks
#: that need the rooms that load torch (building the stage evaluators, resolving the objectives, the
#: importance methods, race options) ran when the config was stored, so reading a study (``evoprune
#: status``, ``show``, ...) does not run them again.
FULL_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("evoprune_full_config_checks", default=True)


# --------------------------------------------------------------------------- parts


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the calibration, fine-tuning (train) and evaluation (validation) tokens come from."""

    source: str = "reference"
    train: tuple[str, ...] = ()
    validation: tuple[str, ...] = ()
    calibration: tuple[str, ...] = ()
    path: str | None = None
    name: str | None = None
    text_field: str = "text"
    train_split: str = "train"
    validation_split: str = "validation"
    calibration_split: str | None = None
    max_documents: int | None = None
    #: Evaluation windows of the validation split: "random", "first" or a list of offsets.
    windows: Any = "random"
    #: dtype of raw ``.bin`` token files whose name does not say it (``*.u16.bin`` / ``*.u32.bin``).
    token_dtype: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "windows", normalize_windows(self.windows, what="StudyConfig.data.windows"))
        if self.token_dtype is not None and self.token_dtype not in ("uint16", "uint32"):
            raise ValueError(f"StudyConfig.data.token_dtype must be 'uint16' or 'uint32' (the ids of raw .bin token "
                             f"files), got {self.token_dtype!r}.")
        if self.source not in _DATA_SOURCES:
            raise ValueError(
                f"StudyConfig.data.source must be one of {_DATA_SOURCES}, got {self.source!r}."
            )
        for name in ("train", "validation", "calibration"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(str(v) for v in value))
            if any(not v.strip() for v in getattr(self, name)):
                raise ValueError(f"StudyConfig.data.{name} has an empty entry; give a text file, a folder or a "
                                 "glob pattern such as 'docs/**/*.txt'.")
        if self.source == "text":
            if not self.train or not self.validation:
                raise ValueError(
                    'StudyConfig.data: source "text" needs "train" and "validation" lists of text files, folders '
                    'or glob patterns (e.g. {"source": "text", "train": ["docs/train/"], "validation": ["docs/valid/*.txt"]}).'
                )
        elif self.train or self.validation or self.calibration:
            raise ValueError('StudyConfig.data: train/validation/calibration files are only used with source "text".')
        elif self.token_dtype is not None:
            raise ValueError('StudyConfig.data.token_dtype is only used with source "text" (for .bin token files).')
        if self.source == "hub" and not self.path:
            raise ValueError('StudyConfig.data: source "hub" needs "path" (a datasets id, e.g. "wikitext").')
        if self.max_documents is not None:
            _pos_int("StudyConfig.data.max_documents", self.max_documents)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for k in ("train", "validation", "calibration"):
            out[k] = list(out[k])
        # left out at their defaults, so the fingerprints of studies without them do not change
        if self.windows == "random":
            del out["windows"]
        elif isinstance(self.windows, tuple):
            out["windows"] = list(self.windows)
        if self.token_dtype is None:
            del out["token_dtype"]
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """Calibration tokens for importance scores: ``num_sequences`` x ``seq_len`` (both explicit);
    ``windows``: ``"random"`` (default), ``"first"`` or a list of window start offsets."""

    num_sequences: int = 32
    seq_len: int | None = None
    method: str = "activation"
    batch_size: int = 8
    windows: Any = "random"

    def __post_init__(self) -> None:
        object.__setattr__(self, "windows", normalize_windows(self.windows, what="StudyConfig.calibration.windows"))
        _pos_int("StudyConfig.calibration.num_sequences", self.num_sequences)
        if self.seq_len is None:
            raise ValueError(
                'StudyConfig.calibration: give seq_len explicitly (e.g. {"num_sequences": 32, "seq_len": 256}); '
                "evoprune never defaults it to the model's maximum context."
            )
        _pos_int("StudyConfig.calibration.seq_len", self.seq_len)
        _pos_int("StudyConfig.calibration.batch_size", self.batch_size)
        if FULL_CHECKS.get():
            from ..pruning import IMPORTANCE_METHODS  # pruning loads torch: checked unless read back from storage

            if self.method not in IMPORTANCE_METHODS:
                raise ValueError(f"StudyConfig.calibration.method must be one of {IMPORTANCE_METHODS}, "
                                 f"got {self.method!r}.")
        if isinstance(self.windows, tuple):
            _check_windows("StudyConfig.calibration.windows", self.windows, "calibration", self.num_sequences,
                           self.seq_len)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.windows == "random":  # left out at the default: fingerprints of older studies stay
            del out["windows"]
        elif isinstance(self.windows, tuple):
            out["windows"] = list(self.windows)
        return out


def _check_windows(what: str, offsets: tuple[int, ...], user: str, n: int, seq_len: int) -> None:
    """Offsets enough for ``n`` windows of ``seq_len`` tokens (of ``user``), not overlapping at ``seq_len``."""
    if n > len(offsets):
        raise ValueError(f"{what}: {user} needs {n} windows of {seq_len} tokens, but only {len(offsets)} offsets are "
                         "given; add offsets, or use fewer tokens or a longer seq_len.")
    try:
        check_window_offsets(offsets, seq_len)
    except ValueError as exc:
        reason = str(exc).partition(": ")[2]
        raise ValueError(f"{what}: {user} needs {n} windows of {seq_len} tokens; {reason}") from None


def check_eval_windows(data: "DataConfig", stages: Sequence["StageConfig"]) -> None:
    """``data.windows`` offsets against every stage that scores evaluation tokens (count and overlap);
    their range is checked when the data is loaded."""
    if not isinstance(data.windows, tuple):
        return
    for s in stages:
        if s.eval_tokens:
            _check_windows("StudyConfig.data.windows", data.windows, f"stage {s.name!r}",
                           -(-s.eval_tokens // s.seq_len), s.seq_len)


def _norm_evaluator(stage: str, spec: Any) -> dict[str, Any]:
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ValueError(
            f"StudyConfig.stages[{stage!r}].evaluators: each entry is a type name ({_EVALUATOR_TYPES} or "
            f"'pkg.mod:Class') or a dict with 'type' and options, got {spec!r}."
        )
    spec = _jsonable(f"stage {stage!r} evaluator", dict(spec))
    t = spec["type"]
    if t not in _EVALUATOR_TYPES and ":" not in t:
        raise ValueError(
            f"StudyConfig.stages[{stage!r}]: unknown evaluator type {t!r}; use one of {_EVALUATOR_TYPES} "
            "or an import path 'pkg.mod:Class'."
        )
    if t == "cost" and spec.get("metric", "params") not in METRICS:
        raise ValueError(f"StudyConfig.stages[{stage!r}]: cost metric must be one of {METRICS}, got {spec.get('metric')!r}.")
    if t == "lm_eval" and not spec.get("tasks"):
        raise ValueError(f"StudyConfig.stages[{stage!r}]: an lm_eval evaluator needs 'tasks'.")
    return spec


def parse_promote(promote: Mapping[str, Any], where: str = "promote") -> tuple[str, dict[str, Any]]:
    """The one reading of a stage's ``promote`` dict: ``(rule, kwargs)``, ``rule`` one of ``"top_k"``,
    ``"top_fraction"``, ``"race"`` and ``kwargs`` those of :class:`~evoprune.evaluators.TopK`,
    :class:`~evoprune.evaluators.TopFraction` or :class:`~evoprune.evaluators.Race`.

    >>> parse_promote({"top_k": 4}), parse_promote({"race": 2.0, "max_count": 3})
    (('top_k', {'k': 4}), ('race', {'z': 2.0, 'max_count': 3, 'min_count': 1}))
    """
    p = dict(promote)
    if set(p) == {"top_k"}:
        return "top_k", {"k": _pos_int(f"{where}.top_k", p["top_k"])}
    if "top_fraction" in p and set(p) <= {"top_fraction", "min_count"}:
        f = p["top_fraction"]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"{where}.top_fraction must be in (0, 1], got {f!r}.")
        return "top_fraction", {"fraction": float(f), "min_count": int(p.get("min_count", 1))}
    if "race" in p and set(p) <= {"race", "max_count", "min_count"}:
        return "race", {"z": p["race"], "max_count": p.get("max_count"), "min_count": p.get("min_count", 1)}
    raise ValueError(
        f'{where} must be null, {{"top_k": K}}, {{"top_fraction": F, "min_count": M}} or '
        f'{{"race": Z, "max_count": K}}; got {promote!r}.'
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageConfig:
    """One stage of the evaluation schedule (see :class:`evoprune.evaluators.Stage`).

    ``evaluators``: names (``"kl"``, ``"ppl"``, ``"latency"``, ``"cost"``,
    ``"lm_eval"``) or dicts ``{"type": "kl", "top_k": 256, "name": "kl"}``; an
    evaluator's default name is its type. ``promote``: ``None`` (everyone goes
    on), ``{"top_k": 4}``, ``{"top_fraction": 0.25, "min_count": 1}`` or
    ``{"race": 2.0, "max_count": 4, "min_count": 1}`` (:class:`~evoprune.evaluators.Race`:
    every candidate not worse than the incumbent by more than ``race`` standard errors of
    the paired per-window difference, at most ``max_count``). ``extends``: the name of an
    earlier stage whose windows this stage's start with (nested windows: a promoted
    candidate pays only for the new ones; same ``seq_len``, at least as many tokens).
    """

    name: str
    evaluators: tuple[Any, ...] = ("kl",)
    eval_tokens: int = 2048
    seq_len: int = 256
    finetune_tokens: int = 0
    finetune: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    promote: Mapping[str, Any] | None = None
    objective: str | None = None
    extends: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("StudyConfig.stages: every stage needs a non-empty 'name'.")
        evs = self.evaluators
        if isinstance(evs, (str, Mapping)):
            evs = (evs,)
        evs = tuple(_norm_evaluator(self.name, e) for e in evs)
        if not evs:
            raise ValueError(f"StudyConfig.stages[{self.name!r}] needs at least one evaluator (e.g. ['kl']).")
        object.__setattr__(self, "evaluators", evs)
        _pos_int(f"StudyConfig.stages[{self.name!r}].eval_tokens", self.eval_tokens, zero=True)
        scoring = [e["type"] for e in evs if e["type"] in _TOKEN_EVALUATORS]
        if self.eval_tokens == 0 and scoring:
            raise ValueError(
                f"StudyConfig.stages[{self.name!r}].eval_tokens is 0, but evaluator {scoring[0]!r} scores evaluation "
                f"tokens; give eval_tokens >= 1 (e.g. {max(2048, self.seq_len if isinstance(self.seq_len, int) else 0)})"
                ", or keep only cost/latency evaluators in this stage."
            )
        _pos_int(f"StudyConfig.stages[{self.name!r}].seq_len", self.seq_len)
        _pos_int(f"StudyConfig.stages[{self.name!r}].finetune_tokens", self.finetune_tokens, zero=True)
        object.__setattr__(self, "finetune", _jsonable("finetune", dict(self.finetune or {})))
        if FULL_CHECKS.get() and ({"loss", "temperature", "top_k"} & set(self.finetune)):
            from ..evaluators import check_distill

            check_distill(self.finetune.get("loss", "ce"), self.finetune.get("temperature", 1.0),
                          self.finetune.get("top_k", "auto"), where=f"StudyConfig.stages[{self.name!r}].finetune")
        if self.promote is not None:
            kind, kwargs = parse_promote(self.promote, f"StudyConfig.stages[{self.name!r}].promote")
            if kind == "race" and FULL_CHECKS.get():
                from ..evaluators import Race

                try:
                    Race(**kwargs)
                except ValueError as exc:
                    raise ValueError(f"StudyConfig.stages[{self.name!r}].promote: {exc}") from None
            object.__setattr__(self, "promote", dict(self.promote))

    def evaluator_names(self) -> list[str]:
        return [e.get("name", e["type"].rpartition(":")[2]) for e in self.evaluators]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "evaluators": [dict(e) for e in self.evaluators],
            "eval_tokens": self.eval_tokens,
            "seq_len": self.seq_len,
            "finetune_tokens": self.finetune_tokens,
            "finetune": dict(self.finetune),
            "promote": None if self.promote is None else dict(self.promote),
            "objective": self.objective,
            **({"extends": self.extends} if self.extends is not None else {}),
        }

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


def _check_sampler_options(name: str, options: Mapping[str, Any]) -> None:
    """Unknown options of a built-in sampler are a config error (caught before anything is written)."""
    import inspect

    import optuna

    from ._evolution import EvolutionarySampler
    from ._sweep import BudgetSweep

    classes = {"evolutionary": [EvolutionarySampler] + ([BudgetSweep] if "budget_sweep" in options else []),
               "tpe": [optuna.samplers.TPESampler], "nsgaii": [optuna.samplers.NSGAIISampler],
               "random": [optuna.samplers.RandomSampler], "gp": [optuna.samplers.GPSampler],
               "qmc": [optuna.samplers.QMCSampler]}.get(name)
    if classes is None:  # "pkg.mod:Class": its own constructor says
        return
    known = {"budget_mode", "seed"} | ({"budget_sweep", "sweep_metric"} if name == "evolutionary" else set())
    for cls in classes:
        known |= set(inspect.signature(cls).parameters) - {"self", "args", "kwargs"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"StudyConfig.sampler.options: unknown option(s) {unknown} for sampler {name!r}; it takes "
                         f"{', '.join(sorted(known))}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    """``name``: one of :data:`SAMPLER_NAMES` or ``"pkg.mod:Class"``; ``options``: its keyword arguments.

    Evolutionary options: those of :class:`~evoprune.search.EvolutionarySampler`
    plus ``budget_sweep: [0.8, 0.6, ...]`` (a :class:`~evoprune.search.BudgetSweep`
    over ratios of the first budget's metric, or ``sweep_metric``). Optuna
    samplers get their own constructor options; ``budget_mode`` (``"constrain"``
    / ``"repair"``) is taken out and given to the Searcher.
    """

    name: str = "evolutionary"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or (self.name not in SAMPLER_NAMES and ":" not in self.name):
            raise ValueError(
                f"StudyConfig.sampler.name must be one of {SAMPLER_NAMES} or an import path 'pkg.mod:Class', "
                f"got {self.name!r}."
            )
        object.__setattr__(self, "options", _jsonable("StudyConfig.sampler.options", dict(self.options or {})))
        _check_sampler_options(self.name, self.options)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": dict(self.options)}

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


@dataclasses.dataclass(frozen=True, kw_only=True)
class StopConfig:
    """Default stop conditions of :meth:`Searcher.run` (any that is set stops the search)."""

    n_trials: int | None = None
    n_generations: int | None = None
    max_tokens: int | None = None
    timeout: float | None = None

    def __post_init__(self) -> None:
        for name in ("n_trials", "n_generations", "max_tokens"):
            v = getattr(self, name)
            if v is not None:
                _pos_int(f"StudyConfig.stop.{name}", v)
        if self.timeout is not None and (not isinstance(self.timeout, (int, float)) or self.timeout <= 0):
            raise ValueError(f"StudyConfig.stop.timeout must be a positive number of seconds, got {self.timeout!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if v is not None}
