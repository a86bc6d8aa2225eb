"""One call from run folders to every table of a study: :func:`analyze_runs`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from stackwise_bench.analysis.read.collect import (
    collect_epochs,
    collect_hardware,
    collect_runs,
    drop_duplicate_runs,
    duplicate_warnings,
    override_keys,
)
from stackwise_bench.analysis.read.diagnostics import collect_diagnostics
from stackwise_bench.analysis.read.directions import (
    check_direction,
    direction_of,
    range_of,
    task_metrics,
    task_units,
)
from stackwise_bench.analysis.read.directions import tasks as task_records
from stackwise_bench.analysis.read.dynamics import dynamics_columns, run_dynamics
from stackwise_bench.analysis.read.formatting import count
from stackwise_bench.analysis.read.grouping import check_group_by, default_group_by, format_value
from stackwise_bench.analysis.stats.compare import MIN_SEEDS, compare_to_baseline, resolve_baseline
from stackwise_bench.analysis.stats.power_law import N_BOOT
from stackwise_bench.analysis.stats.robust import iqm_table
from stackwise_bench.analysis.stats.seeds import seed_stats
from stackwise_bench.analysis.studies.expectations import check_expectations, load_expectations, summarize_validation
from stackwise_bench.analysis.studies.glue import glue_average
from stackwise_bench.analysis.studies.optimizer import optimizer_study
from stackwise_bench.analysis.studies.peft import peft_study
from stackwise_bench.analysis.studies.precision import precision_study
from stackwise_bench.analysis.studies.quantization import (
    collect_evaluations,
    evaluation_warnings,
    quantization_table,
    quantized_evaluations,
)
from stackwise_bench.analysis.studies.regimes import RegimeAnalysis, analyze_regimes
from stackwise_bench.analysis.studies.scaling import ScalingAnalysis, analyze_scaling
from stackwise_bench.analysis.studies.search import search_views
from stackwise_bench.analysis.studies.view import StudyView
from stackwise_bench.analysis.studies.zero_shot import zero_shot_records, zero_shot_table
from stackwise_bench.errors import ConfigError
from stackwise_bench.runs.contract import FINISHED, IMAGE_CLASSIFICATION
from stackwise_bench.runs.folders import PathsLike, as_path_list

# Summarised for every cell besides the chosen metric, where the runs have them; {m}: each task's metric.
TASK_METRICS = ("test.{m}", "train.best_val_{m}")
DEFAULT_METRICS = (
    "test.top1",
    "test.top5",
    "test.f1_macro",
    "train.best_val_top1",
    "train.time_s",
    "train.img_s",
    "params.trainable",
    "resources.peak_rss_mb",
)
IMAGE_TASK = IMAGE_CLASSIFICATION["name"]
MAX_LISTED = 6  # more incomplete cells than this: one summary line instead of one line each
# The headline metric when none is given: the first with values, for each task metric (top1, mse) in turn.
METRIC_FALLBACKS = ("test.{m}", "train.best_val_{m}", "train.final_val_{m}")
AGGREGATES = ("mean", "iqm")


@dataclass
class StudyAnalysis:
    """Everything :func:`analyze_runs` computed; ``write_report`` turns it into files."""

    paths: list[Path]
    runs: pd.DataFrame
    epochs: pd.DataFrame
    hardware: pd.DataFrame
    group_by: list[str]
    metric: str
    baseline: dict
    baseline_auto: bool
    summary: pd.DataFrame
    comparisons: pd.DataFrame
    dynamics: pd.DataFrame
    dynamics_summary: pd.DataFrame
    views: list[StudyView] = field(default_factory=list)
    validation: dict | None = None
    warnings: list[str] = field(default_factory=list)
    # Evaluation records (<run>/eval/<name>/): all of them, the quantized ones used, and their table.
    evaluations: pd.DataFrame = field(default_factory=pd.DataFrame)
    quantized: pd.DataFrame = field(default_factory=pd.DataFrame)
    quantization: pd.DataFrame = field(default_factory=pd.DataFrame)
    # Zero-shot task records (evaluate zero_shot.task=...): one row per record and metric, and their table.
    zero_shot_records: pd.DataFrame = field(default_factory=pd.DataFrame)
    zero_shot: pd.DataFrame = field(default_factory=pd.DataFrame)
    # A study over several GLUE tasks: per cell less the task, the GLUE average's seed statistics.
    glue: pd.DataFrame = field(default_factory=pd.DataFrame)
    # Per-layer diagnostics (diagnostics.jsonl), long: one row per run, step, layer and statistic.
    diagnostics: pd.DataFrame = field(default_factory=pd.DataFrame)
    # Runs of one config and seed found more than once (collect.drop_duplicate_runs): counted once.
    duplicates: list[dict] = field(default_factory=list)
    # aggregate="iqm": per cell the interquartile mean of the metric and its stratified-bootstrap interval.
    aggregate: str = "mean"
    iqm: pd.DataFrame = field(default_factory=pd.DataFrame)
    # scaling=<axis>: the fits of error = E + A·x^(−α) along the axis, one per stratum.
    scaling: ScalingAnalysis | None = None
    # A depth-as-time study (the runs vary regime=): FLOPs to a target accuracy and the equal-compute tests.
    regimes: RegimeAnalysis | None = None
    # max or min: which way the headline metric is better (read.directions), None where nothing says.
    direction: str | None = None

    @property
    def unfinished(self) -> pd.DataFrame:
        """Runs that failed, were interrupted, are running or unreadable: listed, not in the statistics."""
        return self.runs[~self.runs["status"].isin(FINISHED)]

    @property
    def diverged(self) -> pd.DataFrame:
        """The unfinished runs that diverged (a NaN/inf loss or weight: ``collect_runs``' column): listed apart."""
        u = self.unfinished
        return u[u["diverged"].eq(True)] if "diverged" in u else u.iloc[:0]


def analyze_runs(
    paths: PathsLike,
    *,
    metric: str | None = None,
    baseline=None,
    group_by: list[str] | None = None,
    expect: str | Path | None = None,
    aggregate: str = "mean",
    scaling: str | None = None,
    n_boot: int = N_BOOT,
    target: float | None = None,
) -> StudyAnalysis:
    """Collect the runs below ``paths`` and compute statistics, comparisons, dynamics and views.

    Args:
        paths: run or study folders (one or a list).
        metric: the headline metric column (default: ``test.<the task's metric>``, e.g. ``test.top1``, else
            its best validation value); which way it is better comes from the runs' ``task`` records.
        baseline: ``"precision=fp32"`` or ``{"precision": "fp32"}``; default: ``regime=classical_matched``,
            ``lora.rank=0``, ``precision=fp32`` or ``optimizer=sgd`` when that key is a grouping key.
        group_by: cell keys (default: every varying override key except the seed).
        expect: an expectations YAML file, checked into ``validation``.
        aggregate: ``"mean"`` (mean ± std, t-intervals) or ``"iqm"`` (adds the interquartile mean with
            stratified-bootstrap intervals; tasks are the varying keys outside ``group_by``).
        scaling: a numeric axis (``lora.rank``, ``params.trainable``) to fit error = E + A·x^(−α) along.
        n_boot: bootstrap resamples for the IQM, P(X > Y) and scaling intervals.

    Raises:
        ConfigError: no runs, an unknown metric / group_by / baseline key / scaling axis, a bad aggregate,
            a bad expectations file.
    """
    if aggregate not in AGGREGATES:
        raise ConfigError(f"aggregate={aggregate} is not one of {', '.join(AGGREGATES)}; use aggregate=iqm or mean.")
    expectations = load_expectations(expect) if expect else None
    runs = collect_runs(paths)
    metric = choose_metric(runs, metric)
    direction_notes = check_direction(runs, metric)
    runs, duplicates = drop_duplicate_runs(runs, metric)
    group_by = check_group_by(runs, group_by)
    base = resolve_baseline(runs, baseline, group_by)
    group_by += [k for k in base if k not in group_by]
    scaled = analyze_scaling(runs, scaling, metric, group_by, n_boot=n_boot) if scaling else None
    epochs, hardware = collect_epochs(runs), collect_hardware(runs)
    per_task = [c.format(m=m) for m in task_metrics(runs) for c in TASK_METRICS]
    per_task += [f"train.{unit}_s" for unit in task_units(runs)]
    # every test metric a task records beside its headline (a language model's perplexity and bits per byte);
    # image classification's own are in DEFAULT_METRICS already
    per_task += [
        f"test.{k}"
        for task, _ in task_records(runs)
        if task.get("name") != IMAGE_TASK
        for k in task.get("directions", {})
    ]
    metrics = [metric] + [m for m in dict.fromkeys([*DEFAULT_METRICS, *per_task]) if m != metric and m in runs]
    summary = seed_stats(runs, metrics, group_by)
    tasks = [k for k in default_group_by(runs) if k not in group_by]
    comparisons = compare_to_baseline(runs, metric, base, group_by, task_keys=tasks)
    dynamics = run_dynamics(runs, epochs)
    dyn_cols = [c for c in dynamics_columns(task_metrics(runs)[0]) if dynamics[c].notna().any()]
    analysis = StudyAnalysis(
        paths=as_path_list(paths),
        runs=runs,
        epochs=epochs,
        hardware=hardware,
        group_by=group_by,
        metric=metric,
        baseline=base,
        baseline_auto=bool(base) and not baseline,
        summary=summary,
        comparisons=comparisons,
        dynamics=dynamics,
        dynamics_summary=seed_stats(dynamics, dyn_cols, group_by, ranges={c: range_of(runs, c) for c in dyn_cols}),
        duplicates=duplicates,
        aggregate=aggregate,
        scaling=scaled,
        regimes=analyze_regimes(runs, epochs, group_by, target=target),
        direction=direction_of(runs, metric),
    )
    if aggregate == "iqm":
        analysis.iqm = iqm_table(runs, metric, group_by, tasks, n_boot=n_boot)
    analysis.views = [
        v
        for v in (
            precision_study(runs, dynamics, epochs, group_by, metric),
            peft_study(summary, runs, metric, group_by),
            optimizer_study(summary, runs, metric, group_by),
        )
        if v is not None
    ]
    analysis.views += search_views(analysis.paths, runs)  # a hyperparameter search: its trials, best, importances
    analysis.diagnostics = collect_diagnostics(runs)
    analysis.evaluations = collect_evaluations(runs)
    analysis.quantized = quantized_evaluations(analysis.evaluations, runs, group_by)
    analysis.quantization = quantization_table(analysis.quantized, runs, group_by)
    analysis.zero_shot_records = zero_shot_records(runs)
    analysis.zero_shot = zero_shot_table(analysis.zero_shot_records, runs, group_by)
    analysis.glue = glue_average(runs, group_by)
    if expectations is not None:
        analysis.validation = summarize_validation(check_expectations(runs, expectations, group_by))
    analysis.warnings = direction_notes + _warnings(analysis, explicit_baseline=baseline is not None)
    return analysis


def choose_metric(runs: pd.DataFrame, metric: str | None) -> str:
    """The requested metric, checked to be a numeric column; else the first fallback with values."""
    keys = set(override_keys(runs)) | {"run_dir", "status", "seed"}
    numeric = [
        c
        for c in runs.columns
        if c not in keys
        and not pd.api.types.is_bool_dtype(runs[c])
        and (pd.api.types.is_numeric_dtype(runs[c]) or runs[c].isna().all())
    ]
    if metric is None:
        fallbacks = [c.format(m=m) for m in task_metrics(runs) for c in METRIC_FALLBACKS]
        for m in fallbacks:
            if m in runs and runs.loc[runs["status"].isin(FINISHED), m].notna().any():
                return m
        return fallbacks[0] if fallbacks[0] in runs else (numeric or fallbacks)[0]
    if metric not in numeric:
        shown = ", ".join(c for c in numeric if c.startswith(("test.", "train.")))[:300]
        raise ConfigError(f"metric={metric} is not a numeric column of these runs; choose e.g. one of {shown}.")
    return metric


def mixed_architecture_warnings(summary: pd.DataFrame) -> list[str]:
    """One sentence per cell whose runs were tested with models of different sizes (``mixed_params``)."""
    if "mixed_params" not in summary:
        return []
    return [
        f"cell {r['group']} averages runs tested with different architectures: {r['mixed_params']} parameters "
        "(test.checkpoint_params.total, else params.total); its mean and interval mix models: analyse them "
        "apart (group_by=...) or check which checkpoint each run tested."
        for _, r in summary.iterrows()
        if r["mixed_params"]
    ]


def _warnings(a: StudyAnalysis, explicit_baseline: bool) -> list[str]:
    out = duplicate_warnings(a.duplicates)
    if len(a.diverged):
        out.append(
            f"{count(len(a.diverged), 'run')} diverged (a NaN or infinite loss or weight): listed under "
            "'Diverged runs', left out of the statistics."
        )
    others = a.unfinished.drop(index=a.diverged.index)
    if len(others):
        counts = others["status"].value_counts()
        what = ", ".join(f"{n} {s}" for s, n in counts.items())
        out.append(
            f"{count(len(others), 'run')} not finished ({what}): listed under 'Runs not included', left out of "
            "the statistics."
        )
    s = a.summary[a.summary["metric"] == a.metric] if len(a.summary) else a.summary
    if len(s) and s["n"].max() == 0:
        out.append(f"no finished run has {a.metric}: nothing to summarise.")
    elif len(s):
        incomplete = s[s["incomplete"]]
        if len(incomplete) > MAX_LISTED:
            out.append(
                f"{len(incomplete)} of {len(s)} cells are incomplete (fewer seeds than the fullest cell, "
                f"{int(s['n'].max())}): see the flags in the table."
            )
        for _, r in incomplete.iterrows() if len(incomplete) <= MAX_LISTED else ():
            out.append(
                f"cell {r['group']} is incomplete: {int(r['n'])} of {int(s['n'].max())} seeds"
                + (f" (missing {r['missing_seeds']})" if r["missing_seeds"] else "")
                + "."
            )
        if s["n"].max() < MIN_SEEDS:
            every = "every cell has" if len(s) > 1 else "the cell has"
            out.append(
                f"{every} fewer than {MIN_SEEDS} seeds: intervals are very wide and the tests "
                "cannot tell real differences from seed noise; run more seeds."
            )
        out += mixed_architecture_warnings(s)
    if not a.baseline:
        if len(s) > 1:
            out.append(
                "no baseline: set baseline=key=value (e.g. baseline=precision=fp32) to compare cells."
                if not explicit_baseline
                else "baseline is empty: no comparisons."
            )
    elif a.comparisons.empty:
        key = ", ".join(f"{k}={format_value(v)}" for k, v in a.baseline.items())
        out.append(f"baseline {key}: no other cell to compare with.")
    elif "note" in a.comparisons:
        few = a.comparisons["note"].fillna("").str.contains("seeds on one side|seed on one side")
        if few.any():
            n = int(few.sum())
            have = "has" if n == 1 else "have"
            out.append(f"{count(n, 'comparison')} {have} too few seeds to mean anything (see the notes).")
    return out + evaluation_warnings(a.evaluations, a.quantized, a.runs)
