"""Statistics over seeds: per-cell summaries, t-intervals within each metric's range, Cohen's d, Holm–Bonferroni.

A cell's 95% interval stays inside the values its metric can take (:func:`range_interval`; the range comes from
:func:`~stackwise_bench.analysis.read.directions.range_of`): the t-interval of the mean shown beside it, cut at the
range (an accuracy at [0, 100], a time, energy, FLOP count or loss at 0), and ``ci95_clipped`` says which end was
cut. The true mean lies in the range, so the cut drops only impossible values and keeps the interval's coverage,
and the interval stays about the arithmetic mean the table shows. (A logit- or log-scale interval, the other
choice, describes a different centre and with 3 seeds near 100% stretches far below the mean: 98.70 ± 1.13 gave
[86.86, 99.94].) A metric of unknown range keeps the plain t-interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from stackwise_bench.analysis.read.directions import UNBOUNDED, Range, range_of
from stackwise_bench.analysis.read.grouping import format_value, mixed_params_text, tested_params, with_group_labels
from stackwise_bench.runs.contract import FINISHED

CONFIDENCE = 0.95
# ci95_method values: which interval a row got (summary.csv; the report's methods line explains them).
PLAIN, CUT = "t", "t cut at range"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided t-interval of the mean: mean ± t(n-1) · std/√n; NaNs when n < 2."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (float("nan"), float("nan"))
    half = sps.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return (float(x.mean() - half), float(x.mean() + half))


def range_interval(
    values: Sequence[float], bounds: Range = UNBOUNDED, confidence: float = CONFIDENCE
) -> tuple[float, float, str, str]:
    """The 95% t-interval of a cell's mean, cut at ``bounds`` (low, high; None: open).

    Returns:
        ``(low, high, method, clipped)``: ``method`` is ``t`` (nothing cut: the interval lies in the range, the
        range is unknown, or seeds lie outside it, where the range does not fit these values and nothing is cut)
        or ``t cut at range``; ``clipped`` is ``""``, ``low``, ``high`` or ``both``: the ends that were cut.
        NaNs (and ``t``, ``""``) with fewer than two values.
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    low, high = t_interval(x, confidence)
    lo, hi = bounds
    if len(x) < 2 or (lo is not None and x.min() < lo) or (hi is not None and x.max() > hi):
        return low, high, PLAIN, ""
    cut_low, cut_high = lo is not None and low < lo, hi is not None and high > hi
    clipped = "both" if cut_low and cut_high else "low" if cut_low else "high" if cut_high else ""
    low, high = (lo if cut_low else low), (hi if cut_high else high)
    return float(low), float(high), (CUT if clipped else PLAIN), clipped


def describe(values: Sequence[float], bounds: Range = UNBOUNDED) -> dict:
    """n, mean, std (ddof=1), 95% interval within ``bounds`` (:func:`range_interval`), min, max of one cell."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    nan = float("nan")
    low, high, method, clipped = range_interval(x, bounds)
    return {
        "n": len(x),
        "mean": float(x.mean()) if len(x) else nan,
        "std": float(x.std(ddof=1)) if len(x) > 1 else nan,
        "ci95_low": low,
        "ci95_high": high,
        "ci95_method": method,
        "ci95_clipped": clipped,
        "min": float(x.min()) if len(x) else nan,
        "max": float(x.max()) if len(x) else nan,
    }


def ratio_interval(arm: pd.Series, ref: pd.Series) -> tuple[float, float, float, int]:
    """The ratio of positive values ``arm`` over ``ref`` (indexed by seed): (ratio, 95% low, 95% high, pairs).

    Paired where at least two seeds have a value in both: the per-seed ratios ``arm[s] / ref[s]``,
    a t-interval (n − 1 df) of their logs, exponentiated, so the estimate is the geometric mean of the ratios.
    Without two pairs: the ratio of the arms' geometric means, with a Welch t-interval of the difference of
    their mean logs where each side has two values. NaN and non-positive values are left out.
    """
    a, b = arm.dropna(), ref.dropna()
    a, b = np.log(a[a > 0]), np.log(b[b > 0])
    common = a.index.intersection(b.index)
    if len(common) >= 2:
        d = (a[common] - b[common]).to_numpy()
        low, high = t_interval(d)
        return float(np.exp(d.mean())), float(np.exp(low)), float(np.exp(high)), len(common)
    nan = float("nan")
    if not (len(a) and len(b)):
        return nan, nan, nan, 0
    diff, low, high = a.mean() - b.mean(), nan, nan
    if len(a) > 1 and len(b) > 1:
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else 1.0
        half = sps.t.ppf(0.5 + CONFIDENCE / 2, dof) * np.sqrt(va + vb)
        low, high = np.exp(diff - half), np.exp(diff + half)
    return float(np.exp(diff)), float(low), float(high), 0


def cohens_d(a: Sequence[float], b: Sequence[float]) -> float:
    """(mean a − mean b) / pooled standard deviation; NaN when it is undefined."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    pooled = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    if pooled <= 0:
        return float("nan")
    return float((a.mean() - b.mean()) / np.sqrt(pooled))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (statsmodels); NaNs stay NaN and are not counted."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    finite = ~np.isnan(p)
    if finite.any():
        from statsmodels.stats.multitest import multipletests  # ~0.3 s import: only when needed

        out[finite] = multipletests(p[finite], method="holm")[1]
    return out


SUMMARY_COLUMNS = (
    "n",
    "mean",
    "std",
    "min",
    "max",
    "n_runs",
    "n_unfinished",
    "n_diverged",
    "ci95_low",
    "ci95_high",
    "ci95_method",
    "ci95_clipped",
    "incomplete",
    "missing_seeds",
    "mixed_params",
)


def seed_stats(
    runs: pd.DataFrame,
    metrics: str | Sequence[str],
    group_by: list[str],
    ranges: Mapping[str, Range] | None = None,
) -> pd.DataFrame:
    """Per cell and metric: n, mean, std, 95% interval within the metric's range, min, max over finished runs.

    ``ranges``: ``{metric: (low, high)}``; a metric not in it gets :func:`~..read.directions.range_of` of
    ``runs`` (pass them for a table without the runs' ``task.*`` columns, e.g. the dynamics).
    ``ci95_method`` and ``ci95_clipped`` say how each interval was made (:func:`range_interval`).
    ``mixed_params`` names the parameter counts of a cell whose finished runs were tested with models of
    different sizes (:func:`~..read.grouping.tested_params`; ``""`` when they agree): its mean mixes architectures.

    A cell is flagged ``incomplete`` when it has fewer values than the fullest
    cell of that metric; ``missing_seeds`` names the seeds other cells have.
    ``n_runs`` counts every run in the cell, ``n_unfinished`` those that failed,
    were interrupted or are still running, ``n_diverged`` those of them that diverged.

    Returns:
        A long table: group keys, ``group`` label, ``metric``, the statistics.
    """
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metrics:  # e.g. runs without metrics.jsonl have no dynamics to summarise
        return pd.DataFrame(columns=[*group_by, "group", "metric", *SUMMARY_COLUMNS])
    keys = list(group_by) or ["_all"]
    diverged = runs["diverged"].eq(True) if "diverged" in runs else False
    runs = runs.assign(_all="all runs", _done=runs["status"].isin(FINISHED), _diverged=diverged)
    cells = _grouped(runs, keys)
    base = pd.DataFrame(
        {
            "n_runs": cells.size(),
            "n_unfinished": cells["_done"].agg(lambda d: int((~d).sum())),
            "n_diverged": cells["_diverged"].agg(lambda d: int(d.sum())),
        }
    )
    labels = with_group_labels(base.index.to_frame(index=False), group_by)["group"].to_numpy()
    done = runs[runs["_done"]]
    mixed = _grouped(done.assign(_params=tested_params(done)), keys)["_params"].agg(mixed_params_text)
    base["mixed_params"] = mixed.reindex(base.index).fillna("")
    tables = []
    for metric in metrics:
        values = pd.to_numeric(done[metric], errors="coerce") if metric in done else pd.Series(np.nan, done.index)
        frame = done[keys].assign(_v=values, _seed=done["seed"] if "seed" in done else np.nan)
        g = _grouped(frame, keys)["_v"]
        agg = pd.DataFrame(
            {"n": g.count(), "mean": g.mean(), "std": g.std(ddof=1), "min": g.min(), "max": g.max()}
        ).reindex(base.index)
        seeds = _grouped(frame[frame["_v"].notna()], keys)["_seed"].agg(lambda s: set(s.dropna()))
        bounds = (ranges or {}).get(metric) or range_of(runs, metric)
        cis = g.agg(lambda v, b=bounds: range_interval(v.to_numpy(), b)).reindex(base.index)
        cis = [c if isinstance(c, tuple) else (np.nan, np.nan, PLAIN, "") for c in cis]
        ci = dict(zip(("ci95_low", "ci95_high", "ci95_method", "ci95_clipped"), zip(*cis)))
        ci = {k: list(v) for k, v in ci.items()}
        t = pd.DataFrame(
            {**agg, **base, **ci, "metric": metric, "group": labels, "_seeds": seeds.reindex(base.index)},
            index=base.index,
        )
        tables.append(t)
    table = pd.concat(tables).reset_index()
    table["n"] = table["n"].fillna(0).astype(int)
    table["incomplete"] = table["n"] < table.groupby("metric")["n"].transform("max")
    table["_seeds"] = [s if isinstance(s, set) else set() for s in table["_seeds"]]
    all_seeds = table.groupby("metric")["_seeds"].agg(lambda s: set().union(*s))
    table["missing_seeds"] = [
        " ".join(format_value(s) for s in sorted(all_seeds[m] - seeds, key=_seed_key))
        for m, seeds in zip(table["metric"], table["_seeds"])
    ]
    cols = [
        *group_by,
        "group",
        "metric",
        "n",
        "mean",
        "std",
        "ci95_low",
        "ci95_high",
        "ci95_method",
        "ci95_clipped",
        "min",
        "max",
        "n_runs",
        "n_unfinished",
        "n_diverged",
        "incomplete",
        "missing_seeds",
        "mixed_params",
    ]
    return table[cols]


def _grouped(df: pd.DataFrame, keys: list[str]):
    """groupby that keeps missing key values and sorts where the values sort."""
    try:
        df[keys].drop_duplicates().sort_values(keys)
        return df.groupby(keys, dropna=False, sort=True)
    except TypeError:  # mixed types in a key column do not sort
        return df.groupby(keys, dropna=False, sort=False)


def _seed_key(seed):
    return (0, seed, "") if isinstance(seed, (int, float, np.integer, np.floating)) else (1, 0, str(seed))
