"""Starting the ranks of a run on several devices (``trainer.devices=N``), and stopping them together.

Three ways a job gets its ranks, one result (a :class:`~.distributed.Group` in every rank):

* **By itself** (a single run, every ``--multirun`` launcher on one machine): the job's process is rank 0 and
  starts ranks 1..N-1 with the ``spawn`` method. The run folder is the job's, decided before they start.
* **torchrun** (``torchrun --nproc_per_node=N -m stackwise_bench.train ...``) or **Slurm** tasks
  (``hydra.launcher.tasks_per_node=N``, whose ranks submitit describes): the launcher starts every rank, each
  runs Hydra, and rank 0's run folder is the one they all use (a ``${now:}`` folder differs per rank).
* **Failure**: a rank that raises sends its error to rank 0 and leaves the group, a rank killed outright closes
  its sockets, so rank 0's next collective fails within seconds and its record names the rank and the error.
  Rank 0's watchdog (spawned ranks) notices a dead rank even between collectives; each spawned rank exits when
  rank 0's process is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator

import torch

from stackwise_bench.errors import ConfigError
from stackwise_bench.training.distributed import STRATEGIES, Group, init_group, leave_group

log = logging.getLogger(__name__)


class RankFailed(RuntimeError):
    """Another rank of the run failed or died; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class World:
    """How many ranks a job has, how it trains across them, and who started them."""

    size: int
    strategy: str
    launcher: str  # "self" (this job spawns them), "torchrun" or "slurm"
    rank: int = 0
    local_rank: int = 0
    address: str = ""  # tcp://host:port of rank 0's store


def plan(trainer, device_kind: str) -> World | None:
    """The job's world from ``trainer.devices``/``trainer.strategy`` and its launcher's environment; None for one
    device. Refuses, before any rank starts, what cannot run: one sentence naming the key.

    ``device_kind``: ``cuda`` or ``cpu``, where the ranks compute.
    """
    devices, strategy = trainer.get("devices", 1), trainer.get("strategy")
    launched = _launched()
    if launched is not None:
        if devices not in (1, launched.size):
            raise ConfigError(
                f"trainer.devices={devices}, but {launched.launcher} started {launched.size} ranks; "
                f"use trainer.devices={launched.size} (or leave it at 1 to take the launcher's count)."
            )
        devices = launched.size
    if devices == 1:
        return None
    strategy = strategy or "ddp"
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"trainer.strategy={strategy!r} is not one of {', '.join(STRATEGIES)}; use trainer.strategy=ddp."
        )
    if launched is None:
        _check_available(devices, device_kind)
        return World(devices, strategy, "self")
    return dataclasses.replace(launched, strategy=strategy)


def _check_available(devices: int, kind: str) -> None:
    if kind == "cuda":
        have, what = torch.cuda.device_count(), "GPUs"
    else:
        have, what = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(), "CPU cores"
    if devices > have:
        raise ConfigError(
            f"trainer.devices={devices} is more than the {have} {what} this machine has; use trainer.devices<={have}."
        )


def _launched() -> World | None:
    """The ranks torchrun or Slurm (through submitit) started, from their environment; None when neither did."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        address = f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '29500')}"
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        return World(int(os.environ["WORLD_SIZE"]), "", "torchrun", rank, local, address)
    if int(os.environ.get("SLURM_NTASKS", os.environ.get("SUBMITIT_LOCAL_NTASKS", "1"))) <= 1:
        return None
    try:
        from submitit.helpers import TorchDistributedEnvironment

        env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    except Exception:  # not a submitit job: one process of a plain srun, say
        return None
    address = f"tcp://{env.master_addr}:{env.master_port}"
    return World(env.world_size, "", "slurm", env.rank, env.local_rank, address)


def rank_device(world: World, device_kind: str) -> str:
    """The device of this rank: its local GPU, or the CPU."""
    if device_kind != "cuda":
        return "cpu"
    return f"cuda:{world.local_rank % max(1, torch.cuda.device_count())}"


def rank_threads(world: World, share: int | None) -> int:
    """Torch threads per rank: the job's share of the cores (all of them for a single run) split between its ranks
    on this machine."""
    cores = share or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    local = world.size if world.launcher == "self" else int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    return max(1, cores // max(1, local))


@contextlib.contextmanager
def started(world: World, device_kind: str, follower: Callable, args: tuple) -> Iterator[Ranks]:
    """This process joined to its world: when it starts the ranks itself, ranks 1..N-1 run ``follower(group,
    *args)`` in spawned processes. On the way out the group is left (a rank still waiting fails at once) and the
    spawned ranks are joined, or stopped after a grace period."""
    procs, errors = [], None
    if world.launcher == "self":
        import torch.multiprocessing as mp

        world = dataclasses.replace(world, address=f"tcp://127.0.0.1:{_free_port()}")
        ctx = mp.get_context("spawn")
        errors = ctx.SimpleQueue()
        with _spawn_default():
            for rank in range(1, world.size):
                spec = dataclasses.replace(world, rank=rank, local_rank=rank)
                proc = ctx.Process(
                    target=_rank_main, args=(spec, device_kind, follower, args, errors, os.getpid()), daemon=False
                )
                proc.start()
                procs.append(proc)
    ranks = Ranks(world, procs, errors)
    try:
        ranks.group = init_group(world.rank, world.size, world.strategy, world.address, _device(world, device_kind))
        ranks.watch()
        yield ranks
    finally:
        ranks.close()


@contextlib.contextmanager
def _spawn_default() -> Iterator[None]:
    """``spawn`` as the process-wide start method while ranks start: a spawned child sets the parent's default,
    and in a joblib worker that is ``loky``, which a fresh interpreter does not know."""
    import multiprocessing

    old = multiprocessing.get_start_method(allow_none=True)
    if old in (None, "spawn", "fork", "forkserver"):
        yield
        return
    multiprocessing.set_start_method("spawn", force=True)
    try:
        yield
    finally:
        multiprocessing.set_start_method(old, force=True)


class Ranks:
    """Rank 0's view of the ranks it spawned: who failed and why, and their end."""

    def __init__(self, world: World, procs: list, errors):
        self.world, self.procs, self.errors = world, procs, errors
        self.group: Group | None = None
        self._done = threading.Event()

    def watch(self) -> None:
        """A thread that notices a spawned rank's death and leaves the group, so this rank stops waiting."""
        if not self.procs:
            return

        def loop() -> None:
            while not self._done.wait(0.5):
                dead = [p for p in self.procs if p.exitcode not in (None, 0)]
                if dead:
                    log.error("%s; stopping the run's other ranks", self._why(dead[0]))
                    for proc in self.procs:
                        if proc.exitcode is None:
                            proc.terminate()
                    return

        threading.Thread(target=loop, name="ranks-watchdog", daemon=True).start()

    def _why(self, proc) -> str:
        rank = self.procs.index(proc) + 1
        code = proc.exitcode
        if code is not None and code < 0:
            return f"rank {rank} was killed by {signal.Signals(-code).name}"
        return f"rank {rank} exited with code {code}"

    def explain(self, exc: BaseException) -> BaseException:
        """The error to record when this rank failed: another rank's, when one failed first (its message),
        else ``exc``."""
        reported = self._reported(wait_s=5.0 if self.procs else 0.0)
        if reported:
            return RankFailed(reported)
        dead = [p for p in self.procs if p.exitcode not in (None, 0)]
        if dead:
            return RankFailed(f"{self._why(dead[0])} ({type(exc).__name__} here: {str(exc).splitlines()[0][:200]})")
        return exc

    def _reported(self, wait_s: float) -> str | None:
        if self.errors is None:
            return None
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not self.errors.empty():
                return self.errors.get()
            if all(p.exitcode is not None for p in self.procs):
                return self.errors.get() if not self.errors.empty() else None
            time.sleep(0.1)
        return None

    def close(self) -> None:
        self._done.set()
        leave_group()
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.exitcode is None:
                proc.terminate()
                proc.join(timeout=5)


def _rank_main(world: World, device_kind: str, follower: Callable, args: tuple, errors, parent: int) -> None:
    """A spawned rank: join the group, run ``follower``, report an error to rank 0; exit when rank 0 is gone."""
    os.environ.update(RANK=str(world.rank), WORLD_SIZE=str(world.size), LOCAL_RANK=str(world.local_rank))
    threading.Thread(target=_exit_with, args=(parent,), name="rank0-watch", daemon=True).start()
    try:
        group = init_group(world.rank, world.size, world.strategy, world.address, _device(world, device_kind))
        follower(group, *args)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, then this rank ends
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            log.error("rank %d failed", world.rank, exc_info=exc)  # its traceback, on this job's stderr
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        errors.put(f"rank {world.rank} failed: {last}")
        leave_group()
        os._exit(1)
    leave_group()


def _exit_with(parent: int) -> None:
    """End this spawned rank once rank 0's process is gone (killed outright, it cannot say so)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _device(world: World, kind: str) -> torch.device:
    return torch.device(rank_device(world, kind))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
