"""Energy and thermal throttling per cell, from ``summary.json["resources"]``.

The hardware monitor records ``energy_j`` (GPU + CPU RAPL, where readable), ``energy_j_per_img`` and
``thermal_throttled`` / ``throttle_reasons``; each is null on a machine that cannot read it. Null stays
null here: a run without a reading is left out of its cell's mean (and counted as such), never taken as 0.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from stackwise_bench.analysis.read.grouping import same_value, with_group_labels
from stackwise_bench.analysis.stats.seeds import describe
from stackwise_bench.runs.contract import FINISHED

ENERGY = "resources.energy_j"
ENERGY_PER_IMG = "resources.energy_j_per_img"
THROTTLED = "resources.thermal_throttled"
REASONS = "resources.throttle_reasons"  # joined into one cell by run_row ("hw_thermal_slowdown, sw_power_cap")
# headline column -> the resources value it shows
ENERGY_COLUMNS = {"energy (J)": ENERGY, "energy (J/img)": ENERGY_PER_IMG}
THROTTLE_COLUMN = "thermal throttling"
ENERGY_NOTE = (
    "energy: GPU + CPU (RAPL) energy of a run and per training image, mean ± std over the runs with a "
    "reading; thermal throttling: runs whose GPU clocks were held down for heat, of the runs with a GPU, "
    "with every throttle reason the driver reported."
)


def readings(runs: pd.DataFrame, column: str) -> pd.Series:
    """``column`` of ``runs`` as floats; NaN where a run has no reading (null, or an older record)."""
    if column not in runs:
        return pd.Series(np.nan, index=runs.index)
    return pd.to_numeric(runs[column], errors="coerce")


def has_energy(runs: pd.DataFrame) -> bool:
    """Whether any finished run has an energy reading."""
    return bool(readings(runs[runs["status"].isin(FINISHED)], ENERGY).notna().any())


def energy_columns(runs: pd.DataFrame, group_by: list[str]) -> dict[str, dict[str, str]]:
    """Per cell label: the headline table's energy and throttling cells, as display strings.

    Only the columns some finished run has a value for; empty when none has any.
    """
    done = with_group_labels(runs[runs["status"].isin(FINISHED)], group_by)
    shown = {name: col for name, col in ENERGY_COLUMNS.items() if readings(done, col).notna().any()}
    throttle = THROTTLED in done and done[THROTTLED].notna().any()
    if not shown and not throttle:
        return {}
    cells = dict(list(done.groupby("group", sort=False)))
    stats = {name: {g: describe(readings(c, col)) for g, c in cells.items()} for name, col in shown.items()}
    out = {}
    for group, cell in cells.items():
        row = {}
        for name, by_group in stats.items():
            digits = _digits([d["mean"] for d in by_group.values()])  # one format per column
            row[name] = _mean_cell(by_group[group], len(cell), digits)
        if throttle:
            row[THROTTLE_COLUMN] = throttle_cell(cell)
        out[group] = row
    return out


def throttle_cell(cell: pd.DataFrame) -> str:
    """``no``, ``yes``, or ``2/3`` runs throttled, with the reasons reported; ``n/a`` without a GPU."""
    known = cell[THROTTLED].dropna() if THROTTLED in cell else pd.Series(dtype=object)
    if known.empty:
        return "n/a"
    hot = int(sum(bool(v) for v in known))
    verdict = "no" if hot == 0 else "yes" if hot == len(known) else f"{hot}/{len(known)}"
    names = cell[REASONS].dropna() if REASONS in cell else pd.Series(dtype=object)
    reasons = sorted({r.strip() for text in names for r in str(text).split(",") if r.strip()})
    return f"{verdict} ({', '.join(reasons)})" if reasons else verdict


def _mean_cell(d: dict, n_runs: int, digits: int) -> str:
    """mean ± std over the runs with a reading, saying how many had one when not all did."""
    if d["n"] == 0:
        return "n/a"
    text = f"{d['mean']:,.{digits}f}" + (f" ± {d['std']:,.{digits}f}" if d["n"] > 1 else "")
    return text + (f" ({d['n']} of {n_runs} runs)" if d["n"] < n_runs else "")


def _digits(means: list[float]) -> int:
    """Decimals of a column: none from 1,000 J on, else two significant digits of its smallest value
    (0.42 J/img, 0.0042 J/img), at least two."""
    finite = [abs(m) for m in means if m and math.isfinite(m)]
    if not finite:
        return 2
    if max(finite) >= 1000:
        return 0
    return min(8, max(2, 1 - math.floor(math.log10(min(finite)))))


def energy_highlight(table: pd.DataFrame, key: str = "precision", reference="fp32") -> str | None:
    """``"precision=bf16 is the most energy-efficient: 0.42 J/img, 0.61x fp32"`` from a study table.

    ``table`` has a row per cell with ``group``, ``key``, ``energy_j_per_img`` (mean J per training image)
    and ``energy_vs_<reference>`` (that over the matching reference cell's). None when fewer than two cells
    have a reading: one cell is not a comparison.
    """
    if "energy_j_per_img" not in table:
        return None
    values = pd.to_numeric(table["energy_j_per_img"], errors="coerce").dropna()
    if len(values) < 2:
        return None
    best = table.loc[values.idxmin()]
    text = f"{best['group']} is the most energy-efficient: {best['energy_j_per_img']:.3g} J/img"
    ratio = best.get(f"energy_vs_{reference}")
    if not same_value(best.get(key), reference) and ratio is not None and pd.notna(ratio):
        text += f", {ratio:.2f}x {reference}"
    return text


def energy_note(runs: pd.DataFrame) -> str:
    """One sentence for the report when the finished runs have no energy reading at all, else ``""``."""
    done = runs[runs["status"].isin(FINISHED)]
    if done.empty or has_energy(runs):
        return ""
    one = len(done) == 1
    if ENERGY in runs:
        return (
            f"No energy readings: {'the run' if one else 'the runs'} had no GPU power counter (NVML) and no "
            "readable RAPL counter, so resources.energy_j is null."
        )
    whose = "the run's record has" if one else "the runs' records have"
    return (
        f"No energy readings: {whose} no resources.energy_j (hardware monitor off, or written before energy was "
        "measured)."
    )


def energy_md(runs: pd.DataFrame, headline: pd.DataFrame) -> str:
    """The report's sentence under the headline table: what its energy columns mean, or why there are none."""
    if any(c in headline for c in (*ENERGY_COLUMNS, THROTTLE_COLUMN)):
        return f"\n{ENERGY_NOTE}\n"
    note = energy_note(runs)
    return f"\n{note}\n" if note else ""
