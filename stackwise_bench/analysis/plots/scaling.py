"""The log-log scaling figure: every run, the level means with their seed spread, the fit and its band.

One colour per stratum (:mod:`stackwise_bench.analysis.studies.scaling`). A stratum without a fit shows its points
only, no line: the report says why. Built like every figure here (Agg canvas, never pyplot).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stackwise_bench.analysis.plots import drawing
from stackwise_bench.analysis.studies.scaling import ScalingAnalysis


def scaling_figure(s: ScalingAnalysis | None, path: Path) -> Path | None:
    """Error against the axis on log-log axes; ``None`` when no stratum has a positive point."""
    if s is None or not any(len(st.x) for st in s.strata):
        return None
    fig, (ax,) = drawing.figure(1, 1, width=7.0, height=4.8)
    colors = drawing.seaborn().color_palette("tab10" if len(s.strata) <= 10 else "husl", len(s.strata))
    for st, color in zip(s.strata, colors):
        if not len(st.x):
            continue
        levels = np.unique(st.x)
        means = np.array([st.y[st.x == v].mean() for v in levels])
        stds = np.array([st.y[st.x == v].std(ddof=1) if np.sum(st.x == v) > 1 else 0.0 for v in levels])
        fitted = st.fit is not None
        label = st.label if fitted else f"{st.label} (no fit)"
        if fitted:
            f = st.fit
            label += f": α = {f.fit.alpha:.2f} [{f.intervals['alpha'][0]:.2f}, {f.intervals['alpha'][1]:.2f}]"
            ax.plot(f.grid, f.fit.predict(f.grid), color=color, linewidth=1.8, label=label)
            if len(f.curve_low):
                ax.fill_between(f.grid, f.curve_low, f.curve_high, color=color, alpha=0.18, linewidth=0)
        ax.scatter(st.x, st.y, color=color, s=12, alpha=0.35, linewidth=0)
        # Seed bands: the level mean ± std, clipped above 0 (a log axis has no room below it).
        low = np.maximum(means - stds, means * 0.05)
        ax.errorbar(
            levels,
            means,
            yerr=np.vstack([means - low, stds]),
            fmt="o",
            color=color,
            markersize=5,
            capsize=3,
            label=None if fitted else label,
        )
    _plain_log_axes(ax, np.unique(np.concatenate([st.x for st in s.strata])))
    ax.set_xlabel(s.axis)
    ax.set_ylabel(f"{s.error} (lower is better)")  # what is fitted is an error: the metric, or 100 − accuracy
    ax.legend(fontsize=8, loc="best")
    return drawing.save(fig, path, f"{s.error} along {s.axis}: E + A·x^(−α), 95% bootstrap band")


def compact(v: float) -> str:
    """A tick label that fits: ``8``, ``23k``, ``1.2M``, ``3.4G`` (parameter counts, tokens)."""
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= size:
            return f"{v / size:.3g}{unit}"
    return f"{v:g}"


def _plain_log_axes(ax, levels: np.ndarray) -> None:
    """Log scales with plain numbers (``4``, not ``4×10⁰``); the levels ticked where there are few of them."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    spread = len(levels) > 1 and bool(np.all(np.diff(np.log10(np.sort(levels))) >= np.log10(1.4)))
    if 1 < len(levels) <= 12 and spread:  # every level apart enough for its label (ranks 4, 8, 16, ...)
        ax.set_xticks(levels)
    else:  # 1, 2, 5 per decade: a ladder inside a decade or two still gets a few labelled ticks
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_formatter(NullFormatter())  # else decades only: close levels' labels would overlap
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: compact(v)))
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
