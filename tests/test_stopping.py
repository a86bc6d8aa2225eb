"""Stopping a study stops it, its workers never outlive it, and two launches never train one run twice.

Real ``--multirun`` launchers in subprocesses, stopped the way a terminal, a scheduler or ``kill -9`` stops them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, TINY_DATA, compose, read_metrics, read_summary, wait_for

EPOCHS = 4
# Long enough to be caught mid-run (512 images an epoch), short enough to relaunch to the end.
JOB = [
    *TINY_DATA,
    "dataset.num_train=512",
    "trainer.device=cpu",
    f"trainer.max_epochs={EPOCHS}",
    "trainer.early_stopping_patience=null",
    "trainer.batch_size=32",
    "trainer.eval_batch_size=64",
    "trainer.progress=log",
    "monitors=none",
]


def launch(args: list[str], cwd: Path) -> subprocess.Popen:
    """A ``--multirun`` launcher in a session of its own (its own process group, like a terminal's job)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "stackwise_bench.train", "--multirun", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def runs(study: Path) -> dict[str, dict]:
    return {d.name: read_summary(d) for d in sorted(study.iterdir()) if (d / "summary.json").exists()}


def one_row_per_epoch(study: Path) -> None:
    for name in runs(study):
        assert [r["epoch"] for r in read_metrics(study / name)] == list(range(1, EPOCHS + 1)), name


def outcomes(study: Path) -> dict[str, dict]:
    latest = json.loads((study / ".study" / "current.json").read_text())["launch"]
    folder = study / ".study" / "launches" / latest / "outcomes"
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}


def relaunch_finishes(args: list[str], cwd: Path, study: Path, jobs: int) -> None:
    again = launch(args, cwd)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert len(runs(study)) == jobs and all(s["status"] == "completed" for s in runs(study).values())
    one_row_per_epoch(study)


@pytest.mark.slow
def test_ctrl_c_stops_the_study_and_no_pending_job_starts(tmp_path):
    args = ["seed=1,2,3", *JOB, "study=ctrlc", "hydra.launcher.n_jobs=1"]
    study = tmp_path / "multirun" / "ctrlc"
    proc = launch(args, tmp_path)
    wait_for(lambda: any(study.glob("*/metrics.jsonl")), "the first job's first epoch")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert [s["status"] for s in runs(study).values()] == ["interrupted"]  # jobs 2 and 3 never started
    ended = outcomes(study)
    assert sorted(o["status"] for o in ended.values()) == ["interrupted", "stopped", "stopped"]
    assert "the study was stopped (SIGINT)" in err
    relaunch_finishes(args, tmp_path, study, jobs=3)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "kill-9"])
def test_a_stopped_or_killed_launcher_leaves_no_worker_and_a_relaunch_finishes(signum, tmp_path):
    args = ["seed=1,2,3", *JOB, f"study=s{signum}", "hydra.launcher.n_jobs=2"]
    study = tmp_path / "multirun" / f"s{signum}"
    proc = launch(args, tmp_path)
    wait_for(lambda: any(study.glob("*/metrics.jsonl")), "a job's first epoch")
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers
    os.kill(proc.pid, signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == (143 if signum == signal.SIGTERM else -signal.SIGKILL), err[-3000:]
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, [(p.pid, p.cmdline()[:3]) for p in alive]
    stopped = [s for s in runs(study).values() if s["status"] == "interrupted"]
    assert stopped and all(s["run"]["stopped_by"] for s in stopped)  # saved and recorded, not killed
    relaunch_finishes(args, tmp_path, study, jobs=3)


@pytest.mark.slow
def test_two_launches_of_one_study_train_each_run_once(tmp_path):
    # One thread each: two launches of two threads on a 2-core machine would thrash (the suite runs on 2 cores).
    args = ["seed=1,2,3", *JOB, "study=twice", "hydra.launcher.n_jobs=1", "trainer.threads=1"]
    study = tmp_path / "multirun" / "twice"
    first, second = launch(args, tmp_path), launch(args, tmp_path)
    (_, err1), (_, err2) = first.communicate(timeout=600), second.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, (err1[-2000:], err2[-2000:])
    recorded = runs(study)
    assert len(recorded) == 3 and all(s["status"] == "completed" for s in recorded.values())
    assert all(not s.get("previous_attempts") for s in recorded.values())  # nobody resumed another's run
    one_row_per_epoch(study)
    launches = sorted((study / ".study" / "launches").iterdir())
    ended = [json.loads(p.read_text()) for d in launches for p in (d / "outcomes").glob("*.json")]
    trained = [o for o in ended if o["status"] == "completed"]
    assert len(trained) == 3  # every job trained by exactly one launch
    busy = [o for o in ended if o["status"] == "busy"]
    assert busy and all("is being written by pid" in o["reason"] for o in busy)
    assert "busy" in err1 + err2  # the end-of-sweep table lists them


@pytest.mark.slow
def test_a_single_run_stopped_by_sigterm_exits_143_and_resumes(tmp_path):
    run_dir = tmp_path / "single"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "stackwise_bench.train", *JOB, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        stderr=subprocess.STDOUT,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    wait_for(lambda: (run_dir / "metrics.jsonl").exists(), "the first epoch")
    proc.send_signal(signal.SIGTERM)
    err, _ = proc.communicate(timeout=300)  # Hydra logs to stdout
    assert proc.returncode == 143, err[-3000:]  # `train && analyze` stops here
    assert read_summary(run_dir)["status"] == "interrupted" and "trainer.resume=true" in err
    from stackwise_bench.train import run

    summary = run(compose([*JOB, "trainer.resume=true"], tiny=False), run_dir)
    assert summary["status"] == "completed" and summary["previous_attempts"][-1]["stopped_by"] == "SIGTERM"
    assert [r["epoch"] for r in read_metrics(run_dir)] == list(range(1, EPOCHS + 1))


@pytest.mark.slow
def test_preemption_under_submitit_requeues_and_ends_where_an_uninterrupted_run_does(tmp_path):
    """SIGUSR2 to a submitit_local job: it saves, submitit requeues it, and it resumes to the same numbers."""
    from stackwise_bench.train import run

    args = ["hydra/launcher=submitit_local", "seed=5", *JOB, "study=preempt"]
    study = tmp_path / "multirun" / "preempt"
    proc = launch(args, tmp_path)
    wait_for(lambda: any(study.glob("*/metrics.jsonl")) and any(study.glob("*/.lease")), "the job's first epoch")
    holder = json.loads(next(study.glob("*/.lease")).read_text())
    os.kill(holder["pid"], signal.SIGUSR2)  # what Slurm sends before the time limit or on preemption
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    (job_dir,) = [study / name for name in runs(study)]
    summary = read_summary(job_dir)
    assert summary["status"] == "completed", summary.get("error")
    assert summary["previous_attempts"][-1]["stopped_by"] == "SIGUSR2"
    # The uninterrupted reference: the same job on the same one thread (submitit_local's cpus_per_task=1).
    reference = run(compose(["seed=5", *JOB], tiny=False), tmp_path / "reference", threads=1)
    keep = lambda rows: [{k: v for k, v in r.items() if "time" not in k and "img_s" not in k} for r in rows]  # noqa: E731
    assert keep(read_metrics(job_dir)) == keep(read_metrics(tmp_path / "reference"))
    assert summary["test"]["confusion_matrix"] == reference["test"]["confusion_matrix"]
