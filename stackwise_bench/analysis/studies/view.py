"""What every study view is (a title, one table, highlights), its report section, and ratios to a reference row.

Each study (precision, optimizer, PEFT, search) returns ``None`` when its key does not vary in the runs, else a
:class:`StudyView`: a title, one table with a row per cell, and a few plain-language highlights for the report
and the screen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from stackwise_bench.analysis.read.formatting import markdown_table
from stackwise_bench.analysis.read.grouping import same_value


@dataclass
class StudyView:
    title: str
    table: pd.DataFrame
    highlights: list[str] = field(default_factory=list)
    comparisons: pd.DataFrame | None = None


def view_md(v: StudyView) -> str:
    """The view's report section: its table, then its highlights as a list."""
    drop = [c for c in v.table.columns if c in ("_seeds",)]
    md = f"## {v.title}\n\n" + markdown_table(v.table.drop(columns=drop))
    if v.highlights:
        md += "\n" + "".join(f"- {h}\n" for h in v.highlights)
    return md


def ci_columns(table: pd.DataFrame) -> list[str]:
    """The interval's columns of a seed-statistics table, ``ci95_clipped`` only where some end was cut at the
    metric's range (:func:`~stackwise_bench.analysis.stats.seeds.range_interval`)."""
    cut = "ci95_clipped" in table and table["ci95_clipped"].fillna("").astype(bool).any()
    return ["ci95_low", "ci95_high", *(["ci95_clipped"] if cut else [])]


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
