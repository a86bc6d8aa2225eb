"""Statistical power (not watts) of a comparison: the effect it could detect, the power it had, the seeds it would need.

The designs match the tests in :mod:`~stackwise_bench.analysis.stats.compare`: a paired comparison is a
one-sample t-test on the per-seed differences (statsmodels ``TTestPower``); an unpaired one is a
two-sample t-test (``TTestIndPower``, the pooled-variance test, which Welch's approximates for
similar spreads). Two-sided, ``ALPHA`` = 0.05, target power ``TARGET_POWER`` = 0.8.

Every function returns NaN / None where a figure is undefined (fewer than 2 values per side,
no spread, a zero or non-finite effect) and never raises for such input.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from stackwise_bench.analysis.read.directions import diff_unit
from stackwise_bench.analysis.read.formatting import fmt_sig

ALPHA = 0.05
TARGET_POWER = 0.8
SEEDS_SHOWN_MAX = 1000  # the report shows more than this as "1000+"
_SEARCH_MAX = 10**7  # beyond this many seeds, no plan is worth printing: None
POWER_KEYS = ("effect_size", "power", "mde_sigma", "mde_points", "seeds_needed")


def _solver(design: str):
    # ~2 s import: only when needed. sm_exceptions installs an "always" filter for its warnings when first
    # imported, which would override an enclosing ignore: import it here, before any catch_warnings below.
    import statsmodels.tools.sm_exceptions  # noqa: F401
    from statsmodels.stats.power import TTestIndPower, TTestPower

    if design == "paired":
        return TTestPower()
    if design == "independent":
        return TTestIndPower()
    raise ValueError(f"design must be 'paired' or 'independent', not {design!r}")


def _power(design: str, effect: float, n: float, ratio: float = 1.0) -> float:
    """Power of the two-sided test at ``effect`` (σ units) with ``n`` seeds (per cell for ``independent``)."""
    solver = _solver(design)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if design == "paired":
            return float(solver.power(effect_size=effect, nobs=n, alpha=ALPHA, alternative="two-sided"))
        return float(solver.power(effect_size=effect, nobs1=n, ratio=ratio, alpha=ALPHA, alternative="two-sided"))


def _solve(design: str, **unknowns) -> float:
    """statsmodels' ``solve_power`` for the one argument given as None; NaN where its root finder gives up."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = _solver(design).solve_power(alpha=ALPHA, alternative="two-sided", **unknowns)
        value = float(np.asarray(value).item())
    except Exception:  # degenerate sizes and effects
        return float("nan")
    return value if math.isfinite(value) and value > 0 else float("nan")


def _mde(design: str, n: int, ratio: float = 1.0) -> float:
    """The smallest effect (σ units) the test detects with ``TARGET_POWER`` at this size; NaN if unsolvable."""
    size = {"nobs": n} if design == "paired" else {"nobs1": n, "ratio": ratio}
    return _solve(design, effect_size=None, power=TARGET_POWER, **size)


def seeds_needed(effect: float, design: str = "paired") -> int | None:
    """Smallest n (pairs, or seeds per cell with equal cells) whose power at ``|effect|`` is ≥ ``TARGET_POWER``.

    The ceiling of statsmodels' ``solve_power`` nobs, checked against its power function (n − 1
    must fall short); None when the effect is zero or not finite, or more than 10⁷ seeds would be needed.
    """
    if effect is None or not math.isfinite(effect) or effect == 0:
        return None
    effect = abs(float(effect))

    def enough(n: int) -> bool:
        return _power(design, effect, n) >= TARGET_POWER

    size = {"nobs": None} if design == "paired" else {"nobs1": None, "ratio": 1.0}
    raw = _solve(design, effect_size=effect, power=TARGET_POWER, **size)
    n = max(2, math.ceil(raw)) if math.isfinite(raw) and raw < _SEARCH_MAX else None
    if n is None:  # the solver failed: bisect on the power function instead
        low, high = 2, 2
        while not enough(high):
            if high >= _SEARCH_MAX:
                return None
            low, high = high, min(high * 2, _SEARCH_MAX)
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if enough(mid) else (mid + 1, high)
        return high
    while not enough(n):  # guard the ceiling against the solver's tolerance
        n += 1
    while n > 2 and enough(n - 1):
        n -= 1
    return n


def _empty() -> dict:
    return {k: (None if k == "seeds_needed" else float("nan")) for k in POWER_KEYS}


def paired_power(diffs: Sequence[float]) -> dict:
    """Power figures of a paired t-test on per-seed differences (cell − baseline).

    Returns ``effect_size`` (mean / std of the differences, ddof=1), ``power`` (at |effect|),
    ``mde_sigma`` (smallest effect detectable with 80% power at this n, in σ), ``mde_points``
    (the same × std of the differences) and ``seeds_needed`` (pairs for 80% power).
    """
    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    out = _empty()
    n = len(d)
    if n < 2:
        return out
    out["mde_sigma"] = _mde("paired", n)
    sd = float(d.std(ddof=1))
    if not (math.isfinite(sd) and sd > 0):
        return out
    effect = float(d.mean()) / sd
    out.update(effect_size=effect, mde_points=out["mde_sigma"] * sd, seeds_needed=seeds_needed(effect, "paired"))
    out["power"] = _power("paired", abs(effect), n)
    return out


def independent_power(a: Sequence[float], b: Sequence[float]) -> dict:
    """Power figures of a two-sample t-test of ``a`` (cell) against ``b`` (baseline).

    ``effect_size`` is Cohen's d (pooled std); ``mde_points`` is ``mde_sigma`` × pooled std;
    ``seeds_needed`` is per cell, for two cells of equal size.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    out = _empty()
    if len(a) < 2 or len(b) < 2:
        return out
    ratio = len(b) / len(a)
    out["mde_sigma"] = _mde("independent", len(a), ratio)
    pooled = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    if not (math.isfinite(pooled) and pooled > 0):
        return out
    sd = math.sqrt(pooled)
    effect = float(a.mean() - b.mean()) / sd
    out.update(effect_size=effect, mde_points=out["mde_sigma"] * sd, seeds_needed=seeds_needed(effect, "independent"))
    out["power"] = _power("independent", abs(effect), len(a), ratio)
    return out


def fmt_seeds(n) -> str:
    """Seeds needed for display: the integer, ``1000+`` beyond :data:`SEEDS_SHOWN_MAX`, ``–`` when undefined."""
    if n is None or pd.isna(n):
        return "–"
    return f"{SEEDS_SHOWN_MAX}+" if int(n) > SEEDS_SHOWN_MAX else str(int(n))


def power_n(row) -> str:
    """The size a comparison row's power refers to: pairs, or seeds per cell."""
    if row.get("test") == "paired t":
        return str(int(row["n_pairs"]))
    n, nb = int(row["n"]), int(row["n_baseline"])
    return str(n) if n == nb else f"{n} vs {nb}"


def is_underpowered(row) -> bool:
    power, mde = row.get("power"), row.get("mde_points")
    return bool(pd.notna(power) and pd.notna(mde) and power < TARGET_POWER)


def underpowered_sentence(row) -> str:
    """The plain sentence the report adds for a comparison with power below 80%."""
    return (
        f"n = {power_n(row)}: differences smaller than {amount(row['mde_points'], row)} cannot be told from seed noise."
    )


def amount(value: float, row, digits: int = 2) -> str:
    """``4.1 points`` for a percentage metric's difference, ``0.012 (test.mse)`` for any other's."""
    unit = diff_unit(str(row.get("metric", "")))
    return f"{fmt_sig(value, digits)} points" if unit == "points" else f"{fmt_sig(value, digits)} ({unit})"


def seed_plan_lines(comparisons: pd.DataFrame) -> list[str]:
    """One line per comparison: group vs baseline, observed effect (points and σ), seeds needed for 80% power."""
    lines = []
    for _, row in comparisons.iterrows():
        head = f"{row['group']} vs {row.get('baseline') or '(no baseline)'} [{row['metric']}]"
        effect, diff = row.get("effect_size"), row.get("diff")
        if pd.isna(effect) or pd.isna(diff):
            lines.append(f"{head}: cannot be sized (fewer than 2 seeds on a side, or no spread)")
            continue
        unit = "pairs" if row.get("test") == "paired t" else "seeds per cell"
        need = row.get("seeds_needed")
        need_text = f"{fmt_seeds(need)} {unit}" if need is not None and pd.notna(need) else "cannot be sized"
        lines.append(
            f"{head}: observed {'+' if diff > 0 else ''}{amount(diff, row, 3)} ({effect:+.2f} σ, {row['test']}, "
            f"n = {power_n(row)}, "
            f"power {row['power']:.2f}); seeds needed for {TARGET_POWER:.0%} power: {need_text}"
        )
    return lines
