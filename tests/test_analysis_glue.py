"""The GLUE average of a study over GLUE tasks: per cell (less the task) and seed the mean of the tasks' test.score,
then mean ± std and the 95% t-interval over seeds, equal to numpy/scipy by hand; a seed that lacks a task is flagged,
never averaged. Synthetic run folders: 2 tasks x 3 seeds x 2 learning rates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from stackwise_bench.analysis import analyze_runs
from stackwise_bench.analysis.report.write import write_report
from stackwise_bench.runs.contract import GLUE

from analysis_helpers import write_run

SEEDS = (1, 2, 3)
LRS = ("0.001", "0.003")
HEADLINE = {"cola": "mcc", "mrpc": "f1"}


def scores_of(task: str, lr: str, seed: int) -> dict:
    """A run's test section: CoLA's score is its mcc, MRPC's the mean of f1 and acc (training/glue_metrics.py)."""
    base = 10.0 * LRS.index(lr) + 1.7 * seed**2
    if task == "cola":
        return {"mcc": 20.0 + base, "score": 20.0 + base, "loss": 0.6}
    f1, acc = 70.0 + base, 60.0 + 0.5 * base + seed
    return {"f1": f1, "acc": acc, "score": (f1 + acc) / 2, "loss": 0.5}


def write_study(root, skip=()):
    for lr in LRS:
        for task in HEADLINE:
            for seed in SEEDS:
                if (lr, task, seed) in skip:
                    continue
                write_run(
                    root,
                    f"lr={lr},task={task}/seed={seed}",
                    seed=seed,
                    overrides=[f"optimizer.lr={lr}", f"dataset.task={task}"],
                    task={**GLUE, "metric": HEADLINE[task], "glue_task": task},
                    test=scores_of(task, lr, seed),
                )
    return root


def test_glue_average_equals_a_hand_computation(tmp_path):
    a = analyze_runs(write_study(tmp_path / "study"), metric="test.score")
    table = a.glue.set_index("optimizer.lr")
    assert len(table) == 2 and "dataset.task" not in a.glue
    for lr in LRS:
        per_seed = np.array([np.mean([scores_of(t, lr, s)["score"] for t in HEADLINE]) for s in SEEDS])
        mean, std = per_seed.mean(), per_seed.std(ddof=1)
        half = stats.t.ppf(0.975, len(SEEDS) - 1) * std / np.sqrt(len(SEEDS))
        row = table.loc[float(lr)]
        assert row["tasks"] == "cola mrpc" and row["seeds"] == "1 2 3" and row["n"] == 3 and row["missing"] == ""
        assert row["mean"] == pytest.approx(mean, abs=1e-9) and row["std"] == pytest.approx(std, abs=1e-9)
        assert row["ci95_low"] == pytest.approx(mean - half, abs=1e-9)
        assert row["ci95_high"] == pytest.approx(mean + half, abs=1e-9)
        assert row["min"] == pytest.approx(per_seed.min()) and row["max"] == pytest.approx(per_seed.max())
    out = write_report(a, tmp_path / "report", plots=False)
    numbers = ["optimizer.lr", "n", "mean", "std", "ci95_low", "ci95_high"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "glue.csv")[numbers], a.glue[numbers], check_dtype=False)
    report = (out / "report.md").read_text()
    assert "## GLUE average" in report and "cola mrpc" in report and "glue.csv" in report


def test_a_seed_without_a_task_is_flagged_not_averaged(tmp_path):
    a = analyze_runs(write_study(tmp_path / "study", skip={("0.003", "mrpc", 3)}), metric="test.score")
    table = a.glue.set_index("optimizer.lr")
    assert table.loc[0.001, "missing"] == "" and table.loc[0.001, "n"] == 3
    flagged = table.loc[0.003]
    assert flagged["missing"] == "seed=3 lacks mrpc" and flagged["n"] == 0 and np.isnan(flagged["mean"])
    report = (write_report(a, tmp_path / "report", plots=False) / "report.md").read_text()
    assert "not averaged" in report and "seed=3 lacks mrpc" in report


def test_a_single_task_study_has_no_glue_average(tmp_path):
    root = tmp_path / "study"
    for seed in SEEDS:
        write_run(
            root,
            f"seed={seed}",
            seed=seed,
            overrides=["dataset.task=cola"],
            task={**GLUE, "metric": "mcc", "glue_task": "cola"},
            test=scores_of("cola", LRS[0], seed),
        )
    a = analyze_runs(root, metric="test.score")
    assert a.glue.empty
    assert "## GLUE average" not in (write_report(a, tmp_path / "report", plots=False) / "report.md").read_text()
