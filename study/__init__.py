"""evoprune.study: the study facade and what it reports -- the room most users call.

An evoprune study is an Optuna study in an SQL database plus evoprune's own rows (config,
fingerprints, candidates, stage results, sampler state, workers, artifacts). Resuming needs the
storage URL and the study name, nothing else::

    import evoprune
    study = evoprune.create_study("studies/reference_small.yaml", storage="sqlite:///out/s.db", study_name="s")
    study.run(n_generations=10)                      # or: evoprune search studies/reference_small.yaml ...
    again = evoprune.load_study(storage="sqlite:///out/s.db", study_name="s")
    again.run(n_generations=10)                      # resumes: stored config and sampler state
    again.pareto_front()                             # [ParetoPoint(number, trial_id, values, candidate_key)]
    again.status()                                   # StudyStatus: trials, stages, workers, ETA
    again.export(again.pareto_front()[0].number, "out/best")

What it owns: :func:`create_study`, :func:`load_study`, :func:`delete_study` and the study object
:class:`EvoStudy`; its results: :class:`ParetoPoint`, the one Pareto front and hypervolume
(:func:`pareto_front`, :func:`hypervolume`, :func:`study_front`) and where a study stands
(:func:`study_status` -> :class:`StudyStatus`). It drives :mod:`evoprune.search` (config, runtime,
samplers, the search driver) and :mod:`evoprune.storage` (the database); ``study.report(...)`` is
provided by :mod:`evoprune.report`, which registers it (this room never imports the report).

Reading a study (``load_study``, ``status``, ``pareto_front``, ``check``) imports neither torch nor
transformers: they load when a study runs or exports.
"""

from ._pareto import hypervolume, pareto_front, study_front
from ._plan import Plan, plan
from ._status import StudyStatus, study_status
from ._delete import delete_study
from ._study import EvoStudy, ParetoPoint, StudyNotFoundError, create_study, load_study, register_study_verb

__all__ = [
    "EvoStudy",
    "ParetoPoint",
    "Plan",
    "StudyNotFoundError",
    "StudyStatus",
    "create_study",
    "delete_study",
    "hypervolume",
    "load_study",
    "pareto_front",
    "plan",
    "register_study_verb",
    "study_front",
    "study_status",
]
