"""Training dynamics per run from its learning curve (metrics.jsonl), summary as fallback.

The curve is the runs' task metric (``val_top1`` for image classification, ``val_mse`` for a regression task:
:func:`~stackwise_bench.analysis.read.directions.task_metrics`), read the way its task says is better:

- best: the highest validation value (the lowest, for a lower-is-better metric) and its epoch;
- convergence epoch: first epoch whose validation value is within ``CONVERGENCE_TOLERANCE`` of the run's best;
- generalisation gap: how much worse the final validation value is than the final training value;
- overfitting score: how much worse the final validation value is than the best;
- time per epoch: mean and standard deviation (ddof=1) over the run's epochs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stackwise_bench.analysis.read.collect import override_keys
from stackwise_bench.analysis.read.directions import lower_is_better, task_metrics

CONVERGENCE_TOLERANCE = 0.5  # accuracy points: closer than this is noise between epochs
RELATIVE_TOLERANCE = 0.01  # any other metric (a loss in nats, an error): within 1% of the run's best


def convergence_tolerance(metric: str) -> str:
    """How close to the run's best its convergence epoch is, in words (for the report)."""
    return f"{CONVERGENCE_TOLERANCE} points" if metric == "top1" else f"{RELATIVE_TOLERANCE:.0%}"


# {m}: the task metric's name (top1, mse).
COLUMNS = (
    "best_val_{m}",
    "best_epoch",
    "convergence_epoch",
    "final_train_{m}",
    "final_val_{m}",
    "final_val_loss",
    "generalisation_gap",
    "overfitting",
    "epoch_time_mean_s",
    "epoch_time_std_s",
    "train_img_s_mean",
    "epochs",
)
# Where a run has no curve, its summary already holds these (run record contract).
FROM_SUMMARY = {
    "best_val_{m}": "train.best_val_{m}",
    "best_epoch": "train.best_epoch",
    "final_train_{m}": "train.final_train_{m}",
    "final_val_{m}": "train.final_val_{m}",
    "final_val_loss": "train.final_val_loss",
    "epoch_time_mean_s": "train.epoch_time_mean_s",
    "epoch_time_std_s": "train.epoch_time_std_s",
    "epochs": "train.epochs_run",
}


def dynamics_columns(metric: str = "top1") -> list[str]:
    """The dynamics columns of a task metric: ``best_val_top1``, ..., or ``best_val_mse``, ..."""
    return [c.format(m=metric) for c in COLUMNS]


def run_dynamics(runs: pd.DataFrame, epochs: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """One row per run: its override columns, status and the :func:`dynamics_columns` of its task metric.

    Args:
        runs: table from ``collect_runs``.
        epochs: table from ``collect_epochs`` (may be empty).
        metric: the task metric's name (default: the runs' tasks' most common one).
    """
    m = metric or task_metrics(runs)[0]
    sign = -1.0 if lower_is_better(runs, f"val_{m}") else 1.0
    keys = ["run_dir", "status", *override_keys(runs)]
    curve = _from_curves(epochs, m, sign)
    out = runs[keys].merge(curve, on="run_dir", how="left") if len(curve) else runs[keys].copy()
    for template, source in FROM_SUMMARY.items():
        col, source = template.format(m=m), source.format(m=m)
        fallback = pd.to_numeric(runs[source], errors="coerce").to_numpy() if source in runs else np.nan
        out[col] = out[col].fillna(pd.Series(fallback, index=out.index)) if col in out else fallback
    for col in dynamics_columns(m):
        if col not in out:
            out[col] = np.nan
    best, train, final = out[f"best_val_{m}"], out[f"final_train_{m}"], out[f"final_val_{m}"]
    out["generalisation_gap"] = out["generalisation_gap"].fillna(sign * (train - final))
    out["overfitting"] = out["overfitting"].fillna(sign * (best - final))
    out.attrs["override_keys"] = override_keys(runs)
    return out


def _from_curves(epochs: pd.DataFrame, m: str, sign: float) -> pd.DataFrame:
    """Dynamics from the curves; epochs without validation (eval_every > 1) are skipped where it matters.

    ``sign`` is −1 for a lower-is-better metric: the best is then the smallest value.
    """
    val, train = f"val_{m}", f"train_{m}"
    if epochs.empty or val not in epochs:
        return pd.DataFrame()
    e = epochs.sort_values(["run_dir", "epoch"], kind="stable")
    g = e.groupby("run_dir", sort=False)
    out = pd.DataFrame({"epochs": g["epoch"].max()})
    ev = e[e[val].notna()].assign(_score=lambda d: sign * pd.to_numeric(d[val], errors="coerce"))
    # The best is chosen as the trainer chose best.pt: among epochs at the run's final depth (a depth-as-time run's
    # earlier, shallower epochs never become best.pt); rows without a depth (older records) all count.
    final = ev
    if "depth" in ev:
        depth = pd.to_numeric(ev["depth"], errors="coerce")
        last = depth.groupby(ev["run_dir"]).transform("last")
        final = ev[depth.isna() | last.isna() | (depth == last)]
    best = final.loc[final.groupby("run_dir", sort=False)["_score"].idxmax()].set_index("run_dir")
    out[f"best_val_{m}"], out["best_epoch"] = best[val], best["epoch"]
    best_score = ev["run_dir"].map(sign * out[f"best_val_{m}"])
    tolerance = CONVERGENCE_TOLERANCE if m == "top1" else RELATIVE_TOLERANCE * best_score.abs()
    near = ev[ev["_score"] >= best_score - tolerance]
    out["convergence_epoch"] = near.groupby("run_dir")["epoch"].min()
    for src, dst in ((train, f"final_train_{m}"), (val, f"final_val_{m}"), ("val_loss", "final_val_loss")):
        out[dst] = g[src].last() if src in e else np.nan  # last logged value of each curve
    out["generalisation_gap"] = sign * (out[f"final_train_{m}"] - out[f"final_val_{m}"])
    out["overfitting"] = sign * (out[f"best_val_{m}"] - out[f"final_val_{m}"])
    if "epoch_time_s" in e:
        out["epoch_time_mean_s"] = g["epoch_time_s"].mean()
        out["epoch_time_std_s"] = g["epoch_time_s"].std(ddof=1)
    if "train_img_s" in e:
        out["train_img_s_mean"] = g["train_img_s"].mean()
    return out.reset_index()
