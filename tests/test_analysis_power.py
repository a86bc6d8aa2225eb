"""Power figures of each comparison, checked against statsmodels computed here; the report sentence; plan_seeds."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.power import TTestIndPower, TTestPower

from stackwise_bench.analysis.read.formatting import fmt_sig
from stackwise_bench.analysis.report.sections import comparisons_md
from stackwise_bench.analysis.stats.compare import COLUMNS, compare_cells
from stackwise_bench.analysis.stats.stat_power import fmt_seeds, independent_power, paired_power, seeds_needed
from stackwise_bench.analyze import main, parse_args
from stackwise_bench.errors import ConfigError

KW = {"alpha": 0.05, "alternative": "two-sided"}
POWER_COLUMNS = ("effect_size", "power", "mde_sigma", "mde_points", "seeds_needed")


@pytest.mark.parametrize("n", [3, 5, 8])
def test_paired_power_matches_statsmodels(n):
    d = np.random.default_rng(n).normal(0.7, 1.3, n)
    got = paired_power(d)
    sd = d.std(ddof=1)
    effect = d.mean() / sd
    mde = TTestPower().solve_power(effect_size=None, nobs=n, power=0.8, **KW)
    assert got["effect_size"] == pytest.approx(effect)
    assert got["power"] == pytest.approx(TTestPower().power(effect_size=abs(effect), nobs=n, **KW))
    assert got["mde_sigma"] == pytest.approx(mde, rel=1e-6)
    assert got["mde_points"] == pytest.approx(mde * sd, rel=1e-6)
    assert got["seeds_needed"] == math.ceil(TTestPower().solve_power(effect_size=abs(effect), power=0.8, **KW))


@pytest.mark.parametrize("na, nb", [(3, 3), (5, 5), (8, 8), (3, 6)])
def test_independent_power_matches_statsmodels(na, nb):
    rng = np.random.default_rng(na * 10 + nb)
    a, b = rng.normal(1.0, 1.0, na), rng.normal(0.0, 1.2, nb)
    got = independent_power(a, b)
    pooled = np.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    effect = (a.mean() - b.mean()) / pooled
    ratio = nb / na
    mde = TTestIndPower().solve_power(effect_size=None, nobs1=na, ratio=ratio, power=0.8, **KW)
    assert got["effect_size"] == pytest.approx(effect)
    assert got["power"] == pytest.approx(TTestIndPower().power(effect_size=abs(effect), nobs1=na, ratio=ratio, **KW))
    assert got["mde_sigma"] == pytest.approx(mde, rel=1e-6)
    assert got["mde_points"] == pytest.approx(mde * pooled, rel=1e-6)
    per_cell = TTestIndPower().solve_power(effect_size=abs(effect), ratio=1.0, power=0.8, **KW)
    assert got["seeds_needed"] == max(2, math.ceil(per_cell))


@pytest.mark.parametrize("effect", [0.3, -0.8, 1.5, 3.0])
@pytest.mark.parametrize("design", ["paired", "independent"])
def test_seeds_needed_is_the_smallest_n_with_80_percent_power(effect, design):
    n = seeds_needed(effect, design)

    def power(k):
        if design == "paired":
            return TTestPower().power(effect_size=abs(effect), nobs=k, **KW)
        return TTestIndPower().power(effect_size=abs(effect), nobs1=k, ratio=1.0, **KW)

    assert n >= 2 and power(n) >= 0.8
    assert n == 2 or power(n - 1) < 0.8


def test_undefined_cases_give_nan_not_errors():
    for value in (0.0, float("nan"), float("inf"), None):
        assert seeds_needed(value) is None
    for got in (paired_power([1.0]), paired_power([]), independent_power([1.0], [1.0, 2.0])):
        assert all(got[k] is None if k == "seeds_needed" else np.isnan(got[k]) for k in POWER_COLUMNS)
    flat = paired_power([0.5, 0.5, 0.5])  # no spread: the MDE in σ exists, nothing else does
    assert np.isfinite(flat["mde_sigma"]) and np.isnan(flat["power"]) and flat["seeds_needed"] is None
    assert np.isnan(independent_power([1.0, 1.0], [2.0, 2.0])["effect_size"])
    assert seeds_needed(1e-3) > 1000 and fmt_seeds(seeds_needed(1e-3)) == "1000+"
    assert fmt_seeds(None) == "–" and fmt_seeds(7) == "7"
    assert [fmt_sig(x) for x in (3.97, 0.0123, 123.0, 0.5)] == ["4.0", "0.012", "120", "0.50"]


def _cell(values, seeds) -> pd.DataFrame:
    return pd.DataFrame({"seed": seeds, "test.top1": values, "status": "completed"})


def test_compare_cells_has_the_power_columns():
    assert set(POWER_COLUMNS) <= set(COLUMNS)
    base = _cell([90.0, 90.5, 89.8, 90.2, 90.1], [1, 2, 3, 4, 5])
    cell = _cell([88.0, 89.1, 88.2, 89.0, 88.3], [1, 2, 3, 4, 5])
    row = compare_cells(cell, base, "test.top1")
    assert row["test"] == "paired t"
    expected = paired_power(cell["test.top1"].to_numpy() - base["test.top1"].to_numpy())
    for k in POWER_COLUMNS:
        assert row[k] == pytest.approx(expected[k])
    unpaired = compare_cells(_cell([88.0, 89.1, 88.2], [7, 8, 9]), base, "test.top1")
    assert unpaired["test"] == "Welch t"
    expected = independent_power([88.0, 89.1, 88.2], base["test.top1"].to_numpy())
    assert unpaired["effect_size"] == pytest.approx(unpaired["cohens_d"])
    for k in POWER_COLUMNS:
        assert unpaired[k] == pytest.approx(expected[k])


def _comparison_table(cell_values) -> pd.DataFrame:
    seeds = list(range(1, len(cell_values) + 1))
    base = _cell([90.0, 91.0, 89.0, 90.5, 89.5, 90.2, 89.8, 90.7][: len(seeds)], seeds)
    row = compare_cells(_cell(cell_values, seeds), base, "test.top1")
    return pd.DataFrame([{"group": "precision=bf16", "baseline": "precision=fp32", "metric": "test.top1", **row}])


def test_report_sentence_only_for_underpowered_comparisons():
    weak = _comparison_table([90.4, 90.1, 89.5])  # 3 seeds, a small noisy difference
    row = weak.iloc[0]
    assert row["power"] < 0.8
    text = comparisons_md(SimpleNamespace(comparisons=weak, aggregate="mean"))
    sentence = f"n = 3: differences smaller than {fmt_sig(row['mde_points'])} points cannot be told from seed noise."
    assert sentence in text and "precision=bf16 vs precision=fp32" in text
    assert "| effect_size | power | mde_points | mde_sigma | seeds_needed |" in text

    strong = _comparison_table([85.0, 86.2, 84.1, 85.6, 84.4, 85.3, 84.7, 85.9])  # 8 seeds, a 5-point drop
    assert strong.iloc[0]["power"] >= 0.8
    text = comparisons_md(SimpleNamespace(comparisons=strong, aggregate="mean"))
    assert "cannot be told from seed noise" not in text and "Comparisons against the baseline" in text


@pytest.mark.slow
def test_plan_seeds_prints_seeds_needed_and_writes_no_report(peft_study, tmp_path, capsys):
    out = tmp_path / "o"
    assert main([f"runs={peft_study}", "plan_seeds=true", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "lora.rank=4 vs lora.rank=0 [test.top1]" in printed and "lora.rank=16 vs lora.rank=0" in printed
    assert "seeds needed for 80% power: " in printed and "pairs" in printed and "seeds per cell" in printed
    assert "σ" in printed and "No report written" in printed and not out.exists()
    assert parse_args(["runs=a"])["plan_seeds"] is False
    with pytest.raises(ConfigError, match="plan_seeds=maybe must be true or false"):
        parse_args(["runs=a", "plan_seeds=maybe"])
