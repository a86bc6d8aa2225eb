"""Depth as time vs classical (analysis/studies/regimes.py): FLOPs to target, ratios, equal-compute tests, report."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from stackwise_bench.analysis.pipeline import analyze_runs
from stackwise_bench.analysis.plots.regimes import accuracy_vs_flops_figure
from stackwise_bench.analysis.stats.seeds import ratio_interval
from stackwise_bench.analyze import main

from analysis_helpers import curve, write_run

U = 1e12  # FLOPs per unit below
SEEDS = (42, 123, 456)
# Cumulative training FLOPs (units) at the end of epochs 1-6, and each epoch's training time (s).
FLOPS = {
    "classical": [10, 20, 30, 40, 50, 60],
    "classical_matched": [7.5, 15, 22.5, 30, 37.5, 45],
    "depth_time": [5, 10, 15, 25, 35, 45],  # depth 1 for epochs 1-3, depth 2 after the growth at step 25
}
TIMES = {"classical": [2.0] * 6, "classical_matched": [2.0] * 6, "depth_time": [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]}
GROWTH_STEP = 25  # between epoch 2 (step 20, 10 units) and epoch 3 (step 30, 15 units): 12.5 units
TOP1 = {
    "classical": [90.0, 91.0, 89.5],
    "classical_matched": [88.0, 88.6, 87.9],
    "depth_time": [88.9, 89.1, 88.2],
    "depth_time_prepend": [89.6, 90.2, 89.3],
    "depth_time_interleave": [87.5, 88.9, 87.7],
}
# The first epoch (1-based) whose val_top1 reaches the target, per seed; None: never.
HIT = {
    "classical": [4, 3, 5],
    "classical_matched": [5, 6, None],
    "depth_time": [5, 4, 6],
    "depth_time_prepend": [4, 4, 5],
    "depth_time_interleave": [6, 5, None],
}
TARGET = 0.99 * np.mean(TOP1["classical"])  # 89.265


def profile(arm: str) -> str:
    return arm if arm in FLOPS else "depth_time"


def val_curve(hit: int | None) -> list[float]:
    """Below the target (at most 85) before epoch ``hit``, at or above it (89.5+) from there on."""
    return [89.5 + 0.1 * i if hit is not None and i + 1 >= hit else 70.0 + 3 * i for i in range(6)]


def epochs_of(arm: str, hit: int | None, flops: bool = True) -> list[dict]:
    kind = profile(arm)
    rows = curve(6, val=val_curve(hit), epoch_time=TIMES[kind])
    for i, row in enumerate(rows):
        row["flops"] = FLOPS[kind][i] * U if flops else None
        row["depth"] = (1 if i < 3 else 2) if kind == "depth_time" else 2
    return rows


def regime_run(root, job: str, arm: str, seed: int, top1: float, hit: int | None, flops: bool = True):
    kind = profile(arm)
    epochs = epochs_of(arm, hit, flops)
    train = {
        "flops": FLOPS[kind][-1] * U if flops else None,
        "flops_per_img": 1e9 if flops else None,
        "time_s": sum(TIMES[kind]),
        "regime": "depth_time" if kind == "depth_time" else "classical",
        "best_val_top1": max(r["val_top1"] for r in epochs),
        "final_val_top1": epochs[-1]["val_top1"],
    }
    if kind == "depth_time":
        train.update(growth_steps=[GROWTH_STEP], stacks=[1, 2])
    return write_run(
        root,
        job,
        seed=seed,
        overrides=[f"regime={arm}"],
        choices={"regime": arm},
        test={"top1": top1},
        train=train,
        params={"total": 1000, "trainable": 1000},
        epochs=epochs,
    )


def build_regime_study(root, arms=TOP1, flops: bool = True):
    study = root / "multirun" / "depth_time"
    job = 0
    for arm in arms:
        for i, seed in enumerate(SEEDS):
            regime_run(study, str(job), arm, seed, TOP1[arm][i], HIT[arm][i], flops)
            job += 1
    return study


@pytest.fixture(scope="module")
def regime_study(tmp_path_factory):
    return build_regime_study(tmp_path_factory.mktemp("regimes"))


@pytest.fixture(scope="module")
def analysis(regime_study):
    return analyze_runs(regime_study, baseline="regime=classical_matched")


def expected_ftt(arm: str) -> list[float]:
    kind = profile(arm)
    return [np.nan if h is None else FLOPS[kind][h - 1] * U for h in HIT[arm]]


def row_of(a, arm: str) -> pd.Series:
    t = a.regimes.table
    return t[t["regime"] == arm].iloc[0]


@pytest.mark.slow
def test_flops_and_time_to_target_per_run_are_the_hand_computed_values(analysis):
    r = analysis.regimes
    assert r is not None and r.key == "regime"
    assert r.targets == {"all runs": pytest.approx(TARGET)}
    for arm in TOP1:
        runs = r.runs[r.runs["regime"] == arm].set_index("seed").loc[list(SEEDS)]
        np.testing.assert_allclose(runs["flops_to_target"], expected_ftt(arm))
        times = [np.nan if h is None else sum(TIMES[profile(arm)][:h]) for h in HIT[arm]]
        np.testing.assert_allclose(runs["time_to_target_s"], times)
        assert list(runs["reached"]) == [h is not None for h in HIT[arm]]
        row = row_of(analysis, arm)
        assert row["n_never"] == sum(h is None for h in HIT[arm]) and row["n"] == 3
        assert row["flops_to_target_mean"] == pytest.approx(np.nanmean(expected_ftt(arm)))
        assert row["top1_mean"] == pytest.approx(np.mean(TOP1[arm]))
        assert row["top1_std"] == pytest.approx(np.std(TOP1[arm], ddof=1))
        assert row["flops_mean"] == FLOPS[profile(arm)][-1] * U
        assert row["flops_vs_classical"] == pytest.approx(FLOPS[profile(arm)][-1] / 60)


@pytest.mark.slow
def test_growths_are_placed_at_interpolated_flops(analysis):
    g = analysis.regimes.growth
    assert len(g) == 9 and set(g["step"]) == {GROWTH_STEP}  # 3 depth-time arms x 3 seeds, one growth each
    np.testing.assert_allclose(g["flops"], 12.5 * U)


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["depth_time", "depth_time_prepend", "depth_time_interleave", "classical_matched"])
def test_ratio_and_interval_match_a_direct_computation(analysis, arm):
    """Paired by seed over the seeds that reached the target in both arms: t-interval of the log ratios."""
    mine, ref = np.array(expected_ftt(arm)), np.array(expected_ftt("classical"))
    both = ~np.isnan(mine) & ~np.isnan(ref)
    logs = np.log(mine[both] / ref[both])
    low, high = sps.t.interval(0.95, len(logs) - 1, loc=logs.mean(), scale=sps.sem(logs))
    row = row_of(analysis, arm)
    assert row["ftt_ratio_pairs"] == both.sum()
    assert row["ftt_ratio"] == pytest.approx(np.exp(logs.mean()))
    assert (row["ftt_ratio_ci95_low"], row["ftt_ratio_ci95_high"]) == pytest.approx((np.exp(low), np.exp(high)))


def test_unpaired_ratio_uses_welch_on_the_logs():
    a = pd.Series([30.0, 36.0, 41.0], index=[1, 2, 3])
    b = pd.Series([50.0, 44.0, 58.0], index=[4, 5, 6])
    res = sps.ttest_ind(np.log(a), np.log(b), equal_var=False)
    low, high = res.confidence_interval(0.95)
    ratio, lo, hi, pairs = ratio_interval(a, b)
    assert pairs == 0 and ratio == pytest.approx(np.exp(np.log(a).mean() - np.log(b).mean()))
    assert (lo, hi) == pytest.approx((np.exp(low), np.exp(high)))


def holm_by_hand(p: list[float]) -> np.ndarray:
    order = np.argsort(p)
    adjusted = np.maximum.accumulate([(len(p) - k) * p[i] for k, i in enumerate(order)])
    out = np.empty(len(p))
    out[order] = np.minimum(adjusted, 1.0)
    return out


def test_paired_tests_against_the_matched_arm_match_scipy_and_holm(analysis):
    arms = ["depth_time", "depth_time_interleave", "depth_time_prepend"]  # the table's (sorted) order
    p = [sps.ttest_rel(TOP1[arm], TOP1["classical_matched"]).pvalue for arm in arms]
    rows = [row_of(analysis, arm) for arm in arms]
    np.testing.assert_allclose([r["vs_matched_p"] for r in rows], p)
    np.testing.assert_allclose([r["vs_matched_p_holm"] for r in rows], holm_by_hand(p))
    assert [r["vs_matched_test"] for r in rows] == ["paired t"] * 3
    diffs = [np.mean(np.subtract(TOP1[arm], TOP1["classical_matched"])) for arm in arms]
    np.testing.assert_allclose([r["vs_matched_diff"] for r in rows], diffs)
    assert [bool(r["vs_matched_significant"]) for r in rows] == [False, False, True]
    for arm in ("classical", "classical_matched"):  # not depth-time arms: not tested
        assert np.isnan(row_of(analysis, arm)["vs_matched_p"])


def test_sentences_say_plainly_who_beat_classical_at_equal_flops(analysis):
    s = {line.split(":")[0]: line for line in analysis.regimes.sentences}
    assert list(s) == ["depth_time", "depth_time_interleave", "depth_time_prepend"]
    p = sps.ttest_rel(TOP1["depth_time_prepend"], TOP1["classical_matched"]).pvalue
    assert s["depth_time_prepend"].startswith(
        "depth_time_prepend: 89.70 vs 88.17 for classical at equal FLOPs, +1.53 points: it beat classical at "
        f"equal FLOPs (p = {p:.3f}, Holm "
    )
    assert s["depth_time_prepend"].endswith(", paired t).")
    # Not significant: no verdict, the p-value and the smallest effect the test could have seen (statsmodels).
    from statsmodels.stats.power import TTestPower

    for arm in ("depth_time", "depth_time_interleave"):
        d = np.subtract(TOP1[arm], TOP1["classical_matched"])
        mde = TTestPower().solve_power(effect_size=None, nobs=3, alpha=0.05, power=0.8) * d.std(ddof=1)
        p = sps.ttest_rel(TOP1[arm], TOP1["classical_matched"]).pvalue
        assert f": no difference detected (p = {p:.3f}" in s[arm]
        said = re.search(
            r"paired t; with n = 3 paired seeds the smallest effect this test would detect at 80% "
            r"power is ([0-9.]+) points\)\.$",
            s[arm],
        )
        assert said and float(said.group(1)) == pytest.approx(mde, rel=0.05)
        assert "did not beat" not in s[arm] and "worse" not in s[arm]
    assert "-0.13 points" in s["depth_time_interleave"]
    assert analysis.regimes.notes == []


@pytest.mark.slow
def test_matched_classical_is_the_automatic_baseline(regime_study):
    a = analyze_runs(regime_study)
    assert a.baseline == {"regime": "classical_matched"} and a.baseline_auto
    assert set(a.comparisons["regime"]) == {"classical", "depth_time", "depth_time_prepend", "depth_time_interleave"}


def test_figure_draws_each_arm_the_target_and_the_growths(analysis):
    fig = accuracy_vs_flops_figure(analysis.regimes, analysis.epochs)
    (ax,) = fig.axes
    labels = [line.get_label() for line in ax.get_lines()]
    for arm in TOP1:
        assert f"regime={arm}" in labels
    target = [line for line in ax.get_lines() if line.get_label().startswith("target")]
    assert len(target) == 1 and target[0].get_ydata()[0] == pytest.approx(TARGET)
    markers = [line for line in ax.get_lines() if line.get_marker() == "v" and len(line.get_xdata())]
    assert len(markers) == 3 and all(m.get_xdata()[0] == pytest.approx(12.5 * U) for m in markers)
    # The classical mean line: every seed's curve interpolated at the grid's FLOPs, averaged.
    line = ax.get_lines()[labels.index("regime=classical")]
    x, y = line.get_xdata(), line.get_ydata()
    curves = [val_curve(h) for h in HIT["classical"]]
    expected = np.mean([np.interp(x, np.array(FLOPS["classical"]) * U, c) for c in curves], axis=0)
    np.testing.assert_allclose(y, expected)
    assert x[0] == pytest.approx(10 * U) and x[-1] == pytest.approx(60 * U)


@pytest.mark.slow
def test_cli_writes_the_section_the_csv_and_the_figure(regime_study, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([f"runs={regime_study}", "baseline=regime=classical_matched", f"out={out}"]) == 0
    report = (out / "report.md").read_text()
    assert "## Depth as time vs classical" in report
    section = report.split("## Depth as time vs classical")[1].split("\n## ")[0]
    assert "| regime=depth_time_prepend | 3 | 89.70 ± 0.46 | 4.5e+13 | 0.75× |" in section
    assert "- depth_time_prepend: 89.70 vs 88.17 for classical at equal FLOPs" in section
    assert "validation accuracy is what a run can see while it trains" in section
    assert "1 (reference)" in section and "1 of 3" in section
    table = pd.read_csv(out / "regimes.csv")
    assert len(table) == 5
    for col in ("arm", "regime", "kind", "n", "top1_mean", "flops_mean", "flops_vs_classical", "time_s_mean"):
        assert col in table
    for col in ("flops_to_target_mean", "ftt_ratio", "ftt_ratio_ci95_low", "n_never", "vs_matched_p_holm"):
        assert col in table
    assert (out / "plots" / "accuracy_vs_flops.png").stat().st_size > 0
    assert "### Accuracy vs training FLOPs" in report and "regimes.csv (" in report


@pytest.mark.slow
def test_a_target_for_a_study_without_regimes_is_refused(optimizer_study, tmp_path, capsys):
    assert main([f"runs={optimizer_study}", "target=90", f"out={tmp_path / 'an'}"]) == 2
    assert "holds no regime= study; drop target=" in capsys.readouterr().err and not (tmp_path / "an").exists()


def test_a_study_without_regimes_has_no_section(optimizer_study, tmp_path, capsys):
    a = analyze_runs(optimizer_study)
    assert a.regimes is None and a.baseline == {"optimizer": "sgd"}
    out = tmp_path / "report"
    assert main([f"runs={optimizer_study}", "plots=false", f"out={out}"]) == 0
    assert "Depth as time" not in (out / "report.md").read_text()
    assert not (out / "regimes.csv").exists()


@pytest.mark.slow
def test_runs_without_flops_and_without_a_classical_arm_get_one_sentence_each(tmp_path):
    study = build_regime_study(tmp_path, arms=["classical_matched", "depth_time"], flops=False)
    r = analyze_runs(study).regimes
    assert len(r.notes) == 2
    assert r.notes[0].startswith("No run recorded training FLOPs (runs from before compute accounting")
    assert r.notes[1].startswith("No classical full-budget arm (regime=classical): the target is 99% of the best arm's")
    assert all(n.count(". ") == 0 and n.endswith(".") for n in r.notes)  # one sentence each
    assert r.targets["all runs"] == pytest.approx(0.99 * np.mean(TOP1["depth_time"]))
    assert r.table["flops_mean"].isna().all() and r.runs["flops_to_target"].isna().all()
    assert r.table["ftt_ratio"].isna().all()
    assert r.runs["time_to_target_s"].notna().any()  # wall time still counts
    assert accuracy_vs_flops_figure(r, analyze_runs(study).epochs) is None


@pytest.mark.slow
def test_a_given_target_replaces_the_share_of_the_classical_arm(regime_study, tmp_path):
    """``analyze target=76``: every run's val_top1 reaches 76 at epoch 3 (70, 73, 76, ... or 89.5 from its hit)."""

    a = analyze_runs(regime_study, baseline="regime=classical_matched", target=76.0)
    assert a.regimes.targets == {"all runs": 76.0}
    for arm in TOP1:
        runs = a.regimes.runs[a.regimes.runs["regime"] == arm]
        assert list(runs["flops_to_target"]) == [FLOPS[profile(arm)][2] * U] * 3 and runs["reached"].all()
    out = tmp_path / "an"
    assert main([f"runs={regime_study}", "target=76", "plots=false", f"out={out}"]) == 0
    assert "Target: given (analyze target=): 76.00% validation top-1." in (out / "report.md").read_text()
    assert main([f"runs={regime_study}", "target=high", f"out={tmp_path / 'x'}"]) == 2
    assert not (tmp_path / "x").exists()
