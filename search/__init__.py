"""evoprune.search: samplers, the ask/evaluate/tell driver, study configs and the study facade.

The study facade is what most users call (also as ``evoprune.create_study`` / ``evoprune.load_study``)::

    import evoprune
    study = evoprune.create_study("studies/reference_small.yaml", storage="sqlite:///out/s.db", study_name="s")
    study.run(n_generations=10)                      # or: evoprune search studies/reference_small.yaml ...
    again = evoprune.load_study(storage="sqlite:///out/s.db", study_name="s")
    again.run(n_generations=10)                      # resumes: stored config and sampler state
    again.pareto_front()                             # [ParetoPoint(number, trial_id, values, candidate_key)]
    again.export(again.pareto_front()[0].number, "out/best")

The pieces compose by hand too::

    import optuna
    from evoprune.search import Searcher, StudyConfig, build_runtime, trial_candidate

    config = StudyConfig.from_yaml("studies/reference_small.yaml")
    runtime = build_runtime(config)               # model, data, pruner, space, pipeline, context
    study = runtime.create_study()                # optuna.Study with the objectives' directions
    sampler, budget_mode = runtime.make_sampler() # EvolutionarySampler / BudgetSweep / Optuna sampler
    Searcher(runtime, study, sampler, budget_mode=budget_mode).run(**config.stop.kwargs())
    best = trial_candidate(study.best_trial, runtime.space)   # the evaluated candidate

Pieces: :class:`StudyConfig` + :func:`build_runtime` (:class:`Runtime`);
:class:`GenerationSampler` (the protocol of samplers driven generation by generation),
:class:`EvolutionarySampler` (level-switch mutation, staged selection, JSON state) and
:class:`BudgetSweep` (one evolution per budget level -> a Pareto front); :func:`make_sampler`
(Optuna TPE/NSGA-II/random/GP/QMC or your own ``BaseSampler``); :class:`Searcher` (ask -> apply
-> stages -> tell); the :class:`Recorder` protocol and its in-Optuna :class:`OptunaRecorder`;
baselines :func:`uniform`, :func:`shortgpt`, :func:`sleb`, :func:`flap`, :func:`owl`; the one Pareto front
and hypervolume :func:`pareto_front`, :func:`hypervolume`, :func:`study_front`; the one
objective resolver :func:`objective_directions`.
"""

from ._baselines import calibration_loss, flap, flap_scores, owl, owl_allocation, owl_scores, shortgpt, sleb, uniform
from ._config import SAMPLER_NAMES, StudyConfig
from ._evolution import EvolutionarySampler
from ._mutation import fill_budget, level_switch
from ._generation import GenerationSampler, Proposal
from ._objectives import objective_directions
from ._plan import Plan, plan
from ._pareto import hypervolume, pareto_front, study_front
from ._presets import PRESETS, evopress_depth_generations
from ._recorder import ATTR_PREFIX, OptunaRecorder, Recorder
from ._runtime import Runtime, build_runtime, make_sampler
from ._searcher import Searcher, SearchStats, trial_candidate
from ._status import StudyStatus, study_status
from ._study import EvoStudy, ParetoPoint, StudyNotFoundError, create_study, delete_study, load_study
from ._sweep import BudgetSweep

__all__ = [
    "PRESETS",
    "Plan",
    "evopress_depth_generations",
    "ATTR_PREFIX",
    "SAMPLER_NAMES",
    "BudgetSweep",
    "EvoStudy",
    "EvolutionarySampler",
    "GenerationSampler",
    "OptunaRecorder",
    "ParetoPoint",
    "Proposal",
    "Recorder",
    "Runtime",
    "SearchStats",
    "Searcher",
    "StudyConfig",
    "StudyNotFoundError",
    "StudyStatus",
    "build_runtime",
    "calibration_loss",
    "create_study",
    "delete_study",
    "fill_budget",
    "flap",
    "flap_scores",
    "hypervolume",
    "level_switch",
    "load_study",
    "make_sampler",
    "objective_directions",
    "owl",
    "owl_allocation",
    "owl_scores",
    "pareto_front",
    "plan",
    "shortgpt",
    "sleb",
    "study_front",
    "study_status",
    "trial_candidate",
    "uniform",
]
