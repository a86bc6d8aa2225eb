"""A hyperparameter search (``hparams_search=``, :mod:`stackwise_bench.runs.search`): trials, best, importances.

A study folder holding the search's Optuna storage (``<study>/optuna.db``) is a search: its view lists every
trial (number, params, objective, state, run folder), the best trial with its test metric (``test.top1``, or the
runs' task's; chosen on the objective, a validation metric, in the direction the search recorded; the test value
is only reported), and Optuna's parameter importances (fANOVA) once at
least :data:`MIN_IMPORTANCE_TRIALS` trials are complete. Optuna is imported only when a study has a storage.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from stackwise_bench.analysis.read.directions import task_metrics
from stackwise_bench.analysis.studies.view import StudyView
from stackwise_bench.runs.contract import SEARCH_DB
from stackwise_bench.runs.folders import PathsLike, as_path_list
from stackwise_bench.values import short_number

MIN_IMPORTANCE_TRIALS = 3  # fANOVA fits a forest on the complete trials: fewer than this says nothing
TITLE = "Hyperparameter search"


@dataclass
class SearchView(StudyView):
    """One Optuna study of a search: :class:`StudyView` (title, display table, highlights) plus the raw numbers."""

    trials: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per trial, raw values
    best: dict | None = None  # the best complete trial: number, value, params, run_dir
    importances: dict = field(default_factory=dict)  # param -> fANOVA importance (sums to 1)
    objective: str = ""
    direction: str = "maximize"
    storage: str = ""
    test: str = "test.top1"  # the runs' task's test metric, reported beside each trial


def search_views(paths: PathsLike, runs: pd.DataFrame) -> list[SearchView]:
    """One view per study stored in the ``optuna.db`` of any of ``paths`` (none: not a search)."""
    dbs = [Path(p) / SEARCH_DB for p in as_path_list(paths) if (Path(p) / SEARCH_DB).is_file()]
    if not dbs:
        return []
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    views = []
    for db in dbs:
        url = f"sqlite:///{db.resolve()}"
        try:
            studies = [optuna.load_study(study_name=n, storage=url) for n in optuna.study.get_all_study_names(url)]
        except Exception as exc:  # damaged, or written by a newer Optuna: say so, analyse the runs anyway
            why = (str(exc).strip().splitlines() or [""])[0]
            note = f"{db} could not be read by Optuna {optuna.__version__} ({type(exc).__name__}: {why})"
            views.append(SearchView(title=f"{TITLE} ({db.parent.name})", table=pd.DataFrame(), highlights=[note]))
            continue
        views += [search_view(study, db, runs) for study in studies]
    return views


def search_view(study, db: Path, runs: pd.DataFrame) -> SearchView:
    """The trials table, best trial and importances of one Optuna ``study`` stored in ``db``."""
    objective = study.user_attrs.get("objective", "objective")
    direction = study.direction.name.lower()
    test = f"test.{task_metrics(runs)[0]}"
    trials = trials_table(study, db.parent, runs, direction, test)
    done = trials[trials["state"] == "COMPLETE"]
    best = None
    if len(done):
        row = done.loc[done["objective"].idxmax() if direction == "maximize" else done["objective"].idxmin()]
        params = {k: row[k] for k in param_columns(trials)}
        best = {"trial": int(row["trial"]), "value": float(row["objective"]), "params": params}
        best |= {"run_dir": row["run_dir"], test: row[test]}
        best["ties"] = [int(n) for n in done.loc[done["objective"] == row["objective"], "trial"] if n != row["trial"]]
    importances, note = param_importances(study, len(done), len(param_columns(trials)))
    view = SearchView(
        title=f"{TITLE} ({db.parent.name}: {direction} {objective})",
        table=display_table(trials, objective, test),
        trials=trials,
        best=best,
        importances=importances,
        objective=objective,
        direction=direction,
        storage=str(db),
        test=test,
    )
    view.highlights = highlights(view, note)
    return view


def trials_table(study, study_dir: Path, runs: pd.DataFrame, direction: str, test: str = "test.top1") -> pd.DataFrame:
    """One row per trial: number, state, each param, objective, running best, the ``test`` metric, run folder."""
    tested = {}
    if test in runs:
        tested = {os.path.realpath(d): v for d, v in zip(runs["run_dir"], runs[test])}
    rows = []
    for t in study.trials:
        job = t.user_attrs.get("job")
        run_dir = str(study_dir / job) if job is not None else None
        row = {"trial": t.number, "state": t.state.name}
        row |= {f"param.{k}": v for k, v in t.params.items()}
        row |= {"objective": t.value if t.state.name == "COMPLETE" else math.nan}
        row |= {test: tested.get(os.path.realpath(run_dir), math.nan) if run_dir else math.nan}
        row |= {"outcome": t.user_attrs.get("outcome", ""), "run_dir": run_dir}
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=["trial", "state", "objective", "best so far", test, "outcome", "run_dir"])
    values = table["objective"].astype(float)
    best = values.cummax() if direction == "maximize" else values.cummin()
    table.insert(table.columns.get_loc("objective") + 1, "best so far", best.ffill())
    return table


def param_columns(trials: pd.DataFrame) -> list[str]:
    return [c for c in trials.columns if c.startswith("param.")]


def param_importances(study, n_complete: int, n_params: int) -> tuple[dict, str | None]:
    """Optuna's fANOVA importances (seeded: the same trials give the same numbers), or why there are none."""
    if n_params == 0:
        return {}, "no searched parameter is recorded in the trials"
    if n_complete < MIN_IMPORTANCE_TRIALS:
        return {}, (
            f"parameter importances need at least {MIN_IMPORTANCE_TRIALS} complete trials ({n_complete} so far): "
            "relaunch the search to add trials"
        )
    import optuna

    try:
        found = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
    except (ValueError, RuntimeError) as exc:  # e.g. every complete trial has the same objective
        return {}, f"Optuna could not compute parameter importances ({exc})"
    return {k: float(v) for k, v in found.items()}, None


def display_table(trials: pd.DataFrame, objective: str, test: str = "test.top1") -> pd.DataFrame:
    """The trials for people: params in their significant digits (learning rates), objectives as numbers."""
    out = pd.DataFrame({"trial": trials["trial"].astype(str), "state": trials["state"]})
    for col in param_columns(trials):
        out[col.removeprefix("param.")] = [_value(v) for v in trials[col]]
    out[objective] = trials["objective"]
    out["best so far"] = trials["best so far"]
    out[test] = trials[test]  # each trial's run folder: search_trials.csv
    failed = trials["outcome"].astype(str) != ""
    out.loc[failed, "state"] = out.loc[failed, "state"] + " (" + trials.loc[failed, "outcome"].astype(str) + ")"
    return out


def highlights(v: SearchView, importance_note: str | None) -> list[str]:
    states = v.trials["state"].value_counts() if len(v.trials) else pd.Series(dtype=int)
    counts = ", ".join(f"{n} {s.lower()}" for s, n in states.items()) or "none"
    lines = [
        f"{len(v.trials)} trials ({counts}) in {v.storage}; each trial is scored on {v.objective} ({v.direction})."
    ]
    if v.best is None:
        lines.append("no trial is complete yet: no best trial.")
    else:
        params = ", ".join(f"{k.removeprefix('param.')}={_value(x)}" for k, x in v.best["params"].items())
        lines.append(
            f"best: trial {v.best['trial']}, {v.objective} = {v.best['value']:.2f} ({params}); "
            f"its {v.test} {_number(v.best[v.test])} (chosen on {v.objective}, reported on test)."
        )
        if v.best["ties"]:
            lines.append(
                f"trial(s) {', '.join(map(str, v.best['ties']))} tie with it on {v.objective}: the first is "
                "reported; the validation set cannot tell them apart."
            )
    if v.importances:
        ranked = ", ".join(f"{k} {x:.2f}" for k, x in v.importances.items())
        lines.append(f"parameter importances (Optuna's fANOVA, share of the objective's variance): {ranked}.")
    elif importance_note:
        lines.append(importance_note + ".")
    return lines


def _value(v) -> str:
    """A sampled value in its significant digits (``0.001866``; :func:`~stackwise_bench.values.short_number`)."""
    if isinstance(v, float) and math.isnan(v):
        return "–"
    return short_number(v)


def _number(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"
