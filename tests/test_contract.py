"""The run-record contract: one list of volatile keys everyone agrees with, one read_summary, schema versions."""

from __future__ import annotations

import json

import pytest

from stackwise_bench.errors import ConfigError
from stackwise_bench.runs.contract import (
    FOLDER_ONLY_KEYS,
    SCHEMA_VERSION,
    VOLATILE_KEYS,
    NewerRecord,
    UnreadableSummary,
    is_volatile,
    read_summary,
)
from stackwise_bench.runs.provenance import config_diff, fingerprint

from analysis_helpers import finished_run
from conftest import CONF


@pytest.mark.parametrize("app", ["config", "evaluate_study"])
def test_hydra_folder_names_leave_out_exactly_the_contracts_keys(app):
    """As Hydra composes it for each app (its own job defaults merge late: the composed value is what counts)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra = compose(config_name=app, return_hydra_config=True).hydra
    assert sorted(hydra.job.config.override_dirname.exclude_keys) == sorted((*VOLATILE_KEYS, *FOLDER_ONLY_KEYS))
    assert hydra.job.chdir is False


def test_fingerprint_ignores_volatile_keys_and_code_paths_only():
    config = {
        "seed": 1,
        "optimizer": {"_target_": "a.b", "lr": 0.1},
        "monitors": {"hardware": {"interval_s": 1}},
        "trainer": {"resume": False, "max_epochs": 3},
        "study": "x",
    }
    same = json.loads(json.dumps(config))
    same["monitors"] = {}
    same["trainer"]["resume"] = True
    same["study"] = "y"
    same["optimizer"]["_target_"] = "moved.module.b"
    assert fingerprint(same) == fingerprint(config) and config_diff(config, same) == ""
    other = json.loads(json.dumps(config))
    other["optimizer"]["lr"] = 0.2
    assert fingerprint(other) != fingerprint(config)
    assert config_diff(config, other) == "optimizer.lr: 0.1 -> 0.2"
    assert is_volatile("monitors.hardware.interval_s") and not is_volatile("monitorsx")


def test_read_summary_one_behaviour(tmp_path):
    assert read_summary(tmp_path) is None  # nothing recorded here
    (tmp_path / "summary.json").write_text('{"status": "compl')
    with pytest.raises(UnreadableSummary, match=r"summary\.json is not valid JSON .*move the folder aside\.$"):
        read_summary(tmp_path)
    (tmp_path / "summary.json").write_text("[1, 2]")
    with pytest.raises(UnreadableSummary, match="holds a JSON list"):
        read_summary(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "status": "completed"}))
    assert read_summary(tmp_path)["status"] == "completed"


def test_analysis_refuses_a_newer_record_in_one_sentence(tmp_path):
    from stackwise_bench.analysis import collect_runs

    run = finished_run(tmp_path, "a", seed=1, top1=90.0)
    summary = read_summary(run)
    assert summary["schema_version"] == SCHEMA_VERSION  # the writer stamps it
    summary["schema_version"] = SCHEMA_VERSION + 1
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(NewerRecord) as err:
        collect_runs(tmp_path)
    message = str(err.value)
    assert isinstance(err.value, ConfigError) and "\n" not in message
    assert f"schema_version {SCHEMA_VERSION + 1}, newer than the {SCHEMA_VERSION}" in message
    assert message.endswith("upgrade stackwise_bench (pip install -U stackwise_bench) to read it.")


def test_analysis_does_not_split_cells_by_volatile_keys(tmp_path):
    """A seed added later with monitors=none belongs to the same cell as the others (it trains the same thing)."""
    from stackwise_bench.analysis import analyze_runs

    for seed, top1 in ((1, 90.0), (2, 91.0)):
        finished_run(tmp_path, f"lr=0.1,seed={seed}", seed=seed, top1=top1, overrides=["optimizer.lr=0.1"])
        finished_run(tmp_path, f"lr=0.2,seed={seed}", seed=seed, top1=top1 + 2, overrides=["optimizer.lr=0.2"])
    finished_run(
        tmp_path, "lr=0.1,seed=3,monitors=none", seed=3, top1=92.0, overrides=["optimizer.lr=0.1", "monitors=none"]
    )
    a = analyze_runs(tmp_path, metric="test.top1")
    assert a.group_by == ["optimizer.lr"]
    top1 = a.summary[a.summary["metric"] == "test.top1"].set_index("optimizer.lr")
    assert top1.loc[0.1, "n"] == 3 and top1.loc[0.2, "n"] == 2


def test_the_writer_records_only_the_contracts_statuses(tmp_path):
    from stackwise_bench.runs.contract import STATUSES
    from stackwise_bench.runs.record import RunRecord

    record = RunRecord(tmp_path)
    record.start(run={"seed": 1})
    with pytest.raises(ValueError, match="'done' is not one of"):
        record.finish("done")
    assert read_summary(tmp_path)["status"] == "running" and "running" in STATUSES
    record.finish("completed")
    assert read_summary(tmp_path)["status"] == "completed"


def test_a_key_added_at_its_neutral_value_keeps_old_fingerprints_and_records_equal():
    """trainer.accumulate=1 trains as the code before the key did: the same fingerprint as a config without it (a
    sweep launched then is not "changed", a run recorded then resumes); another value is another run."""
    before = {"trainer": {"batch_size": 64, "max_epochs": 2}, "seed": 1}
    now = {"trainer": {"batch_size": 64, "max_epochs": 2, "accumulate": 1}, "seed": 1}
    split = {"trainer": {"batch_size": 64, "max_epochs": 2, "accumulate": 2}, "seed": 1}
    assert fingerprint(now) == fingerprint(before) != fingerprint(split)
    assert config_diff(before, now) == "" and config_diff(before, split) == "trainer.accumulate: 1 -> 2"
    plays = {"dataset": {"corpus": "shakespeare", "plays": "all"}, "model": {"n_layer": 4, "nanogpt": False}}
    assert fingerprint(plays) == fingerprint({"dataset": {"corpus": "shakespeare"}, "model": {"n_layer": 4}})
