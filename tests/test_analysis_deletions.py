"""Runs launched with deletion overrides (``~key``) next to ordinary runs: one column per key, value ``deleted``."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from stackwise_bench.analysis import analyze_runs, collect_runs, default_group_by, write_report
from stackwise_bench.analysis.pipeline import StudyAnalysis
from stackwise_bench.analysis.read.run_row import DELETED

from analysis_helpers import finished_run

SWEEP = ["dataset=synthetic", "trainer.max_epochs=1", "study=dup"]


def _study(tmp_path, deletion: str):
    """Seeds 1-2 swept with ``deletion`` (recorded as a sweep job records it) and one ordinary run, seed 3."""
    study = tmp_path / "multirun" / "dup"
    for seed in (1, 2):
        finished_run(study, f"seed={seed},{deletion}", seed=seed, top1=80.0 + seed, overrides=[deletion, *SWEEP])
    finished_run(study, "seed=3", seed=3, top1=84.0, overrides=SWEEP)
    return study


def _by_seed(study) -> pd.DataFrame:
    df = collect_runs(study)
    assert df.columns.is_unique, df.columns[df.columns.duplicated()].tolist()
    return df.set_index("seed")


@pytest.mark.slow
def test_deleted_key_is_a_column_and_monitors_do_not_split_cells(tmp_path):
    study = _study(tmp_path, "~monitors.hardware=null")
    run = study / "seed=1,~monitors.hardware=null"
    assert json.loads((run / "summary.json").read_text())["config"]["monitors"] == {}  # as the real run records it
    df = _by_seed(study)
    assert df.loc[1, "monitors.hardware"] == df.loc[2, "monitors.hardware"] == DELETED
    kept = json.loads(df.loc[3, "monitors.hardware"])  # the ordinary run: its monitor's config, not null
    assert kept["interval_s"] == 1.0
    assert set(df["monitors"]) == {"default"}
    assert not any(k.startswith("monitors") for k in default_group_by(collect_runs(study)))
    a = analyze_runs(study)
    assert a.group_by == [] and a.summary[a.summary["metric"] == "test.top1"].iloc[0]["n"] == 3
    by_deletion = analyze_runs(study, group_by=["monitors.hardware"])  # a treatment when asked for
    top1 = by_deletion.summary[by_deletion.summary["metric"] == "test.top1"].set_index("group")
    assert top1.loc["monitors.hardware=deleted", "n"] == 2


def test_deleted_config_group_is_one_column(tmp_path):
    """``~monitors`` drops the group's choice: the run's ``monitors`` is ``deleted``, in the same column."""
    study = _study(tmp_path, "~monitors=null")
    df = _by_seed(study)
    assert (df.loc[1, "monitors"], df.loc[3, "monitors"]) == (DELETED, "default")
    assert list(collect_runs(study).attrs["override_keys"]).count("monitors") == 1
    assert "monitors" not in default_group_by(collect_runs(study))
    a = analyze_runs(study)
    assert isinstance(a, StudyAnalysis) and a.group_by == []
    write_report(a, tmp_path / "report", plots=False)


@pytest.mark.slow
def test_deleting_a_training_key_is_a_treatment(tmp_path):
    """A deletion that changes what is trained groups like any other override, baseline included."""
    study = _study(tmp_path, "~scheduler.warmup_epochs")
    df = _by_seed(study)
    assert (df.loc[1, "scheduler.warmup_epochs"], df.loc[3, "scheduler.warmup_epochs"]) == (DELETED, 1)
    assert default_group_by(collect_runs(study)) == ["scheduler.warmup_epochs"]
    a = analyze_runs(study, baseline="scheduler.warmup_epochs=1")
    groups = set(a.summary["group"])
    assert groups == {"scheduler.warmup_epochs=1", "scheduler.warmup_epochs=deleted"}
    assert a.comparisons["group"].tolist() == ["scheduler.warmup_epochs=deleted"]
