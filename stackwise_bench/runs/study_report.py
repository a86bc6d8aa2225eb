"""What a launch prints: the plan (``plan=true``), the closing table of every job, the command that analyses it."""

from __future__ import annotations

import shlex
from pathlib import Path

from omegaconf import DictConfig

from stackwise_bench.runs.folders import shown_path
from stackwise_bench.runs.naming import SINGLE
from stackwise_bench.values import short_number


def print_plan(sweep_dir: Path, planned: dict) -> None:
    width = max([len(n) for n in planned] + [3])
    print(f"plan for {sweep_dir} ({len(planned)} jobs):")
    print(f"  {'job'.ljust(width)}  state")
    for name, job in planned.items():
        print(f"  {name.ljust(width)}  {job['state']}")
    counts: dict[str, int] = {}
    for job in planned.values():
        counts[job["state"]] = counts.get(job["state"], 0) + 1
    print("  " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))


def results_table(sweep_dir: Path, outcomes: dict[str, dict]) -> str:
    """The closing table of a launch: every job with how it ended, its headline test metric and its wall time."""
    metric = next((o["metric"]["name"] for o in outcomes.values() if o.get("metric")), "test.top1")
    rows = [
        (
            name or SINGLE,
            shown_status(o),
            short_number(o["metric"]["value"]) if (o.get("metric") or {}).get("value") is not None else "-",
            "-" if o["status"] == "skipped" or o.get("wall_s") is None else wall_time(o["wall_s"]),
        )
        for name, o in outcomes.items()
    ]
    head = ("job", "status", metric.replace(".", " "), "time")
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(4)]
    lines = [f"study {sweep_dir}: {len(rows)} jobs"]
    for row in (head, *rows):
        cells = [str(v).ljust(w) if i < 2 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells))
    return "\n".join(line.rstrip() for line in lines)


def shown_status(outcome: dict) -> str:
    """A job's status as the table shows it: ``skipped`` says why, a diverged failure says diverged."""
    status, reason = outcome["status"], outcome.get("reason") or ""
    if status == "skipped":
        return "skipped (already done)"
    if status == "failed" and reason.startswith("diverged"):
        return "diverged"
    return status


def wall_time(seconds: float) -> str:
    """``12.3s``, ``4m05s``, ``2h03m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def analyze_command(config: DictConfig) -> str:
    """The one command that analyses the study (an evaluation study's: the runs it evaluated)."""
    runs = (config.get("evaluate") or {}).get("runs") if "evaluate" in config else None
    return f"python -m stackwise_bench.analyze runs={shlex.quote(shown_path(runs or config.hydra.sweep.dir))}"
