"""What a launch says and where it writes: job folders named by what varies, the closing table, job-named log lines,
short search folders, and evaluate's wording. The real sweeps that show it end to end are in tests/test_sweep.py."""

from __future__ import annotations

import json
import logging

import pytest
from omegaconf import OmegaConf

from stackwise_bench.runs import naming
from stackwise_bench.runs.folders import find_evaluation, shown_path
from stackwise_bench.runs.job import folder_name, headline, log_prefix
from stackwise_bench.runs.launch import LauncherLines
from stackwise_bench.runs.study_report import analyze_command, results_table, shown_status
from stackwise_bench.values import short_number

EXCLUDE = ["study", "trainer.progress", "hydra.launcher.n_jobs"]
SHARED = ["dataset=digits", "model=vit_micro_p4", "regime.stacks=[1,2,4]", "trainer.max_epochs=1", "study=quick"]


def grid(*varying: list[str]) -> list[list[str]]:
    """A sweep's jobs: the shared overrides plus one line of each varying list (their product)."""
    import itertools

    return [[*SHARED, *combo] for combo in itertools.product(*varying)]


def name_grid(tmp_path, jobs: list[list[str]]) -> dict[str, str]:
    """``{identity: folder}`` as a launch names (and records) them."""
    parsed = naming.parse_jobs(jobs, EXCLUDE)
    with naming.names_lock(tmp_path) as names:
        return naming.assign(names, tmp_path, naming.grid_candidates(names, parsed))


def test_job_folders_are_named_by_the_keys_that_vary_and_stay_put(tmp_path):
    jobs = grid(["model.depth=4", "model.depth=8"], ["seed=1", "seed=2"])
    folders = name_grid(tmp_path, jobs)
    assert sorted(folders.values()) == [
        "model.depth=4,seed=1",
        "model.depth=4,seed=2",
        "model.depth=8,seed=1",
        "model.depth=8,seed=2",
    ]
    assert all("dataset=digits,model.depth=4" in identity for identity in folders if "depth=4" in identity)
    parsed = naming.parse_jobs(jobs, EXCLUDE)
    assert naming.shared_overrides(parsed.values()) == {
        "dataset": "dataset=digits",
        "model": "model=vit_micro_p4",
        "regime.stacks": "regime.stacks=[1,2,4]",
        "trainer.max_epochs": "trainer.max_epochs=1",
    }
    # a relaunch with a wider grid: the same folders for the same jobs, the new ones named alike
    wider = name_grid(tmp_path, grid(["model.depth=4", "model.depth=8"], ["seed=1", "seed=2", "seed=3"]))
    assert {i: f for i, f in wider.items() if i in folders} == folders
    assert sorted(set(wider.values()) - set(folders.values())) == ["model.depth=4,seed=3", "model.depth=8,seed=3"]
    record = json.loads(naming.names_path(tmp_path).read_text())
    assert record["scheme"] == "varying" and record["keys"] == ["model.depth", "seed"]


def test_a_later_launch_keeps_the_naming_keys_of_the_earlier_ones(tmp_path):
    name_grid(tmp_path, grid(["model.depth=4", "model.depth=8"], ["seed=1", "seed=2"]))
    later = name_grid(tmp_path, grid(["model.depth=4"], ["seed=4", "seed=5"]))
    assert sorted(later.values()) == ["model.depth=4,seed=4", "model.depth=4,seed=5"]


def test_a_single_job_sweep_gets_a_stable_name_and_a_second_one_another(tmp_path):
    (first,) = name_grid(tmp_path, grid(["seed=1"])).values()
    assert first == naming.SINGLE
    assert list(name_grid(tmp_path, grid(["seed=1"])).values()) == [first]  # relaunched: the same folder
    (other,) = name_grid(tmp_path, grid(["seed=2"])).values()
    assert other not in ("", first)  # another config, nothing varying in its launch either: a name of its own


def test_a_relaunch_with_a_long_shared_path_gets_short_folder_names(tmp_path):
    """A shared override that changed between launches (a long model.checkpoint_path): the new jobs' varying-key
    names are taken and their identities are too long for a folder (ENAMETOOLONG), so they get name-hash folders."""
    first = name_grid(tmp_path, grid(["seed=1", "seed=2"]))
    long = f"model.checkpoint_path={'/deep' * 60}/export"
    later = name_grid(tmp_path, [[*job, long] for job in grid(["seed=1", "seed=2"])])
    assert set(first.values()) == {"seed=1", "seed=2"} and len(set(later.values()) | set(first.values())) == 4
    for name in later.values():
        assert name.startswith("seed=") and len(name.encode()) <= naming.MAX_NAME and "/" not in name
        (tmp_path / name).mkdir()  # the file system takes it
    wide = name_grid(tmp_path, grid([f"+prompt='{c * 150}'" for c in "日月"]))
    for name in wide.values():  # a multi-byte override: cut by bytes, and a third launch gets folders of its own
        assert len(name.encode()) <= naming.MAX_NAME and name not in set(first.values()) | set(later.values())
        (tmp_path / name).mkdir()


def test_a_study_launched_before_names_were_recorded_keeps_its_full_names(tmp_path):
    jobs = grid(["seed=1", "seed=2"])
    identities = list(naming.parse_jobs(jobs, EXCLUDE))
    (tmp_path / identities[0]).mkdir()  # an old-style job folder, no .study/folders.json
    folders = name_grid(tmp_path, grid(["seed=1", "seed=2", "seed=3"]))
    assert all(folder == identity for identity, folder in folders.items())
    assert json.loads(naming.names_path(tmp_path).read_text())["scheme"] == "full"
    assert naming.job_folder(tmp_path, identities[0]) == identities[0]
    long = name_grid(tmp_path, grid([f"+prompt='{'x' * 300}'"]))  # too long for a folder: recorded short
    ((identity, folder),) = long.items()
    assert folder != identity and len(folder.encode()) <= naming.MAX_NAME
    assert naming.job_folder(tmp_path, identity) == folder  # the job resolves it from the record


def test_each_job_resolves_its_recorded_folder_and_an_unrecorded_one_keeps_its_full_name(tmp_path):
    folders = name_grid(tmp_path, grid(["seed=1", "seed=2"]))
    for identity, folder in folders.items():
        assert naming.job_folder(tmp_path, identity) == folder
    assert naming.job_folder(tmp_path, "seed=9,x=1") == "seed=9,x=1"
    assert naming.job_folder(tmp_path / "nowhere", "seed=9") == "seed=9"
    # the resolver Hydra's hydra.sweep.subdir uses (conf/hydra/output/study.yaml)
    identity = next(iter(folders))
    cfg = OmegaConf.create({"dir": str(tmp_path), "id": identity, "sub": "${sb.job_folder:${dir},${id}}"})
    assert cfg.sub == folders[identity]


def test_search_folders_show_significant_digits_and_more_only_where_two_would_collide(tmp_path):
    def trial(lr, wd):
        identity = f"optimizer.lr={lr!r},optimizer.weight_decay={wd!r}"
        return identity, naming.search_candidates({"optimizer.lr": lr, "optimizer.weight_decay": wd}, str)

    a = trial(0.0018662266976517971, 0.1)
    b = trial(0.0018662999, 0.1)  # the same to 4 digits
    with naming.names_lock(tmp_path) as names:
        folders = naming.assign(names, tmp_path, dict([a, b]))
    assert folders[a[0]] == "optimizer.lr=0.001866,optimizer.weight_decay=0.1"
    assert folders[b[0]] == "optimizer.lr=0.0018663,optimizer.weight_decay=0.1"
    with naming.names_lock(tmp_path) as names:  # asked again (a resumed trial): its folder back
        assert naming.assign(names, tmp_path, dict([b, a])) == folders


def outcomes() -> dict:
    return {
        "model.depth=4,seed=1": {
            "status": "completed",
            "metric": {"name": "test.top1", "value": 62.123456},
            "wall_s": 75.2,
        },
        "model.depth=8,seed=1": {"status": "skipped", "metric": {"name": "test.top1", "value": 70.0}, "wall_s": 0.3},
        "model.depth=4,seed=2": {"status": "failed", "reason": "diverged: loss is nan at step 3", "wall_s": 4.0},
        "model.depth=8,seed=2": {"status": "failed", "reason": "no outcome recorded (the job died)"},
    }


def test_the_closing_table_lists_every_job_with_status_metric_and_time():
    table = results_table("multirun/quick", outcomes()).splitlines()
    assert table[0] == "study multirun/quick: 4 jobs"
    assert table[1].split() == ["job", "status", "test", "top1", "time"]
    rows = {line.split()[0]: line.split()[1:] for line in table[2:]}
    assert rows["model.depth=4,seed=1"] == ["completed", short_number(62.123456), "1m15s"]
    assert rows["model.depth=8,seed=1"] == ["skipped", "(already", "done)", "70", "-"]
    assert rows["model.depth=4,seed=2"] == ["diverged", "-", "4.0s"]
    assert rows["model.depth=8,seed=2"] == ["failed", "-", "-"]
    assert shown_status({"status": "early_stopped"}) == "early_stopped"


def test_the_analyze_command_names_the_study_or_the_runs_an_evaluation_study_evaluated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = OmegaConf.create({"hydra": {"sweep": {"dir": "multirun/quick"}}})
    assert analyze_command(train) == "python -m stackwise_bench.analyze runs=multirun/quick"
    absolute = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "multirun" / "a b")}}})
    assert analyze_command(absolute) == "python -m stackwise_bench.analyze runs='multirun/a b'"
    evaluating = OmegaConf.create({"evaluate": {"runs": "multirun/AugmFP16"}, "hydra": {"sweep": {"dir": "x"}}})
    assert analyze_command(evaluating) == "python -m stackwise_bench.analyze runs=multirun/AugmFP16"


def test_a_jobs_headline_is_its_tasks_test_metric():
    assert headline({"test": {"top1": 91.5}}) == {"name": "test.top1", "value": 91.5}
    assert headline({"task": {"metric": "loss"}, "test": {"top1": 1, "loss": 2.5}}) == {
        "name": "test.loss",
        "value": 2.5,
    }
    assert headline({"status": "failed"}) is None


def test_folder_name_is_the_jobs_folder_below_its_study(tmp_path):
    assert folder_name(tmp_path / "s" / "seed=1", tmp_path / "s") == "seed=1"
    assert folder_name(tmp_path / "s", tmp_path / "s") == ""


def test_job_log_lines_carry_the_jobs_name_only_while_it_runs(capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s - %(message)s"))
    root.addHandler(handler)
    logger = logging.getLogger("stackwise_bench.test_prefix")
    logger.setLevel(logging.INFO)
    try:
        prefix = log_prefix("seed=1")
        logger.info("epoch 1/1")
        prefix.close()
        second = log_prefix("seed=2")  # the next job joblib runs in the same worker
        logger.info("epoch 1/1")
        second.close()
        logger.info("after")
    finally:
        root.removeHandler(handler)
    lines = capsys.readouterr().err.splitlines()
    assert lines[-3:] == ["[seed=1] INFO - epoch 1/1", "[seed=2] INFO - epoch 1/1", "INFO - after"]


def test_the_launchers_lines_name_each_job_by_its_folder_and_count_no_skipped_job():
    lines = LauncherLines()
    lines.labels["seed=1 dataset=digits"] = "seed=1 (already done: skipped)"

    def shown(msg):
        record = logging.LogRecord("x", logging.INFO, "", 0, msg, (), None)
        return record.getMessage() if lines.filter(record) else None

    assert (
        shown("Joblib.Parallel(n_jobs=2,backend=loky) is launching 2 jobs") == "Joblib.Parallel(n_jobs=2,backend=loky)"
    )
    assert shown("Launching jobs, sweep output dir : multirun/x") is None
    assert shown("\t#0 : seed=1 dataset=digits") == "\t#0 : seed=1 (already done: skipped)"
    assert shown("\t#1 : seed=2 dataset=digits") == "\t#1 : seed=2 dataset=digits"


def test_evaluations_numbered_the_old_way_are_still_found(tmp_path):
    for name in ("best_fp8_e4m3-2", "best_fp8_e4m3_act"):
        (tmp_path / "eval" / name).mkdir(parents=True)
        summary = {"status": "completed", "run": {"fingerprint": name, "dir": name}}
        (tmp_path / "eval" / name / "summary.json").write_text(json.dumps(summary))
    assert find_evaluation(tmp_path, "best_fp8_e4m3", "best_fp8_e4m3-2")["run"]["dir"] == "best_fp8_e4m3-2"
    assert find_evaluation(tmp_path, "best_fp8_e4m3", "best_fp8_e4m3_act") is None  # another evaluation's name


def test_paths_are_shown_relative_to_the_current_folder_when_under_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shown_path(tmp_path / "multirun" / "x") == "multirun/x"
    assert shown_path("multirun/x") == "multirun/x"
    assert shown_path(tmp_path.parent) == str(tmp_path.parent)


def test_a_names_record_that_is_garbage_stops_the_launch_in_one_sentence(tmp_path):
    from stackwise_bench.errors import ConfigError

    naming.names_path(tmp_path).parent.mkdir(parents=True)
    naming.names_path(tmp_path).write_text('{"folders": {"a": ')
    with pytest.raises(ConfigError, match=r"folders\.json is not a readable record of the study's job folders \("):
        name_grid(tmp_path, grid(["seed=1"]))
    assert naming.names_path(tmp_path).read_text() == '{"folders": {"a": '  # never overwritten
    assert naming.job_folder(tmp_path, "seed=1") == "seed=1"


def test_a_job_outside_the_planned_folders_is_refused(tmp_path):
    """A job whose folder the launch did not plan (its name missing from folders.json) would train where no table
    looks, and again at every relaunch: it is refused in one sentence. A search's launch plans no folders."""
    import json

    from stackwise_bench.runs.job import check_launch_record
    from stackwise_bench.runs.study import LAUNCH_FILE

    launch = tmp_path / ".study" / "launches" / "t"
    launch.mkdir(parents=True)
    planned = {"seed=1": {"overrides": ["seed=1"], "identity": "seed=1", "fingerprint": "fp", "state": "pending"}}
    (launch / LAUNCH_FILE).write_text(json.dumps({"jobs": planned}))
    assert check_launch_record(launch, "seed=1", "fp") is None
    why = check_launch_record(launch, "model.depth=4,seed=1", "fp")
    assert why.startswith("job folder model.depth=4,seed=1 is not one this launch planned") and why.endswith(
        "relaunch the study."
    )
    (launch / LAUNCH_FILE).write_text(json.dumps({"jobs": {}}))
    assert check_launch_record(launch, "optimizer.lr=0.001866", "fp") is None


def test_a_lost_folders_record_is_rebuilt_from_the_launch_records(tmp_path):
    """Without .study/folders.json, a study named by its varying keys is not mistaken for an old-style one (which
    would retrain every job under its full name): its launch records say which folder each job had."""
    folders = name_grid(tmp_path, grid(["model.depth=4", "model.depth=8"], ["seed=1", "seed=2"]))
    launch = tmp_path / ".study" / "launches" / "t"
    launch.mkdir(parents=True)
    jobs = {folder: {"identity": identity, "fingerprint": "fp"} for identity, folder in folders.items()}
    (launch / "launch.json").write_text(json.dumps({"jobs": jobs}))
    for folder in folders.values():
        (tmp_path / folder).mkdir()
    naming.names_path(tmp_path).unlink()
    assert name_grid(tmp_path, grid(["model.depth=4", "model.depth=8"], ["seed=1", "seed=2"])) == folders
    assert json.loads(naming.names_path(tmp_path).read_text())["scheme"] == "varying"
