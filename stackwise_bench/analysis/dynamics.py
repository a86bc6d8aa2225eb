"""Training dynamics per run from its learning curve (metrics.jsonl), summary as fallback.

- convergence epoch: first epoch whose validation accuracy is within
  ``CONVERGENCE_TOLERANCE`` points of the run's best;
- generalisation gap: final train − final validation accuracy;
- overfitting score: best − final validation accuracy;
- time per epoch: mean and standard deviation (ddof=1) over the run's epochs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stackwise_bench.analysis.collect import override_keys

CONVERGENCE_TOLERANCE = 0.5  # accuracy points: closer than this is noise between epochs
DYNAMICS = (
    "best_val_top1",
    "best_epoch",
    "convergence_epoch",
    "final_train_top1",
    "final_val_top1",
    "final_val_loss",
    "generalisation_gap",
    "overfitting",
    "epoch_time_mean_s",
    "epoch_time_std_s",
    "train_img_s_mean",
    "epochs",
)
# Where a run has no curve, its summary already holds these (run record contract).
_FROM_SUMMARY = {
    "best_val_top1": "train.best_val_top1",
    "best_epoch": "train.best_epoch",
    "final_train_top1": "train.final_train_top1",
    "final_val_top1": "train.final_val_top1",
    "final_val_loss": "train.final_val_loss",
    "epoch_time_mean_s": "train.epoch_time_mean_s",
    "epoch_time_std_s": "train.epoch_time_std_s",
    "epochs": "train.epochs_run",
}


def run_dynamics(runs: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its override columns, status and the :data:`DYNAMICS` columns.

    Args:
        runs: table from ``collect_runs``.
        epochs: table from ``collect_epochs`` (may be empty).
    """
    keys = ["run_dir", "status", *override_keys(runs)]
    curve = _from_curves(epochs)
    out = runs[keys].merge(curve, on="run_dir", how="left") if len(curve) else runs[keys].copy()
    for col, source in _FROM_SUMMARY.items():
        fallback = pd.to_numeric(runs[source], errors="coerce").to_numpy() if source in runs else np.nan
        out[col] = out[col].fillna(pd.Series(fallback, index=out.index)) if col in out else fallback
    for col in DYNAMICS:
        if col not in out:
            out[col] = np.nan
    out["generalisation_gap"] = out["generalisation_gap"].fillna(out["final_train_top1"] - out["final_val_top1"])
    out["overfitting"] = out["overfitting"].fillna(out["best_val_top1"] - out["final_val_top1"])
    out.attrs["override_keys"] = override_keys(runs)
    return out


def _from_curves(epochs: pd.DataFrame) -> pd.DataFrame:
    """Dynamics from the curves; epochs without validation (eval_every > 1) are skipped where it matters."""
    if epochs.empty or "val_top1" not in epochs:
        return pd.DataFrame()
    e = epochs.sort_values(["run_dir", "epoch"], kind="stable")
    g = e.groupby("run_dir", sort=False)
    out = pd.DataFrame({"epochs": g["epoch"].max()})
    ev = e[e["val_top1"].notna()]
    gv = ev.groupby("run_dir", sort=False)
    out["best_val_top1"] = gv["val_top1"].max()
    out["best_epoch"] = ev.loc[gv["val_top1"].idxmax()].set_index("run_dir")["epoch"]
    near = ev[ev["val_top1"] >= ev["run_dir"].map(out["best_val_top1"]) - CONVERGENCE_TOLERANCE]
    out["convergence_epoch"] = near.groupby("run_dir")["epoch"].min()
    for src, dst in (
        ("train_top1", "final_train_top1"),
        ("val_top1", "final_val_top1"),
        ("val_loss", "final_val_loss"),
    ):
        out[dst] = g[src].last() if src in e else np.nan  # last logged value of each curve
    out["generalisation_gap"] = out["final_train_top1"] - out["final_val_top1"]
    out["overfitting"] = out["best_val_top1"] - out["final_val_top1"]
    if "epoch_time_s" in e:
        out["epoch_time_mean_s"] = g["epoch_time_s"].mean()
        out["epoch_time_std_s"] = g["epoch_time_s"].std(ddof=1)
    if "train_img_s" in e:
        out["train_img_s_mean"] = g["train_img_s"].mean()
    return out.reset_index()
