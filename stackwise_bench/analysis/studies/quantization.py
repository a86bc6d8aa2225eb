"""Post-training quantization: evaluation records joined to their runs, summarised per cell and format.

``python -m stackwise_bench.evaluate checkpoint=<run> quantize=fp8_e4m3`` (or ``fp8_e5m2``, ``int8``,
``int4``; and ``experiment=FP8Test``, once per run of a study) writes ``<run>/eval/<name>/summary.json``
holding the test metrics of the run's checkpoint before (``baseline``) and after
(``test``) quantization, the ``degradation`` and the weight bytes (``quantize``).
Each record is one paired observation: the same model, seed and test images before
and after. Records are grouped by the cell of the run they evaluated (the study's
grouping keys) and by the quantization settings; the latest record counts when one
checkpoint was evaluated twice with the same settings. FP8 and integer formats share one table: nothing
here depends on the format beyond its name (and int4's group size, a setting of its own).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from stackwise_bench.analysis.read.grouping import format_value, group_label, iter_groups
from stackwise_bench.analysis.read.numeric import max_of, mean_of
from stackwise_bench.analysis.stats.compare import ALPHA, paired_test
from stackwise_bench.analysis.stats.seeds import describe, holm
from stackwise_bench.runs.contract import FINISHED, read_summary
from stackwise_bench.runs.folders import PathsLike, find_eval_dirs

MB = 2**20  # bytes per MB, as evaluate's log prints it
# What makes two records of the same run different treatments (not repeats). group_size: int4's (else empty).
SETTINGS = ("quantize", "group_size", "activations", "keep_head", "checkpoint")
COLUMNS = (
    "n",
    "seeds",
    "top1_before_mean",
    "top1_before_std",
    "top1_after_mean",
    "top1_after_std",
    "degradation_mean",
    "degradation_std",
    "degradation_ci95_low",
    "degradation_ci95_high",
    "test",
    "statistic",
    "p_value",
    "p_holm",
    "significant",
    "weight_mb_before",
    "weight_mb_after",
    "compression",
    "worst_class_points",
    "baseline_matches",
    "n_recorded",
    "note",
)


def collect_evaluations(paths: PathsLike | pd.DataFrame) -> pd.DataFrame:
    """One row per evaluation record at or below ``paths`` (every status and setting).

    ``paths`` may be the DataFrame from :func:`~stackwise_bench.analysis.read.collect.collect_runs`, whose
    folder walk already found the records (``attrs["eval_dirs"]``).

    Columns: ``eval_dir``, ``run_dir`` (the evaluated run: the record's ``<run>``), ``status``, ``seed``,
    the :data:`SETTINGS`, ``top1_before`` / ``top1_after`` (equal without quantization),
    ``degradation_points``, ``weight_mb_before`` / ``weight_mb_after``, ``compression``,
    ``worst_class_points``, ``recorded_test_top1``, ``matches_recorded`` and ``ended_at``.
    """
    eval_dirs = paths.attrs.get("eval_dirs", []) if isinstance(paths, pd.DataFrame) else find_eval_dirs(paths)
    rows = [_eval_row(d) for d in eval_dirs]
    columns = [
        "eval_dir",
        "run_dir",
        "status",
        "seed",
        *SETTINGS,
        "top1_before",
        "top1_after",
        "degradation_points",
        "weight_mb_before",
        "weight_mb_after",
        "compression",
        "worst_class_points",
        "recorded_test_top1",
        "matches_recorded",
        "ended_at",
    ]
    table = pd.DataFrame(rows, columns=columns)
    table["group_size"] = table["group_size"].astype("Int64")  # 32, not 32.0, beside the other formats' <NA>
    return table


def _eval_row(eval_dir: Path) -> dict:
    s = read_summary(eval_dir) or {}
    run, source, q = s.get("run") or {}, s.get("source") or {}, s.get("quantize") or {}
    test = s.get("test") or {}
    baseline = s.get("baseline") or test  # an unquantized evaluation has one pass: test
    degradation = s.get("degradation") or {}
    bytes_before, bytes_after = q.get("weight_bytes_before"), q.get("weight_bytes_after")
    return {
        "eval_dir": str(eval_dir),
        "run_dir": str(eval_dir.parent.parent),
        "status": s.get("status") or "unreadable",
        "seed": run.get("seed"),
        "quantize": run.get("quantize"),
        "group_size": run.get("group_size") if run.get("quantize") == "int4" else None,
        "activations": bool(run.get("activations")),
        "keep_head": run.get("keep_head", True),
        "checkpoint": run.get("checkpoint"),
        "top1_before": baseline.get("top1"),
        "top1_after": test.get("top1"),
        "degradation_points": degradation.get("top1_points"),
        "weight_mb_before": bytes_before / MB if bytes_before else None,
        "weight_mb_after": bytes_after / MB if bytes_after else None,
        "compression": bytes_before / bytes_after if bytes_before and bytes_after else None,
        "worst_class_points": degradation.get("worst_class_points"),
        "recorded_test_top1": source.get("recorded_test_top1"),
        "matches_recorded": baseline.get("matches_recorded"),
        "ended_at": run.get("ended_at") or "",
    }


def quantized_evaluations(evaluations: pd.DataFrame, runs: pd.DataFrame, group_by: list[str]) -> pd.DataFrame:
    """The completed quantized records of the analysed runs, one per (run, settings), with the runs' cell keys.

    A record whose run is not among ``runs`` (or did not finish) is left out; when one checkpoint was
    evaluated twice with the same settings, the latest record is kept.
    """
    done = evaluations[(evaluations["status"] == "completed") & evaluations["quantize"].notna()]
    keys = [k for k in group_by if k not in done.columns]  # e.g. seed: the record carries it already
    cells = runs.loc[runs["status"].isin(FINISHED), ["run_dir", *keys]]
    cells = cells.assign(_key=[os.path.realpath(d) for d in cells["run_dir"]]).drop(columns="run_dir")
    done = done.assign(_key=[os.path.realpath(d) for d in done["run_dir"]])
    joined = done.merge(cells, on="_key", how="inner")
    joined = joined.sort_values(["ended_at", "eval_dir"]).drop_duplicates(["_key", *SETTINGS], keep="last")
    return joined.drop(columns="_key").sort_values("eval_dir").reset_index(drop=True)


def quantization_table(quantized: pd.DataFrame, runs: pd.DataFrame, group_by: list[str]) -> pd.DataFrame:
    """Per cell and settings: accuracy before/after over seeds, the degradation with a paired t-test, weight MB.

    ``quantized`` comes from :func:`quantized_evaluations`. The degradation is top-1 before − after
    (positive = accuracy lost), tested with a paired t-test over the cell's records (n ≥ 2) and
    Holm-adjusted across the rows. ``baseline_matches`` counts the records whose re-evaluation of the
    unquantized checkpoint reproduced the run's recorded test top-1 exactly, of ``n_recorded``
    comparable ones (a checkpoint other than best.pt has no recorded value).
    """
    if quantized.empty:
        return pd.DataFrame(columns=[*group_by, "group", *SETTINGS, *COLUMNS])
    finished_runs = runs[runs["status"].isin(FINISHED)]
    rows = []
    for values, cell in iter_groups(quantized, [*group_by, *SETTINGS]):
        keys = {k: values[k] for k in group_by}
        in_cell = finished_runs
        for k, v in keys.items():
            in_cell = in_cell[in_cell[k].map(format_value) == format_value(v)]
        rows.append({**values, "group": group_label(keys, group_by), **_cell_stats(cell, len(in_cell))})
    table = pd.DataFrame(rows)
    table["p_holm"] = holm(table["p_value"])
    table["significant"] = table["p_holm"] < ALPHA
    return table[[*group_by, "group", *SETTINGS, *COLUMNS]]


def _cell_stats(cell: pd.DataFrame, n_runs: int) -> dict:
    before = cell["top1_before"].to_numpy(dtype=float)
    after = cell["top1_after"].to_numpy(dtype=float)
    drop = describe(before - after)
    out = {
        "n": len(cell),
        "seeds": " ".join(format_value(s) for s in sorted(cell["seed"].dropna())),
        "top1_before_mean": describe(before)["mean"],
        "top1_before_std": describe(before)["std"],
        "top1_after_mean": describe(after)["mean"],
        "top1_after_std": describe(after)["std"],
        "degradation_mean": drop["mean"],
        "degradation_std": drop["std"],
        "degradation_ci95_low": np.nan,
        "degradation_ci95_high": np.nan,
        "test": "none",
        "statistic": np.nan,
        "p_value": np.nan,
        "weight_mb_before": mean_of(cell["weight_mb_before"]),
        "weight_mb_after": mean_of(cell["weight_mb_after"]),
        "compression": mean_of(cell["compression"]),
        "worst_class_points": max_of(cell["worst_class_points"]),
    }
    notes = []
    if len(cell) >= 2:  # the same model before and after: a paired test, as compare.py pairs seeds
        paired = paired_test(before, after)
        out.update(
            degradation_ci95_low=paired["diff_ci95_low"],
            degradation_ci95_high=paired["diff_ci95_high"],
            test=paired["test"],
            statistic=paired["statistic"],
            p_value=paired["p_value"],
        )
        notes += [paired["note"]] if paired.get("note") else []
    else:
        notes.append("one seed: no test is possible")
    if len(cell) < n_runs:
        notes.append(f"{len(cell)} of the cell's {n_runs} finished runs evaluated")
    recorded = cell["matches_recorded"].dropna()
    out.update(baseline_matches=int(recorded.astype(bool).sum()), n_recorded=len(recorded), note="; ".join(notes))
    return out


def evaluation_warnings(evaluations: pd.DataFrame, quantized: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    """Evaluation records that are not in the post-training quantization table, and why."""
    e = evaluations
    if e.empty:
        return []
    out = []
    unfinished = e[e["status"] != "completed"]
    if len(unfinished):
        what = ", ".join(f"{n} {s}" for s, n in unfinished["status"].value_counts().items())
        out.append(
            f"{len(unfinished)} evaluation record(s) not completed ({what}), e.g. "
            f"{unfinished['eval_dir'].iloc[0]}: left out of the post-training quantization table."
        )
    done = e[(e["status"] == "completed") & e["quantize"].notna()]
    used = set(quantized["eval_dir"]) if len(quantized) else set()
    analysed = {os.path.realpath(d) for d in runs.loc[runs["status"].isin(FINISHED), "run_dir"]}
    orphans = done[[os.path.realpath(d) not in analysed for d in done["run_dir"]]]
    if len(orphans):
        out.append(
            f"{len(orphans)} quantized evaluation record(s) evaluated runs that are not among the finished "
            f"runs analysed (e.g. {orphans['eval_dir'].iloc[0]}): left out; add their run folders to runs=."
        )
    repeats = len(done) - len(orphans) - len(used)
    if repeats > 0:
        out.append(
            f"{repeats} quantized evaluation record(s) repeat an evaluation of the same checkpoint with the "
            "same settings: the latest of each is used."
        )
    return out
