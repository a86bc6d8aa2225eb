"""Training dynamics and the precision / PEFT / optimizer study views."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from stackwise_bench.analysis import analyze_runs, collect_epochs, collect_runs, run_dynamics

from analysis_helpers import curve, finished_run
from fixtures_analysis import HEAD, PEFT_TOP1, lora_trainable


def _dynamics(tmp_path):
    val = [50.0, 79.4, 79.6, 80.0, 75.0]  # 79.4 is just outside the 0.5-point tolerance
    train = [55.0, 75.0, 85.0, 90.0, 95.0]
    times = [1.0, 2.0, 3.0, 2.0, 2.0]
    finished_run(tmp_path, "0", seed=1, top1=74.0, epochs=curve(5, val=val, train=train, epoch_time=times))
    val2 = [60.0, 62.0, 64.0, 66.0, 68.0]
    finished_run(tmp_path, "1", seed=2, top1=67.0, epochs=curve(5, val=val2, train=[70.0] * 5))
    runs = collect_runs(tmp_path)
    return run_dynamics(runs, collect_epochs(runs)).set_index("seed"), times


def test_run_dynamics(tmp_path):
    dyn, times = _dynamics(tmp_path)
    r = dyn.loc[1]
    assert r["best_val_top1"] == 80.0 and r["best_epoch"] == 4
    assert r["convergence_epoch"] == 3  # 79.6 is within 0.5 points of 80
    assert r["generalisation_gap"] == pytest.approx(95.0 - 75.0)
    assert r["overfitting"] == pytest.approx(80.0 - 75.0)
    assert r["epoch_time_mean_s"] == pytest.approx(np.mean(times))
    assert r["epoch_time_std_s"] == pytest.approx(np.std(times, ddof=1))
    assert r["final_val_loss"] == pytest.approx(2.2 / 5)
    r2 = dyn.loc[2]
    assert r2["convergence_epoch"] == 5 and r2["overfitting"] == 0.0
    assert r2["generalisation_gap"] == pytest.approx(2.0)


def test_dynamics_fall_back_to_the_summary_without_a_curve(tmp_path):
    finished_run(tmp_path, "0", seed=1, top1=74.0, epochs=[])
    runs = collect_runs(tmp_path)
    r = run_dynamics(runs, collect_epochs(runs)).iloc[0]
    assert r["best_val_top1"] == 74.0 and r["final_train_top1"] == 90.0
    assert r["generalisation_gap"] == pytest.approx(90.0 - 74.0)
    assert np.isnan(r["convergence_epoch"])


@pytest.mark.slow
def test_dynamics_per_group(peft_study):
    a = analyze_runs(peft_study)
    s = a.dynamics_summary.set_index(["lora.rank", "metric"])
    finals = [85.0 + seed / 10 for seed in PEFT_TOP1[4]]
    assert s.loc[(4, "final_val_top1"), "mean"] == pytest.approx(np.mean(finals))
    assert s.loc[(4, "final_val_top1"), "std"] == pytest.approx(np.std(finals, ddof=1))
    assert s.loc[(4, "convergence_epoch"), "mean"] == 3.0


@pytest.mark.slow
def test_precision_view(precision_studies):
    a = analyze_runs(precision_studies, baseline="precision=fp32")
    view = next(v for v in a.views if v.title.startswith("Precision"))
    t = view.table.set_index(["precision", "augmentation"])
    fp32 = np.mean([100 + s / 1000 for s in (42, 123, 456)])
    fp16 = np.mean([50 + s / 1000 for s in (42, 123, 456)])
    assert t.loc[("fp16", "basic"), "speedup_vs_fp32"] == pytest.approx(fp32 / fp16)
    assert t.loc[("fp32", "extended"), "speedup_vs_fp32"] == pytest.approx(1.0)
    assert t.loc[("fp16", "extended"), "speedup_vs_fp32"] == pytest.approx((fp32 + 5) / (fp16 + 5))
    assert t.loc[("fp16", "basic"), "epoch_time_mean_s"] == pytest.approx(50 / 3)
    assert t.loc[("fp32", "basic"), "cpu_percent_mean"] == 180.0
    for col in (
        "best_val_top1",
        "final_train_top1",
        "overfitting",
        "final_val_loss",
        "time_s",
        "epoch_time_std_s",
        "rss_mb_mean",
    ):
        assert col in t.columns
    text = " ".join(view.highlights)
    assert "shortest mean training time: precision=fp16, augmentation=basic (" in text
    assert "speed-up of precision=fp16, augmentation=basic over fp32: ×2.00" in text
    assert "highest mean accuracy" in text and "smallest mean generalisation gap" in text


@pytest.mark.slow
def test_peft_view(peft_study):
    a = analyze_runs(peft_study)
    view = next(v for v in a.views if v.title.startswith("PEFT"))
    t = view.table.set_index("lora.rank")
    full = np.mean(list(PEFT_TOP1[0].values()))
    for rank in (4, 8, 16):
        acc = np.mean(list(PEFT_TOP1[rank].values()))
        assert t.loc[rank, "trainable"] == 48 * 192 * rank + HEAD
        assert t.loc[rank, "acc_retained_pct"] == pytest.approx(100 * acc / full)
        assert t.loc[rank, "trainable_pct"] == pytest.approx(100 * lora_trainable(rank) / lora_trainable(0))
        share = lora_trainable(rank) / lora_trainable(0)
        assert t.loc[rank, "efficiency_vs_full"] == pytest.approx((acc / full) / share)
    means = {r: np.mean(list(v.values())) for r, v in PEFT_TOP1.items()}
    frontier = {
        r
        for r in means
        if not any(lora_trainable(o) <= lora_trainable(r) and means[o] > means[r] for o in means if o != r)
    }
    assert set(t.index[t["on_frontier"]]) == frontier


@pytest.mark.slow
def test_optimizer_view_paired_test(optimizer_study):
    a = analyze_runs(optimizer_study, metric="test.top1")
    assert a.baseline == {"optimizer": "sgd"}
    view = next(v for v in a.views if v.title.startswith("Optimizer"))
    row = view.comparisons.iloc[0]
    sgd, adamw = [88.0, 89.5, 87.2, 88.8], [90.1, 90.0, 89.9, 91.2]
    assert row["test"] == "paired t"
    assert row["p_value"] == pytest.approx(stats.ttest_rel(adamw, sgd).pvalue)
    assert set(view.table["optimizer"]) == {"sgd", "adamw"}
    assert "optimizer=adamw vs optimizer=sgd" in view.highlights[0]


def test_dynamics_with_validation_every_other_epoch(tmp_path):
    rows = curve(4, val=[1.0, 60.0, 2.0, 70.0])
    for r in rows[0::2]:  # eval_every=2: no validation on odd epochs
        r["val_top1"] = r["val_loss"] = None
    finished_run(tmp_path, "0", seed=1, top1=69.0, epochs=rows)
    runs = collect_runs(tmp_path)
    r = run_dynamics(runs, collect_epochs(runs)).iloc[0]
    assert (r["best_val_top1"], r["best_epoch"], r["convergence_epoch"]) == (70.0, 4, 4)
    assert r["final_val_top1"] == 70.0 and r["final_train_top1"] == 75.0


def test_a_depth_time_runs_best_is_at_its_final_depth(tmp_path):
    """As the trainer chooses best.pt: an epoch before the last growth (depth 2) never is the best, however high."""
    val = [50.0, 97.0, 90.0, 93.0, 92.0]  # epoch 2 is the highest, at depth 2
    epochs = curve(5, val=val, train=[60.0, 90.0, 88.0, 93.0, 94.0])
    for row, depth in zip(epochs, [2, 2, 4, 4, 4]):
        row["depth"] = depth
    finished_run(tmp_path, "0", seed=1, top1=92.0, epochs=epochs)
    runs = collect_runs(tmp_path)
    r = run_dynamics(runs, collect_epochs(runs)).iloc[0]
    assert r["best_val_top1"] == 93.0 and r["best_epoch"] == 4
    assert r["overfitting"] == pytest.approx(93.0 - 92.0)  # the growth is not counted as overfitting
