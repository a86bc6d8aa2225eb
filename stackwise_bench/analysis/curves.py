"""Curves over time of a study, as PNG files: learning curves, the LR schedule, throughput, hardware use.

Built like every figure here (:mod:`stackwise_bench.analysis.drawing`: Agg canvas, never pyplot);
each function returns the path it wrote, or ``None`` when the runs lack the data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stackwise_bench.analysis import drawing
from stackwise_bench.analysis.grouping import with_group_labels

HARDWARE_BINS = 60  # samples of different runs never share a timestamp: average them in time bins


def learning_curves(epochs: pd.DataFrame, group_by: list[str], path: Path) -> Path | None:
    """Train/validation accuracy and validation loss per epoch; band = ±1 std over seeds."""
    fig = learning_curves_figure(epochs, group_by)
    if fig is None:
        return None
    return drawing.save(fig, path, "Learning curves per group (mean over seeds, band = ±1 std)")


def learning_curves_figure(epochs: pd.DataFrame, group_by: list[str]):
    """The learning-curve figure (one panel per curve the runs logged), or None without curves."""
    panels = [
        (c, label)
        for c, label in (
            ("train_top1", "Train top-1 accuracy (%)"),
            ("val_top1", "Validation top-1 accuracy (%)"),
            ("val_loss", "Validation loss (cross-entropy)"),
        )
        if c in epochs and epochs[c].notna().any()
    ]
    if epochs.empty or not panels:
        return None
    data = with_group_labels(epochs, group_by)
    fig, axes = drawing.figure(1, len(panels), width=5.2)
    for ax, (col, label) in zip(axes, panels):
        drawing.line(ax, data, "epoch", col, band=True)
        ax.set(xlabel="Epoch", ylabel=label, title=label.split(" (")[0])
        drawing.integer_ticks(ax)
    drawing.legend(fig, axes, data)
    return fig


def lr_schedule(epochs: pd.DataFrame, group_by: list[str], path: Path) -> Path | None:
    """Learning rate per epoch and group."""
    fig = lr_schedule_figure(epochs, group_by)
    return None if fig is None else drawing.save(fig, path, "Learning-rate schedule")


def lr_schedule_figure(epochs: pd.DataFrame, group_by: list[str]):
    """The learning-rate figure, or None when no run logged a learning rate."""
    if epochs.empty or "lr" not in epochs or epochs["lr"].isna().all():
        return None
    data = with_group_labels(epochs, group_by)
    fig, axes = drawing.figure(1, 1, width=7)
    drawing.line(axes[0], data, "epoch", "lr", band=False)
    axes[0].set(xlabel="Epoch", ylabel="Learning rate (at the end of the epoch)")
    drawing.integer_ticks(axes[0])
    drawing.legend(fig, axes, data)
    return fig


def throughput(dynamics: pd.DataFrame, runs: pd.DataFrame, group_by: list[str], path: Path) -> Path | None:
    """Time per epoch and training images/s per cell (bars = mean, whiskers = ±1 std over seeds)."""
    data = with_group_labels(dynamics, group_by)
    data["img_s"] = data["run_dir"].map(runs.set_index("run_dir")["train.img_s"]) if "train.img_s" in runs else np.nan
    data["img_s"] = data["img_s"].fillna(data["train_img_s_mean"])
    panels = [
        (c, label)
        for c, label in (("epoch_time_mean_s", "Time per epoch (s)"), ("img_s", "Training throughput (images/s)"))
        if data[c].notna().any()
    ]
    if data.empty or not panels:
        return None
    x = "precision" if "precision" in group_by else "group"
    others = [k for k in group_by if k != "precision"] if x == "precision" else []
    data = with_group_labels(data, others, "series")
    hue = "series" if others else None
    fig, axes = drawing.figure(1, len(panels), width=max(5.0, 0.5 * data[x].nunique() + 3))
    sns = drawing.seaborn()
    for ax, (col, label) in zip(axes, panels):
        sns.barplot(
            data=data,
            x=x,
            y=col,
            hue=hue,
            errorbar="sd",
            ax=ax,
            legend=hue is not None,
            order=drawing.axis_order(data[x]),
        )
        ax.set(ylabel=label, xlabel=x, title=label.split(" (")[0])
        ax.tick_params(axis="x", labelrotation=30 if x == "group" else 0)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if hue:
        drawing.legend(fig, axes, data, column="series")
    return drawing.save(fig, path, "Time per epoch and throughput per " + x)


def hardware_use(hardware: pd.DataFrame, group_by: list[str], path: Path) -> Path | None:
    """CPU %, resident memory and GPU memory (where sampled) over time per group."""
    if hardware.empty:
        return None
    panels = [
        (c, label)
        for c, label in (
            ("cpu_percent", "CPU use (%)"),
            ("rss_mb", "Resident memory (MB)"),
            ("gpu_mem_mb", "GPU memory (MB)"),
        )
        if c in hardware and pd.to_numeric(hardware[c], errors="coerce").notna().any()
    ]
    if not panels:
        return None
    # Hardware use follows the precision (and model) far more than the other keys: fewer, readable lines.
    keys = [k for k in ("model", "precision") if k in group_by] or group_by
    data = with_group_labels(hardware, keys)
    edges = np.linspace(0, float(data["t"].max()) or 1.0, HARDWARE_BINS + 1)
    data["t_bin"] = edges[np.clip(np.searchsorted(edges, data["t"], side="right") - 1, 0, HARDWARE_BINS - 1)]
    for col, _ in panels:
        data[col] = pd.to_numeric(data[col], errors="coerce")
    fig, axes = drawing.figure(1, len(panels), width=5.2)
    for ax, (col, label) in zip(axes, panels):
        drawing.line(ax, data, "t_bin", col, band=True)
        ax.set(xlabel="Time since start (s)", ylabel=label, title=label.split(" (")[0])
    drawing.legend(fig, axes, data)
    per = ", ".join(keys) if keys else "all runs"
    return drawing.save(fig, path, f"Hardware use over time per {per} (mean over runs, band = ±1 std)")
