"""evoprune.report: plots of a study and its one-file HTML report (reads the study, never writes).

Each plot is a data function returning a plain dataclass (tested on its own) and a plotly figure
built from it, as :mod:`optuna.visualization` does. Each accepts an :class:`~evoprune.search.EvoStudy`,
a ``(storage URL, study name)`` pair or a :class:`StudySnapshot` (read once, reused by many plots)::

    import evoprune
    from evoprune import report

    study = evoprune.load_study(storage="sqlite:///out/demo.db", study_name="demo")
    snap = report.load_snapshot(study)                 # one read of the database
    report.plot_pareto(snap, x="flops", y="kl").show()
    report.plot_history(snap).show()                   # best so far vs trials and vs tokens; hypervolume
    report.plot_architecture(snap, [12, 40]).show()    # per-layer heatmap of trials 12 and 40
    report.plot_funnel(snap).show(); report.plot_fidelity(snap).show()
    report.write_report(snap, "out/demo-report.html")  # = study.report(...) = `evoprune report ...`

Plots (data function -> dataclass, then the figure):

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

from ._arch import CELL_COLUMNS, ArchSummary, DenseWidths
from ._architecture import ArchitectureData, architecture_data, draw_architecture, plot_architecture
from ._history import HistoryData, draw_history, history_data, plot_history
from ._html import build_report, export_command, write_report
from ._pareto import (
    ParetoPlotData,
    draw_pareto,
    draw_pareto_matrix,
    pareto_matrix_data,
    pareto_plot_data,
    plot_pareto,
    plot_pareto_matrix,
)
from ._snapshot import StudySnapshot, TrialView, load_snapshot, study_space
from ._stages import (
    FidelityData,
    FunnelData,
    draw_fidelity,
    draw_funnel,
    fidelity_data,
    funnel_data,
    plot_fidelity,
    plot_funnel,
    spearman,
)

__all__ = [
    "CELL_COLUMNS",
    "ArchSummary",
    "ArchitectureData",
    "DenseWidths",
    "FidelityData",
    "FunnelData",
    "HistoryData",
    "ParetoPlotData",
    "StudySnapshot",
    "TrialView",
    "architecture_data",
    "build_report",
    "draw_architecture",
    "draw_fidelity",
    "draw_funnel",
    "draw_history",
    "draw_pareto",
    "draw_pareto_matrix",
    "export_command",
    "fidelity_data",
    "funnel_data",
    "history_data",
    "load_snapshot",
    "pareto_matrix_data",
    "pareto_plot_data",
    "plot_architecture",
    "plot_fidelity",
    "plot_funnel",
    "plot_history",
    "plot_pareto",
    "plot_pareto_matrix",
    "spearman",
    "study_space",
    "write_report",
]
