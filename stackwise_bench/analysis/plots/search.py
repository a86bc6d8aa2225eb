"""A hyperparameter search's figure: each trial's objective and the running best (the view: ``studies/search.py``)."""

from __future__ import annotations

from pathlib import Path

from stackwise_bench.analysis.plots import drawing


def search_objective(view, path: Path) -> Path | None:
    """Each complete trial's objective (dots, failed trials marked on the axis) and the best so far (a step line)."""
    if view is None or view.trials.empty or view.trials["objective"].notna().sum() == 0:
        return None
    t = view.trials
    done = t[t["state"] == "COMPLETE"]
    fig, axes = drawing.figure(1, 1, width=7)
    ax = axes[0]
    ax.plot(done["trial"], done["objective"], "o", label="trial")
    ax.step(done["trial"], done["best so far"].loc[done.index], where="post", color="C3", label="best so far")
    failed = t[t["state"] != "COMPLETE"]
    if len(failed):
        ax.plot(failed["trial"], [done["objective"].min()] * len(failed), "x", color="grey", label="not complete")
    if view.best is not None:
        ax.annotate(
            f"best: trial {view.best['trial']}",
            (view.best["trial"], view.best["value"]),
            fontsize=8,
            xytext=(4, -12),
            textcoords="offset points",
        )
    drawing.integer_ticks(ax)
    ax.set(xlabel="Trial", ylabel=view.objective)
    ax.legend(fontsize=8, loc="lower right")
    return drawing.save(fig, path, f"Search: {view.objective} per trial ({view.direction}) and the best so far")
