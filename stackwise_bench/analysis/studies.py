"""The views each study asks for: precision and optimizer (PEFT: :mod:`stackwise_bench.analysis.peft`).

Each view returns ``None`` when its key does not vary in the runs, else a
:class:`StudyView` (a title, one table with a row per cell, and a few
plain-language highlights for the report and the screen).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from stackwise_bench.analysis.compare import compare_to_baseline
from stackwise_bench.analysis.energy import ENERGY, ENERGY_PER_IMG, energy_highlight
from stackwise_bench.analysis.grouping import group_label, iter_groups, same_value
from stackwise_bench.analysis.stats import describe
from stackwise_bench.runs.contract import FINISHED

ENERGY_SHOWN = ("energy_j", "energy_j_per_img", "energy_vs_fp32")  # precision-table columns of energy readings


@dataclass
class StudyView:
    title: str
    table: pd.DataFrame
    highlights: list[str] = field(default_factory=list)
    comparisons: pd.DataFrame | None = None


def precision_study(
    runs: pd.DataFrame, dynamics: pd.DataFrame, epochs: pd.DataFrame, group_by: list[str], metric: str
) -> StudyView | None:
    """Accuracy, generalisation, time, resource and energy use per precision cell, with speed-ups over fp32.

    The highlights name the most energy-efficient cell (lowest mean J per training image) where at
    least two cells have energy readings.
    """
    if "precision" not in group_by:
        return None
    cols = {
        "best_val_top1": "best_val_top1",
        "final_train_top1": "final_train_top1",
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
        row = {**values, "group": group_label(values, group_by), "n": len(cell), metric: _mean(cell[metric])}
        row["best_val_top1_std"] = describe(dyn["best_val_top1"])["std"]
        row.update({dst: _mean(dyn[src]) for src, dst in cols.items()})
        row.update({dst: _mean(cell[src]) if src in cell else np.nan for src, dst in res.items()})
        times = (
            done_ep.loc[done_ep["run_dir"].isin(cell["run_dir"]), "epoch_time_s"]
            if "epoch_time_s" in done_ep
            else pd.Series(dtype=float)
        )
        t = describe(times) if len(times) else {"mean": _mean(dyn["epoch_time_mean_s"]), "std": np.nan}
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
        "best_val_top1",
        "best_val_top1_std",
        "final_train_top1",
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
    highlights = _precision_highlights(table, metric) + [h for h in [energy_highlight(table)] if h]
    return StudyView("Precision study", table, highlights)


def optimizer_study(summary: pd.DataFrame, runs: pd.DataFrame, metric: str, group_by: list[str]) -> StudyView | None:
    """Final accuracy per optimizer with intervals, and the paired test against SGD."""
    if "optimizer" not in group_by:
        return None
    table = summary[summary["metric"] == metric].reset_index(drop=True)
    table = table[[*group_by, "metric", "n", "mean", "std", "ci95_low", "ci95_high", "min", "max", "incomplete"]]
    values = [v for v in runs["optimizer"].dropna().unique()]
    ref = "sgd" if any(same_value(v, "sgd") for v in values) else sorted(map(str, values))[0]
    comparisons = compare_to_baseline(runs, metric, {"optimizer": ref}, group_by)
    ref_value = next(v for v in values if same_value(v, ref))
    comparisons, unmatched = same_but(comparisons, group_by, "optimizer", ref_value)
    highlights = []
    for _, row in comparisons.iterrows():
        if pd.notna(row.get("diff")):
            p = row.get("p_value")
            highlights.append(
                f"{row['group']} vs {row['baseline']}: {row['diff']:+.2f} points ({row['test']}, p = {p:.3g})"
                if pd.notna(p)
                else f"{row['group']} vs {row['baseline']}: {row['diff']:+.2f} points (no test)"
            )
    highlights += [
        f"{group}: no optimizer={ref} cell with the same other settings to compare with" for group in unmatched
    ]
    return StudyView(f"Optimizer study (reference: optimizer={ref})", table, highlights, comparisons)


def same_but(comparisons: pd.DataFrame, group_by: list[str], key: str, ref) -> tuple[pd.DataFrame, list[str]]:
    """The comparisons whose baseline differs from the cell in ``key`` alone, and the cells left without one.

    ``compare_to_baseline`` lets a key the baseline never takes pass as a label (experiment=BaseFP16 has no fp32
    twin); a study of ``key`` must not: bf16 + extended augmentation + adamw against fp32 + basic + sgd is not
    an optimizer effect. ``ref`` is the reference value as the runs hold it (so both labels format alike).
    """
    if comparisons.empty:
        return comparisons, []
    twins = comparisons.apply(lambda row: group_label({**{k: row[k] for k in group_by}, key: ref}, group_by), axis=1)
    matched = comparisons["baseline"].fillna("") == twins
    kept = comparisons[matched].reset_index(drop=True)
    unmatched = [g for g in dict.fromkeys(comparisons.loc[~matched, "group"]) if g not in set(kept["group"])]
    return kept, unmatched


def _precision_highlights(table: pd.DataFrame, metric: str) -> list[str]:
    out = []
    for col, word, best, unit in (
        (metric, "best accuracy", max, f"% {metric}"),
        ("generalisation_gap", "best generalisation", min, "points train − val gap"),
        ("time_s", "fastest", min, "s total training"),
    ):
        values = table[col].dropna()
        if len(values):
            winner = best(values)
            tied = table.loc[values.index[np.isclose(values, winner)], "group"]
            who = tied.iloc[0] if len(tied) == 1 else "tie between " + "; ".join(tied)
            out.append(f"{word}: {who} ({winner:.2f} {unit})")
    for _, row in table.iterrows():
        if pd.notna(row["speedup_vs_fp32"]) and not same_value(row["precision"], "fp32"):
            out.append(f"speed-up of {row['group']} over fp32: ×{row['speedup_vs_fp32']:.2f}")
    return out


def ratio_to_reference(
    table: pd.DataFrame, group_by: list[str], key: str, ref, col: str, invert: bool = False
) -> pd.Series:
    """Each row's ``col`` divided by its reference row's (``key=ref``, other keys matched)."""
    refs = table[table[key].map(lambda v: same_value(v, ref))]
    others = [k for k in group_by if k != key]
    ref_values = [r for _, r in refs.iterrows()]
    out = []
    for _, row in table.iterrows():  # the reference with every other key equal: a label key is no excuse here
        idx = [i for i, r in enumerate(ref_values) if all(same_value(row[k], r[k]) for k in others)]
        if not idx:
            out.append(np.nan)
            continue
        base = ref_values[idx[0]][col]
        out.append(base / row[col] if invert else row[col] / base)
    return pd.Series(out, index=table.index, dtype=float)


def _mean(x) -> float:
    x = pd.to_numeric(pd.Series(x), errors="coerce").dropna()
    return float(x.mean()) if len(x) else float("nan")
