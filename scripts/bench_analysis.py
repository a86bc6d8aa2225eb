"""Time collect + full analysis on N synthetic run folders (default 1000), and the scaling fits.

    python scripts/bench_analysis.py            # 1000 runs, 20 epochs each, report with plots
    python scripts/bench_analysis.py --no-plots # the target: the analysis of 1,000 runs under 5 s
    python scripts/bench_analysis.py --runs 200 --epochs 50 --no-plots --keep
    python scripts/bench_analysis.py --coverage 200   # + how often the scaling intervals cover the truth

Besides the default analysis it times ``scaling=lora.rank aggregate=iqm`` on the same runs: one fit of
E + A·x^(−α) per precision with 1,000 bootstrap resamples each, and the IQM with its stratified bootstrap.

The folders follow the run-record contract (summary.json, metrics.jsonl,
hardware.jsonl, .hydra/): 6 LoRA ranks × 3 precisions, seeds 0, 1, 2, ...
They are written into a temporary directory that is removed afterwards
unless --keep is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RANKS = (0, 2, 4, 8, 16, 32)
PRECISIONS = ("fp32", "fp16", "bf16")


def write_synthetic_runs(root: Path, n: int, n_epochs: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    study = root / "multirun" / "bench"
    cells = [(r, p) for r in RANKS for p in PRECISIONS]
    for job in range(n):
        rank, prec = cells[job % len(cells)]
        run_seed = job // len(cells)
        status = "failed" if job % 97 == 13 else "completed"
        overrides = [f"seed={run_seed}", f"lora.rank={rank}", f"precision={prec}"]
        choices = {
            "model": "deit_tiny",
            "dataset": "cifar10",
            "precision": prec,
            "augmentation": "basic",
            "optimizer": "adamw",
            "scheduler": "cosine",
            "lora": "default",
            "trainer": "default",
            "monitors": "default",
            "experiment": "peft_baseline",
        }
        speed = {"fp32": 1.0, "fp16": 1.8, "bf16": 1.6}[prec]
        target = 95 - 4 / (1 + rank) + rng.normal(0, 0.4)
        val = target - 30 * np.exp(-np.arange(1, n_epochs + 1) / 3) + rng.normal(0, 0.3, n_epochs)
        train = val + np.linspace(0, 6, n_epochs)
        times = 10 / speed + rng.normal(0, 0.2, n_epochs)
        trainable = 5_526_346 if rank == 0 else 48 * 192 * rank + 1930
        d = study / str(job)
        (d / ".hydra").mkdir(parents=True)
        cm = (rng.integers(0, 5, (10, 10)) + np.eye(10, dtype=int) * 90).tolist()
        summary = {
            "status": status,
            "error": (
                {"type": "RuntimeError", "message": "loss is NaN", "traceback": "..."} if status == "failed" else None
            ),
            "run": {
                "seed": run_seed,
                "overrides": overrides,
                "choices": choices,
                "fingerprint": f"{job:08x}",
                "git_sha": "0" * 40,
                "name": str(job),
                "dir": str(d),
                "started_at": "2024-01-01T00:00:00",
                "ended_at": "2024-01-01T01:00:00",
            },
            "config": {
                "seed": run_seed,
                "lora": {"rank": rank, "alpha": 2 * rank, "dropout": 0.1},
                "optimizer": {"name": "adamw", "lr": 5e-4},
                "trainer": {"max_epochs": n_epochs, "batch_size": 128},
                "model": {"name": "deit_tiny"},
                "dataset": {"name": "cifar10", "num_classes": 10},
            },
            "env": {
                "torch": "2.4.0",
                "device": "cuda",
                "python": "3.11",
                "platform": "linux",
                "cpu_count": 16,
                "threads": 8,
                "gpu_name": "H100",
                "hostname": "bench",
            },
            "params": {
                "total": 5_526_346 + (trainable if rank else 0),
                "trainable": trainable,
                "lora": trainable - 1930 if rank else 0,
                "size_mb": 21.1,
            },
        }
        if status == "completed":
            summary["train"] = {
                "best_val_top1": float(val.max()),
                "best_epoch": int(val.argmax()) + 1,
                "epochs_run": n_epochs,
                "time_s": float(times.sum()),
                "img_s": 5000 * speed,
                "epoch_time_mean_s": float(times.mean()),
                "epoch_time_std_s": float(times.std(ddof=1)),
                "final_train_top1": float(train[-1]),
                "final_train_loss": 0.1,
                "final_val_top1": float(val[-1]),
                "final_val_loss": 0.3,
                "stopped_early": False,
            }
            summary["test"] = {
                "top1": float(target),
                "top5": 99.5,
                "f1_macro": float(target - 0.3),
                "precision_macro": 90.0,
                "recall_macro": 90.0,
                "loss": 0.3,
                "per_class_top1": [float(target)] * 10,
                "confusion_matrix": cm,
                "infer_img_s": 20000.0,
            }
            summary["resources"] = {
                "peak_rss_mb": 3000.0,
                "peak_gpu_mem_mb": 8000.0 / speed,
                "cpu_percent_mean": 100.0,
                "rss_mb_mean": 2800.0,
            }
        (d / "summary.json").write_text(json.dumps(summary, indent=2))
        (d / "metrics.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "epoch": e + 1,
                        "step": 100 * (e + 1),
                        "lr": 5e-4 * 0.5 * (1 + np.cos(np.pi * e / n_epochs)),
                        "train_loss": 2 / (e + 1),
                        "train_top1": float(train[e]),
                        "val_loss": 2.2 / (e + 1),
                        "val_top1": float(val[e]),
                        "epoch_time_s": float(times[e]),
                        "train_img_s": 5000 * speed,
                    }
                )
                + "\n"
                for e in range(n_epochs)
            )
        )
        (d / "hardware.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "t": 5.0 * i,
                        "cpu_percent": 100.0 + rng.normal(0, 5),
                        "rss_mb": 2800.0 + i,
                        "gpu_mem_mb": 8000.0 / speed,
                        "gpu_util": None,
                    }
                )
                + "\n"
                for i in range(30)
            )
        )
        (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return study


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic runs and the report")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples of the scaling fits")
    parser.add_argument(
        "--coverage", type=int, default=0, help="synthetic studies to measure the scaling intervals' coverage on"
    )
    args = parser.parse_args()
    os.environ.setdefault("MPLBACKEND", "Agg")
    root = Path(tempfile.mkdtemp(prefix="bench_analysis_"))
    try:
        t0 = time.perf_counter()
        study = write_synthetic_runs(root, args.runs, args.epochs)
        t_gen = time.perf_counter() - t0

        t0 = time.perf_counter()
        from stackwise_bench.analysis import collect_epochs, collect_runs

        t_import = time.perf_counter() - t0
        t0 = time.perf_counter()
        runs = collect_runs(study)
        t_collect = time.perf_counter() - t0
        t0 = time.perf_counter()
        epochs = collect_epochs(runs)
        t_epochs = time.perf_counter() - t0

        from stackwise_bench.analysis import analyze_runs, write_report

        t0 = time.perf_counter()
        analysis = analyze_runs(study)
        t_analyze = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = write_report(analysis, root / "report", plots=not args.no_plots)
        t_report = time.perf_counter() - t0
        t0 = time.perf_counter()
        robust = analyze_runs(study, scaling="lora.rank", aggregate="iqm", n_boot=args.boot)
        t_robust = time.perf_counter() - t0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"{len(runs)} runs, {len(epochs)} epoch rows, {len(analysis.summary)} summary rows, "
        f"{len(analysis.comparisons)} comparisons (cells by {', '.join(analysis.group_by)})"
    )
    print(f"  write synthetic runs        {t_gen:6.2f} s (not part of the analysis)")
    print(f"  import analysis             {t_import:6.2f} s")
    print(f"  collect_runs                {t_collect:6.2f} s")
    print(f"  collect_epochs              {t_epochs:6.2f} s")
    print(f"  analyze_runs (all tables)   {t_analyze:6.2f} s  (collects again, + epochs, hardware, stats)")
    print(f"  write_report{' (no plots)' if args.no_plots else ' + 7 plots'}      {t_report:6.2f} s")
    total = t_import + t_analyze + t_report
    print(f"  import + analyse + report   {total:6.2f} s  (target for 1,000 runs without plots: < 5 s)")
    fits = [s for s in robust.scaling.strata if s.fit is not None]
    print(
        f"  analyze_runs scaling=lora.rank aggregate=iqm  {t_robust:6.2f} s  ({len(fits)} fits x "
        f"{args.boot} bootstrap resamples, + IQM and P(X>Y) bootstraps; {t_robust - t_analyze:+.2f} s over the default)"
    )
    for s in fits:
        ci = s.fit.intervals["alpha"]
        print(f"    {s.label}: alpha {s.fit.fit.alpha:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] over {len(s.x)} runs")
    if args.keep:
        print(f"kept: {out}")
    if args.coverage:
        measure_coverage(args.coverage, args.boot)
    return 0


def measure_coverage(draws: int, n_boot: int) -> None:
    """How often the 95% bootstrap intervals of α, E and A contain the truth, over synthetic studies
    (ranks 1-32, 5 seeds per level, 5% log-normal noise; the same design the test states a share for)."""
    from stackwise_bench.analysis.stats.power_law import bootstrap_fit

    truth = {"E": 3.0, "A": 8.0, "alpha": 0.7}
    x = np.repeat(np.array([1.0, 2, 4, 8, 16, 32]), 5)
    covered = dict.fromkeys(truth, 0)
    t0 = time.perf_counter()
    for i in range(draws):
        rng = np.random.default_rng(10_000 + i)
        y = (truth["E"] + truth["A"] * x ** -truth["alpha"]) * np.exp(rng.normal(0, 0.05, len(x)))
        b = bootstrap_fit(x, y, n_boot=n_boot, seed=i)
        for k, v in truth.items():
            low, high = b.intervals[k]
            covered[k] += bool(low <= v <= high)
    shares = ", ".join(f"{k} {n / draws:.0%}" for k, n in covered.items())
    print(
        f"  coverage of the 95% intervals over {draws} synthetic studies: {shares} ({time.perf_counter() - t0:.1f} s)"
    )


if __name__ == "__main__":
    sys.exit(main())
