"""RunRecord: the one module that writes a run directory, and its never-overwrite policy.

Layout (:mod:`stackwise_bench.runs.contract`): ``summary.json`` (atomic, carries the
status from start to end), ``metrics.jsonl``, ``steps.jsonl``, ``hardware.jsonl``, ``split.json`` and
``checkpoints/{last,best}.pt``. Every whole-file write goes through a temporary file
and ``os.replace``, so a crash never leaves a half-written summary or checkpoint behind;
a write that fails (a full disk, a quota, a read-only mount) removes its temporary file,
leaves the previous file as it was and raises :class:`RecordWriteError` (``reason = "io"``).
A failed append is cut back, so the logs never end in half a line.
Every write is fenced: the record's ``fence`` (a training run's lease check) is called first, and again
before a whole file is renamed into place, so a process whose folder was taken over writes nothing more.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stackwise_bench.errors import ConfigError
from stackwise_bench.runs import identity, jsonsafe
from stackwise_bench.runs.contract import (
    CHECKPOINTS,
    DIAGNOSTICS,
    FINISHED,
    HARDWARE,
    METRICS,
    PREDICTIONS,
    SCHEMA_VERSION,
    SPLIT,
    STATUSES,
    STEPS,
    SUMMARY,
    read_summary,
)
from stackwise_bench.runs.files import (
    RecordWriteError,
    append_bytes,
    atomic_write,
    check_writable,
    write_error,
)
from stackwise_bench.runs.folder_policy import refuse_other_run, same_run  # noqa: F401  (same_run: re-exported)
from stackwise_bench.runs.lease import LeaseLost
from stackwise_bench.runs.tracking import Tracker, TrackerRun, Trackers, by_statistic, run_of

log = logging.getLogger(__name__)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class RunRecord:
    """Writes one run directory; monitors and the trainer write only through it."""

    def __init__(self, run_dir: str | Path, key: str = "hydra.run.dir", fence: Callable[[], None] | None = None):
        """Open (creating it as needed) the run folder ``run_dir``.

        ``fence`` is called before every write into the folder (this record's, the trackers'), and raises when
        this process may no longer write there: a training run passes its lease's
        :meth:`~stackwise_bench.runs.lease.Lease.check`. None (tests, ``evaluate``'s own folders): no fence.

        Raises:
            ConfigError: the folder cannot be created or written; ``key`` is the setting named in the message.
        """
        self.dir = Path(run_dir)
        check_writable(self.dir, key)
        self.ckpt_dir = self.dir / CHECKPOINTS
        self.summary: dict[str, Any] = read_summary(self.dir) or {}
        self._lock = threading.Lock()
        self._hardware_failed = False
        self._hardware_seq = _next_seq(self.dir / HARDWARE)  # before a resume trims it: seqs never repeat
        self.resume_step: int | None = None  # the global step a resumed run continues from (trim_to_checkpoint)
        self.fingerprints: tuple[str, ...] = ()  # whose checkpoints this run continues from (prepare)
        self.split_sha256: str | None = None  # the split it trains on (write_split), stamped into its checkpoints
        self._final_weights: dict | None = None  # the diagnostics' end-of-run row, for the trackers at finish
        self.fence = fence or _unfenced
        self.trackers = Trackers([], self._tracker_run, self._report_trackers, fence=self.fence)

    # ---- trackers: sinks of the same dicts ----------------------------------
    def attach(self, trackers: list[Tracker]) -> None:
        """Hand every dict this record writes to ``trackers`` too (:mod:`stackwise_bench.runs.tracking`)."""
        self.trackers = Trackers(trackers, self._tracker_run, self._report_trackers, fence=self.fence)

    @property
    def wants_steps(self) -> bool:
        """Whether anyone takes the per-step training rows (:meth:`log_step`): always, ``steps.jsonl`` does."""
        return True

    def _tracker_run(self) -> TrackerRun:
        return run_of(self.dir, self.summary, self.resume_step)

    def _report_trackers(self, status: dict) -> None:
        """The trackers' final state and errors into ``summary.json["loggers"]`` (called by ``Trackers.close``)."""
        self.summary["loggers"] = status
        self.write_summary()

    # ---- the folder policy: never overwrite --------------------------------
    def prepare(self, config: dict, fingerprint: str, may_resume: bool) -> dict | None:
        """Decide what a run of ``config`` may do in this folder, before anything is written.

        Args:
            config: The resolved config of the run about to start.
            fingerprint: Its :func:`~stackwise_bench.runs.provenance.fingerprint`.
            may_resume: ``trainer.resume=true``, or a sweep job (which always continues its own folder).

        Returns:
            The folder's summary when it already holds this run finished (nothing to do), else None:
            the folder is new, or holds an unfinished run of the same config that continues here (its
            earlier attempt is kept in ``previous_attempts``).

        Raises:
            ConfigError: the folder holds a run of a different config, or an unfinished one and
                ``may_resume`` is false, or files of a run but no summary (unless a resume has a last.pt).
        """
        old = self.summary
        # The checkpoints this run may continue from carry its fingerprint, or the one its record was written under.
        recorded = (old.get("run") or {}).get("fingerprint")
        self.fingerprints = tuple(dict.fromkeys(f for f in (fingerprint, recorded) if f))
        refuse_other_run(self.dir, old, config, fingerprint, may_resume)
        if not old:
            return None
        if old.get("status") in FINISHED:
            log.info("%s is already %s with the same config: nothing to do", self.dir, old["status"])
            return old
        attempt = {k: old.get(k) for k in ("status", "error")}
        attempt["ended_at"] = old.get("run", {}).get("ended_at")
        attempt["stopped_by"] = old.get("run", {}).get("stopped_by")
        attempt["steps"] = (old.get("train") or {}).get("steps")  # where it stopped: mid-epoch when not a multiple
        # What that attempt used (its own share: a resumed attempt's energy_j is the run's total so far), then out of
        # the summary, so an attempt that ends without resources (a crash) is never counted twice.
        attempt["resources"] = attempt_resources(old.pop("resources", None) or {})
        old.setdefault("previous_attempts", []).append(attempt)
        return None

    def can_resume(self) -> bool:
        """Whether a ``last.pt`` is here to continue from."""
        return self.checkpoint_path("last").is_file()

    # ---- summary.json -------------------------------------------------
    def write_summary(self) -> None:
        """Write summary.json (the trackers' run ids and errors so far included, so a resume finds their runs)."""
        self.fence()
        if self.trackers:
            self.summary["loggers"] = self.trackers.status()
        with self._lock:
            self._write_text(self.dir / SUMMARY, jsonsafe.dumps(self.summary, indent=2) + "\n")

    def update(self, **sections: Any) -> None:
        """Merge top-level sections (``train={...}``) into the summary and write it."""
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(self.summary.get(key), dict):
                self.summary[key].update(value)
            else:
                self.summary[key] = value
        self.write_summary()

    def start(self, **sections: Any) -> None:
        self.summary["schema_version"] = SCHEMA_VERSION
        self.summary["status"] = "running"
        self.summary["error"] = None
        self.update(**sections)

    def finish(self, status: str, **sections: Any) -> None:
        if status not in STATUSES:  # the contract's list is what analysis and sweeps read: no other word gets in
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        self.summary.setdefault("run", {})["ended_at"] = now_iso()
        self.summary["status"] = status
        try:
            self.update(**sections)
        finally:  # a summary that cannot be written (a full disk) still closes the trackers
            self._finish_trackers(status, sections.get("test"))

    def _finish_trackers(self, status: str, test: dict | None) -> None:
        """A finished run's test metrics and summary numbers to the trackers, then close them (and record how).

        An interrupted or failed run only closes them: its resume sends the test and summary once, at the end.
        """
        if not self.trackers.started:  # nothing was ever logged: no tracker run to open just to close it
            return
        if status in FINISHED:
            if self._final_weights is not None:
                self.trackers.log(
                    "diagnostics", by_statistic(self._final_weights), self._final_weights.get("step") or 0
                )
            if test:
                self.trackers.log("test", test, (self.summary.get("train") or {}).get("steps") or 0)
            self.trackers.summary(self.summary)
        self.trackers.close(status)

    def fail(self, exc: BaseException, reason: str | None = None) -> None:
        """Record a failure with its traceback; ``reason`` is a short tag such as ``diverged``.

        Without ``reason``, the exception's own ``reason`` tag (``config``, ``io``, ``diverged``) or its type.

        Called while ``exc`` propagates, so it never raises a write error of its own over it: where
        summary.json cannot be written either (the disk that failed the run is full), it logs one line.
        """
        self.summary["error"] = {
            "type": type(exc).__name__,
            "message": str(exc),
            "reason": reason or getattr(exc, "reason", None) or type(exc).__name__,
            "traceback": "".join(traceback.format_exception(exc)),
        }
        if isinstance(exc, RecordWriteError):  # the file that could not be written
            self.summary["error"]["path"] = str(exc.path)
        try:
            self.finish("failed")
        except OSError as write_exc:
            log.error("the failure of %s could not be recorded in its summary.json: %s", self.dir, write_exc)

    # ---- append-only logs ---------------------------------------------
    def _append(self, name: str, row: dict) -> None:
        """Append one JSON line; a failed append is cut back to where the file ended, never half a line."""
        self.fence()
        with self._lock:
            append_bytes(self.dir / name, (jsonsafe.dumps(row) + "\n").encode())

    def log_epoch(self, row: dict) -> None:
        """Append the epoch's metrics, and beat the summary's heartbeat so a stale `running` run can be told apart."""
        self._append(METRICS, row)
        self.summary.setdefault("run", {})["updated_at"] = now_iso()
        self.summary["progress"] = {"epoch": row.get("epoch"), "step": row.get("step")}
        self.write_summary()
        self.trackers.log("epoch", row, row.get("step") or 0)

    def log_step(self, row: dict) -> None:
        """Append a training step's loss, learning rate and grad norm to ``steps.jsonl``, and hand it to the trackers.

        The learning curve per step (metrics.jsonl is per epoch): the analysis draws the schedule from it.
        """
        self._append(STEPS, row)
        self.trackers.log("train", row, row["step"])

    def log_diagnostics(self, row: dict) -> None:
        """Append a diagnostics row (:mod:`stackwise_bench.training.diagnostics`) and hand it to the trackers.

        Trackers get it regrouped by statistic (:func:`~stackwise_bench.runs.tracking.by_statistic`).
        """
        self._append(DIAGNOSTICS, row)
        if row.get("kind") == "weights":  # the trained weights: to the trackers once, when the run has finished
            self._final_weights = row
        elif self.trackers:
            self.trackers.log("diagnostics", by_statistic(row), row.get("step") or 0)

    def log_hardware(self, row: dict) -> None:
        """Append a monitor sample, stamped with the wall-clock ``time`` (unix seconds) unless it has one.

        Runs on the monitor's thread: a sample that cannot be written is dropped with one warning per run
        (a full disk fails the run at its next checkpoint or metrics row anyway).
        """
        row = {**row, "seq": self._hardware_seq}
        self._hardware_seq += 1
        if "time" not in row:
            row["time"] = time.time()
        try:
            self._append(HARDWARE, row)
        except LeaseLost:  # the folder is another process's now: the training thread says so, this one just stops
            return
        except RecordWriteError as exc:
            if not self._hardware_failed:
                self._hardware_failed = True
                log.warning("hardware samples are no longer recorded: %s", exc)
        self.trackers.log("hardware", row, row["seq"])

    def rewrite_metrics(self, rows: list[dict]) -> None:
        """On resume: the metrics file becomes exactly the checkpoint's history."""
        self.fence()
        text = "".join(jsonsafe.dumps(r) + "\n" for r in rows)
        with self._lock:
            self._write_text(self.dir / METRICS, text)

    def trim_to_checkpoint(self, state: dict) -> None:
        """On resume: cut the logs back to the checkpoint ``state`` the run continues from, so no row repeats.

        ``metrics.jsonl`` becomes exactly the checkpoint's history; ``steps.jsonl`` and ``diagnostics.jsonl`` keep
        the rows of steps at or before the checkpoint's global step; ``hardware.jsonl`` keeps the samples
        stamped at or before its ``saved_at`` (and those without a ``time``), and drops an unreadable (half-
        written) line. A checkpoint without ``saved_at`` (written before it was stamped) leaves the samples alone.
        """
        self.rewrite_metrics(state["progress"]["history"])
        self.resume_step = state["progress"].get("global_step")
        if self.resume_step is not None:
            self._trim_diagnostics(self.resume_step)
            step = self.resume_step
            self._keep_rows(STEPS, lambda row: isinstance(row, dict) and (row.get("step") or 0) <= step)
        saved_at = state.get("saved_at")
        if saved_at is not None:

            def before_checkpoint(row) -> bool:
                stamp = row.get("time") if isinstance(row, dict) else None
                return not isinstance(stamp, (int, float)) or stamp <= saved_at

            self._keep_rows(HARDWARE, before_checkpoint)

    def _trim_diagnostics(self, step: int) -> None:
        """``diagnostics.jsonl`` keeps the rows of steps at or before ``step`` (``kind: step``, AdaLoRA's
        ``adapter_ranks``); the end-of-run weights row goes too."""
        self._keep_rows(
            DIAGNOSTICS,
            lambda row: (
                isinstance(row, dict) and row.get("kind", "step") != "weights" and (row.get("step") or 0) <= step
            ),
        )

    def _keep_rows(self, name: str, keep) -> None:
        """Rewrite the log ``name`` with the rows ``keep`` accepts; an unreadable (half-written) line goes."""
        self.fence()
        path = self.dir / name
        if not path.is_file():
            return
        with self._lock:
            kept = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if keep(row):
                    kept.append(line + "\n")
            self._write_text(path, "".join(kept))

    def restart_logs(self) -> None:
        """A run that starts over in its folder, with no ``last.pt`` to continue from: the one way it starts over.

        The logs of its earlier attempts go (metrics, steps, diagnostics, hardware samples), and so does their
        ``best.pt``: the new attempt's rows from epoch 1 are the only ones, and its best epoch is its own.
        """
        self.fence()
        with self._lock:
            old_logs = (METRICS, STEPS, DIAGNOSTICS, HARDWARE)
            for path in (*(self.dir / name for name in old_logs), self.checkpoint_path("best")):
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    raise write_error(path, exc) from exc
        self.resume_step = None

    def write_split(self, split: dict) -> None:
        """Write ``split.json``; its ``sha256`` is stamped into the checkpoints saved from now on."""
        self.fence()
        self._write_text(self.dir / SPLIT, jsonsafe.dumps(split) + "\n")
        self.split_sha256 = split.get("sha256")

    def write_predictions(self, rows: list[dict]) -> None:
        """Write ``predictions.jsonl``: the tested checkpoint's prediction of every test row (GLUE runs)."""
        self.fence()
        self._write_text(self.dir / PREDICTIONS, "".join(jsonsafe.dumps(row) + "\n" for row in rows))

    def _write_text(self, path: Path, text: str) -> None:
        self._write_fenced(path, lambda f: f.write(text), "w")

    def _write_fenced(self, path: Path, write: Callable, mode: str) -> None:
        """``atomic_write`` with the fence checked again after the write and its fsync, right before the rename.

        Writing (a checkpoint's torch.save, an fsync on NFS) takes a while: a process stopped meanwhile and
        taken over renames nothing over its successor's file; its temporary file goes.
        """

        def write_then_check(f) -> None:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            self.fence()

        atomic_write(path, write_then_check, mode)

    # ---- checkpoints ----------------------------------------------------
    def checkpoint_path(self, name: str) -> Path:
        return self.ckpt_dir / f"{name}.pt"

    def has_checkpoint(self, name: str) -> bool:
        return self.checkpoint_path(name).exists()

    def save_checkpoint(self, name: str, state: dict) -> None:
        """Write ``checkpoints/<name>.pt`` atomically, stamped with ``saved_at`` (unix seconds) for resume trimming
        and with the run it belongs to (``run``: :func:`~stackwise_bench.runs.identity.stamp`).

        Raises:
            RecordWriteError: the write failed; the previous ``<name>.pt`` is as it was.
        """
        import torch

        self.fence()
        try:
            self.ckpt_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise write_error(self.ckpt_dir, exc) from exc
        state = {
            **state,
            "saved_at": time.time(),  # the samples after this moment belong to no checkpoint
            identity.STAMP: identity.stamp(self.summary.get("run") or {}, self.split_sha256),  # whose it is
        }
        self._write_fenced(self.checkpoint_path(name), lambda f: torch.save(state, f), "wb")

    def load_checkpoint(self, name: str, map_location: Any = "cpu") -> dict:
        """``checkpoints/<name>.pt``, checked to be this run's: stamped with its config and split, or unstamped (older).

        Raises:
            ConfigError: the file is missing, unreadable or another run's: one sentence that says how to go on.
        """
        path, last = self.checkpoint_path(name), self.checkpoint_path("last")
        what = f"trainer.resume=true: {path}" if name == "last" else str(path)
        over = f"delete {'it' if name == 'last' else last} to start the run over from epoch 1"
        state = identity.load(path, map_location, what, over)
        problem = identity.mismatch(identity.origin(state), self.fingerprints, self.split_sha256)
        if problem:
            raise ConfigError(f"{what} {problem}; put back this run's own {path.name}, or {over}.")
        return state


# Resources that add up over a resumed run's attempts (stackwise_bench.train.run_resources sums them).
ADDITIVE = ("energy_j", "gpu_energy_j", "cpu_energy_j", "images")


def attempt_resources(resources: dict) -> dict:
    """One attempt's own additive resources, from the ``resources`` it recorded (``attempt`` holds its share)."""
    own = resources.get("attempt") or resources
    return {key: own.get(key) for key in ADDITIVE}


def _unfenced() -> None:
    """The fence of a record that no lease guards: every write may go ahead."""


def _next_seq(path: Path) -> int:
    """The next hardware sample's ``seq``: one past the highest in the file (its line count for older files)."""
    if not path.is_file():
        return 0
    highest, lines = -1, 0
    for line in path.read_text().splitlines():
        lines += 1
        try:
            seq = json.loads(line).get("seq")
        except (ValueError, AttributeError):
            continue
        if isinstance(seq, int):
            highest = max(highest, seq)
    return max(highest + 1, lines)
