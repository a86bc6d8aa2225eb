"""Hyperparameter search (hparams_search=, runs/search.py): resumable by its total, scored on validation.

One real search in subprocesses: 4 trials of a tiny run, the launcher killed (kill -9) once 2 trials have finished,
then relaunched with the same command. It must end with exactly 4 complete trials and 4 run folders, without
training trials 1-2 again, and its analysis must name the best trial the run folders say is best.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest

from stackwise_bench.errors import ConfigError
from stackwise_bench.runs import search_config, search_store
from stackwise_bench.values import short_number

from conftest import ROOT, TINY_DATA, read_summary

TRIAL = [
    *TINY_DATA,
    "dataset.num_train=128",
    "dataset.num_test=32",
    "trainer.device=cpu",
    "trainer.max_epochs=1",
    "trainer.batch_size=32",
    "trainer.eval_batch_size=64",
    "trainer.progress=log",
    "monitors=none",
]
SEARCH = ["hparams_search=lr_wd", "study=search", "hydra.sweeper.n_trials=4", "hydra.launcher.n_jobs=1", *TRIAL]


def train(args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "stackwise_bench.train", "--multirun", *args]
    return subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen
    )


def finished(study: Path) -> dict[str, dict]:
    """Run folders whose summary.json says they finished: {folder name: summary}."""
    out = {}
    for d in sorted(study.iterdir()) if study.is_dir() else []:
        summary = read_summary(d) if (d / "summary.json").exists() else None
        if summary and summary["status"] == "completed":
            out[d.name] = summary
    return out


def stored(study: Path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=search_store.DEFAULT_STUDY_NAME, storage=f"sqlite:///{study / 'optuna.db'}")


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """The search killed after 2 finished trials, then relaunched: (cwd, study folder, the 2 first records, out)."""
    cwd = tmp_path_factory.mktemp("search")
    study = cwd / "multirun" / "search"
    proc = train(SEARCH, cwd, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(finished(study)) < 2 or len(list(study.glob("*/summary.json"))) < 3:  # killed while trial 3 trains
        assert proc.poll() is None, proc.communicate()[1][-3000:]  # it must not end before it is killed
        assert time.monotonic() < deadline, "gave up waiting for 2 finished trials and a third one started"
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)  # a crash: nothing is told to Optuna or recorded by the launcher
    proc.communicate()
    _, alive = psutil.wait_procs(workers, timeout=60)  # its workers stop (saving) when they see it gone
    assert not alive
    first = {name: (study / name / "summary.json").read_text() for name in finished(study)}
    out = train(SEARCH, cwd)
    stdout, stderr = out.communicate(timeout=300)
    assert out.returncode == 0, stderr[-3000:]
    return cwd, study, first, stdout + stderr


@pytest.mark.slow
def test_a_killed_search_continues_to_its_total_without_retraining(killed_and_resumed):
    _, study, first, out = killed_and_resumed
    assert not re.search(r"\d{9}", out)  # no 17-digit float in the logs, the launcher's lines or the closing table
    s = stored(study)
    complete = [t for t in s.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4  # n_trials is the study's total, not a launch's
    assert [t for t in s.trials if t.state.name not in ("COMPLETE", "FAIL")] == []
    folders = [d for d in study.iterdir() if (d / "summary.json").exists()]
    runs = finished(study)
    assert len(folders) == len(runs) == 4  # one folder per trial: the interrupted trial's run was resumed in place
    lost = [t for t in s.trials if t.state.name == "FAIL"]
    assert len(lost) <= 1  # the trial the kill interrupted (unless it ended first): its launcher was gone
    for t in lost:
        (again,) = [c for c in complete if c.user_attrs.get("continues") == t.number]
        assert again.params == t.params and again.user_attrs["job"] == t.user_attrs["job"]
    assert len(first) >= 2
    for name, text in first.items():  # the trials that had finished were not trained again, nor rewritten
        assert (study / name / "summary.json").read_text() == text
    for t in complete:  # each trial is scored on its own run's best validation top-1, not its test top-1
        summary = runs[t.user_attrs["job"]]
        assert t.value == summary["train"]["best_val_top1"]
        assert summary["config"]["optimizer"]["lr"] == t.params["optimizer.lr"]
        assert summary["config"]["optimizer"]["weight_decay"] == t.params["optimizer.weight_decay"]
        assert "hparams_search" not in t.user_attrs["job"] and "study=" not in t.user_attrs["job"]
        # named by the searched values to their significant digits (the job trains the exact value)
        lr, wd = t.params["optimizer.lr"], t.params["optimizer.weight_decay"]
        assert t.user_attrs["job"] == f"optimizer.lr={short_number(lr)},optimizer.weight_decay={short_number(wd)}"
    assert len({t.user_attrs["job"] for t in complete}) == 4
    params = {(t.params["optimizer.lr"], t.params["optimizer.weight_decay"]) for t in complete}
    assert len(params) == 4  # the relaunch drew new points (seed + trials so far), not the first launch's again
    assert 1e-4 <= min(p[0] for p in params) and max(p[0] for p in params) <= 1e-1


@pytest.mark.slow
def test_relaunching_a_complete_search_trains_nothing_and_plan_says_so(killed_and_resumed):
    cwd, study, _, _ = killed_and_resumed
    before = {name: (study / name / "summary.json").read_text() for name in finished(study)}
    plan = train([*SEARCH, "plan=true"], cwd)
    stdout, stderr = plan.communicate(timeout=120)
    assert plan.returncode == 0, stderr[-3000:]
    assert "4 complete" in stdout and "a launch runs 0 more trial(s)" in stdout
    assert {name: (study / name / "summary.json").read_text() for name in finished(study)} == before


@pytest.mark.slow
def test_the_analysis_reports_the_search(killed_and_resumed, tmp_path):
    from stackwise_bench.analysis import analyze_runs, write_report

    _, study, _, _ = killed_and_resumed
    objectives = {name: s["train"]["best_val_top1"] for name, s in finished(study).items()}  # read independently
    a = analyze_runs(study)
    (view,) = [v for v in a.views if hasattr(v, "importances")]
    assert view.best["value"] == max(objectives.values())
    assert objectives[Path(view.best["run_dir"]).name] == max(objectives.values())
    assert sorted(view.trials.loc[view.trials["state"] == "COMPLETE", "objective"]) == sorted(objectives.values())
    assert set(view.importances) == {"optimizer.lr", "optimizer.weight_decay"}
    assert sum(view.importances.values()) == pytest.approx(1.0)
    out = write_report(a, tmp_path / "analysis", plots=True)
    report = (out / "report.md").read_text()
    assert "## Hyperparameter search (search: maximize train.best_val_top1)" in report
    assert f"best: trial {view.best['trial']}, train.best_val_top1 = {max(objectives.values()):.2f}" in report
    assert "parameter importances (Optuna's fANOVA" in report
    assert (out / "plots" / "search_objective.png").stat().st_size > 0
    assert len((out / "search_trials.csv").read_text().splitlines()) == 1 + len(view.trials)


# ---------------------------------------------------------------------------------------------- in-process


def test_search_space_follows_hydras_optuna_grammar():
    space, fixed = search_config.search_space(
        [
            "optimizer.lr=tag(log, interval(1e-4, 1e-1))",
            "optimizer.weight_decay=interval(0.0, 0.2)",
            "trainer.batch_size=range(32, 129, 32)",
            "optimizer=sgd,adamw",
            "seed=1",
            "seed=2",  # the command line's value wins over the preset's
            "trainer.max_epochs=interval(1, 5)",
            "trainer.max_epochs=3",  # fixed on the command line: not searched
        ]
    )
    assert space["optimizer.lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    assert space["optimizer.weight_decay"] == optuna.distributions.FloatDistribution(0.0, 0.2)
    assert space["trainer.batch_size"] == optuna.distributions.IntDistribution(32, 128, step=32)
    assert space["optimizer"] == optuna.distributions.CategoricalDistribution(["sgd", "adamw"])
    assert fixed == {"seed": "seed=2", "trainer.max_epochs": "trainer.max_epochs=3"}
    with pytest.raises(ConfigError, match="the search has nothing to search"):
        search_config.search_space(["seed=1"])


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("objective", "test.top1", r"would select on the test set; search on a validation metric"),
        ("n_trials", 0, r"hydra\.sweeper\.n_trials=0 must be a positive integer"),
        ("direction", "up", r"hydra\.sweeper\.direction=up must be maximize or minimize"),
        ("max_failure_rate", 2, r"max_failure_rate=2 must be a number in \[0, 1\]"),
    ],
)
def test_bad_search_settings_are_refused(key, value, message):
    settings = {"direction": "maximize", "objective": search_config.OBJECTIVE, "n_trials": 4, "max_failure_rate": 1.0}
    search_config.check_search(settings)
    with pytest.raises(ConfigError, match=message):
        search_config.check_search({**settings, key: value})


def test_a_trial_left_running_by_a_dead_launcher_is_asked_again_with_its_params():
    s = optuna.create_study(direction="maximize")
    space = {"optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    dead = psutil.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    done, lost = s.ask(space), s.ask(space)
    for t, job in ((done, "a"), (lost, "b")):
        t.set_user_attr("job", job)
        t.set_user_attr("launcher", {"host": socket.gethostname(), "pid": dead.pid})
    s.tell(done, 50.0)
    search_store.end_stale_trials(s)
    search_store.resume_unfinished(s)
    search_store.resume_unfinished(s)  # once: the waiting trial is pending
    again = s.ask(space)
    assert again.params == lost.params and again.user_attrs["job"] == "b"
    assert [t.state.name for t in s.trials] == ["COMPLETE", "FAIL", "RUNNING"]


@pytest.mark.slow
def test_importances_need_three_complete_trials(tmp_path):
    from stackwise_bench.analysis.studies.search import search_views

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = optuna.create_study(storage=storage, study_name="search", direction="maximize")
    s.set_user_attr("objective", search_config.OBJECTIVE)
    for value in (40.0, 60.0):
        t = s.ask({"optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
        t.set_user_attr("job", f"optimizer.lr={t.params['optimizer.lr']!r}")
        s.tell(t, value)
    import pandas as pd

    (view,) = search_views(tmp_path, pd.DataFrame({"run_dir": [], "test.top1": []}))
    assert view.best["value"] == 60.0 and view.importances == {}
    assert any("need at least 3 complete trials (2 so far)" in h for h in view.highlights)
    assert json.loads(view.trials.to_json())["best so far"] == {"0": 40.0, "1": 60.0}


@pytest.mark.slow
def test_a_search_database_that_is_not_one_is_refused_in_one_sentence(tmp_path):
    """A garbage optuna.db was an 85-line SQLAlchemy traceback on launch; now one sentence naming the file."""
    study = tmp_path / "multirun" / "broken"
    study.mkdir(parents=True)
    (study / "optuna.db").write_bytes(b"not a database, not even close")
    proc = train([*SEARCH, "study=broken"], tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert err.strip() == (
        f"error: {(study / 'optuna.db').resolve()} is not a readable SQLite database (file is not a database); it "
        "holds the search's trials: restore it from a copy, or move it away to start over."
    ), err[-3000:]
    assert sorted(p.name for p in study.iterdir()) == ["optuna.db"]  # nothing launched


def test_truncated_search_database_is_refused_and_a_good_one_opens(tmp_path):
    from stackwise_bench.runs.stores import check_sqlite

    path = tmp_path / "optuna.db"
    s = optuna.create_study(storage=f"sqlite:///{path}", study_name="search", direction="maximize")
    s.tell(s.ask(), 1.0)
    check_sqlite(path, "restore it")  # a real store passes
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=rf"^{path} is not a readable SQLite database \(database disk image is"):
        check_sqlite(path, "restore it")
