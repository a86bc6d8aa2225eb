"""Zero-shot tasks of language models: evaluation records joined to their runs, summarised per cell and task.

``python -m stackwise_bench.evaluate checkpoint=<run> zero_shot.task=lambada zero_shot.path=<file>`` (or
``hellaswag``, ``piqa``; and ``--multirun evaluate.runs=<study> evaluate.zero_shot.task=...``, once per run of a
study) writes ``<run>/eval/<checkpoint>_<task>/summary.json`` with the task's metrics in ``test``
(``lambada_acc``, ``lambada_ppl``, ``hellaswag_acc_norm``, ...) and their directions in its ``task`` section, as a
run records its own: which way a metric is better is read from there, never from its name. Each record is one
observation of its run's cell; when one checkpoint was scored twice on the same task file, the latest counts.
"""

from __future__ import annotations

import os

import pandas as pd

from stackwise_bench.analysis.read.directions import WORDS
from stackwise_bench.analysis.read.formatting import fmt, markdown_table
from stackwise_bench.analysis.read.grouping import format_value, group_label, iter_groups
from stackwise_bench.analysis.stats.seeds import describe
from stackwise_bench.runs.contract import FINISHED, read_summary

# What makes two records of the same run different treatments (not repeats): the task, its file, the checkpoint.
SETTINGS = ("task", "file_sha256", "checkpoint")
RECORD_COLUMNS = ("eval_dir", "run_dir", "status", "seed", *SETTINGS, "metric", "value", "direction", "ended_at")
COLUMNS = ("n", "seeds", "mean", "std", "ci95_low", "ci95_high", "min", "max", "direction", "examples")


def zero_shot_records(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per zero-shot evaluation record and metric, of the records found with ``runs`` (its
    ``attrs["eval_dirs"]``, every status): :data:`RECORD_COLUMNS` plus ``examples``; ``metric`` is the test
    column (``test.lambada_acc``) and ``direction`` (max/min) the record's own."""
    rows = []
    for eval_dir in runs.attrs.get("eval_dirs", []):
        s = read_summary(eval_dir) or {}
        run, task = s.get("run") or {}, s.get("task") or {}
        zero_shot = run.get("zero_shot")
        if not zero_shot:
            continue
        test = s.get("test") or {}
        head = {
            "eval_dir": str(eval_dir),
            "run_dir": str(eval_dir.parent.parent),
            "status": s.get("status") or "unreadable",
            "seed": run.get("seed"),
            "task": zero_shot.get("task"),
            "file_sha256": zero_shot.get("sha256"),
            "checkpoint": run.get("checkpoint"),
            "ended_at": run.get("ended_at") or "",
            "examples": test.get("examples"),
        }
        for metric, direction in (task.get("directions") or {}).items():
            rows.append({**head, "metric": f"test.{metric}", "value": test.get(metric), "direction": direction})
    return pd.DataFrame(rows, columns=[*RECORD_COLUMNS, "examples"])


def zero_shot_table(records: pd.DataFrame, runs: pd.DataFrame, group_by: list[str]) -> pd.DataFrame:
    """Per cell, task and metric: mean ± std over the cell's seeds, the 95% t-interval, the direction.

    Only completed records of finished runs among ``runs`` count, the latest per (run, task file, checkpoint).
    """
    done = records[records["status"] == "completed"]
    if done.empty:
        return pd.DataFrame(columns=[*group_by, "group", *SETTINGS, "metric", *COLUMNS])
    keys = [k for k in group_by if k not in done.columns]
    cells = runs.loc[runs["status"].isin(FINISHED), ["run_dir", *keys]]
    cells = cells.assign(_key=[os.path.realpath(d) for d in cells["run_dir"]]).drop(columns="run_dir")
    done = done.assign(_key=[os.path.realpath(d) for d in done["run_dir"]]).merge(cells, on="_key", how="inner")
    done = done.sort_values(["ended_at", "eval_dir"]).drop_duplicates(["_key", *SETTINGS, "metric"], keep="last")
    rows = []
    for values, cell in iter_groups(done, [*group_by, *SETTINGS, "metric"]):
        stats = describe(cell["value"].to_numpy(dtype=float))
        rows.append(
            {
                **values,
                "group": group_label(values, group_by),
                **{k: stats[k] for k in ("n", "mean", "std", "ci95_low", "ci95_high", "min", "max")},
                "seeds": " ".join(format_value(s) for s in sorted(cell["seed"].dropna())),
                "direction": "/".join(sorted(set(cell["direction"]))),  # two would be a contract break: shown
                "examples": "/".join(format_value(e) for e in sorted(set(cell["examples"].dropna()))),
            }
        )
    return pd.DataFrame(rows)[[*group_by, "group", *SETTINGS, "metric", *COLUMNS]]


def zero_shot_md(table: pd.DataFrame, group_by: list[str]) -> str:
    """The report section: one row per cell, task and metric, with which way it is better."""
    if table.empty:
        return ""
    rows = []
    for _, r in table.iterrows():
        row = {"group": r["group"]} if group_by else {}
        spread = "" if pd.isna(r["std"]) else f" ± {fmt(r['std'])}"
        row.update(
            {
                "task": r["task"],
                "metric": r["metric"],
                "mean ± std": fmt(r["mean"]) + spread,
                "n": r["n"],
                "examples": r["examples"],
                "better": WORDS.get(r["direction"], r["direction"]),
            }
        )
        if r["checkpoint"] not in (None, "best.pt"):
            row["task"] = f"{r['task']} ({r['checkpoint']})"
        rows.append(row)
    return (
        "## Zero-shot tasks\n\nThe runs' checkpoints scored on zero-shot tasks (evaluate zero_shot.task=...), "
        "grouped by the runs' cells; mean ± std over seeds. Accuracies are percentages (acc_norm: the choice of "
        "highest log-likelihood per character); lambada's ppl is the perplexity of the passage's last word. "
        "Which way is better is each record's own (its task section).\n\n" + markdown_table(pd.DataFrame(rows))
    )
