"""One writer per run folder: the lease is exclusive, goes stale when its holder dies, and is waited for."""

from __future__ import annotations

import json
import os
import re
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
        assert re.search(why, held.took_over["why"]), held.took_over["why"]


@pytest.mark.slow
def test_wait_waits_for_the_holder_to_let_go(tmp_path):
    first = leases.acquire(tmp_path / "run", timeout_s=120)
    threading.Timer(0.5, first.release).start()
    t0 = time.monotonic()
    with leases.acquire(tmp_path / "run", on_busy="wait") as second:
        assert second.took_over is None  # it was handed over, not taken from a dead holder
    assert time.monotonic() - t0 >= 0.4


@pytest.mark.slow
def test_a_run_refuses_a_busy_folder_without_touching_it(tmp_path, cfg_factory):
    from stackwise_bench.train import run

    run_dir = tmp_path / "run"
    plant(run_dir)  # a live holder: this very process, as another writer would look from outside
    with pytest.raises(leases.RunBusy, match=r"is being written by pid"):
        run(cfg_factory(["trainer.max_epochs=1"]), run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [LEASE]


@pytest.mark.slow
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


def lease_text(**fields) -> str:
    """A lease as :func:`plant` writes it, with ``fields`` replaced (``None``: left out), as JSON text."""
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time(), "timeout_s": 120.0}
    holder = {**holder, "token": "someone-else", **fields}
    return json.dumps({k: v for k, v in holder.items() if v is not None})


NOT_LEASES = {
    "garbage": ("not json{", r"it is not JSON"),
    "empty": ("", r"it is empty"),
    "a list": ("[1, 2]", r"it holds a JSON list, not an object"),
    "a pid that is not a number": (lease_text(pid="abc"), r"its pid 'abc' is not a process id"),
    "a pid past any process id": (lease_text(pid=2**63), r"its pid 9223372036854775808 is not a process id"),
    "a heartbeat that is not a number": (lease_text(heartbeat="soon"), r"its heartbeat 'soon' is not a time"),
    "no token": (lease_text(token=None), r"it has no token"),
    "a folder": (None, r"it cannot be read \(Is a directory\)"),
    "a dangling link": (None, r"it is a link to a file that does not exist"),
}


def plant_not_a_lease(run_dir, kind: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text, _ = NOT_LEASES[kind]
    if kind == "a folder":
        (run_dir / LEASE).mkdir()
    elif kind == "a dangling link":
        (run_dir / LEASE).symlink_to(run_dir / "gone")
    else:
        (run_dir / LEASE).write_text(text)


def acquire_or_refuse(run_dir, **kwargs):
    """``acquire``'s lease or the error it raised; the test fails, rather than hangs, where it neither takes nor
    refuses (the old code waited ``timeout_s`` for an unreadable lease, and spun forever on a dangling link)."""
    outcome = {}

    def attempt():
        try:
            outcome["lease"] = leases.acquire(run_dir, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            outcome["error"] = exc

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(60)
    assert outcome, f"acquire() neither took nor refused {run_dir / LEASE} in 60 s"
    return outcome


@pytest.mark.parametrize("kind", NOT_LEASES)
def test_a_lease_file_that_is_not_a_lease_is_refused_in_one_sentence(kind, tmp_path):
    run_dir = tmp_path / "run"
    plant_not_a_lease(run_dir, kind)
    before = sorted(p.name for p in run_dir.iterdir())
    outcome = acquire_or_refuse(run_dir, timeout_s=600, on_busy="wait")  # no waiting for a file nobody will fix
    error = outcome.get("error")
    assert isinstance(error, leases.ConfigError) and not isinstance(error, leases.RunBusy), outcome
    message = str(error)
    assert message.startswith(f"{run_dir / LEASE} is not a lease this version can read (")
    assert re.search(NOT_LEASES[kind][1], message), message
    assert message.endswith(f"remove it if no process is writing {run_dir}, then launch again.")
    assert "\n" not in message and "None" not in message
    assert sorted(p.name for p in run_dir.iterdir()) == before  # left as it was, no temporary file


def test_plan_names_a_lease_file_that_is_not_a_lease(tmp_path):
    from stackwise_bench.runs.study import job_state

    plant_not_a_lease(tmp_path / "run", "a pid that is not a number")
    state = job_state(tmp_path / "run", {}, "fp")
    assert state.startswith("busy (an unreadable lease file: its pid 'abc' is not a process id; remove it if"), state


def test_a_lease_still_being_written_is_read_again_not_refused_nor_taken(tmp_path, monkeypatch):
    """The exclusive-create fallback (a filesystem without hard links) creates the file, then writes the lease into it:
    a reader in between finds it empty. It reads again, and finds the live holder."""
    run_dir = tmp_path / "run"
    plant_not_a_lease(run_dir, "empty")
    real_examine, reads = leases.examine, []

    def writer_finishes_after_the_first_read(path):
        reads.append(path)
        found = real_examine(path)
        if len(reads) == 1:
            plant(run_dir)  # the writer's content lands
        return found

    monkeypatch.setattr(leases, "examine", writer_finishes_after_the_first_read)
    with pytest.raises(leases.RunBusy, match=rf"is being written by pid {os.getpid()} on host "):
        leases.acquire(run_dir)
    assert len(reads) >= 2 and json.loads((run_dir / LEASE).read_text())["token"] == "someone-else"
