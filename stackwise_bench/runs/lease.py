"""One writer per run folder: a lease file with the holder's host, pid, start time and a heartbeat.

Two launches of one study, a relaunch while a sweep still runs, a Slurm array resubmitted by
hand: each would otherwise train the same job into the same folder and take the other's
``running`` status for an interrupted run. A job takes the folder's lease before it reads
or writes anything there, and gives it back when it ends.

How the lease is taken works on NFS and Lustre, where ``fcntl`` locks are unreliable:

* **Take**: the lease is written whole to a private file, then hard-linked to ``.lease``.
  ``link`` is atomic on NFS and fails when the name exists, so exactly one process wins, and
  a reader never sees a half-written lease. Reading the lease back confirms the win (an NFS
  ``link`` can report an error after it succeeded, or success after a retransmit).
* **Heartbeat**: a daemon thread rewrites the lease (temporary file, ``os.replace``) every
  ``timeout_s / 6`` seconds. A holder that finds someone else's token there has lost the folder
  and asks its job to stop (:mod:`stackwise_bench.runs.stopping`).
* **Stale**: a lease is taken over when its heartbeat is older than its holder's ``timeout_s``
  (clocks of the hosts must agree to well within that), at once when its holder was on this
  host and its pid is gone, and at once when the holder was an earlier incarnation of this same
  scheduler job (a Slurm requeue has the same job id). The stale lease is renamed aside (only one
  taker's rename succeeds), checked to be the one that was judged stale, and removed; the taker
  then takes the lease as above and reports whom it took it from (``previous_attempts``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from stackwise_bench.errors import ConfigError
from stackwise_bench.runs import stopping
from stackwise_bench.runs.contract import LEASE
from stackwise_bench.runs.files import atomic_write_text, check_writable

log = logging.getLogger(__name__)

ON_BUSY = ("skip", "wait")


class RunBusy(ConfigError):
    """The run folder is held by another live process (skipped, not failed, in a sweep)."""

    reason = "busy"


def job_id() -> str | None:
    """The scheduler's id of this job, the same across its requeues (Slurm, or submitit's local controller)."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process on this host (a zombie, dead but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): kill(0) said it exists
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def describe(holder: dict) -> str:
    """``pid 123 on host gpu7 (since 2026-11-29T01:02:03+00:00, heartbeat 4 s ago)``."""
    age = time.time() - float(holder.get("heartbeat", 0))
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} "
        f"(since {holder.get('started_at')}, heartbeat {age:.0f} s ago)"
    )


def why_stale(holder: dict, now: float | None = None) -> str | None:
    """Why the lease ``holder`` may be taken over, or None when its holder is alive."""
    now = time.time() if now is None else now
    if holder.get("job_id") and holder.get("job_id") == job_id() and holder.get("pid") != os.getpid():
        return f"it was held by an earlier run of this same scheduler job ({holder['job_id']})"
    if holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid") or 0)):
        return f"its holder, pid {holder.get('pid')} on this host, is gone"
    timeout = float(holder.get("timeout_s") or 0)
    age = now - float(holder.get("heartbeat") or 0)
    if timeout and age > timeout:
        return f"its heartbeat is {age:.0f} s old, older than its timeout of {timeout:.0f} s"
    return None


@dataclasses.dataclass
class Lease:
    """A held lease on one run folder; release it with :meth:`release` (or use :func:`hold`)."""

    path: Path
    content: dict
    took_over: dict | None = None  # the stale holder this lease replaced, with "why"
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return self.content["token"]

    def start_heartbeat(self) -> None:
        period = max(0.05, float(self.content["timeout_s"]) / 6)
        self._thread = threading.Thread(target=self._beat, args=(period,), name="run-lease", daemon=True)
        self._thread.start()

    def _beat(self, period: float) -> None:
        while not self._stop.wait(period):
            current = _read(self.path)
            if current is None or current.get("token") != self.token:
                who = describe(current) if current else "nobody"
                stopping.request(f"the lease on {self.path.parent} was taken over by {who}")
                return
            self.content["heartbeat"] = time.time()
            try:
                atomic_write_text(self.path, json.dumps(self.content))
            except OSError as exc:  # a full disk: the lease goes stale, the run itself decides about its files
                log.warning("could not refresh %s (%s)", self.path, exc)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = _read(self.path)
        if current is not None and current.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(run_dir: str | os.PathLike, timeout_s: float = 120.0, on_busy: str = "skip", key: str = "lease") -> Lease:
    """Take the lease on ``run_dir`` (creating the folder), with its heartbeat running.

    Args:
        run_dir: The run folder.
        timeout_s: A lease whose heartbeat is older than this is stale; the heartbeat runs at a sixth of it.
        on_busy: ``skip`` raises :class:`RunBusy` when a live process holds the folder; ``wait`` waits
            until it lets go (or goes stale).
        key: The config key that holds these settings, for messages.

    Raises:
        RunBusy: another live process holds the lease and ``on_busy`` is ``skip``.
    """
    if on_busy not in ON_BUSY:
        raise ConfigError(f"{key}.on_busy={on_busy} is not known; use {key}.on_busy=skip or {key}.on_busy=wait.")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
        raise ConfigError(
            f"{key}.timeout_s={timeout_s} must be a positive number of seconds; use e.g. {key}.timeout_s=120."
        )
    path = Path(run_dir) / LEASE
    check_writable(path.parent, "hydra.run.dir")
    content = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": job_id(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "heartbeat": time.time(),
        "timeout_s": float(timeout_s),
        "token": uuid.uuid4().hex,
    }
    took_over, waited = None, False
    while True:
        content["heartbeat"] = time.time()
        if _take(path, content):
            lease = Lease(path, content, took_over)
            lease.start_heartbeat()
            return lease
        holder = _holder(path, timeout_s)
        if holder is None:  # released between our attempt and the read
            continue
        why = why_stale(holder)
        if why is not None:
            if _remove_stale(path, holder):
                took_over = {**holder, "why": why}
                log.warning("took over the lease on %s from %s: %s", path.parent, describe(holder), why)
            continue
        if on_busy == "skip":
            raise RunBusy(
                f"{path.parent} is being written by {describe(holder)}; let that process "
                f"finish, or set {key}.on_busy=wait to wait for it."
            )
        if not waited:
            log.warning("%s is being written by %s: waiting for it to finish", path.parent, describe(holder))
            waited = True
        time.sleep(min(1.0, max(0.05, float(holder.get("timeout_s") or timeout_s) / 6)))


def live_holder(run_dir: str | os.PathLike) -> dict | None:
    """Who is writing ``run_dir`` now: its lease when a live process holds one, else None (free, or stale)."""
    holder = _read(Path(run_dir) / LEASE)
    return holder if holder is not None and why_stale(holder) is None else None


def _take(path: Path, content: dict) -> bool:
    """Create the lease with ``content`` if nobody holds it; True when it is ours."""
    tmp = path.with_name(f"{path.name}.{content['token']}.tmp")
    _write(tmp, content)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: exclusive create, then the content
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(content))
    finally:
        tmp.unlink(missing_ok=True)
    current = _read(path)
    return current is not None and current.get("token") == content["token"]


def _remove_stale(path: Path, holder: dict) -> bool:
    """Move the stale lease ``holder`` aside and delete it; False when the lease there is no longer that one."""
    grave = path.with_name(f"{path.name}.stale.{uuid.uuid4().hex}")
    try:
        os.rename(path, grave)  # atomic: of several takers, one moves it
    except FileNotFoundError:
        return False
    moved = _read(grave)
    if moved is not None and moved.get("token") != holder.get("token"):
        # Between our read and the rename, another taker replaced the stale lease with its own live one: put it back.
        try:
            os.link(grave, path)
        except FileExistsError:
            pass
        grave.unlink(missing_ok=True)
        return False
    grave.unlink(missing_ok=True)
    return True


def _holder(path: Path, timeout_s: float) -> dict | None:
    """The lease at ``path``; None when there is none. An unreadable one (a crash while the exclusive-create
    fallback wrote it) counts as a holder whose heartbeat is the file's modification time."""
    holder = _read(path)
    if holder is not None:
        return holder
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return {"pid": None, "host": None, "heartbeat": mtime, "timeout_s": timeout_s, "token": None}


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write(path: Path, content: dict) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(content))
        f.flush()
        os.fsync(f.fileno())
