"""Per-layer architecture heatmap of one or several trials: layers x {attention kept, MLP kept,
sparsity, dropped}, side by side so candidates can be compared at a glance.

Cells (see :func:`evoprune.report._arch.layer_cells`): query heads kept / dense heads (with
``attention: kv_groups`` this is the KV groups kept), MLP channels kept / dense, mean sparsity of the
kept linears, and 1 for a removed block (0.5 for a removed attention or MLP sublayer).

>>> from evoprune.search import StudyConfig
>>> from evoprune.space import Candidate, LayerConfig
>>> from evoprune.report import StudySnapshot, TrialView
>>> cfg = StudyConfig(model="reference:tiny", calibration={"num_sequences": 4, "seq_len": 32},
...                   stages=[{"name": "final", "evaluators": ["kl"], "eval_tokens": 256, "seq_len": 32}])
>>> c = Candidate(layers=(LayerConfig(num_kv_heads=2, q_per_kv=2, mlp_channels=64),
...                       LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0)))
>>> snap = StudySnapshot(name="d", url="sqlite://", config=cfg, directions=("minimize",),
...                      trials=[TrialView(number=5, trial_id=6, state="COMPLETE", candidate_json=c.to_json(),
...                                        values=(0.1,))])
>>> architecture_data(snap, [5]).cells
(((1.0, 1.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0)),)
>>> architecture_data(snap, [6])
Traceback (most recent call last):
...
ValueError: study 'd' has no trial 6 with a candidate (it has trials 5-5); pick a trial number from the report's Pareto table or `evoprune show`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from ._arch import CELL_COLUMNS, layer_cells
from ._snapshot import load_snapshot

__all__ = ["ArchitectureData", "architecture_data", "plot_architecture"]


@dataclasses.dataclass(frozen=True)
class ArchitectureData:
    """``cells[t][layer][column]`` for trial ``trials[t]`` (columns :data:`CELL_COLUMNS`); ``labels``: a
    title per trial; ``hover[t][layer]``: the layer's kept counts in words."""

    trials: tuple[int, ...]
    columns: tuple[str, ...]
    cells: tuple[tuple[tuple[float, ...], ...], ...]
    labels: tuple[str, ...]
    hover: tuple[tuple[str, ...], ...]
    relative_to: str


def architecture_data(study: Any, trials: Iterable[int] | int) -> ArchitectureData:
    """The data of :func:`plot_architecture` for the trial numbers ``trials`` (an unknown number raises a
    ``ValueError`` saying which exist)."""
    snap = load_snapshot(study)
    numbers = (int(trials),) if isinstance(trials, int) else tuple(int(t) for t in trials)
    if not numbers:
        raise ValueError("architecture_data: pass at least one trial number (e.g. from the Pareto table).")
    cands = []
    for n in numbers:
        snap.trial(n)
        c = snap.candidate(n)
        if c is None:
            raise ValueError(f"trial {n} of study {snap.name!r} has no recorded candidate; pick another trial.")
        cands.append(c)
    dense = snap.dense_widths
    labels, hover = [], []
    for n, c in zip(numbers, cands):
        costs = snap.costs(n)
        extra = f" · params {costs['params']:.0%}" if "params" in costs else ""
        labels.append(f"trial {n}{extra}")
        hover.append(tuple(
            (f"layer {i}: removed" if layer.dropped else
             f"layer {i}: KV groups {layer.num_kv_heads}/{dense.num_kv_heads}, query heads "
             f"{layer.num_q_heads}/{dense.num_heads}, MLP {layer.mlp_channels}/{dense.intermediate_size}")
            for i, layer in enumerate(c.layers)))
    relative = "the dense model" if snap.space is not None else "the widest layer seen (model config unavailable)"
    return ArchitectureData(trials=numbers, columns=CELL_COLUMNS,
                            cells=tuple(layer_cells(c, dense) for c in cands), labels=tuple(labels),
                            hover=tuple(hover), relative_to=relative)


def draw_architecture(data: ArchitectureData) -> Any:
    """The plotly figure of an :class:`ArchitectureData`: one heatmap per trial, layers on y."""
    import numpy as np
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = len(data.trials)
    fig = make_subplots(rows=1, cols=n, shared_yaxes=True, subplot_titles=list(data.labels),
                        horizontal_spacing=min(0.04, 0.5 / max(1, n)))
    for col, (cells, hover) in enumerate(zip(data.cells, data.hover), start=1):
        z = np.array(cells, dtype=float)
        layers = list(range(len(cells)))
        text = [[f"{v:.0%}" for v in row] for row in z]
        custom = [[h] * len(data.columns) for h in hover]
        fig.add_trace(go.Heatmap(z=z, x=list(data.columns), y=layers, zmin=0.0, zmax=1.0, colorscale="Viridis",
                                 text=text, texttemplate="%{text}", customdata=custom, showscale=col == n,
                                 colorbar=dict(title="fraction", tickformat=".0%"),
                                 hovertemplate="%{customdata}<br>%{x}: %{text}<extra></extra>"), row=1, col=col)
    fig.update_yaxes(title_text="layer", autorange="reversed", dtick=1, row=1, col=1)
    fig.update_layout(title=f"What each layer keeps (relative to {data.relative_to})", template="plotly_white",
                      height=max(320, 28 * max(len(c) for c in data.cells) + 160), width=None)
    return fig


def plot_architecture(study: Any, trials: Iterable[int] | int) -> Any:
    """Per-layer heatmap of the chosen trials (see :func:`architecture_data`)."""
    return draw_architecture(architecture_data(study, trials))
