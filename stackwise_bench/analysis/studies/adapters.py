"""The adapters of a PEFT study: methods and their order, per-run adapter sizes, and the efficient frontier.

Shared by the PEFT view (:mod:`.peft`) and its Pareto figure (``plots/peft.py``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stackwise_bench.analysis.read.grouping import iter_groups

METHOD, RANK = "lora.method", "lora.rank"
FULL, LORA = "full", "lora"  # rank 0 (full fine-tuning); the method of runs recorded without lora.method
# Methods in the order rows and legends show them; any other sorts after these.
METHODS = (FULL, LORA, "dora", "rslora", "pissa", "adalora", "loha", "lokr", "ia3", "vera", "oft", "qalora", "qlora")
RANKLESS = ("ia3", "oft")  # one adapter whatever lora.rank says: its runs at every rank > 0 are one model
MERGED = ("qalora", "qlora")  # adapter.merged: the test accuracy after merging into the quantized weights
# Columns of the method-sweep table that exist only where some run recorded them.
OPTIONAL = ("merged_top1", "merged_drop", "rank_budget")
FINAL_RANKS = "adapter.final_ranks."  # AdaLoRA: one column per adapted layer (its rank after pruning)


def adapter_counts(runs: pd.DataFrame) -> pd.Series:
    """Per run, the adapter's trainable parameters: ``params.adapter``, else (older records) ``params.lora``."""
    out = pd.Series(np.nan, index=runs.index, dtype=float)
    for col in ("params.lora", "params.adapter"):  # the later one wins where a run has both
        if col in runs:
            values = pd.to_numeric(runs[col], errors="coerce")
            out = values.where(values.notna(), out)
    return out


def other_keys(table: pd.DataFrame) -> list[str]:
    """The grouping keys of a PEFT table besides method and rank: the columns before ``n``."""
    keys = list(table.columns[: list(table.columns).index("n")])
    return [k for k in keys if k not in ("method", METHOD, RANK)]


def methods_of(table: pd.DataFrame) -> pd.Series:
    """Each row's method: the ``method`` column, or (a rank sweep) ``full`` at rank 0 and ``lora`` elsewhere."""
    if "method" in table:
        return table["method"].astype(str)
    rank = pd.to_numeric(table[RANK], errors="coerce")
    return pd.Series(np.where(rank == 0, FULL, LORA), index=table.index)


def method_order(methods) -> list[str]:
    """The methods present, in :data:`METHODS` order, unknown ones after them alphabetically."""
    present = set(map(str, methods))
    return [m for m in METHODS if m in present] + sorted(present - set(METHODS))


def frontier(table: pd.DataFrame, others: list[str], lower: bool = False) -> pd.Series:
    """Pareto-optimal rows within each cell of ``others``: none is as good with ≤ parameters and better in one.

    ``lower``: the metric is lower-is-better (an error, a loss), so "as good" is ≤ rather than ≥.
    """
    flags = pd.Series(False, index=table.index)
    sign = -1.0 if lower else 1.0
    for _, cell in iter_groups(table, others):
        ok = cell.dropna(subset=["mean", "trainable"])
        score = sign * ok["mean"]
        for i, row in ok.iterrows():
            better = ok[
                (ok["trainable"] <= row["trainable"])
                & (score >= score[i])
                & ((ok["trainable"] < row["trainable"]) | (score > score[i]))
            ]
            flags[i] = better.empty
    return flags


def as_count(col: pd.Series) -> pd.Series:
    """Mean parameter counts are whole numbers: show them as such."""
    whole = col.dropna()
    return col.round().astype("Int64") if len(whole) and (whole == whole.round()).all() else col


def count_text(n: float) -> str:
    if pd.isna(n):
        return "?"
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else f"{n:.0f}"
