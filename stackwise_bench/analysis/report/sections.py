"""The sections of ``report.md`` that present the study's results: comparisons, dynamics, quantization, ..."""

from __future__ import annotations

import pandas as pd

from stackwise_bench.analysis.pipeline import StudyAnalysis
from stackwise_bench.analysis.read.directions import MAX, MIN, SPOKEN, WORDS, lower_is_better, task_metrics
from stackwise_bench.analysis.read.dynamics import convergence_tolerance
from stackwise_bench.analysis.read.formatting import fmt_p, fmt_sig, markdown_table, mean_std, metric_digits
from stackwise_bench.analysis.stats.compare import ALPHA, MIN_WILCOXON_PAIRS, PAIRED_FRACTION
from stackwise_bench.analysis.stats.stat_power import TARGET_POWER, fmt_seeds, is_underpowered, underpowered_sentence
from stackwise_bench.analysis.stats.verdicts import verdict

# Dynamics columns shown, with their headers; {m}: the task metric (top1, mse).
DYNAMICS_SHOWN = {
    "convergence_epoch": "convergence epoch",
    "best_val_{m}": "best val {m}",
    "generalisation_gap": "gen. gap",
    "overfitting": "overfitting",
    "epoch_time_mean_s": "time/epoch (s)",
}
# Image classification's headers say their unit: accuracies and gaps in percent points.
TOP1_HEADERS = {"best_val_top1": "best val top-1 (%)", "generalisation_gap": "gen. gap (points)"}
TOP1_HEADERS["overfitting"] = "overfitting (points)"


def comparisons_md(a: StudyAnalysis) -> str:
    if a.comparisons.empty:
        return ""
    cols = [
        "group",
        "baseline",
        "metric",
        "n",
        "n_baseline",
        "diff",
        "diff_ci95_low",
        "diff_ci95_high",
        "test",
        "n_pairs",
        "p_value",
        "wilcoxon_p",
        "p_holm",
        "cohens_d",
        "significant",
        "better",
        "verdict",
        "effect_size",
        "power",
        "mde_points",
        "mde_sigma",
        "seeds_needed",
        "note",
    ]
    c = a.comparisons[[x for x in cols if x in a.comparisons]].copy()
    for col in ("p_value", "wilcoxon_p", "p_holm"):
        if col in c:
            c[col] = c[col].map(fmt_p)
    for col in ("effect_size", "power", "mde_sigma"):
        if col in c:
            c[col] = c[col].map(lambda x: "–" if pd.isna(x) else f"{x:.2f}")
    if "mde_points" in c:
        c["mde_points"] = c["mde_points"].map(fmt_sig)
    if "seeds_needed" in c:
        c["seeds_needed"] = c["seeds_needed"].map(fmt_seeds)
    if "better" in c:
        c["better"] = c["better"].astype(object).map(lambda x: "–" if pd.isna(x) else "yes" if x else "no")
    robust = a.aggregate == "iqm" and "p_improve" in a.comparisons
    if robust:
        c.insert(len(c.columns) - 1, "P(X>Y) [95%]", [_p_improve(r) for _, r in a.comparisons.iterrows()])
    return (
        "## Comparisons against the baseline\n\n"
        + markdown_table(c)
        + f"\nPaired t-test over the shared seeds where at least {PAIRED_FRACTION:.0%} of the smaller cell's "
        f"seeds have a partner, Welch's t-test otherwise; Wilcoxon signed-rank is added from "
        f"{MIN_WILCOXON_PAIRS} pairs "
        f"(with fewer it cannot reach p < {ALPHA}). `significant` uses the Holm-adjusted p < {ALPHA}. "
        "Cohen's d is the mean difference over the pooled standard deviation. `better`: the cell's mean beats "
        f"the baseline's ({_direction_text(a)}), significant or not; `verdict` says better or worse only where "
        "the test is significant and the difference's 95% interval lies on that side of zero, else no difference "
        "detected.\n" + (_P_IMPROVE_NOTE if robust else "") + _verdicts_md(a) + _power_md(a.comparisons)
    )


def _verdicts_md(a: StudyAnalysis) -> str:
    """One sentence per comparison: better / worse / no difference detected with its minimum detectable effect."""
    rows = [r for _, r in a.comparisons.iterrows() if r.get("baseline")]
    if not rows:
        return ""
    runs = getattr(a, "runs", None)
    lines = "".join(f"- {r['group']} ({r['metric']}): {verdict(r, _direction(runs, r['metric']))}.\n" for r in rows)
    return f"\n{'Verdicts' if len(rows) > 1 else 'Verdict'}:\n\n{lines}"


_P_IMPROVE_NOTE = (
    "\nP(X>Y) is the probability that a run of the cell beats a run of the baseline on the same task (a lower "
    "value beats a higher one where lower is better; ties count half; averaged over tasks), with a 95% interval "
    "from resampling runs within each task; 0.5 means no difference.\n"
)


def _direction(runs, metric: str) -> str | None:
    return None if runs is None else MIN if lower_is_better(runs, metric) else MAX


def _direction_text(a) -> str:
    """``higher is better for test.top1``, from the comparisons' metrics' directions (the runs' task records)."""
    runs = getattr(a, "runs", None)
    metrics = dict.fromkeys(a.comparisons["metric"]) if "metric" in a.comparisons else {}
    if runs is None:
        return "in each metric's direction"
    return "; ".join(f"{WORDS[MIN if lower_is_better(runs, m) else MAX]} for {m}" for m in metrics)


def _p_improve(row) -> str:
    p, low, high = (row.get(k) for k in ("p_improve", "p_improve_ci95_low", "p_improve_ci95_high"))
    if pd.isna(p):
        return "–"
    return f"{p:.2f}" if pd.isna(low) else f"{p:.2f} [{low:.2f}, {high:.2f}]"


def _power_md(comparisons: pd.DataFrame) -> str:
    """The power columns explained, and one sentence per comparison with power below the target."""
    text = (
        f"\nPower (statsmodels, two-sided, alpha {ALPHA}) is for the test used: a one-sample t-test on the paired "
        "differences, or a two-sample t-test. `effect_size` is the mean difference over the standard deviation "
        "of the differences (paired) or Cohen's d (unpaired); `power` is the chance the test detects an effect "
        f"that large; `mde_points` / `mde_sigma` is the smallest difference detectable with {TARGET_POWER:.0%} "
        "power at these seeds, in the metric's units and in standard deviations; `seeds_needed` is the smallest "
        f"number of seeds (pairs, or per cell) that gives {TARGET_POWER:.0%} power for the observed effect.\n"
    )
    weak = [row for _, row in comparisons.iterrows() if is_underpowered(row)]
    if weak:
        what = "comparisons" if len(weak) > 1 else "comparison"
        text += f"\nUnderpowered {what} (power < {TARGET_POWER:.0%}):\n\n" + "".join(
            f"- {row['group']} vs {row['baseline']} ({row['metric']}): {underpowered_sentence(row)}\n" for row in weak
        )
    return text


def unfinished_md(a: StudyAnalysis) -> str:
    """The runs left out of the statistics: those that diverged, then the others not finished."""
    return _runs_md("## Diverged runs (not included)", a.diverged, DIVERGED_NOTE) + _runs_md(
        "## Runs not included (not finished)", a.unfinished.drop(index=a.diverged.index)
    )


DIVERGED_NOTE = (
    "\nA loss or a trained weight became NaN or infinite: these runs are never averaged into a cell, whatever "
    "their best.pt scored (records from before this check may say completed; they count as diverged here).\n"
)


def _runs_md(title: str, u: pd.DataFrame, note: str = "") -> str:
    if u.empty:
        return ""
    cols = [c for c in ("run_dir", "status", "seed", "error.type", "error.message") if c in u]
    table = u[cols].copy()
    if "error.message" in table:
        table["error.message"] = table["error.message"].fillna("").astype(str).str.slice(0, 160)
    return f"{title}\n\n" + markdown_table(table) + note


def dynamics_md(a: StudyAnalysis) -> str:
    s = a.dynamics_summary
    if s.empty:
        return ""
    m = task_metrics(a.runs)[0]
    headers = {col.format(m=m): head.format(m=m) for col, head in DYNAMICS_SHOWN.items()}
    headers = {col: TOP1_HEADERS.get(col, head) for col, head in headers.items()}
    s = s[s["metric"].isin(headers)]
    cells = {(g, c): (mean, std) for g, c, mean, std in zip(s["group"], s["metric"], s["mean"], s["std"])}
    shown = [c for c in headers if c in set(s["metric"])]
    digits = metric_digits(s)
    rows = []
    for group in dict.fromkeys(s["group"]):
        row = {"group": group}
        for c in shown:
            mean, std = cells.get((group, c), (float("nan"), float("nan")))
            row[headers[c]] = mean_std(mean, std, digits[c])
        rows.append(row)
    what = "accuracy" if m in SPOKEN else m
    return (
        "## Training dynamics\n\n"
        + markdown_table(pd.DataFrame(rows))
        + f"\nmean ± std over seeds, {WORDS[MIN if lower_is_better(a.runs, f'val_{m}') else MAX]} for {m}. "
        f"Convergence epoch: first epoch within {convergence_tolerance(m)} of the run's best validation {what}; "
        f"generalisation gap: how much worse the final validation {what} is than the final train {what}; "
        f"overfitting: how much worse the final validation {what} is than the best.\n"
    )


def other_metrics_md(a: StudyAnalysis) -> str:
    s = a.summary[a.summary["metric"] != a.metric] if len(a.summary) else a.summary
    if s.empty:
        return ""
    digits = metric_digits(s, a.runs)
    s = s.assign(value=[mean_std(m, sd, digits[k]) for k, m, sd in zip(s["metric"], s["mean"], s["std"])])
    wide = s.pivot_table(index="group", columns="metric", values="value", aggfunc="first", sort=False)
    return "## Other metrics (mean ± std over seeds)\n\n" + markdown_table(wide.reset_index())
