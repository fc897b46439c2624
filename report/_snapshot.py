"""A read-only snapshot of a study: what every plot and the HTML report draw from.

:func:`load_snapshot` reads a study once through the study facade's storage reads (candidates with
their states, the values of feasible COMPLETE trials, every stage record and outcome, fingerprints)
and never writes. It works on a finished or a still-running study (whatever has finished so far).
Cost ratios (params, FLOPs, KV bytes, ...) are computed from each stored candidate with the study's
:class:`~evoprune.space.SearchSpace`, rebuilt from the stored config and the model's ``config.json``
alone (no weights); where that config cannot be read, the snapshot has no costs and
:attr:`StudySnapshot.space_note` says why.

Every plot function accepts an :class:`~evoprune.study.EvoStudy`, a ``(storage URL, study name)``
pair or a :class:`StudySnapshot` (pass one snapshot to several plots to read the database once).
A snapshot can also be built by hand from plain values (tests, notebooks):

>>> from evoprune.search import StudyConfig
>>> from evoprune.space import Candidate, LayerConfig
>>> cfg = StudyConfig(model="reference:tiny", calibration={"num_sequences": 4, "seq_len": 32},
...                   stages=[{"name": "final", "evaluators": ["kl"], "eval_tokens": 256, "seq_len": 32}],
...                   objectives=["kl"])
>>> c = Candidate(layers=(LayerConfig(num_kv_heads=1, q_per_kv=2, mlp_channels=64),))
>>> snap = StudySnapshot(name="demo", url="sqlite:///demo.db", config=cfg, directions=("minimize",),
...                      trials=[TrialView(number=0, trial_id=1, state="COMPLETE", source="seed",
...                                        candidate_json=c.to_json(), values=(0.25,))])
>>> snap.complete_numbers(), snap.value(0, "kl"), snap.trial(0).source
([0], 0.25, 'seed')
>>> snap.trial(7)
Traceback (most recent call last):
...
ValueError: study 'demo' has no trial 7 with a candidate (it has trials 0-0); pick a trial number from the report's Pareto table or `evoprune show`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from .._logging import get_logger
from ..data import built_reference_model
from ..evaluators import KLToDense, Latency
from ..search import build_pipeline, objective_source, resolve_model_path, space_from_config
from ..study import load_study, pareto_front
from ..space import METRICS, Candidate, SearchSpace
from ._arch import ArchSummary, DenseWidths, summarize

__all__ = ["StudySnapshot", "TrialView", "load_snapshot", "study_space"]

_log = get_logger("report")


@dataclasses.dataclass(frozen=True)
class TrialView:
    """One trial as the report sees it.

    ``values``: the objective values of a feasible COMPLETE trial, else ``None``; ``source``: where
    its candidate came from (``"seed"`` for baselines and user seeds, ``"initial"``, ``"evolution"``,
    ``"sampler"``, ``"duplicate"``, ...).
    """

    number: int
    trial_id: int
    state: str
    source: str = ""
    candidate_json: str | None = None
    values: tuple[float, ...] | None = None


def _model_path(config: Any) -> str:
    """The folder (or hub id) of the study's model, never building or downloading anything."""
    model = config.model
    if model.startswith("reference:"):
        size = model.partition(":")[2]
        path = built_reference_model(size, cache_dir=config.cache_dir)
        if path is None:
            raise LookupError(f"the reference model {model!r} is not built on this machine "
                              f"(`evoprune reference-model --size {size}` builds it)")
        return str(path)

    return resolve_model_path(model, cache_dir=config.cache_dir)


def _config_json(path: str) -> dict[str, Any]:
    """The model's ``config.json`` as a dict: from a folder, or from the local Hugging Face cache."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
        if not isinstance(cached, str):
            raise LookupError(f"no config.json in {path!r} nor in the local Hugging Face cache")
        file = cached
    with open(file, encoding="utf-8") as fh:
        return json.load(fh)


def _space_of(config: Any, model_config: Any) -> SearchSpace:

    return space_from_config(config, model_config)


def study_space(config: Any, fingerprints: dict[str, str] | None = None) -> tuple[SearchSpace | None, str]:
    """The study's :class:`SearchSpace` from its stored config and the model's ``config.json`` only (no
    weights, downloads or reference-model builds): ``(space, "")`` or ``(None, why not)``. The plain
    JSON is tried first (fast); if that space's key differs from the stored ``space`` fingerprint,
    transformers' ``AutoConfig`` (its defaults filled in) is tried; a space that still differs is
    returned with a note."""
    stored = (fingerprints or {}).get("space")
    try:
        path = _model_path(config)
        space = _space_of(config, _config_json(path))
        if stored and stored != space.key:
            from transformers import AutoConfig

            space = _space_of(config, AutoConfig.from_pretrained(path, local_files_only=True))
    except Exception as exc:  # a report without costs beats no report
        return None, f"cost ratios unavailable: cannot read the config of model {config.model!r} ({exc})"
    if stored and stored != space.key:
        return space, (f"the search space rebuilt from {config.model!r} (key {space.key}) differs from the "
                       f"study's (key {stored}); cost ratios may be off")
    return space, ""


class StudySnapshot:
    """Everything the report draws, read once (see the module docstring).

    Attributes:
        name, url: study name and password-free storage URL.
        config: the :class:`~evoprune.search.StudyConfig`.
        objectives, directions: the told objective names and their Optuna directions.
        trials: ``{number: TrialView}`` in number order.
        records, outcomes: every :class:`~evoprune.storage.StageRecord` / ``StageOutcome``.
        fingerprints: the study's model/data/space fingerprints.
        space: the :class:`~evoprune.space.SearchSpace` (``None``: no cost ratios; see ``space_note``).
    """

    def __init__(self, *, name: str, url: str, config: Any, directions: Sequence[str], trials: Sequence[TrialView],
                 records: Sequence[Any] = (), outcomes: Sequence[Any] = (), fingerprints: dict[str, str] | None = None,
                 space: SearchSpace | None = None, space_note: str = "") -> None:

        self.name, self.url, self.config = name, url, config
        self.objectives = tuple(config.objectives)
        self.directions = tuple(str(d).lower() for d in directions)
        self.trials = {t.number: t for t in sorted(trials, key=lambda t: t.number)}
        self.records, self.outcomes = list(records), list(outcomes)
        self.fingerprints = dict(fingerprints or {})
        self.space, self.space_note = space, space_note
        self.pipeline = build_pipeline(config.stages)
        self.number_of = {t.trial_id: t.number for t in self.trials.values()}
        self._candidates: dict[int, Candidate | None] = {}
        self._costs: dict[int, dict[str, float]] = {}
        self._final: dict[int, dict[str, float]] | None = None
        self._dense: DenseWidths | None = None

    def __repr__(self) -> str:
        return f"StudySnapshot(name={self.name!r}, trials={len(self.trials)})"

    # ------------------------------------------------------------------ trials
    def trial(self, number: int) -> TrialView:
        """The trial ``number``; a ``ValueError`` that says which numbers exist otherwise."""
        try:
            return self.trials[int(number)]
        except (KeyError, TypeError, ValueError):
            have = f"trials {min(self.trials)}-{max(self.trials)}" if self.trials else "no trials yet"
            raise ValueError(f"study {self.name!r} has no trial {number} with a candidate (it has {have}); pick a "
                             "trial number from the report's Pareto table or `evoprune show`.") from None

    def complete_numbers(self) -> list[int]:
        """Numbers of the feasible COMPLETE trials (those with objective values), ascending."""
        return [n for n, t in self.trials.items() if t.values is not None]

    def state_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials.values():
            out[t.state] = out.get(t.state, 0) + 1
        return out

    def pareto_numbers(self) -> list[int]:
        """The study's Pareto front (all objectives; :func:`evoprune.study.pareto_front`, ties kept)."""

        numbers = self.complete_numbers()
        keep = pareto_front([self.trials[n].values for n in numbers], self.directions)
        return [numbers[i] for i in keep]

    def tokens_by_trial(self) -> dict[int, int]:
        """Forward tokens each trial spent: the sum of its stage records' tokens, by trial number."""
        out: dict[int, int] = {}
        for r in self.records:
            n = self.number_of.get(r.trial_id)
            if n is not None:
                out[n] = out.get(n, 0) + int(r.tokens or 0)
        return out

    # ------------------------------------------------------------------ candidates and costs
    def candidate(self, number: int) -> Candidate | None:
        if number not in self._candidates:
            text = self.trial(number).candidate_json
            self._candidates[number] = Candidate.from_json(text) if text else None
        return self._candidates[number]

    @property
    def cost_metrics(self) -> tuple[str, ...]:
        """The cost ratios the snapshot can compute (none without a space)."""
        if self.space is None:
            return ()
        out = ["params", "flops", "kv_bytes"]
        if self.space.sparsity_levels or self.space.pattern_2_4:
            out.insert(1, "nonzero_params")
        if self.space.latency is not None:
            out.append("latency")
        return tuple(out)

    def costs(self, number: int) -> dict[str, float]:
        """``{metric: cost / dense cost}`` of trial ``number``'s candidate (empty if unknown)."""
        if number not in self._costs:
            c, out = self.candidate(number), {}
            if c is not None and self.space is not None and c.num_layers == self.space.spec.num_layers:
                out = {m: self.space.ratio(c, m) for m in self.cost_metrics}
            self._costs[number] = out
        return self._costs[number]

    @property
    def dense_widths(self) -> DenseWidths:
        if self._dense is None:
            if self.space is not None:
                self._dense = DenseWidths.of_spec(self.space.spec)
            else:
                self._dense = DenseWidths.widest(
                    c for c in (self.candidate(n) for n in self.trials) if c is not None)
        return self._dense

    def summary(self, number: int) -> ArchSummary | None:
        c = self.candidate(number)
        return None if c is None else summarize(c, self.dense_widths)

    # ------------------------------------------------------------------ axes
    @property
    def final_stage(self) -> str:
        return self.pipeline.stages[-1].name

    def final_values(self, number: int) -> dict[str, float]:
        """``{evaluator: value}`` of trial ``number`` on the last stage (empty if it never got there)."""
        if self._final is None:
            self._final = {}
            for r in self.records:
                n = self.number_of.get(r.trial_id)
                if n is not None and r.stage == self.final_stage:
                    self._final.setdefault(n, {})[r.evaluator] = r.value
        return self._final.get(number, {})

    @property
    def axes(self) -> tuple[str, ...]:
        """Names a Pareto plot can put on an axis: objectives, last-stage evaluators, cost ratios."""
        names = list(self.objectives)
        for ev in self.pipeline.stages[-1].evaluators:
            if ev.name not in names:
                names.append(ev.name)
        return tuple(names + [m for m in self.cost_metrics if m not in names])

    def check_axis(self, name: str) -> str:
        if name not in self.axes:
            raise ValueError(f"unknown axis {name!r} for study {self.name!r}; use one of {list(self.axes)} "
                             "(objectives, last-stage evaluators, cost ratios to the dense model).")
        return name

    def direction(self, name: str) -> str:
        if name in self.objectives:
            return self.directions[self.objectives.index(name)]

        return objective_source(self.check_axis(name), self.pipeline).direction

    def value(self, number: int, name: str) -> float:
        """Trial ``number``'s value on axis ``name`` (NaN if unknown)."""
        t = self.trial(number)
        if name in self.objectives and t.values is not None:
            return float(t.values[self.objectives.index(name)])
        found = self.final_values(number).get(name)
        if found is None:
            found = self.costs(number).get(name)
        return math.nan if found is None else float(found)

    def dense_value(self, name: str) -> float | None:
        """The dense model's value on axis ``name`` where it is known without evaluating it: 1 for a cost
        ratio or a measured latency ratio, 0 for KL to the dense model; else the value of a trial that
        evaluated the dense candidate, or ``None``."""

        ev = next((e for e in self.pipeline.stages[-1].evaluators if e.name == name), None)
        if ev is None and name in METRICS:
            return 1.0
        if ev is None and name == "kl":
            ev = next((e for e in self.pipeline.stages[-1].evaluators if isinstance(e, KLToDense)), None)
        if isinstance(ev, KLToDense):
            return 0.0
        if isinstance(ev, Latency):
            return 1.0
        if self.space is not None:
            dense_json = self.space.spec.dense_candidate().to_json()
            for n in self.complete_numbers():
                if self.trials[n].candidate_json == dense_json:
                    return self.value(n, name)
        return None

    @property
    def latency_evaluators(self) -> tuple[str, ...]:
        """Names of the last stage's measured-latency evaluators."""

        return tuple(ev.name for ev in self.pipeline.stages[-1].evaluators if isinstance(ev, Latency))

    def hover(self, number: int) -> str:
        """Hover text of trial ``number``: source, every metric, the architecture summary."""
        t = self.trial(number)
        metrics = {name: self.value(number, name) for name in self.axes}
        parts = [f"{k} {v:.4g}" for k, v in metrics.items() if math.isfinite(v)]
        lines = [f"trial {number} ({t.source or 'unknown source'}, {t.state.lower()})"]
        lines += [" · ".join(parts[i:i + 4]) for i in range(0, len(parts), 4)]
        summary = self.summary(number)
        if summary is not None:
            lines.append(summary.text())
        return "<br>".join(lines)


def _read(study: Any, space: SearchSpace | None) -> StudySnapshot:
    db = study.db
    n_obj = len(study.directions)
    rows = db.trial_candidates()
    values = {n: (tid, v) for n, tid, v, _key in db.complete_values(n_obj)}
    records, outcomes, fps = db.stage_records(), db.stage_outcomes(), db.fingerprints()
    trials = [TrialView(number=int(r["trial_number"]), trial_id=int(r["trial_id"]), state=str(r["state"]),
                        source=str(r["source"] or ""), candidate_json=r["candidate_json"],
                        values=values.get(int(r["trial_number"]), (None, None))[1])
              for r in rows]
    have = {t.number for t in trials}
    trials += [TrialView(number=n, trial_id=tid, state="COMPLETE", values=v)
               for n, (tid, v) in values.items() if n not in have]
    note = ""
    if space is None:
        space, note = study_space(study.config, fps)
        if note:
            _log.warning(note, extra={"fields": {"study": study.name}})
    levels = db.fingerprint_details().get("levels") if "levels" in fps else None
    if levels:  # the level database the candidates' weights came from, named in the fingerprint table
        fps = {**fps, "levels": f"{fps['levels']} at {levels.get('path') or '(memory)'} ({levels.get('sparsity_method')} "
                                f"sparsity, {levels.get('width_method')} widths, {levels.get('dtype')}, "
                                f"{levels.get('bytes')} bytes)"}
    return StudySnapshot(name=study.name, url=study.url, config=study.config, directions=study.directions,
                         trials=trials, records=records, outcomes=outcomes, fingerprints=fps, space=space,
                         space_note=note)


def load_snapshot(study: Any, *, space: SearchSpace | None = None) -> StudySnapshot:
    """A :class:`StudySnapshot` of ``study``: an :class:`~evoprune.study.EvoStudy`, a ``(storage URL,
    study name)`` pair, or a snapshot (returned as is). ``space`` overrides the space rebuilt from the
    stored config (e.g. when the model's config.json is elsewhere)."""
    if isinstance(study, StudySnapshot):
        return study
    if isinstance(study, (tuple, list)) and len(study) == 2 and all(isinstance(s, (str, os.PathLike)) for s in study):

        opened = load_study(storage=study[0], study_name=str(study[1]))
        try:
            return _read(opened, space)
        finally:
            opened.close()
    if hasattr(study, "db") and hasattr(study, "config"):
        return _read(study, space)
    raise TypeError(f"expected an EvoStudy, a (storage URL, study name) pair or a StudySnapshot, got "
                    f"{type(study).__name__}; open a study with evoprune.load_study(storage=..., study_name=...).")
