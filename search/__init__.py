"""evoprune.search: samplers, the ask/evaluate/tell driver, study configs and baseline seeds.

::

    import optuna
    from evoprune.search import Searcher, StudyConfig, build_runtime, trial_candidate

    config = StudyConfig.from_yaml("studies/reference_small.yaml")
    runtime = build_runtime(config)               # model, data, pruner, space, pipeline, context
    study = runtime.create_study()                # optuna.Study with the objectives' directions
    sampler, budget_mode = runtime.make_sampler() # EvolutionarySampler / BudgetSweep / Optuna sampler
    Searcher(runtime, study, sampler, budget_mode=budget_mode).run(**config.stop.kwargs())
    best = trial_candidate(study.best_trial, runtime.space)   # the evaluated candidate

Pieces: :class:`StudyConfig` + :func:`build_runtime` (:class:`Runtime`);
:class:`EvolutionarySampler` (level-switch mutation, staged selection, JSON
state) and :class:`BudgetSweep` (one evolution per budget level -> a Pareto
front); :func:`make_sampler` (Optuna TPE/NSGA-II/random/GP/QMC or your own
``BaseSampler``); :class:`Searcher` (ask -> apply -> stages -> tell); the
:class:`Recorder` protocol and its default :class:`OptunaRecorder`; baselines
:func:`uniform`, :func:`shortgpt`, :func:`sleb`, :func:`flap`; Pareto helpers
:func:`pareto_front`, :func:`hypervolume`, :func:`study_front`; :func:`fill_budget`,
:func:`level_switch`, :func:`trial_candidate`.
"""

from ._baselines import calibration_loss, flap, flap_scores, shortgpt, sleb, uniform
from ._config import (
    SAMPLER_NAMES,
    CalibrationConfig,
    DataConfig,
    SamplerConfig,
    StageConfig,
    StopConfig,
    StudyConfig,
    load_object,
)
from ._evolution import BudgetSweep, EvolutionarySampler, Proposal, fill_budget, level_switch
from ._pareto import hypervolume, pareto_front, study_front
from ._recorder import ATTR_PREFIX, OptunaRecorder, Recorder
from ._runtime import Runtime, build_pipeline, build_runtime, make_sampler, resolve_model_path
from ._searcher import BUDGET_MODES, Searcher, SearchStats, objective_directions, trial_candidate

__all__ = [
    "ATTR_PREFIX",
    "BUDGET_MODES",
    "SAMPLER_NAMES",
    "BudgetSweep",
    "CalibrationConfig",
    "DataConfig",
    "EvolutionarySampler",
    "OptunaRecorder",
    "Proposal",
    "Recorder",
    "Runtime",
    "SamplerConfig",
    "SearchStats",
    "Searcher",
    "StageConfig",
    "StopConfig",
    "StudyConfig",
    "build_pipeline",
    "build_runtime",
    "calibration_loss",
    "flap",
    "flap_scores",
    "fill_budget",
    "hypervolume",
    "level_switch",
    "load_object",
    "make_sampler",
    "objective_directions",
    "pareto_front",
    "resolve_model_path",
    "shortgpt",
    "sleb",
    "study_front",
    "trial_candidate",
    "uniform",
]
