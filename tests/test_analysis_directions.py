"""Which way a metric is better comes from the run record's ``task`` section, never from the name ``top1``.

The runs below are a toy regression task (written by hand, as a trainer for it would write them): its metric
``mse`` is lower-better. Arm B (``optimizer=adamw``, ``regime=depth_time``) has the lower error on every seed, so
every table, verdict, best cell, target and frontier must call B the better one.
"""

from __future__ import annotations

import numpy as np
import pytest

from stackwise_bench.analysis import analyze_runs, collect_runs, peft_study, seed_stats, write_report
from stackwise_bench.analysis.read.directions import MAX, MIN, direction_of
from stackwise_bench.errors import ConfigError

from analysis_helpers import write_run

TASK = {"name": "regression", "unit": "sample", "metric": "mse", "directions": {"loss": "min", "mse": "min"}}
SEEDS = (1, 2, 3)
MSE = {"A": [0.50, 0.55, 0.52], "B": [0.20, 0.22, 0.25]}  # test.mse per seed: B is better (lower)
VAL = {"A": [0.90, 0.70, 0.56], "B": [0.80, 0.30, 0.15]}  # val_mse per epoch, each run's curve
FLOPS = [1e12, 2e12, 3e12]


def regression_run(root, job: str, seed: int, arm: str, overrides: list[str], task=TASK, mse=None, **kw):
    """A finished run of the toy regression task: test.mse (``mse``, else the arm's), val_mse rows,
    train.best_val_mse, FLOPs per epoch."""
    val = [v + 0.01 * seed for v in VAL[arm]]
    epochs = [
        {
            "epoch": i + 1,
            "step": 10 * (i + 1),
            "lr": 1e-3,
            "train_loss": 0.9 * v,
            "train_mse": 0.9 * v,
            "val_loss": v,
            "val_mse": v,
            "epoch_time_s": 1.0,
            "train_sample_s": 500.0,
            "flops": FLOPS[i],
        }
        for i, v in enumerate(val)
    ]
    train = {
        "best_val_mse": min(val),
        "best_epoch": int(np.argmin(val)) + 1,
        "final_val_mse": val[-1],
        "final_train_mse": 0.9 * val[-1],
        "final_val_loss": val[-1],
        "final_train_loss": 0.9 * val[-1],
        "epochs_run": len(val),
        "time_s": 3.0,
        "flops": FLOPS[-1],
    }
    mse = MSE[arm][SEEDS.index(seed)] if mse is None else mse
    test = {"mse": mse, "loss": mse}
    return write_run(root, job, seed=seed, overrides=overrides, task=task, test=test, train=train, epochs=epochs, **kw)


def two_arms(root, key: str, values: dict[str, str]):
    """Arms A and B (``key=values[arm]``) x 3 seeds."""
    for arm, value in values.items():
        for seed in SEEDS:
            regression_run(root, f"{arm}{seed}", seed, arm, [f"{key}={value}"])
    return root


def test_the_directions_come_from_the_record_and_old_records_are_image_classification(tmp_path):
    regression_run(tmp_path, "new", 1, "A", [])
    write_run(tmp_path, "old", seed=1, test={"top1": 90.0})  # a record from before tasks were recorded
    new, old = (collect_runs(tmp_path / name) for name in ("new", "old"))
    assert direction_of(new, "test.mse") == MIN and direction_of(new, "train.best_val_mse") == MIN
    assert direction_of(new, "val_loss") == MIN and direction_of(new, "train.time_s") == MIN
    assert direction_of(old, "test.top1") == MAX and direction_of(old, "train.best_val_top1") == MAX
    assert direction_of(old, "test.loss") == MIN


@pytest.mark.slow
def test_the_lower_error_arm_is_the_better_one_everywhere(tmp_path):
    study = two_arms(tmp_path / "multirun" / "opt", "optimizer", {"A": "sgd", "B": "adamw"})
    a = analyze_runs(study, n_boot=200)
    assert a.metric == "test.mse"  # the task's metric, not test.top1
    assert a.baseline == {"optimizer": "sgd"}

    row = a.comparisons.set_index("group").loc["optimizer=adamw"]
    assert row["diff"] == pytest.approx(np.mean(MSE["B"]) - np.mean(MSE["A"]))
    assert row["better"] == True  # noqa: E712  (a lower error is better)
    assert bool(row["significant"])
    assert row["p_improve"] == pytest.approx(1.0)  # every B run beats every A run: its error is lower

    [view] = [v for v in a.views if v.title.startswith("Optimizer study")]
    assert "optimizer=adamw vs optimizer=sgd" in view.highlights[0]
    assert "test.mse (lower is better): better than optimizer=sgd (p = " in view.highlights[0]
    assert row["verdict"] == "better"

    dyn = a.dynamics.set_index("seed")
    best = a.dynamics.groupby("optimizer")["best_val_mse"].mean()
    assert best["adamw"] < best["sgd"]  # the best epoch is the lowest error, not the highest
    assert dyn["best_epoch"].tolist() == [3] * 6

    out = write_report(a, tmp_path / "report", plots=False)
    report = (out / "report.md").read_text()
    assert "- headline metric: test.mse (lower is better)" in report
    assert f"Lowest mean test.mse: optimizer=adamw ({np.mean(MSE['B']):.2f}; lower is better): better than " in report


@pytest.mark.slow
def test_flops_to_target_and_the_equal_compute_verdict_read_lower_as_better(tmp_path):
    study = two_arms(tmp_path / "multirun" / "dt", "regime", {"A": "classical_matched", "B": "depth_time"})
    r = analyze_runs(study, n_boot=200).regimes
    # No classical arm: the target is the best arm's (B, the lower error) within 1%: reached at <= target.
    target = 1.01 * np.mean(MSE["B"])
    assert r.targets == {"all runs": pytest.approx(target)}
    per_arm = r.table.set_index("regime")
    assert per_arm.loc["depth_time", "n_reached"] == 3 and per_arm.loc["classical_matched", "n_reached"] == 0
    assert per_arm.loc["depth_time", "flops_to_target_mean"] == FLOPS[2]
    [sentence] = r.sentences
    assert ": it beat classical at equal FLOPs (p = " in sentence and sentence.endswith(", paired t)."), sentence


def test_the_peft_frontier_keeps_the_lower_error_for_fewer_parameters(tmp_path):
    # rank -> (trainable, test.mse): rank 8 costs more than rank 4 and is worse: dominated.
    cells = {0: (10_000, 0.10), 4: (1_000, 0.30), 8: (2_000, 0.50)}
    for rank, (trainable, mse) in cells.items():
        for seed in SEEDS:
            params = {"trainable": trainable}
            regression_run(tmp_path, f"r{rank}s{seed}", seed, "A", [f"lora.rank={rank}"], mse=mse, params=params)
    runs = collect_runs(tmp_path)
    view = peft_study(seed_stats(runs, "test.mse", ["lora.rank"]), runs, "test.mse", ["lora.rank"])
    frontier = dict(zip(view.table["lora.rank"], view.table["on_frontier"]))
    assert frontier == {0: True, 4: True, 8: False}


def test_runs_that_disagree_on_a_metric_s_direction_are_refused_in_one_sentence(tmp_path):
    for name, direction in (("up", "max"), ("down", "min")):
        task = {"name": name, "unit": "sample", "metric": "mse", "directions": {"mse": direction}}
        for seed in SEEDS:
            regression_run(tmp_path, f"{name}{seed}", seed, "A", [f"optimizer={name}"], task=task)
    with pytest.raises(ConfigError) as err:
        analyze_runs(tmp_path)
    assert str(err.value) == (
        "metric=test.mse is higher is better in 3 run(s) (up) and lower is better in 3 run(s) (down): these runs "
        "disagree on what better means; analyse each task's runs apart (runs=...) or choose another metric=."
    )


def test_a_difference_its_test_did_not_find_is_no_verdict():
    """A sign is not a finding: better or worse only where the test is significant and the interval of the
    difference lies on that side of zero, in the metric's direction; else the smallest effect it could see."""
    from stackwise_bench.analysis.stats.verdicts import verdict

    row = {"diff": 0.28, "diff_ci95_low": -0.1, "diff_ci95_high": 0.66, "p_value": 0.07, "test": "Welch t"}
    row |= {"n": 3, "n_baseline": 3, "mde_points": 4.13, "metric": "test.top1", "baseline": "optimizer=sgd"}
    assert verdict(row, "max") == (
        "no difference from optimizer=sgd detected (p = 0.070, Welch t; with n = 3 seeds per cell the smallest "
        "effect this test would detect at 80% power is 4.1 points)"
    )
    sig = row | {"p_value": 0.01, "diff_ci95_low": 0.1}
    assert verdict(sig, "max") == "better than optimizer=sgd (p = 0.010, Welch t)"
    assert verdict(sig, "min") == "worse than optimizer=sgd (p = 0.010, Welch t)"
    # significant before Holm, not after: no verdict
    assert verdict(sig | {"p_holm": 0.09}, "max").startswith("no difference from optimizer=sgd detected (p = 0.010")
    mse = row | {"metric": "test.mse", "mde_points": 0.0123}
    assert verdict(mse, "min").endswith("is 0.012 (test.mse))")
