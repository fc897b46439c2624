"""The one-file HTML report of a study: every plot, the Pareto table, config, fingerprints, versions.

The file is self-contained: plotly.js is inlined once (with the first figure), nothing is loaded
from the network, so it opens offline and can be mailed or archived. It reads the study through
:func:`~evoprune.report.load_snapshot` only (never writes), so it works on a still-running study too.
Large studies stay light: dominated points beyond a few thousand are drawn as an even sample, the
best-so-far lines keep only their steps and the hypervolume is taken at up to 250 trials.

::

    import evoprune
    study = evoprune.load_study(storage="sqlite:///out/demo.db", study_name="demo")
    study.report("out/demo-report.html")        # or: evoprune report --storage ... --study demo --out ...
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import shlex
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .._logging import get_logger
from ._architecture import architecture_data, draw_architecture
from ._history import draw_history, history_data
from ._pareto import MAX_POINTS, draw_pareto, draw_pareto_matrix, pareto_matrix_data, pareto_plot_data
from ._snapshot import StudySnapshot, load_snapshot
from ._stages import draw_fidelity, draw_funnel, fidelity_data, funnel_data

__all__ = ["build_report", "export_command", "write_report"]

_log = get_logger("report")

#: trials shown in the architecture heatmap by default (spread along the Pareto front)
HEATMAP_TRIALS = 6
#: rows of the Pareto table at most
TABLE_ROWS = 500

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1280px;
padding:0 16px;color:#1d2630}
h1{font-size:1.6em;margin-bottom:4px}h2{margin-top:36px;border-bottom:1px solid #d9dee3;padding-bottom:4px}
p.note{color:#5c6b7a;font-size:.92em}table{border-collapse:collapse;font-size:.88em;margin:8px 0}
th,td{border:1px solid #d9dee3;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f2f4f6}table.sortable th{cursor:pointer;user-select:none}
table.sortable th[data-order=asc]::after{content:" \\25B2"}table.sortable th[data-order=desc]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}code{font-size:.95em}
pre{background:#f6f8fa;padding:12px;overflow:auto;font-size:.85em;max-height:480px}
.figure{margin:12px 0 4px 0}
"""

_SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  var heads = table.querySelectorAll('th');
  heads.forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute('data-order') !== 'asc';
      heads.forEach(function (h) { h.removeAttribute('data-order'); });
      th.setAttribute('data-order', asc ? 'asc' : 'desc');
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute('data-sort'), y = b.cells[col].getAttribute('data-sort');
        var nx = parseFloat(x), ny = parseFloat(y);
        var r = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
        return asc ? r : -r;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def export_command(url: str, study: str, trial: int) -> str:
    """The ``evoprune export`` command line of one trial (``url`` should be password-free).

    >>> export_command("sqlite:///out/demo.db", "demo", 7)
    'evoprune export --storage sqlite:///out/demo.db --study demo --trial 7 --out out/trial-7'
    """
    return (f"evoprune export --storage {shlex.quote(url)} --study {shlex.quote(study)} --trial {int(trial)} "
            f"--out out/trial-{int(trial)}")


def _versions() -> dict[str, str]:
    out = {"evoprune": __version__}
    for name in ("torch", "transformers", "optuna", "plotly"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    import platform

    out["python"] = platform.python_version()
    return out


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(v: float | None, fmt: str = ".4g") -> tuple[str, str]:
    """(sort key, shown text) of a number cell."""
    if v is None or not math.isfinite(v):
        return "", "–"
    return repr(float(v)), format(v, fmt)


def _spread(numbers: list[int], k: int) -> list[int]:
    if len(numbers) <= k:
        return numbers
    return [numbers[int(i)] for i in np.unique(np.linspace(0, len(numbers) - 1, k).round().astype(int))]


class _Page:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.plotlyjs = True
        self.figures = 0

    def add(self, text: str) -> None:
        self.parts.append(text)

    def figure(self, fig: Any) -> None:
        self.parts.append('<div class="figure">' + fig.to_html(
            full_html=False, include_plotlyjs=self.plotlyjs, default_width="100%",
            config={"displaylogo": False, "responsive": True}) + "</div>")
        self.plotlyjs = False
        self.figures += 1

    def note(self, text: str) -> None:
        self.parts.append(f'<p class="note">{_e(text)}</p>')


def _table(headers: list[str], rows: Iterable[list[tuple[str, str, bool]]], sortable: bool = True) -> str:
    out = [f'<table{" class=sortable" if sortable else ""}><thead><tr>'
           + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td{" class=num" if num else ""} data-sort="{_e(key)}">{cell}</td>'
                                    for key, cell, num in row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _front_rows(snap: StudySnapshot, front: list[int]) -> tuple[list[str], list[list[tuple[str, str, bool]]]]:
    costs = [m for m in ("params", "flops") if m in snap.cost_metrics and m not in snap.objectives]
    latency = [n for n in snap.latency_evaluators if n not in snap.objectives]
    headers = ["trial", "source"] + [f"{m} ratio" for m in costs] + list(snap.objectives) + latency + [
        "architecture", "export command"]
    rows = []
    for n in front:
        t = snap.trials[n]
        row = [(str(n), _e(n), True), (t.source, _e(t.source), False)]
        for m in costs:
            key, text = _num(snap.costs(n).get(m), ".3f")
            row.append((key, text, True))
        for name in list(snap.objectives) + latency:
            key, text = _num(snap.value(n, name))
            row.append((key, text, True))
        summary = snap.summary(n)
        row.append(("", _e(summary.text()) if summary else "–", False))
        cmd = export_command(snap.url, snap.name, n)
        row.append((cmd, f"<code>{_e(cmd)}</code>", False))
        rows.append(row)
    return headers, rows


def _header(snap: StudySnapshot, seconds_note: str) -> str:
    counts = ", ".join(f"{k.lower()} {v}" for k, v in sorted(snap.state_counts().items())) or "none yet"
    tokens = sum(snap.tokens_by_trial().values())
    objectives = ", ".join(f"{o} ({d})" for o, d in zip(snap.objectives, snap.directions))
    rows = [("storage", f"<code>{_e(snap.url)}</code>"), ("trials with a candidate", _e(counts)),
            ("feasible complete trials", _e(len(snap.complete_numbers()))),
            ("forward tokens spent", _e(f"{tokens:,}")), ("objectives", _e(objectives)),
            ("model", f"<code>{_e(snap.config.model)}</code>"), ("generated", _e(seconds_note))]
    return _table(["", ""], [[("", f"<b>{_e(k)}</b>", False), ("", v, False)] for k, v in rows], sortable=False)


def build_report(study: Any, *, trials: Iterable[int] | None = None, max_points: int = MAX_POINTS) -> str:
    """The report of ``study`` (an EvoStudy, a ``(storage URL, study name)`` pair or a snapshot) as one
    HTML string. ``trials``: the trials of the architecture heatmap (default: up to 6 spread along the
    Pareto front); ``max_points``: dominated trials drawn at most per Pareto plot."""
    snap = load_snapshot(study)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    page = _Page()
    page.add(f"<h1>evoprune report: study {_e(snap.name)}</h1>")
    page.add(_header(snap, now + " (a still-running study shows what had finished by then)"))
    if snap.space_note:
        page.note(snap.space_note)
    complete = snap.complete_numbers()
    front = sorted(snap.pareto_numbers(), key=lambda n: (snap.trials[n].values, n))

    page.add("<h2>Pareto front</h2>")
    try:
        pdata = pareto_plot_data(snap, max_points=max_points)
    except ValueError as exc:
        page.note(str(exc))
        pdata = None
    if pdata is not None and pdata.numbers:
        page.figure(draw_pareto(pdata))
        marks = ["the red line is the front of these two axes"]
        if pdata.seeds:
            marks.append(f"diamonds: {len(pdata.seeds)} baseline trials (seeds)")
        if pdata.dense is not None:
            marks.append("star: the dense model")
        page.note("; ".join(marks) + ". Hover a point for every metric and its architecture.")
    elif pdata is not None:
        page.note("no feasible COMPLETE trial yet: nothing to plot.")
    if len(snap.objectives) >= 3 and complete:
        page.figure(draw_pareto_matrix(pareto_matrix_data(snap, max_points=max_points // 3)))

    page.add(f"<h2>Pareto candidates ({len(front)})</h2>")
    if front:
        headers, rows = _front_rows(snap, front[:TABLE_ROWS])
        page.add(_table(headers, rows))
        if len(front) > TABLE_ROWS:
            page.note(f"the first {TABLE_ROWS} of {len(front)} front trials (by objective values).")
        page.note("click a column to sort; each export command writes that trial as a Hugging Face checkpoint.")
    else:
        page.note("no feasible COMPLETE trial yet.")

    page.add("<h2>Optimization history</h2>")
    if complete:
        page.figure(draw_history(history_data(snap)))
    else:
        page.note("no feasible COMPLETE trial yet.")

    page.add("<h2>Architectures</h2>")
    chosen = list(trials) if trials is not None else _spread(front, HEATMAP_TRIALS)
    if chosen:
        page.figure(draw_architecture(architecture_data(snap, chosen)))
        if trials is None:
            page.note(f"{len(chosen)} of the {len(front)} Pareto trials, spread along the front (by "
                      f"{snap.objectives[0]}).")
    else:
        page.note("no trial to show yet.")

    page.add("<h2>Stages</h2>")
    funnel = funnel_data(snap)
    if any(funnel.entered):
        page.figure(draw_funnel(funnel))
    else:
        page.note("no stage finished yet.")
    fid = fidelity_data(snap)
    if fid.numbers:
        page.figure(draw_fidelity(fid))
    elif len(snap.config.stages) < 2:
        page.note("a single stage: no stage fidelity to show.")
    else:
        page.note(f"no candidate reached stage {fid.last_stage!r} yet: no stage fidelity to show.")

    page.add("<h2>Study</h2><h3>Fingerprints</h3>")
    page.add(_table(["kind", "value"], [[(k, f"<code>{_e(k)}</code>", False), (v, f"<code>{_e(v)}</code>", False)]
                                        for k, v in sorted(snap.fingerprints.items())], sortable=False))
    page.add("<h3>Library versions</h3>")
    page.add(_table(["package", "version"], [[(k, _e(k), False), (v, _e(v), False)]
                                            for k, v in _versions().items()], sortable=False))
    config = json.dumps(snap.config.to_dict(), indent=2, sort_keys=True)
    page.add("<h3>Config</h3><pre>" + html.escape(config, quote=False) + "</pre>")
    title = f"evoprune report: {snap.name}"
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width, initial-scale=1'><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(page.parts)
            + f"\n<script>{_SORT_JS}</script>\n</body></html>\n")


def write_report(study: Any, path: str | os.PathLike[str] = "report.html", *, trials: Iterable[int] | None = None,
                 max_points: int = MAX_POINTS) -> Path:
    """Write :func:`build_report` to ``path`` (folders created; the file is replaced atomically, so a
    browser never sees half a report) and return its absolute path."""
    start = time.perf_counter()
    text = build_report(study, trials=trials, max_points=max_points)
    out = Path(path).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    _log.info("report written", extra={"fields": {"path": str(out), "megabytes": round(len(text.encode()) / 1e6, 2),
                                                  "seconds": round(time.perf_counter() - start, 2)}})
    return out
