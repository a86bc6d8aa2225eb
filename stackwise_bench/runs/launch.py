"""The link between a study's launcher and its jobs: stopping a study stops it, and jobs never outlive it.

The launcher (the process that ran ``--multirun``) announces its launch to the jobs it starts
through an environment variable: the launch folder, its host and pid, and whether its jobs
run on this machine (joblib, submitit_local) or belong to a cluster scheduler (Slurm).

* **Ctrl-C or SIGTERM to the launcher** writes ``stop`` in the launch folder. A job that
  has not started yet sees it and returns at once (``stopped``); a running job's watchdog sees it
  within half a second and asks the training loop to save ``last.pt`` and stop. The launcher waits
  for them, prints the table and exits 130 (SIGINT) or 143 (SIGTERM). A second Ctrl-C aborts at once.
* **A launcher that dies** (``kill -9``) cannot write anything. A local job's watchdog notices
  that its pid is gone, stops the job the same way, and ends the worker process, so no orphan
  trains on with nobody to report to. A parent-death signal (Linux ``PR_SET_PDEATHSIG``) is not
  used: it fires when the *thread* that spawned the worker ends, and loky spawns from a helper thread.

Slurm jobs are the scheduler's, not the launcher's: they keep running when the launcher ends.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from stackwise_bench.runs import stopping
from stackwise_bench.runs.lease import pid_alive

log = logging.getLogger(__name__)

LAUNCH_ENV = "STACKWISE_BENCH_LAUNCH"
STOP_FILE = "stop"
POLL_S = 0.5


@dataclasses.dataclass(frozen=True)
class Launch:
    """One launch of a study, as its jobs see it."""

    dir: Path  # <study>/.study/launches/<time>/
    host: str
    pid: int
    local: bool  # its jobs run on this machine and must not outlive it

    @property
    def stop_file(self) -> Path:
        return self.dir / STOP_FILE

    def stopped_by(self) -> str | None:
        """The signal that stopped this launch (``SIGINT``, ``SIGTERM``), or None."""
        try:
            return self.stop_file.read_text().strip() or "SIGTERM"
        except FileNotFoundError:
            return None

    def launcher_gone(self) -> bool:
        return self.local and self.host == socket.gethostname() and not pid_alive(self.pid)


def announce(launch_dir: Path, local: bool) -> Launch:
    """In the launcher: tell the jobs it will start which launch they belong to (inherited environment)."""
    launch = Launch(Path(launch_dir).resolve(), socket.gethostname(), os.getpid(), local)
    os.environ[LAUNCH_ENV] = json.dumps(
        {"dir": str(launch.dir), "host": launch.host, "pid": launch.pid, "local": local}
    )
    return launch


def current() -> Launch | None:
    """In a job: the launch that started it; None outside a study, or under a launcher that did not announce it."""
    raw = os.environ.get(LAUNCH_ENV)
    if not raw:
        return None
    data = json.loads(raw)
    return Launch(Path(data["dir"]), data["host"], int(data["pid"]), bool(data["local"]))


# ---- the launcher's side ------------------------------------------------------------------------
def handle_stop_signals(launch: Launch) -> None:
    """In the launcher: Ctrl-C or SIGTERM writes the stop file (once); a second Ctrl-C aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if launch.stopped_by() is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if launch.stopped_by() is None:
            launch.stop_file.write_text(name + "\n")
            print(
                f"{name}: stopping the study: running jobs save last.pt and stop, no pending job starts "
                "(Ctrl-C again to abort at once).",
                file=sys.stderr,
            )

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def exit_code(stopped_by: str | None) -> int:
    """The shell's code for a process ended by ``stopped_by``: 128 + the signal's number (130, 143); 1 otherwise."""
    try:
        return 128 + signal.Signals[stopped_by].value
    except KeyError:
        return 1


class LauncherLines(logging.Filter):
    """Hydra's launcher lines in the study's words: each job by its folder, no count of jobs that will be skipped.

    Joblib's launcher says "is launching N jobs" and lists each job's full overrides; the study's own line says how
    many of them run and how many are already done, so the count goes and each job is named by its folder
    (``labels``: the overrides as the launcher prints them -> the folder, filled at launch and by the search).
    """

    LOGGERS = ("hydra_plugins.hydra_joblib_launcher._core", "hydra_plugins.hydra_submitit_launcher.submitit_launcher")

    def __init__(self):
        super().__init__()
        self.labels: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Launching jobs, sweep output dir") or " sweep output dir : " in message:
            return False  # the study's own line names the folder
        if message.startswith("Joblib.Parallel(") and " is launching " in message:
            record.msg, record.args = message.split(" is launching ")[0], ()
        elif message.startswith("\t#") and " : " in message:
            number, overrides = message.split(" : ", 1)
            if overrides in self.labels:
                record.msg, record.args = f"{number} : {self.labels[overrides]}", ()
        return True


_lines: LauncherLines | None = None


def launcher_lines() -> LauncherLines:
    """In the launcher: the filter on Hydra's launcher loggers (installed on first use)."""
    global _lines
    if _lines is None:
        _lines = LauncherLines()
        for name in LauncherLines.LOGGERS:
            logging.getLogger(name).addFilter(_lines)
    return _lines


# ---- the job's side -----------------------------------------------------------------------------
class Watchdog:
    """In a job's process: watches the launch for a stop request and the launcher for its death.

    One per process (joblib reuses workers between jobs): :func:`watch` starts it once and points
    it at the current job's launch.
    """

    def __init__(self):
        self.launch: Launch | None = None
        self.busy = False  # a job is running in this process
        self.orphaned = False
        self._thread = threading.Thread(target=self._loop, name="launch-watchdog", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            time.sleep(POLL_S)
            launch = self.launch
            if launch is None:
                continue
            if launch.launcher_gone():
                self.orphaned = True
                if not self.busy:
                    os._exit(1)  # an idle worker of a dead launcher: nothing to save
                stopping.request(f"the launcher of this study (pid {launch.pid}) is gone")
            elif self.busy and launch.stopped_by() is not None:
                stopping.request(f"the study was stopped ({launch.stopped_by()} to its launcher)")


_watchdog: Watchdog | None = None


def watch(launch: Launch | None) -> Watchdog:
    """Point this process's watchdog at ``launch`` (starting it on first use)."""
    global _watchdog
    if _watchdog is None:
        _watchdog = Watchdog()
    _watchdog.launch = launch
    return _watchdog
