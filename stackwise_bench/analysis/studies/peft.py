"""The PEFT study: the headline metric against trainable parameters across LoRA ranks and adapter methods.

Two shapes, by what the cells vary:

- a rank sweep (``lora.rank`` varies, ``lora.method`` does not): a row per rank cell, rank 0 being full
  fine-tuning, from the seed statistics (:func:`~stackwise_bench.analysis.stats.seeds.seed_stats`);
- a method sweep (``lora.method`` varies, with or without ranks): a row per method × rank with a ``method``
  column, the adapter's own parameters, its training throughput against plain LoRA at the same rank and,
  for QA-LoRA / QLoRA, the accuracy of the model after merging the adapter into the quantized weights.

In a method sweep, rank 0 is full fine-tuning whatever the method (``method`` = ``full``), and IA³ and OFT
have no rank (any rank > 0 means "on"): such runs of several swept cells are one model, so they are pooled
into one row, one run per seed (the runs of the first swept cell that has the seed).

The efficient frontier is the Pareto front of (trainable parameters, accuracy) within each cell of the other
grouping keys, across methods and ranks: a row is on it when no row is at least as good with at most its
trainable parameters, and strictly better in one of the two ("good" in the metric's direction, from the runs'
task records: a lower error is better).

How a row compares with full fine-tuning depends on that direction too. An accuracy is kept as a share
(``acc_retained_pct``, ``efficiency_vs_full``, ``acc_per_m_trainable``); a lower-is-better metric (a language
model's loss) has no share to keep: ``gap_vs_full`` is its distance to full fine-tuning's mean (> 0 is worse), and
for a language model's loss in nats per token (``task.unit`` token) ``ppl`` = exp(mean loss) (the geometric mean of
the seeds' perplexities) and ``ppl_vs_full`` = exp(gap), the perplexity's ratio to full fine-tuning's. The
adapter's throughput against plain LoRA is per task unit: ``img_s_vs_lora``, ``token_s_vs_lora``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stackwise_bench.analysis.read.directions import lower_is_better, metric_name, range_of, task_units
from stackwise_bench.analysis.read.grouping import format_value, group_label, iter_groups
from stackwise_bench.analysis.read.numeric import is_missing, mean_of
from stackwise_bench.analysis.stats.seeds import describe
from stackwise_bench.analysis.studies.adapters import (
    FINAL_RANKS,
    FULL,
    LORA,
    MERGED,
    METHOD,
    OPTIONAL,
    RANK,
    RANKLESS,
    adapter_counts,
    as_count,
    count_text,
    frontier,
    method_order,
)
from stackwise_bench.analysis.studies.view import StudyView, ci_columns, ratio_to_reference
from stackwise_bench.runs.contract import FINISHED


def peft_study(summary: pd.DataFrame, runs: pd.DataFrame, metric: str, group_by: list[str]) -> StudyView | None:
    """Accuracy vs LoRA rank (and adapter method) and trainable parameters, against full fine-tuning."""
    if METHOD in group_by:
        return _method_study(runs, metric, group_by)
    if RANK not in group_by:
        return None
    table = summary[summary["metric"] == metric].drop(columns=["metric"]).reset_index(drop=True)
    done = runs[runs["status"].isin(FINISHED)].assign(_adapter=adapter_counts)
    for col, name in (("params.trainable", "trainable"), ("_adapter", "lora_params")):
        means = {
            label: mean_of(cell[col]) if col in cell else np.nan for label, cell in _cells_by_label(done, group_by)
        }
        table[name] = table["group"].map(means)
    lower = lower_is_better(runs, metric)
    versus = _versus_full(table, group_by, RANK, 0, lower, _is_lm_loss(runs, metric))
    table["on_frontier"] = frontier(table, [k for k in group_by if k != RANK], lower)
    for col in ("trainable", "lora_params"):
        table[col] = as_count(table[col])
    table = table[
        [
            *group_by,
            "n",
            "mean",
            "std",
            *ci_columns(table),
            "trainable",
            "lora_params",
            "trainable_pct",
            *versus,
            "on_frontier",
            "group",
        ]
    ]
    return StudyView("PEFT study (LoRA rank)", table, _frontier_highlights(table, metric, lower))


def _method_study(runs: pd.DataFrame, metric: str, group_by: list[str]) -> StudyView | None:
    others = [k for k in group_by if k not in (METHOD, RANK)]
    done = _canonical(runs[runs["status"].isin(FINISHED)], others)
    bounds = range_of(runs, metric)
    unit = next((u for u in task_units(runs) if f"train.{u}_s" in runs), "img")  # what the training speed counts
    speed = f"train.{unit}_s"
    rows = []
    for values, cell in iter_groups(done, ["method", RANK, *others]):
        s = describe(pd.to_numeric(cell[metric], errors="coerce") if metric in cell else [], bounds)
        row = {**values, **{k: s[k] for k in ("n", "mean", "std", "ci95_low", "ci95_high", "ci95_clipped")}}
        row["group"] = _row_label(values, others)
        row["trainable"] = mean_of(cell["params.trainable"]) if "params.trainable" in cell else np.nan
        row["adapter_params"] = mean_of(adapter_counts(cell))
        for src, dst in (
            (speed, "_speed"),
            ("adapter.merged.top1", "merged_top1"),
            ("adapter.merged.bits", "_bits"),
            ("adapter.rank_budget", "rank_budget"),
            ("adapter.init_r", "_init_r"),
        ):
            row[dst] = mean_of(cell[src]) if src in cell else np.nan
        layers = [c for c in cell.columns if c.startswith(FINAL_RANKS)]
        row["_layers"] = (
            mean_of(cell[layers].notna().sum(axis=1)[cell[layers].notna().any(axis=1)]) if layers else np.nan
        )
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return None
    order = {m: i for i, m in enumerate(method_order(table["method"]))}
    table[RANK] = pd.to_numeric(table[RANK], errors="coerce")
    table = table.sort_values(["method", RANK], key=lambda c: c.map(order) if c.name == "method" else c, kind="stable")
    table = table.reset_index(drop=True)
    table[RANK] = as_count(table[RANK])
    lower = lower_is_better(runs, metric)
    versus = _versus_full(table, ["method", *others], "method", FULL, lower, _is_lm_loss(runs, metric))
    speed_vs = f"{unit}_s_vs_lora"
    table[speed_vs] = ratio_to_reference(table, ["method", RANK, *others], "method", LORA, "_speed")
    table["merged_drop"] = table["mean"] - table["merged_top1"]
    table["on_frontier"] = frontier(table, others, lower)
    highlights = _frontier_highlights(table, metric, lower) + _method_highlights(table, metric, others, lower)
    for col in ("trainable", "adapter_params"):
        table[col] = as_count(table[col])
    columns = [
        "method",
        RANK,
        *others,
        "n",
        "mean",
        "std",
        *ci_columns(table),
        "trainable",
        "adapter_params",
        "trainable_pct",
        *versus,
        speed_vs,
        "merged_top1",
        "merged_drop",
        "rank_budget",
        "on_frontier",
        "group",
    ]
    table = table[[c for c in columns if c not in OPTIONAL or table[c].notna().any()]]
    return StudyView("PEFT study (method × rank)", table, highlights)


def _is_lm_loss(runs: pd.DataFrame, metric: str) -> bool:
    """Whether ``metric`` is a language model's loss in nats per token (its perplexity is exp of it)."""
    return metric_name(metric) == "loss" and "token" in task_units(runs)


def _versus_full(table: pd.DataFrame, keys: list[str], key: str, ref, lower: bool, lm_loss: bool) -> list[str]:
    """Add the columns comparing each row with full fine-tuning (``key=ref``) and return their names: shares of
    accuracy kept where higher is better, the gap (and for a language model's loss, perplexities) where lower is."""
    table["trainable_pct"] = 100 * ratio_to_reference(table, keys, key, ref, "trainable")
    if not lower:
        full_acc = ratio_to_reference(table, keys, key, ref, "mean")
        table["acc_retained_pct"] = 100 * full_acc
        # Accuracy kept per share of parameters trained: 1 = as good a trade as full fine-tuning.
        table["efficiency_vs_full"] = full_acc / (table["trainable_pct"] / 100)
        table["acc_per_m_trainable"] = table["mean"] / (table["trainable"] / 1e6)
        return ["acc_retained_pct", "efficiency_vs_full", "acc_per_m_trainable"]
    full_mean = table["mean"] / ratio_to_reference(table, keys, key, ref, "mean")
    table["gap_vs_full"] = table["mean"] - full_mean
    if not lm_loss:
        return ["gap_vs_full"]
    table["ppl"] = np.exp(table["mean"])
    table["ppl_vs_full"] = np.exp(table["gap_vs_full"])
    return ["ppl", "gap_vs_full", "ppl_vs_full"]


def _canonical(done: pd.DataFrame, others: list[str]) -> pd.DataFrame:
    """``done`` with a ``method`` column and the rank each row stands for (pooled cells: one run per seed)."""
    out = done.copy()
    if out.empty:
        return out.assign(method=pd.Series(dtype=object), _swept=pd.Series(dtype=object))
    rank = pd.to_numeric(out[RANK], errors="coerce").astype(float) if RANK in out else pd.Series(np.nan, out.index)
    raw = out[METHOD] if METHOD in out else pd.Series(None, index=out.index, dtype=object)
    method = pd.Series([LORA if is_missing(m) else str(m).lower() for m in raw], index=out.index, dtype=object)
    swept = method + "|" + rank.map(format_value)  # the cell as swept, before pooling
    method[rank == 0] = FULL
    rank = rank.where(~(method.isin(RANKLESS) & (rank > 0)))
    out["method"], out[RANK], out["_swept"] = method, rank, swept
    seed = out["seed"].map(format_value) if "seed" in out else pd.Series("", index=out.index)
    keys = ["method", RANK, *others]
    cell = out[keys].apply(lambda r: "|".join(map(format_value, r)), axis=1) + "|" + seed
    ordered = out.assign(_cell=cell).sort_values(["_swept", "run_dir"], kind="stable")
    first = ordered.groupby("_cell", sort=False)["_swept"].first()
    return out[out["_swept"].to_numpy() == cell.map(first).to_numpy()]


def _row_label(values: dict, others: list[str]) -> str:
    """``lora.method=dora, lora.rank=8`` (other keys after); full fine-tuning and rankless methods say so."""
    method, rank = values["method"], values[RANK]
    if method == FULL:
        head = "full fine-tuning (lora.rank=0)"
    elif rank is None:
        head = f"{METHOD}={method}"
    else:
        head = f"{METHOD}={method}, {RANK}={format_value(rank)}"
    return head + (", " + group_label(values, others) if others else "")


def _short(row: pd.Series) -> str:
    """``dora r=8``, ``ia3``, ``full``: a row's method and rank for a sentence."""
    if row["method"] == FULL or pd.isna(row[RANK]):
        return str(row["method"])
    return f"{row['method']} r={format_value(row[RANK])}"


def _frontier_highlights(table: pd.DataFrame, metric: str, lower: bool = False) -> list[str]:
    digits = 4 if lower else 2  # losses differ in the third decimal; accuracies in percent in the first
    return [
        f"on the efficient frontier: {row['group']} — {row['mean']:.{digits}f} "
        f"({metric}) with {count_text(row['trainable'])} trainable parameters"
        for _, row in table[table["on_frontier"]].iterrows()
    ]


def _method_highlights(table: pd.DataFrame, metric: str, others: list[str], lower: bool = False) -> list[str]:
    """The best method at each rank, then per QA-LoRA/QLoRA row its accuracy after merging, per AdaLoRA row
    its final rank budget."""
    out = []
    digits = 4 if lower else 2  # losses differ in the third decimal; accuracies in percent in the first
    for values, cell in iter_groups(table, others):
        where = f" ({group_label(values, others)})" if others else ""
        ranked = cell[cell[RANK].notna() & (cell["method"] != FULL) & cell["mean"].notna()]
        for rank, at in ranked.groupby(RANK, sort=True):
            if at["method"].nunique() < 2:
                continue
            best = at["mean"].min() if lower else at["mean"].max()
            tied = at.loc[np.isclose(at["mean"], best), "method"].tolist()
            rest = ", ".join(f"{m} {v:.{digits}f}" for m, v in zip(at["method"], at["mean"]) if m not in tied)
            who = tied[0] if len(tied) == 1 else "tie between " + " and ".join(tied)
            out.append(
                f"{'lowest' if lower else 'highest'} mean at r={format_value(rank)}{where}: {who} "
                f"({best:.{digits}f} {metric}" + (f"; {rest})" if rest else ")")
            )
    for _, row in table.iterrows():
        where = f" ({group_label(row, others)})" if others else ""
        if row["method"] in MERGED and pd.notna(row["merged_top1"]):
            bits = f"{row['_bits']:.0f}" if pd.notna(row["_bits"]) else "low"
            # QA-LoRA's merge lands on the grid itself; QLoRA's lands in high precision and is quantized again.
            how = f"onto the {bits}-bit grid" if row["method"] == "qalora" else f"and requantizing to {bits} bits"
            out.append(
                f"{_short(row)}{where}: {row['mean']:.2f} before merging, {row['merged_top1']:.2f} after merging {how}"
            )
        if row["method"] == "adalora" and pd.notna(row["rank_budget"]):
            start = ""
            if pd.notna(row["_layers"]) and pd.notna(row[RANK]):
                init_r = row["_init_r"] if pd.notna(row["_init_r"]) else np.ceil(1.5 * row[RANK])
                start = (
                    f" from {row['_layers'] * init_r:.0f} at the start ({row['_layers']:.0f} layers × init_r="
                    f"{init_r:.0f}; target {row['_layers']:.0f} × r={row[RANK]})"
                )
            out.append(f"{_short(row)}{where}: final rank budget {row['rank_budget']:.0f}{start} (mean over seeds)")
    return out


def _cells_by_label(runs: pd.DataFrame, group_by: list[str]):
    for values, cell in iter_groups(runs, group_by):
        yield group_label(values, group_by), cell
