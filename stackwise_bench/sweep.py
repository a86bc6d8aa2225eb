"""Studies as multiruns: the launch record, the plan, and the failure table.

Hydra's launchers compose each job's config when the job *starts*, so an edit to
conf/ made while a sweep runs would leak into the jobs still waiting. At launch,
:class:`StudyCallback` composes every job's config itself and records the grid,
the git commit and each job's config fingerprint in ``<study>/.study/``; a job
whose config no longer matches that record is refused (:func:`check_launch_record`).
The same job enumeration gives ``plan=true`` (print what a relaunch would do, train
nothing) and, at the end, the table of the jobs that failed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from stackwise_bench.record import FINISHED, atomic_write_text, read_summary

log = logging.getLogger("stackwise_bench.sweep")
STUDY_DIR = ".study"


def job_names(config: DictConfig) -> dict[str, list[str]]:
    """Every job of the sweep as ``{folder name: overrides}``, exactly as Hydra's BasicSweeper expands them."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    parser = OverridesParser.create()
    batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
    dirname_cfg = config.hydra.job.config.override_dirname
    jobs = {}
    for overrides in batches[0]:
        parsed = parser.parse_overrides(overrides)
        name = get_overrides_dirname(parsed, list(dirname_cfg.exclude_keys), dirname_cfg.item_sep, dirname_cfg.kv_sep)
        jobs[name] = list(overrides)
    return jobs


def compose_job(overrides: list[str], config_name: str) -> DictConfig:
    """The job's config as its launcher will compose it (run in the launching process)."""
    from hydra import compose

    return compose(config_name=config_name, overrides=overrides)


def job_state(run_dir: Path, fingerprint: str) -> str:
    summary = read_summary(run_dir)
    if summary is None:
        return "pending"
    if summary.get("run", {}).get("fingerprint") != fingerprint:
        return "config changed (will be refused)"
    status = summary.get("status")
    return {"completed": "done", "early_stopped": "done", "running": "interrupted (no clean stop)"}.get(status, status)


class StudyCallback(Callback):
    """Hydra callback: launch record and plan at the start, failure table and exit code at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from stackwise_bench.train import fingerprint, git_sha

        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = job_names(config)
        config_name = config.hydra.job.config_name
        planned = {}
        for name, overrides in jobs.items():
            fp = fingerprint(compose_job(overrides, config_name))
            planned[name] = {"overrides": overrides, "fingerprint": fp, "state": job_state(sweep_dir / name, fp)}
        if config.get("plan"):
            print_plan(sweep_dir, planned)
            sys.exit(0)
        stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
        record = {
            "launched_at": stamp,
            "argv": sys.argv,
            "grid": {k: str(v) for k, v in (config.hydra.sweeper.get("params") or {}).items()}
            | {o.split("=")[0]: o.split("=", 1)[1] for o in config.hydra.overrides.task},
            "git_sha": git_sha(),
            "jobs": planned,
        }
        launch_dir = sweep_dir / STUDY_DIR / "launches" / stamp
        launch_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(launch_dir / "launch.json", json.dumps(record, indent=2) + "\n")
        (launch_dir / "config.yaml").write_text(OmegaConf.to_yaml(config, resolve=False))
        atomic_write_text(sweep_dir / STUDY_DIR / "current.json", json.dumps({"launch": stamp, "jobs": planned}, indent=2))
        outcomes = sweep_dir / STUDY_DIR / "outcomes"
        shutil.rmtree(outcomes, ignore_errors=True)
        outcomes.mkdir(parents=True)
        todo = sum(p["state"] != "done" for p in planned.values())
        log.info("study %s: %d jobs, %d already done, %d to run", sweep_dir, len(planned), len(planned) - todo, todo)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        current = json.loads((sweep_dir / STUDY_DIR / "current.json").read_text())
        failed = []
        for name in current["jobs"]:
            outcome_file = sweep_dir / STUDY_DIR / "outcomes" / f"{_safe(name)}.json"
            outcome = json.loads(outcome_file.read_text()) if outcome_file.exists() else {"status": "failed", "reason": "no outcome recorded (the job died)"}
            if outcome["status"] not in (*FINISHED, "skipped"):
                failed.append((name, outcome))
        n = len(current["jobs"])
        if not failed:
            log.info("study %s: all %d jobs finished", sweep_dir, n)
            return
        width = max(len(name) for name, _ in failed)
        lines = [f"{len(failed)} of {n} jobs did not complete in {sweep_dir}:", f"  {'job'.ljust(width)}  status       reason"]
        lines += [f"  {name.ljust(width)}  {o['status']:<11}  {o.get('reason', '')}" for name, o in failed]
        print("\n".join(lines), file=sys.stderr)
        sys.exit(1)


def print_plan(sweep_dir: Path, planned: dict) -> None:
    width = max([len(n) for n in planned] + [3])
    print(f"plan for {sweep_dir} ({len(planned)} jobs):")
    print(f"  {'job'.ljust(width)}  state")
    for name, job in planned.items():
        print(f"  {name.ljust(width)}  {job['state']}")
    counts: dict[str, int] = {}
    for job in planned.values():
        counts[job["state"]] = counts.get(job["state"], 0) + 1
    print("  " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))


def check_launch_record(sweep_dir: Path, job_name: str, fp: str) -> str | None:
    """Why this job must not run (its config changed since launch), or None."""
    current = sweep_dir / STUDY_DIR / "current.json"
    if not current.exists():
        return None
    planned = json.loads(current.read_text())["jobs"].get(job_name)
    if planned is None or planned["fingerprint"] == fp:
        return None
    return (f"the config of job {job_name} changed after the study was launched (an edit to conf/ while it ran); "
            "relaunch the study to run it with the edited config.")


def record_outcome(sweep_dir: Path, job_name: str, status: str, reason: str = "") -> None:
    outcomes = sweep_dir / STUDY_DIR / "outcomes"
    outcomes.mkdir(parents=True, exist_ok=True)
    atomic_write_text(outcomes / f"{_safe(job_name)}.json", json.dumps({"status": status, "reason": reason}) + "\n")


def _safe(name: str) -> str:
    return name.replace(os.sep, "%2F") or "_"


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
