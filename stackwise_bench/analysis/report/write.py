"""Write a study's analysis into a fresh folder: report.md, table.tex, CSVs, plots, validation.json.

Where the runs have quantized evaluation records (``<run>/eval/<name>/``), the report
gains a "Post-training quantization" section and ``quantization.csv`` / ``evaluations.csv``.

The folder is created with ``mkdir`` (never ``exist_ok``): when ``analysis``
exists the next free ``analysis_2``, ``analysis_3``, ... is used, so an earlier
report is never overwritten, even by two analyses started at once.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd

from stackwise_bench.analysis.pipeline import StudyAnalysis
from stackwise_bench.analysis.read.directions import WORDS, range_of
from stackwise_bench.analysis.read.formatting import booktabs_table, markdown_table
from stackwise_bench.analysis.read.grouping import format_value
from stackwise_bench.analysis.report.headline import CLIPPED, CLIPPED_NOTE, best_cell_sentence, headline_table
from stackwise_bench.analysis.report.sections import comparisons_md, dynamics_md, other_metrics_md, unfinished_md
from stackwise_bench.analysis.studies.energy import energy_md
from stackwise_bench.analysis.studies.expectations import validation_md
from stackwise_bench.analysis.studies.glue import glue_average_md
from stackwise_bench.analysis.studies.quantization_report import quantization_md
from stackwise_bench.analysis.studies.regimes_report import regimes_md
from stackwise_bench.analysis.studies.scaling import scaling_md
from stackwise_bench.analysis.studies.view import view_md
from stackwise_bench.analysis.studies.zero_shot import zero_shot_md
from stackwise_bench.runs import jsonsafe
from stackwise_bench.runs.contract import SUMMARY
from stackwise_bench.runs.files import claim_new_dir

IQM_NOTE = (
    "\nIQM: interquartile mean (the mean of the middle 50% of the runs), with a 95% percentile interval from "
    "resampling runs within each task (the varying keys outside the cells).\n"
)


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
    headline = headline_table(a.summary, a.comparisons, a.metric, a.group_by, a.baseline, runs=a.runs, iqm=a.iqm)
    (out_dir / "table.tex").write_text(booktabs_table(headline, _caption(a)))
    if len(a.quantization):
        a.quantization.to_csv(out_dir / "quantization.csv", index=False)
        a.quantized.to_csv(out_dir / "evaluations.csv", index=False)
    if len(a.zero_shot):
        a.zero_shot.to_csv(out_dir / "zero_shot.csv", index=False)
    if len(a.glue):
        a.glue.to_csv(out_dir / "glue.csv", index=False)
    if len(a.iqm):
        a.iqm.to_csv(out_dir / "iqm.csv", index=False)
    if a.scaling is not None:
        a.scaling.table.to_csv(out_dir / "scaling.csv", index=False)
    if a.regimes is not None:
        a.regimes.table.to_csv(out_dir / "regimes.csv", index=False)
    for view in (v for v in a.views if hasattr(v, "importances")):  # a hyperparameter search's trials
        view.trials.to_csv(out_dir / "search_trials.csv", index=False)
    if a.validation is not None:
        (out_dir / "validation.json").write_text(jsonsafe.dumps(a.validation, indent=2) + "\n")
    figures = {}
    if plots:
        from stackwise_bench.analysis.plots.figures import make_plots

        figures = make_plots(a, out_dir / "plots")
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
        + "\n"
        + methods_line(a, headline)
        + _paragraph(best_cell_sentence(a.summary, a.metric, a.direction, a.comparisons))
        + (IQM_NOTE if len(a.iqm) else "")
        + energy_md(a.runs, headline),
        scaling_md(a.scaling) if a.scaling is not None else "",
        regimes_md(a.regimes) if a.regimes is not None else "",
        comparisons_md(a),
        unfinished_md(a),
        dynamics_md(a),
    ]
    parts += [view_md(v) for v in a.views] + [quantization_md(a.quantization, a.quantized, a.group_by)]
    parts += [zero_shot_md(a.zero_shot, a.group_by), glue_average_md(a.glue, a.group_by)]
    parts += [other_metrics_md(a), validation_md(a.validation), _figures_md(figures, out_dir), _files_md(a)]
    return "\n".join(p for p in parts if p)


def _paragraph(text: str) -> str:
    return f"\n{text}" if text else ""


def methods_line(a: StudyAnalysis, headline: pd.DataFrame) -> str:
    """What the headline table's numbers are: the interval's method for this metric, Δ and p where shown."""
    text = "mean ± std over seeds; 95% CI: " + interval_method(range_of(a.runs, a.metric))
    n = len(a.comparisons)
    if n:
        holm = f"Holm–Bonferroni adjusted across all {n} comparisons" if n > 1 else "one comparison: no adjustment"
        text += f"; Δ is cell − baseline [95% t-interval]; p is the raw p-value ({holm})"
    text += ".\n"
    if "95% CI" in headline and headline["95% CI"].astype(str).str.contains(CLIPPED, regex=False).any():
        text += f"\n{CLIPPED_NOTE}\n"
    return text


def interval_method(bounds) -> str:
    """How :func:`~stackwise_bench.analysis.stats.seeds.range_interval` makes a metric's interval, in words."""
    low, high = bounds
    if low is None and high is None:
        return "t-interval of the mean (the metric's range is not known)"
    if low is not None and high is not None:
        where = f"[{low:g}, {high:g}]"
    else:
        where = f"≥ {low:g}" if low is not None else f"≤ {high:g}"
    return f"t-interval of the mean, cut at the metric's range ({where}; a cut end is marked *)"


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
        f"- runs: {len(a.runs)} ({status}"
        + (f"; {len(a.diverged)} of them diverged" if len(a.diverged) else "")
        + "); statistics use finished runs (completed, early_stopped)",
        f"- cells grouped by: {', '.join(a.group_by) or '(none: all runs form one cell)'}",
        f"- seeds: {_seed_list(seeds)}",
        f"- headline metric: {a.metric} ({WORDS.get(a.direction, 'no recorded direction: read as higher is better')})",
        f"- baseline: {base}" + (" (chosen automatically; set baseline=key=value)" if a.baseline_auto else ""),
        "",
    ]
    return "\n".join(lines)


def _warnings_md(a: StudyAnalysis) -> str:
    if not a.warnings:
        return ""
    return "## Warnings\n\n" + "".join(f"- {w}\n" for w in a.warnings)


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
    if len(a.zero_shot):
        files.append("zero_shot.csv (zero-shot tasks per cell, task and metric, with each metric's direction)")
    if len(a.glue):
        files.append("glue.csv (the GLUE average per cell less the task: seed statistics, the tasks averaged)")
    if len(a.iqm):
        files.append("iqm.csv (interquartile mean per cell with its stratified-bootstrap interval)")
    if a.scaling is not None:
        files.append(f"scaling.csv (E + A·x^(−α) along {a.scaling.axis} per stratum, with 95% intervals)")
    if a.regimes is not None:
        files.append("regimes.csv (per regime arm: FLOPs, FLOPs to target and its ratio, the equal-compute test)")
    if any(hasattr(v, "importances") for v in a.views):
        files.append("search_trials.csv (the hyperparameter search: every trial's params, objective, state, folder)")
    if len(a.quantization):
        files += [
            "quantization.csv (post-training quantization per cell and settings)",
            "evaluations.csv (the evaluation records used, one per run and settings)",
        ]
    return "## Files\n\n" + "".join(f"- {f}\n" for f in files)


def _caption(a: StudyAnalysis) -> str:
    base = ", ".join(f"{k}={format_value(v)}" for k, v in a.baseline.items())
    text = f"{a.metric} per cell: mean ± std over seeds and 95% interval within the metric's range"
    if base:
        text += f"; Δ to the baseline ({base}) with its 95% interval, test and p (Holm-adjusted)"
    return text + "."


def _seed_list(seeds: list[str]) -> str:
    if not seeds:
        return "unknown"
    return ", ".join(seeds) if len(seeds) <= 12 else f"{len(seeds)} seeds ({seeds[0]} … {seeds[-1]})"


def _natural(s: str):
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)
