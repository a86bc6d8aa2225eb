"""Studies as multiruns: the launch record, the plan, and the failure table.

Hydra's launchers compose each job's config when the job *starts*, so an edit to
conf/ made while a sweep runs would leak into the jobs still waiting. At launch,
:class:`StudyCallback` composes every job's config itself and records the grid,
the git commit and each job's config fingerprint in ``<study>/.study/``; a job
whose config no longer matches that record is refused (:func:`check_launch_record`).
The same job enumeration gives ``plan=true`` (print what a relaunch would do, train
nothing) and, at the end, the table of the jobs that failed.

Hydra turns an exception raised by a callback into a warning and runs the sweep on,
without the launch record that guards it; so a failure here ends the launch with one
sentence (exit 2) instead. What each job does with the record is in :mod:`stackwise_bench.runs.job`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.core.utils import filter_overrides
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from stackwise_bench.errors import ConfigError, short_error
from stackwise_bench.runs import jsonsafe, naming, output_dir
from stackwise_bench.runs.contract import FINISHED, UnreadableSummary, read_summary
from stackwise_bench.runs.files import atomic_write_text
from stackwise_bench.runs.folder_policy import same_run
from stackwise_bench.runs.launch import announce, exit_code, handle_stop_signals, launcher_lines
from stackwise_bench.runs.lease import describe, live_holder
from stackwise_bench.runs.provenance import fingerprint, git_sha
from stackwise_bench.runs.study_report import analyze_command, print_plan, results_table
from stackwise_bench.values import is_int

log = logging.getLogger(__name__)
STUDY_DIR = ".study"
LAUNCH_FILE = "launch.json"  # in each launch's folder: argv, grid, git commit and every job's config fingerprint


def sweep_arguments(config: DictConfig) -> list[str]:
    """The sweep's override strings: the preset's ``hydra.sweeper.params`` first, then the command line's."""
    params = config.hydra.sweeper.get("params") or {}
    return [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)


def sweep_grid(config: DictConfig) -> dict[str, str]:
    """``{key: values as typed}`` of the sweep, through Hydra's override parser.

    Deletions (``~monitors.hardware``) and additions (``+key=value``) keep their prefix, so the grid
    says what the command said.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    grid = {}
    for override in OverridesParser.create().parse_overrides(sweep_arguments(config)):
        key = override.get_key_element()  # with its ~, + or ++ prefix
        line = override.input_line or key
        grid[key] = line.split("=", 1)[1] if "=" in line else ""  # a deletion may name no value
    return grid


def job_names(config: DictConfig) -> dict[str, list[str]]:
    """Every job of the sweep as ``{identity: overrides}``, exactly as Hydra's BasicSweeper expands them.

    The identity is Hydra's ``override_dirname`` (:mod:`stackwise_bench.runs.naming`); :func:`job_folders` names them.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(sweep_arguments(config)), None)
    dirname_cfg = config.hydra.job.config.override_dirname
    jobs = {}
    for overrides in batches[0]:
        (identity,) = naming.parse_jobs([overrides], dirname_cfg.exclude_keys, dirname_cfg.item_sep, dirname_cfg.kv_sep)
        jobs[identity] = list(overrides)
    return jobs


def job_folders(config: DictConfig, jobs: dict[str, list[str]], names: dict) -> dict[str, str]:
    """``{identity: folder}`` of the grid's jobs: named by the keys that vary (``names`` is updated)."""
    d = config.hydra.job.config.override_dirname
    parsed = naming.parse_jobs(jobs.values(), d.exclude_keys, d.item_sep, d.kv_sep)
    return naming.assign(names, config.hydra.sweep.dir, naming.grid_candidates(names, parsed))


def compose_job(overrides: list[str], config_name: str) -> DictConfig:
    """The job's config as its launcher will compose it (run in the launching process)."""
    from hydra import compose

    return compose(config_name=config_name, overrides=overrides)


def job_state(run_dir: Path, config: dict, fp: str) -> str:
    """What a launch will do with one job's folder: done, pending, interrupted, failed, busy, or refused."""
    holder = live_holder(run_dir)
    if holder is not None:
        return f"busy ({describe(holder)})"
    try:
        summary = read_summary(run_dir)
    except UnreadableSummary:
        return "unreadable summary.json (will be refused)"
    if summary is None:
        return "pending"
    if not same_run(summary, config, fp):
        return "config changed (will be refused)"
    status = summary.get("status")
    return {"completed": "done", "early_stopped": "done", "running": "interrupted (no clean stop)"}.get(status, status)


class StudyCallback(Callback):
    """Hydra callback: launch record and plan at the start, failure table and exit code at the end.

    For a single run, it proves ``hydra.run.dir`` writable before Hydra writes ``.hydra/`` into it.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            output_dir.check_existing(config.hydra.run.dir, config)  # before Hydra rewrites .hydra/ there
            output_dir.prepare(config.hydra.run.dir, "hydra.run.dir")
        except ConfigError as exc:
            _stop(f"error: {exc}")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_launcher(config.hydra.launcher)
            self._start(config)
        except ConfigError as exc:
            _stop(f"error: {exc}")
        except Exception as exc:
            _stop(
                f"error: the study could not be launched ({type(exc).__name__}: {exc}); nothing was run. "
                "Check the sweep's overrides, or report this with the command line."
            )

    def _start(self, config: DictConfig) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        config_name = config.hydra.job.config_name
        planned, shared = {}, {}
        if not basic_sweeper(config):  # a search picks its jobs as it goes: no grid to plan or pin at launch
            plan_search(config)
            if not config.get("plan"):
                with study_names(sweep_dir):  # settles the study's naming scheme before this launch's folder exists
                    pass
        else:
            jobs = job_names(config)
            configs = {i: OmegaConf.to_container(compose_job(o, config_name), resolve=True) for i, o in jobs.items()}
            if config.get("plan"):
                folders = job_folders(config, jobs, naming.read_names(sweep_dir))  # what a launch would name them
            else:
                with study_names(sweep_dir) as names:
                    folders = job_folders(config, jobs, names)
            d = config.hydra.job.config.override_dirname
            shared = naming.shared_overrides(naming.parse_jobs(jobs.values(), d.exclude_keys).values())
            for identity, overrides in jobs.items():
                fp = fingerprint(configs[identity])
                planned[folders[identity]] = {
                    "overrides": overrides,
                    "identity": identity,
                    "fingerprint": fp,
                    "state": job_state(sweep_dir / folders[identity], configs[identity], fp),
                }
        if config.get("plan"):
            print_plan(sweep_dir, planned)
            sys.exit(0)
        stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
        record = {
            "launched_at": stamp,
            "argv": sys.argv,
            "grid": sweep_grid(config),
            "shared": shared,  # the overrides every job has alike: what the folder names leave out
            "git_sha": git_sha(),
            "launcher": {"host": socket.gethostname(), "pid": os.getpid()},
            "jobs": planned,
        }
        launch_dir = launches_dir(sweep_dir) / stamp
        try:
            launch_dir.mkdir(parents=True)
        except OSError as exc:
            raise _unwritable(sweep_dir, exc) from exc
        atomic_write_text(launch_dir / LAUNCH_FILE, jsonsafe.dumps(record, indent=2) + "\n")
        (launch_dir / "config.yaml").write_text(OmegaConf.to_yaml(config, resolve=False))
        atomic_write_text(current_path(sweep_dir), jsonsafe.dumps({"launch": stamp, "jobs": planned}, indent=2))
        # Jobs on this machine (joblib, submitit_local) stop with their launcher; Slurm's belong to the cluster.
        local = "SlurmLauncher" not in str(config.hydra.launcher.get("_target_", ""))
        self.launch = announce(launch_dir, local=local)
        handle_stop_signals(self.launch)
        todo = sum(p["state"] != "done" for p in planned.values())
        for name, p in planned.items():
            skipped = " (already done: skipped)" if p["state"] == "done" else ""
            launcher_lines().labels[" ".join(filter_overrides(p["overrides"]))] = name + skipped
        if planned:
            done = len(planned) - todo
            log.info("study %s: %d jobs: %d to run, %d already done", sweep_dir, len(planned), todo, done)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        launch = getattr(self, "launch", None)
        if launch is None:  # a launch that on_multirun_start stopped
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            jobs = read_record(launch.dir / LAUNCH_FILE, "jobs", RELAUNCH)["jobs"] or reported_jobs(launch.dir)
        except ConfigError as exc:  # overwritten while the study ran: the jobs that reported still have a table
            log.error("%s", exc)
            jobs = reported_jobs(launch.dir)
        stopped_by = launch.stopped_by()
        outcomes = {name: read_outcome(outcome_path(launch.dir, name)) for name in jobs}
        if outcomes:
            print(results_table(sweep_dir, outcomes), flush=True)
        listed = [(name, o) for name, o in outcomes.items() if o["status"] not in (*FINISHED, "skipped")]
        failed = [name for name, o in listed if o["status"] != "busy"]
        if listed:
            head = (
                f"the study was stopped ({stopped_by}); {len(listed)} of {len(jobs)} jobs did not complete in "
                f"{sweep_dir}"
                if stopped_by
                else f"{len(listed)} of {len(jobs)} jobs did not complete in {sweep_dir}"
            )
            width = max(len(name) for name, _ in listed)
            lines = [head + ":", f"  {'job'.ljust(width)}  status       reason"]
            lines += [f"  {name.ljust(width)}  {o['status']:<11}  {o.get('reason', '')}" for name, o in listed]
            if len(failed) < len(listed):
                lines.append(
                    "  busy: another launch is training that job; it was left to it (lease.on_busy=wait waits for it)."
                )
            print("\n".join(lines), file=sys.stderr, flush=True)
        print(f"analyse the study: {analyze_command(config)}", flush=True)
        if stopped_by:
            sys.exit(exit_code(stopped_by))
        if failed:
            sys.exit(1)


@contextlib.contextmanager
def study_names(sweep_dir: Path) -> Iterator[dict]:
    """The study's job-folder names (:func:`stackwise_bench.runs.naming.names_lock`); a sentence where unwritable."""
    try:
        with naming.names_lock(sweep_dir) as names:
            yield names
    except OSError as exc:
        raise _unwritable(sweep_dir, exc) from exc


def _unwritable(sweep_dir: Path, exc: OSError) -> ConfigError:
    return ConfigError(
        f"hydra.sweep.dir={sweep_dir} cannot be written ({exc.strerror or exc}); point hydra.sweep.dir "
        "(or study) at a writable folder."
    )


def check_launcher(launcher: DictConfig) -> None:
    """The launcher's knobs that joblib would refuse only after the launch record is written, or take silently."""
    if "n_jobs" not in launcher:  # Slurm's launcher: array_parallelism
        return
    n = launcher.n_jobs
    if not is_int(n) or n < 1:
        raise ConfigError(
            f"hydra.launcher.n_jobs={n} must be a positive integer (the jobs run at once), e.g. "
            "hydra.launcher.n_jobs=2; leave it out for one job per GPU, else up to 4 CPU jobs."
        )


def basic_sweeper(config: DictConfig) -> bool:
    """Whether the sweep is Hydra's grid (BasicSweeper), which :func:`job_names` expands."""
    return str(config.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper")


def plan_search(config: DictConfig) -> None:
    """A search's checks at launch (one sentence, exit 2); with ``plan=true``, what it holds and would run."""
    from stackwise_bench.runs.search_config import check_search, is_search, probe_overrides, search_space
    from stackwise_bench.runs.search_store import check_store, search_plan

    if not is_search(config):  # another sweeper plugin: its own protocol
        return
    check_search(config.hydra.sweeper)
    check_store(config)  # a garbage optuna.db: one sentence here, not SQLAlchemy's traceback in the sweeper
    space, fixed = search_space(sweep_arguments(config))
    compose_job(probe_overrides(space, fixed), config.hydra.job.config_name)  # a misspelt key fails here, not in a job
    if config.get("plan"):
        print(search_plan(config))
        sys.exit(0)


def reported_jobs(launch_dir: Path) -> list[str]:
    """The jobs that reported an outcome to this launch (a search's: it plans none at launch)."""
    names = sorted(p.stem for p in (Path(launch_dir) / "outcomes").glob("*.json"))
    return [n.replace("%2F", os.sep) if n != "_" else "" for n in names]


RELAUNCH = "relaunch the study (it writes a new launch record; finished jobs are kept)"


def read_record(path: Path, key: str, advice: str) -> dict:
    """A launch record (``launch.json``, ``current.json``, a job's outcome) holding ``key``.

    Raises:
        ConfigError: the file is unreadable, not JSON (garbage, truncated) or lacks ``key`` (another version).
    """
    try:
        data = json.loads(Path(path).read_text())
        why = None if isinstance(data, dict) and key in data else f"no {key!r} in it"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = getattr(exc, "strerror", None) or short_error(exc)
    if why is not None:
        raise ConfigError(f"{path} is not a readable launch record ({why}); {advice}.")
    return data


def read_outcome(path: Path) -> dict:
    """How a job told its launch it ended; a missing or unreadable outcome is a failure, saying which."""
    if not path.exists():
        return {"status": "failed", "reason": "no outcome recorded (the job died)"}
    try:
        return read_record(path, "status", "the job's own folder says how it ended")
    except ConfigError as exc:
        return {"status": "failed", "reason": str(exc)}


def launches_dir(sweep_dir: Path) -> Path:
    """Every launch of the study keeps its record, its jobs' outcomes and its stop request in a folder of its own."""
    return Path(sweep_dir) / STUDY_DIR / "launches"


def current_path(sweep_dir: Path) -> Path:
    """The latest launch's plan: every job's overrides and config fingerprint."""
    return Path(sweep_dir) / STUDY_DIR / "current.json"


def outcome_path(launch_dir: Path, job_name: str) -> Path:
    """Where a job reports to its launch how it ended (:func:`stackwise_bench.runs.job.record_outcome`)."""
    return Path(launch_dir) / "outcomes" / f"{job_name.replace(os.sep, '%2F') or '_'}.json"


def _stop(message: str) -> None:
    """End the launch with one sentence: SystemExit passes through Hydra's callback wrapper, which warns on the rest."""
    print(message, file=sys.stderr)
    sys.exit(2)
