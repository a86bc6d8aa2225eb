"""Per-layer diagnostics of the runs (``diagnostics.jsonl``) as one long table, read without torch.

The trainer's diagnostics (``diagnostics=basic|full``) write one line per logging step, ``kind: step``
(whole-model grad norms, per-layer grad/weight norms and update ratios, activation statistics), and one
``kind: weights`` line with the trained weights' statistics at the end. A run with ``diagnostics=none``
has no file; a run that crashed mid-write has a torn last line, which is skipped.

Metric names follow the trackers' (:func:`stackwise_bench.runs.tracking.by_statistic`): a layer's step
statistics as written (``grad_norm``, ``weight_norm``, ``update_ratio``), activation statistics as
``act_<stat>``, the final weight statistics as ``weight_<stat>`` (``weight_norm``, ``weight_std``, ...; the
``kind`` column tells them from the logging steps'). The per-layer gradient-norm heatmap is
:mod:`stackwise_bench.analysis.plots.layers`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from stackwise_bench.analysis.read.collect import collect_runs, override_keys, read_jsonl
from stackwise_bench.runs.contract import DIAGNOSTICS
from stackwise_bench.runs.folders import PathsLike
from stackwise_bench.runs.tracking import FINAL_WEIGHTS_PREFIX

# The long table's own columns, after the run's run_dir, status and override keys.
COLUMNS = ("kind", "step", "epoch", "layer", "layer_pos", "metric", "value")
# Sections of a row that hold {layer: {statistic: value}}, with the prefix their statistics get.
# The final weights' statistics take the trackers' prefix: their ``norm`` is ``weight_norm``, as on logging steps
# (the file is unchanged, so older folders read the same way; before, the analysis called them ``weights_*``).
LAYER_SECTIONS = {
    "step": (("layers", ""), ("activations", "act_")),
    "weights": (("layers", FINAL_WEIGHTS_PREFIX),),
}
NOT_METRICS = ("kind", "step", "epoch", "layers", "activations")


def collect_diagnostics(runs: PathsLike | pd.DataFrame) -> pd.DataFrame:
    """Long table of every run's diagnostics.jsonl: one row per (run, step, layer, metric).

    Columns: ``run_dir``, ``status``, the override keys (as :func:`~stackwise_bench.analysis.collect_runs`),
    then ``kind`` (``step`` or ``weights``), ``step`` (global optimizer step), ``epoch``, ``layer``
    (``None`` for whole-model values such as ``grad_norm`` and ``nonfinite_steps``), ``layer_pos`` (the
    layer's place in its run's model order, so ``blocks.10`` still sorts after ``blocks.9`` and a grown
    stack's new block lands where it was inserted), ``metric`` and ``value`` (float; booleans as 1.0/0.0).
    Null readings are left out rather than written as 0.

    Args:
        runs: the DataFrame from :func:`~stackwise_bench.analysis.collect_runs`, or paths to collect first.
    """
    runs = runs if isinstance(runs, pd.DataFrame) else collect_runs(runs)
    keys = ["run_dir", "status", *override_keys(runs)]
    # One DataFrame from all runs' tuples, merged once: a frame per run or a dict per value costs seconds.
    records = [record for run_dir in runs["run_dir"] for record in _run_records(run_dir)]
    long = pd.DataFrame.from_records(records, columns=["run_dir", *COLUMNS])
    long["value"] = long["value"].astype(float)
    table = runs[keys].merge(long, on="run_dir", how="inner")
    table.attrs["override_keys"] = override_keys(runs)
    return table


def read_diagnostics(run_dir: str | Path) -> list[dict]:
    """One run's diagnostics rows in file order; a repeated ``(kind, step)`` keeps its last line.

    A resumed run's file holds no repeated steps; an older one trimmed less carefully might, and the
    last line is the one the run continued from.
    """
    by_key: dict = {}
    for row in read_jsonl(Path(run_dir) / DIAGNOSTICS):
        kind = row.get("kind", "step")
        if kind in LAYER_SECTIONS and _number(row.get("step")) is not None:
            by_key[(kind, row["step"])] = row
    return list(by_key.values())


def _run_records(run_dir: str) -> list[tuple]:
    """One tuple per value of one run's rows, in :data:`COLUMNS` order after the run_dir."""
    rows = read_diagnostics(run_dir)
    position = {name: i for i, name in enumerate(merge_orders(_layer_names(r) for r in rows))}
    out = []
    for row in rows:
        head = (run_dir, row.get("kind", "step"), row["step"], row.get("epoch"))
        values = [(None, k, v) for k, v in row.items() if k not in NOT_METRICS]
        for section, prefix in LAYER_SECTIONS[head[1]]:
            for layer, stats in _dict(row.get(section)).items():
                values += [(layer, prefix + k, v) for k, v in _dict(stats).items()]
        for layer, metric, value in values:
            value = _number(value)
            if value is not None:
                out.append((*head, layer, position.get(layer), metric, value))
    return out


def merge_orders(sequences) -> list:
    """One order of names that keeps each sequence's own order.

    The layers of one model arrive in model order in every row; a stack that grows during training
    (regime=depth_time) adds blocks, which go right after the layer that precedes them in their row.
    """
    merged: list = []
    for seq in dict.fromkeys(tuple(s) for s in sequences):  # rows repeat the same layers: merge each once
        previous = None
        for name in seq:
            if name not in merged:
                merged.insert(merged.index(previous) + 1 if previous is not None else 0, name)
            previous = name
    return merged


def layer_order(diagnostics: pd.DataFrame) -> list[str]:
    """The layers of ``diagnostics`` (any number of runs) in model order, first layer first."""
    layers = diagnostics.dropna(subset=["layer"]).drop_duplicates(["run_dir", "layer"])
    layers = layers.sort_values(["run_dir", "layer_pos"], kind="stable")
    return merge_orders(part["layer"].tolist() for _, part in layers.groupby("run_dir", sort=False))


def _layer_names(row: dict) -> list[str]:
    names = {}
    for section, _ in LAYER_SECTIONS.get(row.get("kind", "step"), ()):
        names.update(dict.fromkeys(_dict(row.get(section))))
    return list(names)


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _number(value) -> float | None:
    """A reading as a float (booleans 1.0/0.0); None for null and for anything that is not a number."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None
