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
from stackwise_bench.analysis.read.directions import PERCENT, SPOKEN

HARDWARE_GRID_POINTS = 400  # at most this many grid times per run: a day-long run is not drawn sample by sample
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


def learning_curves(
    epochs: pd.DataFrame, group_by: list[str], path: Path, metrics: list[str] | None = None
) -> Path | None:
    """Training/validation task metric and loss per epoch; band = ±1 std over seeds."""
    fig = learning_curves_figure(epochs, group_by, metrics)
    if fig is None:
        return None
    return drawing.save(fig, path, "Learning curves per group (mean over seeds, band = ±1 std)")


def curve_panels(epochs: pd.DataFrame, metrics: list[str] | None = None) -> list[tuple[str, str]]:
    """(column, label) of each learning curve the runs logged: ``train_<m>``, ``val_<m>`` for each task metric
    ``m`` of the record (``top1`` by default; a regression task's ``mse``), then the training and validation loss."""
    columns = []
    for m in metrics or ["top1"]:
        name = SPOKEN.get(m, m)
        unit = " accuracy (%)" if m in PERCENT else ""
        columns += [(f"train_{m}", f"Train {name}{unit}"), (f"val_{m}", f"Validation {name}{unit}")]
    columns += [("train_loss", "Training loss"), ("val_loss", "Validation loss")]
    return [
        (c, label) for c, label in columns if c in epochs and pd.to_numeric(epochs[c], errors="coerce").notna().any()
    ]


def learning_curves_figure(epochs: pd.DataFrame, group_by: list[str], metrics: list[str] | None = None):
    """The learning-curve figure (one panel per curve of :func:`curve_panels`), or None without curves."""
    panels = curve_panels(epochs, metrics)
    if epochs.empty or not panels:
        return None
    data = drawing.labelled(epochs, group_by)
    cols = len(panels) if len(panels) <= 3 else math.ceil(len(panels) / 2)
    fig, axes = drawing.figure(math.ceil(len(panels) / cols), cols, width=5.2)
    for ax, (col, label) in zip(axes, panels):
        data[col] = pd.to_numeric(data[col], errors="coerce")
        drawing.line(ax, data, "epoch", col, band=True)
        ax.set(xlabel="Epoch", ylabel=label, title=label.split(" (")[0])
        drawing.integer_ticks(ax)
    for ax in axes[len(panels) :]:
        ax.remove()
    drawing.legend(fig, axes, data)
    return fig


def lr_schedule(
    epochs: pd.DataFrame, group_by: list[str], path: Path, steps: pd.DataFrame | None = None
) -> Path | None:
    """Learning rate per logged step (``steps.jsonl``) and group; per epoch for runs recorded without steps."""
    fig = lr_schedule_figure(epochs, group_by, steps)
    return None if fig is None else drawing.save(fig, path, "Learning-rate schedule")


def lr_schedule_figure(epochs: pd.DataFrame, group_by: list[str], steps: pd.DataFrame | None = None):
    """The learning-rate figure, or None when no run logged a learning rate.

    Drawn per optimizer step from ``steps`` (step 1 and every ``trainer.log_every_n_steps``-th: a warmup and a
    cosine show their shape); the runs without steps.jsonl (recorded before it existed) per epoch, as
    ``metrics.jsonl`` has them (the rate at the end of each epoch), on a second panel.
    """
    has_lr = lambda df: df is not None and not df.empty and "lr" in df and df["lr"].notna().any()  # noqa: E731
    per_step = steps if has_lr(steps) else None
    stepped = set(per_step["run_dir"]) if per_step is not None else set()
    per_epoch = epochs[~epochs["run_dir"].isin(stepped)] if has_lr(epochs) else None
    per_epoch = per_epoch if has_lr(per_epoch) else None
    panels = [(d, x) for d, x in ((per_step, "step"), (per_epoch, "epoch")) if d is not None]
    if not panels:
        return None
    fig, axes = drawing.figure(1, len(panels), width=7)
    legend_data = []
    for ax, (df, x) in zip(axes, panels):
        data = drawing.labelled(df, group_by)
        data["lr"] = pd.to_numeric(data["lr"], errors="coerce")
        drawing.line(ax, data, x, "lr", band=False)
        if x == "step":
            ax.set(xlabel="Optimizer step", ylabel="Learning rate", title="Per step")
        else:
            ax.set(xlabel="Epoch", ylabel="Learning rate (at the end of the epoch)")
            ax.set_title("Per epoch (runs recorded without steps.jsonl)" if per_step is not None else "")
        drawing.integer_ticks(ax)
        legend_data.append(data)
    drawing.legend(fig, axes, pd.concat(legend_data, ignore_index=True))
    return fig


def throughput(dynamics: pd.DataFrame, runs: pd.DataFrame, group_by: list[str], path: Path) -> Path | None:
    """Time per epoch and training images/s per cell (bars = mean, whiskers = ±1 std over seeds)."""
    fig = throughput_figure(dynamics, runs, group_by)
    if fig is None:
        return None
    per = "precision" if "precision" in group_by else " and ".join(group_by) or "run"
    return drawing.save(fig, path, f"Time per epoch and throughput per {per}")


def throughput_figure(dynamics: pd.DataFrame, runs: pd.DataFrame, group_by: list[str]):
    """The throughput bars, or None without times. Cells other than precisions (a search's trials, whose labels
    are long) are bars lying down, one per row, their labels in full beside them."""
    data = drawing.labelled(dynamics, group_by)
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
    data = drawing.labelled(data, others, "series")
    hue = "series" if others else None
    lying = x == "group"
    n = data[x].nunique()
    order = drawing.group_order(data) if lying else drawing.axis_order(data[x])  # cells in their keys' order
    if lying:
        fig, axes = drawing.figure(1, len(panels), width=4.5, height=max(2.5, 0.4 * n + 1.2))
    else:
        fig, axes = drawing.figure(1, len(panels), width=max(5.0, 0.5 * n + 3))
    for i, (ax, (col, label)) in enumerate(zip(axes, panels)):
        axis = {"y": x, "x": col} if lying else {"x": x, "y": col}
        drawing.seaborn().barplot(data=data, **axis, hue=hue, errorbar="sd", ax=ax, legend=hue is not None, order=order)
        ax.set_title(label.split(" (")[0])
        if lying:
            unit = label[label.index("(") + 1 : -1]  # the title names the quantity; the bars' labels name the keys
            ax.set(xlabel=unit, ylabel="")
            if i:
                ax.tick_params(axis="y", labelleft=False)  # the first panel names the bars
        else:
            ax.set(ylabel=label, xlabel=x)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if hue:
        drawing.legend(fig, axes, data, column="series")
    return fig


def hardware_use(hardware: pd.DataFrame, group_by: list[str], path: Path) -> Path | None:
    """CPU %, memory, GPU use, power and temperature over time per group (the panels some run sampled)."""
    fig = hardware_figure(hardware, group_by)
    if fig is None:
        return None
    return drawing.save(fig, path, hardware_title(hardware_keys(group_by)))


def hardware_title(keys: list[str]) -> str:
    """``Hardware use over time (mean over all runs, ...)``, ``... per precision (mean over its runs, ...)``,
    ``... per model and precision ...``: a sentence for no, one and several keys."""
    band = "band = ±1 std"
    if not keys:
        return f"Hardware use over time (mean over all runs, {band})"
    per = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]
    return f"Hardware use over time per {per} (mean over its runs, {band})"


def hardware_figure(hardware: pd.DataFrame, group_by: list[str]):
    """One panel per quantity of :data:`HARDWARE_PANELS` that some run sampled, or None without samples."""
    panels = hardware_panels(hardware)
    if not panels:
        return None
    data = hardware_series(hardware, group_by)
    cols = len(panels) if len(panels) <= 3 else math.ceil(len(panels) / 2)
    fig, axes = drawing.figure(math.ceil(len(panels) / cols), cols, width=5.2)
    for ax, (col, label) in zip(axes, panels):
        drawing.line(ax, data, "t_grid", col, band=True)
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
    """Every run's samples on one time grid, for the figure to average: a ``group`` label, the grid time
    ``t_grid`` and each panel's reading linearly interpolated between the run's own samples.

    Samples of different runs never share a timestamp, and a time bin narrower than the sampling interval holds
    one run's sample at a time, so a "mean" of bins alternates between runs. Here each run is interpolated onto
    the grid (:func:`time_grid`) over the span of its readings of that quantity, held for at most half a grid step
    past its first and last one (so every run reaches a grid time), never further; a null reading stays null,
    never 0. The figure then averages the runs present at each grid time.
    """
    data = drawing.labelled(hardware, hardware_keys(group_by))
    cols = [col for col, _ in hardware_panels(hardware)]
    data["t"] = pd.to_numeric(data["t"], errors="coerce")
    data = data.dropna(subset=["t"])
    grid, dt = time_grid(data)
    parts = []
    for (run_dir, group), run in data.groupby(["run_dir", "group"], sort=False):
        run = run.sort_values("t", kind="stable").drop_duplicates("t", keep="last")
        part = pd.DataFrame({"run_dir": run_dir, "group": group, "t_grid": grid})
        for col in cols:
            part[col] = interpolate(run["t"].to_numpy(float), pd.to_numeric(run[col], errors="coerce"), grid, dt / 2)
        parts.append(part)
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["run_dir", "group", "t_grid"])
    firsts = data.drop_duplicates("run_dir").set_index("run_dir")
    for key in hardware_keys(group_by):  # the group's key values, for the legend's order
        out[key] = out["run_dir"].map(firsts[key])
    out.attrs["group_keys"] = data.attrs.get("group_keys", [])
    return out


def time_grid(samples: pd.DataFrame) -> tuple[np.ndarray, float]:
    """Grid times 0, dt, 2 dt, ... to the last sample of any run, and ``dt``: the runs' median sampling interval
    (the grid is as fine as the samples), widened where a long run would need more than
    :data:`HARDWARE_GRID_POINTS` points."""
    by_run = samples.groupby("run_dir")["t"]
    intervals = [np.median(np.diff(np.sort(t.unique()))) for _, t in by_run if t.nunique() > 1]
    end = float(samples["t"].max()) if len(samples) else 0.0
    if end <= 0:
        return np.array([0.0]), 1.0
    dt = float(np.median(intervals)) if intervals else end  # one sample per run: the grid is 0 and the end
    dt = max(dt, end / HARDWARE_GRID_POINTS)
    return np.arange(0.0, end + dt / 2, dt), dt


def interpolate(t: np.ndarray, values: pd.Series, grid: np.ndarray, reach: float = 0.0) -> np.ndarray:
    """``values`` sampled at times ``t`` (ascending), linearly interpolated at ``grid``; NaN further than ``reach``
    before the first or after the last reading (within it, that reading holds)."""
    ok = values.notna().to_numpy()
    if not ok.any():
        return np.full(len(grid), np.nan)
    t, v = t[ok], values.to_numpy(float)[ok]
    out = np.interp(grid, t, v)
    out[(grid < t[0] - reach) | (grid > t[-1] + reach)] = np.nan
    return out
