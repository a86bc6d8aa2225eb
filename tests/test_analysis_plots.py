"""What the learning-curve figure draws: visible one-epoch curves, whole-epoch ticks, seed bands with eval_every > 1."""

from __future__ import annotations

import numpy as np
import pytest

from stackwise_bench.analysis import collect_epochs, collect_runs
from stackwise_bench.analysis.plots.curves import learning_curves_figure, lr_schedule_figure

from analysis_helpers import curve, finished_run

PANELS = ("Train top-1 accuracy", "Validation top-1 accuracy", "Validation loss")


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
