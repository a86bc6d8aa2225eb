"""Scaling fits (E + A·x^(−α)): known parameters recovered, intervals that cover, strata, refusals, report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stackwise_bench.analysis.pipeline import analyze_runs
from stackwise_bench.analysis.stats.power_law import bootstrap_fit, fit_power_law, huber_loss_and_grad, refit_batch
from stackwise_bench.analysis.studies.scaling import analyze_scaling, strata_keys
from stackwise_bench.analyze import main
from stackwise_bench.errors import ConfigError

from analysis_helpers import finished_run

RANKS = (1, 2, 4, 8, 16, 32)
TRUE = {"E": 3.0, "A": 8.0, "alpha": 0.7}


def draw(rng, levels=RANKS, seeds=5, noise=0.05, E=3.0, A=8.0, alpha=0.7):
    """Errors E + A·x^−α times log-normal noise (σ = ``noise`` in log space), ``seeds`` per level."""
    x = np.repeat(np.asarray(levels, dtype=float), seeds)
    return x, (E + A * x**-alpha) * np.exp(rng.normal(0.0, noise, len(x)))


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    x, y = draw(rng)
    lx, ly = np.log(x / 5.0), np.log(y)
    theta = np.array([1.0, 0.5, 0.6])
    _, grad = huber_loss_and_grad(theta, lx, ly, delta=0.05)
    eps = 1e-6
    numeric = [
        (huber_loss_and_grad(theta + eps * e, lx, ly, 0.05)[0] - huber_loss_and_grad(theta - eps * e, lx, ly, 0.05)[0])
        / (2 * eps)
        for e in np.eye(3)
    ]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "levels, E, A, alpha",
    [
        (RANKS, 3.0, 8.0, 0.7),  # LoRA ranks
        (np.geomspace(1e4, 1e6, 5), 2.0, 500.0, 0.5),  # parameter counts: A in the axis' own units
        (RANKS, 0.5, 20.0, 1.2),  # a low floor and a steep fall
    ],
)
def test_fit_recovers_known_parameters(levels, E, A, alpha):
    x, y = draw(np.random.default_rng(1), levels=levels, noise=0.02, E=E, A=A, alpha=alpha)
    f = fit_power_law(x, y)
    assert f.converged and f.starts == 25
    assert f.alpha == pytest.approx(alpha, abs=0.08)
    assert f.E == pytest.approx(E, rel=0.15)
    assert f.A == pytest.approx(A, rel=0.15)
    # and it beats every single start it was chosen from (multi-start keeps the best)
    exact = fit_power_law(x, y, starts=[np.array([np.log(E), np.log(A * f.x_scale**-alpha), alpha])])
    assert f.loss <= exact.loss + 1e-9


@pytest.mark.slow
def test_bootstrap_intervals_cover_the_truth_in_most_draws():
    """Stated share: over 30 synthetic studies (6 levels x 5 seeds, 5% noise), the 95% intervals of α, E and A
    each cover the truth in at least 24 (80%). A percentile bootstrap over 5 seeds per level is a little
    narrow (it sees n-1 of n degrees of freedom); scripts/bench_analysis.py --coverage measures the share."""
    covered = {"alpha": 0, "E": 0, "A": 0}
    draws = 30
    for i in range(draws):
        x, y = draw(np.random.default_rng(100 + i))
        b = bootstrap_fit(x, y, n_boot=300, seed=i)
        assert b.fit.converged and b.failed == 0
        for k in covered:
            low, high = b.intervals[k]
            assert low <= high
            covered[k] += low <= TRUE[k] <= high
    assert min(covered.values()) >= 24, covered


@pytest.mark.slow
def test_batched_refits_reach_the_multi_start_minimum():
    """The bootstrap's vectorised refits land where 25-start L-BFGS does, resample by resample."""
    x, y = draw(np.random.default_rng(5))
    f = fit_power_law(x, y)
    rng = np.random.default_rng(0)
    levels = [np.flatnonzero(x == v) for v in np.unique(x)]
    idx = np.concatenate([lv[rng.integers(0, len(lv), size=(10, len(lv)))] for lv in levels], axis=1)
    lx, ly = np.log(x[idx] / f.x_scale), np.log(y[idx])
    start = np.array([np.log(f.E), np.log(f.A * f.x_scale**-f.alpha), f.alpha])
    theta, done = refit_batch(lx, ly, start)
    assert done.all()
    for i in range(len(idx)):
        lbfgs = fit_power_law(x[idx[i]], y[idx[i]])
        batched = huber_loss_and_grad(theta[i], lx[i], ly[i])[0]
        assert batched <= lbfgs.loss * (1 + 1e-6) + 1e-12
        assert theta[i][2] == pytest.approx(lbfgs.alpha, abs=1e-3)


def test_bootstrap_keeps_levels_and_gives_a_band_around_the_fit():
    x, y = draw(np.random.default_rng(7))
    b = bootstrap_fit(x, y, n_boot=150, seed=3)
    assert b.grid[0] == pytest.approx(1.0) and b.grid[-1] == pytest.approx(32.0)
    curve = b.fit.predict(b.grid)
    assert np.all(b.curve_low <= curve + 1e-9) and np.all(curve <= b.curve_high + 1e-9)
    # reproducible: the same seed gives the same intervals
    again = bootstrap_fit(x, y, n_boot=150, seed=3)
    assert again.intervals == b.intervals


def test_flat_data_is_refused_not_fitted():
    rng = np.random.default_rng(2)
    x = np.repeat(np.asarray(RANKS, dtype=float), 3)
    y = 5.0 * np.exp(rng.normal(0, 0.01, len(x))) + 0.02 * np.log(x)  # error rises a little with x
    f = fit_power_law(x, y)
    assert not f.converged
    assert "does not fall" in f.reason


def _rank_runs(root, ranks, top1_of, seeds=(1, 2, 3), other=None):
    """A LoRA-rank study: each run's test.top1 from ``top1_of(rank, seed)``; params.trainable = 1000·rank + 50."""
    study = root / "scaling"
    job = 0
    for rank in ranks:
        for seed in seeds:
            overrides = [f"lora.rank={rank}"] + ([other] if other else [])
            finished_run(
                study,
                f"{job}",
                seed=seed,
                top1=float(top1_of(rank, seed)),
                overrides=overrides,
                trainable=1000 * rank + 50,
            )
            job += 1
    return study


def _truth_top1(rank, seed):
    return 100.0 - (3.0 + 8.0 * max(rank, 0.01) ** -0.7) * (1 + 0.02 * (seed - 2))


@pytest.mark.slow
def test_study_fit_along_lora_rank_and_trainable_parameters(tmp_path):
    study = _rank_runs(tmp_path, (0, 1, 2, 4, 8, 16), _truth_top1)
    a = analyze_runs(study, scaling="lora.rank", n_boot=100)
    (s,) = a.scaling.strata
    assert s.fit is not None and s.label == "all runs"
    assert s.fit.fit.alpha == pytest.approx(0.7, abs=0.1)
    assert "lora.rank=0 has no logarithm" in s.note  # full fine-tuning is not a level of the fit
    assert len(s.x) == 15
    # params.trainable is set by lora.rank: one fit, not one per rank
    runs = a.runs.assign(_x=pd.to_numeric(a.runs["params.trainable"]))
    assert strata_keys(runs, "params.trainable", ["lora.rank"]) == []
    by_params = analyze_scaling(a.runs, "params.trainable", "test.top1", ["lora.rank"], n_boot=100)
    assert len(by_params.strata) == 1 and by_params.strata[0].fit is not None
    assert by_params.table.loc[0, "levels"] == 6  # rank 0 has 50 trainable parameters: a level here


@pytest.mark.slow
def test_one_fit_per_other_key_and_a_sentence_where_levels_are_too_few(tmp_path):
    study = _rank_runs(tmp_path, (1, 2, 4, 8), _truth_top1, other="optimizer=adamw")
    _rank_runs(tmp_path / "b", (1, 2, 4), _truth_top1, other="optimizer=sgd")
    a = analyze_runs([study, tmp_path / "b" / "scaling"], scaling="lora.rank", n_boot=100)
    assert a.scaling.strata_keys == ["optimizer"]
    fits = {s.label: s for s in a.scaling.strata}
    assert fits["optimizer=adamw"].fit is not None
    assert fits["optimizer=sgd"].fit is None
    assert a.scaling.sentences == [
        "optimizer=sgd: lora.rank has 3 levels with finished runs; a fit of E + A·x^(−α) needs at least 4, "
        "so no curve is drawn."
    ]


def test_a_perfect_accuracy_is_refused_in_one_sentence(tmp_path):
    study = _rank_runs(tmp_path, (1, 2, 4, 8), lambda r, s: 100.0 if r == 8 else _truth_top1(r, s))
    (s,) = analyze_runs(study, scaling="lora.rank", n_boot=100).scaling.strata
    assert s.fit is None
    assert s.note == (
        "test.top1 reaches 100% in 3 run(s): an error of 0 has no logarithm, so no curve is drawn; "
        "fit a loss instead (metric=test.loss)."
    )


@pytest.mark.slow
def test_report_csv_and_plot(tmp_path, capsys):
    study = _rank_runs(tmp_path, (1, 2, 4, 8, 16), _truth_top1)
    code = main([f"runs={study}", "scaling=lora.rank", "bootstrap=100", f"out={tmp_path / 'out'}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Scaling of 100 − test.top1 along lora.rank" in printed and "alpha 0.7" in printed
    table = pd.read_csv(tmp_path / "out" / "scaling.csv")
    assert table.loc[0, "levels"] == 5 and table.loc[0, "runs"] == 15 and table.loc[0, "bootstrap"] == 100
    assert table.loc[0, "alpha_ci95_low"] <= table.loc[0, "alpha"] <= table.loc[0, "alpha_ci95_high"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Scaling along lora.rank" in report and "| all runs | 5 | 15 |" in report
    assert (tmp_path / "out" / "plots" / "scaling.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "argv, message",
    [
        (["scaling=nope"], "scaling=nope is not a column of these runs; choose a numeric one that varies: lora.rank"),
        (["aggregate=median"], "aggregate=median is not mean or iqm"),
        (["bootstrap=10"], "bootstrap=10 must be a whole number of resamples of at least 100"),
    ],
)
def test_bad_scaling_arguments_are_refused(tmp_path, capsys, argv, message):
    study = _rank_runs(tmp_path, (1, 2), _truth_top1, seeds=(1,))
    assert main([f"runs={study}", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_unknown_axis_raises_config_error(tmp_path):
    study = _rank_runs(tmp_path, (1, 2), _truth_top1, seeds=(1,))
    with pytest.raises(ConfigError, match="scaling=model.depth is not a column"):
        analyze_runs(study, scaling="model.depth")
