"""collect_runs / collect_epochs: the tidy tables every other analysis step reads."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from stackwise_bench.analysis import collect_epochs, collect_runs, default_group_by, find_run_dirs, finished
from stackwise_bench.errors import ConfigError

from analysis_helpers import curve, finished_run, write_run
from fixtures_analysis import PEFT_TOP1, lora_trainable

N_FINISHED = sum(len(v) for v in PEFT_TOP1.values())


@pytest.mark.slow
def test_one_row_per_run_with_override_columns_and_flat_metrics(peft_study):
    df = collect_runs(peft_study)
    assert len(df) == N_FINISHED + 2  # + the failed and the interrupted run
    assert df["run_dir"].is_unique
    for col in (
        "status",
        "model",
        "dataset",
        "precision",
        "optimizer",
        "lora.rank",
        "seed",
        "test.top1",
        "test.f1_macro",
        "params.trainable",
        "train.time_s",
        "train.best_val_top1",
        "resources.peak_rss_mb",
        "env.device",
        "run.fingerprint",
        "overrides",
    ):
        assert col in df.columns, col
    assert "config" not in df.columns and not any(c.startswith("config.") for c in df.columns)
    done = df[df["status"] == "completed"]
    got = {(int(r["lora.rank"]), int(r["seed"])): r["test.top1"] for _, r in done.iterrows()}
    assert got == {(rank, seed): float(v) for rank, d in PEFT_TOP1.items() for seed, v in d.items()}
    assert (done["params.trainable"] == done["lora.rank"].map(lora_trainable)).all()
    assert set(df["model"]) == {"deit_tiny"} and set(df["precision"]) == {"fp32"}
    assert pd.api.types.is_integer_dtype(df["lora.rank"])


def test_failed_and_interrupted_runs_are_listed_not_dropped(peft_study):
    df = collect_runs(peft_study)
    failed = df[df["status"] == "failed"].iloc[0]
    assert failed["error.type"] == "RuntimeError" and "NaN" in failed["error.message"]
    assert failed["lora.rank"] == 8 and failed["seed"] == 4
    interrupted = df[df["status"] == "interrupted"].iloc[0]
    assert interrupted["lora.rank"] == 16 and pd.isna(interrupted["test.top1"])
    assert len(finished(df)) == N_FINISHED and set(finished(df)["status"]) == {"completed"}


def test_runs_found_at_any_depth_and_non_run_folders_ignored(tmp_path):
    finished_run(tmp_path / "a" / "b" / "c", "0", seed=1, top1=50.0)
    finished_run(tmp_path / "a", "1", seed=2, top1=60.0)
    (tmp_path / "a" / "analysis").mkdir()
    (tmp_path / "a" / "analysis" / "runs.csv").write_text("x\n")
    nested = tmp_path / "a" / "1" / "checkpoints"  # nothing below a run dir is searched
    nested.mkdir()
    (nested / "summary.json").write_text("{}")
    assert [p.relative_to(tmp_path).as_posix() for p in find_run_dirs(tmp_path)] == ["a/1", "a/b/c/0"]
    df = collect_runs([tmp_path / "a", str(tmp_path / "a" / "b")])  # overlapping paths: no duplicates
    assert sorted(df["test.top1"]) == [50.0, 60.0]


def test_values_not_overridden_come_from_the_config(tmp_path):
    finished_run(tmp_path, "0", seed=1, top1=50.0, overrides=["lora.rank=8", "optimizer.lr=1e-3"])
    finished_run(tmp_path, "1", seed=1, top1=60.0)  # lora.rank from config: 0
    df = collect_runs(tmp_path).set_index("test.top1")
    assert df.loc[50.0, "lora.rank"] == 8 and df.loc[60.0, "lora.rank"] == 0
    assert df.loc[50.0, "optimizer.lr"] == pytest.approx(1e-3)
    assert df.loc[60.0, "trainer.max_epochs"] == 3


def test_choices_and_overrides_fall_back_to_hydra_files(tmp_path):
    run = finished_run(tmp_path, "0", seed=7, top1=50.0, overrides=["precision=fp16", "lora.rank=4"])
    summary = json.loads((run / "summary.json").read_text())
    del summary["run"]["choices"], summary["run"]["overrides"]
    (run / "summary.json").write_text(json.dumps(summary))
    row = collect_runs(run).iloc[0]
    assert row["precision"] == "fp16" and row["lora.rank"] == 4 and row["seed"] == 7
    assert "hydra/launcher" not in row.index


def test_unreadable_summary_is_listed(tmp_path):
    finished_run(tmp_path, "0", seed=1, top1=50.0)
    torn = tmp_path / "1"
    torn.mkdir()
    (torn / "summary.json").write_text('{"status": "compl')
    df = collect_runs(tmp_path)
    assert list(df["status"]) == ["completed", "unreadable"]


def test_long_epoch_table(tmp_path):
    rows = curve(3)
    finished_run(tmp_path, "0", seed=1, top1=50.0, overrides=["lora.rank=2"], epochs=rows)
    run = finished_run(tmp_path, "1", seed=2, top1=51.0, overrides=["lora.rank=4"], epochs=rows)
    with open(run / "metrics.jsonl", "a") as f:  # a re-logged epoch and a torn last line
        f.write(json.dumps({**rows[2], "val_top1": 99.0}) + "\n" + '{"epoch": 4, "val_')
    epochs = collect_epochs(collect_runs(tmp_path))
    assert len(epochs) == 6
    assert list(epochs.columns[:3]) == ["run_dir", "status", "model"] and "lora.rank" in epochs
    last = epochs[(epochs["lora.rank"] == 4) & (epochs["epoch"] == 3)]
    assert last["val_top1"].tolist() == [99.0]
    assert epochs.groupby("run_dir")["epoch"].apply(list).tolist() == [[1, 2, 3], [1, 2, 3]]


def test_default_group_by_skips_seed_and_redundant_experiment(tmp_path):
    for name, prec in (("BaseFP32", "fp32"), ("BaseFP16", "fp16")):
        for seed in (1, 2):
            finished_run(
                tmp_path / name, str(seed), seed=seed, top1=50.0, choices={"experiment": name, "precision": prec}
            )
    df = collect_runs(tmp_path)
    assert default_group_by(df) == ["precision"]
    assert "seed" not in default_group_by(df)


def test_config_values_that_follow_a_choice_do_not_split_cells(tmp_path):
    for seed in (1, 2):  # optimizer=sgd brings lr 0.1, adamw 2e-3: not a second grouping key
        finished_run(
            tmp_path, f"s{seed}", seed=seed, top1=50.0, overrides=["optimizer=sgd"], config_values={"optimizer.lr": 0.1}
        )
        finished_run(
            tmp_path,
            f"a{seed}",
            seed=seed,
            top1=50.0,
            overrides=["optimizer=adamw"],
            config_values={"optimizer.lr": 2e-3},
        )
    df = collect_runs(tmp_path)
    assert sorted(df["optimizer.lr"].unique()) == [2e-3, 0.1]
    assert default_group_by(df) == ["optimizer"]
    finished_run(tmp_path, "x", seed=1, top1=50.0, overrides=["optimizer=adamw", "optimizer.lr=0.01"])
    assert default_group_by(collect_runs(tmp_path)) == ["optimizer", "optimizer.lr"]  # overridden: a treatment


def test_bad_paths_say_so(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        collect_runs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no run folders"):
        collect_runs(tmp_path / "empty")


def test_running_run_without_sections(tmp_path):
    write_run(tmp_path, "0", seed=1, status="running")
    df = collect_runs(tmp_path)
    assert df["status"].tolist() == ["running"]
    assert collect_epochs(df).empty
