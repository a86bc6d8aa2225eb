"""Seaborn figures of a study, written as PNG files.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never
through pyplot: nothing global changes, so a notebook keeps its own backend and
no window ever opens. Each function returns the path it wrote, or ``None``
when the runs lack the data (e.g. no LoRA rank sweep, no hardware samples).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stackwise_bench.analysis.pipeline import StudyAnalysis
from stackwise_bench.analysis.plots import drawing
from stackwise_bench.analysis.plots.curves import hardware_use, learning_curves, lr_schedule, throughput
from stackwise_bench.analysis.plots.layers import grad_norm_heatmap
from stackwise_bench.analysis.plots.peft import peft_pareto
from stackwise_bench.analysis.plots.regimes import accuracy_vs_flops
from stackwise_bench.analysis.plots.scaling import scaling_figure
from stackwise_bench.analysis.plots.search import search_objective
from stackwise_bench.analysis.read.collect import collect_steps
from stackwise_bench.analysis.read.directions import best_index, lower_is_better, task_metrics
from stackwise_bench.analysis.read.grouping import format_value
from stackwise_bench.analysis.studies.adapters import RANKLESS
from stackwise_bench.analysis.studies.quantization_report import format_label, settings_label
from stackwise_bench.runs.contract import FINISHED, read_summary


def make_plots(a: StudyAnalysis, out_dir: Path) -> dict[str, Path]:
    """Every figure the analysis ``a`` allows, into ``out_dir``; returns ``{title: path}``."""
    import seaborn as sns  # ~1 s import: only when plotting

    sns.set_theme(style="whitegrid", context="notebook")
    out_dir.mkdir(parents=True, exist_ok=True)
    done = lambda df: df[df["status"].isin(FINISHED)] if len(df) else df  # noqa: E731
    group_by, metric, summary = a.group_by, a.metric, a.summary
    lower = lower_is_better(a.runs, metric)
    peft = next((v for v in a.views if v.title.startswith("PEFT")), None)
    quality = "Loss" if lower else "Accuracy"  # the headings say what is drawn: a language model's loss
    search = next((v for v in a.views if hasattr(v, "importances")), None)
    jobs = {
        "Learning curves": lambda: learning_curves(
            done(a.epochs), group_by, out_dir / "learning_curves.png", metrics=task_metrics(a.runs)
        ),
        "Learning-rate schedule": lambda: lr_schedule(
            done(a.epochs), group_by, out_dir / "lr_schedule.png", steps=collect_steps(done(a.runs))
        ),
        f"{quality} vs LoRA rank": lambda: accuracy_vs_rank(
            summary, metric, group_by, out_dir / "accuracy_vs_rank.png", lower=lower
        ),
        "Scaling fit": lambda: scaling_figure(a.scaling, out_dir / "scaling.png"),
        f"{quality} vs training FLOPs": lambda: accuracy_vs_flops(
            a.regimes, done(a.epochs), out_dir / "accuracy_vs_flops.png"
        ),
        f"{quality} vs trainable parameters": lambda: accuracy_vs_params(
            summary, done(a.runs), metric, group_by, out_dir / "accuracy_vs_params.png", lower=lower
        ),
        "PEFT methods: metric vs trainable parameters (Pareto frontier)": lambda: peft_pareto(
            peft, metric, out_dir / "peft_pareto.png", lower=lower
        ),
        "Time per epoch and throughput": lambda: throughput(
            done(a.dynamics), done(a.runs), group_by, out_dir / "throughput.png"
        ),
        "Hardware use over time": lambda: hardware_use(done(a.hardware), group_by, out_dir / "hardware.png"),
        "Per-layer gradient norms": lambda: grad_norm_heatmap(
            done(a.diagnostics), group_by, out_dir / "grad_norms.png"
        ),
        "Confusion matrix of the best run": lambda: confusion_matrix(
            done(a.runs), metric, group_by, out_dir / "confusion_matrix.png", lower=lower
        ),
        "Post-training quantization": lambda: quantization_degradation(
            a.quantized, group_by, out_dir / "quantization.png"
        ),
        "Hyperparameter search: objective per trial": lambda: search_objective(
            search, out_dir / "search_objective.png"
        ),
    }
    written = {}
    for title, job in jobs.items():
        path = job()
        if path is not None:
            written[title] = path
    return written


def accuracy_vs_rank(
    summary: pd.DataFrame, metric: str, group_by: list[str], path: Path, lower: bool = False
) -> Path | None:
    """Mean metric per LoRA rank with 95% t-intervals (rank 0 = full fine-tuning)."""
    if "lora.rank" not in group_by or summary.empty:
        return None
    s = summary[(summary["metric"] == metric) & summary["mean"].notna()].copy()
    if s["lora.rank"].nunique() < 2:
        return None
    others = [k for k in group_by if k != "lora.rank"]
    s = drawing.labelled(s, others, "series")
    s["rank_num"] = pd.to_numeric(s["lora.rank"], errors="coerce")
    rankless = s["lora.method"].isin(RANKLESS) if "lora.method" in s else pd.Series(False, index=s.index)
    ranks = sorted(s.loc[~rankless, "rank_num"].dropna().unique())
    pos = {r: i for i, r in enumerate(ranks)}
    fig, axes = drawing.figure(1, 1, width=7)
    ax = axes[0]
    looks = drawing.styles(list(dict.fromkeys(s["series"])))
    for series, part in s[rankless].groupby("series", sort=False):  # IA3, OFT: no rank, a level across the axis
        look = {k: v for k, v in looks[series].items() if k == "color"}
        ax.axhline(part["mean"].mean(), linestyle=":", label=f"{series} (no rank)", **look)
    for series, part in s[~rankless].groupby("series", sort=False):
        part = part.sort_values("rank_num")
        x = part["rank_num"].map(pos).to_numpy(dtype=float)
        err = drawing.yerr(part)
        ax.errorbar(x, part["mean"], yerr=err, capsize=4, label=series, **looks[series])
    ax.set_xticks(range(len(ranks)), ["0\n(full FT)" if r == 0 else f"{r:g}" for r in ranks])
    ax.set(xlabel="LoRA rank r", ylabel=drawing.metric_label(metric, lower))
    drawing.legend(fig, [ax], s, column="series")
    return drawing.save(fig, path, f"{metric} vs LoRA rank (mean, 95% t-interval over seeds)")


def accuracy_vs_params(
    summary: pd.DataFrame, runs: pd.DataFrame, metric: str, group_by: list[str], path: Path, lower: bool = False
) -> Path | None:
    """Mean metric vs mean trainable parameters per cell (95% t-intervals); the efficient frontier dashed.

    A cell is on the frontier when no cell with fewer parameters is better (``lower``: a smaller metric is).

    With a LoRA rank sweep, one colour per combination of the other keys and points labelled by rank.
    """
    if "params.trainable" not in runs or summary.empty or runs["params.trainable"].nunique() < 2:
        return None
    s = summary[(summary["metric"] == metric) & summary["mean"].notna()].copy()
    params = drawing.labelled(runs, group_by).groupby("group")["params.trainable"].mean()
    s = drawing.labelled(s, group_by)  # the same labels as params' (the summary's own are unshortened)
    s["trainable"] = s["group"].map(params)
    s = s.dropna(subset=["trainable"]).sort_values("trainable")
    if len(s) < 2:
        return None
    by_rank = "lora.rank" in group_by
    series_keys = [k for k in group_by if k != "lora.rank"] if by_rank else []
    s = drawing.labelled(s, series_keys, "series")
    colors = drawing.seaborn().color_palette("tab10", max(1, s["series"].nunique()))
    fig, axes = drawing.figure(1, 1, width=7.5)
    ax = axes[0]
    for color, (series, part) in zip(colors, s.groupby("series", sort=False)):
        ax.errorbar(
            part["trainable"],
            part["mean"],
            yerr=drawing.yerr(part),
            fmt="o",
            capsize=4,
            color=color,
            label=series if series_keys else None,
        )
        frontier = part[part["mean"] <= part["mean"].cummin()] if lower else part[part["mean"] >= part["mean"].cummax()]
        ax.plot(frontier["trainable"], frontier["mean"], "--", color=color, alpha=0.6)
        if len(part) <= 12:
            for _, row in part.iterrows():
                text = (
                    ("full FT" if row["lora.rank"] == 0 else f"r={format_value(row['lora.rank'])}")
                    if by_rank
                    else row["group"]
                )
                ax.annotate(
                    text, (row["trainable"], row["mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points"
                )
    if s["trainable"].max() > 10 * s["trainable"].min():
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="Trainable parameters (count, log scale)")
    else:
        ax.set(xlabel="Trainable parameters (count)")
    ax.set(ylabel=drawing.metric_label(metric, lower))
    if series_keys:
        drawing.legend(fig, [ax], s, column="series")
    return drawing.save(fig, path, f"{metric} vs trainable parameters (95% CI; dashed: frontier)")


def confusion_matrix(
    runs: pd.DataFrame, metric: str, group_by: list[str], path: Path, lower: bool = False
) -> Path | None:
    """Row-normalised test confusion matrix (%) of the run with the best ``metric`` (the smallest if ``lower``)."""
    best = best_index(runs[metric], lower) if metric in runs else None
    if best is None:
        return None
    best = runs.loc[best]
    cm = (read_summary(best["run_dir"]) or {}).get("test", {}).get("confusion_matrix")
    if not cm:
        return None
    cm = np.asarray(cm, dtype=float)
    pct = 100 * cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    size = min(12, 3 + 0.45 * len(cm))
    fig, axes = drawing.figure(1, 1, width=size + 1.5, height=size)
    drawing.seaborn().heatmap(
        pct,
        ax=axes[0],
        cmap="Blues",
        vmin=0,
        vmax=100,
        square=True,
        annot=len(cm) <= 12,
        fmt=".0f",
        cbar_kws={"label": "Share of true class (%)"},
    )
    axes[0].set(xlabel="Predicted class", ylabel="True class")
    name = drawing.short_label(best, group_by) + f", seed {format_value(best['seed'])}"
    return drawing.save(fig, path, f"Test confusion matrix of the best run ({name}: {metric} = {best[metric]:.2f})")


def quantization_degradation(quantized: pd.DataFrame | None, group_by: list[str], path: Path) -> Path | None:
    """Top-1 points lost per quantization setting and cell (bars = mean, whiskers = ±1 std over seeds)."""
    if quantized is None or quantized.empty:
        return None
    data = drawing.labelled(quantized, group_by)
    data = data.sort_values(["quantize", "activations", "keep_head"], ascending=[True, True, False], kind="stable")
    data["setting"] = [
        "\n".join([format_label(r["quantize"], r.get("group_size")), *settings_label(r).split(", ")])
        for _, r in data.iterrows()
    ]
    data["degradation"] = data["top1_before"] - data["top1_after"]
    hue = "group" if group_by else None
    fig, axes = drawing.figure(1, 1, width=max(5.0, 2.0 * data["setting"].nunique() + 3))
    drawing.seaborn().barplot(
        data=data,
        x="setting",
        y="degradation",
        hue=hue,
        errorbar="sd",
        ax=axes[0],
        order=list(dict.fromkeys(data["setting"])),
        hue_order=drawing.group_order(data) if hue else None,
        legend=hue is not None,
    )
    axes[0].axhline(0, color="black", linewidth=0.8)
    axes[0].set(xlabel="Quantization", ylabel="Top-1 lost (points; negative = gained)")
    if axes[0].get_legend() is not None:
        axes[0].get_legend().remove()
    if hue:
        drawing.legend(fig, axes, data)
    return drawing.save(fig, path, "Post-training quantization: test top-1 lost per setting (mean, ±1 std over seeds)")
