"""The benchmark's output: the table of figures, whether each met its goal, the machine, and the JSON report."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def met(row: dict) -> str:
    """Whether the row met its goal (such as ">= 0.97"): "yes", "NO", or empty when it has none."""
    goal = row.get("goal") or ""
    if not goal or "ratio" not in row:
        return ""
    op, value = goal.split()
    ok = row["ratio"] >= float(value) if op == ">=" else row["ratio"] <= float(value)
    return "yes" if ok else "NO"


def cell(value: float | None, unit: str) -> str:
    """A median with its unit, to 3 significant digits below 100."""
    if value is None:
        return ""
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"


def table(rows: list[dict]) -> str:
    """The fixed-width table of rows (a failed or skipped figure gets its one sentence)."""
    lines = [f"{'figure':<9} {'setting':<84} {'A':>13} {'B':>13} {'A/B':>6} {'[min-max]':>13} {'goal':>7} {'met':>3}"]
    for r in rows:
        if "error" in r or r.get("skipped"):
            lines.append(f"{r['figure']:<9} {r.get('error') or r['setting']}")
            continue
        extra = "".join(f"; {k} {v:.1%}" for k, v in r.items() if k.startswith("mfu_") and v is not None)
        extra += f"; 1st compile {r['compile_s']:.0f} s" if "compile_s" in r else ""
        lines.append(
            f"{r['figure']:<9} {r['setting'] + extra:<84} {cell(r['a_median'], r['unit']):>13} "
            f"{cell(r['b_median'], r['unit']):>13} {r['ratio']:>6.2f} "
            f"{'[' + format(r['ratio_min'], '.2f') + '-' + format(r['ratio_max'], '.2f') + ']':>13} "
            f"{r['goal']:>7} {met(r):>3}"
        )
    return "\n".join(lines)


def machine() -> dict:
    """What the figures were measured on: CPU, cores, threads, torch, CUDA, GPU, Python."""
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, where the platform has them."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def write_report(report: dict, out: Path) -> None:
    """Write the JSON of every figure to ``out`` and print the summary line and the table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    print(
        f"\n{report['mode']} benchmark on {m['gpu'] or m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch "
        f"threads, torch {m['torch']}; load average {report['loadavg_start']} -> {report['loadavg_end']}; "
        f"{report['seconds']:.0f} s\n"
    )
    print(table(report["rows"]))
    print(f"\nA/B: median over repetitions of the per-repetition ratio (arms interleaved). JSON: {out}")
