"""Issue 25: intervals within each metric's range, verdicts no stronger than their test, mixed tested
architectures flagged, the logger column's names, and the report's sentences with 0, 1 and many items."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.power import TTestIndPower

from stackwise_bench.analysis.pipeline import analyze_runs
from stackwise_bench.analysis.read.collect import collect_epochs, collect_runs
from stackwise_bench.analysis.read.directions import range_of
from stackwise_bench.analysis.read.dynamics import run_dynamics
from stackwise_bench.analysis.read.formatting import count
from stackwise_bench.analysis.report.headline import best_cell_sentence, headline_table
from stackwise_bench.analysis.report.write import write_report
from stackwise_bench.analysis.stats.compare import compare_cells
from stackwise_bench.analysis.stats.seeds import range_interval, seed_stats
from stackwise_bench.analysis.stats.verdicts import verdict
from stackwise_bench.analysis.studies.regimes import checkpoint_sentence

from analysis_helpers import finished_run

NEAR_100 = [99.1, 99.9, 95.8]  # the plain t-interval reaches past 100: [92.95, 103.58]
TIMES = [0.4, 3.9, 0.6]  # the plain t-interval starts below 0: [-2.91, 6.18]


def _t(x):
    x = np.asarray(x, float)
    return stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))


def _patch(run: Path, **sections) -> None:
    """Merge ``sections`` ({"params": {...}, "test": {...}}) into a run's summary.json."""
    path = run / "summary.json"
    summary = json.loads(path.read_text())
    for name, values in sections.items():
        summary.setdefault(name, {}).update(values)
    path.write_text(json.dumps(summary))


# ---- intervals within the range ------------------------------------------------------------------------


def test_an_accuracy_near_100_gets_the_t_interval_cut_at_100_pinned_against_scipy():
    assert _t(NEAR_100)[1] > 100  # the bug: a plain interval leaves [0, 100]
    low, high, method, clipped = range_interval(NEAR_100, (0.0, 100.0))
    assert (low, high) == pytest.approx((_t(NEAR_100)[0], 100.0))
    assert 0 <= low < np.mean(NEAR_100) < high <= 100
    assert (method, clipped) == ("t cut at range", "high")
    inside = [97.0, 98.0, 98.5]  # an interval within the range is the plain one, nothing marked
    assert range_interval(inside, (0.0, 100.0)) == pytest.approx((*_t(inside), "t", ""))


def test_a_time_gets_the_t_interval_cut_at_zero_pinned_against_scipy():
    assert _t(TIMES)[0] < 0
    low, high, method, clipped = range_interval(TIMES, (0.0, None))
    assert (low, high) == pytest.approx((0.0, _t(TIMES)[1]))
    assert 0 == low < np.mean(TIMES) < high and (method, clipped) == ("t cut at range", "low")


def test_seeds_on_the_bound_get_the_t_interval_cut_and_marked():
    x = [100.0, 99.0, 98.0]  # a seed on the bound
    low, high, method, clipped = range_interval(x, (0.0, 100.0))
    assert (low, high) == pytest.approx((_t(x)[0], 100.0)) and (method, clipped) == ("t cut at range", "high")
    assert range_interval([100.0, 100.0, 100.0], (0.0, 100.0))[:2] == (100.0, 100.0)  # no spread: the point
    zero = range_interval([0.0, 3.0, 0.5], (0.0, None))
    assert zero[0] == 0.0 and zero[1] == pytest.approx(_t([0.0, 3.0, 0.5])[1]) and zero[3] == "low"


def test_unknown_ranges_and_values_outside_them_keep_the_plain_interval():
    low, high, method, _ = range_interval(TIMES, (None, None))
    assert (low, high) == pytest.approx(_t(TIMES)) and method == "t"
    low, high, method, clipped = range_interval([-1.0, 2.0, 3.0], (0.0, None))  # the range does not fit the data
    assert (low, high) == pytest.approx(_t([-1.0, 2.0, 3.0])) and (method, clipped) == ("t", "")


def test_ranges_come_from_the_task_record_and_the_fixed_costs(tmp_path):
    finished_run(tmp_path, "a", seed=1, top1=90.0)
    runs = collect_runs(tmp_path)
    assert range_of(runs, "test.top1") == (0.0, 100.0) and range_of(runs, "train.best_val_top1") == (0.0, 100.0)
    assert range_of(runs, "test.loss") == (0.0, None) and range_of(runs, "train.time_s") == (0.0, None)
    assert range_of(runs, "resources.energy_j") == (0.0, None) and range_of(runs, "params.total") == (0.0, None)
    assert range_of(runs, "train.img_s") == (0.0, None)
    assert range_of(runs, "generalisation_gap") == (None, None)  # can be negative
    assert range_of(runs, "something.else") == (None, None)


@pytest.fixture
def near_100_cell(tmp_path):
    study = tmp_path / "study"
    for seed, (top1, time_s) in enumerate(zip(NEAR_100, TIMES), 1):
        finished_run(study, f"a{seed}", seed=seed, top1=top1, time_s=time_s, overrides=["optimizer=adamw"])
    for seed, top1 in enumerate([100.0, 99.0, 98.0], 1):  # a seed on the bound: cut, marked
        finished_run(study, f"b{seed}", seed=seed, top1=top1, overrides=["optimizer=sgd"])
    return study


def test_seed_tables_stay_in_range_and_mark_cut_ends(near_100_cell, tmp_path):
    runs = collect_runs(near_100_cell)
    s = seed_stats(runs, ["test.top1", "train.time_s"], ["optimizer"]).set_index(["optimizer", "metric"])
    adamw = s.loc[("adamw", "test.top1")]
    assert (adamw["ci95_low"], adamw["ci95_high"]) == pytest.approx((_t(NEAR_100)[0], 100.0))
    assert adamw["ci95_clipped"] == "high"
    time = s.loc[("adamw", "train.time_s")]
    assert (time["ci95_low"], time["ci95_high"]) == pytest.approx((0.0, _t(TIMES)[1]))
    assert s.loc[("sgd", "test.top1"), "ci95_high"] == 100.0 and s.loc[("sgd", "test.top1"), "ci95_clipped"] == "high"
    assert (s["ci95_low"] >= 0).all() and (s.xs("test.top1", level="metric")["ci95_high"] <= 100).all()

    a = analyze_runs(near_100_cell, baseline="optimizer=sgd", n_boot=50)
    table = headline_table(a.summary, a.comparisons, a.metric, a.group_by, a.baseline)
    assert table.set_index("optimizer").loc["sgd", "95% CI"].endswith(", 100.00*]")
    report = (write_report(a, tmp_path / "out", plots=False) / "report.md").read_text()
    assert "95% CI: t-interval of the mean, cut at the metric's range ([0, 100]; a cut end is marked *)" in report
    assert "`*`: an interval end cut at the metric's range" in report
    view = next(v for v in a.views if v.title.startswith("Optimizer"))
    assert "ci95_clipped" in view.table and (view.table["ci95_high"] <= 100).all()


# ---- verdicts --------------------------------------------------------------------------------------------


def _arm(root: Path, name: str, values, key: str = "optimizer"):
    for seed, v in enumerate(values, 1):
        finished_run(root, f"{name}{seed}", seed=seed + 10 * len(name), top1=v, overrides=[f"{key}={name}"])
    return collect_runs(root)


def test_a_non_significant_comparison_quotes_its_minimum_detectable_effect(tmp_path):
    cell, base = [90.0, 93.0, 91.5], [89.0, 92.0, 89.6]
    runs = _arm(tmp_path, "adamw", cell)
    runs = _arm(tmp_path, "sgd", base)
    t = compare_cells(runs[runs["optimizer"] == "adamw"], runs[runs["optimizer"] == "sgd"], "test.top1")
    p = stats.ttest_ind(cell, base, equal_var=False).pvalue
    assert t["test"] == "Welch t" and t["p_value"] == pytest.approx(p) and p > 0.05
    pooled = np.sqrt((np.var(cell, ddof=1) + np.var(base, ddof=1)) / 2)
    mde = TTestIndPower().solve_power(effect_size=None, nobs1=3, ratio=1.0, alpha=0.05, power=0.8) * pooled
    said = verdict({**t, "metric": "test.top1", "baseline": "optimizer=sgd"}, "max")
    assert said.startswith(f"no difference from optimizer=sgd detected (p = {p:.3f}, Welch t; with n = 3 seeds per")
    got = re.search(r"detect at 80% power is ([0-9.]+) points\)$", said)
    assert got and float(got.group(1)) == pytest.approx(mde, rel=0.05)
    assert "did not beat" not in said and "worse" not in said and "better" not in said


def test_a_significant_worse_comparison_still_says_worse(tmp_path):
    runs = _arm(tmp_path, "adamw", [80.0, 80.5, 79.8])
    runs = _arm(tmp_path, "sgd", [90.0, 90.4, 89.9])
    t = compare_cells(runs[runs["optimizer"] == "adamw"], runs[runs["optimizer"] == "sgd"], "test.top1")
    assert t["diff_ci95_high"] < 0
    assert verdict({**t, "baseline": "optimizer=sgd"}, "max").startswith("worse than optimizer=sgd (p ")
    a = analyze_runs(tmp_path, baseline="optimizer=sgd", n_boot=50)
    assert a.comparisons["verdict"].tolist() == ["worse"]
    report = (write_report(a, tmp_path / "out", plots=False) / "report.md").read_text()
    assert "Verdict:\n\n- optimizer=adamw (test.top1): worse than optimizer=sgd (p " in report
    assert "\nHighest mean test.top1: optimizer=sgd (90.10; higher is better), the baseline.\n" in report


# ---- mixed architectures --------------------------------------------------------------------------------


def test_a_cell_of_runs_tested_with_different_architectures_is_flagged(tmp_path):
    study = tmp_path / "study"
    for seed, top1 in enumerate([90.0, 91.0, 92.0], 1):
        run = finished_run(study, f"dt{seed}", seed=seed, top1=top1, overrides=["regime=depth_time"])
        tested = {"total": 60_000 if seed == 3 else 100_000}
        _patch(run, test={"checkpoint_params": tested, "checkpoint_policy": "best validation epoch"})
    for seed, top1 in enumerate([89.0, 90.0, 91.0], 1):
        finished_run(study, f"cl{seed}", seed=seed, top1=top1, overrides=["regime=classical_matched"])
    a = analyze_runs(study, n_boot=50)
    s = a.summary[a.summary["metric"] == a.metric].set_index("regime")
    assert s.loc["depth_time", "mixed_params"] == "60,000 (1 run), 100,000 (2 runs)"
    assert s.loc["classical_matched", "mixed_params"] == ""
    assert any(
        w.startswith("cell regime=depth_time averages runs tested with different architectures: 60,000 (1 run)")
        for w in a.warnings
    )
    table = headline_table(a.summary, a.comparisons, a.metric, a.group_by, a.baseline).set_index("regime")
    assert "mixed architectures (tested params 60,000 (1 run), 100,000 (2 runs))" in table.loc["depth_time", "flags"]
    assert table.loc["classical_matched", "flags"] == ""
    report = (write_report(a, tmp_path / "out", plots=False) / "report.md").read_text()
    assert (
        "Tested checkpoint (test.checkpoint_policy) differs between runs: best validation epoch in 3 runs; "
        "not recorded in 3 runs." in report
    )


def test_the_regime_report_says_which_checkpoint_was_tested():
    frame = pd.DataFrame({"test.checkpoint_policy": ["best validation epoch at the final depth"] * 4})
    assert checkpoint_sentence(frame) == (
        "Tested checkpoint (test.checkpoint_policy): best validation epoch at the final depth, in all 4 runs."
    )
    assert checkpoint_sentence(frame.iloc[:1]).endswith(", in the one run.")
    assert checkpoint_sentence(pd.DataFrame(index=range(2))).startswith("Tested checkpoint: not recorded")


# ---- the logger column ----------------------------------------------------------------------------------


def test_the_logger_column_holds_tracker_names(tmp_path):
    trackers = {
        "tensorboard": {"_target_": "stackwise_bench.training.loggers.tensorboard_logger.TensorBoardLogger"},
        "mlflow": {"_target_": "stackwise_bench.training.loggers.mlflow_logger.MLflowLogger"},
    }
    for seed, (override, logger, choice) in enumerate(
        [("logger=[tensorboard,mlflow]", trackers, None), (None, {}, "none"), ("logger=tensorboard", {}, None)], 1
    ):
        run = finished_run(tmp_path, f"r{seed}", seed=seed, top1=90.0, overrides=[override] if override else [])
        summary = json.loads((run / "summary.json").read_text())
        summary["config"]["logger"] = logger if seed != 3 else {"tensorboard": trackers["tensorboard"]}
        summary["run"]["choices"].pop("logger", None)
        if choice:
            summary["run"]["choices"]["logger"] = choice
        (run / "summary.json").write_text(json.dumps(summary))
    runs = collect_runs(tmp_path)
    assert sorted(runs["logger"]) == ["none", "tensorboard", "tensorboard+mlflow"]
    epochs = collect_epochs(runs)
    assert set(epochs["logger"]) == {"none", "tensorboard", "tensorboard+mlflow"}
    assert set(run_dynamics(runs, epochs)["logger"]) == {"none", "tensorboard", "tensorboard+mlflow"}


# ---- sentences with 0, 1 and many items -----------------------------------------------------------------


def test_count_agrees_with_its_number():
    assert (count(0, "run"), count(1, "run"), count(3, "run")) == ("0 runs", "1 run", "3 runs")


def test_one_cell_without_a_baseline_says_nothing_about_comparisons(tmp_path):
    for seed in (1, 2, 3):
        finished_run(tmp_path, f"s{seed}", seed=seed, top1=90.0 + seed)
    a = analyze_runs(tmp_path, n_boot=50)
    assert not any("baseline" in w for w in a.warnings)
    report = (write_report(a, tmp_path / "out", plots=False) / "report.md").read_text()
    assert "0 comparisons" not in report and "Holm" not in report.split("## Files")[0].split("per cell")[1]
    assert "Highest mean" not in report and "Best cell" not in report  # one cell is not a ranking


def test_holm_wording_with_one_and_many_comparisons(tmp_path):
    one = tmp_path / "one"
    _arm(one, "adamw", [80.0, 82.0, 81.0])
    _arm(one, "sgd", [81.0, 83.0, 80.5])
    report = (
        write_report(analyze_runs(one, baseline="optimizer=sgd", n_boot=50), tmp_path / "o1", plots=False) / "report.md"
    ).read_text()
    assert "(one comparison: no adjustment)" in report and "across all 1 comparisons" not in report
    assert "Verdict:\n" in report and "Verdicts:" not in report
    many = tmp_path / "many"
    for name, values in (("adamw", [80.0, 82.0, 81.0]), ("sgd", [81.0, 83.0, 80.5]), ("lion", [79.0, 80.0, 82.0])):
        _arm(many, name, values)
    report = (
        write_report(analyze_runs(many, baseline="optimizer=sgd", n_boot=50), tmp_path / "o2", plots=False)
        / "report.md"
    ).read_text()
    assert "Holm–Bonferroni adjusted across all 2 comparisons" in report and "Verdicts:\n" in report


def test_best_cell_sentence_reads_right_for_ties_and_a_single_winner():
    s = pd.DataFrame({"metric": "m", "group": ["a", "b", "c"], "mean": [1.0, 2.0, 2.0]})
    assert best_cell_sentence(s, "m", "max") == "Highest mean m: a tie between b and c (2.00; higher is better).\n"
    assert best_cell_sentence(s, "m", "min") == "Lowest mean m: a (1.00; lower is better).\n"
    assert best_cell_sentence(s.assign(mean=1.0), "m", "max") == "Every cell has the same mean m (1.00).\n"
    assert best_cell_sentence(s.iloc[:1], "m", "max") == ""


def test_a_tiny_p_reads_p_below_not_p_equals():
    from stackwise_bench.analysis.stats.verdicts import p_text

    assert p_text({"p_value": 1e-5, "p_holm": 3e-5, "test": "paired t"}) == "p < 0.001, Holm < 0.001, paired t"
    assert p_text({"p_value": 0.04, "p_holm": 0.12, "test": "paired t"}) == "p = 0.040, Holm 0.120, paired t"
