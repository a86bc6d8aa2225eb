"""What the training loop reports: the progress bar, the per-epoch log line, the summary of a fit."""

from __future__ import annotations

import logging
import statistics

from stackwise_bench.training.checkpointing import Progress

log = logging.getLogger(__name__)


def train_summary(progress: Progress, status: str, metric: str = "top1", unit: str = "img") -> dict:
    """``summary.json``'s ``train`` section from the epochs' rows (compilation is not training time).

    ``metric``: the task's headline metric (``best_val_<metric>``, ``final_*_<metric>``); ``unit``: what its
    speed counts (``<unit>_s``).
    """
    hist = progress.history
    times = [r["epoch_time_s"] for r in hist]
    timed = [r["epoch_time_s"] - r.get("compile_time_s", 0.0) for r in hist]
    samples = sum(r[f"train_{unit}_s"] * t for r, t in zip(hist, timed))
    last_val = next((r for r in reversed(hist) if r.get(f"val_{metric}") is not None), {})
    return {
        f"best_val_{metric}": progress.best_val_top1 if hist else None,
        "best_epoch": progress.best_epoch,
        "epochs_run": progress.epoch,
        "steps": progress.global_step,
        "time_s": sum(times),
        f"{unit}_s": samples / max(sum(timed), 1e-9),
        "compile_time_s": sum(r.get("compile_time_s", 0.0) for r in hist),
        "epoch_time_mean_s": statistics.fmean(times) if times else None,
        "epoch_time_std_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        f"final_train_{metric}": hist[-1].get(f"train_{metric}") if hist else None,  # GLUE's mcc/f1: val only
        "final_train_loss": hist[-1]["train_loss"] if hist else None,
        f"final_val_{metric}": last_val.get(f"val_{metric}"),
        "final_val_loss": last_val.get("val_loss"),
        "stopped_early": status == "early_stopped",
    }


def progress_bar(total: int, progress: Progress, max_epochs: int):
    """A tqdm bar for one epoch, starting where a resumed epoch stands."""
    from tqdm import tqdm

    desc = f"epoch {progress.epoch + 1}/{max_epochs}"
    return tqdm(total=total, initial=progress.step, desc=desc, leave=False, dynamic_ncols=True)


def update_bar(bar, step: int, meter, task) -> None:
    """Move the bar to ``step`` with the running loss, the task's metric and speed (reading them syncs the device)."""
    bar.n = step
    seen = max(1, meter.seen)
    shown = {name: f"{value:.4g}" for name, value in task.train_metrics(meter.tallies, seen).items()}
    bar.set_postfix(loss=f"{meter.mean_loss():.4f}", **shown, **{f"{task.unit}_s": f"{seen / meter.elapsed():.0f}"})


def log_epoch(row: dict, max_epochs: int, metric: str = "top1", unit: str = "img") -> None:
    """The epoch's line in the run log (a task whose metric is the loss, a language model's, shows it once)."""
    train_metric = row.get(f"train_{metric}")  # absent for GLUE's whole-split metrics (mcc, f1, pearson)
    extra = "" if metric == "loss" or train_metric is None else f"  train_{metric} {train_metric:.4g}"
    val_metric = row.get(f"val_{metric}")
    val = "" if val_metric is None else f"  val_loss {row['val_loss']:.4f}"
    if val_metric is not None and metric != "loss":
        val += f"  val_{metric} {val_metric:.4g}"
    log.info(
        "epoch %d/%d  train_loss %.4f%s%s  %.0f %s/s  %.1fs",
        row["epoch"],
        max_epochs,
        row["train_loss"],
        extra,
        val,
        row[f"train_{unit}_s"],
        unit,
        row["epoch_time_s"],
    )
