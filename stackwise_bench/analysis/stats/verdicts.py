"""What a comparison may say: better, worse, or no difference detected with the smallest effect it could detect.

Every sentence of the report that judges a cell against another goes through :func:`verdict`:

- ``better`` / ``worse`` only when the test is significant (Holm-adjusted p < ``ALPHA`` where the row has it)
  *and* the 95% interval of the difference lies entirely on that side of zero, in the metric's direction;
- otherwise ``no difference detected``, with the p-value and the minimum detectable effect of the test at these
  seeds (:mod:`~stackwise_bench.analysis.stats.stat_power`: 80% power, two-sided): a test that could only see
  a 4-point effect says nothing about a 1-point one, so a sign alone is never a finding;
- ``no test`` where none was possible (fewer than two seeds on a side, no spread).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from stackwise_bench.analysis.read.directions import MIN
from stackwise_bench.analysis.read.formatting import fmt_p
from stackwise_bench.analysis.read.numeric import is_missing
from stackwise_bench.analysis.stats.stat_power import ALPHA, TARGET_POWER, amount

BETTER, WORSE, NO_DIFFERENCE, NO_TEST = "better", "worse", "no difference detected", "no test"


def verdict_kind(row: Mapping, direction: str | None) -> str:
    """:data:`BETTER`, :data:`WORSE`, :data:`NO_DIFFERENCE` or :data:`NO_TEST` for a comparison row (cell −
    baseline): ``diff``, ``diff_ci95_low``/``_high``, ``p_value`` and, where present, ``p_holm``."""
    diff, p = row.get("diff"), _p_used(row)
    if is_missing(diff) or is_missing(p):
        return NO_TEST
    low, high = row.get("diff_ci95_low"), row.get("diff_ci95_high")
    if p >= ALPHA or is_missing(low) or is_missing(high):
        return NO_DIFFERENCE
    sign = -1.0 if direction == MIN else 1.0
    good, bad = sorted((sign * low, sign * high))
    if good > 0:
        return BETTER
    if bad < 0:
        return WORSE
    return NO_DIFFERENCE


def verdict(row: Mapping, direction: str | None, than: str | None = None) -> str:
    """The verdict of a comparison row as a phrase, with its evidence.

    ``better than optimizer=sgd (p = 0.003, Holm 0.009)``; ``no difference from optimizer=sgd detected
    (p = 0.070; with n = 3 seeds per cell the smallest effect this test would detect at 80% power is 4.1
    points)``; ``no test (only 1 seed on one side)``. ``than`` names the baseline (default: the row's).
    """
    than = than if than is not None else str(row.get("baseline") or "the baseline")
    kind = verdict_kind(row, direction)
    if kind == NO_TEST:
        why = str(row.get("note") or "") or "too few seeds"
        return f"no test ({why}): whether it differs from {than} cannot be said"
    evidence = p_text(row)
    if kind in (BETTER, WORSE):
        return f"{kind} than {than} ({evidence})"
    mde = mde_text(row)
    return f"no difference from {than} detected ({evidence}{'; ' + mde if mde else ''})"


def p_text(row: Mapping) -> str:
    """``p = 0.040`` or ``p = 0.040, Holm 0.120`` (Holm shown where it adjusted something), and the test."""
    p, holm = row.get("p_value"), row.get("p_holm")
    text = f"p {_relation(p)}"
    if not is_missing(holm) and not np.isclose(holm, p):
        text += f", Holm {_relation(holm).removeprefix('= ')}"
    test = row.get("test")
    return text + (f", {test}" if test and not is_missing(test) else "")


def _relation(p) -> str:
    """``= 0.040``, or ``< 0.001`` (not ``= <0.001``) where the p-value is shown as a bound."""
    shown = fmt_p(p)
    return f"< {shown[1:]}" if shown.startswith("<") else f"= {shown}"


def mde_text(row: Mapping) -> str:
    """``with n = 3 seeds per cell the smallest effect this test would detect at 80% power is 4.1 points``;
    empty where it is undefined (no spread)."""
    mde = row.get("mde_points")
    if is_missing(mde) or not np.isfinite(mde):
        return ""
    return (
        f"{seeds_text(row)} the smallest effect this test would detect at {TARGET_POWER:.0%} power is "
        f"{amount(mde, row)}"
    )


def seeds_text(row: Mapping) -> str:
    """``with n = 3 paired seeds``, ``with n = 3 seeds per cell`` or ``with 3 and 5 seeds``."""
    if row.get("test") == "paired t" and not is_missing(row.get("n_pairs")):
        return f"with n = {int(row['n_pairs'])} paired seeds"
    n, nb = row.get("n"), row.get("n_baseline")
    if is_missing(n) or is_missing(nb):
        return "with these seeds"
    n, nb = int(n), int(nb)
    return f"with n = {n} seeds per cell" if n == nb else f"with {n} and {nb} seeds"


def _p_used(row: Mapping):
    """The p-value significance is judged on: Holm-adjusted where the row has it."""
    holm = row.get("p_holm")
    return row.get("p_value") if is_missing(holm) else holm
