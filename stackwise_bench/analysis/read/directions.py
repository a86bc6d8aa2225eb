"""Which way each metric is better, learned from the run record, never from the metric's name.

A finished run's ``summary.json`` carries the ``task`` section its trainer wrote::

    "task": {"name": "regression", "unit": "sample", "metric": "mse", "directions": {"loss": "min", "mse": "min"}}

Records written before runs named their task are image classification (:data:`IMAGE_CLASSIFICATION`).
``collect_runs`` flattens the section into ``task.*`` columns. A metric column's name in its task is what
follows its prefix (``test.mse``, ``train.best_val_mse``, ``val_mse``: ``mse``) and is looked up in the
directions of the runs' tasks. Columns outside every task (times, energy, bytes, FLOPs, parameter counts,
throughput) keep the fixed directions of :data:`FIXED`.
"""

from __future__ import annotations

from collections import Counter
from fnmatch import fnmatchcase

import pandas as pd

from stackwise_bench.analysis.read.numeric import is_missing
from stackwise_bench.errors import ConfigError
from stackwise_bench.runs.contract import FINISHED, IMAGE_CLASSIFICATION  # the task of records without one

MAX, MIN = "max", "min"
# Image classification's higher-is-better metrics are percentages: their differences are percentage points.
PERCENT = tuple(m for m, d in IMAGE_CLASSIFICATION["directions"].items() if d == MAX)
# How sentences and headers write image classification's accuracy; other metrics keep their names.
SPOKEN = {"top1": "top-1"}
TASK, DIRECTIONS = "task.", "task.directions."
# What comes before a task metric's name in the run table, the epoch rows and the per-run dynamics.
PREFIXES = (
    "test.",
    "train.best_val_",
    "train.final_val_",
    "train.final_train_",
    "adapter.merged.",
    "best_val_",
    "final_val_",
    "final_train_",
    "val_",
    "train_",
)
# Columns outside every task, by pattern, first match wins: costs are lower-better, rates higher-better.
FIXED = (
    ("*time*_s", MIN),  # train.time_s, epoch_time_mean_s, time_to_target_s
    ("*energy_j*", MIN),
    ("*_mb", MIN),
    ("*_mb_*", MIN),
    ("*bytes*", MIN),
    ("*flops*", MIN),
    ("params.*", MIN),
    ("*loss*", MIN),
    ("*generalisation_gap", MIN),
    ("*overfitting", MIN),
    ("*convergence_epoch", MIN),
    ("*_s", MAX),  # throughput: train.img_s, test.infer_img_s
    ("*_s_mean", MAX),
    ("*mfu*", MAX),
)
WORDS = {MAX: "higher is better", MIN: "lower is better"}
# The values a metric can take, (low, high), None for an open end; a metric outside every range is unbounded.
Range = tuple  # (float | None, float | None)
UNBOUNDED: Range = (None, None)
RANGES = "task.ranges."
# Columns outside every task that cannot be negative: every cost and rate of FIXED (not the gaps, which can be).
FIXED_RANGES = tuple((pattern, (0.0, None)) for pattern, _ in FIXED if not pattern.endswith(("gap", "overfitting")))


def metric_name(column: str) -> str:
    """The name a column's metric has in its task: ``test.mse``, ``train.best_val_mse``, ``val_mse`` -> ``mse``."""
    for prefix in PREFIXES:
        if column.startswith(prefix):
            return column[len(prefix) :]
    return column


def tasks(runs: pd.DataFrame) -> list[tuple[dict, int]]:
    """Each distinct task of the finished runs (all runs when none finished) with its number of runs.

    A run without ``task.*`` values (a record from before tasks were recorded) has :data:`IMAGE_CLASSIFICATION`.
    """
    done = runs[runs["status"].isin(FINISHED)] if "status" in runs else runs
    done = done if len(done) else runs
    cols = [c for c in done.columns if c.startswith(TASK)]
    rows = Counter(tuple(None if is_missing(v) else v for v in r) for r in done[cols].itertuples(index=False))
    out = []
    for values, n in rows.items():
        if all(v is None for v in values):
            out.append((IMAGE_CLASSIFICATION, n))
            continue
        row = dict(zip(cols, values))
        directions = {c[len(DIRECTIONS) :]: str(v) for c, v in row.items() if c.startswith(DIRECTIONS) and v}
        task = {k: row.get(f"{TASK}{k}") for k in ("name", "unit", "metric")}
        out.append(({**task, "directions": directions, "ranges": _recorded_ranges(row, task["name"])}, n))
    return out


def _recorded_ranges(row: dict, name) -> dict:
    """``{metric: {"low": .., "high": ..}}`` a task record carries (``task.ranges.top1.low``); a record of image
    classification that carries none has :data:`IMAGE_CLASSIFICATION`'s."""
    ranges: dict[str, dict] = {}
    for col, value in row.items():
        if col.startswith(RANGES) and col.count(".") == 3:
            metric, end = col[len(RANGES) :].split(".")
            ranges.setdefault(metric, {})[end] = value
    if not ranges and name == IMAGE_CLASSIFICATION["name"]:
        return IMAGE_CLASSIFICATION["ranges"]
    return ranges


def range_of(runs: pd.DataFrame, column: str) -> Range:
    """``(low, high)`` the values of ``column`` can take (None: no bound); :data:`UNBOUNDED` when unknown.

    Like :func:`direction_of`: the runs' tasks' ranges for the metric they name (``test.top1`` -> ``top1``:
    (0, 100) for image classification), else the fixed one of a cost or rate (times, energy, FLOPs, parameter
    counts, losses, throughput: (0, None)). Tasks that name the metric but disagree on (or give no) range, and
    columns nobody knows, are unbounded: their intervals stay plain t-intervals.
    """
    name = metric_name(column)
    seen = set()
    for task, _ in tasks(runs):
        if name in task["directions"]:
            given = task.get("ranges", {}).get(name) or {}
            seen.add(tuple(_bound(given.get(end)) for end in ("low", "high")))
    if seen:
        return next(iter(seen)) if len(seen) == 1 else UNBOUNDED
    return next((r for pattern, r in FIXED_RANGES if fnmatchcase(column, pattern)), UNBOUNDED)


def _bound(value) -> float | None:
    return None if is_missing(value) else float(value)


def seen_directions(runs: pd.DataFrame, column: str) -> dict[str, dict[str, int]]:
    """``{direction: {task name: runs}}`` the runs' tasks give ``column``'s metric (empty: no task names it)."""
    name = metric_name(column)
    out: dict[str, dict[str, int]] = {}
    for task, n in tasks(runs):
        direction = task["directions"].get(name)
        if direction is not None:
            names = out.setdefault(direction, {})
            names[str(task.get("name"))] = names.get(str(task.get("name")), 0) + n
    return out


def direction_of(runs: pd.DataFrame, column: str) -> str | None:
    """``max`` or ``min`` for ``column``: its task's, else the fixed one; None when unknown or the runs disagree."""
    seen = seen_directions(runs, column)
    if len(seen) == 1:
        return next(iter(seen))
    if seen:
        return None
    return next((d for pattern, d in FIXED if fnmatchcase(column, pattern)), None)


def lower_is_better(runs: pd.DataFrame, column: str) -> bool:
    """Whether smaller values of ``column`` are better; an unknown direction reads as higher-is-better."""
    return direction_of(runs, column) == MIN


def best_index(values: pd.Series, lower: bool):
    """The index label of the best of ``values`` (NaN left out); None when there is no value."""
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return None
    return v.idxmin() if lower else v.idxmax()


def check_direction(runs: pd.DataFrame, metric: str) -> list[str]:
    """The headline metric's direction, checked; the sentence to warn with when nothing records it.

    Raises:
        ConfigError: the runs' tasks disagree on which way ``metric`` is better.
    """
    seen = seen_directions(runs, metric)
    if len(seen) > 1:
        parts = " and ".join(
            f"{WORDS.get(d, d)} in {sum(n.values())} run(s) ({', '.join(sorted(n))})"
            for d, n in sorted(seen.items(), key=lambda item: item[0] != MAX)
        )
        raise ConfigError(
            f"metric={metric} is {parts}: these runs disagree on what better means; analyse each task's runs "
            "apart (runs=...) or choose another metric=."
        )
    if direction_of(runs, metric) is None:
        return [
            f"no task of these runs gives a direction for {metric} and it is not a known cost or rate: it is read "
            "as higher is better."
        ]
    return []


def task_metrics(runs: pd.DataFrame) -> list[str]:
    """The runs' tasks' headline metric names (``top1``, ``mse``), most common first."""
    counts: Counter = Counter()
    for task, n in tasks(runs):
        if task.get("metric"):
            counts[str(task["metric"])] += n
    return [m for m, _ in counts.most_common()] or [str(IMAGE_CLASSIFICATION["metric"])]


def diff_unit(column: str) -> str:
    """What a difference of ``column`` is counted in: ``points`` for a percentage, else the column's name."""
    return "points" if metric_name(column) in PERCENT else column


def task_units(runs: pd.DataFrame) -> list[str]:
    """The runs' tasks' throughput units (``img``, ``sample``): ``train.<unit>_s`` is their speed."""
    return list(dict.fromkeys(str(task["unit"]) for task, _ in tasks(runs) if task.get("unit")))
