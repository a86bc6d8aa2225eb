"""The sections of ``report.md`` that present the study's results: comparisons, dynamics, quantization, ..."""

from __future__ import annotations

import pandas as pd

from stackwise_bench.analysis.compare import ALPHA, MIN_WILCOXON_PAIRS, PAIRED_FRACTION
from stackwise_bench.analysis.dynamics import CONVERGENCE_TOLERANCE
from stackwise_bench.analysis.power import TARGET_POWER, fmt_seeds, fmt_sig, is_underpowered, underpowered_sentence
from stackwise_bench.analysis.quantization import baseline_mismatches, quantization_display
from stackwise_bench.analysis.study import StudyAnalysis
from stackwise_bench.analysis.tables import fmt_p, markdown_table, mean_std, metric_digits

DYNAMICS_SHOWN = {
    "convergence_epoch": "convergence epoch",
    "best_val_top1": "best val top-1 (%)",
    "generalisation_gap": "gen. gap (points)",
    "overfitting": "overfitting (points)",
    "epoch_time_mean_s": "time/epoch (s)",
}


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
        "Cohen's d is the mean difference over the pooled standard deviation.\n"
        + (_P_IMPROVE_NOTE if robust else "")
        + _power_md(a.comparisons)
    )


_P_IMPROVE_NOTE = (
    "\nP(X>Y) is the probability that a run of the cell beats a run of the baseline on the same task (ties count "
    "half; averaged over tasks), with a 95% interval from resampling runs within each task; 0.5 means no "
    "difference.\n"
)


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
        text += f"\nUnderpowered comparisons (power < {TARGET_POWER:.0%}):\n\n" + "".join(
            f"- {row['group']} vs {row['baseline']} ({row['metric']}): {underpowered_sentence(row)}\n" for row in weak
        )
    return text


def unfinished_md(a: StudyAnalysis) -> str:
    u = a.unfinished
    if u.empty:
        return ""
    cols = [c for c in ("run_dir", "status", "seed", "error.type", "error.message") if c in u]
    table = u[cols].copy()
    if "error.message" in table:
        table["error.message"] = table["error.message"].fillna("").astype(str).str.slice(0, 160)
    return "## Runs not included (not finished)\n\n" + markdown_table(table)


def dynamics_md(a: StudyAnalysis) -> str:
    s = a.dynamics_summary
    if s.empty:
        return ""
    s = s[s["metric"].isin(DYNAMICS_SHOWN)]
    cells = {(g, m): (mean, std) for g, m, mean, std in zip(s["group"], s["metric"], s["mean"], s["std"])}
    shown = [m for m in DYNAMICS_SHOWN if m in set(s["metric"])]
    digits = metric_digits(s)
    rows = []
    for group in dict.fromkeys(s["group"]):
        row = {"group": group}
        for m in shown:
            mean, std = cells.get((group, m), (float("nan"), float("nan")))
            row[DYNAMICS_SHOWN[m]] = mean_std(mean, std, digits[m])
        rows.append(row)
    return (
        "## Training dynamics\n\n"
        + markdown_table(pd.DataFrame(rows))
        + f"\nmean ± std over seeds. Convergence epoch: first epoch within {CONVERGENCE_TOLERANCE} points of "
        "the run's best validation accuracy; generalisation gap: final train − final validation accuracy; "
        "overfitting: best − final validation accuracy.\n"
    )


def view_md(v) -> str:
    drop = [c for c in v.table.columns if c in ("_seeds",)]
    md = f"## {v.title}\n\n" + markdown_table(v.table.drop(columns=drop))
    if v.highlights:
        md += "\n" + "".join(f"- {h}\n" for h in v.highlights)
    return md


def quantization_md(a: StudyAnalysis) -> str:
    t = a.quantization
    if t.empty:
        return ""
    formats = ", ".join(dict.fromkeys(str(f).upper().replace("_", " ") for f in t["quantize"]))
    title = (
        "FP8 post-training quantization"
        if all(str(f).startswith("fp8") for f in t["quantize"])
        else "Post-training quantization"
    )
    matched, compared = int(t["baseline_matches"].sum()), int(t["n_recorded"].sum())
    if not compared:
        reeval = "No record re-evaluated a best.pt, so none can be checked against the run's recorded test top-1."
    elif matched == compared:
        reeval = (
            f"The unquantized re-evaluation reproduced the recorded test top-1 exactly in all {compared} "
            "records that have one, so the degradation is measured against the accuracy the runs reported."
        )
    else:
        reeval = (
            f"The unquantized re-evaluation reproduced the recorded test top-1 in only {matched} of {compared} "
            "records; the degradation is measured against the re-evaluated accuracy. Differing: "
            + "; ".join(baseline_mismatches(a.quantized)[:5])
            + "."
        )
    return (
        f"## {title}\n\n{len(a.quantized)} evaluation record(s) of the runs' checkpoints ({formats}), grouped "
        f"by the runs' cells and the quantization settings.\n\n"
        + markdown_table(quantization_display(t, a.group_by))
        + "\nmean ± std over seeds. Degradation: top-1 before − after quantization (positive = accuracy lost), "
        "with its 95% t-interval and a paired t-test over the seeds (each record measures the same model "
        "before and after; Holm-adjusted across these rows). Weights: every parameter, in MB of 2^20 bytes, "
        "quantized weights counted as stored: FP8 with one scale byte per output channel, int8 with an fp16 scale "
        "per output channel, int4 (format int4_g<group size>) packed two per byte with an fp16 scale and a 4-bit "
        "zero point per group. re-eval = recorded: records whose "
        "unquantized pass matched the run's recorded test top-1, of those with a recorded value.\n\n" + reeval + "\n"
    )


def other_metrics_md(a: StudyAnalysis) -> str:
    s = a.summary[a.summary["metric"] != a.metric] if len(a.summary) else a.summary
    if s.empty:
        return ""
    digits = metric_digits(s, a.runs)
    s = s.assign(value=[mean_std(m, sd, digits[k]) for k, m, sd in zip(s["metric"], s["mean"], s["std"])])
    wide = s.pivot_table(index="group", columns="metric", values="value", aggfunc="first", sort=False)
    return "## Other metrics (mean ± std over seeds)\n\n" + markdown_table(wide.reset_index())


def validation_md(a: StudyAnalysis) -> str:
    if a.validation is None:
        return ""
    v = a.validation
    rows = [
        {
            "expectation": r["name"],
            "cell": r.get("group") or "–",
            "result": {True: "pass", False: "FAIL", None: "skipped"}[r["passed"]],
            "detail": r.get("detail", ""),
        }
        for r in v["results"]
    ]
    return (
        f"## Expectations\n\n{v['passed']} passed, {v['failed']} failed, {v['skipped']} skipped "
        "(details in validation.json).\n\n" + markdown_table(pd.DataFrame(rows))
    )
