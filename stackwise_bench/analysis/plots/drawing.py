"""Drawing helpers shared by the study's figures (:mod:`stackwise_bench.analysis.plots.figures`).

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never
through pyplot; matplotlib and seaborn are imported on first use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stackwise_bench.analysis.read.grouping import format_value, with_group_labels
from stackwise_bench.analysis.read.numeric import is_missing
from stackwise_bench.values import short_number

MAX_LEGEND = 12  # more groups than this: the legend goes and the title says how many
MAX_BANDS = 8  # more overlapping ±std bands than this hide the lines
MAX_MARKED = 12  # series this short get a marker per point (a one-epoch curve is a dot); longer ones every n-th
# Cycled per group with the colours: lines that coincide (two arms of one study) still tell apart.
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
MARKERS = ("o", "s", "^", "D", "P", "X", "*", "h")  # no "v": it marks growths (plots/regimes.py)


def seaborn():
    """The seaborn module, imported on first use (~1 s)."""
    import seaborn as sns

    return sns


def figure(rows: int, cols: int, width: float = 6.0, height: float = 4.2):
    """A ``rows`` x ``cols`` Agg figure (constrained layout) and its axes as a flat list."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    return fig, axes


def line(ax, data: pd.DataFrame, x: str, y: str, band: bool) -> None:
    """Mean line per group with a ±1 std band, aggregated here (seaborn's per-point aggregation takes seconds on
    1,000 runs); each group in its own colour, line style and marker (:func:`styles`), so a line drawn over
    another still shows."""
    order = group_order(data)
    agg = data.groupby(["group", x], sort=False)[y].agg(["mean", "std"]).reset_index()
    # Points without a value (validation every n epochs leaves val_* null in between) are dropped, so
    # the line and its band join the points that have one instead of breaking at every gap.
    agg = agg.dropna(subset=["mean"])
    looks = styles(order)
    labelled = len(order) <= MAX_LEGEND
    for name in order:
        part = agg[agg["group"] == name].sort_values(x)
        if part.empty:
            continue
        look = looks[name]
        every = 1 if len(part) <= MAX_MARKED else max(1, len(part) // MAX_MARKED)  # a long line: a marker now and then
        ax.plot(part[x], part["mean"], **look, markevery=every, label=name if labelled else "_nolegend_")
        if band and len(order) <= MAX_BANDS:
            _band(ax, part, x, look["color"])


def styles(order: list[str]) -> dict[str, dict]:
    """Per group: colour, line style and marker, all three cycling, so two groups never look alike in print."""
    colors = seaborn().color_palette("tab10" if len(order) <= 10 else "husl", len(order))
    return {
        name: {
            "color": colors[i],
            "linestyle": LINESTYLES[i % len(LINESTYLES)],
            "marker": MARKERS[i % len(MARKERS)],
            "markersize": 5,
            "linewidth": 1.6,
        }
        for i, name in enumerate(order)
    }


def labelled(df: pd.DataFrame, keys: list[str], column: str = "group") -> pd.DataFrame:
    """A copy of ``df`` with a ``column`` naming each row's cell, its sampled numbers in their significant digits.

    ``optimizer.lr=0.001866``, not ``optimizer.lr=0.0018662266976517971`` (a search's sampled value): each float
    to 4 significant digits (:func:`~stackwise_bench.values.short_number`), more where two cells would otherwise
    print alike.
    """
    out = with_group_labels(df, keys, column)
    if not keys or out.empty:
        return out
    cells = out.drop_duplicates(column)
    for digits in (4, 6, 8, 17):
        short = {
            exact: ", ".join(f"{k}={short_value(row[k], digits)}" for k in keys)
            for exact, row in zip(cells[column], cells.to_dict("records"))
        }
        if len(set(short.values())) == len(short):
            break
    out[column] = out[column].map(short)
    return out


def short_label(values, keys: list[str]) -> str:
    """One cell's label (:func:`~stackwise_bench.analysis.read.grouping.group_label`) with short numbers."""
    return ", ".join(f"{k}={short_value(values[k])}" for k in keys) if keys else "all runs"


def short_value(value, digits: int = 4) -> str:
    """A key's value as a legend shows it: a float in ``digits`` significant digits, anything else as the tables do."""
    if isinstance(value, float) and not is_missing(value) and not value.is_integer():
        return short_number(value, digits)
    return format_value(value)


def _band(ax, part: pd.DataFrame, x: str, color) -> None:
    """mean ± std of one group: a filled band, or a bar where the group has a single point."""
    low, high = part["mean"] - part["std"].fillna(0), part["mean"] + part["std"].fillna(0)
    if len(part) == 1:  # a band one point wide has no area
        ax.vlines(part[x], low, high, color=color, alpha=0.3, linewidth=6)
    else:
        ax.fill_between(part[x], low, high, color=color, alpha=0.2, linewidth=0)


def group_order(data: pd.DataFrame) -> list[str]:
    """Group labels in the order of their key values (lora.rank=2 before lora.rank=16)."""
    keys = data.attrs.get("group_keys") or []
    firsts = data.drop_duplicates("group")
    try:
        firsts = firsts.sort_values(keys, kind="stable") if keys else firsts
    except TypeError:
        pass
    return firsts["group"].tolist()


def legend(fig, axes, data: pd.DataFrame, column: str = "group") -> None:
    """One figure legend right of the panels; above ``MAX_LEGEND`` groups the title says how many instead."""
    n = data[column].nunique()
    found: dict = {}  # every panel's handles, each label once (panels may draw different groups)
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            found.setdefault(label, handle)
    handles, labels = list(found.values()), list(found)
    if handles and 1 < n <= MAX_LEGEND:
        fig.legend(handles, labels, loc="outside right center", fontsize=8, title=None)
    elif n > MAX_LEGEND:
        axes[0].set_title(f"{axes[0].get_title()} — {n} groups (legend omitted)".strip(" —"))


def axis_order(values: pd.Series) -> list:
    """Precisions from widest to narrowest; anything else in sorted order."""
    rank = {"fp32": 0, "tf32": 1, "bf16": 2, "fp16": 3, "fp8": 4}
    return sorted(values.dropna().unique(), key=lambda v: (rank.get(str(v), 99), str(v)))


def integer_ticks(ax) -> None:
    """Whole-number ticks on the x axis (epochs), also when the curves span a single epoch."""
    from matplotlib.ticker import MaxNLocator

    # min_n_ticks=1: matplotlib keeps ticks whole only while that many integers are in view; with the
    # default 2, one epoch (view 0.945-1.055) was ticked at fractions.
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def yerr(s: pd.DataFrame) -> np.ndarray:
    """Asymmetric error bars ``[below, above]`` from a summary's ``mean`` and 95% interval."""
    low = (s["mean"] - s["ci95_low"]).fillna(0).to_numpy()
    high = (s["ci95_high"] - s["mean"]).fillna(0).to_numpy()
    return np.vstack([low, high])


def metric_label(metric: str, lower: bool) -> str:
    """An axis label that says which way is better: ``test.top1 (higher is better)``."""
    return f"{metric} ({'lower' if lower else 'higher'} is better)"


def save(fig, path: Path, title: str) -> Path:
    """Title the figure, write it to ``path`` as PNG and return ``path``."""
    fig.suptitle(title, fontsize=12)
    fig.savefig(path, dpi=110)
    return path
