"""The report's headline table: one row per cell of the headline metric, against the baseline."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stackwise_bench.analysis.read.directions import MIN, WORDS
from stackwise_bench.analysis.read.formatting import column_digits, fmt, fmt_p, mean_std, spread_digits
from stackwise_bench.analysis.read.grouping import format_value, same_value
from stackwise_bench.analysis.read.numeric import is_missing
from stackwise_bench.analysis.stats.verdicts import verdict
from stackwise_bench.analysis.studies.energy import energy_columns


def headline_table(
    summary: pd.DataFrame,
    comparisons: pd.DataFrame,
    metric: str,
    group_by: list[str],
    baseline: dict,
    runs: pd.DataFrame | None = None,
    iqm: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One display row per cell for ``metric``: n, mean ± std, 95% CI, Δ vs baseline, p, d, flags.

    Given ``iqm`` (:func:`~stackwise_bench.analysis.stats.robust.iqm_table`), an "IQM [95% CI]" column follows the
    t-interval.

    Given ``runs``, the cells' energy per run and per image and their thermal throttling are added before
    the flags, where some run has those readings (:func:`~stackwise_bench.analysis.studies.energy.energy_columns`).
    """
    s = summary[summary["metric"] == metric] if len(summary) else summary
    comp = (
        comparisons[comparisons["metric"] == metric].set_index("group")
        if len(comparisons) and "group" in comparisons
        else pd.DataFrame()
    )
    digits = column_digits(s["mean"]) if len(s) else 2
    if digits:  # not a count nor a large number: enough decimals to show the seeds' spread
        digits = spread_digits(s["std"], digits)
    energy = energy_columns(runs, group_by) if runs is not None else {}
    energy_names = list(dict.fromkeys(name for cells in energy.values() for name in cells))
    rows = []
    for _, r in s.iterrows():
        row = {k: format_value(r[k]) for k in group_by}
        row["n"] = str(int(r["n"]))
        row["mean ± std"] = mean_std(r["mean"], r["std"], digits) if r["n"] > 1 else fmt(r["mean"], digits)
        row["95% CI"] = ci_text(r, digits) if r["n"] > 1 else "–"
        if iqm is not None and len(iqm):
            row["IQM [95% CI]"] = _iqm_cell(iqm, r["group"], digits)
        if baseline:
            row.update(_delta_cells(r, comp, group_by, baseline, digits))
        row.update({name: energy.get(r["group"], {}).get(name, "n/a") for name in energy_names})
        flags = []
        if r["incomplete"]:
            flags.append("incomplete" + (f" (missing seeds {r['missing_seeds']})" if r["missing_seeds"] else ""))
        if r["n_unfinished"]:
            diverged = int(r.get("n_diverged") or 0)
            flags.append(f"{int(r['n_unfinished'])} unfinished" + (f" ({diverged} diverged)" if diverged else ""))
        if r.get("mixed_params"):
            flags.append(f"mixed architectures (tested params {r['mixed_params']})")
        row["flags"] = "; ".join(flags)
        rows.append(row)
    return pd.DataFrame(rows)


CLIPPED = "*"  # marks an interval end cut at its metric's range (seeds.range_interval)
CLIPPED_NOTE = (
    f"`{CLIPPED}`: an interval end cut at the metric's range (a t-interval reaching past 100% or below 0): the "
    "true mean lies in the range, so the cut interval keeps its 95% coverage."
)


def ci_text(r, digits: int) -> str:
    """``[96.25, 100.00*]``: a summary row's 95% interval, an end cut at the metric's range marked."""
    cut = str(r.get("ci95_clipped") or "")
    low = fmt(r["ci95_low"], digits) + (CLIPPED if cut in ("low", "both") else "")
    high = fmt(r["ci95_high"], digits) + (CLIPPED if cut in ("high", "both") else "")
    return f"[{low}, {high}]"


def _iqm_cell(iqm: pd.DataFrame, group: str, digits: int) -> str:
    match = iqm[iqm["group"] == group]
    if match.empty or is_missing(match["iqm"].iloc[0]):
        return "–"
    r = match.iloc[0]
    if is_missing(r["iqm_ci95_low"]):
        return fmt(r["iqm"], digits)
    return f"{fmt(r['iqm'], digits)} [{fmt(r['iqm_ci95_low'], digits)}, {fmt(r['iqm_ci95_high'], digits)}]"


def _delta_cells(r: pd.Series, comp: pd.DataFrame, group_by: list[str], baseline: dict, digits: int) -> dict:
    if all(same_value(r.get(k), v) for k, v in baseline.items()):
        return {"Δ vs baseline": "baseline", "test": "", "p (Holm)": "", "d": ""}
    if r["group"] not in comp.index:
        return {"Δ vs baseline": "–", "test": "", "p (Holm)": "", "d": ""}
    c = comp.loc[[r["group"]]].iloc[0]
    delta = fmt(c.get("diff"), digits, signed=True)
    if not is_missing(c.get("diff_ci95_low")):
        low, high = fmt(c["diff_ci95_low"], digits, signed=True), fmt(c["diff_ci95_high"], digits, signed=True)
        delta += f" [{low}, {high}]"
    p = "–" if is_missing(c.get("p_value")) else f"{fmt_p(c['p_value'])} ({fmt_p(c['p_holm'])})"
    return {"Δ vs baseline": delta, "test": str(c.get("test", "")), "p (Holm)": p, "d": fmt(c.get("cohens_d"))}


def best_cell_sentence(
    summary: pd.DataFrame, metric: str, direction: str | None, comparisons: pd.DataFrame | None = None
) -> str:
    """``Highest mean test.top1: lora.rank=8 (91.20; higher is better).``; empty with fewer than two cells.

    A highest mean is not a finding: where the cell was tested against the baseline the sentence adds that
    verdict (:mod:`~stackwise_bench.analysis.stats.verdicts`); where it is the baseline, it says so.
    ``direction`` (``max`` / ``min``, from the runs' task records) says which end is best; None reads as max.
    """
    s = summary[(summary["metric"] == metric) & summary["mean"].notna()] if len(summary) else summary
    if len(s) < 2:
        return ""
    best = s["mean"].min() if direction == MIN else s["mean"].max()
    tied = list(s.loc[np.isclose(s["mean"], best), "group"])
    if len(tied) == len(s):
        return f"Every cell has the same mean {metric} ({fmt(best, column_digits(s['mean']))}).\n"
    who = tied[0] if len(tied) == 1 else "a tie between " + " and ".join(tied)
    word = WORDS.get(direction, "read as higher is better")
    end = "Lowest" if direction == MIN else "Highest"
    text = f"{end} mean {metric}: {who} ({fmt(best, column_digits(s['mean']))}; {word})"
    rows = (
        comparisons[(comparisons["group"] == tied[0]) & (comparisons["metric"] == metric)]
        if (len(tied) == 1 and comparisons is not None and len(comparisons) and "group" in comparisons)
        else pd.DataFrame()
    )
    if len(rows) == 1:
        text += f": {verdict(rows.iloc[0], direction)}"
    elif comparisons is not None and "baseline" in comparisons and tied[0] in set(comparisons["baseline"]):
        text += ", the baseline"
    return text + ".\n"
