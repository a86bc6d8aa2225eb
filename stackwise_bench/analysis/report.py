"""Write a study's analysis into a fresh folder: report.md, table.tex, CSVs, plots, validation.json.

Where the runs have quantized evaluation records (``<run>/eval/<name>/``), the report
gains a "Post-training quantization" section and ``quantization.csv`` / ``evaluations.csv``.

The folder is created with ``mkdir`` (never ``exist_ok``): when ``analysis``
exists the next free ``analysis_2``, ``analysis_3``, ... is used, so an earlier
report is never overwritten, even by two analyses started at once.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd

from stackwise_bench.analysis.compare import ALPHA, MIN_WILCOXON_PAIRS, PAIRED_FRACTION
from stackwise_bench.analysis.dynamics import CONVERGENCE_TOLERANCE
from stackwise_bench.analysis.grouping import format_value
from stackwise_bench.analysis.quantization import baseline_mismatches, quantization_display
from stackwise_bench.analysis.study import StudyAnalysis
from stackwise_bench.analysis.tables import booktabs_table, fmt, fmt_p, headline_table, markdown_table
from stackwise_bench.runs.contract import SUMMARY
from stackwise_bench.runs.record import claim_new_dir

DYNAMICS_SHOWN = {
    "convergence_epoch": "convergence epoch",
    "best_val_top1": "best val top-1 (%)",
    "generalisation_gap": "gen. gap (points)",
    "overfitting": "overfitting (points)",
    "epoch_time_mean_s": "time/epoch (s)",
}


def default_output_base(paths: list[Path]) -> Path:
    """``<first runs folder>/analysis``; for a single run folder, next to it."""
    first = Path(paths[0])
    return (first.parent if (first / SUMMARY).exists() else first) / "analysis"


def new_output_dir(base: str | Path) -> Path:
    """Create and return ``base``, or ``base_2``, ``base_3``, ... when it already exists."""
    return claim_new_dir(base, sep="_")


def write_report(
    a: StudyAnalysis, out: str | Path | None = None, *, plots: bool = True, command: str | None = None
) -> Path:
    """Write every output of ``a`` into a new folder (see :func:`new_output_dir`) and return it."""
    out_dir = new_output_dir(out if out is not None else default_output_base(a.paths))
    a.runs.to_csv(out_dir / "runs.csv", index=False)
    a.summary.to_csv(out_dir / "summary.csv", index=False)
    a.comparisons.to_csv(out_dir / "stats.csv", index=False)
    a.dynamics.to_csv(out_dir / "dynamics.csv", index=False)
    a.epochs.to_csv(out_dir / "epochs.csv", index=False)
    headline = headline_table(a.summary, a.comparisons, a.metric, a.group_by, a.baseline)
    (out_dir / "table.tex").write_text(booktabs_table(headline, _caption(a)))
    if len(a.quantization):
        a.quantization.to_csv(out_dir / "quantization.csv", index=False)
        a.quantized.to_csv(out_dir / "evaluations.csv", index=False)
    if a.validation is not None:
        (out_dir / "validation.json").write_text(json.dumps(a.validation, indent=2, default=_jsonable) + "\n")
    figures = {}
    if plots:
        from stackwise_bench.analysis.plots import make_plots

        figures = make_plots(
            out_dir / "plots",
            runs=a.runs,
            epochs=a.epochs,
            hardware=a.hardware,
            dynamics=a.dynamics,
            summary=a.summary,
            metric=a.metric,
            group_by=a.group_by,
            quantized=a.quantized,
        )
    (out_dir / "report.md").write_text(render_markdown(a, headline, figures, out_dir, command))
    return out_dir


def render_markdown(
    a: StudyAnalysis, headline: pd.DataFrame, figures: dict[str, Path], out_dir: Path, command: str | None = None
) -> str:
    parts = [
        _header(a, command),
        _warnings_md(a),
        f"## {a.metric} per cell\n\n"
        + markdown_table(headline)
        + f"\nmean ± std and 95% t-interval over seeds; Δ is cell − baseline [95% interval]; "
        f"p is the raw p-value (Holm–Bonferroni adjusted across all {len(a.comparisons)} comparisons).\n",
        _comparisons_md(a),
        _unfinished_md(a),
        _dynamics_md(a),
    ]
    parts += [_view_md(v) for v in a.views] + [_quantization_md(a)]
    parts += [_other_metrics_md(a), _validation_md(a), _figures_md(figures, out_dir), _files_md(a)]
    return "\n".join(p for p in parts if p)


def _header(a: StudyAnalysis, command: str | None) -> str:
    counts = a.runs["status"].value_counts()
    status = ", ".join(f"{n} {s}" for s, n in counts.items())
    seeds = sorted({format_value(s) for s in a.runs["seed"].dropna()}, key=_natural)
    base = ", ".join(f"{k}={format_value(v)}" for k, v in a.baseline.items()) or "none"
    lines = [
        f"# Analysis of {', '.join(str(p) for p in a.paths)}",
        "",
        f"Generated {dt.datetime.now().isoformat(timespec='seconds')}" + (f" by `{command}`" if command else "") + ".",
        "",
        f"- runs: {len(a.runs)} ({status}); statistics use finished runs (completed, early_stopped)",
        f"- cells grouped by: {', '.join(a.group_by) or '(none: all runs form one cell)'}",
        f"- seeds: {_seed_list(seeds)}",
        f"- headline metric: {a.metric}",
        f"- baseline: {base}" + (" (chosen automatically; set baseline=key=value)" if a.baseline_auto else ""),
        "",
    ]
    return "\n".join(lines)


def _warnings_md(a: StudyAnalysis) -> str:
    if not a.warnings:
        return ""
    return "## Warnings\n\n" + "".join(f"- {w}\n" for w in a.warnings)


def _comparisons_md(a: StudyAnalysis) -> str:
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
        "note",
    ]
    c = a.comparisons[[x for x in cols if x in a.comparisons]].copy()
    for col in ("p_value", "wilcoxon_p", "p_holm"):
        if col in c:
            c[col] = c[col].map(fmt_p)
    return (
        "## Comparisons against the baseline\n\n"
        + markdown_table(c)
        + f"\nPaired t-test over the shared seeds where at least {PAIRED_FRACTION:.0%} of the smaller cell's "
        f"seeds have a partner, Welch's t-test otherwise; Wilcoxon signed-rank is added from "
        f"{MIN_WILCOXON_PAIRS} pairs "
        f"(with fewer it cannot reach p < {ALPHA}). `significant` uses the Holm-adjusted p < {ALPHA}. "
        "Cohen's d is the mean difference over the pooled standard deviation.\n"
    )


def _unfinished_md(a: StudyAnalysis) -> str:
    u = a.unfinished
    if u.empty:
        return ""
    cols = [c for c in ("run_dir", "status", "seed", "error.type", "error.message") if c in u]
    table = u[cols].copy()
    if "error.message" in table:
        table["error.message"] = table["error.message"].fillna("").astype(str).str.slice(0, 160)
    return "## Runs not included (not finished)\n\n" + markdown_table(table)


def _dynamics_md(a: StudyAnalysis) -> str:
    s = a.dynamics_summary
    if s.empty:
        return ""
    s = s[s["metric"].isin(DYNAMICS_SHOWN)]
    cells = {(g, m): (mean, std) for g, m, mean, std in zip(s["group"], s["metric"], s["mean"], s["std"])}
    shown = [m for m in DYNAMICS_SHOWN if m in set(s["metric"])]
    rows = []
    for group in dict.fromkeys(s["group"]):
        row = {"group": group}
        for m in shown:
            mean, std = cells.get((group, m), (float("nan"), float("nan")))
            row[DYNAMICS_SHOWN[m]] = f"{fmt(mean)} ± {fmt(std)}"
        rows.append(row)
    return (
        "## Training dynamics\n\n"
        + markdown_table(pd.DataFrame(rows))
        + f"\nmean ± std over seeds. Convergence epoch: first epoch within {CONVERGENCE_TOLERANCE} points of "
        "the run's best validation accuracy; generalisation gap: final train − final validation accuracy; "
        "overfitting: best − final validation accuracy.\n"
    )


def _view_md(v) -> str:
    drop = [c for c in v.table.columns if c in ("_seeds",)]
    md = f"## {v.title}\n\n" + markdown_table(v.table.drop(columns=drop))
    if v.highlights:
        md += "\n" + "".join(f"- {h}\n" for h in v.highlights)
    return md


def _quantization_md(a: StudyAnalysis) -> str:
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
        "FP8 weights counted with one scale byte per output channel. re-eval = recorded: records whose "
        "unquantized pass matched the run's recorded test top-1, of those with a recorded value.\n\n" + reeval + "\n"
    )


def _other_metrics_md(a: StudyAnalysis) -> str:
    s = a.summary[a.summary["metric"] != a.metric] if len(a.summary) else a.summary
    if s.empty:
        return ""
    s = s.assign(value=[f"{fmt(m)} ± {fmt(sd)}" for m, sd in zip(s["mean"], s["std"])])
    wide = s.pivot_table(index="group", columns="metric", values="value", aggfunc="first", sort=False)
    return "## Other metrics (mean ± std over seeds)\n\n" + markdown_table(wide.reset_index())


def _validation_md(a: StudyAnalysis) -> str:
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


def _figures_md(figures: dict[str, Path], out_dir: Path) -> str:
    if not figures:
        return ""
    return "## Plots\n\n" + "".join(
        f"### {t}\n\n![{t}]({p.relative_to(out_dir).as_posix()})\n\n" for t, p in figures.items()
    )


def _files_md(a: StudyAnalysis) -> str:
    files = [
        "runs.csv (one row per run)",
        "summary.csv (seed statistics per cell and metric)",
        "stats.csv (comparisons)",
        "dynamics.csv (per-run dynamics)",
        "epochs.csv (per-epoch curves)",
        "table.tex (booktabs)",
    ] + (["validation.json"] if a.validation is not None else [])
    if len(a.quantization):
        files += [
            "quantization.csv (post-training quantization per cell and settings)",
            "evaluations.csv (the evaluation records used, one per run and settings)",
        ]
    return "## Files\n\n" + "".join(f"- {f}\n" for f in files)


def _caption(a: StudyAnalysis) -> str:
    base = ", ".join(f"{k}={format_value(v)}" for k, v in a.baseline.items())
    text = f"{a.metric} per cell: mean ± std over seeds and 95% t-interval"
    if base:
        text += f"; Δ to the baseline ({base}) with its 95% interval, test and p (Holm-adjusted)"
    return text + "."


def _seed_list(seeds: list[str]) -> str:
    if not seeds:
        return "unknown"
    return ", ".join(seeds) if len(seeds) <= 12 else f"{len(seeds)} seeds ({seeds[0]} … {seeds[-1]})"


def _natural(s: str):
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


def _jsonable(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
