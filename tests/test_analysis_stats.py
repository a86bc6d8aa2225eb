"""Seed statistics and baseline comparisons, checked against scipy / statsmodels computed here."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from stackwise_bench.analysis import (
    analyze_runs,
    cohens_d,
    collect_runs,
    compare_to_baseline,
    holm,
    resolve_baseline,
    seed_stats,
)
from stackwise_bench.errors import ConfigError

from analysis_helpers import finished_run
from fixtures_analysis import PEFT_TOP1


def _pooled_d(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    sp = np.sqrt(((len(a) - 1) * np.var(a, ddof=1) + (len(b) - 1) * np.var(b, ddof=1)) / (len(a) + len(b) - 2))
    return (a.mean() - b.mean()) / sp


def test_seed_stats_match_scipy(peft_study):
    s = seed_stats(collect_runs(peft_study), "test.top1", ["lora.rank"]).set_index("lora.rank")
    assert list(s.index) == [0, 4, 8, 16]
    for rank, by_seed in PEFT_TOP1.items():
        x = np.array(list(by_seed.values()), dtype=float)
        row = s.loc[rank]
        # top-1 is a percentage: its t-interval, cut at [0, 100] where it reaches past them (marked)
        low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
        cut = ("low" if low < 0 else "") + ("high" if high > 100 else "")
        low, high = max(low, 0.0), min(high, 100.0)
        assert row["ci95_method"] == ("t cut at range" if cut else "t") and row["ci95_clipped"] == cut
        assert row["n"] == len(x)
        assert row["mean"] == pytest.approx(x.mean())
        assert row["std"] == pytest.approx(x.std(ddof=1))
        assert (row["ci95_low"], row["ci95_high"]) == pytest.approx((low, high))
        assert (row["min"], row["max"]) == (x.min(), x.max())


def test_incomplete_cells_are_flagged(peft_study):
    s = seed_stats(collect_runs(peft_study), "test.top1", ["lora.rank"]).set_index("lora.rank")
    assert s["incomplete"].to_dict() == {0: False, 4: False, 8: True, 16: True}
    assert s.loc[8, "missing_seeds"] == "4 5 6 7 8 9"
    assert s.loc[8, "n_unfinished"] == 1 and s.loc[16, "n_unfinished"] == 1  # failed, interrupted
    assert s.loc[8, "n_runs"] == 4


@pytest.mark.slow
def test_comparisons_match_scipy_and_holm_matches_statsmodels(peft_study):
    runs = collect_runs(peft_study)
    c = compare_to_baseline(runs, "test.top1", {"lora.rank": 0}, ["lora.rank"]).set_index("lora.rank")
    base = PEFT_TOP1[0]

    # rank 4: six matching seeds -> paired t and Wilcoxon
    a = np.array([PEFT_TOP1[4][s] for s in range(1, 7)])
    b = np.array([base[s] for s in range(1, 7)])
    r4 = c.loc[4]
    assert r4["test"] == "paired t" and r4["n_pairs"] == 6
    assert r4["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert r4["statistic"] == pytest.approx(stats.ttest_rel(a, b).statistic)
    assert r4["wilcoxon_p"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    d = a - b
    low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert (r4["diff"], r4["diff_ci95_low"], r4["diff_ci95_high"]) == pytest.approx((d.mean(), low, high))
    assert r4["cohens_d"] == pytest.approx(_pooled_d(a, b))

    # rank 8: three of its seeds pair with the baseline -> paired t, too few pairs for Wilcoxon
    a8 = np.array([PEFT_TOP1[8][s] for s in (1, 2, 3)])
    b8 = np.array([base[s] for s in (1, 2, 3)])
    assert c.loc[8, "test"] == "paired t" and np.isnan(c.loc[8, "wilcoxon_p"])
    assert c.loc[8, "p_value"] == pytest.approx(stats.ttest_rel(a8, b8).pvalue)

    # rank 16: seeds 7-9 never ran at rank 0 -> Welch
    a16 = np.array(list(PEFT_TOP1[16].values()))
    b_all = np.array(list(base.values()))
    welch = stats.ttest_ind(a16, b_all, equal_var=False)
    r16 = c.loc[16]
    assert r16["test"] == "Welch t" and r16["n_pairs"] == 0
    assert r16["p_value"] == pytest.approx(welch.pvalue)
    va, vb = a16.var(ddof=1) / len(a16), b_all.var(ddof=1) / len(b_all)
    dof = (va + vb) ** 2 / (va**2 / (len(a16) - 1) + vb**2 / (len(b_all) - 1))
    half = stats.t.ppf(0.975, dof) * np.sqrt(va + vb)
    diff = a16.mean() - b_all.mean()
    assert (r16["diff_ci95_low"], r16["diff_ci95_high"]) == pytest.approx((diff - half, diff + half))
    assert r16["cohens_d"] == pytest.approx(_pooled_d(a16, b_all))

    expected = multipletests(c["p_value"].to_numpy(), method="holm")[1]
    assert c["p_holm"].to_numpy() == pytest.approx(expected)
    assert (c["significant"] == (c["p_holm"] < 0.05)).all()


def test_holm_ignores_missing_p_values():
    p = [0.01, np.nan, 0.04, 0.03]
    out = holm(p)
    assert np.isnan(out[1])
    assert out[[0, 2, 3]] == pytest.approx(multipletests([0.01, 0.04, 0.03], method="holm")[1])


def test_cohens_d_pooled():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0]
    assert cohens_d(a, b) == pytest.approx(_pooled_d(a, b))
    assert np.isnan(cohens_d([1.0], b))


def test_too_few_seeds_are_said_plainly(tmp_path):
    for seed, (x, y) in enumerate(((90.0, 80.0), (91.0, 82.5)), start=1):
        finished_run(tmp_path, f"a{seed}", seed=seed, top1=x, overrides=["lora.rank=0"])
        finished_run(tmp_path, f"b{seed}", seed=seed, top1=y, overrides=["lora.rank=4"])
    finished_run(tmp_path, "c1", seed=1, top1=70.0, overrides=["lora.rank=8"])
    a = analyze_runs(tmp_path)
    c = a.comparisons.set_index("lora.rank")
    assert "too few for the test to mean anything" in c.loc[4, "note"]
    assert "no test is possible" in c.loc[8, "note"] and c.loc[8, "test"] == "none"
    assert any("fewer than 3 seeds" in w for w in a.warnings)


@pytest.mark.slow
def test_baseline_matches_the_twin_cell_across_experiments(precision_studies):
    a = analyze_runs(precision_studies, baseline="precision=fp32")
    assert a.group_by == ["precision", "augmentation"]
    c = a.comparisons.set_index("augmentation")
    assert set(c["baseline"]) == {"precision=fp32, augmentation=basic", "precision=fp32, augmentation=extended"}
    assert c.loc["basic", "baseline"].endswith("basic") and c.loc["basic", "test"] == "paired t"
    x16 = np.array([90.8, 91.5, 90.9])
    x32 = np.array([91.0, 92.0, 90.5])
    assert c.loc["basic", "p_value"] == pytest.approx(stats.ttest_rel(x16, x32).pvalue)


def test_baseline_errors_name_the_key(peft_study):
    runs = collect_runs(peft_study)
    with pytest.raises(ConfigError, match="'precison' is not a config choice or override"):
        resolve_baseline(runs, "precison=fp32", ["lora.rank"])
    with pytest.raises(ConfigError, match="matches no run; lora.rank takes the values"):
        resolve_baseline(runs, "lora.rank=3", ["lora.rank"])
    with pytest.raises(ConfigError, match="key=value"):
        resolve_baseline(runs, "precision", ["lora.rank"])
    assert resolve_baseline(runs, None, ["lora.rank"]) == {"lora.rank": 0}  # automatic: full fine-tuning
    assert resolve_baseline(runs, {"lora": {"rank": 4}}, ["lora.rank"]) == {"lora.rank": 4}


def test_unknown_metric_is_bad_input(peft_study):
    with pytest.raises(ConfigError, match="metric=test.top2 is not a numeric column"):
        analyze_runs(peft_study, metric="test.top2")
    with pytest.raises(ConfigError, match="group_by key 'lora.rnak'"):
        analyze_runs(peft_study, group_by=["lora.rnak"])


@pytest.mark.slow
def test_partly_shared_seeds_pair_on_the_shared_ones(tmp_path):
    base = {1: 90.0, 2: 91.5, 3: 89.0, 4: 90.2, 5: 92.0}
    cell = {1: 88.0, 2: 90.1, 3: 88.2, 4: 88.9, 6: 95.0}  # seed 6 has no partner; 5 has none either
    for seed, v in base.items():
        finished_run(tmp_path, f"a{seed}", seed=seed, top1=v, overrides=["lora.rank=0"])
    for seed, v in cell.items():
        finished_run(tmp_path, f"b{seed}", seed=seed, top1=v, overrides=["lora.rank=4"])
    row = analyze_runs(tmp_path).comparisons.iloc[0]
    shared = [1, 2, 3, 4]
    expected = stats.ttest_rel([cell[s] for s in shared], [base[s] for s in shared]).pvalue
    assert row["test"] == "paired t" and row["n_pairs"] == 4
    assert row["p_value"] == pytest.approx(expected)
    assert "paired on the 4 shared seeds; 2 unpaired run(s)" in row["note"]
