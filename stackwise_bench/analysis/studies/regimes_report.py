"""The report section of a depth-as-time study (:mod:`.regimes`): its table, verdicts and method."""

from __future__ import annotations

import math

import pandas as pd

from stackwise_bench.analysis.read.directions import MAX, MIN, PERCENT, SPOKEN, WORDS, metric_name
from stackwise_bench.analysis.read.formatting import fmt, markdown_table, mean_std
from stackwise_bench.analysis.read.grouping import same_value
from stackwise_bench.analysis.stats.compare import ALPHA, PAIRED_FRACTION
from stackwise_bench.analysis.studies.regimes import CLASSICAL, DEPTH_TIME, MATCHED, RegimeAnalysis, label_of

TITLE = "Depth as time vs classical"


def regimes_md(r: RegimeAnalysis) -> str:
    """``## Depth as time vs classical``: one row per arm, one line per depth-time arm, notes, the method."""
    percent = "%" if metric_name(r.metric) in PERCENT else ""
    targets = "; ".join(
        (f"{label}: " if len(r.targets) > 1 else "") + (f"{t:.2f}{percent}" if math.isfinite(t) else "none")
        for label, t in r.targets.items()
    )
    n_tests = int((r.table["kind"] == DEPTH_TIME).sum()) if len(r.table) else 0
    test, val = label_of(r.metric), label_of(r.metric, "val")
    share = f"{2 - r.fraction:.0%}" if r.lower else f"{r.fraction:.0%}"
    reaches = "falls to" if r.lower else "reaches"
    seen = "validation accuracy" if r.name in SPOKEN else f"validation {r.name}"
    parts = [f"## {TITLE}\n", markdown_table(regime_display(r))]
    if r.sentences:
        parts.append(
            f"Against classical training at equal FLOPs ({MATCHED}), on {test} ({WORDS[MIN if r.lower else MAX]}):\n"
        )
        parts.append("".join(f"- {s}\n" for s in r.sentences))
    if r.notes:
        parts.append("".join(f"- {n}\n" for n in r.notes))
    if r.checkpoint:
        parts.append(f"{r.checkpoint}\n")
    where = (
        "given (analyze target=)"
        if r.given_target
        else f"{share} of the mean final {test} of the classical full-budget arm (regime={CLASSICAL}; the best arm "
        "where there is none)"
    )
    parts.append(
        f"Target: {where}: {targets} {val}. FLOPs to target: the "
        "cumulative training FLOPs (forward and backward passes of training steps) at the end of the first epoch "
        f"whose *{val}* {reaches} the target: {seen} is what a run can see while it trains, "
        "so the resolution is one epoch. Time to target: the training time of the epochs up to it. × classical: "
        "the per-seed ratio of FLOPs to target to the classical arm's, its geometric mean with a 95% t-interval "
        "of the log ratios (paired by seed; the ratio of geometric means with a Welch interval where fewer than "
        "two seeds pair). Runs that never reach the target are left out of these and counted under `never`. "
        f"Equal compute: each depth-time arm against {MATCHED} on {test}, a paired t-test over the shared "
        f"seeds (where at least {PAIRED_FRACTION:.0%} pair; Welch's otherwise), "
        + (f"Holm-adjusted over the {n_tests} depth-time arms" if n_tests > 1 else "one test, so no adjustment")
        + f"; an arm beat (or did worse than) classical only where that is "
        f"significant at Holm p < {ALPHA} and the difference's 95% interval lies on that side of zero; otherwise "
        "no difference is detected, with the smallest effect the test could detect at 80% power: these seeds "
        "cannot tell the arms apart, which does not make them equal. Per-arm numbers: regimes.csv.\n"
    )
    return "\n".join(parts)


def regime_display(a: RegimeAnalysis) -> pd.DataFrame:
    """The table for people: one row per arm, numbers formatted (the raw columns are in regimes.csv)."""
    rows = []
    m = a.name
    header = label_of(a.metric) + (" (%)" if m in PERCENT else "")
    for _, r in a.table.iterrows():
        rows.append(
            {
                "arm": r["arm"],
                "n": str(int(r["n"])),
                header: mean_std(r[f"{m}_mean"], r[f"{m}_std"]) if r["n"] > 1 else fmt(r[f"{m}_mean"]),
                "training FLOPs": flops_text(r["flops_mean"]),
                "FLOPs × classical": _times(r["flops_vs_classical"]),
                "wall time (s)": fmt(r["time_s_mean"], 1),
                "FLOPs to target": flops_text(r["flops_to_target_mean"]),
                "time to target (s)": fmt(r["time_to_target_s_mean"], 1),
                "to target × classical [95% CI]": _ratio(r),
                "never": f"{int(r['n_never'])} of {int(r['n_reached'] + r['n_never'])}",
            }
        )
    return pd.DataFrame(rows)


def flops_text(v) -> str:
    """``4.5e+13``: three significant digits, ``–`` for none."""
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def _times(v) -> str:
    return "–" if isinstance(v, float) and math.isnan(v) else f"{v:.2f}×"


def _ratio(r: pd.Series) -> str:
    if same_value(r["regime"], CLASSICAL) and r["ftt_ratio"] == 1:
        return "1 (reference)"
    if math.isnan(r["ftt_ratio"]):
        return "–"
    if math.isnan(r["ftt_ratio_ci95_low"]):
        return _times(r["ftt_ratio"])
    return f"{_times(r['ftt_ratio'])} [{r['ftt_ratio_ci95_low']:.2f}, {r['ftt_ratio_ci95_high']:.2f}]"
