"""The per-layer gradient-norm heatmap: where in the network the gradient lives, step by step, per cell.

One panel per cell (SGD beside AdamW, fp32 beside bf16): layers top to bottom in model order, logging
steps left to right, colour = log10 of the layer's gradient norm averaged over the cell's seeds at the
same step. All panels share one colour scale, so a cell whose early layers starve shows it against the
others. Built like every figure here (:mod:`stackwise_bench.analysis.plots.drawing`: Agg canvas, never pyplot).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from stackwise_bench.analysis.plots import drawing
from stackwise_bench.analysis.read.diagnostics import layer_order

PANEL_COLUMNS = 3  # more cells than this wrap onto further rows
MAX_LAYER_LABELS = 40  # deeper stacks label every n-th layer
MAX_STEP_TICKS = 8  # this few logged steps: a tick on each; more get matplotlib's whole-number ticks


def grad_norm_grids(diagnostics: pd.DataFrame, group_by: list[str]) -> dict[str, pd.DataFrame]:
    """Per cell label: layers (rows, model order) x logging steps (columns) of log10(mean grad norm).

    The mean is over the cell's runs (seeds) that logged that layer at that step; a non-finite norm
    (an overflowed step, counted in ``nonfinite_steps``) and a zero one (a frozen layer) have no
    logarithm and stay missing. Empty when no run logged per-layer gradient norms.
    """
    if diagnostics is None or diagnostics.empty:
        return {}
    rows = diagnostics[
        (diagnostics["kind"] == "step") & (diagnostics["metric"] == "grad_norm") & diagnostics["layer"].notna()
    ]
    rows = rows[rows["value"].map(math.isfinite)]
    if rows.empty:
        return {}
    data = drawing.labelled(rows, group_by)
    grids = {}
    for group in drawing.group_order(data):
        cell = data[data["group"] == group]
        mean = cell.pivot_table(index="layer", columns="step", values="value", aggfunc="mean")
        mean = mean.reindex(index=[name for name in layer_order(cell) if name in mean.index])
        grids[group] = np.log10(mean.where(mean > 0))
    return grids


def grad_norm_figure(diagnostics: pd.DataFrame, group_by: list[str]):
    """The heatmap figure (one panel per cell, one shared colour bar), or None without per-layer norms."""
    grids = grad_norm_grids(diagnostics, group_by)
    if not grids:
        return None
    values = np.concatenate([g.to_numpy().ravel() for g in grids.values()])
    values = values[np.isfinite(values)]
    vmin, vmax = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    cols = min(len(grids), PANEL_COLUMNS)
    rows = math.ceil(len(grids) / cols)
    depth = max(len(g) for g in grids.values())
    fig, axes = drawing.figure(rows, cols, width=5.5, height=max(3.0, 0.25 * depth + 1.6))
    mesh = None
    for ax, (group, grid) in zip(axes, grids.items()):
        mesh = _panel(ax, grid, vmin, vmax)
        ax.set_title(group, fontsize=10)
    for ax in axes[len(grids) :]:
        ax.remove()
    fig.colorbar(mesh, ax=axes[: len(grids)], label="log10 gradient norm")
    return fig


def grad_norm_heatmap(diagnostics: pd.DataFrame, group_by: list[str], path: Path) -> Path | None:
    """Write the heatmap to ``path``; None when no run has per-layer gradient norms."""
    fig = grad_norm_figure(diagnostics, group_by)
    if fig is None:
        return None
    return drawing.save(fig, path, "Per-layer gradient norm over training (log10, mean over seeds)")


def _panel(ax, grid: pd.DataFrame, vmin: float, vmax: float):
    """One cell's layers x steps as a colour mesh; steps keep their spacing, missing values stay blank."""
    steps = grid.columns.to_numpy(dtype=float)
    values = np.ma.masked_invalid(grid.to_numpy(dtype=float))
    mesh = ax.pcolormesh(_edges(steps), np.arange(len(grid) + 1) - 0.5, values, cmap="viridis", vmin=vmin, vmax=vmax)
    every = math.ceil(len(grid) / MAX_LAYER_LABELS)
    ticks = list(range(0, len(grid), every))
    ax.set_yticks(ticks, [grid.index[i] for i in ticks], fontsize=8)
    ax.set_ylim(len(grid) - 0.5, -0.5)  # the first layer on top
    ax.set(xlabel="Optimizer step", ylabel="Layer")
    _step_ticks(ax, steps)
    ax.grid(False)
    return mesh


def _step_ticks(ax, steps: np.ndarray) -> None:
    """Ticks on the logged steps themselves where they are few (one step: ``50``, not ``49.6 … 50.4``),
    else whole steps chosen by matplotlib."""
    from matplotlib.ticker import MaxNLocator

    if len(steps) <= MAX_STEP_TICKS:
        ax.set_xticks(steps, [f"{s:g}" for s in steps])
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges around each step: halfway to the neighbours, as wide as the nearest gap at the ends."""
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mids = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mids[0]], mids, [2 * centres[-1] - mids[-1]]])
