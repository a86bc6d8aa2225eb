"""The GLUE average of a study that fine-tunes on several GLUE tasks (``dataset=glue dataset.task=cola,mrpc,...``).

Each GLUE run records ``test.score``, its task's GLUE number (training/glue_metrics.py: the mean of the task's
reported metrics: CoLA mcc, MRPC and QQP (f1 + acc) / 2, STS-B (pearson + spearman) / 2, MNLI (matched +
mismatched) / 2, the others acc). A cell here is the study's cell less the task; per cell and seed, the GLUE average
is the mean of ``test.score`` over the tasks that seed ran, and the cell's mean ± std and 95% t-interval are over
its seeds. A cell where some seed lacks a task another seed of it has gets no average: its row names what is
missing (an average over fewer tasks would not be the same quantity).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stackwise_bench.analysis.read.formatting import fmt, markdown_table
from stackwise_bench.analysis.read.grouping import format_value, group_label, iter_groups
from stackwise_bench.analysis.stats.seeds import describe
from stackwise_bench.runs.contract import FINISHED, GLUE

SCORE = "test.score"
TASK_KEYS = ("task.glue_task", "dataset.task")  # the record's task, else the config's
STATS = ("n", "mean", "std", "ci95_low", "ci95_high", "min", "max")
COLUMNS = ("group", "tasks", "seeds", *STATS, "missing")


def glue_average(runs: pd.DataFrame, group_by: list[str]) -> pd.DataFrame:
    """One row per cell (``group_by`` less the task): the tasks averaged, the seeds, the seed statistics of the
    per-seed GLUE average, and ``missing`` (``seed=2 lacks mrpc; ...``, the statistics then NaN). Empty unless
    the finished GLUE runs span at least two tasks."""
    task_key = next((k for k in TASK_KEYS if k in runs), None)
    if task_key is None or SCORE not in runs or "task.name" not in runs:
        return pd.DataFrame(columns=COLUMNS)
    glue = runs[runs["status"].isin(FINISHED) & runs["task.name"].eq(GLUE["name"]) & runs[SCORE].notna()]
    if glue[task_key].nunique() < 2:
        return pd.DataFrame(columns=COLUMNS)
    cells = [k for k in group_by if k not in TASK_KEYS]
    rows = []
    for values, cell in iter_groups(glue, cells):
        tasks = sorted(cell[task_key].unique())
        per_seed = cell.groupby(["seed", task_key])[SCORE].mean().unstack(task_key).reindex(columns=tasks)
        missing = [
            f"seed={format_value(seed)} lacks {', '.join(t for t in tasks if pd.isna(row[t]))}"
            for seed, row in per_seed.iterrows()
            if row.isna().any()
        ]
        averages = per_seed.mean(axis=1).to_numpy(dtype=float) if not missing else np.array([])
        stats = describe(averages)
        rows.append(
            {
                **values,
                "group": group_label(values, cells),
                "tasks": " ".join(tasks),
                "seeds": " ".join(format_value(s) for s in per_seed.index),
                **{k: stats[k] for k in STATS},
                "missing": "; ".join(missing),
            }
        )
    return pd.DataFrame(rows)[[*cells, *COLUMNS]]


def glue_average_md(table: pd.DataFrame, group_by: list[str]) -> str:
    """The report section: per cell, the GLUE average over its tasks (mean ± std over seeds, 95% t-interval)."""
    if table.empty:
        return ""
    rows = []
    for _, r in table.iterrows():
        row = {"group": r["group"]} if any(k not in TASK_KEYS for k in group_by) else {}
        if r["missing"]:
            row |= {"GLUE average": "not averaged", "95% CI": "", "n": 0, "tasks": r["tasks"], "why": r["missing"]}
        else:
            spread = "" if pd.isna(r["std"]) else f" ± {fmt(r['std'])}"
            interval = "" if pd.isna(r["ci95_low"]) else f"[{fmt(r['ci95_low'])}, {fmt(r['ci95_high'])}]"
            row |= {"GLUE average": fmt(r["mean"]) + spread, "95% CI": interval, "n": r["n"], "tasks": r["tasks"]}
            row["why"] = ""
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame["why"].any():
        frame = frame.drop(columns="why")
    return (
        "## GLUE average\n\nPer cell (the study's cell less the task) and seed, the mean over the tasks of each "
        "task's GLUE score (test.score: the mean of the task's reported metrics, e.g. MRPC's (f1 + acc) / 2, "
        "CoLA's mcc); mean ± std and the 95% t-interval over seeds. A cell where a seed lacks a task its other "
        "seeds have is not averaged.\n\n" + markdown_table(frame)
    )
