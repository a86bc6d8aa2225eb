"""The PEFT Pareto figure: accuracy against trainable parameters per adapter method, the frontier ringed.

Drawn from the PEFT view's table (:func:`stackwise_bench.analysis.studies.peft.peft_study`): x = mean trainable
parameters (log scale), y = the metric's mean with ±1 std bars over seeds, one colour and marker per method
(full fine-tuning a black star), each point labelled with its rank (``r8``), and the efficient frontier as a
step line through its points, which are ringed. One panel per cell of the other grouping keys.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from stackwise_bench.analysis.plots import drawing
from stackwise_bench.analysis.read.grouping import format_value, iter_groups
from stackwise_bench.analysis.studies.adapters import FULL, RANK, method_order, methods_of, other_keys

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "8")
MAX_COLS = 3
MAX_ANNOTATED = 24  # more points than this in a panel: no rank labels


def peft_pareto(view, metric: str, path: Path, lower: bool = False) -> Path | None:
    """The figure of ``view`` (a PEFT :class:`~stackwise_bench.analysis.studies.precision.StudyView`) into ``path``.

    None without a view, or when it has a single method and a single rank (nothing to trade off).
    """
    if view is None or view.table.empty or "trainable" not in view.table:
        return None
    t = view.table.copy()
    t["method"] = methods_of(t)
    t["_rank"] = pd.to_numeric(t[RANK], errors="coerce") if RANK in t else float("nan")
    t["_x"] = pd.to_numeric(t["trainable"], errors="coerce")
    t = t[t["_x"].gt(0) & t["mean"].notna()]
    if len(t) < 2 or (t["method"].nunique() < 2 and t["_rank"].nunique() < 2):
        return None
    others = other_keys(view.table)
    panels = list(iter_groups(t, others))
    cols = min(MAX_COLS, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = drawing.figure(rows, cols, width=6.5 if cols > 1 else 8.0, height=4.8)
    styles = _styles(method_order(t["method"]))
    for ax, (values, part) in zip(axes, panels):
        _panel(ax, part, styles)
        ax.set(xlabel="Trainable parameters (count, log scale)", ylabel=drawing.metric_label(metric, lower))
        if others:
            ax.set_title(drawing.short_label(values, others), fontsize=9)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.legend(handles=_legend_handles(styles), loc="outside right center", fontsize=8)
    return drawing.save(fig, path, f"{metric} vs trainable parameters (mean ± std; ringed: Pareto frontier)")


def _styles(methods: list[str]) -> dict[str, dict]:
    """Colour and marker per method; full fine-tuning a black star."""
    adapters = [m for m in methods if m != FULL]
    colors = drawing.seaborn().color_palette("tab10" if len(adapters) <= 10 else "tab20", max(1, len(adapters)))
    styles = {
        m: {"color": c, "marker": MARKERS[i % len(MARKERS)], "ms": 7} for i, (m, c) in enumerate(zip(adapters, colors))
    }
    if FULL in methods:
        styles = {FULL: {"color": "black", "marker": "*", "ms": 13}, **styles}
    return styles


def _panel(ax, part: pd.DataFrame, styles: dict[str, dict]) -> None:
    from matplotlib.ticker import NullFormatter

    front = part[part["on_frontier"].fillna(False).astype(bool)].sort_values("_x")
    if len(front):
        ax.step(front["_x"], front["mean"], where="post", color="0.35", linestyle="--", linewidth=1.2, zorder=1)
        ax.scatter(front["_x"], front["mean"], s=320, facecolors="none", edgecolors="black", linewidths=1.3, zorder=4)
    for method, pts in part.groupby("method", sort=False):
        st = styles[method]
        ax.errorbar(
            pts["_x"],
            pts["mean"],
            yerr=pts["std"].fillna(0).to_numpy(),
            fmt=st["marker"],
            color=st["color"],
            markersize=st["ms"],
            capsize=3,
            linestyle="none",
            zorder=3,
        )
    if len(part) <= MAX_ANNOTATED:
        for _, row in part.iterrows():
            text = (
                "full" if row["method"] == FULL else "" if pd.isna(row["_rank"]) else f"r{format_value(row['_rank'])}"
            )
            if text:
                ax.annotate(text, (row["_x"], row["mean"]), fontsize=7, xytext=(7, 6), textcoords="offset points")
    ax.set_xscale("log")
    ax.margins(x=0.08)  # room for the labels of the outermost points
    ax.xaxis.set_minor_formatter(NullFormatter())


def _legend_handles(styles: dict[str, dict]) -> list:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=st["color"], marker=st["marker"], markersize=st["ms"] * 0.8, linestyle="none", label=m)
        for m, st in styles.items()
    ]
    handles.append(Line2D([], [], color="0.35", linestyle="--", label="Pareto frontier"))
    handles.append(
        Line2D(
            [],
            [],
            marker="o",
            markersize=12,
            markerfacecolor="none",
            markeredgecolor="black",
            linestyle="none",
            label="on the frontier",
        )
    )
    return handles
