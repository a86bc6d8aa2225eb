"""One Hydra job, single or in a sweep: the protocol around the work an app does.

:func:`run_job` is what ``train`` and ``evaluate``'s study app call from their
``@hydra.main`` function. Around the app's task it: refuses a sweep job whose config
changed since launch (:mod:`stackwise_bench.runs.study`), gives a parallel job its
share of the cores and a GPU of its own, turns bad input into one sentence (exit 2
for a single run), keeps a failing sweep job from stopping the others, reports the
job's outcome for the end-of-sweep table, and hands cached GPU memory back (joblib
reuses its worker processes between jobs).

Importing this module registers the ``${sb.n_jobs:}`` resolver that
``conf/hydra/launcher/joblib.yaml`` uses, so every process that composes or
launches a config (the launcher and each worker) has it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from stackwise_bench.errors import ConfigError
from stackwise_bench.runs import noise, output_dir, stopping
from stackwise_bench.runs.contract import FINISHED, IMAGE_CLASSIFICATION, read_summary
from stackwise_bench.runs.files import atomic_write_text
from stackwise_bench.runs.launch import Launch, current, exit_code, watch
from stackwise_bench.runs.lease import RunBusy, pid_alive
from stackwise_bench.runs.naming import SINGLE
from stackwise_bench.runs.provenance import fingerprint
from stackwise_bench.runs.study import (
    LAUNCH_FILE,
    RELAUNCH,
    STUDY_DIR,
    current_path,
    launches_dir,
    outcome_path,
    read_record,
)
from stackwise_bench.values import is_number

log = logging.getLogger(__name__)

# conf/hydra/launcher/{joblib,submitit_local,submitit_slurm}.yaml deliberately shadow the plugins' options of
# the same names, so `hydra/launcher=submitit_slurm` gets our defaults; Hydra still validates them against the
# plugin's schema (catching typos) and warns that this is deprecated.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")
noise.quiet()  # torch's deprecation lines when peft imports torchao: by logger and message, nothing else


# The exit code of a single run that failed in a way its record explains (error.reason); ConfigError exits 2.
FAILURE_EXIT = {"diverged": 3, "io": 1}


@dataclasses.dataclass(frozen=True)
class Job:
    """What Hydra says about the job being run, as plain values."""

    run_dir: Path
    name: str  # the sweep's folder name for this job (override_dirname); "" for a single run
    overrides: list[str]
    choices: dict
    sweeping: bool
    sweep_dir: Path | None
    threads: int | None = None  # a parallel job's share of the cores (None: a single run decides itself)
    device: str | None = None  # the GPU of this job's slot, when a sweep spreads over several


def run_job(cfg: DictConfig, task: Callable[[DictConfig, Job], dict]) -> float | None:
    """Run ``task(cfg, job)`` inside the sweep protocol; returns the summary's ``test.top1`` (Hydra's return value)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    sweeping = hc.mode == RunMode.MULTIRUN
    if launched_rank() > 0:  # a rank > 0 that torchrun or Slurm started: rank 0 reports the job, this one follows
        task(cfg, Job(Path(hc.runtime.output_dir), "", list(hc.overrides.task), {}, sweeping, None))
        return None
    job = Job(
        run_dir=Path(hc.runtime.output_dir),
        name=folder_name(hc.runtime.output_dir, hc.sweep.dir) if sweeping else "",
        overrides=list(hc.overrides.task),
        choices=OmegaConf.to_container(hc.runtime.choices),
        sweeping=sweeping,
        sweep_dir=Path(hc.sweep.dir) if sweeping else None,
    )
    if not sweeping:
        stopping.clear()
        try:
            summary = task(cfg, job)
        except ConfigError as exc:  # RunBusy included: another process is writing hydra.run.dir
            log.error("%s", exc)
            if not isinstance(exc, RunBusy):  # refused before any work: the folder this launch made goes
                output_dir.discard(job.run_dir)
            sys.exit(2)
        except Exception as exc:  # a diverged run or a failed write: summary.json holds its traceback, here one line
            code = FAILURE_EXIT.get(getattr(exc, "reason", None))
            if code is None:
                raise
            log.error("%s: %s", exc.reason, exc)
            sys.exit(code)
        finally:
            release_memory()
        if summary.get("status") == "interrupted":  # saved, but not finished: `train && analyze` must not go on
            stopped_by = (summary.get("run") or {}).get("stopped_by")
            log.error(
                "stopped (%s) with checkpoints/last.pt saved; continue with hydra.run.dir=%s trainer.resume=true",
                stopped_by,
                job.run_dir,
            )
            sys.exit(exit_code(stopped_by))
        return _top1(summary)
    try:
        launch = launch_of(job.sweep_dir)
    except ConfigError as exc:  # no launch to report to: the job's one line is all there is
        log.error("job %s: %s", job.name, exc)
        return None
    watchdog = watch(launch)
    stopping.clear()  # joblib reuses this process: an earlier job's stop request is not this job's
    if launch.stopped_by() is not None:
        record_outcome(launch.dir, job.name, "stopped", "the study was stopped before this job started")
        return None
    watchdog.busy = True
    status, reason, summary, before = "failed", "", {}, {}
    started = time.monotonic()
    prefix = log_prefix(job.name or SINGLE)
    try:
        before = read_summary(job.run_dir) or {}  # what the folder held before this job: done, or to resume
        refused = check_launch_record(launch.dir, job.name, fingerprint(cfg))
        if refused:
            raise ConfigError(refused)
        n_jobs = hc.launcher.get("n_jobs") or 1
        threads = hc.launcher.get("cpus_per_task") or cores_per_job(n_jobs)  # n_jobs >= 1: check_launcher
        with gpu_slot(job.sweep_dir) as device:
            summary = task(cfg, dataclasses.replace(job, threads=threads, device=device))
        status = summary["status"]
        if status == "interrupted":
            reason = (summary.get("run") or {}).get("stopped_by") or ""
        if before and before.get("run", {}).get("started_at") == summary.get("run", {}).get("started_at"):
            status = "skipped"  # the folder already held this run, finished
    except RunBusy as exc:  # another launch is training this job: not a failure, and not ours to report on
        log.warning("job %s: %s", job.name, exc)
        status, reason = "busy", str(exc)
    except ConfigError as exc:  # UnreadableSummary and NewerRecord included
        log.error("%s", exc)
        status, reason = "refused" if before.get("status") in FINISHED else "failed", str(exc)
    except Exception as exc:
        status, reason = "failed", one_line(exc)
        if reason.startswith("diverged"):
            log.error("job %s %s", job.name, reason)
        else:
            log.exception("job %s failed", job.name)
    finally:
        release_memory()
        prefix.close()
    record_outcome(launch.dir, job.name, status, reason, headline(summary), time.monotonic() - started)
    watchdog.busy = False
    if watchdog.orphaned:  # its launcher is gone: the job saved and recorded itself; nobody will send another
        log.warning("the launcher of this study is gone: this worker ends")
        os._exit(1)
    return _top1(summary)


def launched_rank() -> int:
    """This process's rank when torchrun or Slurm tasks (through submitit) started several; 0 otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("RANK", "0"))
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    if int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1:
        return int(os.environ.get("SUBMITIT_LOCAL_GLOBALID", "0"))
    return 0


def ranks_launched() -> bool:
    """Whether torchrun or Slurm started this job's process as one of several ranks."""
    return any(int(os.environ.get(k, "1")) > 1 for k in ("WORLD_SIZE", "SLURM_NTASKS", "SUBMITIT_LOCAL_NTASKS"))


def launch_of(sweep_dir: Path) -> Launch:
    """The launch this job belongs to: announced by its launcher, else the study's latest (another launcher)."""
    launch = current()
    if launch is not None:
        return launch
    path = current_path(sweep_dir)
    latest = read_record(path, "launch", RELAUNCH)["launch"] if path.exists() else "_"
    return Launch(launches_dir(sweep_dir) / str(latest), host="", pid=0, local=False)


def check_launch_record(launch_dir: Path, job_name: str, fp: str) -> str | None:
    """Why this job must not run (its config changed since its launch), or None."""
    path = Path(launch_dir) / LAUNCH_FILE
    if not path.exists():
        return None
    jobs = read_record(path, "jobs", RELAUNCH)["jobs"] or {}
    planned = jobs.get(job_name)
    if planned is None and jobs:  # a grid planned its folders: a job outside them would train unseen, and again
        return (
            f"job folder {job_name} is not one this launch planned (its name is missing from the study's "
            ".study/folders.json, or the preset changed hydra.job.config.override_dirname); relaunch the study."
        )
    if planned is None or planned["fingerprint"] == fp:
        return None
    return (
        f"the config of job {job_name} changed after the study was launched (an edit to conf/ while it ran); "
        "relaunch the study to run it with the edited config."
    )


def record_outcome(
    launch_dir: Path,
    job_name: str,
    status: str,
    reason: str = "",
    metric: dict | None = None,
    wall_s: float | None = None,
) -> None:
    """How the job ended, for its launch's closing table (``StudyCallback.on_multirun_end``).

    ``metric``: ``{"name": "test.top1", "value": ...}``, the task's headline metric; ``wall_s``: this job's time.
    """
    path = outcome_path(launch_dir, job_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    outcome = {"status": status, "reason": reason, "metric": metric, "wall_s": wall_s}
    atomic_write_text(path, json.dumps(outcome, default=str) + "\n")


def headline(summary: dict) -> dict | None:
    """The task's headline test metric of a job's summary (``test.<task.metric>``), or None where it has none."""
    metric = (summary.get("task") or {}).get("metric") or IMAGE_CLASSIFICATION["metric"]
    value = (summary.get("test") or {}).get(metric)
    return {"name": f"test.{metric}", "value": value} if is_number(value) else None


def folder_name(output_dir: str | os.PathLike, sweep_dir: str | os.PathLike) -> str:
    """The job's folder relative to its study, as Hydra made it (``hydra.sweep.subdir``); "" for the study itself."""
    name = os.path.relpath(os.path.abspath(output_dir), os.path.abspath(sweep_dir))
    return "" if name == "." else name


class _Prefixed(logging.Formatter):
    """A console handler's own format, each record's first line led by the job's name."""

    def __init__(self, inner: logging.Formatter | None, prefix: str):
        super().__init__()
        self.inner, self.prefix = inner or logging.Formatter(), prefix

    def format(self, record: logging.LogRecord) -> str:
        return self.prefix + self.inner.format(record)


class log_prefix:  # noqa: N801 (used like a function: started now, closed in a finally)
    """Name the job on every console log line while it runs: parallel jobs' lines interleave.

    Joblib reuses worker processes: the handlers' own formatters come back at :meth:`close`, so the next job (whose
    logging Hydra may or may not set up afresh) never carries this one's name. The job's log file is left as is.
    """

    def __init__(self, name: str):
        root = logging.getLogger()
        self.saved = [
            (h, h.formatter)
            for h in root.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ]
        for handler, formatter in self.saved:
            handler.setFormatter(_Prefixed(formatter, f"[{name}] "))

    def close(self) -> None:
        for handler, formatter in self.saved:
            handler.setFormatter(formatter)
        self.saved = []


def one_line(exc: BaseException) -> str:
    """``<reason>: <first line of the message>``; the reason is the exception's ``reason`` tag or its type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{getattr(exc, 'reason', None) or type(exc).__name__}: {text}"[:200]


def cores_per_job(n_jobs: int) -> int:
    """Torch threads for each of ``n_jobs`` parallel jobs: together they never exceed the cores."""
    return max(1, (os.cpu_count() or 1) // max(1, n_jobs))


def default_n_jobs() -> int:
    """Parallel jobs: one per visible GPU, else up to 4 CPU jobs (each gets cores // n_jobs threads)."""
    gpus = visible_gpus()
    if gpus:
        return gpus
    return max(1, min(4, os.cpu_count() or 1))


def visible_gpus() -> int:
    """Count GPUs without importing torch (the launcher resolves this in the launching process)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([d for d in env.split(",") if d.strip() not in ("", "-1")])
    nvidia = Path("/proc/driver/nvidia/gpus")
    return len(list(nvidia.iterdir())) if nvidia.is_dir() else 0


@contextlib.contextmanager
def gpu_slot(sweep_dir: Path) -> Iterator[str | None]:
    """``cuda:<i>`` for a GPU no other job of this sweep holds, while the job runs; None with fewer than 2 GPUs.

    A job's number says nothing about which GPUs are free (job 2 may start while job 0 still runs
    and job 1 is done), so each job claims a slot file (create-exclusive) and removes it at the end.
    A slot whose process is gone is taken over.
    """
    gpus = visible_gpus()
    if gpus < 2:
        yield None
        return
    slots = Path(sweep_dir) / STUDY_DIR / "gpu_slots"
    slots.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        for i in range(gpus):
            path = slots / f"cuda{i}"
            if attempt and not _slot_holder_alive(path):
                path.unlink(missing_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            try:
                yield f"cuda:{i}"
            finally:
                path.unlink(missing_ok=True)
            return
    raise ConfigError(
        f"all {gpus} GPUs are held by running jobs of this sweep; run at most {gpus} jobs at once "
        f"(hydra.launcher.n_jobs={gpus})."
    )


def _slot_holder_alive(path: Path) -> bool:
    try:
        return pid_alive(int(path.read_text()))
    except (OSError, ValueError):
        return False


def release_memory() -> None:
    """Joblib reuses worker processes: hand cached GPU memory back between jobs."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _top1(summary: dict) -> float | None:
    return (summary.get("test") or {}).get("top1")


OmegaConf.register_new_resolver("sb.n_jobs", default_n_jobs, replace=True)
