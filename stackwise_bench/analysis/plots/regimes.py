"""Validation accuracy against cumulative training FLOPs: one line per arm of a depth-as-time study.

The arms' epochs end at different FLOPs (a shallow network's epoch is cheaper), so the runs of an arm cannot be
averaged epoch by epoch. Each run's (``flops``, ``val_top1``) points are interpolated linearly onto one grid per arm,
:data:`GRID` log-spaced FLOP values over the range every run of the arm covers (where their ranges do not overlap,
over their union, averaging the runs present), never extrapolated; the line is the mean over runs at each grid
point, the band ±1 std (ddof 1, where two runs have a value). A depth-time arm's growths are marked ▼ on its line
at the mean FLOPs of each growth over its runs (:attr:`RegimeAnalysis.growth
<stackwise_bench.analysis.studies.regimes.RegimeAnalysis>`); the dashed line is the target accuracy. Built like every
figure here (Agg canvas, never pyplot).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stackwise_bench.analysis.plots import drawing
from stackwise_bench.analysis.read.directions import PERCENT
from stackwise_bench.analysis.studies.regimes import RegimeAnalysis, label_of

GRID = 200  # FLOP values per arm the runs are interpolated onto
LOG_SPAN = 100  # FLOPs spanning more than this factor get a log x axis


def accuracy_vs_flops(r: RegimeAnalysis | None, epochs: pd.DataFrame | None, path: Path) -> Path | None:
    """The figure written to ``path``; ``None`` when it is not a regime study or no epoch has FLOPs."""
    fig = accuracy_vs_flops_figure(r, epochs)
    if fig is None:
        return None
    title = f"{label_of(r.metric, 'val').capitalize()} vs training FLOPs (mean ± std over seeds; ▼ growth)"
    return drawing.save(fig, path, title)


def accuracy_vs_flops_figure(r: RegimeAnalysis | None, epochs: pd.DataFrame | None):
    """The untitled figure (for tests and notebooks), or ``None``."""
    val = f"val_{r.name}" if r is not None else ""
    if r is None or epochs is None or epochs.empty or not {"flops", val} <= set(epochs.columns):
        return None
    data = pd.DataFrame(
        {
            "run_dir": epochs["run_dir"],
            "flops": pd.to_numeric(epochs["flops"], errors="coerce"),
            "val": pd.to_numeric(epochs[val], errors="coerce"),
        }
    ).dropna()
    data = data[data["flops"] > 0].merge(r.runs[["run_dir", "arm"]], on="run_dir")
    if data.empty:
        return None
    arms = [a for a in dict.fromkeys(r.table["arm"]) if a in set(data["arm"])]
    looks = drawing.styles(arms)  # colour, line style and marker per arm: an arm on top of another still shows
    fig, (ax,) = drawing.figure(1, 1, width=7.5, height=4.8)
    marked = False
    for i, arm in enumerate(arms):
        look, color = looks[arm], looks[arm]["color"]
        grid, mean, std = mean_curve(data[data["arm"] == arm])
        # Markers every n-th grid point, staggered per arm, so coinciding arms do not hide each other's markers.
        every = 1 if len(grid) <= drawing.MAX_MARKED else (i * 3 % 17, max(1, len(grid) // drawing.MAX_MARKED))
        ax.plot(grid, mean, **look, label=arm, markevery=every)
        if np.isfinite(std).any():
            ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        growths = r.growth[r.growth["arm"] == arm].groupby("growth")["flops"].mean().dropna()
        if len(growths):
            at = np.interp(growths.to_numpy(), grid, mean)
            ax.plot(growths.to_numpy(), at, "v", color=color, markersize=9, markeredgecolor="black", zorder=5)
            marked = True
    for label, target in r.targets.items():
        if np.isfinite(target):
            where = f" ({label})" if len(r.targets) > 1 else ""
            unit = "%" if r.name in PERCENT else ""
            ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.2f}{unit}{where}")
    if marked:
        ax.plot([], [], "v", color="white", markeredgecolor="black", label="growth (depth-time arms)")
    if data["flops"].max() > LOG_SPAN * data["flops"].min():
        ax.set_xscale("log")
    ax.set(xlabel="Cumulative training FLOPs", ylabel=drawing.metric_label(label_of(r.metric, "val"), r.lower))
    ax.legend(fontsize=8, loc="upper right" if r.lower else "lower right")
    return fig


def mean_curve(part: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid, mean, std) of one arm's runs (columns ``run_dir``, ``flops``, ``val``) on a shared FLOP grid."""
    runs = [g.sort_values("flops") for _, g in part.groupby("run_dir")]
    if len(runs) == 1:
        x, y = runs[0]["flops"].to_numpy(float), runs[0]["val"].to_numpy(float)
        return x, y, np.full(len(x), np.nan)
    firsts = [g["flops"].iloc[0] for g in runs]
    lasts = [g["flops"].iloc[-1] for g in runs]
    lo, hi = max(firsts), min(lasts)
    if hi < lo:  # no FLOP value every run reached: the union, each point averaging the runs present
        lo, hi = min(firsts), max(lasts)
    grid = np.geomspace(lo, hi, GRID) if hi > lo else np.array([lo], dtype=float)
    ys = np.array([np.interp(grid, g["flops"], g["val"], left=np.nan, right=np.nan) for g in runs])
    present = ~np.isnan(ys)
    count = present.sum(axis=0)
    mean = np.where(count > 0, np.where(present, ys, 0).sum(axis=0) / np.maximum(count, 1), np.nan)
    squares = np.where(present, (ys - mean) ** 2, 0).sum(axis=0)
    std = np.where(count > 1, np.sqrt(squares / np.maximum(count - 1, 1)), np.nan)
    return grid, mean, std
