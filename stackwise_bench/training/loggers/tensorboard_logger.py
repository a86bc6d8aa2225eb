"""TensorBoard: event files in the run folder, so ``tensorboard --logdir multirun/<study>`` shows every job.

Two writers, because TensorBoard has one step axis per run folder and a restart purges by step:

* ``<run_dir>/<subdir>``: the global-step streams (train, epoch, diagnostics, test) and the config/summary.
  A resumed run opens it with ``purge_step = resume_step + 1``: TensorBoard drops what the attempt before logged
  after the checkpoint, and the run logs those steps again (one value per tag and step).
* ``<run_dir>/<subdir>/hardware``: the hardware samples, whose step is the sample's ``seq`` (it never repeats across
  attempts). Kept apart so that purging global steps never drops samples whose ``seq`` happens to be larger.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from stackwise_bench.runs.tracking import TrackerRun
from stackwise_bench.training.loggers import require


def _has_events(folder: Path) -> bool:
    return any(folder.glob("events.out.tfevents.*"))


def config_table(params: dict[str, Any]) -> str:
    """The flat config as a markdown table (TensorBoard's text tab renders markdown)."""
    rows = [f"| `{key}` | {str(value).replace('|', '&#124;')} |" for key, value in sorted(params.items())]
    return "\n".join(["| key | value |", "|---|---|", *rows])


def _hparam(value: Any) -> int | float | str | bool:
    """TensorBoard's hparams take numbers, text and booleans: anything else is shown as text."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class TensorBoardLogger:
    """Writes the run's dicts as TensorBoard scalars (``torch.utils.tensorboard``).

    Args:
        name: The key of this tracker in ``summary.json["loggers"]``.
        subdir: The folder under the run folder that holds the event files.
        flush_secs: How often the writer's background thread flushes to disk (``close`` always flushes).
    """

    def __init__(self, name: str = "tensorboard", subdir: str = "tensorboard", flush_secs: float = 30.0):
        self.name = name
        self.subdir = subdir
        self.flush_secs = flush_secs
        self._writer = None
        self._hardware = None
        self._dir: Path | None = None
        self._params: dict[str, Any] = {}
        self._last_step = 0

    def open(self, run: TrackerRun) -> dict:
        require("tensorboard", self.name)
        writer_cls = require("torch.utils.tensorboard", self.name).SummaryWriter
        self._dir = Path(run.run_dir) / self.subdir
        continued = _has_events(self._dir)
        # A resume drops the steps after its checkpoint (they are logged again); a restart from scratch drops all.
        purge = None if not continued else (0 if run.resume_step is None else run.resume_step + 1)
        after_existing(self._dir)
        self._writer = writer_cls(str(self._dir), purge_step=purge, flush_secs=self.flush_secs)
        self._params = dict(run.params)
        self._last_step = run.resume_step or 0
        if purge in (None, 0):  # the config text at step 0 is still there after a resume
            self._writer.add_text("config", config_table(run.params), 0)
        return {"logdir": str(self._dir)}

    def _hardware_writer(self, first_seq: int):
        if self._hardware is None:
            writer_cls = require("torch.utils.tensorboard", self.name).SummaryWriter
            folder = self._dir / "hardware"
            # seqs never repeat, so this purges nothing, unless a sample was recorded twice (then the new one wins).
            purge = first_seq if _has_events(folder) else None
            after_existing(folder)
            self._hardware = writer_cls(str(folder), purge_step=purge, flush_secs=self.flush_secs)
        return self._hardware

    def log_metrics(self, metrics: dict[str, float], step: int, stream: str) -> None:
        if stream == "hardware":
            writer = self._hardware_writer(step)
        else:
            writer = self._writer
            self._last_step = max(self._last_step, step)
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        """The summary's numbers as the HParams dashboard's metrics, next to the config as its hparams."""
        from torch.utils.tensorboard.summary import hparams

        metrics = {f"summary/{key}": value for key, value in summary.items()}
        params = {key: _hparam(value) for key, value in self._params.items()}
        for part in hparams(params, metrics):
            self._writer.file_writer.add_summary(part, self._last_step)
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, self._last_step)

    def close(self, status: str) -> None:
        for writer in (self._writer, self._hardware):
            if writer is not None:
                writer.close()
        self._writer = self._hardware = None


def after_existing(folder: Path) -> None:
    """Wait (at most a second) until a new event file's name sorts after the folder's existing ones.

    TensorBoard reads a folder's event files in name order, ``events.out.tfevents.<unix second>.<host>.<pid>.<n>``,
    and a resume's purge only works when its file comes last. Within the second of an earlier file of the same
    process, the counter ``<n>`` decides, and it sorts as text (``10`` before ``9``).
    """
    stamps = [int(m.group(1)) for p in folder.glob("events.out.tfevents.*") if (m := _STAMP.match(p.name))]
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


_STAMP = re.compile(r"events\.out\.tfevents\.(\d+)\.")
