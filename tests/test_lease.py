"""One writer per run folder: the lease is exclusive, goes stale when its holder dies, and is waited for."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from stackwise_bench.runs import lease as leases
from stackwise_bench.runs import stopping
from stackwise_bench.runs.contract import LEASE

from conftest import read_summary


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant(run_dir, **fields) -> dict:
    """Write a lease as another process would have left it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": None,
        "started_at": "2026-01-01T00:00:00+0000",
        "heartbeat": time.time(),
        "timeout_s": 120.0,
        "token": "someone-else",
        **fields,
    }
    (run_dir / LEASE).write_text(json.dumps(holder))
    return holder


def test_a_live_lease_is_exclusive_and_released(tmp_path):
    with leases.acquire(tmp_path / "run") as held:
        assert json.loads((tmp_path / "run" / LEASE).read_text())["token"] == held.token
        with pytest.raises(leases.RunBusy, match=rf"pid {os.getpid()} on host .*on_busy=wait") as info:
            leases.acquire(tmp_path / "run")
        assert "\n" not in str(info.value) and str(info.value).endswith(".")
    assert not (tmp_path / "run" / LEASE).exists()
    assert not [p for p in (tmp_path / "run").iterdir()]  # no temporary file left behind


def test_heartbeat_moves_and_a_lost_lease_asks_the_job_to_stop(tmp_path):
    stopping.clear()
    held = leases.acquire(tmp_path / "run", timeout_s=0.3)  # beats every 0.05 s
    first = held.content["heartbeat"]
    deadline = time.time() + 30
    while json.loads((tmp_path / "run" / LEASE).read_text())["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.02)
    assert json.loads((tmp_path / "run" / LEASE).read_text())["heartbeat"] > first
    plant(tmp_path / "run")  # someone took the folder over
    while stopping.requested() is None and time.time() < deadline:
        time.sleep(0.02)
    assert "taken over" in (stopping.requested() or "")
    held.release()
    assert (tmp_path / "run" / LEASE).exists()  # release never removes someone else's lease
    stopping.clear()


@pytest.mark.parametrize(
    "fields, why",
    [
        ({"pid": "dead", "heartbeat": 0.0}, r"pid \d+ on this host, is gone"),
        ({"host": "elsewhere", "heartbeat": 1.0}, r"heartbeat is \d+ s old, older than its timeout of 120 s"),
        ({"host": "elsewhere", "pid": 1, "job_id": "4242"}, r"earlier run of this same scheduler job \(4242\)"),
    ],
)
def test_a_stale_lease_is_taken_over_and_says_why(fields, why, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    fields = {**fields, "pid": dead_pid()} if fields.get("pid") == "dead" else fields
    holder = plant(tmp_path / "run", **fields)
    with leases.acquire(tmp_path / "run") as held:
        assert held.took_over["token"] == holder["token"]
        assert __import__("re").search(why, held.took_over["why"]), held.took_over["why"]


def test_wait_waits_for_the_holder_to_let_go(tmp_path):
    first = leases.acquire(tmp_path / "run", timeout_s=120)
    threading.Timer(0.5, first.release).start()
    t0 = time.monotonic()
    with leases.acquire(tmp_path / "run", on_busy="wait") as second:
        assert second.took_over is None  # it was handed over, not taken from a dead holder
    assert time.monotonic() - t0 >= 0.4


def test_a_run_refuses_a_busy_folder_without_touching_it(tmp_path, cfg_factory):
    from stackwise_bench.train import run

    run_dir = tmp_path / "run"
    plant(run_dir)  # a live holder: this very process, as another writer would look from outside
    with pytest.raises(leases.RunBusy, match=r"is being written by pid"):
        run(cfg_factory(["trainer.max_epochs=1"]), run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [LEASE]


def test_a_run_takes_over_a_dead_writers_folder_and_records_it(tmp_path, cfg_factory):
    from stackwise_bench.train import run

    run_dir = tmp_path / "run"
    holder = plant(run_dir, pid=dead_pid(), heartbeat=time.time() - 5)
    summary = run(cfg_factory(["trainer.max_epochs=1", "monitors=none"]), run_dir)
    assert summary["status"] == "completed"
    attempt = read_summary(run_dir)["previous_attempts"][-1]
    assert attempt["taken_over"]["pid"] == holder["pid"] and "is gone" in attempt["taken_over"]["why"]
    assert not (run_dir / LEASE).exists()


def test_an_unwritable_place_is_refused_before_a_lease_is_taken(tmp_path):
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(leases.ConfigError, match=r"hydra\.run\.dir=.*cannot be written .*writable folder\.$"):
        leases.acquire(tmp_path / "file" / "run")


def test_plan_shows_a_folder_another_process_writes_as_busy(tmp_path):
    from stackwise_bench.runs.study import job_state

    assert job_state(tmp_path / "run", {}, "fp") == "pending"
    plant(tmp_path / "run")
    assert job_state(tmp_path / "run", {}, "fp").startswith(f"busy (pid {os.getpid()} on host ")
    plant(tmp_path / "run", pid=dead_pid())
    assert job_state(tmp_path / "run", {}, "fp") == "pending"  # a dead writer's lease will be taken over


def test_gpu_slots_of_a_dead_job_are_taken_over(tmp_path, monkeypatch):
    """GPU slots use the same liveness test as leases: a slot whose process is gone is free again."""
    from stackwise_bench.runs.job import gpu_slot

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    slots = tmp_path / ".study" / "gpu_slots"
    slots.mkdir(parents=True)
    (slots / "cuda0").write_text(str(os.getpid()))  # held by a live job
    (slots / "cuda1").write_text(str(dead_pid()))  # left by a job that died
    with gpu_slot(tmp_path) as device:
        assert device == "cuda:1"
    assert not (slots / "cuda1").exists() and (slots / "cuda0").exists()
