"""evoprune.report: plots of a study and its one-file HTML report (reads the study, never writes).

Each plot is a private data function returning a plain dataclass (tested on its own) and a plotly
figure drawn from it, as :mod:`optuna.visualization` does; the public names are the plots and the
report. Each accepts an :class:`~evoprune.study.EvoStudy`, a ``(storage URL, study name)`` pair or a
:class:`StudySnapshot` (read once, reused by many plots)::

    import evoprune
    from evoprune import report

    study = evoprune.load_study(storage="sqlite:///out/demo.db", study_name="demo")
    snap = report.load_snapshot(study)                 # one read of the database
    report.plot_pareto(snap, x="flops", y="kl").show()
    report.plot_history(snap).show()                   # best so far vs trials and vs tokens; hypervolume
    report.plot_architecture(snap, [12, 40]).show()    # per-layer heatmap of trials 12 and 40
    report.plot_funnel(snap).show(); report.plot_fidelity(snap).show()
    report.write_report(snap, "out/demo-report.html")  # = study.report(...) = `evoprune report ...`

This room also provides the study verb ``report`` (``study.report(path)`` = :func:`write_report`),
registered with :mod:`evoprune.study` when it is imported (the package's ``evoprune.STUDY_VERBS`` names
this room as the verb's provider), so the study room never imports this one.

Plots (private data function -> dataclass, then the figure):

* :func:`plot_pareto` (:func:`pareto_plot_data` -> :class:`ParetoPlotData`): two axes (objectives,
  last-stage evaluators, cost ratios), the front, the baselines and the dense model;
  :func:`plot_pareto_matrix` (:func:`pareto_matrix_data`): every pair of 3 or more objectives.
* :func:`plot_history` (:func:`history_data` -> :class:`HistoryData`): best so far vs trial number and
  vs forward tokens; the hypervolume history.
* :func:`plot_architecture` (:func:`architecture_data` -> :class:`ArchitectureData`): layers x kept
  fractions of the chosen trials.
* :func:`plot_funnel` (:func:`funnel_data` -> :class:`FunnelData`): scored / promoted per stage, tokens.
* :func:`plot_fidelity` (:func:`fidelity_data` -> :class:`FidelityData`): first vs last stage value
  and their Spearman rank correlation.
"""

from ..study import register_study_verb
from ._architecture import plot_architecture
from ._history import plot_history
from ._html import build_report, write_report
from ._pareto import plot_pareto, plot_pareto_matrix
from ._snapshot import StudySnapshot, TrialView, load_snapshot
from ._stages import plot_fidelity, plot_funnel

register_study_verb("report", write_report)

__all__ = [
    "StudySnapshot",
    "TrialView",
    "build_report",
    "load_snapshot",
    "plot_architecture",
    "plot_fidelity",
    "plot_funnel",
    "plot_history",
    "plot_pareto",
    "plot_pareto_matrix",
    "write_report",
]
