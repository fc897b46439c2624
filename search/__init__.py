"""evoprune.search: samplers, the ask/evaluate/tell driver, study configs and the runtime.

The study facade (``create_study``, ``load_study``, the study object, its Pareto front and status)
is :mod:`evoprune.study`; the one-shot baselines are :mod:`evoprune.baselines`. The pieces here
compose by hand::

    import optuna
    from evoprune.search import Searcher, StudyConfig, build_runtime, trial_candidate

    config = StudyConfig.from_yaml("studies/reference_small.yaml")
    runtime = build_runtime(config)               # model, data, pruner, space, pipeline, context
    study = runtime.create_study()                # optuna.Study: the objectives' directions, study_sampler
    sampler, budget_mode = runtime.make_sampler() # EvolutionarySampler / BudgetSweep / Optuna sampler
    Searcher(runtime, study, sampler, budget_mode=budget_mode).run(**config.stop.kwargs())
    best = trial_candidate(study.best_trial, runtime.space)   # the evaluated candidate

What it owns:

* study configs: :class:`StudyConfig` (and :data:`SAMPLER_NAMES`, :data:`PRESETS`,
  :func:`evopress_depth_generations`);
* the runtime: :func:`build_runtime` -> :class:`Runtime`, :func:`space_from_config`,
  :func:`resolve_model_path`; stages -> :func:`build_pipeline`; objectives -> :func:`objective_source`,
  :func:`objective_directions` (the one resolver);
* samplers: :class:`GenerationSampler` (+ :class:`Proposal`), :class:`EvolutionarySampler`
  (:func:`level_switch`, :func:`fill_budget`), :class:`BudgetSweep`; :func:`make_sampler` (Optuna's
  own by name) and :func:`study_sampler` (the Optuna study's own sampler, the one rule);
* the driver: :class:`Searcher` (ask -> apply -> stages -> tell, :class:`SearchStats`,
  :class:`SamplerExhausted`), the :class:`Recorder` protocol and its in-Optuna :class:`OptunaRecorder`,
  :func:`trial_candidate`.

Deprecated (one release): the study facade, Pareto/hypervolume and status names, the baselines and
``ATTR_PREFIX`` are still importable from here with a :class:`DeprecationWarning`; import them from
:mod:`evoprune.study`, :mod:`evoprune.baselines` and :mod:`evoprune.storage.internal`.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from ._config import SAMPLER_NAMES, StudyConfig
from ._evolution import EvolutionarySampler
from ._generation import GenerationSampler, Proposal
from ._mutation import fill_budget, level_switch
from ._objectives import objective_directions, objective_source
from ._presets import PRESETS, evopress_depth_generations
from ._recorder import OptunaRecorder, Recorder
from ._runtime import (Runtime, build_pipeline, build_runtime, check_model_config, load_model_config, make_sampler,
                       resolve_model_path, space_from_config, study_sampler)
from ._searcher import SamplerExhausted, Searcher, SearchStats, trial_candidate
from ._sweep import BudgetSweep

__all__ = [
    "PRESETS",
    "SAMPLER_NAMES",
    "BudgetSweep",
    "EvolutionarySampler",
    "GenerationSampler",
    "OptunaRecorder",
    "Proposal",
    "Recorder",
    "Runtime",
    "SamplerExhausted",
    "SearchStats",
    "Searcher",
    "StudyConfig",
    "build_pipeline",
    "build_runtime",
    "check_model_config",
    "evopress_depth_generations",
    "load_model_config",
    "make_sampler",
    "objective_directions",
    "objective_source",
    "resolve_model_path",
    "space_from_config",
    "study_sampler",
    "trial_candidate",
]

#: names that moved out of ``evoprune.search`` (importable from here for one release, with a warning)
_MOVED: dict[str, str] = {
    **dict.fromkeys(
        ["EvoStudy", "ParetoPoint", "StudyNotFoundError", "StudyStatus", "create_study", "delete_study",
         "hypervolume", "load_study", "pareto_front", "study_front", "study_status"],
        "evoprune.study",
    ),
    **dict.fromkeys(
        ["calibration_loss", "flap", "flap_scores", "owl", "owl_allocation", "owl_scores", "shortgpt", "sleb",
         "uniform"],
        "evoprune.baselines",
    ),
    "ATTR_PREFIX": "evoprune.storage.internal",
}


def __getattr__(name: str) -> Any:
    home = _MOVED.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"evoprune.search.{name} moved to {home}.{name}; import it from there (the old name goes away "
                  "in the next release).", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(home), name)
