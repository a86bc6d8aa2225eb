"""Trackers (TensorBoard, MLflow, trackio, wandb) as sinks of the run record's dicts.

The run record stays the one writer of the run folder and the one source of truth; it hands each dict it
writes to :class:`Trackers` as well, which forwards it to every configured tracker. Trackers never decide
anything, and one that raises (a locked database, a full disk, a package missing at run time) warns once,
is recorded in ``summary.json["loggers"][name]["error"]`` and is not called again: the run goes on.

A tracker is any object with the methods of :class:`Tracker`; the backends are in
:mod:`stackwise_bench.training.loggers` (this module imports none of their packages, so the run record
stays torch- and tracker-free).

Streams and their steps (the x-axis every tracker gets):

========== ===================================== ==============================================
stream      keys                                  step
========== ===================================== ==============================================
train       ``train/loss``, ``train/lr``,          the global optimizer step, every
            ``train/grad_norm``                    ``trainer.log_every_n_steps``
epoch       ``epoch/<metrics.jsonl key>``          the global step at the end of the epoch
diagnostics ``diagnostics/<kind>/<layer>``         the global step (logging steps of ``diagnostics``)
hardware    ``hardware/<hardware.jsonl key>``      the sample's ``seq``: 0, 1, 2, ... over the run's life
test        ``test/<key>``                         the global step the run ended at
========== ===================================== ==============================================

A resumed run continues from its checkpoint's global step ``S``; the attempt before it may have logged steps
after ``S``. :attr:`TrackerRun.resume_step` tells the tracker so: it must end up with one value per
(key, step), never two (TensorBoard purges the later steps, the others skip steps they already hold).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from stackwise_bench.runs.lease import LeaseLost
from stackwise_bench.values import is_number

log = logging.getLogger(__name__)

STREAMS = ("train", "epoch", "diagnostics", "hardware", "test")
# Which keys of a hardware sample are not measurements (they are the sample's place in time).
NOT_METRICS = {
    "hardware": ("t", "time", "seq"),
    "epoch": (),
    "train": ("step", "epoch"),
    "diagnostics": ("step", "time"),
}
# The end-of-run weight statistics (diagnostics' ``kind: weights`` row: norm, mean, std, ...) go under this prefix:
# ``weight_norm`` is then the same tag family as the logging steps' per-layer ``weight_norm``, one chart per statistic.
# (Before, they were ``weights_norm`` and so on: two near-duplicate families.)
FINAL_WEIGHTS_PREFIX = "weight_"


@dataclasses.dataclass
class TrackerRun:
    """What a tracker needs to open (or continue) the run it logs to.

    Attributes:
        run_dir: The run folder (TensorBoard's and wandb's files go under it).
        name: The run folder's name: the tracker run's name (a sweep job's override string).
        study: The study's name (``cfg.study``): MLflow's experiment, trackio's project, wandb's group.
        study_dir: The folder the study's jobs share (``multirun/<study>``): shared stores live under it.
        config: The resolved config, for a tracker's own records (``params`` is its flat form).
        params: The flattened config (``a.b.c`` keys), logged once as the tracker run's parameters.
        state: What this tracker returned from :meth:`Tracker.open` in an earlier attempt of this run (its run
            id), or ``{}`` for a new run or where that attempt died before recording it.
        resume_step: The global step the run continues from (a resume), or None for a run from scratch.
    """

    run_dir: Path
    name: str
    study: str
    study_dir: Path
    config: dict
    params: dict
    state: dict
    resume_step: int | None


class Tracker(Protocol):
    """The interface of a tracker backend; ``name`` keys its entry in ``summary.json["loggers"]``."""

    name: str

    def open(self, run: TrackerRun) -> dict:
        """Open (or continue) the tracker run; return what a resume needs to find it again (a run id)."""

    def log_metrics(self, metrics: dict[str, float], step: int, stream: str) -> None:
        """Log finite numbers under flat keys at ``step``."""

    def log_summary(self, summary: dict[str, Any]) -> None:
        """The final summary's numbers (flat keys), once at the end."""

    def close(self, status: str) -> None:
        """Flush and close; ``status`` is the run's final status."""


def run_of(run_dir: Path, summary: dict, resume_step: int | None) -> TrackerRun:
    """The :class:`TrackerRun` of the run recorded in ``run_dir`` with ``summary`` (its trackers' states included)."""
    run = summary.get("run") or {}
    config = summary.get("config") or {}
    return TrackerRun(
        run_dir=run_dir.resolve(),
        name=run_dir.name,
        study=run.get("study") or "default",
        study_dir=run_dir.resolve().parent,
        config=config,
        params=flatten(config, sep="."),
        state={k: (v or {}).get("state") or {} for k, v in (summary.get("loggers") or {}).items()},
        resume_step=resume_step,
    )


def by_statistic(row: Mapping[str, Any]) -> dict:
    """A diagnostics row keyed for trackers by statistic, then layer: ``grad_norm/stage1.0``, ``act_rms/head``.

    A tracker then shows one chart per statistic with a line per layer; the final weights' ``norm`` joins the
    logging steps' ``weight_norm`` (:data:`FINAL_WEIGHTS_PREFIX`).
    """
    out = {k: v for k, v in row.items() if k not in ("layers", "activations", "kind", "epoch")}
    prefix = FINAL_WEIGHTS_PREFIX if row.get("kind") == "weights" else ""
    for section, tag in (("layers", prefix), ("activations", "act_")):
        for layer, stats in (row.get(section) or {}).items():
            for stat, value in stats.items():
                out[f"{tag}{stat}/{layer}"] = value
    return out


def flatten(node: Mapping, prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Nested dicts as one level of ``prefix<sep>key<sep>subkey`` keys (lists and scalars are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def numbers(flat: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a flat dict (None, text, lists, NaN and booleans are no tracker's metric)."""
    out = {}
    for key, value in flat.items():
        if not is_number(value):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class Trackers:
    """Forwards the record's dicts to each tracker on a writer thread; a tracker that raises is dropped and recorded.

    The training loop and the monitor thread only flatten a dict and queue it: a tracker's I/O (an MLflow batch, a
    trackio lock, wandb's start-up) never stalls a step or a hardware sample, and never skews ``train_img_s``.
    The writer thread opens the trackers at the first dict, with the :class:`TrackerRun` that ``run_info``
    returns when it is queued (a resumed run knows its ``resume_step`` only once the trainer has read its
    checkpoint). :meth:`close` waits for the queue to drain (at most ``timeout_s``), closes every tracker and
    calls ``report`` with ``{name: {"state": ..., "error": ...}}`` for ``summary.json["loggers"]``, on the
    caller's thread; :meth:`status` gives the same while the run goes on.

    ``fence`` (the run record's) is called before every dict reaches a tracker: once it raises
    :class:`~stackwise_bench.runs.lease.LeaseLost`, the run folder is another process's, and the trackers
    are left as they are (not even closed: a close flushes into the folder) and nothing is reported.
    """

    def __init__(
        self,
        trackers: list[Tracker],
        run_info: Callable[[], TrackerRun],
        report: Callable[[dict], None],
        timeout_s: float = 120.0,
        fence: Callable[[], None] | None = None,
    ):
        self._trackers = list(trackers)
        self._run_info = run_info
        self._report = report
        self.timeout_s = timeout_s
        self._fence = fence
        self._fenced = False  # the fence tripped: nothing more reaches a tracker
        self._lock = threading.Lock()  # guards _status and the writer's start
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._status: dict[str, dict] = {t.name: {"state": {}, "error": None} for t in self._trackers}

    def __bool__(self) -> bool:
        return bool(self._status)

    @property
    def started(self) -> bool:
        """Whether any dict reached the trackers (they are open, or opening)."""
        return self._thread is not None

    def status(self) -> dict[str, dict]:
        """A copy of every tracker's ``state`` and ``error`` so far."""
        with self._lock:
            return {name: dict(entry) for name, entry in self._status.items()}

    # ---- forwarding (any thread) ------------------------------------------------------------------
    def log(self, stream: str, row: Mapping[str, Any], step: int) -> None:
        """Log a record row of ``stream`` at ``step``: its numbers, flattened under ``<stream>/``."""
        if not self._trackers or self._closed or self._fenced:
            return
        skip = NOT_METRICS.get(stream, ())
        metrics = numbers(flatten({k: v for k, v in row.items() if k not in skip}, prefix=stream))
        if metrics:
            self._put(("log", metrics, int(step), stream))

    def summary(self, summary: Mapping[str, Any]) -> None:
        """The final summary's numbers (``train.*``, ``test.*``, ``resources.*``, ``params.*``)."""
        if not self._trackers or self._closed or self._fenced:
            return
        keep = {k: summary.get(k) for k in ("train", "test", "resources", "params") if isinstance(summary.get(k), dict)}
        self._put(("summary", numbers(flatten(keep, sep="."))))

    def close(self, status: str) -> None:
        """Drain the queue, close every tracker (once) and report; trackers never opened are not opened for this."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        self._queue.put(("close", status))
        thread.join(self.timeout_s)
        if thread.is_alive():  # a tracker hangs (a lock held elsewhere): the run's record does not wait for it
            with self._lock:
                for entry in self._status.values():
                    if entry["error"] is None:
                        entry["error"] = f"TimeoutError: still writing after {self.timeout_s:.0f} s; left behind"
            log.warning("trackers still writing after %.0f s: left behind (the run record is complete)", self.timeout_s)
        if not self._fenced:  # else the folder is another process's: its summary is not ours to write
            self._report(self.status())

    def _put(self, item: tuple) -> None:
        with self._lock:
            if self._thread is None:
                run = self._run_info()  # here, on the caller's thread: the record's state as the first dict leaves
                self._thread = threading.Thread(target=self._write, args=(run,), name="trackers", daemon=True)
                self._thread.start()
        self._queue.put(item)

    # ---- the writer thread ------------------------------------------------------------------------
    def _write(self, run: TrackerRun) -> None:
        if not self._may_write():
            return
        for tracker in list(self._trackers):
            state = self._guarded(
                tracker, "open", dataclasses.replace(run, state=dict(run.state.get(tracker.name) or {}))
            )
            with self._lock:
                self._status[tracker.name]["state"] = dict(state or {})
        while True:
            kind, *args = self._queue.get()
            if not self._may_write():
                return
            method = {"log": "log_metrics", "summary": "log_summary", "close": "close"}[kind]
            for tracker in list(self._trackers):
                self._guarded(tracker, method, *args)
            if kind == "close":
                return

    def _may_write(self) -> bool:
        """Whether the run folder is still this process's (the fence passes); once not, it never is again."""
        if self._fence is not None and not self._fenced:
            try:
                self._fence()
            except LeaseLost:
                self._fenced = True
        return not self._fenced

    def _guarded(self, tracker: Tracker, method: str, *args: Any) -> Any:
        """``tracker.<method>(*args)``; a failure drops the tracker (warned once, recorded), never reaches the run."""
        try:
            return getattr(tracker, method)(*args)
        except Exception as exc:  # noqa: BLE001 - any failure of a tracker is the tracker's, not the run's
            self._trackers.remove(tracker)
            message = f"{type(exc).__name__}: {exc}".strip()
            with self._lock:
                self._status[tracker.name]["error"] = message
            log.warning(
                "logger %s failed and is off for the rest of this run (training goes on): %s", tracker.name, message
            )
            if method != "close":
                try:
                    tracker.close("failed")
                except Exception:  # noqa: BLE001 - it has already failed once; its close may too
                    pass
            return None
