"""Robust aggregates for studies with many seeds or tasks (Agarwal et al. 2021, "rliable").

- :func:`iqm`: the interquartile mean, the mean of the middle 50% of the runs (``scipy.stats.trim_mean``
  at 0.25), less swayed by one diverged seed than the mean and less noisy than the median.
- :func:`stratified_bootstrap`: intervals from resampling runs *within each task* (a task is a cell of the
  keys pooled over, e.g. the datasets when ``group_by=[optimizer]``), so every resample keeps each task's
  share of the runs.
- :func:`probability_of_improvement`: P(X > Y), the chance that a run of X beats a run of Y on the same
  task (ties count half), averaged over tasks, with its stratified-bootstrap interval.

Bootstraps are vectorised (all resamples at once) and seeded, so a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from stackwise_bench.analysis.read.grouping import format_value, group_label, iter_groups

CONFIDENCE = 0.95
N_BOOT = 1000
TRIM = 0.25  # cut from each end: the interquartile mean


def iqm(values, axis: int | None = None):
    """Interquartile mean: ``int(0.25·n)`` values cut from each end, the rest averaged."""
    return sps.trim_mean(np.asarray(values, dtype=float), TRIM, axis=axis)


def stratified_bootstrap(
    values: Sequence[float],
    strata: Sequence | None = None,
    statistic: Callable = iqm,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``statistic`` of ``values`` and its percentile 95% interval from resampling within each stratum.

    ``statistic`` takes a (n_boot, n) array and ``axis=1``. NaNs are dropped first; with fewer than two
    values the interval is NaN.
    """
    x = np.asarray(values, dtype=float)
    s = np.zeros(len(x), dtype=int) if strata is None else pd.factorize(pd.Series(list(strata)))[0]
    keep = ~np.isnan(x)
    x, s = x[keep], s[keep]
    if len(x) == 0:
        return (float("nan"),) * 3
    point = float(statistic(x[None, :], axis=1)[0])
    if len(x) < 2:
        return point, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    samples = np.concatenate([_resample(x[s == k], n_boot, rng) for k in np.unique(s)], axis=1)
    low, high = np.percentile(statistic(samples, axis=1), [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return point, float(low), float(high)


def probability_of_improvement(
    x: Sequence[float],
    y: Sequence[float],
    x_tasks: Sequence | None = None,
    y_tasks: Sequence | None = None,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[float, float, float]:
    """P(X > Y) over the tasks both have, and its percentile 95% interval (runs resampled within task).

    Per task it is the Mann–Whitney U of X against Y over n·m (ties count half); tasks weigh equally.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    tx = np.zeros(len(x), dtype=object) if x_tasks is None else np.asarray(list(x_tasks), dtype=object)
    ty = np.zeros(len(y), dtype=object) if y_tasks is None else np.asarray(list(y_tasks), dtype=object)
    tx, ty = tx[~np.isnan(x)], ty[~np.isnan(y)]
    x, y = x[~np.isnan(x)], y[~np.isnan(y)]
    tasks = [t for t in dict.fromkeys(tx.tolist()) if t in set(ty.tolist())]
    if not tasks:
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    point, boots = [], []
    for t in tasks:
        xt, yt = x[tx == t], y[ty == t]
        point.append(_beats(xt[None, :], yt[None, :])[0])
        boots.append(_beats(_resample(xt, n_boot, rng), _resample(yt, n_boot, rng)))
    if min(len(x), len(y)) < 2:
        return float(np.mean(point)), float("nan"), float("nan")
    low, high = np.percentile(np.mean(boots, axis=0), [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return float(np.mean(point)), float(low), float(high)


def task_labels(cell: pd.DataFrame, task_keys: list[str]) -> list[str]:
    """Each run's task: its values of ``task_keys`` (the varying keys a cell pools over)."""
    if not task_keys:
        return ["all"] * len(cell)
    return [", ".join(f"{k}={format_value(r[k])}" for k in task_keys) for _, r in cell[task_keys].iterrows()]


def iqm_table(runs: pd.DataFrame, metric: str, group_by: list[str], task_keys: list[str], **boot) -> pd.DataFrame:
    """Per cell of ``group_by``: IQM of ``metric`` over its finished runs, with a stratified-bootstrap interval."""
    from stackwise_bench.runs.contract import FINISHED

    done = runs[runs["status"].isin(FINISHED)]
    rows = []
    for values, cell in iter_groups(done, group_by) if group_by else [({}, done)]:
        v = pd.to_numeric(cell[metric], errors="coerce")
        point, low, high = stratified_bootstrap(v.to_numpy(), task_labels(cell, task_keys), **boot)
        rows.append(
            {**values, "group": group_label(values, group_by), "iqm": point, "iqm_ci95_low": low, "iqm_ci95_high": high}
        )
    return pd.DataFrame(rows, columns=[*group_by, "group", "iqm", "iqm_ci95_low", "iqm_ci95_high"])


def _resample(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return x[rng.integers(0, len(x), size=(n_boot, len(x)))]


def _beats(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per row: the share of (x_i, y_j) pairs with x_i > y_j, ties counting half. x: (B, n), y: (B, m)."""
    diff = x[:, :, None] - y[:, None, :]
    return ((diff > 0).mean(axis=(1, 2)) + 0.5 * (diff == 0).mean(axis=(1, 2))).astype(float)
