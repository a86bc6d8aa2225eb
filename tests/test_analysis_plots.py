"""What the figures draw, read back from their Figure objects: visible one-epoch curves, whole-epoch ticks, seed bands
with eval_every > 1, the loss panels and the task's metric, the LR per step, hardware averaged on a time grid,
readable single-step heatmaps, sampled values in their significant digits, a style per group."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from stackwise_bench.analysis import collect_epochs, collect_runs
from stackwise_bench.analysis.plots import drawing
from stackwise_bench.analysis.plots.curves import (
    hardware_figure,
    hardware_series,
    hardware_title,
    learning_curves_figure,
    lr_schedule_figure,
)
from stackwise_bench.analysis.plots.layers import grad_norm_figure
from stackwise_bench.analysis.plots.search import search_figure

from analysis_helpers import curve, finished_run

PANELS = ("Train top-1 accuracy", "Validation top-1 accuracy", "Training loss", "Validation loss")


def _figure(root, group_by=("lora.rank",)):
    epochs = collect_epochs(collect_runs(root))
    fig = learning_curves_figure(epochs, list(group_by))
    fig.canvas.draw()  # the limits and ticks the PNG gets
    return fig, {ax.get_title(): ax for ax in fig.axes}


def _visible_ticks(ax) -> list[float]:
    lo, hi = ax.get_xlim()
    return [t for t in ax.get_xticks() if lo <= t <= hi]


def _curves(ax):
    return [line for line in ax.get_lines() if len(line.get_xdata())]


def _bands(ax) -> list[np.ndarray]:
    """Vertices of every filled band (fill_between) of ``ax``."""
    return [p.vertices for c in ax.collections if hasattr(c, "get_paths") for p in c.get_paths() if len(p.vertices)]


def test_one_epoch_runs_draw_visible_points_on_whole_epoch_ticks(tmp_path):
    for rank in (0, 8):
        for seed in (1, 2):
            rows = curve(1, val=[50.0 + rank + seed])
            finished_run(
                tmp_path, f"r{rank}s{seed}", seed=seed, top1=80.0, overrides=[f"lora.rank={rank}"], epochs=rows
            )
    fig, axes = _figure(tmp_path)
    assert set(axes) == set(PANELS)
    for title, ax in axes.items():
        curves = _curves(ax)
        assert len(curves) == 2, title  # one per group
        for line in curves:
            assert line.get_marker() not in (None, "", " ", "None") and line.get_markersize() > 0, title
            assert list(line.get_xdata()) == [1]
        ticks = _visible_ticks(ax)
        assert 1 in ticks and all(float(t).is_integer() for t in ticks), (title, ticks)
    # The seed spread of a single epoch is still drawn: a vertical bar mean ± std at epoch 1.
    val = axes["Validation top-1 accuracy"]
    spans = sorted(np.ptp(v[:, 1]) for v in _bands(val) if np.allclose(v[:, 0], 1))
    assert spans and spans[-1] == pytest.approx(2 * np.std([51.0, 52.0], ddof=1))


def test_lr_schedule_of_one_epoch_is_visible(tmp_path):
    finished_run(tmp_path, "0", seed=1, top1=80.0, epochs=curve(1))
    fig = lr_schedule_figure(collect_epochs(collect_runs(tmp_path)), [])
    fig.canvas.draw()
    ax = fig.axes[0]
    (line,) = _curves(ax)
    assert line.get_marker() not in (None, "", " ", "None")
    assert all(float(t).is_integer() for t in _visible_ticks(ax))


def test_validation_bands_use_the_evaluated_epochs(tmp_path):
    """eval_every=2: val_top1/val_loss are null on odd epochs; mean and band run over epochs 2, 4, 6."""
    vals = {1: [60.0, 70.0, 80.0], 2: [62.0, 74.0, 78.0], 3: [58.0, 69.0, 83.0]}
    for seed, v in vals.items():
        rows = curve(6, val=[0.0, v[0], 0.0, v[1], 0.0, v[2]])
        for r in rows[0::2]:
            r["val_top1"] = r["val_loss"] = None
        finished_run(tmp_path, str(seed), seed=seed, top1=80.0, epochs=rows)
    fig, axes = _figure(tmp_path, group_by=())
    for title in ("Validation top-1 accuracy", "Validation loss"):
        ax = axes[title]
        (line,) = _curves(ax)
        assert list(line.get_xdata()) == [2, 4, 6], title  # one unbroken line through the evaluations
        bands = _bands(ax)
        assert len(bands) == 1, title
        xs, ys = bands[0][:, 0], bands[0][:, 1]
        assert (xs.min(), xs.max()) == (2, 6), title
        assert np.all(np.isfinite(ys)), title
    band = _bands(axes["Validation top-1 accuracy"])[0]
    at4 = band[band[:, 0] == 4][:, 1]
    spread = np.std([v[1] for v in vals.values()], ddof=1)
    assert np.ptp(at4) == pytest.approx(2 * spread)
    train = axes["Train top-1 accuracy"]  # logged every epoch: still every epoch
    assert list(_curves(train)[0].get_xdata()) == [1, 2, 3, 4, 5, 6]


# ---- learning curves: the training loss, and the metric the record names -----------------------------------------
def test_learning_curves_draw_the_training_loss_and_the_tasks_own_metric():
    rows = [
        {"run_dir": f"r{seed}", "status": "completed", "epoch": e, "train_loss": 1.0 / e + seed, "val_loss": 2.0 / e}
        | {"train_mse": 0.5 / e, "val_mse": 0.6 / e + seed}
        for seed in (0, 1)
        for e in (1, 2, 3)
    ]
    epochs = pd.DataFrame(rows)
    fig = learning_curves_figure(epochs, [], metrics=["mse"])
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert set(axes) == {"Train mse", "Validation mse", "Training loss", "Validation loss"}
    (line,) = _curves(axes["Training loss"])
    expected = epochs.groupby("epoch")["train_loss"].mean()
    assert list(line.get_xdata()) == [1, 2, 3]
    np.testing.assert_allclose(line.get_ydata(), expected.to_numpy())
    (line,) = _curves(axes["Validation mse"])
    np.testing.assert_allclose(line.get_ydata(), epochs.groupby("epoch")["val_mse"].mean().to_numpy())
    # Without the task's metric names, top-1 is looked for: a regression run's curves are still its losses.
    assert {ax.get_title() for ax in learning_curves_figure(epochs, []).axes} == {"Training loss", "Validation loss"}


# ---- the learning rate per step ------------------------------------------------------------------------------------
def _warmup_cosine(step: int, warmup: int = 10, total: int = 100, peak: float = 1e-3) -> float:
    if step <= warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_lr_schedule_is_drawn_per_step_and_per_epoch_for_older_runs():
    logged = [1, *range(5, 101, 5)]
    steps = pd.DataFrame(
        [{"run_dir": "new", "status": "completed", "step": s, "lr": _warmup_cosine(s)} for s in logged]
    )
    epochs = pd.DataFrame(
        [{"run_dir": d, "status": "completed", "epoch": e, "lr": 1e-3 / e} for d in ("new", "old") for e in (1, 2)]
    )
    fig = lr_schedule_figure(epochs, [], steps)
    per_step, per_epoch = fig.axes
    (line,) = _curves(per_step)
    assert list(line.get_xdata()) == logged  # step 1 and every 5th: the warmup from its start
    np.testing.assert_allclose(line.get_ydata(), [_warmup_cosine(s) for s in logged])
    assert np.argmax(line.get_ydata()) == logged.index(10)  # the warmup's peak shows, not a straight line
    (line,) = _curves(per_epoch)  # only the run recorded without steps.jsonl
    np.testing.assert_allclose(line.get_ydata(), [1e-3, 5e-4])
    # Only new runs: one panel, per step; only old runs: one panel, per epoch (as before).
    assert len(lr_schedule_figure(epochs[epochs["run_dir"] == "new"], [], steps).axes) == 1
    (ax,) = lr_schedule_figure(epochs, [], steps.iloc[:0]).axes
    assert ax.get_xlabel() == "Epoch"


# ---- hardware: a mean over runs on a common time grid --------------------------------------------------------------
def _hardware(runs: dict[str, tuple[np.ndarray, np.ndarray]], **keys) -> pd.DataFrame:
    rows = []
    for run_dir, (t, rss) in runs.items():
        rows += [{"run_dir": run_dir, "status": "completed", **keys, "t": a, "rss_mb": b} for a, b in zip(t, rss)]
    return pd.DataFrame(rows)


def test_hardware_mean_of_runs_sampled_out_of_phase_is_smooth():
    """Two runs sampled once a second, half a second apart: the mean lies between them and never alternates."""
    t_a, t_b = np.arange(0.0, 23.0), np.arange(0.5, 23.5)
    a, b = 950 + 2 * t_a, 1015 + 2 * t_b
    fig = hardware_figure(_hardware({"a": (t_a, a), "b": (t_b, b)}), [])
    (ax,) = [ax for ax in fig.axes if ax.get_title() == "Resident memory"]
    (line,) = _curves(ax)
    x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    assert np.median(np.diff(x)) == pytest.approx(1.0)  # the grid follows the sampling interval
    run_a, run_b = np.interp(x, t_a, a), np.interp(x, t_b, b)  # each run between its own samples
    both = (x >= 0.5) & (x <= 22.0)
    np.testing.assert_allclose(y[both], (run_a[both] + run_b[both]) / 2)
    assert np.all(y >= np.minimum(run_a, run_b) - 1e-9) and np.all(y <= np.maximum(run_a, run_b) + 1e-9)
    assert np.all(np.diff(y[both]) > 0)  # rising like both runs: no zig-zag between 950 and 1015
    band = _bands(ax)[0]
    at = band[np.isclose(band[:, 0], x[both][3])][:, 1]
    assert np.ptp(at) == pytest.approx(2 * np.std([run_a[both][3], run_b[both][3]], ddof=1))


def test_hardware_keeps_every_run_and_never_extrapolates():
    """Runs of one sample each still show; a run that stopped early leaves the later grid to the others."""
    short = (np.array([0.3]), np.array([700.0]))
    long_a = (np.arange(0.0, 10.0), np.full(10, 900.0))
    data = hardware_series(_hardware({"s": short, "l": long_a}), [])
    s = data[data["run_dir"] == "s"].dropna(subset=["rss_mb"])
    assert len(s) == 1 and s["rss_mb"].item() == 700.0 and s["t_grid"].item() == 0.0
    assert data.loc[data["run_dir"] == "l", "rss_mb"].notna().sum() == 10


@pytest.mark.parametrize(
    ("keys", "title"),
    [
        ([], "Hardware use over time (mean over all runs, band = ±1 std)"),
        (["precision"], "Hardware use over time per precision (mean over its runs, band = ±1 std)"),
        (["model", "precision"], "Hardware use over time per model and precision (mean over its runs, band = ±1 std)"),
    ],
)
def test_hardware_title_reads_for_no_one_and_several_keys(keys, title):
    assert hardware_title(keys) == title


# ---- per-layer gradient norms: one logged step ---------------------------------------------------------------------
def test_grad_norm_heatmap_of_one_logged_step_has_a_readable_axis():
    rows = pd.DataFrame(
        [
            {"run_dir": "r", "status": "completed", "kind": "step", "step": 50, "epoch": 1, "layer": name}
            | {"layer_pos": i, "metric": "grad_norm", "value": 10.0**-i}
            for i, name in enumerate(("stem", "stage1.0", "head"))
        ]
    )
    fig = grad_norm_figure(rows, [])
    fig.canvas.draw()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["50"]
    lo, hi = ax.get_xlim()
    assert lo < 50 < hi
    mesh = ax.collections[0]
    np.testing.assert_allclose(np.asarray(mesh.get_array()).ravel(), [0.0, -1.0, -2.0])  # log10, model order


# ---- sampled values in their significant digits; a look per group ---------------------------------------------------
def test_group_labels_show_sampled_values_in_their_significant_digits():
    df = pd.DataFrame({"optimizer.lr": [0.0018662266976517971, 0.002054762512591136, 0.001], "seed": [1, 2, 3]})
    labels = drawing.labelled(df, ["optimizer.lr"])["group"].tolist()
    assert labels == ["optimizer.lr=0.001866", "optimizer.lr=0.002055", "optimizer.lr=0.001"]
    close = pd.DataFrame({"optimizer.lr": [0.00100001, 0.00100002]})
    assert drawing.labelled(close, ["optimizer.lr"])["group"].nunique() == 2  # more digits rather than one cell


def test_each_group_has_its_own_line_style_and_marker_even_where_lines_coincide():
    epochs = pd.DataFrame(
        [
            {"run_dir": f"r{arm}", "status": "completed", "arm": arm, "epoch": e, "lr": 1.0}
            for arm in "abc"
            for e in (1, 2)
        ]
    )
    fig = lr_schedule_figure(epochs, ["arm"])
    lines = _curves(fig.axes[0])
    assert len(lines) == 3
    looks = {(str(line.get_linestyle()), line.get_marker()) for line in lines}
    assert len(looks) == 3 and all(marker not in (None, "None", "") for _, marker in looks)
    assert all(list(line.get_ydata()) == [1.0, 1.0] for line in lines)


def test_search_figure_shows_sampled_values_readably():
    trials = pd.DataFrame(
        {
            "trial": [0, 1, 2, 3],
            "state": ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"],
            "param.optimizer.lr": [0.0018662266976517971, 0.07780155576901421, 0.00015613372459644638, 0.01],
            "objective": [80.0, 70.0, 50.0, np.nan],
        }
    )
    trials["best so far"] = trials["objective"].cummax().ffill()
    best = {"trial": 0, "value": 80.0, "params": {"param.optimizer.lr": 0.0018662266976517971}}
    view = SimpleNamespace(trials=trials, best=best, objective="val_top1", direction="maximize")
    fig = search_figure(view)
    fig.canvas.draw()
    per_trial, lr = fig.axes
    dots, star = [line for line in lr.get_lines() if len(line.get_xdata())]
    np.testing.assert_allclose(dots.get_xdata(), trials["param.optimizer.lr"][:3])
    np.testing.assert_allclose(dots.get_ydata(), [80.0, 70.0, 50.0])
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (best["params"]["param.optimizer.lr"], 80.0)
    assert lr.get_xscale() == "log"
    labels = [t.get_text() for t in lr.get_xticklabels() if t.get_text()]
    assert labels and all(len(text) <= 6 for text in labels), labels  # 0.001, 0.01: no 17-digit tails


# ---- a rankless method is a level across the rank axis, not a point at the rank it was launched with -----------------
def test_ia3_is_drawn_as_a_level_not_at_rank_1(monkeypatch, tmp_path):
    from stackwise_bench.analysis.plots import figures

    rows = [("lora", 0, 2.37), ("lora", 4, 2.42), ("lora", 16, 2.41), ("ia3", 1, 2.42)]
    summary = pd.DataFrame(
        [
            {"lora.method": m, "lora.rank": r, "metric": "test.loss", "mean": v, "ci95_low": v - 0.01}
            | {"ci95_high": v + 0.01, "std": 0.001, "n": 2}
            for m, r, v in rows
        ]
    )
    drawn = {}
    monkeypatch.setattr(drawing, "save", lambda fig, path, title: drawn.setdefault("fig", fig) and path)
    figures.accuracy_vs_rank(summary, "test.loss", ["lora.method", "lora.rank"], tmp_path / "r.png", lower=True)
    ax = drawn["fig"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0\n(full FT)", "4", "16"]  # no rank 1
    (level,) = [line for line in ax.get_lines() if line.get_label().endswith("(no rank)")]
    assert level.get_label() == "lora.method=ia3 (no rank)" and set(level.get_ydata()) == {2.42}


def test_scaling_ticks_are_levels_when_apart_and_compact_decade_ticks_when_crowded():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from stackwise_bench.analysis.plots.scaling import _plain_log_axes, compact

    assert [compact(v) for v in (8, 23008, 834304, 1.24e8)] == ["8", "23k", "834k", "124M"]
    ranks = Figure().add_subplot()
    ranks.plot([2, 4, 8, 16], [1, 2, 3, 4])
    _plain_log_axes(ranks, np.array([2, 4, 8, 16]))
    assert list(ranks.get_xticks()) == [2, 4, 8, 16]
    ladder = Figure().add_subplot()  # 61,120 and 70,592 would print over each other
    ladder.plot([23008, 61120, 70592, 834304], [1, 2, 3, 4])
    _plain_log_axes(ladder, np.array([23008, 61120, 70592, 834304]))
    ticks = [t for t in ladder.get_xticks() if 23008 <= t <= 834304]
    assert 61120 not in ticks and {5e4, 1e5, 2e5, 5e5} <= set(ticks)
