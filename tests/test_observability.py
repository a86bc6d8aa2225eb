"""Diagnostics and trackers in real training runs: they observe, never change, and survive resumes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from stackwise_bench.runs.contract import DIAGNOSTICS, HARDWARE
from stackwise_bench.train import run

from conftest import compose, read_metrics

TIMING = ("_time_s", "_img_s")
STEPS_PER_EPOCH = 230 // 32  # 256 synthetic images minus 10% validation, drop_last
FULL = ["diagnostics=full", "diagnostics.every_n_steps=2"]


def numbers(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.endswith(TIMING)} for row in read_metrics(run_dir)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def interrupt_at_step(monkeypatch, at: int) -> None:
    """SIGINT right after optimizer step ``at`` of the run (LambdaLR.step runs once per optimizer step)."""
    calls = {"n": 0}
    original = torch.optim.lr_scheduler.LambdaLR.step

    def step_then_signal(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1 + at:  # LambdaLR steps once when it is built
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step_then_signal)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Three epochs with every diagnostic on every second step."""
    run_dir = tmp_path_factory.mktemp("obs") / "full"
    summary = run(compose([*FULL, "trainer.max_epochs=3"]), run_dir)
    return run_dir, summary


@pytest.mark.slow
def test_diagnostics_change_nothing_in_training(full_run, tmp_path):
    """diagnostics=none and full (hooks, weight snapshots, per-layer norms every 2 steps) train bit-identically."""
    run_dir, summary = full_run
    plain = run(compose(["diagnostics=none", "trainer.max_epochs=3"]), tmp_path / "plain")
    assert numbers(run_dir) == numbers(tmp_path / "plain")
    assert summary["test"]["confusion_matrix"] == plain["test"]["confusion_matrix"]
    assert not (tmp_path / "plain" / DIAGNOSTICS).exists()


@pytest.mark.slow
def test_diagnostics_rows_cover_every_logging_step(full_run):
    run_dir, summary = full_run
    rows = read_jsonl(run_dir / DIAGNOSTICS)
    steps = [r["step"] for r in rows if r["kind"] == "step"]
    total = summary["train"]["steps"]
    assert steps == list(range(2, total + 1, 2))
    assert rows[-1]["kind"] == "weights" and rows[-1]["step"] == total
    layers = ["stem", "stage1.0", "stage2.0", "stage3.0", "head"]  # resnet8, in model order
    for row in rows[:-1]:
        assert list(row["layers"]) == layers and list(row["activations"]) == layers
        assert row["grad_norm"] > 0 and row["grad_norm_max"] >= row["grad_norm_mean"] > 0
        # the global norm is the root of the layers' squared norms
        by_layer = sum(v["grad_norm"] ** 2 for v in row["layers"].values()) ** 0.5
        assert by_layer == pytest.approx(row["grad_norm"], rel=1e-5)
        assert all(0 < v["update_ratio"] < 1 for v in row["layers"].values())
        assert 0 < row["activations"]["stage1.0"]["zero_frac"] < 1  # after a ReLU


@pytest.mark.slow
def test_a_resume_continues_diagnostics_and_hardware_without_repeats(full_run, tmp_path, monkeypatch):
    """Killed mid-epoch 2: the resumed run's diagnostics equal the uninterrupted run's; hardware seqs never repeat."""
    full_dir, _ = full_run
    run_dir = tmp_path / "killed"
    interrupt_at_step(monkeypatch, STEPS_PER_EPOCH + 4)
    assert run(compose([*FULL, "trainer.max_epochs=3"]), run_dir)["status"] == "interrupted"
    monkeypatch.undo()
    seqs_before = [r["seq"] for r in read_jsonl(run_dir / HARDWARE)]
    resumed = run(compose([*FULL, "trainer.max_epochs=3", "trainer.resume=true"]), run_dir)
    assert resumed["status"] == "completed"
    assert read_jsonl(run_dir / DIAGNOSTICS) == read_jsonl(full_dir / DIAGNOSTICS)
    seqs = [r["seq"] for r in read_jsonl(run_dir / HARDWARE)]
    assert seqs == sorted(set(seqs)) and seqs[-1] > max(seqs_before)


# ---- trackers: sinks of the record's dicts ------------------------------------------------------------------------
TRACKED = ["logger=[tensorboard,mlflow,trackio]", "trainer.log_every_n_steps=2", "trainer.max_epochs=3", *FULL]


def tensorboard_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_series(summary: dict, keys) -> dict[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient

    from stackwise_bench.training.loggers.mlflow_logger import mlflow_key

    state = summary["loggers"]["mlflow"]["state"]
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    out = {}
    for key in keys:
        history = client.get_metric_history(state["run_id"], mlflow_key(key))
        out[key] = sorted((m.step, m.value) for m in history)
    return out


def trackio_series(summary: dict) -> dict[str, list[tuple[int, float]]]:
    from trackio.sqlite_storage import SQLiteStorage

    state = summary["loggers"]["trackio"]["state"]
    out: dict[str, list[tuple[int, float]]] = {}
    for row in SQLiteStorage.get_logs(summary["run"]["study"], run_id=state["run_id"]):
        for key, value in row.items():
            if key not in ("step", "timestamp"):
                out.setdefault(key, []).append((row["step"], value))
    return {key: sorted(series) for key, series in out.items()}


def epoch_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as tracker series: ``epoch/<key>`` at the epoch's global step (the numbers only)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in read_metrics(run_dir):
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(f"epoch/{key}", []).append((row["step"], float(value)))
    return out


def float32(series: dict) -> dict:
    """TensorBoard stores scalars as float32."""
    import numpy as np

    return {key: [(step, float(np.float32(v))) for step, v in points] for key, points in series.items()}


def assert_one_value_per_step(series: dict) -> None:
    for key, points in series.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), f"{key}: repeated or unordered steps {steps}"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tracked") / "tracked"
    summary = run(compose([*TRACKED, "study=tracked"]), run_dir)
    return run_dir, summary


@pytest.mark.slow
def test_each_tracker_holds_what_the_record_wrote(tracked_run, full_run):
    """TensorBoard's EventAccumulator, MlflowClient and trackio's storage give back metrics.jsonl, value for value."""
    run_dir, summary = tracked_run
    assert summary["status"] == "completed"
    assert {name: entry["error"] for name, entry in summary["loggers"].items()} == {
        "tensorboard": None,
        "mlflow": None,
        "trackio": None,
    }
    assert numbers(run_dir) == numbers(full_run[0])  # trackers change nothing either
    want = epoch_series(run_dir)
    board = tensorboard_series(run_dir)
    assert {k: board[k] for k in want} == float32(want)
    assert mlflow_series(summary, want) == want
    trackio = trackio_series(summary)
    assert {k: trackio[k] for k in want} == want
    # step 1's and every log_every_n_steps-th step's loss and rate; the diagnostics by statistic and layer; the test
    steps = list(range(2, summary["train"]["steps"] + 1, 2))
    for series in (board, trackio):
        assert [s for s, _ in series["train/loss"]] == [1, *steps]
        assert [s for s, _ in series["diagnostics/grad_norm/head"]] == steps
        assert series["test/top1"] == [(summary["train"]["steps"], summary["test"]["top1"])]
        assert_one_value_per_step(series)
    diag = read_jsonl(run_dir / DIAGNOSTICS)
    assert [v for _, v in trackio["diagnostics/grad_norm/stage2.0"]] == [
        r["layers"]["stage2.0"]["grad_norm"] for r in diag if r["kind"] == "step"
    ]
    hardware = read_jsonl(run_dir / HARDWARE)
    assert [v for _, v in trackio["hardware/rss_mb"]] == [r["rss_mb"] for r in hardware]


@pytest.mark.slow
def test_a_resumed_run_continues_each_tracker_run_without_repeating_steps(tracked_run, tmp_path, monkeypatch):
    full_dir, full = tracked_run
    run_dir = tmp_path / "tracked"  # the same name in another study folder: its own tracker runs
    overrides = [*TRACKED, "study=tracked-resume"]
    interrupt_at_step(monkeypatch, STEPS_PER_EPOCH + 3)
    first = run(compose(overrides), run_dir)
    assert first["status"] == "interrupted"
    monkeypatch.undo()
    resumed = run(compose([*overrides, "trainer.resume=true"]), run_dir)
    assert resumed["status"] == "completed"
    for name in ("mlflow", "trackio"):  # the same tracker run, continued
        assert resumed["loggers"][name]["state"]["run_id"] == first["loggers"][name]["state"]["run_id"]
    want = epoch_series(run_dir)
    assert want == epoch_series(full_dir) | {k: v for k, v in want.items() if k.endswith(TIMING)}
    board, trackio = tensorboard_series(run_dir), trackio_series(resumed)
    mlflow = mlflow_series(resumed, [*want, "train/loss", "diagnostics/grad_norm/head"])
    for series in (board, trackio, mlflow):
        assert_one_value_per_step(series)
        assert [s for s, _ in series["train/loss"]] == [1, *range(2, resumed["train"]["steps"] + 1, 2)]
    assert mlflow["train/loss"] == trackio["train/loss"] == trackio_series(full)["train/loss"]
    assert {k: mlflow[k] for k in want} == want


def test_a_logger_that_fails_costs_the_run_nothing(tmp_path, monkeypatch):
    """A tracker that raises warns once, is recorded in summary.json["loggers"], and training goes on."""
    from stackwise_bench.training.loggers.tensorboard_logger import TensorBoardLogger

    def locked(self, *args, **kwargs):
        raise OSError("database is locked")

    monkeypatch.setattr(TensorBoardLogger, "log_metrics", locked)
    summary = run(compose(["logger=[tensorboard,trackio]", "study=failing", "trainer.max_epochs=1"]), tmp_path / "r")
    assert summary["status"] == "completed"
    assert summary["loggers"]["tensorboard"]["error"] == "OSError: database is locked"
    assert summary["loggers"]["trackio"]["error"] is None
    assert "epoch/val_top1" in trackio_series(summary)


def test_a_logger_whose_package_is_missing_is_refused_before_training(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(Exception, match=r"logger=mlflow needs the mlflow package.*stackwise_bench\[track\]"):
        run(compose(["logger=mlflow", "study=missing"]), tmp_path / "r")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_parallel_jobs_write_one_mlflow_store_and_one_trackio_project_without_loss(tmp_path):
    """A real --multirun, 2 jobs at once into one MLflow database and one trackio project: all jobs read back whole."""
    import subprocess
    import sys

    from conftest import ROOT, TINY

    args = [*TINY, "seed=1,2,3,4", "trainer.max_epochs=3", "trainer.log_every_n_steps=1", "study=shared"]
    args += [
        "logger=[mlflow,trackio]",
        "hydra.launcher.n_jobs=2",
        "trainer.threads=1",
        "monitors.hardware.interval_s=0.02",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "stackwise_bench.train", "--multirun", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    study = tmp_path / "multirun" / "shared"
    jobs = sorted(p for p in study.iterdir() if (p / "summary.json").exists())
    assert len(jobs) == 4
    from conftest import read_summary

    for job in jobs:
        summary = read_summary(job)
        assert summary["status"] == "completed" and not any(e["error"] for e in summary["loggers"].values())
        want = epoch_series(job)
        steps = list(range(1, summary["train"]["steps"] + 1))
        trackio, mlflow = trackio_series(summary), mlflow_series(summary, [*want, "train/loss"])
        assert {k: trackio[k] for k in want} == want == {k: mlflow[k] for k in want}
        assert [s for s, _ in trackio["train/loss"]] == steps == [s for s, _ in mlflow["train/loss"]]
        hardware = read_jsonl(job / HARDWARE)
        assert [v for _, v in trackio["hardware/rss_mb"]] == [r["rss_mb"] for r in hardware]
    import sqlite3

    from trackio.utils import TRACKIO_DIR

    for db in (study / "mlflow.db", Path(TRACKIO_DIR) / "shared.db"):
        assert db.is_file()
        with sqlite3.connect(db) as con:
            assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_energy_adds_up_over_a_resumed_runs_attempts_each_counted_once(tmp_path):
    """Interrupted (10 J), crashed without resources, interrupted again (5 J), completed (2 J): 17 J, per image too."""
    from stackwise_bench.runs.record import RunRecord
    from stackwise_bench.train import run_resources

    config = {"seed": 1}

    def attempt(ending, energy=None, images=0):
        record = RunRecord(tmp_path)
        record.prepare(config, "fp", may_resume=True)
        record.start(run={}, config=config)
        if ending == "crash":
            record.fail(RuntimeError("killed before it recorded its resources"))
            return record.summary
        mine = {"energy_j": energy, "gpu_energy_j": energy, "cpu_energy_j": None, "images": images}
        record.finish(ending, resources=run_resources(mine, record.summary.get("previous_attempts", [])))
        return record.summary

    attempt("interrupted", 10.0, 100)
    attempt("crash")
    assert "resources" not in read_summary_of(tmp_path)  # the crashed attempt does not carry the first one's on
    attempt("interrupted", 5.0, 50)
    final = attempt("completed", 2.0, 50)["resources"]
    assert final["energy_j"] == final["gpu_energy_j"] == 17.0 and final["images"] == 200
    assert final["energy_j_per_img"] == pytest.approx(17.0 / 200) and final["cpu_energy_j"] is None
    assert final["attempt"] == {"energy_j": 2.0, "gpu_energy_j": 2.0, "cpu_energy_j": None, "images": 50}


def read_summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_a_tracker_that_hangs_is_left_behind_at_close(tmp_path):
    """A tracker stuck on a lock delays nothing in training (a writer thread) and close() gives up on it in time."""
    import threading

    from stackwise_bench.runs.tracking import TrackerRun, Trackers

    release = threading.Event()

    class Stuck:
        name = "stuck"

        def open(self, run):
            return {"id": 1}

        def log_metrics(self, metrics, step, stream):
            release.wait(30)

        def log_summary(self, summary):
            pass

        def close(self, status):
            pass

    reports = []
    info = TrackerRun(tmp_path, "r", "s", tmp_path, {}, {}, {}, None)
    trackers = Trackers([Stuck()], lambda: info, reports.append, timeout_s=0.2)
    for step in range(100):  # returns at once: the writer thread holds the stuck call
        trackers.log("train", {"loss": 1.0}, step)
    trackers.close("completed")
    release.set()
    assert reports[-1]["stuck"]["state"] == {"id": 1}
    assert reports[-1]["stuck"]["error"].startswith("TimeoutError: still writing after 0 s")


@pytest.mark.slow
def test_trackers_get_the_grad_norm_without_clipping_too(tmp_path):
    """trainer.grad_clip=null: the reported steps measure the norm themselves; it equals the diagnostics' one."""
    import numpy as np

    overrides = ["logger=tensorboard", "trainer.grad_clip=null", "trainer.log_every_n_steps=2", *FULL, "study=noclip"]
    summary = run(compose(overrides), tmp_path / "noclip")
    board = tensorboard_series(tmp_path / "noclip")
    diag = {r["step"]: r["grad_norm"] for r in read_jsonl(tmp_path / "noclip" / DIAGNOSTICS) if r["kind"] == "step"}
    assert [s for s, _ in board["train/grad_norm"]] == [1, *range(2, summary["train"]["steps"] + 1, 2)]
    for step, value in board["train/grad_norm"][1:]:  # step 1 is logged, not a diagnostics step
        assert value == pytest.approx(float(np.float32(diag[step])), rel=1e-5)
