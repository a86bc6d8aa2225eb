"""Each cell against its baseline cell: mean difference, paired or Welch test, Holm, Cohen's d, power.

Seeds pair when at least ``PAIRED_FRACTION`` of the smaller cell's seeds also
ran in the other cell (the same seed gives the same data split and
initialisation, so the paired test removes that shared noise); the test then
uses the matched seeds only, and the note says how many were left out.
Otherwise Welch's t-test compares the cells as independent samples.
Each row also carries the power figures of :mod:`~stackwise_bench.analysis.stats.stat_power` for the test
used: ``effect_size``, ``power``, ``mde_sigma``, ``mde_points`` and ``seeds_needed``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from stackwise_bench.analysis.read.collect import override_keys
from stackwise_bench.analysis.read.directions import MAX, MIN, lower_is_better
from stackwise_bench.analysis.read.grouping import (
    format_value,
    group_label,
    iter_groups,
    matching_cells,
    parse_selector,
    same_value,
)
from stackwise_bench.analysis.read.numeric import mean_of
from stackwise_bench.analysis.stats.robust import probability_of_improvement, task_labels
from stackwise_bench.analysis.stats.seeds import CONFIDENCE, cohens_d, holm
from stackwise_bench.analysis.stats.stat_power import ALPHA, independent_power, paired_power
from stackwise_bench.analysis.stats.verdicts import verdict_kind
from stackwise_bench.errors import ConfigError
from stackwise_bench.runs.contract import FINISHED

# The reference each study compares against, used when no baseline= is given.
# A depth-as-time study compares against classical training at equal FLOPs (regime=classical_matched).
AUTO_BASELINES = (("regime", "classical_matched"), ("lora.rank", 0), ("precision", "fp32"), ("optimizer", "sgd"))
MIN_SEEDS = 3  # with fewer per cell a t-test can only detect enormous effects
# With n pairs the smallest two-sided exact Wilcoxon p is 2/2**n: n < 6 can never reach 0.05.
MIN_WILCOXON_PAIRS = 6
COLUMNS = (
    "group",
    "baseline",
    "metric",
    "n",
    "n_baseline",
    "mean",
    "mean_baseline",
    "diff",
    "diff_ci95_low",
    "diff_ci95_high",
    "test",
    "n_pairs",
    "df",
    "statistic",
    "p_value",
    "wilcoxon_p",
    "cohens_d",
    "p_holm",
    "significant",
    "better",  # the cell beats the baseline on its mean, in the metric's direction (read.directions)
    "verdict",  # better / worse (significant, interval on that side of 0) / no difference detected / no test
    "effect_size",  # paired: mean / std of the differences; independent: Cohen's d
    "power",  # achieved power of the test used at the observed |effect_size| (alpha 0.05, two-sided)
    "mde_sigma",  # smallest effect detectable with 80% power at this n, in standard deviations
    "mde_points",  # the same in the metric's units (x std of the differences, or x pooled std)
    "seeds_needed",  # smallest n (pairs, or seeds per equal cell) with >= 80% power at the observed effect
    "p_improve",  # P(a cell run beats a baseline run) on the same task, ties half (robust.probability_of_improvement)
    "p_improve_ci95_low",  # its stratified-bootstrap 95% interval
    "p_improve_ci95_high",
    "note",
)
PAIRED_FRACTION = 0.75  # below this, pairing would throw away too much of the data: Welch instead


def resolve_baseline(runs: pd.DataFrame, baseline: str | Mapping | None, group_by: list[str]) -> dict[str, Any]:
    """The baseline selector, checked against the runs; an automatic one when none is given.

    Raises:
        ConfigError: when a key is not a column or the value matches no run.
    """
    selector = parse_selector(baseline)
    keys = override_keys(runs)
    for key, value in selector.items():
        if key not in keys:
            shown = ", ".join(k for k in (group_by or keys) if k != "seed")
            raise ConfigError(
                f"baseline key {key!r} is not a config choice or override of these runs; "
                f"choose from {shown} (e.g. baseline={(group_by or keys)[0]}=...)."
            )
        present = sorted({format_value(v) for v in runs[key]})
        if not any(same_value(v, value) for v in runs[key]):
            raise ConfigError(f"baseline {key}={value} matches no run; {key} takes the values {', '.join(present)}.")
    if selector:
        return selector
    for key, value in AUTO_BASELINES:
        if key in group_by and any(same_value(v, value) for v in runs[key]):
            return {key: value}
    return {}


def compare_to_baseline(
    runs: pd.DataFrame,
    metric: str | Sequence[str],
    baseline: Mapping[str, Any],
    group_by: list[str],
    task_keys: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per (cell, metric) that is not the baseline, with tests and Holm-adjusted p.

    Args:
        runs: the run table (only completed / early-stopped runs are used).
        metric: one metric column or several; Holm runs over every row returned.
        baseline: ``{key: value}``, e.g. ``{"precision": "fp32"}``.
        group_by: the cell keys; baseline keys are added when missing.
        task_keys: varying keys the cells pool over (tasks): P(X > Y) compares runs within a task.

    Which way each metric is better comes from the runs' task records (:mod:`~..read.directions`): ``better``
    and ``p_improve`` read a lower ``test.mse`` as better, a higher ``test.top1``.
    """
    metrics = [metric] if isinstance(metric, str) else list(metric)
    lower = {m: lower_is_better(runs, m) for m in metrics}
    if not baseline:
        return pd.DataFrame(columns=[*group_by, *COLUMNS])
    group_by = list(group_by) + [k for k in baseline if k not in group_by]
    done = runs[runs["status"].isin(FINISHED)]
    cells = list(iter_groups(done, group_by))
    is_base = [all(same_value(v[k], want) for k, want in baseline.items()) for v, _ in cells]
    bases = [c for c, b in zip(cells, is_base) if b]
    rows = []
    for (values, cell), base_flag in zip(cells, is_base):
        if base_flag:
            continue
        for base_values, base_cell in _matching_bases(values, bases, group_by, baseline) or [(None, None)]:
            for m in metrics:
                row = {**values, "group": group_label(values, group_by), "metric": m}
                if base_cell is None:
                    rows.append({**row, "baseline": "", "note": "no baseline cell matches this cell"})
                    continue
                row["baseline"] = group_label(base_values, group_by)
                rows.append({**row, **compare_cells(cell, base_cell, m, task_keys, lower=lower[m])})
    table = pd.DataFrame(rows, columns=[*group_by, *COLUMNS])
    if not table.empty:
        if "p_value" not in table:
            table["p_value"] = np.nan
        table["p_holm"] = holm(table["p_value"])
        table["significant"] = table["p_holm"] < ALPHA
        table["better"] = table["better"].astype("boolean")
        table["verdict"] = [verdict_kind(r, MIN if lower[r["metric"]] else MAX) for _, r in table.iterrows()]
        table["seeds_needed"] = pd.to_numeric(table["seeds_needed"], errors="coerce").astype("Int64")
    return table


def compare_cells(
    cell: pd.DataFrame, base: pd.DataFrame, metric: str, task_keys: Sequence[str] = (), lower: bool = False
) -> dict:
    """Mean difference (cell − base) with its 95% interval, the test, p, Cohen's d, power figures, whether the
    cell is better, P(a cell run beats a baseline run) and a note; ``lower``: smaller values are better."""
    a = _per_seed(cell, metric)
    b = _per_seed(base, metric)
    a_all = pd.to_numeric(cell[metric], errors="coerce").dropna().to_numpy()
    b_all = pd.to_numeric(base[metric], errors="coerce").dropna().to_numpy()
    common = a.index.intersection(b.index)
    paired = len(common) >= 2 and len(common) >= PAIRED_FRACTION * min(len(a), len(b))
    out = {
        "n": len(a_all),
        "n_baseline": len(b_all),
        "mean": mean_of(a_all),
        "mean_baseline": mean_of(b_all),
        "n_pairs": len(common) if paired else 0,
    }
    if paired:
        out.update(paired_test(a[common].to_numpy(), b[common].to_numpy()))
        out.update(paired_power(a[common].to_numpy() - b[common].to_numpy()))
        left_out = len(a) + len(b) - 2 * len(common)
        if left_out:
            note = f"paired on the {len(common)} shared seeds; {left_out} unpaired run(s) not in the test"
            out["note"] = "; ".join(x for x in (out.get("note", ""), note) if x)
    else:
        out.update(welch_test(a_all, b_all))
        out.update(independent_power(a_all, b_all))
    out["note"] = _seed_note(out["n"], out["n_baseline"], out.get("note", ""))
    sign = -1.0 if lower else 1.0
    out["better"] = bool(sign * out["diff"] > 0) if np.isfinite(out["diff"]) else None
    tasks = list(task_keys)
    # Beating a run means a higher value, or a lower one for a lower-is-better metric: compare signed values.
    x, y = (sign * pd.to_numeric(c[metric], errors="coerce").to_numpy() for c in (cell, base))
    p = probability_of_improvement(x, y, task_labels(cell, tasks), task_labels(base, tasks))
    out["p_improve"], out["p_improve_ci95_low"], out["p_improve_ci95_high"] = p
    return out


def paired_test(a: np.ndarray, b: np.ndarray) -> dict:
    """Paired t-test of ``a`` against ``b`` (the same seeds, or the same model before and after): the mean
    difference a − b with its 95% t-interval, Cohen's d, and Wilcoxon's p from :data:`MIN_WILCOXON_PAIRS` pairs."""
    d = a - b
    n = len(d)
    low, high = _interval(d.mean(), d.std(ddof=1) / np.sqrt(n), n - 1)
    out = {
        "diff": float(d.mean()),
        "diff_ci95_low": low,
        "diff_ci95_high": high,
        "test": "paired t",
        "df": n - 1,
        "cohens_d": cohens_d(a, b),
        "wilcoxon_p": np.nan,
    }
    if np.allclose(d, d[0]):
        out.update(
            statistic=np.nan, p_value=np.nan, note="every pair differs by the same amount: the t-test is undefined"
        )
        return out
    res = sps.ttest_rel(a, b)
    out.update(statistic=float(res.statistic), p_value=float(res.pvalue))
    if n >= MIN_WILCOXON_PAIRS and np.any(d != 0):
        out["wilcoxon_p"] = float(sps.wilcoxon(a, b).pvalue)
    return out


def welch_test(a: np.ndarray, b: np.ndarray) -> dict:
    """Welch's t-test of independent samples ``a`` and ``b``: the mean difference with its 95% interval."""
    diff = mean_of(a) - mean_of(b)
    out = {
        "diff": diff,
        "diff_ci95_low": np.nan,
        "diff_ci95_high": np.nan,
        "test": "Welch t",
        "df": np.nan,
        "statistic": np.nan,
        "p_value": np.nan,
        "cohens_d": cohens_d(a, b),
        "wilcoxon_p": np.nan,
    }
    if len(a) < 2 or len(b) < 2:
        out["test"] = "none"
        return out
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        out["note"] = "no spread within either cell: the t-test is undefined"
        return out
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    res = sps.ttest_ind(a, b, equal_var=False)
    low, high = _interval(diff, np.sqrt(va + vb), dof)
    out.update(
        diff_ci95_low=low, diff_ci95_high=high, df=float(dof), statistic=float(res.statistic), p_value=float(res.pvalue)
    )
    return out


def _interval(center: float, se: float, dof: float) -> tuple[float, float]:
    half = sps.t.ppf(0.5 + CONFIDENCE / 2, dof) * se
    return float(center - half), float(center + half)


def _seed_note(n: int, n_base: int, note: str) -> str:
    smallest = min(n, n_base)
    if smallest < 2:
        warn = (
            f"only {smallest} seed{'s' if smallest != 1 else ''} on one side: no test is possible; "
            f"run at least {MIN_SEEDS} seeds per cell"
        )
    elif smallest < MIN_SEEDS:
        warn = (
            f"only {smallest} seeds on one side: too few for the test to mean anything; "
            f"run at least {MIN_SEEDS} (better 5) seeds per cell"
        )
    else:
        warn = ""
    return "; ".join(s for s in (warn, note) if s)


def _matching_bases(values: dict, bases: list, group_by: list[str], baseline: Mapping) -> list:
    """Baseline cells that agree with ``values`` on the keys other than the baseline's."""
    others = [k for k in group_by if k not in baseline]
    return [bases[i] for i in matching_cells(values, [bv for bv, _ in bases], others)]


def _per_seed(cell: pd.DataFrame, metric: str) -> pd.Series:
    """Metric per seed (mean over duplicate seeds); runs without a seed cannot pair."""
    x = pd.DataFrame({"seed": cell["seed"], "v": pd.to_numeric(cell[metric], errors="coerce")}).dropna()
    return x.groupby("seed")["v"].mean()
