"""IQM, stratified-bootstrap intervals and P(X > Y), each checked against a direct numpy computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stackwise_bench.analysis.pipeline import analyze_runs
from stackwise_bench.analysis.report.write import write_report
from stackwise_bench.analysis.stats.robust import iqm, probability_of_improvement, stratified_bootstrap

from analysis_helpers import finished_run


def direct_iqm(x) -> float:
    x = np.sort(np.asarray(x, dtype=float))
    cut = int(0.25 * len(x))
    return float(x[cut : len(x) - cut].mean())


@pytest.mark.parametrize("n", [3, 4, 7, 8, 10, 41])
def test_iqm_is_the_mean_of_the_middle_half(n):
    x = np.random.default_rng(n).standard_t(2, n) * 3 + 90
    assert iqm(x) == pytest.approx(direct_iqm(x))
    x[0] = -1e6  # one diverged run moves the mean, not the IQM (from 4 runs on, it is cut)
    if n >= 4:
        assert iqm(x) == pytest.approx(direct_iqm(x))
        assert abs(iqm(x) - np.median(x)) < 10


def direct_bootstrap(values, strata, n_boot, rng):
    """The textbook loop: per resample, draw each stratum's runs with replacement, take the IQM."""
    values, strata = np.asarray(values, dtype=float), np.asarray(strata)
    stats = []
    for _ in range(n_boot):
        sample = np.concatenate([rng.choice(values[strata == s], size=np.sum(strata == s)) for s in np.unique(strata)])
        stats.append(direct_iqm(sample))
    return np.percentile(stats, [2.5, 97.5])


def test_stratified_bootstrap_interval_matches_a_direct_loop():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(90, 1, 10), rng.normal(70, 3, 10)])
    strata = ["cifar10"] * 10 + ["cifar100"] * 10
    point, low, high = stratified_bootstrap(values, strata, n_boot=4000, seed=1)
    d_low, d_high = direct_bootstrap(values, strata, 4000, np.random.default_rng(2))
    assert point == pytest.approx(direct_iqm(values))
    width = d_high - d_low
    assert low == pytest.approx(d_low, abs=0.08 * width)
    assert high == pytest.approx(d_high, abs=0.08 * width)


def test_stratification_keeps_each_tasks_share():
    """Two tasks far apart: resampling within task keeps 5 runs of each, so the mean never moves; an
    unstratified bootstrap mixes the shares and its interval is wide."""
    values = [0.0] * 5 + [100.0] * 5
    tasks = ["a"] * 5 + ["b"] * 5
    mean = lambda x, axis: np.mean(x, axis=axis)  # noqa: E731
    assert stratified_bootstrap(values, tasks, mean, n_boot=500) == (50.0, 50.0, 50.0)
    _, low, high = stratified_bootstrap(values, None, mean, n_boot=500)
    assert high - low > 40


def direct_p_improve(x, y) -> float:
    return float(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in x for b in y]))


def test_probability_of_improvement_against_a_double_loop():
    x, y = [91.0, 92.5, 90.0, 93.0], [90.0, 91.0, 92.5]
    p, low, high = probability_of_improvement(x, y, n_boot=2000)
    assert p == pytest.approx(direct_p_improve(x, y))  # ties count half
    assert 0 <= low <= p <= high <= 1
    rng = np.random.default_rng(3)
    boots = [direct_p_improve(rng.choice(x, len(x)), rng.choice(y, len(y))) for _ in range(2000)]
    d_low, d_high = np.percentile(boots, [2.5, 97.5])
    assert low == pytest.approx(d_low, abs=0.06) and high == pytest.approx(d_high, abs=0.06)
    assert probability_of_improvement([3.0, 4.0], [1.0, 2.0]) == (1.0, 1.0, 1.0)


def test_probability_of_improvement_averages_tasks_equally():
    """Runs compare only within their task: X wins task a, loses task b: P = 0.5, whatever the run counts."""
    x, tx = [95.0, 96.0, 60.0], ["a", "a", "b"]
    y, ty = [90.0, 70.0, 71.0, 72.0], ["a", "b", "b", "b"]
    p, _, _ = probability_of_improvement(x, y, tx, ty, n_boot=200)
    assert p == pytest.approx((direct_p_improve([95, 96], [90]) + direct_p_improve([60], [70, 71, 72])) / 2)
    assert p == 0.5
    assert np.isnan(probability_of_improvement([1.0], [2.0], ["a"], ["b"])[0])  # no shared task


@pytest.mark.slow
def test_aggregate_iqm_in_the_analysis_and_report(tmp_path):
    """group_by=[optimizer] pools two datasets: the IQM's bootstrap resamples within each dataset."""
    study = tmp_path / "s"
    values = {
        ("adamw", "digits"): [97.0, 97.5, 96.8, 97.2, 20.0],  # one diverged seed
        ("sgd", "digits"): [96.0, 96.2, 95.9, 96.1, 96.3],
        ("adamw", "synthetic"): [80.0, 81.0, 80.5, 79.5, 80.2],
        ("sgd", "synthetic"): [78.0, 78.5, 77.9, 78.2, 78.8],
    }
    job = 0
    for (opt, data), tops in values.items():
        for seed, top1 in enumerate(tops):
            finished_run(study, str(job), seed=seed, top1=top1, overrides=[f"optimizer={opt}", f"dataset={data}"])
            job += 1
    a = analyze_runs(study, group_by=["optimizer"], aggregate="iqm", n_boot=500, baseline="optimizer=sgd")
    iqm_rows = a.iqm.set_index("optimizer")
    adamw = values[("adamw", "digits")] + values[("adamw", "synthetic")]
    assert iqm_rows.loc["adamw", "iqm"] == pytest.approx(direct_iqm(adamw))
    assert iqm_rows.loc["adamw", "iqm_ci95_low"] < iqm_rows.loc["adamw", "iqm"] < iqm_rows.loc["adamw", "iqm_ci95_high"]
    (row,) = a.comparisons.to_dict("records")
    expected = (
        direct_p_improve(values[("adamw", "digits")], values[("sgd", "digits")])
        + direct_p_improve(values[("adamw", "synthetic")], values[("sgd", "synthetic")])
    ) / 2
    assert row["p_improve"] == pytest.approx(expected)
    out = write_report(a, tmp_path / "out", plots=False)
    report = (out / "report.md").read_text()
    assert "IQM [95% CI]" in report and "P(X>Y) [95%]" in report
    assert pd.read_csv(out / "iqm.csv").shape[0] == 2


@pytest.mark.slow
def test_default_aggregate_shows_no_iqm(tmp_path):
    study = tmp_path / "s"
    for seed in range(3):
        finished_run(study, f"a{seed}", seed=seed, top1=90.0 + seed, overrides=["optimizer=adamw"])
        finished_run(study, f"s{seed}", seed=seed, top1=89.0 + seed / 2, overrides=["optimizer=sgd"])
    a = analyze_runs(study)
    assert a.iqm.empty and "p_improve" in a.comparisons  # stats.csv always has P(X>Y)
    report = (write_report(a, tmp_path / "out", plots=False) / "report.md").read_text()
    assert "IQM" not in report and "P(X>Y)" not in report
