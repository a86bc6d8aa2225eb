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
* **Fence**: the heartbeat alone cannot keep a lost holder from writing. A process stopped for longer
  than ``timeout_s`` (SIGSTOP, a Slurm suspend, an NFS stall) resumes mid-step, before its heartbeat
  thread looks. So every write of the run record first calls :meth:`Lease.check`, which reads
  ``.lease`` (one small file) and raises :class:`LeaseLost` unless it still holds this lease's token:
  the lost holder ends without writing anything more, and its failure handlers are fenced too.
  What is left is the moment between that read and the write itself (a rename, an append).
* **Stale**: a lease is taken over when its heartbeat is older than its holder's ``timeout_s``
  (clocks of the hosts must agree to well within that), at once when its holder was on this
  host and its pid is gone, and at once when the holder was an earlier incarnation of this same
  scheduler job (a Slurm requeue has the same job id). The stale lease is renamed aside (only one
  taker's rename succeeds), checked to be the one that was judged stale, and removed; the taker
  then takes the lease as above and reports whom it took it from (``previous_attempts``).
* **Not a lease**: a ``.lease`` that cannot be read as one (garbage, empty, cut short, a pid that is
  not a number, a folder, a link to nothing; :mod:`stackwise_bench.runs.lease_file`) is refused in one
  sentence naming it. Nothing says whether a process still relies on such a file, so it is neither
  taken over by the clock nor waited for. The exclusive-create fallback below writes its lease after
  creating the file: a reader that finds it unreadable reads it again for half a second first.
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
from stackwise_bench.runs.files import check_writable
from stackwise_bench.runs.lease_file import describe, examine, read, write
from stackwise_bench.values import is_number

log = logging.getLogger(__name__)

ON_BUSY = ("skip", "wait")
UNREADABLE_RETRIES = 10  # reads of an unreadable .lease, 0.05 s apart, before it is refused (a lease being written)


class RunBusy(ConfigError):
    """The run folder is held by another live process (skipped, not failed, in a sweep)."""

    reason = "busy"


class LeaseLost(RunBusy):
    """This process's lease on its run folder is another's now: it writes nothing more there (a sweep: busy)."""

    reason = "lease_lost"


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


def why_stale(holder: dict, now: float | None = None) -> str | None:
    """Why the lease ``holder`` (a checked one: :func:`~stackwise_bench.runs.lease_file.examine`) may be taken
    over, or None when its holder is alive."""
    now = time.time() if now is None else now
    if holder.get("job_id") and holder.get("job_id") == job_id() and holder.get("pid") != os.getpid():
        return f"it was held by an earlier run of this same scheduler job ({holder['job_id']})"
    if holder["host"] == socket.gethostname() and not pid_alive(holder["pid"]):
        return f"its holder, pid {holder['pid']} on this host, is gone"
    timeout, age = holder["timeout_s"], now - holder["heartbeat"]
    if age > timeout:
        return f"its heartbeat is {age:.0f} s old, older than its timeout of {timeout:.0f} s"
    return None


@dataclasses.dataclass
class Lease:
    """A held lease on one run folder; release it with :meth:`release` (or use it as a context manager).

    :meth:`check` is the fence every write of the run record calls first.
    """

    path: Path
    content: dict
    took_over: dict | None = None  # the stale holder this lease replaced, with "why"
    key: str = "lease"  # the config key of the lease's settings, for messages
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lost: str | None = None  # why the folder is no longer ours, once the heartbeat or a check saw it

    @property
    def token(self) -> str:
        return self.content["token"]

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless ``.lease`` on disk still holds this lease's token (one small read).

        Called before every write of the run record (:class:`~stackwise_bench.runs.record.RunRecord`'s fence),
        from any thread. Once lost, a lease stays lost: later checks raise without reading.
        """
        if self._lost is None:
            if self._stop.is_set():
                self._lost = f"this process released its lease on {self.path.parent}: it writes nothing more there."
            else:
                current, problem = examine(self.path)
                if problem is not None:  # a taker's lease being written, an NFS hiccup: read again before judging
                    current, problem = _examine_settled(self.path)
                if current is None or current["token"] != self.token:
                    self._lose(current, problem)
        if self._lost is not None:
            raise LeaseLost(self._lost)

    def _lose(self, current: dict | None, problem: str | None) -> None:
        """Remember, in one sentence, that the lease is another's now (``current``) or gone."""
        silent = time.time() - self.content["heartbeat"]
        after = f"after this process's heartbeat stopped for {silent:.0f} s ({self.key}.timeout_s="
        after += f"{self.content['timeout_s']:g})"
        if current is not None:
            who = f"{describe(current)} holds its lease, taken over {after}"
        elif problem is not None:
            who = f"its lease file was replaced {after} by one that is not a lease ({problem})"
        else:
            who = f"its lease was taken over (or removed) {after}, and nobody holds it now"
        self._lost = f"{self.path.parent} is no longer this process's to write: {who}; it ends without writing there."

    def start_heartbeat(self) -> None:
        period = max(0.05, float(self.content["timeout_s"]) / 6)
        self._thread = threading.Thread(target=self._beat, args=(period,), name="run-lease", daemon=True)
        self._thread.start()

    def _beat(self, period: float) -> None:
        while not self._stop.wait(period):
            if not self._refresh():  # the job stops at its next step; its next write raises the one sentence
                stopping.request(self._lost or "", announce=False)
                return

    def _refresh(self) -> bool:
        """Renew the heartbeat while the lease is ours; False (the lease lost) when it is not."""
        beat = time.time()
        tmp = self.path.with_name(f"{self.path.name}.{self.token}.tmp")
        try:
            write(tmp, {**self.content, "heartbeat": beat})
        except OSError as exc:  # a full disk: the lease goes stale, the run itself decides about its files
            log.warning("could not refresh %s (%s)", self.path, exc)
            tmp.unlink(missing_ok=True)
            tmp = None
        # Checked after the slow part (the write and its fsync), just before the rename: a holder stopped in
        # between could still put its lease back over a taker's, and the taker's own fence then stops it.
        current, problem = _examine_settled(self.path)
        if current is None or current["token"] != self.token:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            self._lose(current, problem)
            return False
        if tmp is not None:
            try:
                os.replace(tmp, self.path)
                self.content["heartbeat"] = beat
            except OSError as exc:
                log.warning("could not refresh %s (%s)", self.path, exc)
                tmp.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        """Stop the heartbeat and remove the lease, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = read(self.path)
        if current is not None and current["token"] == self.token:
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
        ConfigError: the folder's ``.lease`` is not a lease (garbage, empty, a pid that is not a number, ...).
    """
    if on_busy not in ON_BUSY:
        raise ConfigError(f"{key}.on_busy={on_busy} is not known; use {key}.on_busy=skip or {key}.on_busy=wait.")
    if not is_number(timeout_s) or not 0 < timeout_s < float("inf"):
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
            lease = Lease(path, content, took_over, key)
            lease.start_heartbeat()
            return lease
        holder = _holder(path)
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
        time.sleep(min(1.0, max(0.05, holder["timeout_s"] / 6)))


def live_holder(run_dir: str | os.PathLike) -> dict | None:
    """Who is writing ``run_dir`` now: its lease when a live process holds one, else None (free, or stale).

    A ``.lease`` that is not a lease (which a launch refuses) is ``{"problem": ...}``, for :func:`describe`.
    """
    holder, problem = examine(Path(run_dir) / LEASE)
    if problem is not None:
        return {"problem": problem}
    return holder if holder is not None and why_stale(holder) is None else None


def _take(path: Path, content: dict) -> bool:
    """Create the lease with ``content`` if nobody holds it; True when it is ours."""
    tmp = path.with_name(f"{path.name}.{content['token']}.tmp")
    write(tmp, content)
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
    current = read(path)
    return current is not None and current["token"] == content["token"]


def _remove_stale(path: Path, holder: dict) -> bool:
    """Move the stale lease ``holder`` aside and delete it; False when the lease there is no longer that one."""
    grave = path.with_name(f"{path.name}.stale.{uuid.uuid4().hex}")
    try:
        os.rename(path, grave)  # atomic: of several takers, one moves it
    except FileNotFoundError:
        return False
    moved = read(grave)
    if moved is None or moved["token"] != holder["token"]:
        # Between our read and the rename, another taker replaced the stale lease with its own live one (maybe
        # still being written): put it back. Where that fails, the taker's fence stops it at its next write.
        try:
            os.link(grave, path)
        except OSError:
            pass
        grave.unlink(missing_ok=True)
        return False
    grave.unlink(missing_ok=True)
    return True


def _holder(path: Path) -> dict | None:
    """The lease at ``path``; None when there is none.

    Raises:
        ConfigError: the file there is not a lease, and stays so for half a second (the exclusive-create
            fallback of :func:`_take` writes a lease into the file it created: read again while it may).
    """
    holder, problem = _examine_settled(path)
    if problem is None:
        return holder
    raise ConfigError(
        f"{path} is not a lease this version can read ({problem}); remove it if no process is writing "
        f"{path.parent}, then launch again."
    )


def _examine_settled(path: Path) -> tuple[dict | None, str | None]:
    """:func:`~stackwise_bench.runs.lease_file.examine`, read again for half a second while the file is not a lease."""
    holder, problem = examine(path)
    for _ in range(UNREADABLE_RETRIES - 1):
        if problem is None:
            break
        time.sleep(0.05)
        holder, problem = examine(path)
    return holder, problem
