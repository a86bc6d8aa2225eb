"""trackio: one project per study, one trackio run per job, in trackio's local SQLite (``trackio show`` reads it).

This logger writes through ``trackio.sqlite_storage.SQLiteStorage.bulk_log``, the function trackio's own logging
thread calls, and not through ``trackio.init`` / ``Run.log``. What trackio 0.43's own path does (``run.py``):

* ``Run.log`` only queues; a daemon thread writes the queue every 0.5 s, and a failed write is a warning
  ("... this batch could not be persisted") and the batch is dropped: our fan-out would never hear of it.
* ``trackio.init`` keeps the current run in a process-wide context variable (the next ``init`` in a reused joblib
  worker finishes it), registers an ``atexit`` hook, starts CPU/GPU auto-logging when psutil/NVML are present, and
  asks the Hugging Face Hub who the user is (``whoami``: network) for the run's config.

``bulk_log`` writes one transaction under trackio's cross-process file lock (``<TRACKIO_DIR>/<project>.lock``,
waited on for up to 10 s, then "Could not acquire database lock after 10 seconds") in WAL mode with a 30 s busy
timeout, so parallel jobs of a study take turns instead of corrupting the file, and it raises when it fails. Rows are
buffered here and written every ``flush_secs`` (one lock per batch, not per step), at each epoch and test row, and in
``close``; a failed write raises out of ``log_metrics``/``close`` with the rows still buffered, and each row carries
its own ``log_id`` (trackio ignores a row whose id it holds), so writing them again never duplicates one.

Where trackio keeps its database is fixed when trackio is imported (``TRACKIO_DIR``, else its cache folder): set
``TRACKIO_DIR`` in the environment before launching to put it elsewhere; ``trackio show --project <study>`` then
needs the same variable.
"""

from __future__ import annotations

import datetime
import sqlite3
import time
import uuid
from typing import Any

from stackwise_bench.runs.stores import check_sqlite
from stackwise_bench.runs.tracking import TrackerRun
from stackwise_bench.training.loggers import HeldSteps, require

FLUSH_NOW = ("epoch", "test", "summary")  # rows worth having on disk at once (few, and the ones people look at)
WRITE_ATTEMPTS = 3  # a write that meets a busy database tries again (trackio itself already waits up to 10 s)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def _busy(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (OSError, sqlite3.OperationalError)) and ("lock" in text or "busy" in text)


class TrackioLogger:
    """Logs the run's dicts to trackio's local database, synchronously, failures raised.

    Args:
        name: The key of this tracker in ``summary.json["loggers"]``.
        flush_secs: At most this long between writes of the buffered rows (0: write every row at once).
    """

    def __init__(self, name: str = "trackio", flush_secs: float = 5.0):
        self.name = name
        self.flush_secs = flush_secs
        self._storage = None
        self._project = self._run = self._run_id = None
        self._config: dict | None = None  # written with the first rows (trackio stores a run's config with them)
        self._pending: list[tuple[int, dict, str, str]] = []  # (step, metrics, timestamp, log_id)
        self._held: HeldSteps | None = None
        self._last_flush = time.monotonic()
        self._last_step = 0

    def open(self, run: TrackerRun) -> dict:
        require("trackio", self.name)
        from trackio.sqlite_storage import SQLiteStorage

        SQLiteStorage.validate_project_name(run.study)
        check_sqlite(
            SQLiteStorage.get_project_db_path(run.study),
            "move it away, and trackio starts the project anew (the run folders keep every value)",
        )
        self._storage, self._project, self._run = SQLiteStorage, run.study, run.name
        run_id = run.state.get("run_id")
        if not run_id and run.resume_step is not None:  # an attempt killed before its state was recorded
            record = SQLiteStorage.get_latest_run_record_by_name(self._project, self._run)
            run_id = record["id"] if record else None
        if run_id:
            floor = -1 if run.resume_step is None else run.resume_step
            held: dict[str, list[int]] = {}
            for row in SQLiteStorage.get_logs(self._project, run_id=run_id):
                for key in row.keys() - {"step", "timestamp"}:
                    held.setdefault(key, []).append(row["step"])
            self._held = HeldSteps(floor, held)
        self._run_id = run_id or uuid.uuid4().hex
        if not run_id or SQLiteStorage.get_run_config(self._project, run_id=self._run_id) is None:
            self._config = self._trackio_config(run)
        self._last_step = run.resume_step or 0
        return {"run_id": self._run_id, "project": self._project}

    @staticmethod
    def _trackio_config(run: TrackerRun) -> dict[str, Any]:
        """The flat config as trackio's run config; ``_Group`` is what its dashboard groups runs by."""
        config = {(f"cfg{k}" if k.startswith("_") else k): v for k, v in run.params.items()}  # "_..." is trackio's
        config.update({"_Group": run.study, "_Created": _now()})
        return config

    def log_metrics(self, metrics: dict[str, float], step: int, stream: str) -> None:
        if self._held is not None:
            metrics = self._held.fresh(metrics, step)
        if stream != "hardware":
            self._last_step = max(self._last_step, step)
        if metrics:
            self._pending.append((int(step), dict(metrics), _now(), uuid.uuid4().hex))
        if stream in FLUSH_NOW or time.monotonic() - self._last_flush >= self.flush_secs:
            self.flush()

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.log_metrics({f"summary/{k}": v for k, v in summary.items()}, self._last_step, "summary")

    def flush(self) -> None:
        """Write the buffered rows in one transaction; raises (keeping them buffered) when that fails."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        rows = list(self._pending)
        for attempt in range(WRITE_ATTEMPTS):
            try:
                self._storage.bulk_log(
                    project=self._project,
                    run=self._run,
                    run_id=self._run_id,
                    metrics_list=[r[1] for r in rows],
                    steps=[r[0] for r in rows],
                    timestamps=[r[2] for r in rows],
                    log_ids=[r[3] for r in rows],
                    config=self._config,
                )
                break
            except Exception as exc:
                if attempt + 1 == WRITE_ATTEMPTS or not _busy(exc):
                    raise
                time.sleep(0.5 * (attempt + 1))
        self._config = None
        del self._pending[: len(rows)]

    def close(self, status: str) -> None:
        if self._storage is not None:
            self.flush()
