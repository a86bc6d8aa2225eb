"""A process whose lease on its run folder is another's writes nothing more there: the fence before every write.

A run stopped (SIGSTOP, a Slurm suspend, an NFS stall) for longer than ``lease.timeout_s`` is taken over by a
relaunch; when it resumes, it must not save ``last.pt`` or rewrite ``summary.json`` over the relaunch's run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_lease import plant
from test_stopping import JOB, wait_for

from stackwise_bench.runs import lease as leases
from stackwise_bench.runs.contract import LEASE
from stackwise_bench.runs.lease import LeaseLost
from stackwise_bench.runs.lease_file import read as read_lease
from stackwise_bench.runs.record import RunRecord
from stackwise_bench.runs.tracking import TrackerRun, Trackers
from stackwise_bench.train import run

from conftest import ROOT, compose, read_summary


def files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run folder with its bytes, but Hydra's own (``.hydra/``, the log both processes append to)
    and temporary files (a process stopped mid-write holds one until it goes on)."""
    return {
        str(path.relative_to(run_dir)): path.read_bytes()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file() and path.name != "train.log" and ".hydra" not in path.parts and path.suffix != ".tmp"
    }


def lost_to_someone(run_dir: Path) -> str:
    """The start of the sentence a process that lost ``run_dir`` to a live holder (``plant``) ends with."""
    return rf"^{re.escape(str(run_dir))} is no longer this process's to write: pid {os.getpid()} on host "


@pytest.mark.slow
def test_a_run_stopped_past_its_lease_writes_nothing_over_the_relaunch_that_finished_it(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "stackwise_bench.train", *JOB, "trainer.threads=1", "lease.timeout_s=2"]
    command.append(f"hydra.run.dir={run_dir}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}  # Hydra logs to stdout
    first = subprocess.Popen(command, cwd=tmp_path, env=env, **output)
    metrics = run_dir / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, "the first epoch's row")
        first.send_signal(signal.SIGSTOP)  # what Ctrl-Z, a Slurm suspend or a long NFS stall do
        heartbeat = read_lease(run_dir / LEASE)["heartbeat"]
        wait_for(lambda: time.time() > heartbeat + 3, "the stopped run's lease to go stale")
        relaunch = subprocess.run(
            [*command, "trainer.resume=true"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600
        )
        assert relaunch.returncode == 0, relaunch.stdout[-3000:] + relaunch.stderr[-3000:]
        finished = files(run_dir)
        assert read_summary(run_dir)["status"] == "completed"
        assert {"summary.json", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt"} <= finished.keys()
    finally:
        first.send_signal(signal.SIGCONT)
    out, _ = first.communicate(timeout=300)
    assert files(run_dir) == finished  # byte for byte what the relaunch left: nothing saved, nothing recorded
    assert not list(run_dir.rglob("*.tmp"))  # and the temporary file of a write it was stopped in is gone
    assert first.returncode == 2 and "Traceback" not in out, out[-3000:]
    (said,) = [line for line in out.splitlines() if "is no longer this process's to write" in line]
    assert f"{run_dir} is no longer this process's to write: its lease was taken over" in said
    assert said.endswith("it ends without writing there.")


@pytest.mark.slow
@pytest.mark.parametrize("then", ["carries on", "crashes", "is requeued"])
def test_a_run_that_lost_its_lease_records_nothing_however_it_ends(then, tmp_path, monkeypatch):
    """The folder is taken over mid-epoch; the run goes on to its next write, or fails, or is asked to exit:
    neither its checkpoint, its rows nor its failure and interrupt handlers write anything (not only the heartbeat,
    which beats every 20 s here, checks)."""
    run_dir, seen, calls = tmp_path / "run", {}, {"n": 0}
    original_step = torch.optim.lr_scheduler.LambdaLR.step

    def step_then_lose_the_folder(self, *args, **kwargs):
        original_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1 + 7 + 3:  # step 3 of epoch 2 (7 steps an epoch; LambdaLR steps once when it is built)
            plant(run_dir, token="the-relaunch")  # a relaunch took the folder over
            seen["files"] = files(run_dir)
            if then == "crashes":
                raise RuntimeError("out of memory")
            if then == "is requeued":
                raise SystemExit(144)

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step_then_lose_the_folder)
    with pytest.raises(LeaseLost, match=lost_to_someone(run_dir)) as info:
        run(compose(["monitors=none"]), run_dir)
    assert files(run_dir) == seen["files"]  # the relaunch's .lease included: release leaves another's lease alone
    assert "\n" not in str(info.value) and info.value.reason == "lease_lost"


WRITES = {
    "summary": lambda record: record.update(train={"steps": 8}),
    "finish": lambda record: record.finish("completed", test={"top1": 1.0}),
    "fail": lambda record: record.fail(RuntimeError("out of memory")),
    "metrics": lambda record: record.log_epoch({"epoch": 2, "step": 14}),
    "diagnostics": lambda record: record.log_diagnostics({"kind": "step", "step": 14}),
    "resume": lambda record: record.trim_to_checkpoint({"progress": {"history": [], "global_step": 0}}),
    "restart": lambda record: record.restart_logs(),
    "split": lambda record: record.write_split({"sha256": "def", "train": [1, 0]}),
    "checkpoint": lambda record: record.save_checkpoint("last", {"progress": {"epoch": 2}}),
}


@pytest.mark.parametrize("write", WRITES)
def test_every_write_of_the_record_checks_the_lease_first(write, tmp_path):
    run_dir = tmp_path / "run"
    with leases.acquire(run_dir) as held:
        record = RunRecord(run_dir, fence=held.check)
        record.start(run={"seed": 1})
        record.write_split({"sha256": "abc", "train": [0, 1]})
        record.log_epoch({"epoch": 1, "step": 7, "val_top1": 0.5})
        record.log_diagnostics({"kind": "step", "step": 7})
        record.log_hardware({"rss_mb": 1.0})
        record.save_checkpoint("last", {"progress": {"epoch": 1}})
        plant(run_dir, token="the-relaunch")
        before = files(run_dir)
        with pytest.raises(LeaseLost, match=lost_to_someone(run_dir)):
            WRITES[write](record)
        record.log_hardware({"rss_mb": 2.0})  # on the monitor's thread: it stops quietly, never raises there
        assert files(run_dir) == before


def test_a_lease_lost_while_a_checkpoint_was_serialised_replaces_nothing(tmp_path):
    """torch.save of a big model takes a while: the fence is checked again before the file is moved into place."""
    answers = []

    def fence():
        if answers and answers.pop(0):
            raise LeaseLost("taken over")

    record = RunRecord(tmp_path, fence=fence)
    record.save_checkpoint("last", {"progress": {"epoch": 1}})
    before = files(tmp_path)
    answers.extend([False, True])  # ours before torch.save, another's after it
    with pytest.raises(LeaseLost):
        record.save_checkpoint("last", {"progress": {"epoch": 2}})
    assert files(tmp_path) == before  # the old last.pt, and no temporary file


def test_trackers_hear_nothing_more_once_the_lease_is_lost(tmp_path):
    heard, lost, reports = [], threading.Event(), []

    class Recorder:
        name = "recorder"

        def open(self, run):
            return {}

        def log_metrics(self, metrics, step, stream):
            heard.append(step)

        def log_summary(self, summary):
            heard.append("summary")

        def close(self, status):
            heard.append("close")  # a close flushes into the run folder too

    def fence():
        if lost.is_set():
            raise LeaseLost("taken over")

    info = TrackerRun(tmp_path, "r", "s", tmp_path, {}, {}, {}, None)
    trackers = Trackers([Recorder()], lambda: info, reports.append, fence=fence)
    trackers.log("train", {"loss": 1.0}, 1)
    wait_for(lambda: heard == [1], "the first row to reach the tracker", timeout=60)
    lost.set()
    trackers.log("train", {"loss": 0.5}, 2)
    trackers.summary({"test": {"top1": 1.0}})
    trackers.close("completed")
    assert heard == [1] and reports == []  # no summary.json["loggers"] report either: the folder is not ours
