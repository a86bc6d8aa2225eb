"""Post-training quantization for people: the report's table and section, and the labels of its settings."""

from __future__ import annotations

import pandas as pd

from stackwise_bench.analysis.read.formatting import fmt, fmt_p, markdown_table
from stackwise_bench.analysis.read.grouping import format_value


def baseline_mismatches(quantized: pd.DataFrame) -> list[str]:
    """One line per record whose unquantized re-evaluation differs from the run's recorded test top-1."""
    bad = quantized[quantized["matches_recorded"].astype(object).map(lambda v: v is False)]
    return [
        f"{r['run_dir']} ({r['checkpoint']}): recorded {format_value(r['recorded_test_top1'])}, "
        f"re-evaluated {format_value(r['top1_before'])}"
        for _, r in bad.drop_duplicates("run_dir").iterrows()
    ]


def quantization_display(table: pd.DataFrame, group_by: list[str]) -> pd.DataFrame:
    """The report's rows: cell, format, settings, n, top-1 before/after, degradation, p, weights."""
    rows = []
    for _, r in table.iterrows():
        low, high = r["degradation_ci95_low"], r["degradation_ci95_high"]
        matched = f"{r['baseline_matches']}/{r['n_recorded']}" if r["n_recorded"] else "–"
        row = {"group": r["group"]} if group_by else {}
        row.update(
            {
                "format": format_label(r["quantize"], r["group_size"]),
                "settings": settings_label(r),
                "n": str(int(r["n"])),
                "top-1 before (%)": _mean_std(r["top1_before_mean"], r["top1_before_std"]),
                "top-1 after (%)": _mean_std(r["top1_after_mean"], r["top1_after_std"]),
                "degradation (points)": _mean_std(r["degradation_mean"], r["degradation_std"], signed=True),
                "95% CI": "–" if pd.isna(low) else f"[{fmt(low, signed=True)}, {fmt(high, signed=True)}]",
                "p (Holm)": "–" if pd.isna(r["p_value"]) else f"{fmt_p(r['p_value'])} ({fmt_p(r['p_holm'])})",
                "weights MB before → after": f"{fmt(r['weight_mb_before'], 3)} → {fmt(r['weight_mb_after'], 3)}",
                "compression": f"{fmt(r['compression'])}×",
                "re-eval = recorded": matched,
                "note": r["note"],
            }
        )
        rows.append(row)
    return pd.DataFrame(rows)


def format_label(quantize, group_size=None) -> str:
    """``fp8_e4m3``, ``int8``, ``int4_g32`` (int4 with its group size, as its eval folder is named)."""
    if group_size is None or pd.isna(group_size):
        return str(quantize)
    return f"{quantize}_g{int(group_size)}"


def settings_label(r) -> str:
    """``weights, head kept`` / ``weights + activations, head quantized`` (+ the checkpoint when not best.pt)."""
    parts = [
        "weights + activations" if r["activations"] else "weights",
        "head kept" if r["keep_head"] else "head quantized",
    ]
    if r["checkpoint"] not in (None, "best.pt"):
        parts.append(str(r["checkpoint"]))
    return ", ".join(parts)


def _mean_std(mean: float, std: float, signed: bool = False) -> str:
    return fmt(mean, signed=signed) + ("" if pd.isna(std) else f" ± {fmt(std)}")


def quantization_md(t: pd.DataFrame, quantized: pd.DataFrame, group_by: list[str]) -> str:
    """The report section: the table of :func:`quantization_display` and whether re-evaluations reproduced the runs."""
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
            + "; ".join(baseline_mismatches(quantized)[:5])
            + "."
        )
    return (
        f"## {title}\n\n{len(quantized)} evaluation record(s) of the runs' checkpoints ({formats}), grouped "
        f"by the runs' cells and the quantization settings.\n\n"
        + markdown_table(quantization_display(t, group_by))
        + "\nmean ± std over seeds. Degradation: top-1 before − after quantization (positive = accuracy lost), "
        "with its 95% t-interval and a paired t-test over the seeds (each record measures the same model "
        "before and after; Holm-adjusted across these rows). Weights: every parameter, in MB of 2^20 bytes, "
        "quantized weights counted as stored: FP8 with one scale byte per output channel, int8 with an fp16 scale "
        "per output channel, int4 (format int4_g<group size>) packed two per byte with an fp16 scale and a 4-bit "
        "zero point per group. re-eval = recorded: records whose "
        "unquantized pass matched the run's recorded test top-1, of those with a recorded value.\n\n" + reeval + "\n"
    )
