"""``analyze scaling=<axis>``: how the error falls along a numeric size axis, with bootstrap intervals.

The axis is a numeric column of the run table: an override key (``lora.rank``, ``model.depth``) or a
summary number (``params.trainable``, ``params.total``), or ``train.tokens``, a language model's training tokens
(:data:`DERIVED`: steps × sequences per step × tokens per sequence, from the columns every run records).
The error is the metric itself where lower is better (a loss, an MSE) and ``100 − metric`` where higher is
better (accuracies in percent); the direction comes from the runs' task records
(:mod:`~stackwise_bench.analysis.read.directions`), not from the metric's name.
Runs are split into one fit per *stratum*, the cells of the grouping keys that are not the axis (nor the key
that sets it, e.g. ``lora.rank`` for ``params.trainable``); ``group_by=`` chooses them. Each stratum with at
least :data:`~stackwise_bench.analysis.stats.power_law.MIN_LEVELS` levels gets E + A·x^(−α)
(:mod:`~stackwise_bench.analysis.stats.power_law`); the others get one sentence saying why there is no curve.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from stackwise_bench.analysis.read.directions import lower_is_better
from stackwise_bench.analysis.read.formatting import fmt_sig
from stackwise_bench.analysis.read.grouping import format_value, group_label, iter_groups
from stackwise_bench.analysis.stats.power_law import CONFIDENCE, MIN_LEVELS, N_BOOT, BootstrapFit, bootstrap_fit
from stackwise_bench.errors import ConfigError
from stackwise_bench.runs.contract import FINISHED

# Axes computed from the columns they multiply when the runs do not record them. trainer.accumulate splits a step's
# batch into micro-batches, it does not add to it: a step trains on trainer.batch_size sequences.
DERIVED = {"train.tokens": ("train.steps", "trainer.batch_size", "data.seq_len")}

COLUMNS = (
    "stratum",
    "axis",
    "error",
    "levels",
    "runs",
    "alpha",
    "alpha_ci95_low",
    "alpha_ci95_high",
    "E",
    "E_ci95_low",
    "E_ci95_high",
    "A",
    "A_ci95_low",
    "A_ci95_high",
    "huber_loss",
    "bootstrap",
    "bootstrap_failed",
    "note",
)


@dataclass
class StratumFit:
    """One stratum's points (axis value and error per run) and its fit, or the sentence saying why not."""

    label: str
    x: np.ndarray
    y: np.ndarray
    fit: BootstrapFit | None = None
    note: str = ""


@dataclass
class ScalingAnalysis:
    axis: str
    metric: str
    error: str  # what was fitted: "100 − test.top1" or "test.loss"
    strata_keys: list[str]
    strata: list[StratumFit] = field(default_factory=list)

    @property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame([_row(self, s) for s in self.strata], columns=list(COLUMNS))

    @property
    def sentences(self) -> list[str]:
        """One sentence per stratum without a curve."""
        return [f"{s.label}: {s.note}" if s.label != "all runs" else s.note for s in self.strata if s.fit is None]


def error_of(metric: str, lower: bool) -> str:
    """What is fitted: the metric where lower is better, else its distance to 100 (percent)."""
    return metric if lower else f"100 − {metric}"


def analyze_scaling(
    runs: pd.DataFrame, axis: str, metric: str, group_by: list[str], *, n_boot: int = N_BOOT, seed: int = 0
) -> ScalingAnalysis:
    """Fit every stratum of the finished runs along ``axis`` (see the module docstring).

    Raises:
        ConfigError: ``axis`` is not a column of the runs, or not numeric.
    """
    done = runs[runs["status"].isin(FINISHED)]
    x_all = _axis_values(runs, axis)
    keys = strata_keys(done.assign(_x=x_all[done.index]), axis, group_by)
    lower = lower_is_better(runs, metric)
    out = ScalingAnalysis(axis, metric, error_of(metric, lower), keys)
    frame = done.assign(_x=x_all[done.index], _y=pd.to_numeric(done[metric], errors="coerce"))
    for values, cell in iter_groups(frame, keys) if keys else [({}, frame)]:
        out.strata.append(_fit_stratum(cell, group_label(values, keys), axis, metric, lower, n_boot, seed))
    return out


def strata_keys(done: pd.DataFrame, axis: str, group_by: list[str]) -> list[str]:
    """The grouping keys that split the fits: all but the axis and the key that sets the axis' values.

    That key is the one whose values, within each cell of the other keys, map one to one onto at least two
    axis values (``lora.rank`` for ``params.trainable``); with several, the one with the most levels. When every
    key of several does and all of them are numeric (``model.n_embd`` x ``model.n_layer`` for ``params.total``),
    they are the size together: none of them splits the fit, one curve runs across the whole ladder (per value of
    any other key, such as ``optimizer.lr``). A key named by words (``lora.method``, ``precision``) always splits it.
    """
    keys = [k for k in group_by if k != axis]
    if axis in group_by:
        return keys
    drivers = []
    for k in keys:
        others = [o for o in keys if o != k]
        cells = list(iter_groups(done, others)) if others else [({}, done)]
        if all(_one_to_one(cell[k], cell["_x"]) for _, cell in cells):
            drivers.append((done[k].nunique(), k))
    if not drivers:
        return keys
    sizes = [k for _, k in drivers]
    if len(sizes) > 1 and all(pd.to_numeric(done[k], errors="coerce").notna().all() for k in sizes):
        return [k for k in keys if k not in sizes]  # the size keys together; any other key still splits
    driver = max(drivers)[1]
    return [k for k in keys if k != driver]


def _one_to_one(keys: pd.Series, x: pd.Series) -> bool:
    pairs = pd.DataFrame({"k": keys.map(format_value), "x": x}).dropna().drop_duplicates()
    return len(pairs) >= 2 and pairs["k"].is_unique and pairs["x"].is_unique


def _axis_values(runs: pd.DataFrame, axis: str) -> pd.Series:
    if axis not in runs and all(c in runs for c in DERIVED.get(axis, ("",))):
        factors = [pd.to_numeric(runs[c], errors="coerce") for c in DERIVED[axis]]
        return pd.Series(np.prod(factors, axis=0), index=runs.index, dtype=float)
    if axis not in runs:
        shown = ", ".join(_numeric_candidates(runs)[:12])
        raise ConfigError(f"scaling={axis} is not a column of these runs; choose a numeric one that varies: {shown}.")
    x = pd.to_numeric(runs[axis], errors="coerce")
    if x.notna().sum() == 0:
        raise ConfigError(f"scaling={axis} has no numeric values; choose a numeric axis such as lora.rank.")
    return x


def _numeric_candidates(runs: pd.DataFrame) -> list[str]:
    """Numeric columns that vary: override keys first, then parameter counts, then the rest of train.*."""
    from stackwise_bench.analysis.read.collect import override_keys

    keys = [k for k in override_keys(runs) if k != "seed"]
    derived = [a for a, cols in DERIVED.items() if all(c in runs for c in cols)]
    ordered = keys + [c for c in runs.columns if c.startswith("params.")] + [c for c in runs if c.startswith("train.")]
    out = []
    for c in dict.fromkeys(ordered + derived):
        v = _axis_values(runs, c) if c in derived else pd.to_numeric(runs[c], errors="coerce")
        if v.notna().any() and v.nunique() >= 2:
            out.append(c)
    return out or ["(none: no numeric column varies)"]


def _fit_stratum(
    cell: pd.DataFrame, label: str, axis: str, metric: str, lower: bool, n_boot: int, seed: int
) -> StratumFit:
    usable = cell[cell["_x"].notna() & cell["_y"].notna()]
    x = usable["_x"].to_numpy(float)
    y = usable["_y"].to_numpy(float) if lower else 100.0 - usable["_y"].to_numpy(float)
    s = StratumFit(label, x, y)
    nonpositive = sorted({format_value(v) for v in usable.loc[usable["_x"] <= 0, "_x"]})
    keep = x > 0
    s.x, s.y = x[keep], y[keep]
    levels = len(np.unique(s.x))
    dropped = f" ({axis}={', '.join(nonpositive)} has no logarithm and is left out)" if nonpositive else ""
    if levels < MIN_LEVELS:
        s.note = (
            f"{axis} has {levels} level{'s' if levels != 1 else ''} with finished runs{dropped}; a fit of "
            f"E + A·x^(−α) needs at least {MIN_LEVELS}, so no curve is drawn."
        )
        return s
    if np.any(s.y <= 0):
        what = "is 0 or below" if lower else "reaches 100%"
        s.note = (
            f"{metric} {what} in {int(np.sum(s.y <= 0))} run(s): an error of 0 has no logarithm, so no curve is "
            "drawn; fit a loss instead (metric=test.loss)."
        )
        return s
    fit = bootstrap_fit(s.x, s.y, n_boot=n_boot, seed=seed)
    if not fit.fit.converged:
        s.note = f"the fit of E + A·x^(−α) along {axis} did not converge: {fit.fit.reason}; no curve is drawn."
        return s
    s.fit, s.note = fit, dropped.strip(" ()")
    if fit.failed > 0.1 * fit.n_boot:
        s.note = "; ".join(
            x
            for x in (s.note, f"{fit.failed} of {fit.n_boot} bootstrap refits failed: the intervals are optimistic")
            if x
        )
    return s


def _row(a: ScalingAnalysis, s: StratumFit) -> dict:
    row = {
        "stratum": s.label,
        "axis": a.axis,
        "error": a.error,
        "levels": len(np.unique(s.x)),
        "runs": len(s.x),
        "note": s.note,
    }
    if s.fit is None:
        return row
    f = s.fit
    row.update(huber_loss=f.fit.loss, bootstrap=f.n_boot, bootstrap_failed=f.failed)
    for name, value in (("alpha", f.fit.alpha), ("E", f.fit.E), ("A", f.fit.A)):
        row[name] = value
        row[f"{name}_ci95_low"], row[f"{name}_ci95_high"] = f.intervals[name]
    return row


def scaling_md(a: ScalingAnalysis) -> str:
    """The report section: exponents with intervals, and one sentence per stratum without a curve."""
    lines = [f"## Scaling along {a.axis}\n"]
    fitted = [s for s in a.strata if s.fit is not None]
    if fitted:
        rows = []
        for s in fitted:
            f = s.fit
            rows.append(
                "| "
                + " | ".join(
                    [
                        s.label,
                        str(len(np.unique(s.x))),
                        str(len(s.x)),
                        *(estimate_text(f, k) for k in ("alpha", "E", "A")),
                        s.note or "",
                    ]
                )
                + " |"
            )
        lines += [
            "| stratum | levels | runs | α [95%] | E [95%] | A [95%] | note |",
            "|---|---:|---:|---|---|---|---|",
            *rows,
            "",
            f"error = {a.error} fitted as E + A·x^(−α), x = {a.axis}: Huber loss (δ = 0.1) in log space, "
            f"L-BFGS from 25 starts; {int(CONFIDENCE * 100)}% percentile intervals from "
            f"{fitted[0].fit.n_boot} refits on seeds resampled within each level. E is the error the axis "
            "cannot remove; α how fast the rest falls.",
            "",
        ]
    lines += [f"- {s}" for s in a.sentences]
    return "\n".join(lines) + "\n"


def estimate_text(fit: BootstrapFit, name: str) -> str:
    """``0.52 [0.31, 0.70]``: the estimate of ``name`` (alpha, E or A) and its interval, 3 significant digits."""

    def text(v: float) -> str:  # a floor E at its lower bound (~1e-12) is 0 for the reader
        return "0" if abs(v) < 1e-6 else fmt_sig(v, 3)

    low, high = fit.intervals[name]
    return f"{text(getattr(fit.fit, name))} [{text(low)}, {text(high)}]"
