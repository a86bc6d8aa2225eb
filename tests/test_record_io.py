"""The run record on a full or unwritable disk, and a resumed run's logs: nothing half-written, nothing repeated."""

from __future__ import annotations

import builtins
import errno
import json
import logging
import os
import re
import shutil
import time
import traceback
from pathlib import Path

import pytest
import torch

from stackwise_bench.errors import ConfigError
from stackwise_bench.runs import files as files_module
from stackwise_bench.runs.files import RecordWriteError
from stackwise_bench.runs.record import RunRecord
from stackwise_bench.train import run

from conftest import read_metrics, read_summary

NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def leftovers(run_dir: Path) -> list[Path]:
    """The record's temporary files (``.<name>.<pid>.tmp``) and write probes."""
    return [p for p in Path(run_dir).rglob(".*") if p.name.endswith(".tmp") or p.name.startswith(".write-probe")]


def assert_one_sentence(message: str, path: Path) -> None:
    assert "\n" not in message and message.endswith(".")
    assert not re.search(r"[.;:]\s+[A-Z]", message.replace(str(path), "PATH")), message  # no second sentence
    assert str(path) in message and os.strerror(errno.ENOSPC) in message
    assert "free space" in message and "hydra.run.dir" in message


def read_hardware(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "hardware.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny finished run (2 epochs) to copy: the resume tests fake its interruption."""
    from conftest import compose

    run_dir = tmp_path_factory.mktemp("io") / "finished"
    summary = run(compose(["trainer.max_epochs=2"]), run_dir)
    assert summary["status"] == "completed"
    return run_dir


# ---- 1. a full disk --------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_disk_at_a_checkpoint_keeps_the_previous_one(cfg_factory, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    real_save = torch.save

    def save_until_full(obj, f, *args, **kwargs):
        if Path(f.name).name.startswith(".last.pt") and last.exists():  # epoch 2's last.pt fills the disk
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(RecordWriteError) as info:
        run(cfg_factory(), run_dir)
    exc = info.value
    assert exc.reason == "io" and exc.errno == errno.ENOSPC and exc.path == last and isinstance(exc, OSError)
    assert_one_sentence(str(exc), last)

    state = torch.load(last, weights_only=True)  # the epoch-1 checkpoint, whole
    assert state["progress"]["epoch"] == 1 and isinstance(state["saved_at"], float)
    assert not leftovers(run_dir)
    summary = read_summary(run_dir)
    assert summary["status"] == "failed"
    assert summary["error"]["reason"] == "io" and summary["error"]["path"] == str(last)
    assert summary["error"]["message"] == str(exc)


class FillingDisk:
    """A file on a disk that fills after ``room`` bytes: ``write`` raises ENOSPC, as a full disk does."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def test_disk_filling_inside_torch_save_is_io_with_the_path(cfg_factory, tmp_path, monkeypatch):
    """torch.save turns the file's ENOSPC into ``RuntimeError: [enforce fail at inline_container.cc] unexpected
    pos``; before, the record said ``reason: RuntimeError`` with no path."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    real_open = builtins.open

    def open_until_full(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if Path(file).name.startswith(".last.pt") and last.exists():  # epoch 2's last.pt fills the disk
            return FillingDisk(f, room=4096)
        return f

    monkeypatch.setattr(files_module, "open", open_until_full, raising=False)  # the record's whole-file writes only
    with pytest.raises(RecordWriteError) as info:
        run(cfg_factory(["monitors=none"]), run_dir)
    exc = info.value
    assert isinstance(exc.__cause__, RuntimeError) and "inline_container" in str(exc.__cause__)  # torch's own error
    assert exc.reason == "io" and exc.errno == errno.ENOSPC and exc.path == last
    assert_one_sentence(str(exc), last)
    assert torch.load(last, weights_only=True)["progress"]["epoch"] == 1  # the previous checkpoint, whole
    assert not leftovers(run_dir)
    error = read_summary(run_dir)["error"]
    assert (error["reason"], error["path"], error["message"]) == ("io", str(last), str(exc))


def test_torch_serialisation_error_without_an_os_error_is_io_and_others_are_not(tmp_path, monkeypatch):
    """torch's writer failing on its own (no OSError behind it) is still a failed write; any other error is not."""
    record = RunRecord(tmp_path / "run")
    record.save_checkpoint("last", {"epoch": 1})
    before = record.checkpoint_path("last").read_bytes()

    def save_fails(message):
        def save(obj, f, *args, **kwargs):
            f.write(b"half a checkpoint")
            raise RuntimeError(message)

        return save

    monkeypatch.setattr(
        torch, "save", save_fails("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    )
    with pytest.raises(RecordWriteError) as info:
        record.save_checkpoint("last", {"epoch": 2})
    assert info.value.path == record.checkpoint_path("last") and "unexpected pos 704 vs 598" in str(info.value)
    monkeypatch.setattr(torch, "save", save_fails("a bug, not a disk"))
    with pytest.raises(RuntimeError, match="a bug, not a disk") as info:
        record.save_checkpoint("last", {"epoch": 2})
    assert not isinstance(info.value, OSError)
    assert record.checkpoint_path("last").read_bytes() == before and not leftovers(record.dir)


@pytest.mark.slow
def test_full_disk_at_summary_json_keeps_the_old_one_and_the_original_error(cfg_factory, tmp_path, monkeypatch, caplog):
    """The disk fills after epoch 1: epoch 2's heartbeat fails, and so does recording the failure (logged, once)."""
    run_dir = tmp_path / "run"
    real_open = builtins.open

    def open_until_full(file, mode="r", *args, **kwargs):
        rows = run_dir / "metrics.jsonl"
        if Path(file).name.startswith(".summary.json") and rows.exists() and len(rows.read_bytes().splitlines()) >= 2:
            f = real_open(file, mode, *args, **kwargs)
            f.write('{"status": "runn')
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(files_module, "open", open_until_full, raising=False)  # the record's whole-file writes only
    with caplog.at_level(logging.ERROR, logger="stackwise_bench.runs.record"):
        with pytest.raises(RecordWriteError) as info:
            run(cfg_factory(), run_dir)
    exc = info.value
    assert exc.reason == "io" and exc.path == run_dir / "summary.json"
    assert_one_sentence(str(exc), run_dir / "summary.json")
    # the error raised is the heartbeat's, not the failed attempt to record it
    assert "log_epoch" in [frame.name for frame in traceback.extract_tb(info.tb)]
    assert "fail" not in [frame.name for frame in traceback.extract_tb(info.tb)]

    old = read_summary(run_dir)  # parseable: the last summary that was written whole
    assert old["status"] == "running" and old["progress"]["epoch"] == 1
    assert not leftovers(run_dir)
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2]
    unrecorded = [r for r in caplog.records if "could not be recorded" in r.getMessage()]
    assert len(unrecorded) == 1 and "\n" not in unrecorded[0].getMessage()


def test_failed_append_is_cut_back_and_hardware_warns_once(tmp_path, monkeypatch, caplog):
    record = RunRecord(tmp_path)
    record.log_epoch({"epoch": 1, "val_top1": 0.5})
    record.log_hardware({"rss_mb": 1.0})
    before = {name: (tmp_path / name).read_bytes() for name in ("metrics.jsonl", "hardware.jsonl")}
    real_write = os.write

    def write_half(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(os, "write", write_half)
    with pytest.raises(RecordWriteError, match=r"metrics\.jsonl could not be written .*quota"):
        record.log_epoch({"epoch": 2, "val_top1": 0.6})
    with caplog.at_level(logging.WARNING, logger="stackwise_bench.runs.record"):
        record.log_hardware({"rss_mb": 2.0})  # on the monitor's thread: never raises
        record.log_hardware({"rss_mb": 3.0})
    monkeypatch.setattr(os, "write", real_write)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert len([r for r in caplog.records if "no longer recorded" in r.getMessage()]) == 1


def test_fail_does_not_raise_when_summary_cannot_be_written(tmp_path, monkeypatch, caplog):
    record = RunRecord(tmp_path)
    record.start(run={"seed": 1})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files_module, "open", no_space, raising=False)
    original = RecordWriteError("x could not be written.", tmp_path / "checkpoints" / "last.pt", errno.ENOSPC)
    with caplog.at_level(logging.ERROR, logger="stackwise_bench.runs.record"):
        record.fail(original, reason=original.reason)
    assert record.summary["status"] == "failed" and record.summary["error"]["path"] == str(original.path)
    assert read_summary(tmp_path)["status"] == "running"
    assert len([r for r in caplog.records if "could not be recorded" in r.getMessage()]) == 1
    assert not leftovers(tmp_path)


# ---- 2. an output folder that cannot be written -----------------------------------------------------
@pytest.fixture
def never_trains(monkeypatch):
    from stackwise_bench.training.trainer import Trainer

    def fit(*args, **kwargs):
        raise AssertionError("trained in a folder that cannot be written")

    monkeypatch.setattr(Trainer, "fit", fit)


def assert_refused(message: str, folder: Path) -> None:
    assert message.startswith(f"hydra.run.dir={folder} cannot be written (")
    assert message.endswith("; point hydra.run.dir (or hydra.sweep.dir) at a writable folder.")
    assert "\n" not in message and not re.search(r"[.;:]\s+[A-Z]", message.replace(str(folder), "PATH"))


def test_folder_under_a_file_is_refused_before_training(cfg_factory, tmp_path, never_trains):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError) as info:
        run(cfg_factory(), blocker / "run")
    assert_refused(str(info.value), blocker / "run")
    assert blocker.read_text() == "not a folder"
    with pytest.raises(ConfigError, match=r"\(\S+/results is a file, not a folder\)"):
        RunRecord(blocker / "run")


def test_run_dir_that_is_a_file_is_refused_before_training(cfg_factory, tmp_path, never_trains):
    (tmp_path / "run").write_text("x")
    with pytest.raises(ConfigError) as info:
        run(cfg_factory(), tmp_path / "run")
    assert_refused(str(info.value), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"\(\S+/run is a file, not a folder\)"):
        RunRecord(tmp_path / "run")


def test_existing_folder_that_denies_writes_is_refused(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o555)
    try:
        try:  # root ignores the mode bits (and NFS may too): then answer as a read-only mount does
            (run_dir / "probe").touch()
        except PermissionError:
            pass
        else:
            (run_dir / "probe").unlink()
            real_open = os.open

            def read_only(path, flags, *args, **kwargs):
                if Path(path).parent == run_dir and flags & os.O_CREAT:
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
                return real_open(path, flags, *args, **kwargs)

            monkeypatch.setattr(os, "open", read_only)
        with pytest.raises(ConfigError) as info:
            RunRecord(run_dir)
    finally:
        run_dir.chmod(0o755)
    assert_refused(str(info.value), run_dir)
    assert info.value.reason == "config" and not list(run_dir.iterdir())


# ---- 3. a resumed run never repeats rows ------------------------------------------------------------
@pytest.mark.slow
def test_resume_trims_metrics_and_hardware_to_the_checkpoint(finished_run, cfg_factory, tmp_path):
    run_dir = Path(shutil.copytree(finished_run, tmp_path / "killed"))
    saved_at = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["saved_at"]
    metrics = read_metrics(run_dir)
    hardware = read_hardware(run_dir)
    assert [r["epoch"] for r in metrics] == [1, 2] and all(isinstance(r["time"], float) for r in hardware)
    before_ckpt = [r for r in hardware if r["time"] <= saved_at]
    assert before_ckpt  # samples were taken while it trained

    # what a run killed after its last checkpoint leaves: rows the checkpoint knows nothing about
    summary = read_summary(run_dir)
    summary["status"] = "running"
    (run_dir / "summary.json").write_text(json.dumps(summary))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**metrics[-1], "epoch": 3}) + "\n")
    with open(run_dir / "hardware.jsonl", "a") as f:
        f.write(json.dumps({"rss_mb": 1.0, "time": saved_at + 0.001, "fake": True}) + "\n")
        f.write(json.dumps({"rss_mb": 1.0, "untimed": True}) + "\n")  # an old sample without a time: kept
        f.write('{"rss_mb": 1.0, "ti')  # killed mid-line

    t_resume = time.time()
    resumed = run(cfg_factory(["trainer.max_epochs=2", "trainer.resume=true"]), run_dir)
    assert resumed["status"] == "completed" and resumed["run"]["resumed"]
    assert resumed["previous_attempts"][-1]["status"] == "running"

    assert read_metrics(run_dir) == metrics  # exactly one row per epoch, the checkpoint's
    rows = read_hardware(run_dir)
    assert not any(r.get("fake") for r in rows)
    assert [r for r in rows if r.get("untimed")] == [{"rss_mb": 1.0, "untimed": True}]
    # every sample stamped after the checkpoint is the resumed attempt's own
    assert all(r["time"] >= t_resume for r in rows if "time" in r and r["time"] > saved_at)
    assert [r for r in rows if "time" in r and r["time"] <= saved_at] == before_ckpt
    assert any(r.get("time", 0) >= t_resume for r in rows)


def test_trim_to_checkpoint_without_saved_at_leaves_hardware_alone(tmp_path):
    record = RunRecord(tmp_path)
    for epoch in (1, 2, 3):
        record.log_epoch({"epoch": epoch})
    record.log_hardware({"rss_mb": 1.0, "time": 5.0})
    before = (tmp_path / "hardware.jsonl").read_text()
    record.trim_to_checkpoint({"progress": {"history": [{"epoch": 1}]}})  # a checkpoint from before saved_at
    assert read_metrics(tmp_path) == [{"epoch": 1}]
    assert (tmp_path / "hardware.jsonl").read_text() == before
    record.rewrite_metrics([{"epoch": 1}, {"epoch": 2}])  # the older call still works
    assert read_metrics(tmp_path) == [{"epoch": 1}, {"epoch": 2}]
