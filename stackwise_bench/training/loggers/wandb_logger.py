"""Weights & Biases: offline by default (never needs the network); ``wandb sync`` uploads a study later.

Files go to ``<run_dir>/wandb/offline-run-<time>-<id>/``, one folder per attempt of the run, all with the same run id
(derived from the run folder, kept in ``summary.json`` for a resume). wandb's own step (``_step``) must only grow
within a run, and an offline attempt does not know where the one before stopped, so:

* the x-axes are metrics of their own (``define_metric``): ``global_step`` for train/epoch/diagnostics/test and
  ``hardware_seq`` for the hardware samples; ``_step`` just counts rows;
* a continued run reads its earlier segments' files (:mod:`.wandb_files`) and starts ``_step`` after theirs, so the
  segments are disjoint and ``wandb sync`` replays them in order, and it skips the (key, step) pairs they hold.

No wandb state outlives the run: the ``Run`` object is used (``reinit="create_new"``: no other run is touched) and
finished in ``close``; settings turn off console capture, system stats, git/code/requirements capture.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import re
import time
from pathlib import Path
from typing import Any

from stackwise_bench.runs.tracking import STREAMS, TrackerRun
from stackwise_bench.training.loggers import FINISHED_WELL, HeldSteps, require, wandb_files

log = logging.getLogger(__name__)

GLOBAL_STEP, HARDWARE_SEQ = "global_step", "hardware_seq"  # the x-axis metrics (not under any stream's prefix)
WRITE_TIMEOUT_S = 60.0  # how long close() waits for wandb's service to finish the run's file


def run_id(run: TrackerRun) -> str:
    """A wandb run id for the run folder: readable (its name) and unique (a hash of its path)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", run.name).strip("-.")[:40] or "run"
    return f"{slug}-{hashlib.sha1(str(Path(run.run_dir).resolve()).encode()).hexdigest()[:10]}"


class WandbLogger:
    """Logs the run's dicts to a wandb run (offline unless told otherwise).

    Args:
        name: The key of this tracker in ``summary.json["loggers"]``.
        mode: wandb's mode: ``offline`` (files only), ``online``, or ``disabled``.
        project: The wandb project; None = the study's name.
    """

    def __init__(self, name: str = "wandb", mode: str = "offline", project: str | None = None):
        self.name = name
        self.mode = mode
        self.project = project
        self._run = None
        self._held: HeldSteps | None = None
        self._next_row = 0

    def open(self, run: TrackerRun) -> dict:
        wandb = require("wandb", self.name)
        rid = run.state.get("run_id") or run_id(run)
        wandb_dir = Path(run.run_dir) / "wandb"
        earlier = wandb_files.segments(wandb_dir, rid)
        if earlier:
            self._continue(earlier, -1 if run.resume_step is None else run.resume_step)
            _next_second(earlier)
        settings = wandb.Settings(
            mode=self.mode,
            console="off",  # the run record keeps the log; no stdout/stderr capture
            silent=True,
            x_disable_stats=True,  # the hardware monitor samples the machine, not wandb
            x_disable_meta=True,
            x_disable_machine_info=True,
            save_code=False,
            disable_git=True,
            x_save_requirements=False,
            disable_job_creation=True,
        )
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=self.project or run.study,
            name=run.name,
            id=rid,
            group=run.study,
            dir=str(run.run_dir),
            config=run.config,
            resume="allow",
            reinit="create_new",
            settings=settings,
        )
        self._next_row = max(self._next_row, int(self._run.step or 0))  # online: the server's count may be ahead
        self._run.define_metric(GLOBAL_STEP, hidden=True)
        self._run.define_metric(HARDWARE_SEQ, hidden=True)
        for stream in STREAMS:
            axis = HARDWARE_SEQ if stream == "hardware" else GLOBAL_STEP
            self._run.define_metric(f"{stream}/*", step_metric=axis)
        return {"run_id": rid, "project": self.project or run.study, "mode": self.mode}

    def _continue(self, files: list[Path], floor: int) -> None:
        """Start after the rows of the run's earlier segments and skip what they hold (unreadable: warn, go on)."""
        held: dict[str, list[int]] = {}
        try:
            for path in files:
                for row in wandb_files.history(path):
                    self._next_row = max(self._next_row, int(row.get("_step", -1)) + 1)
                    axis = row.get(GLOBAL_STEP, row.get(HARDWARE_SEQ))
                    for key in row:
                        if axis is not None and not key.startswith("_") and key not in (GLOBAL_STEP, HARDWARE_SEQ):
                            held.setdefault(key, []).append(int(axis))
        except Exception as exc:  # noqa: BLE001 - a file format we cannot read costs the dedup, not the run
            log.warning("wandb: could not read the earlier segments of this run (%s); steps may repeat", exc)
        self._held = HeldSteps(floor, held)

    def log_metrics(self, metrics: dict[str, float], step: int, stream: str) -> None:
        if self._held is not None:
            metrics = self._held.fresh(metrics, step)
        if not metrics:
            return
        axis = HARDWARE_SEQ if stream == "hardware" else GLOBAL_STEP
        self._run.log({**metrics, axis: int(step)}, step=self._next_row)
        self._next_row += 1

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._run.summary.update(summary)

    def close(self, status: str) -> None:
        """Finish the run, and wait until its file holds everything (wandb's service writes it after finish returns)."""
        if self._run is None:
            return
        run, self._run = self._run, None
        path = Path(run.settings.sync_file)
        run.summary["status"] = status
        run.finish(exit_code=0 if status in FINISHED_WELL else 1)
        deadline = time.monotonic() + WRITE_TIMEOUT_S
        while self.mode != "disabled" and not wandb_files.finished(path):
            if time.monotonic() > deadline:
                raise TimeoutError(f"wandb did not finish writing {path} within {WRITE_TIMEOUT_S:.0f} s")
            time.sleep(0.05)


def _next_second(earlier: list[Path]) -> None:
    """wandb names a run's folder by its start second: an attempt must not start in the same second as the last one."""
    while any(f"-{datetime.datetime.now():%Y%m%d_%H%M%S}-" in p.parent.name for p in earlier[-1:]):
        time.sleep(1.0 - time.time() % 1.0 + 0.01)
