"""`create_study` / `load_study`: an evoprune study in an Optuna RDB database.

A study database is an ordinary Optuna database (``optuna.load_study`` and
``optuna-dashboard URL`` open it) plus evoprune's ``evoprune_*`` tables: the full
config, model and data fingerprints, each trial's candidate, every stage result,
the sampler state per generation, workers and claims, exported artifacts.
Resuming needs the storage URL and the study name, nothing else::

    import evoprune
    study = evoprune.create_study("studies/tiny.yaml")          # -> studies/tiny.db (SQLite, WAL)
    study.run(n_generations=5)
    # ... the process dies; later, anywhere:
    study = evoprune.load_study(storage="sqlite:///studies/tiny.db", study_name="tiny")
    study.run(n_generations=5)          # same config, stored sampler state, dead trials retried
    for point in study.pareto_front():
        print(point.number, point.values, point.candidate_key)
    study.export(study.pareto_front()[0].number, "out/best")
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .. import STUDY_VERBS, __version__, _stop
from .._fingerprint import directory_sha256
from .._logging import get_logger
from .._optuna_private import study_id, trial_id
from ..search import (
    SamplerExhausted,
    Searcher,
    StudyConfig,
    build_pipeline,
    build_runtime,
    make_sampler,
    objective_directions,
    study_sampler,
)
from ..space import Candidate
from ..storage import (
    Artifact,
    ConfigMismatchError,
    ReapReport,
    StageOutcome,
    StageRecord,
    StudyDatabase,
    check_storage,
    redact_url,
)
from ..storage.internal import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_HEARTBEAT_INTERVAL,
    DUPLICATE_OF_ATTR,
    Heartbeat,
    SQLRecorder,
    default_storage_url,
    is_resampled,
    open_rdb_storage,
    reap,
    stop_own,
    stored_study,
)
from ._pareto import pareto_front
from ._status import study_status

__all__ = ["EvoStudy", "ParetoPoint", "StudyNotFoundError", "create_study", "delete_study", "load_study",
           "register_study_verb"]

_log = get_logger("study")


class _FixedParamsSampler(optuna.samplers.BaseSampler):
    """Gives each new trial the next of a list of fixed params (per process: no shared enqueue queue)."""

    def __init__(self, queue: list[dict[str, int]]) -> None:
        self._queue = list(queue)
        self._current: dict[str, int] | None = {}

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
        return {}

    def before_trial(self, study: Any, trial: Any) -> None:
        self._current = self._queue.pop(0) if self._queue else None

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        if self._current is None:  # every candidate given (one was resampled: another worker took it)
            raise SamplerExhausted("no retried candidate left")
        if param_name not in self._current:
            raise RuntimeError(f"no fixed value for param {param_name!r} of the retried candidate")
        return self._current[param_name]


#: verbs of :class:`EvoStudy` that rooms above this one provide (``"report"``: :mod:`evoprune.report`),
#: so that this room never imports them: registered functions (:func:`register_study_verb`)
_STUDY_VERBS: dict[str, Any] = {}


def register_study_verb(name: str, function: Any) -> None:
    """Make ``function(study, *args, **kwargs)`` the study verb ``name`` (``EvoStudy.report`` is the verb
    ``"report"``, registered by :mod:`evoprune.report`)."""
    _STUDY_VERBS[name] = function


def study_verb(name: str) -> Any:
    """The function of study verb ``name``: registered, or else provided by the room the package declares
    for it (:data:`evoprune.STUDY_VERBS`, the composition root), which registers it when imported."""
    if name not in _STUDY_VERBS and name in STUDY_VERBS:
        module, _, attr = STUDY_VERBS[name].partition(":")
        _STUDY_VERBS.setdefault(name, getattr(importlib.import_module(module), attr))
    if name not in _STUDY_VERBS:
        raise LookupError(f"no study verb {name!r}; register one with evoprune.study.register_study_verb.")
    return _STUDY_VERBS[name]


class StudyNotFoundError(LookupError):
    """No study of that name in the database."""


@dataclasses.dataclass(frozen=True)
class ParetoPoint:
    """A non-dominated COMPLETE trial."""

    number: int
    trial_id: int
    values: tuple[float, ...]
    candidate_key: str | None


def _coerce_config(config: Any) -> tuple[StudyConfig, Path | None]:
    if isinstance(config, StudyConfig):
        return config, None
    if isinstance(config, Mapping):
        return StudyConfig.from_dict(config), None
    if isinstance(config, (str, os.PathLike)):
        path = Path(config).expanduser()
        return StudyConfig.from_file(path), path
    raise TypeError(f"config must be a StudyConfig, a dict or a path to a YAML/JSON file, got {type(config).__name__}.")


def study_directions(config: StudyConfig) -> list[str]:
    """Optuna directions of ``config.objectives`` (no model needed; see :func:`objective_directions`)."""
    return objective_directions(config.objectives, build_pipeline(config.stages))


def worker_seed(seed: int, index: int) -> int:
    """The Optuna sampler seed of the study's worker number ``index`` (:meth:`EvoStudy.worker_index`):
    ``seed`` itself for the first worker, else a 32-bit seed drawn from ``(seed, index)``.

    >>> worker_seed(7, 0), worker_seed(7, 1) == worker_seed(7, 1), worker_seed(7, 1) != worker_seed(7, 2)
    (7, True, True)
    """
    if index == 0:
        return int(seed)
    import numpy as np

    return int(np.random.SeedSequence([int(seed) % 2**32, int(index)]).generate_state(1)[0])


def _default_name(config: StudyConfig, path: Path | None) -> str:
    if path is not None:
        return path.stem
    return "evoprune-" + config.fingerprint[:8]


class EvoStudy:
    """An evoprune study: the Optuna study plus its evoprune rows. Get one from :func:`create_study`
    or :func:`load_study`.

    Attributes:
        name, url: study name and (password-free) storage URL.
        config: the :class:`~evoprune.search.StudyConfig` (as stored).
        optuna_study: the :class:`optuna.Study` (trials, params, values, states).
        storage: the :class:`optuna.storages.RDBStorage`.
        db: the :class:`~evoprune.storage.StudyDatabase` (evoprune's tables).
        recorder: a :class:`~evoprune.storage.SQLRecorder` for the search driver.
    """

    def __init__(self, *, storage: Any, optuna_study: Any, db: StudyDatabase, config: Any, url: str,
                 heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
                 grace_period: float = DEFAULT_GRACE_PERIOD) -> None:
        self.storage = storage
        self.optuna_study = optuna_study
        self.db = db
        self.config = config
        self._url = url
        self.heartbeat_interval = float(heartbeat_interval)
        self.grace_period = float(grace_period)
        self._recorder: SQLRecorder | None = None
        self.last_retried = 0
        #: the :class:`~evoprune.search.Runtime` built (or given) when the study was created, reused by
        #: :meth:`run` and :meth:`export` when they get none
        self.runtime: Any = None

    def __repr__(self) -> str:
        return f"EvoStudy(name={self.name!r}, url={self.url!r})"

    @property
    def recorder(self) -> SQLRecorder:
        """The :class:`~evoprune.storage.internal.SQLRecorder` the search driver writes through (built on
        first use: it needs the stage evaluators' directions, which reading a study does not)."""
        if self._recorder is None:
            stages = build_pipeline(self.config.stages).stages
            self._recorder = SQLRecorder(self.db, self.storage, directions={
                st.name: {**{ev.name: ev.direction for ev in st.evaluators}, "objective": st.direction}
                for st in stages
            })
        return self._recorder

    @recorder.setter
    def recorder(self, recorder: Any) -> None:
        self._recorder = recorder

    def close(self) -> None:
        """Release the study's database connections."""
        self.storage.engine.dispose()

    def __enter__(self) -> EvoStudy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def name(self) -> str:
        return self.db.study_name

    @property
    def url(self) -> str:
        return redact_url(self._url)

    @property
    def directions(self) -> list[str]:
        return [d.name.lower() for d in self.optuna_study.directions]

    # ------------------------------------------------------------------ reading
    def trials(self, states: Sequence[Any] | None = None, *, resampled: bool = False) -> list[Any]:
        """The study's trials (``FrozenTrial``, not copied: do not modify them). An Optuna sampler's
        resampled suggestions (over budget, already seen: told at once, never evaluated; system
        attribute ``"evoprune:resampled"``) are Optuna rows but not trials of the search: they are
        left out unless ``resampled``."""
        trials = self.optuna_study.get_trials(deepcopy=False, states=states)
        return trials if resampled else [t for t in trials if not is_resampled(t)]

    def _trial_id(self, number: int) -> int:
        try:
            return self.storage.get_trial_id_from_study_id_trial_number(self.db.optuna_study_id, int(number))
        except KeyError:
            n = len(self.trials(resampled=True))
            have = f"its trials are numbered 0..{n - 1}" if n else "it has no trials yet"
            raise LookupError(f"study {self.name!r} has no trial {number}; {have} (see `evoprune show`).") from None

    def candidate(self, number: int) -> Candidate:
        """The :class:`~evoprune.space.Candidate` trial ``number`` evaluated (for a resampled repeat of an
        earlier trial: the earlier trial's)."""
        tid = self._trial_id(number)
        found = self.db.candidate_of(tid)
        if found is None:
            earlier = self.storage.get_trial(tid).user_attrs.get(DUPLICATE_OF_ATTR)
            if earlier is not None and earlier != number:
                return self.candidate(int(earlier))
        if found is None:
            raise LookupError(f"trial {number} of study {self.name!r} has no recorded candidate.")
        return Candidate.from_json(found[1])

    def stage_records(self, number: int | None = None) -> list[StageRecord]:
        """Evaluator results (of trial ``number``, or all)."""
        return self.db.stage_records(None if number is None else self._trial_id(number))

    def stage_outcomes(self, number: int | None = None) -> list[StageOutcome]:
        """Stage objectives and promotion decisions (of trial ``number``, or all)."""
        return self.db.stage_outcomes(None if number is None else self._trial_id(number))

    def artifacts(self) -> list[Artifact]:
        return self.db.artifacts()

    def pareto_front(self) -> list[ParetoPoint]:
        """The non-dominated feasible COMPLETE trials, by trial number -- the trials of
        ``optuna_study.best_trials`` (ties kept), computed from one query over the value rows."""
        rows = self.db.complete_values(len(self.optuna_study.directions))
        keep = set(pareto_front([values for _, _, values, _ in rows], self.directions))
        return [ParetoPoint(number=n, trial_id=tid, values=values, candidate_key=key)
                for i, (n, tid, values, key) in enumerate(rows) if i in keep]

    @property
    def best_trials(self) -> list[Any]:
        """``FrozenTrial`` of every Pareto-front trial (the best trial for one objective, ties included)."""
        return [self.storage.get_trial(p.trial_id) for p in self.pareto_front()]

    def sampler_state(self) -> tuple[int, dict[str, Any]] | None:
        """The last saved ``(generation, state)`` of the study's generation sampler, or ``None``."""
        return self.db.load_sampler_state()

    def fingerprints(self) -> dict[str, str]:
        return self.db.fingerprints()

    def level_database(self) -> dict[str, Any] | None:
        """The level database the study's candidates took their weights from (path, digest, methods,
        dtype, bytes, build seconds, as recorded by the first runtime), or ``None``."""
        return self.db.fingerprint_details().get("levels") or None

    def check(self) -> list[str]:
        """Integrity problems of the study's rows (empty: sound)."""
        return self.db.integrity_problems()

    def status(self, *, window: float = 300.0) -> Any:
        """Where the study stands (:class:`~evoprune.study.StudyStatus`: trials by state, stage counts,
        best so far, tokens, evaluations/s over the last ``window`` seconds of activity, workers, ETA
        against the stored stop condition). Reads only."""
        return study_status(self, window=window)

    # ------------------------------------------------------------------ workers
    def reap(self) -> ReapReport:
        """Fail RUNNING trials of dead workers and release their claims so they are retried."""
        return reap(self.db, self.storage, grace_period=self.grace_period)

    def verify_fingerprints(self, fingerprints: Mapping[str, str], details: Mapping[str, Any] | None = None) -> None:
        """Store the model/data fingerprints on first use (with ``details``, e.g. the data file list);
        afterwards raise :class:`~evoprune.storage.FingerprintMismatchError` naming whichever changed."""
        fps = {k: v for k, v in fingerprints.items() if k in ("model", "data", "space", "data_files", "levels")}
        self.db.check_fingerprints(fps)
        self.db.record_fingerprints(fps, details)

    def build_runtime(self, **kwargs: Any) -> Any:
        """Load model and data of the stored config and check their fingerprints against the study's."""
        runtime = build_runtime(self.config, **kwargs)
        self.verify_fingerprints(runtime.fingerprints, runtime.fingerprint_details)
        return runtime

    def _checked_runtime(self, runtime: Any) -> Any:
        """``runtime``, or the one the study was created with, or a new one -- its fingerprints checked."""
        runtime = runtime if runtime is not None else self.runtime
        if runtime is None:
            return self.build_runtime()
        self.verify_fingerprints(runtime.fingerprints, getattr(runtime, "fingerprint_details", None))
        return runtime

    def run(
        self,
        n_trials: int | None = None,
        n_generations: int | None = None,
        *,
        timeout: float | None = None,
        max_tokens: int | None = None,
        runtime: Any = None,
        progress: bool = False,
        command: str = "run",
        retry_failed: bool = True,
    ) -> Any:
        """Search (or continue searching) with the stored config, sampler state and a heartbeat.

        Stops after any of ``n_trials``, ``n_generations``, ``timeout`` or ``max_tokens``
        (default: the config's ``stop`` section). Before searching, trials of dead workers
        are failed and their candidates released for retry; the model and data fingerprints
        must match the stored ones. With ``retry_failed``, candidates released by failed trials that
        the search did not take up again are evaluated afterwards (:meth:`retry_released`).
        Returns the :class:`~evoprune.search.SearchStats` of the search (``last_retried``: how many
        candidates the retry pass evaluated). An Optuna sampler of the config is seeded per worker
        (:meth:`_worker_sampler`): the study's first worker uses the config's seed.
        """
        stops = self.config.stops(n_trials=n_trials, n_generations=n_generations, timeout=timeout,
                                  max_tokens=max_tokens)
        runtime = self._checked_runtime(runtime)
        self.db.purge_orphans()  # rows of studies deleted with plain Optuna: their trial ids come back
        self.db.register_worker(command=command)
        sampler, budget_mode = self._worker_sampler(runtime)
        report = self.reap()
        if report:
            _log.warning(
                "recovered from dead workers",
                extra={"fields": {"failed_trials": report.failed_trials, "released": report.released_claims}},
            )
        heartbeat = Heartbeat(self.db, self.storage, interval=self.heartbeat_interval,
                              reap=self.reap, reap_every=self.grace_period)
        stopped = "crashed"
        try:
            with heartbeat, _stop.on_abort(lambda: stop_own(self.db, self.storage, "aborted by a second signal")):
                searcher = Searcher(runtime, self.optuna_study, sampler, self.recorder, budget_mode=budget_mode,
                                    progress=progress)
                stats = searcher.run(**stops)
                if retry_failed:
                    self.reap()  # workers that died during the search release their candidates now
                    self.last_retried = self.retry_released(runtime)
            stopped = f"finished ({stats.stopped_by})"
            return stats
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through the CLI (its message names the signal)
            stopped = f"interrupted ({exc})" if str(exc) else "interrupted"
            raise
        finally:
            try:  # fail what this process was running, release what it holds, mark its row stopped
                stop_own(self.db, self.storage, stopped)
            except Exception as exc:  # pragma: no cover - database gone; the search's own error wins
                _log.warning("could not mark this worker stopped: %s", exc)

    def worker_index(self) -> int:
        """This process' place among the study's workers in order of registration (0: the first to
        work on the study; a resume or a second worker gets 1, ...). Registers it if needed."""
        rows = self.db.workers()
        mine = [w["id"] for w in rows if w["owner"] == self.db.owner.name]
        if not mine:
            self.db.register_worker(command="run")
            return self.worker_index()
        return sum(1 for w in rows if w["id"] < mine[0])

    def _worker_sampler(self, runtime: Any) -> tuple[Any, str | None]:
        """The config's sampler for this worker. An Optuna sampler is seeded with
        :func:`worker_seed` of the config's seed (or its ``seed`` option) and :meth:`worker_index`,
        so workers on one study propose different sequences while the first worker -- a
        single-worker run -- keeps the config's seed and stays reproducible."""
        sampler, budget_mode = runtime.make_sampler()
        if not isinstance(sampler, optuna.samplers.BaseSampler):
            return sampler, budget_mode  # generation samplers share work through claims and saved state
        index = self.worker_index()
        if index == 0:
            return sampler, budget_mode
        options = dict(self.config.sampler.options)
        options["seed"] = worker_seed(int(options.get("seed", runtime.seed) or 0), index)
        _log.info("worker sampler seed", extra={"fields": {"worker_index": index, "seed": options["seed"]}})
        return make_sampler(self.config.sampler.name, options, seed=options["seed"], space=runtime.space)

    def retry_released(self, runtime: Any, *, limit: int | None = None) -> int:
        """Evaluate again the candidates whose trials failed (dead worker, evaluation error) and that
        nobody has claimed since: each becomes a new trial with the candidate's params, claimed,
        staged and told like any other. Returns how many were retried."""
        todo = self.db.retryable()[:limit]
        if not todo:
            return 0
        fixed = _FixedParamsSampler([runtime.space.params_of(Candidate.from_json(text)) for _, text in todo])
        own = self.optuna_study.sampler
        try:
            Searcher(runtime, self.optuna_study, fixed, self.recorder, budget_mode="repair",
                     progress=False).run(n_trials=len(todo))
        finally:
            self.optuna_study.sampler = own
        _log.info("retried candidates of failed trials", extra={"fields": {"study": self.name, "n": len(todo)}})
        return len(todo)

    # ------------------------------------------------------------------ report
    def report(self, path: str | os.PathLike[str] = "report.html", **options: Any) -> Path:
        """Write the study's self-contained HTML report (plots, Pareto table, config, fingerprints,
        versions) to ``path`` and return its absolute path; ``options`` go to
        :func:`evoprune.report.write_report` (e.g. ``trials=[3, 17]`` for the architecture heatmap).
        Reads the study only, so it works while the search runs (`evoprune report` does the same).
        The verb is provided by :mod:`evoprune.report` (:func:`study_verb`)."""
        return study_verb("report")(self, path, **options)

    # ------------------------------------------------------------------ export
    def export(self, number: int, out_dir: str | os.PathLike[str], *, runtime: Any = None,
               finetune_tokens: int = 0, finetune_lr: float = 1e-4, format: str = "hf",
               dtype: str | None = None, finetune_loss: str = "ce", finetune_temperature: float = 1.0) -> Artifact:
        """Write trial ``number``'s candidate as an HF checkpoint (``Pruner.export``) and record it
        (path, sha256 of the folder's files, candidate, metrics).

        ``finetune_tokens > 0`` heals the candidate first (:func:`evoprune.evaluators.healed`: the
        structure-preserving fine-tune on the train split, AdamW at ``finetune_lr``, loss ``finetune_loss``:
        ``"ce"``, ``"kl"`` -- distillation from the dense model at ``finetune_temperature`` -- or
        ``"kl+ce"``) and writes the
        healed weights; the artifact's ``metrics["healing"]`` holds the perplexity before and after on
        the last stage's ``eval_tokens`` (at most 16,384) and ``seq_len`` of the validation split.
        The dense model in memory is restored afterwards.

        ``format``: ``"hf"``, ``"gguf"`` (the HF folder plus ``model-<dtype>.gguf`` for llama.cpp) or
        ``"nemotron-nas"`` (DeciLM ``block_configs`` for vLLM); see ``Pruner.export``."""
        trial = self.storage.get_trial(self._trial_id(number))
        if trial.state != TrialState.COMPLETE:
            raise ValueError(
                f"trial {number} of study {self.name!r} is {trial.state.name}; only COMPLETE trials are exported "
                "(see `evoprune show` for the best ones)."
            )
        candidate = self.candidate(number)
        if format != "hf" or dtype is not None:
            from ..pruning import check_format_args  # deferred: the read-only verbs stay free of torch

            check_format_args(format, dtype)  # the rest is checked by Pruner.export before it writes
        out = Path(out_dir).expanduser().resolve()
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"{out} exists and is not an empty folder; choose a new --out folder.")
        runtime = self._checked_runtime(runtime)
        fmt = {"format": format, "dtype": dtype} if format != "hf" or dtype is not None else {}
        healing = None
        if finetune_tokens and getattr(runtime.pruner, "mode", "static") == "probe":
            raise ValueError("export: a probe-mode study prunes per batch and cannot be healed; use finetune_tokens=0.")
        if finetune_tokens:
            from ..evaluators import check_distill, healed

            check_distill(finetune_loss, finetune_temperature, where="export")

            if finetune_tokens < 0 or finetune_lr <= 0:
                raise ValueError(f"export: finetune_tokens must be >= 0 and finetune_lr > 0, got {finetune_tokens}, "
                                 f"{finetune_lr}.")
            last = self.config.stages[-1]
            ctx = runtime.context.for_stage("export-heal")
            with runtime.pruner.applied(candidate), healed(
                runtime.model, ctx, tokens=int(finetune_tokens), lr=finetune_lr, seq_len=last.seq_len,
                eval_tokens=min(last.eval_tokens or 4096, 16384), loss=finetune_loss, temperature=finetune_temperature,
            ) as healing:
                path = runtime.pruner.export(candidate, out, tokenizer=runtime.tokenizer, **fmt)
        else:
            path = runtime.pruner.export(candidate, out, tokenizer=runtime.tokenizer, **fmt)
        digest = directory_sha256(path)
        metrics: dict[str, Any] = {
            "values": dict(zip(self.config.objectives, trial.values)),
            "stages": {f"{r.stage}/{r.evaluator}": r.value for r in self.stage_records(number)},
            "params_ratio": runtime.space.ratio(candidate, "params"),
            "trial": number,
            "study": self.name,
            "fingerprints": self.fingerprints(),
            **({"healing": healing} if healing is not None else {}),
            **({"format": format, "dtype": dtype} if fmt else {}),
        }
        self.db.record_artifact(trial_id(trial), path=str(path), sha256=digest, metrics=metrics)
        return self.db.artifacts()[-1]


def create_study(
    config: Any,
    *,
    storage: str | os.PathLike[str] | None = None,
    study_name: str | None = None,
    load_if_exists: bool = True,
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    runtime: Any = None,
) -> EvoStudy:
    """Create (or, with ``load_if_exists``, open) an evoprune study.

    Nothing is written until everything that can be checked has been: the config, the storage
    (reachable, not a folder or a config file), an existing study of that name (an evoprune study
    with the same config and directions) and -- with ``runtime`` -- the model, data and budgets.
    A failed call therefore leaves the database as it was, and the same name can be used again.

    Args:
        config: a :class:`~evoprune.search.StudyConfig`, its dict, or a YAML/JSON file.
        storage: a SQLAlchemy URL (``sqlite:///file.db``, ``postgresql://user@host/db``,
            ``mysql://user@host/db``) or a file path; default: ``<config stem>.db`` next to the
            config file (``./evoprune.db`` for an in-memory config), SQLite in WAL mode.
        study_name: default: the config file's stem (or ``evoprune-<config digest>``).
        load_if_exists: open an existing study of that name instead of failing; its stored
            config must equal ``config`` (to continue it with its own config use :func:`load_study`),
            unless the study never started (its first run failed before any trial, e.g. on a missing
            model folder): then it takes ``config``.
        heartbeat_interval: seconds between heartbeats of a running search.
        grace_period: seconds without heartbeat after which a worker counts as dead.
        runtime: ``True`` to build the :class:`~evoprune.search.Runtime` (load model and data, check
            architecture, sequence lengths and budgets) before writing anything, or a Runtime built
            already; its fingerprints are recorded with the study, and :meth:`EvoStudy.run` /
            :meth:`EvoStudy.export` reuse it (``study.runtime``). ``None`` (default) loads nothing
            now: the first ``run`` builds it.

    Example::

        >>> import tempfile, os
        >>> from evoprune.search import StudyConfig
        >>> cfg = StudyConfig(model="reference:tiny", calibration={"num_sequences": 4, "seq_len": 32},
        ...                   stages=[{"name": "final", "evaluators": ["kl"], "eval_tokens": 256, "seq_len": 32}],
        ...                   objectives=["kl", "params"])
        >>> url = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "s.db")
        >>> study = create_study(cfg, storage=url, study_name="demo")
        >>> study.directions, study.name
        (['minimize', 'minimize'], 'demo')
        >>> load_study(storage=url, study_name="demo").config == cfg
        True
    """
    cfg, path = _coerce_config(config)
    url = check_storage(storage if storage is not None else default_storage_url(path), existing=False)
    name = study_name or _default_name(cfg, path)
    directions = study_directions(cfg)
    sampler = study_sampler(cfg)
    _check_existing(url, name, cfg, directions, load_if_exists)
    if runtime is True:
        runtime = build_runtime(cfg)
    elif runtime is not None and runtime is not False and getattr(runtime, "config", cfg) not in (None, cfg):
        raise ValueError("create_study: runtime was built from another config; pass runtime=True to build it.")
    # ---- everything checked: from here on the database is written
    rdb = open_rdb_storage(url)
    mark = StudyDatabase.row_mark(rdb.engine)
    created = True
    try:
        study = optuna.create_study(storage=rdb, study_name=name, directions=directions, sampler=sampler)
    except optuna.exceptions.DuplicatedStudyError:
        if not load_if_exists:
            raise _duplicated(name, url) from None
        study, created = optuna.load_study(study_name=name, storage=rdb, sampler=sampler), False
    stored = [d.name.lower() for d in study.directions]
    if stored != directions:  # created by someone else since the check above
        raise ValueError(
            f"study {name!r} exists with directions {stored}, but this config's objectives need {directions}; "
            "choose another study name."
        )
    db = StudyDatabase.create_or_open(rdb.engine, optuna_study_id=study_id(study), study_name=name,
                                      config=cfg.to_dict(), evoprune_version=__version__,
                                      orphans_upto=mark if created else None, replace_unstarted=True,
                                      config_digest=cfg.digest)
    evo = EvoStudy(storage=rdb, optuna_study=study, db=db, config=cfg, url=url,
                   heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    if runtime:
        evo.verify_fingerprints(runtime.fingerprints, getattr(runtime, "fingerprint_details", None))
        evo.runtime = runtime
    _log.info("study ready", extra={"fields": {"study": name, "storage": redact_url(url), "created": created}})
    return evo


def _duplicated(name: str, url: str) -> optuna.exceptions.DuplicatedStudyError:
    return optuna.exceptions.DuplicatedStudyError(
        f"study {name!r} already exists in {redact_url(url)}; continue it with `evoprune resume --storage URL "
        f"--study {name}` / evoprune.load_study(...), or choose another study_name."
    )


def _check_existing(url: str, name: str, cfg: StudyConfig, directions: list[str], load_if_exists: bool) -> None:
    """Refuse, before anything is written, a study of that name that this config cannot continue."""
    found = stored_study(url, name)
    if found is None:
        return
    if not load_if_exists:
        raise _duplicated(name, url)
    if not found["evoprune"]:
        raise LookupError(
            f"study {name!r} in {redact_url(url)} is a plain Optuna study (no evoprune config); evoprune cannot "
            "continue it: choose another --study name."
        )
    if found["directions"] != directions:
        raise ValueError(
            f"study {name!r} exists with directions {found['directions']}, but this config's objectives need "
            f"{directions}; choose another --study name."
        )
    if found["config_sha256"] != cfg.digest and found["started"]:
        raise ConfigMismatchError(
            f"study {name!r} already exists with a different config; continue it with `evoprune resume --study "
            f"{name} --storage URL` (which uses the stored config), choose a new --study name for the new config, "
            f"or remove the old study with `evoprune delete-study --study {name} --storage URL`."
        )


def load_study(
    *,
    storage: str | os.PathLike[str],
    study_name: str,
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: float = DEFAULT_GRACE_PERIOD,
) -> EvoStudy:
    """Open an existing evoprune study: its stored config, fingerprints, sampler state and trials.

    Raises:
        StudyNotFoundError: no such study (the message lists the studies that exist).
        LookupError: the study is a plain Optuna study without evoprune data.
    """
    url = check_storage(storage, existing=True)  # never creates a database
    rdb = open_rdb_storage(url)
    study = _load_optuna(rdb, study_name, url)
    db = StudyDatabase.open(rdb.engine, optuna_study_id=study_id(study), study_name=study_name)
    config = StudyConfig.from_stored(db.config())
    study.sampler = study_sampler(config)
    return EvoStudy(storage=rdb, optuna_study=study, db=db, config=config, url=url,
                    heartbeat_interval=heartbeat_interval, grace_period=grace_period)


def _load_optuna(rdb: Any, study_name: str, url: str) -> Any:
    try:
        return optuna.load_study(study_name=study_name, storage=rdb)
    except KeyError:
        names = [s.study_name for s in rdb.get_all_studies()]
        rdb.engine.dispose()
        raise StudyNotFoundError(
            f"no study named {study_name!r} in {redact_url(url)}; studies there: {names or 'none'}. "
            "List them with `evoprune studies --storage URL`."
        ) from None
