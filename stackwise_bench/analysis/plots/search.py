"""A hyperparameter search's figure (the view: ``studies/search.py``): each trial's objective and the running best,
then the objective against each searched parameter (Optuna's slice plot), sampled values in their significant
digits (``0.001866``, not ``0.0018662266976517971``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stackwise_bench.analysis.plots import drawing
from stackwise_bench.values import short_number

LOG_SPAN = 10  # a positive parameter spanning more than this factor (a learning rate) gets a log axis


def search_objective(view, path: Path) -> Path | None:
    """Write :func:`search_figure` to ``path``; None without a complete trial."""
    fig = search_figure(view)
    if fig is None:
        return None
    return drawing.save(fig, path, f"Search: {view.objective} per trial ({view.direction}) and the best so far")


def search_figure(view):
    """Panel 1: each complete trial's objective (dots, trials that did not complete marked on the axis) and the
    best so far (a step line). Then one panel per numeric searched parameter: objective against its value."""
    if view is None or view.trials.empty or view.trials["objective"].notna().sum() == 0:
        return None
    t = view.trials
    params = [c for c in t.columns if c.startswith("param.") and pd.to_numeric(t[c], errors="coerce").notna().any()]
    fig, axes = drawing.figure(1, 1 + len(params), width=5.0, height=4.2)
    _per_trial(axes[0], view)
    done = t[t["state"] == "COMPLETE"]
    for ax, col in zip(axes[1:], params):
        _slice(ax, done, col, view)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize=8)
    return fig


def _per_trial(ax, view) -> None:
    t = view.trials
    done = t[t["state"] == "COMPLETE"]
    ax.plot(done["trial"], done["objective"], "o", label="trial")
    ax.step(done["trial"], done["best so far"].loc[done.index], where="post", color="C3", label="best so far")
    failed = t[t["state"] != "COMPLETE"]
    if len(failed):
        ax.plot(failed["trial"], [done["objective"].min()] * len(failed), "x", color="grey", label="not complete")
    if view.best is not None:
        ax.plot([view.best["trial"]], [view.best["value"]], "*", color="C3", markersize=14, label="best trial")
    drawing.integer_ticks(ax)
    ax.set(xlabel="Trial", ylabel=view.objective, title="Per trial")


def _slice(ax, done: pd.DataFrame, col: str, view) -> None:
    """The objective of each complete trial against the parameter ``col``; the best trial starred."""
    from matplotlib.ticker import FuncFormatter

    x = pd.to_numeric(done[col], errors="coerce")
    ax.plot(x, done["objective"], "o", color="C0")
    name = col.removeprefix("param.")
    chosen = (view.best or {}).get("params") or {}  # keyed as the trials' columns: param.<name>
    if col in chosen:
        ax.plot([chosen[col]], [view.best["value"]], "*", color="C3", markersize=14)
    positive = x.dropna()
    if len(positive) and (positive > 0).all() and positive.max() > LOG_SPAN * positive.min():
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: short_number(float(v), 3)))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.tick_params(axis="x", labelrotation=30)
    ax.set(xlabel=name, ylabel=view.objective, title=f"Objective vs {name}")
    if np.isfinite(positive).sum() == 1:  # one value: a margin, not a zero-width axis
        v = float(positive.iloc[0])
        ax.set_xlim(v * 0.9, v * 1.1) if v else ax.set_xlim(-1, 1)
