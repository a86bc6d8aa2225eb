"""The precision study: accuracy, generalisation, time, resources and energy per precision, against fp32."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stackwise_bench.analysis.read.directions import lower_is_better, task_metrics
from stackwise_bench.analysis.read.grouping import group_label, iter_groups, same_value
from stackwise_bench.analysis.read.numeric import mean_of
from stackwise_bench.analysis.stats.seeds import describe
from stackwise_bench.analysis.studies.energy import ENERGY, ENERGY_PER_IMG, energy_highlight
from stackwise_bench.analysis.studies.view import StudyView, ratio_to_reference
from stackwise_bench.runs.contract import FINISHED

ENERGY_SHOWN = ("energy_j", "energy_j_per_img", "energy_vs_fp32")  # precision-table columns of energy readings


def precision_study(
    runs: pd.DataFrame, dynamics: pd.DataFrame, epochs: pd.DataFrame, group_by: list[str], metric: str
) -> StudyView | None:
    """Accuracy, generalisation, time, resource and energy use per precision cell, with speed-ups over fp32.

    The highlights name the most energy-efficient cell (lowest mean J per training image) where at
    least two cells have energy readings.
    """
    if "precision" not in group_by:
        return None
    m = task_metrics(runs)[0]  # the dynamics' curve: best_val_top1, or best_val_mse for a regression task
    cols = {
        f"best_val_{m}": f"best_val_{m}",
        f"final_train_{m}": f"final_train_{m}",
        "overfitting": "overfitting",
        "generalisation_gap": "generalisation_gap",
        "final_val_loss": "final_val_loss",
    }
    res = {
        "train.time_s": "time_s",
        "train.img_s": "img_s",
        "resources.cpu_percent_mean": "cpu_percent_mean",
        "resources.rss_mb_mean": "rss_mb_mean",
        "resources.peak_rss_mb": "peak_rss_mb",
        "resources.peak_gpu_mem_mb": "peak_gpu_mem_mb",
        ENERGY: "energy_j",
        ENERGY_PER_IMG: "energy_j_per_img",
    }
    done_dyn = dynamics[dynamics["status"].isin(FINISHED)]
    done_ep = epochs[epochs["status"].isin(FINISHED)] if len(epochs) else epochs
    rows = []
    for values, cell in iter_groups(runs[runs["status"].isin(FINISHED)], group_by):
        dyn = done_dyn[done_dyn["run_dir"].isin(cell["run_dir"])]
        row = {**values, "group": group_label(values, group_by), "n": len(cell), metric: mean_of(cell[metric])}
        row[f"best_val_{m}_std"] = describe(dyn[f"best_val_{m}"])["std"]
        row.update({dst: mean_of(dyn[src]) for src, dst in cols.items()})
        row.update({dst: mean_of(cell[src]) if src in cell else np.nan for src, dst in res.items()})
        times = (
            done_ep.loc[done_ep["run_dir"].isin(cell["run_dir"]), "epoch_time_s"]
            if "epoch_time_s" in done_ep
            else pd.Series(dtype=float)
        )
        t = describe(times) if len(times) else {"mean": mean_of(dyn["epoch_time_mean_s"]), "std": np.nan}
        row["epoch_time_mean_s"], row["epoch_time_std_s"] = t["mean"], t["std"]
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return None
    table["speedup_vs_fp32"] = ratio_to_reference(table, group_by, "precision", "fp32", "time_s", invert=True)
    table["energy_vs_fp32"] = ratio_to_reference(table, group_by, "precision", "fp32", "energy_j_per_img")
    order = [
        *group_by,
        "n",
        metric,
        f"best_val_{m}",
        f"best_val_{m}_std",
        f"final_train_{m}",
        "overfitting",
        "generalisation_gap",
        "final_val_loss",
        "time_s",
        "epoch_time_mean_s",
        "epoch_time_std_s",
        "speedup_vs_fp32",
        "img_s",
        "cpu_percent_mean",
        "rss_mb_mean",
        "peak_rss_mb",
        "peak_gpu_mem_mb",
        "energy_j",
        "energy_j_per_img",
        "energy_vs_fp32",
    ]
    table = table[[*dict.fromkeys(order), "group"]]
    # Energy only where some run could read it: a CPU-only study's table gains no empty columns.
    table = table.drop(columns=[c for c in ENERGY_SHOWN if table[c].isna().all()])
    lower = lower_is_better(runs, metric)
    highlights = _precision_highlights(table, metric, lower) + [h for h in [energy_highlight(table)] if h]
    return StudyView("Precision study", table, highlights)


def _precision_highlights(table: pd.DataFrame, metric: str, lower: bool) -> list[str]:
    """The cell with the best mean ``metric`` (the lowest where ``lower`` is better), the smallest mean
    generalisation gap, the shortest mean training time: means, not tested differences (the comparisons are)."""
    out = []
    for col, word, best, unit in (
        (metric, f"lowest mean {metric}", min, metric)
        if lower
        else (metric, "highest mean accuracy", max, f"% {metric}"),
        ("generalisation_gap", "smallest mean generalisation gap", min, "points train − val gap"),
        ("time_s", "shortest mean training time", min, "s"),
    ):
        values = table[col].dropna()
        if len(values) > 1:  # one cell is not a comparison
            winner = best(values)
            tied = table.loc[values.index[np.isclose(values, winner)], "group"]
            who = tied.iloc[0] if len(tied) == 1 else "tie between " + "; ".join(tied)
            out.append(f"{word}: {who} ({winner:.2f} {unit})")
    for _, row in table.iterrows():
        if pd.notna(row["speedup_vs_fp32"]) and not same_value(row["precision"], "fp32"):
            out.append(f"speed-up of {row['group']} over fp32: ×{row['speedup_vs_fp32']:.2f}")
    return out
