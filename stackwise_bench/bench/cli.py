"""The benchmark's command: ``python -m stackwise_bench.bench [--quick] [--only NAME,...] [--out PATH]``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import stackwise_bench.bench as package
from stackwise_bench.bench.figures import FIGURES
from stackwise_bench.bench.harness import BUDGETS, Budget
from stackwise_bench.bench.report import loadavg, machine, table, write_report


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure the figures ``--only`` names (default every one), print the table, write the JSON; return the rows."""
    parser = _parser()
    args = parser.parse_args(argv)
    only = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = sorted(set(only) - set(FIGURES))
    if unknown:
        parser.error(f"--only {','.join(unknown)}: not a figure; choose from {','.join(FIGURES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    load = loadavg()
    if load and load[0] > (os.cpu_count() or 1):
        print(
            f"warning: load average {load[0]} exceeds the {os.cpu_count()} cores: other work competes with every "
            "figure (ratios stay paired, but multi-threaded arms suffer more)",
            file=sys.stderr,
        )
    mode = "quick" if args.quick else "full"
    budget = BUDGETS[mode]
    if args.devices:
        budget = dataclasses.replace(budget, devices=args.devices)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = {
        "command": " ".join([_prog(), *(argv if argv is not None else sys.argv[1:])]),
        "mode": mode,
        "budget": dataclasses.asdict(budget),
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": loadavg(),
        "rows": [],
    }
    started = time.perf_counter()
    report["rows"] = _measure(only, budget)
    report.update(seconds=time.perf_counter() - started, loadavg_end=loadavg())
    write_report(report, Path(args.out or Path("multirun") / "benchmark" / f"{mode}.json"))
    return report["rows"]


def _measure(only: list[str], budget: Budget) -> list[dict]:
    """Each figure's rows, in a scratch folder removed afterwards; a figure that fails becomes one error row."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="stackwise-bench-") as tmp:
        for name in only:
            t0 = time.perf_counter()
            try:
                figure_rows = FIGURES[name](budget, Path(tmp))
            except Exception as exc:  # one broken figure must not cost the others
                figure_rows = [
                    {"figure": name, "error": f"{name} failed: {type(exc).__name__}: {str(exc).strip()[:300]}"}
                ]
            for row in figure_rows:
                row["figure_seconds"] = time.perf_counter() - t0
            rows += figure_rows
            print(table(figure_rows).split("\n", 1)[1], file=sys.stderr, flush=True)
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_prog(), description=package.__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller budget: the same figures in a few minutes")
    parser.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated subset of {','.join(FIGURES)}")
    parser.add_argument("--out", default=None, help="JSON path (default multirun/benchmark/<full|quick>.json)")
    parser.add_argument(
        "--devices",
        type=_counts,
        default=None,
        help="device counts of the devices figure, e.g. 1,2,4,8 (default: 1, 2, 4, ... up to the GPUs, or up to "
        "4 CPU processes, at most the cores)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's, all cores)"
    )
    return parser


def _counts(text: str) -> tuple[int, ...]:
    """``--devices 1,2,4``: positive integers."""
    try:
        counts = tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated positive integers, such as 1,2,4")
    return counts


def _prog() -> str:
    """How the benchmark was started: the script's name (scripts/benchmark.py), or ``python -m`` for the package."""
    name = Path(sys.argv[0]).name
    return "python -m stackwise_bench.bench" if name == "__main__.py" else name
