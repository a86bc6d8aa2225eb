"""A run folder holds one run's truth (issue 23, items 2-5): a folder whose summary.json is gone is refused, a restart
from scratch leaves no earlier rows, a checkpoint resumes only the run that wrote it, and a resume on changed data is
refused naming what changed. Where the fault lives at the command line, the real entrypoint runs in a subprocess."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stackwise_bench.errors import ConfigError
from stackwise_bench.runs.record import RunRecord
from stackwise_bench.train import run

from conftest import ROOT, compose, read_metrics, read_summary

BASE = [
    "model=resnet8",
    "dataset=synthetic",
    "dataset.num_train=256",
    "dataset.num_test=64",
    "trainer.device=cpu",
    "trainer.max_epochs=2",
    "trainer.batch_size=32",
    "trainer.eval_batch_size=64",
    "trainer.progress=log",
    "monitors=none",
    "trainer.threads=1",
]
TIMING_KEYS = {"epoch_time_s", "train_img_s", "eval_time_s"}


def numbers(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def train_cli(args: list[str], cwd: Path) -> tuple[int, str]:
    """``python -m stackwise_bench.train <args>``: (exit status, the error lines of its output)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "stackwise_bench.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    lines = (out.stdout + out.stderr).splitlines()  # a run's refusal is logged; one before Hydra writes is printed
    return out.returncode, "\n".join(line for line in lines if "[ERROR]" in line or line.startswith("error: "))


def interrupted(run_dir: Path, monkeypatch, overrides: list[str] = BASE) -> Path:
    """A run stopped (SIGINT) right after its first epoch was recorded: metrics [1], last.pt and best.pt of epoch 1."""
    log_epoch = RunRecord.log_epoch

    def then_stop(self, row):
        log_epoch(self, row)
        os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as patch:
        patch.setattr(RunRecord, "log_epoch", then_stop)
        assert run(compose(overrides, tiny=False), run_dir)["status"] == "interrupted"
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1]
    return run_dir


def resume(run_dir: Path, overrides: list[str] = BASE) -> dict:
    return run(compose([*overrides, "trainer.resume=true"], tiny=False), run_dir)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted run (seed 42) that every resumed one must equal."""
    run_dir = tmp_path_factory.mktemp("integrity") / "full"
    assert run(compose(BASE, tiny=False), run_dir)["status"] == "completed"
    return run_dir


@pytest.mark.slow
def test_a_folder_with_run_files_but_no_summary_is_refused(full, tmp_path):
    """Item 2: another config launched into a finished run's folder whose summary.json was deleted."""
    folder = Path(shutil.copytree(full, tmp_path / "run"))
    (folder / "summary.json").unlink()
    before = {p.name: p.read_bytes() for p in [folder / "metrics.jsonl", *(folder / "checkpoints").iterdir()]}

    code, error = train_cli([*BASE, "seed=9", f"hydra.run.dir={folder}"], tmp_path)

    assert code == 2 and error.count("\n") == 0, error
    assert f"hydra.run.dir={folder} holds files of an earlier run (checkpoints/, metrics.jsonl" in error
    assert "no summary.json" in error and error.endswith("choose another hydra.run.dir.")
    after = {p.name: p.read_bytes() for p in [folder / "metrics.jsonl", *(folder / "checkpoints").iterdir()]}
    assert after == before and not (folder / "summary.json").exists()

    # A process killed after it took the lease and before it recorded anything leaves Hydra's files and its lease:
    # that folder still launches (the lease is taken over).
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fresh = tmp_path / "killed_before_its_summary"
    (fresh / ".hydra").mkdir(parents=True)
    (fresh / ".hydra" / "config.yaml").write_text("seed: 42\n")
    (fresh / "train.log").write_text("[INFO] - training resnet8\n")
    holder = {"host": socket.gethostname(), "pid": dead.pid, "job_id": None, "started_at": "2026-01-01T00:00:00+0000"}
    holder.update(heartbeat=time.time(), timeout_s=120.0, token="the-dead-one")
    (fresh / ".lease").write_text(json.dumps(holder))
    assert run(compose(BASE, tiny=False), fresh)["status"] == "completed"
    assert [r["epoch"] for r in read_metrics(fresh)] == [1, 2]


@pytest.mark.slow
def test_following_the_advice_for_a_corrupt_last_pt_gives_a_clean_restart(full, tmp_path, monkeypatch):
    """Item 3: corrupt last.pt -> the command refuses it -> delete it as told -> epochs 1..N once, as uninterrupted."""
    run_dir = interrupted(tmp_path / "run", monkeypatch)
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:2000])  # a truncated copy

    code, error = train_cli([*BASE, "trainer.resume=true", f"hydra.run.dir={run_dir}"], tmp_path)
    assert code == 2 and f"trainer.resume=true: {last} is corrupt" in error and "; delete it to start" in error, error
    last.unlink()  # the advice, literally

    def killed_at_first_checkpoint(self, name, state):  # the restart dies before it saves anything
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(RunRecord, "save_checkpoint", killed_at_first_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            resume(run_dir)
    assert not (run_dir / "checkpoints" / "best.pt").exists()  # the earlier attempt's best is not this one's
    assert not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir)

    summary = resume(run_dir)
    assert summary["status"] == "completed"
    assert numbers(read_metrics(run_dir)) == numbers(read_metrics(full))
    assert summary["test"]["top1"] == read_summary(full)["test"]["top1"]


@pytest.mark.slow
def test_a_checkpoint_resumes_and_evaluates_only_with_its_own_run(full, tmp_path, monkeypatch):
    """Item 4: another run's last.pt is refused naming that run; an unstamped (older) one still resumes; evaluate
    names the run a checkpoint came from."""
    from stackwise_bench.evaluation import evaluate_checkpoint

    other = tmp_path / "seed7"
    assert run(compose([*BASE, "seed=7", "optimizer.lr=0.05"], tiny=False), other)["status"] == "completed"
    run_dir = interrupted(tmp_path / "run", monkeypatch)
    last = run_dir / "checkpoints" / "last.pt"
    own = last.read_bytes()
    shutil.copy(other / "checkpoints" / "last.pt", last)

    code, error = train_cli([*BASE, "trainer.resume=true", f"hydra.run.dir={run_dir}"], tmp_path)
    assert code == 2 and error.count("\n") == 0, error
    assert f"{last} was written by the run in {other.resolve()} (seed 7, config fingerprint " in error
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1]

    state = torch.load(io.BytesIO(own), weights_only=True)
    del state["run"]  # as written before checkpoints were stamped
    torch.save(state, last)
    assert resume(run_dir)["status"] == "completed"
    assert numbers(read_metrics(run_dir)) == numbers(read_metrics(full))

    stray = tmp_path / "stray.pt"
    shutil.copy(other / "checkpoints" / "best.pt", stray)
    bare = evaluate_checkpoint(stray)  # outside any run folder: evaluated as the run that wrote it
    assert bare["source"]["dir"] == str(other.resolve()) and bare["source"]["checkpoint"] == str(stray.resolve())
    assert bare["source"]["checkpoint_run"]["seed"] == 7 and bare["test"]["top1"] == read_summary(other)["test"]["top1"]
    shutil.move(other, tmp_path / "moved")  # the run that wrote it is gone from where the stamp says
    with pytest.raises(ConfigError, match="is not inside a run folder") as info:
        evaluate_checkpoint(stray)
    assert f"it came from the run in {other.resolve()} (seed 7, config fingerprint " in str(info.value)
    shutil.move(tmp_path / "moved", other)
    shutil.copy(other / "checkpoints" / "best.pt", run_dir / "checkpoints" / "best.pt")
    with pytest.raises(ConfigError, match=rf"best\.pt was written by the run in {other.resolve()} \(seed 7"):
        evaluate_checkpoint(run_dir)
    assert not (run_dir / "eval").exists()


@pytest.mark.slow
def test_a_resume_on_changed_images_is_refused_naming_the_files(tmp_path, monkeypatch):
    """Item 5: between the kill and the resume, images of an ImageFolder move to another class and one is deleted."""
    from test_imagefolder import write_folder

    root = write_folder(tmp_path / "imgs")
    for i in range(2):  # names that only class Ant has, so a move keeps them apart from the other classes' files
        shutil.copy(root / "Ant" / "a_square.png", root / "Ant" / f"moved{i}.png")
    images = ["model=resnet8", "dataset=imagefolder", f"dataset.root={root}", *BASE[4:], "trainer.batch_size=8"]
    run_dir = interrupted(tmp_path / "run", monkeypatch, images)
    for i in range(2):
        os.replace(root / "Ant" / f"moved{i}.png", root / "mole" / f"moved{i}.png")
    (root / "zebra" / "img9.jpg").unlink()

    code, error = train_cli([*images, "trainer.resume=true", f"hydra.run.dir={run_dir}"], tmp_path)
    assert code == 2 and error.count("\n") == 0, error
    assert "trainer.resume=true: the data changed since this run started" in error
    assert "2 files relabelled: Ant/moved0.png -> mole/moved0.png, Ant/moved1.png -> mole/moved1.png" in error
    assert "1 file removed: zebra/img9.jpg" in error and f"{run_dir / 'split.json'}" in error
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1]


@pytest.mark.slow
def test_a_resume_refuses_a_changed_or_damaged_split_json(tmp_path, monkeypatch):
    """Item 5, the built-in datasets: the recorded indices are compared, and a damaged split.json is one sentence."""
    run_dir = interrupted(tmp_path / "run", monkeypatch)
    split_file = run_dir / "split.json"
    split = json.loads(split_file.read_text())
    split["val_idx"][0] = split["train_idx"].pop(0)  # another split than this data gives
    split_file.write_text(json.dumps(split))
    with pytest.raises(ConfigError, match=r"^trainer\.resume=true: the data changed since this run started \(its"):
        resume(run_dir)

    split_file.write_text('{"train_idx": [1, 2')  # truncated
    with pytest.raises(ConfigError) as info:
        resume(run_dir)
    message = str(info.value)
    assert message.startswith(f"{split_file} is not valid JSON") and "\n" not in message, message
    assert "delete it to resume without comparing" in message
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1]


@pytest.mark.slow
def test_a_refusal_at_launch_leaves_the_runs_hydra_files_alone(full, tmp_path):
    """Another config launched into a finished run's folder is refused before Hydra rewrites its .hydra/ and log."""
    folder = Path(shutil.copytree(full, tmp_path / "run"))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("seed: 42  # the run's own\n")
    (folder / "train.log").write_text("[INFO] - the run's own log\n")
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "stackwise_bench.train", *BASE, "seed=9", f"hydra.run.dir={folder}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )

    text = (out.stdout + out.stderr).strip()
    assert out.returncode == 2 and len(text.splitlines()) == 1, text
    assert f"hydra.run.dir={folder} already holds a run with a different config (seed: 42 -> 9)" in text
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
