"""What the training loop reports: the progress bar, the per-epoch log line, the summary of a fit."""

from __future__ import annotations

import logging
import statistics

from stackwise_bench.training.checkpointing import Progress

log = logging.getLogger(__name__)


def train_summary(progress: Progress, status: str) -> dict:
    """``summary.json``'s ``train`` section from the epochs' rows (compilation is not training time)."""
    hist = progress.history
    times = [r["epoch_time_s"] for r in hist]
    timed = [r["epoch_time_s"] - r.get("compile_time_s", 0.0) for r in hist]
    imgs = sum(r["train_img_s"] * t for r, t in zip(hist, timed))
    last_val = next((r for r in reversed(hist) if r.get("val_top1") is not None), {})
    return {
        "best_val_top1": progress.best_val_top1 if hist else None,
        "best_epoch": progress.best_epoch,
        "epochs_run": progress.epoch,
        "steps": progress.global_step,
        "time_s": sum(times),
        "img_s": imgs / max(sum(timed), 1e-9),
        "compile_time_s": sum(r.get("compile_time_s", 0.0) for r in hist),
        "epoch_time_mean_s": statistics.fmean(times) if times else None,
        "epoch_time_std_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "final_train_top1": hist[-1]["train_top1"] if hist else None,
        "final_train_loss": hist[-1]["train_loss"] if hist else None,
        "final_val_top1": last_val.get("val_top1"),
        "final_val_loss": last_val.get("val_loss"),
        "stopped_early": status == "early_stopped",
    }


def progress_bar(total: int, progress: Progress, max_epochs: int):
    """A tqdm bar for one epoch, starting where a resumed epoch stands."""
    from tqdm import tqdm

    desc = f"epoch {progress.epoch + 1}/{max_epochs}"
    return tqdm(total=total, initial=progress.step, desc=desc, leave=False, dynamic_ncols=True)


def update_bar(bar, step: int, loss_sum, correct, seen: int, elapsed: float) -> None:
    """Move the bar to ``step`` with the running loss, accuracy and speed (reading them syncs the device)."""
    bar.n = step
    bar.set_postfix(
        loss=f"{float(loss_sum) / seen:.4f}", acc=f"{100.0 * int(correct) / seen:.1f}%", img_s=f"{seen / elapsed:.0f}"
    )


def log_epoch(row: dict, max_epochs: int) -> None:
    """The epoch's line in the run log."""
    val = "" if row["val_top1"] is None else f"  val_loss {row['val_loss']:.4f}  val_top1 {row['val_top1']:.2f}%"
    log.info(
        "epoch %d/%d  train_loss %.4f  train_top1 %.2f%%%s  %.0f img/s  %.1fs",
        row["epoch"],
        max_epochs,
        row["train_loss"],
        row["train_top1"],
        val,
        row["train_img_s"],
        row["epoch_time_s"],
    )
