"""Studies as real --multirun subprocesses: parallel, resumable, fault-isolated, planned, on submitit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stackwise_bench.runs.job import cores_per_job
from stackwise_bench.values import short_number

from conftest import ROOT, TINY, compose, read_metrics, read_summary

SWEEP = [*TINY, "trainer.max_epochs=1", "monitors=none"]
SWEEP = [o for o in SWEEP if not o.startswith("monitors.")]


def multirun(args, cwd, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "stackwise_bench.train", "--multirun", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def outcomes(study: Path) -> dict:
    """How each job of the latest launch ended, as the sweep recorded it for its failure table."""
    latest = json.loads((study / ".study" / "current.json").read_text())["launch"]
    folder = study / ".study" / "launches" / latest / "outcomes"
    return {p.stem: json.loads(p.read_text())["status"] for p in folder.glob("*.json")}


def job_name(overrides: list[str]) -> str:
    """A job's folder name as Hydra builds it: its overrides sorted, the contract's non-naming keys left out."""
    from stackwise_bench.runs.contract import FOLDER_ONLY_KEYS, VOLATILE_KEYS

    last = {o.split("=")[0]: o for o in overrides}  # a key given twice: the last value is the one that counts
    return ",".join(sorted(o for k, o in last.items() if k not in (*VOLATILE_KEYS, *FOLDER_ONLY_KEYS)))


def job_dirs(study: Path) -> list[Path]:
    return sorted(p for p in study.iterdir() if (p / "summary.json").exists())


@pytest.fixture(scope="module")
def four_jobs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sweep")
    args = ["seed=1,2", "optimizer.lr=0.002,0.004", *SWEEP, "study=four", "hydra.launcher.n_jobs=2"]
    first = multirun(args, cwd)
    assert first.returncode == 0, first.stderr[-3000:]
    return cwd, args, first


@pytest.mark.slow
def test_four_jobs_in_parallel_complete(four_jobs):
    cwd, _, first = four_jobs
    study = cwd / "multirun" / "four"
    dirs = job_dirs(study)
    assert len(dirs) == 4
    for d in dirs:
        summary = read_summary(d)
        assert summary["status"] == "completed"
        assert summary["env"]["threads"] == cores_per_job(2)  # cores // 2 jobs: never oversubscribed
    # named by the keys that vary; the shared overrides are in the launch record
    names = [f"optimizer.lr={lr},seed={seed}" for lr in ("0.002", "0.004") for seed in (1, 2)]
    assert [d.name for d in dirs] == names
    launch = json.loads((study / ".study" / "current.json").read_text())
    assert sorted(launch["jobs"]) == names
    record = json.loads(next((study / ".study" / "launches").glob("*/launch.json")).read_text())
    assert record["grid"]["seed"] == "1,2" and "git_sha" in record
    shared = record["shared"]
    assert shared["dataset"] == "dataset=synthetic" and shared["trainer.max_epochs"] == "trainer.max_epochs=1"
    assert "optimizer.lr" not in shared and "study" not in shared
    out = first.stderr + first.stdout
    assert "n_jobs=2" in out and "study multirun/four: 4 jobs: 4 to run, 0 already done" in out
    assert " is launching " not in out  # Hydra's count, which includes jobs that will be skipped
    for name in names:  # each job's lines name it: parallel jobs interleave
        assert f"[{name}] " in out and f"[{name}] " + "[" in out
    # the closing table: every job, its status, its test top1 and time; then the command that analyses the study
    table = first.stdout[first.stdout.index("study multirun/four: 4 jobs\n") :].splitlines()
    assert table[1].split() == ["job", "status", "test", "top1", "time"]
    rows = {row.split()[0]: row.split()[1:] for row in table[2:6]}
    for d in dirs:
        assert rows[d.name][:2] == ["completed", short_number(read_summary(d)["test"]["top1"])]
        assert rows[d.name][2].endswith("s")
    assert table[6] == "analyse the study: python -m stackwise_bench.analyze runs=multirun/four"


@pytest.mark.slow
def test_relaunch_trains_nothing(four_jobs):
    cwd, args, first = four_jobs
    study = cwd / "multirun" / "four"
    before = {d.name: (d / "summary.json").read_text() for d in job_dirs(study)}
    again = multirun(args, cwd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {d.name: (d / "summary.json").read_text() for d in job_dirs(study)} == before
    assert set(outcomes(study).values()) == {"skipped"} and len(outcomes(study)) == 4
    assert "already completed with the same config" in again.stderr + again.stdout
    assert "study multirun/four: 4 jobs: 0 to run, 4 already done" in again.stderr + again.stdout
    assert again.stdout.count("skipped (already done)") == 4


@pytest.mark.slow
def test_a_study_named_the_old_way_keeps_its_folders_on_relaunch(four_jobs):
    """A study launched before folders were named by what varies: its full-name folders are found, nothing retrains."""
    import shutil

    cwd, args, _ = four_jobs
    old = cwd / "multirun" / "old"
    shutil.copytree(cwd / "multirun" / "four", old)
    (old / ".study" / "folders.json").unlink()  # an older version wrote none, and its launches named no identity
    for record in (old / ".study" / "launches").glob("*/launch.json"):
        launch = json.loads(record.read_text())
        for job in launch["jobs"].values():
            job.pop("identity", None)
        record.write_text(json.dumps(launch))
    from stackwise_bench.runs.contract import FOLDER_ONLY_KEYS, VOLATILE_KEYS
    from stackwise_bench.runs.naming import parse_jobs

    for d in job_dirs(old):  # Hydra's override_dirname: every override but the contract's keys, as written
        (identity,) = parse_jobs([read_summary(d)["run"]["overrides"]], [*VOLATILE_KEYS, *FOLDER_ONLY_KEYS])
        d.rename(old / identity)
    before = {d.name: (d / "summary.json").read_text() for d in job_dirs(old)}
    assert all(len(name) > 100 for name in before)
    again = multirun([a.replace("study=four", "study=old") for a in args], cwd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {d.name: (d / "summary.json").read_text() for d in job_dirs(old)} == before
    assert set(outcomes(old).values()) == {"skipped"} and len(outcomes(old)) == 4
    assert json.loads((old / ".study" / "folders.json").read_text())["scheme"] == "full"


@pytest.mark.slow
def test_plan_lists_states_and_trains_nothing(four_jobs):
    cwd, args, _ = four_jobs
    plan = multirun([a.replace("seed=1,2", "seed=1,2,3") for a in args] + ["plan=true"], cwd)
    assert plan.returncode == 0, plan.stderr[-3000:]
    lines = [line for line in plan.stdout.splitlines() if "seed=" in line]
    assert len(lines) == 6
    assert sum(line.rstrip().endswith("done") for line in lines) == 4
    assert sum(line.rstrip().endswith("pending") for line in lines) == 2
    assert not any("seed=3" in d.name for d in job_dirs(cwd / "multirun" / "four"))


@pytest.mark.slow
def test_changed_config_against_existing_folder_is_refused(four_jobs):
    """Same job as far as its folder goes (label smoothing left out of its name here), different config: refused."""
    from stackwise_bench.runs.contract import FOLDER_ONLY_KEYS, VOLATILE_KEYS

    cwd, _, _ = four_jobs
    study = cwd / "multirun" / "four"
    target = study / "optimizer.lr=0.002,seed=1"
    before = (target / "summary.json").read_text()
    exclude = "[" + ",".join([*VOLATILE_KEYS, *FOLDER_ONLY_KEYS, "trainer.label_smoothing"]) + "]"
    args = [
        "seed=1",
        "optimizer.lr=0.002",
        *SWEEP,
        "study=four",
        "trainer.label_smoothing=0.1",
        f"hydra.job.config.override_dirname.exclude_keys={exclude}",
    ]
    out = multirun(args, cwd)
    assert out.returncode == 1
    assert "different config (trainer.label_smoothing: 0.0 -> 0.1)" in out.stderr + out.stdout
    assert "refused" in out.stderr
    assert (target / "summary.json").read_text() == before


@pytest.mark.slow
def test_failing_job_does_not_stop_the_others(tmp_path):
    out = multirun(["optimizer.lr=0.002,1e30", *SWEEP, "study=faulty", "hydra.launcher.n_jobs=2"], tmp_path)
    assert out.returncode == 1
    assert "1 of 2 jobs did not complete" in out.stderr and "diverged" in out.stderr
    summaries = {d.name: read_summary(d) for d in job_dirs(tmp_path / "multirun" / "faulty")}
    statuses = sorted(s["status"] for s in summaries.values())
    assert statuses == ["completed", "failed"]
    failed = next(s for s in summaries.values() if s["status"] == "failed")
    assert failed["error"]["reason"] == "diverged" and "Traceback" in failed["error"]["traceback"]


@pytest.mark.slow
def test_interrupted_job_is_resumed(tmp_path, monkeypatch):
    """A job folder left interrupted mid-epoch is resumed by relaunching the sweep, ending as an uninterrupted run."""
    import signal

    import torch

    from stackwise_bench.train import run

    # Threads pinned: float reductions differ between thread counts, so bit-equality needs the same count.
    overrides = [
        "seed=1",
        *[o for o in SWEEP if not o.startswith("trainer.max_epochs")],
        "trainer.max_epochs=2",
        "trainer.threads=1",
        "study=resume",
    ]
    threads = torch.get_num_threads()
    run_dir = tmp_path / "multirun" / "resume" / job_name(overrides)
    reference = tmp_path / "reference"
    cfg = compose(overrides, tiny=False)
    run(cfg, reference)

    calls = {"n": 0}
    original = torch.optim.lr_scheduler.LambdaLR.step

    def step_then_signal(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 10:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step_then_signal)
    assert run(cfg, run_dir, overrides=overrides)["status"] == "interrupted"
    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", original)

    torch.set_num_threads(threads)
    out = multirun(overrides, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["run"]["resumed"]
    assert summary["previous_attempts"][0]["status"] == "interrupted"

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.endswith(("_time_s", "_img_s"))} for r in rows]

    assert strip(read_metrics(run_dir)) == strip(read_metrics(reference))


@pytest.mark.slow
def test_deletion_override_is_recorded_and_a_launch_that_cannot_be_recorded_stops(tmp_path):
    """`~monitors.hardware` in a sweep is part of its launch record; a failing launch record stops the sweep."""
    deleting = [o for o in SWEEP if o != "monitors=none"] + ["~monitors.hardware", "study=deleting"]
    out = multirun(["seed=1", *deleting], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    study = tmp_path / "multirun" / "deleting"
    record = json.loads(next((study / ".study" / "launches").glob("*/launch.json")).read_text())
    assert record["grid"]["~monitors.hardware"] == "" and record["grid"]["seed"] == "1"
    (job,) = job_dirs(study)
    assert read_summary(job)["status"] == "completed" and read_summary(job)["config"]["monitors"] == {}

    # A job folder written by a newer stackwise_bench: the launch refuses in one sentence and runs nothing.
    newer = tmp_path / "multirun" / "newer" / job_name(["seed=2", *SWEEP])
    newer.mkdir(parents=True)
    (newer / "summary.json").write_text(json.dumps({"schema_version": 99, "status": "completed"}))
    out = multirun(["seed=1,2", *SWEEP, "study=newer"], tmp_path)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "schema_version 99, newer than" in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "raised" not in out.stderr  # not Hydra's callback warning
    assert not (tmp_path / "multirun" / "newer" / job_name(["seed=1", *SWEEP])).exists()


@pytest.mark.slow
def test_submitit_local_sweep(tmp_path):
    out = multirun(["hydra/launcher=submitit_local", "seed=1,2", *SWEEP, "study=slurmish"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    dirs = job_dirs(tmp_path / "multirun" / "slurmish")
    assert len(dirs) == 2 and all(read_summary(d)["status"] == "completed" for d in dirs)
    assert (tmp_path / "multirun" / "slurmish" / ".submitit").is_dir()


# FP8Test evaluates other studies' runs and trains nothing: tests/test_evaluate.py covers it end to end.
PRESETS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml") if p.stem != "FP8Test")


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_tiny_variant_trains(preset, tmp_path):
    """Each study preset composes as written and its tiny offline variant trains (in-process)."""
    from stackwise_bench.train import run

    full = compose([f"experiment={preset}"], tiny=False)
    assert full.study == preset
    if full.dataset.get("task") is not None:  # a GLUE preset: bert_micro on bytes, a generated SST-2-layout task
        made = subprocess.run(
            [sys.executable, "-m", "stackwise_bench.data.text.glue_synthetic", str(tmp_path / "glue"), "64", "32"]
        )
        assert made.returncode == 0
        tiny = compose(
            [
                f"experiment={preset}",
                "model=bert_micro",
                "dataset.task=sst2",
                f"dataset.root={tmp_path / 'glue'}",
                "dataset.tokenizer=byte",
                "dataset.seq_len=32",
                "model.checkpoint_path=null",  # no pretraining study here
                "trainer.max_epochs=1",
                "trainer.batch_size=16",
            ],
            tiny=False,
        )
    elif full.dataset.get("tokenizer") is not None:  # a language-model preset: gpt_micro on bytes, a few windows
        tiny = compose(
            [
                f"experiment={preset}",
                "model=gpt_micro",
                "dataset.tokenizer=byte",
                "dataset.seq_len=32",
                "dataset.steps_per_epoch=3",
                "dataset.val_tokens=2048",
                "dataset.test_tokens=2048",
                "regime.stacks=[1,2,4]",
                "trainer.max_epochs=1",
                "trainer.batch_size=8",
                *(["model.checkpoint_path=null"] if preset == "lm_peft" else []),  # no pretrained folder here
            ],
            tiny=False,
        )
    else:  # 64 images: fp16 autocast convolutions are slow on CPUs; the point is that the preset trains at all.
        tiny = compose(
            [
                f"experiment={preset}",
                "model=resnet8",
                "model.pretrained=false",
                "trainer.max_epochs=1",
                "trainer.eval_every=1",
                "trainer.batch_size=16",
                "dataset.num_train=64",
                "dataset.num_test=32",
            ]
        )
    summary = run(tiny, tmp_path / preset)
    assert summary["status"] == "completed", summary.get("error")
    assert summary["config"]["precision"]["name"] == full.precision.name
    assert summary["config"]["augmentation"] == dict(full.augmentation)


@pytest.mark.slow
def test_analysis_of_a_real_sweep(four_jobs, tmp_path):
    """The analysis reads a real sweep: cells by optimizer.lr, means and paired test from the summaries themselves."""
    import numpy as np
    from scipy import stats

    from stackwise_bench.analysis import analyze_runs, write_report

    cwd, _, _ = four_jobs
    study = cwd / "multirun" / "four"
    a = analyze_runs(study, metric="test.top1", baseline="optimizer.lr=0.002")
    assert len(a.runs) == 4 and set(a.runs["status"]) == {"completed"}
    assert a.group_by == ["optimizer.lr"]
    top1 = {}
    for d in job_dirs(study):
        s = read_summary(d)
        top1.setdefault(s["config"]["optimizer"]["lr"], {})[s["run"]["seed"]] = s["test"]["top1"]
    for lr, by_seed in top1.items():
        row = a.summary[a.summary["optimizer.lr"] == lr].iloc[0]
        assert row["n"] == 2
        assert np.isclose(row["mean"], np.mean(list(by_seed.values())))
    comparison = a.comparisons.iloc[0]
    base, other = top1[0.002], top1[0.004]
    expected = stats.ttest_rel([other[s] for s in (1, 2)], [base[s] for s in (1, 2)])
    if np.isfinite(expected.pvalue):
        assert np.isclose(comparison["p_value"], expected.pvalue)
    out = write_report(a, tmp_path / "report")
    for name in ("report.md", "table.tex", "runs.csv", "summary.csv", "stats.csv"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("n_jobs", ["0", "-1"])
def test_launcher_n_jobs_below_one_is_refused_before_the_launch_record(n_jobs, tmp_path):
    """joblib raised on 0 after the launch record was written (a traceback), and ran a negative value silently."""
    out = multirun(["seed=1,2", *SWEEP, "study=jobs", f"hydra.launcher.n_jobs={n_jobs}"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"error: hydra.launcher.n_jobs={n_jobs} must be a positive integer (the jobs run at once), e.g. "
        "hydra.launcher.n_jobs=2; leave it out for one job per GPU, else up to 4 CPU jobs."
    ), out.stderr[-3000:]
    assert not (tmp_path / "multirun").exists()


def test_unreadable_launch_records_are_one_sentence(tmp_path):
    """Garbage, truncated or foreign launch.json / current.json / outcome files: a sentence naming the file."""
    from stackwise_bench.errors import ConfigError
    from stackwise_bench.runs.job import check_launch_record, launch_of
    from stackwise_bench.runs.study import LAUNCH_FILE, current_path, outcome_path, read_outcome

    launch = tmp_path / ".study" / "launches" / "t"
    launch.mkdir(parents=True)
    for text in ("garbage", '{"jobs": {"a": {"finger', '{"version": 2}'):
        (launch / LAUNCH_FILE).write_text(text)
        with pytest.raises(ConfigError, match=rf"^{launch / LAUNCH_FILE} is not a readable launch record \(.*\); rel"):
            check_launch_record(launch, "a", "fp")
    current_path(tmp_path).write_text("\0\0\0")
    with pytest.raises(ConfigError, match=r"current\.json is not a readable launch record .*; relaunch the study"):
        launch_of(tmp_path)
    outcome = outcome_path(launch, "a")
    outcome.parent.mkdir()
    outcome.write_text('{"stat')
    got = read_outcome(outcome)
    assert got["status"] == "failed" and got["reason"].startswith(f"{outcome} is not a readable launch record")
