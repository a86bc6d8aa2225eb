"""Curves over time of a study, as PNG files: learning curves, the LR schedule, throughput, hardware use
(CPU, memory, GPU, power, temperature).

Built like every figure here (:mod:`stackwise_bench.analysis.plots.drawing`: Agg canvas, never pyplot);
each function returns the path it wrote, or ``None`` when the runs lack the data.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from stackwise_bench.analysis.plots import drawing
from stackwise_bench.analysis.read.grouping import with_group_labels

HARDWARE_BINS = 60  # samples of different runs never share a timestamp: average them in time bins
# hardware.jsonl columns drawn over time, in panel order (null where the machine has no such reader).
HARDWARE_PANELS = (
    ("cpu_percent", "CPU use (%)"),
    ("rss_mb", "Resident memory (MB)"),
    ("gpu_util", "GPU utilisation (%)"),
    ("gpu_mem_mb", "GPU memory (MB)"),
    ("gpu_power_w", "GPU power (W)"),
    ("gpu_temp_c", "GPU temperature (°C)"),
    ("cpu_temp_c", "CPU temperature (°C)"),
)


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
    """CPU %, memory, GPU use, power and temperature over time per group (the panels some run sampled)."""
    fig = hardware_figure(hardware, group_by)
    if fig is None:
        return None
    per = ", ".join(hardware_keys(group_by)) or "all runs"
    return drawing.save(fig, path, f"Hardware use over time per {per} (mean over runs, band = ±1 std)")


def hardware_figure(hardware: pd.DataFrame, group_by: list[str]):
    """One panel per quantity of :data:`HARDWARE_PANELS` that some run sampled, or None without samples."""
    panels = hardware_panels(hardware)
    if not panels:
        return None
    data = hardware_series(hardware, group_by)
    cols = len(panels) if len(panels) <= 3 else math.ceil(len(panels) / 2)
    fig, axes = drawing.figure(math.ceil(len(panels) / cols), cols, width=5.2)
    for ax, (col, label) in zip(axes, panels):
        drawing.line(ax, data, "t_bin", col, band=True)
        ax.set(xlabel="Time since start (s)", ylabel=label, title=label.split(" (")[0])
    for ax in axes[len(panels) :]:
        ax.remove()
    drawing.legend(fig, axes, data)
    return fig


def hardware_panels(hardware: pd.DataFrame) -> list[tuple[str, str]]:
    """The (column, label) panels with at least one reading: a machine without a GPU power counter
    writes null, and a null-only series is left out rather than drawn as zeros."""
    if hardware.empty:
        return []
    return [
        (col, label)
        for col, label in HARDWARE_PANELS
        if col in hardware and pd.to_numeric(hardware[col], errors="coerce").notna().any()
    ]


def hardware_keys(group_by: list[str]) -> list[str]:
    """Hardware use follows the precision (and model) far more than the other keys: fewer, readable lines."""
    return [k for k in ("model", "precision") if k in group_by] or list(group_by)


def hardware_series(hardware: pd.DataFrame, group_by: list[str]) -> pd.DataFrame:
    """The samples the figure averages: numeric readings (null stays NaN, never 0), a ``group`` label and
    the time bin ``t_bin`` (samples of different runs never share a timestamp)."""
    data = with_group_labels(hardware, hardware_keys(group_by))
    edges = np.linspace(0, float(data["t"].max()) or 1.0, HARDWARE_BINS + 1)
    data["t_bin"] = edges[np.clip(np.searchsorted(edges, data["t"], side="right") - 1, 0, HARDWARE_BINS - 1)]
    for col, _ in hardware_panels(hardware):
        data[col] = pd.to_numeric(data[col], errors="coerce")
    return data
