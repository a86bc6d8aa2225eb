"""The optimizer study: final accuracy per optimizer with intervals, and the test against SGD."""

from __future__ import annotations

import pandas as pd

from stackwise_bench.analysis.read.directions import WORDS, diff_unit, direction_of
from stackwise_bench.analysis.read.grouping import group_label, same_value
from stackwise_bench.analysis.stats.compare import compare_to_baseline
from stackwise_bench.analysis.stats.verdicts import verdict
from stackwise_bench.analysis.studies.view import StudyView, ci_columns

READ_AS = "no recorded direction: read as higher is better"


def optimizer_study(summary: pd.DataFrame, runs: pd.DataFrame, metric: str, group_by: list[str]) -> StudyView | None:
    """The metric per optimizer with intervals, and the test against SGD with which is better (the metric's
    direction comes from the runs' task records)."""
    if "optimizer" not in group_by:
        return None
    table = summary[summary["metric"] == metric].reset_index(drop=True)
    table = table[[*group_by, "metric", "n", "mean", "std", *ci_columns(table), "min", "max", "incomplete"]]
    values = [v for v in runs["optimizer"].dropna().unique()]
    ref = "sgd" if any(same_value(v, "sgd") for v in values) else sorted(map(str, values))[0]
    comparisons = compare_to_baseline(runs, metric, {"optimizer": ref}, group_by)
    ref_value = next(v for v in values if same_value(v, ref))
    comparisons, unmatched = same_but(comparisons, group_by, "optimizer", ref_value)
    direction, unit = direction_of(runs, metric), diff_unit(metric)
    highlights = []
    for _, row in comparisons.iterrows():
        if pd.notna(row.get("diff")):
            head = f"{row['group']} vs {row['baseline']}: {row['diff']:+.2f} {unit} ({WORDS.get(direction, READ_AS)})"
            highlights.append(f"{head}: {verdict(row, direction)}")
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
