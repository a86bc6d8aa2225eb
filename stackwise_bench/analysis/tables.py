"""Tables for people: the headline table, and its Markdown / booktabs LaTeX / screen forms.

Hand-written on purpose: pandas' ``to_markdown`` needs tabulate and ``to_latex``
needs jinja2, neither of which this package depends on; twenty lines do it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd

from stackwise_bench.analysis.energy import energy_columns
from stackwise_bench.analysis.grouping import format_value, same_value

# From this magnitude on, digits after the point are noise (parameter counts, images/s, MB of memory);
# below it a column keeps two decimals (accuracies in %, seconds, losses). Decided per column, never per value.
LARGE = 1_000
SMALL = 0.1  # a column entirely below this keeps two significant digits instead
MAX_DIGITS = 6


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

    Given ``iqm`` (:func:`~stackwise_bench.analysis.robust.iqm_table`), an "IQM [95% CI]" column follows the
    t-interval.

    Given ``runs``, the cells' energy per run and per image and their thermal throttling are added before
    the flags, where some run has those readings (:func:`~stackwise_bench.analysis.energy.energy_columns`).
    """
    s = summary[summary["metric"] == metric] if len(summary) else summary
    comp = (
        comparisons[comparisons["metric"] == metric].set_index("group")
        if len(comparisons) and "group" in comparisons
        else pd.DataFrame()
    )
    digits = column_digits(s["mean"]) if len(s) else 2
    energy = energy_columns(runs, group_by) if runs is not None else {}
    energy_names = list(dict.fromkeys(name for cells in energy.values() for name in cells))
    rows = []
    for _, r in s.iterrows():
        row = {k: format_value(r[k]) for k in group_by}
        row["n"] = str(int(r["n"]))
        row["mean ± std"] = mean_std(r["mean"], r["std"], digits) if r["n"] > 1 else fmt(r["mean"], digits)
        ci = f"[{fmt(r['ci95_low'], digits)}, {fmt(r['ci95_high'], digits)}]"
        row["95% CI"] = ci if r["n"] > 1 else "–"
        if iqm is not None and len(iqm):
            row["IQM [95% CI]"] = _iqm_cell(iqm, r["group"], digits)
        if baseline:
            row.update(_delta_cells(r, comp, group_by, baseline, digits))
        row.update({name: energy.get(r["group"], {}).get(name, "n/a") for name in energy_names})
        flags = []
        if r["incomplete"]:
            flags.append("incomplete" + (f" (missing seeds {r['missing_seeds']})" if r["missing_seeds"] else ""))
        if r["n_unfinished"]:
            flags.append(f"{int(r['n_unfinished'])} unfinished")
        row["flags"] = "; ".join(flags)
        rows.append(row)
    return pd.DataFrame(rows)


def _iqm_cell(iqm: pd.DataFrame, group: str, digits: int) -> str:
    match = iqm[iqm["group"] == group]
    if match.empty or _nan(match["iqm"].iloc[0]):
        return "–"
    r = match.iloc[0]
    if _nan(r["iqm_ci95_low"]):
        return fmt(r["iqm"], digits)
    return f"{fmt(r['iqm'], digits)} [{fmt(r['iqm_ci95_low'], digits)}, {fmt(r['iqm_ci95_high'], digits)}]"


def _delta_cells(r: pd.Series, comp: pd.DataFrame, group_by: list[str], baseline: dict, digits: int) -> dict:
    if all(same_value(r.get(k), v) for k, v in baseline.items()):
        return {"Δ vs baseline": "baseline", "test": "", "p (Holm)": "", "d": ""}
    if r["group"] not in comp.index:
        return {"Δ vs baseline": "–", "test": "", "p (Holm)": "", "d": ""}
    c = comp.loc[[r["group"]]].iloc[0]
    delta = fmt(c.get("diff"), digits, signed=True)
    if not _nan(c.get("diff_ci95_low")):
        low, high = fmt(c["diff_ci95_low"], digits, signed=True), fmt(c["diff_ci95_high"], digits, signed=True)
        delta += f" [{low}, {high}]"
    p = "–" if _nan(c.get("p_value")) else f"{fmt_p(c['p_value'])} ({fmt_p(c['p_holm'])})"
    return {"Δ vs baseline": delta, "test": str(c.get("test", "")), "p (Holm)": p, "d": fmt(c.get("cohens_d"))}


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table; every number of a column in one format (see :func:`column_digits`)."""
    if df.empty:
        return "_(none)_\n"
    head = [str(c) for c in df.columns]
    lines = [
        "| " + " | ".join(h.replace("|", "\\|") for h in head) + " |",
        "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in df.columns) + "|",
    ]
    lines += ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in _cells(df)]
    return "\n".join(lines) + "\n"


def booktabs_table(df: pd.DataFrame, caption: str, label: str = "tab:study") -> str:
    """A LaTeX ``table`` with booktabs rules; needs ``\\usepackage{booktabs}``."""
    align = "".join("r" if c in ("n",) else "l" for c in df.columns)
    header = " & ".join(latex_escape(str(c)) for c in df.columns) + r" \\"
    body = [" & ".join(latex_escape(v) for v in row) + r" \\" for row in _cells(df)]
    return "\n".join(
        [
            "% Generated by stackwise_bench.analyze; needs \\usepackage{booktabs}",
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{latex_escape(caption)}}}",
            rf"\label{{{label}}}",
            rf"\begin{{tabular}}{{{align}}}",
            r"\toprule",
            header,
            r"\midrule",
            *body,
            r"\bottomrule",
            r"\end{tabular}",
            r"\end{table}",
            "",
        ]
    )


def latex_escape(text: str) -> str:
    out = []
    for ch in text:
        out.append(
            {
                "\\": r"\textbackslash{}",
                "&": r"\&",
                "%": r"\%",
                "$": r"\$",
                "#": r"\#",
                "_": r"\_",
                "{": r"\{",
                "}": r"\}",
                "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}",
                "±": r"$\pm$",
                "Δ": r"$\Delta$",
                "–": "--",
                "−": "$-$",
                "≥": r"$\geq$",
            }.get(ch, ch)
        )
    return "".join(out)


def screen_table(df: pd.DataFrame) -> str:
    return df.to_string(index=False) if len(df) else "(no cells)"


def column_digits(values: Iterable, digits: int = 2, counts: bool = False) -> int:
    """Decimals shared by every number of one table column.

    Args:
        values: the column's numbers (NaN ignored).
        digits: decimals of an ordinary column (accuracies, seconds).
        counts: the column counts things (parameters): no decimals at any size.

    Returns:
        0 for counts and for a column whose largest magnitude reaches :data:`LARGE`; for a column whose
        every value is below :data:`SMALL` (J per image, learning rates) two significant digits of its
        largest, so it does not read 0.00; else ``digits``.
    """
    finite = [abs(float(v)) for v in values if not _nan(v)]
    if counts or (finite and max(finite) >= LARGE):
        return 0
    if finite and 0 < max(finite) < SMALL:
        return min(MAX_DIGITS, max(digits, 1 - math.floor(math.log10(max(finite)))))
    return digits


def metric_digits(summary: pd.DataFrame, runs: pd.DataFrame | None = None) -> dict[str, int]:
    """Decimals per metric of a seed summary, for tables with a column per metric.

    Args:
        summary: rows of ``metric``, ``mean``, ... (:func:`~stackwise_bench.analysis.stats.seed_stats`).
        runs: the run table; a metric whose column there holds integers (parameter counts) is a count.
    """
    digits = {}
    for metric, part in summary.groupby("metric", sort=False):
        counts = runs is not None and metric in runs and pd.api.types.is_integer_dtype(runs[metric])
        digits[metric] = column_digits(part["mean"], counts=counts)
    return digits


def fmt(v, digits: int = 2, signed: bool = False) -> str:
    """One number with ``digits`` decimals and thousands separators (``174,868``, ``91.50``); ``–`` for NaN."""
    if _nan(v):
        return "–"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:{'+' if signed else ''},.{digits}f}"
    return str(v)


def mean_std(mean, std, digits: int = 2) -> str:
    """``mean ± std`` with both numbers in the same format."""
    return f"{fmt(mean, digits)} ± {fmt(std, digits)}"


def fmt_p(p) -> str:
    if _nan(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _cells(df: pd.DataFrame) -> list[list[str]]:
    """Display strings of ``df``, row by row; each float column gets one number of decimals."""
    columns = []
    for i in range(df.shape[1]):
        col = df.iloc[:, i]
        digits = column_digits(col) if pd.api.types.is_float_dtype(col) else 2
        columns.append([_cell(v, digits) for v in col.astype(object)])
    return [list(row) for row in zip(*columns)]


def _cell(v, digits: int = 2) -> str:
    if isinstance(v, float):
        return fmt(v, digits)
    if isinstance(v, bool):
        return "yes" if v else ""
    return format_value(v) if v is not None else ""


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))
