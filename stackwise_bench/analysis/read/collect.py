"""Walk run directories into tidy DataFrames: one row per run, one row per epoch (or logged step).

A run directory is any folder holding a ``summary.json`` (the run record's
source of truth); runs are found at any depth below the folders given, and a
run directory is never searched further (its ``checkpoints/`` can be large).
Runs that failed, were interrupted or are still running are listed with their
status, never dropped: statistics filter on ``status`` later.

Evaluation records (``python -m stackwise_bench.evaluate`` writes them to
``<run>/eval/<name>/summary.json`` with ``kind: evaluate``) are not runs: they are
found next to their runs (:func:`~stackwise_bench.runs.folders.find_eval_dirs`)
and analysed by :mod:`stackwise_bench.analysis.studies.quantization`.

Finding the folders lives in :mod:`stackwise_bench.runs.folders`, one run's
row in :mod:`stackwise_bench.analysis.read.run_row`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from stackwise_bench.analysis.read.run_row import SECTIONS, STUDY_KEYS, config_cell, run_row
from stackwise_bench.errors import ConfigError
from stackwise_bench.runs.contract import FINISHED, HARDWARE, METRICS, PLACEMENT_KEYS, STEPS
from stackwise_bench.runs.folders import PathsLike, as_path_list, find_records

# The adapter of runs whose config has no lora.method (recorded before methods could be chosen).
DEFAULT_LORA_METHOD = "lora"
# Config-group choice columns in this order; any other group sorts after them.
CHOICE_ORDER = (
    "model",
    "dataset",
    "precision",
    "augmentation",
    "optimizer",
    "scheduler",
    "lora",
    "trainer",
    "monitors",
    "experiment",
)


def collect_runs(paths: PathsLike) -> pd.DataFrame:
    """One row per run found below ``paths``: overrides as columns, status, flattened metrics.

    Columns: ``run_dir``, ``status``, ``diverged`` (a NaN/inf loss: listed apart, its status ``failed`` even
    where an older record says ``completed``; :func:`~stackwise_bench.analysis.read.run_row.mark_diverged`), the
    config-group choices (``model``, ``precision``, ...), the dotted override keys (``lora.rank``,
    ``optimizer.lr``, ...; values from the resolved config so runs that did not
    override a key still get its value), ``seed``, then every scalar summary
    value flattened (``test.top1``, ``params.trainable``, ``train.time_s``, ...),
    ``overrides`` (the override strings joined) and ``error.*``.

    Args:
        paths: a run folder, a multirun/study folder, or a list of them.

    Raises:
        ConfigError: when a path does not exist or holds no runs.
    """
    run_dirs, eval_dirs = find_records(paths)
    if not run_dirs:
        shown = ", ".join(str(p) for p in as_path_list(paths))
        if eval_dirs:
            raise ConfigError(
                f"runs={shown} holds evaluation records (eval/) but no training run; point runs= at "
                "the runs they evaluated (the folders that hold eval/): they are analysed together."
            )
        if studies := _evaluated_studies(paths):
            raise ConfigError(
                f"runs={shown} holds evaluations (experiment=FP8Test) whose records live next to the "
                f"runs they evaluated; analyse those: runs={','.join(studies)}."
            )
        raise ConfigError(
            f"runs={shown} holds no run folders (none has a summary.json); "
            "point runs= at the output of a training run or sweep."
        )
    records = [run_row(d) for d in run_dirs]
    choices = _ordered_choices({k for r in records for k in r[1]})
    # One column per key: a group that is a choice in some runs and an override value in others
    # (deleted with ~group) must not become a second column of the same name.
    dotted = sorted({k for r in records for k in r[2]} - {"seed", *choices})
    overridden = {k for r in records for k in r[4]}
    for row, _, _, config, _ in records:
        for key in dotted:  # a key overridden in some runs: the others' value from their config
            if key not in row:
                row[key] = config_cell(config, key)
    df = pd.DataFrame([r[0] for r in records])
    keys = choices + dotted + ["seed"]
    for k in keys:
        if k not in df.columns:
            df[k] = None
        df[k] = _tidy_key_column(df[k])
    _default_lora_method(df)
    front = ["run_dir", "status", "diverged", *keys]
    df = df[front + [c for c in df.columns if c not in front]]
    df.attrs["override_keys"] = keys
    df.attrs["eval_dirs"] = eval_dirs  # found by the same walk: collect_evaluations(df) reads them without another
    # Config values shown for context that no run overrode (optimizer.lr follows optimizer=sgd|adamw).
    df.attrs["derived_keys"] = [k for k in STUDY_KEYS if k in dotted and k not in overridden]
    return df


def _default_lora_method(df: pd.DataFrame) -> None:
    """Runs recorded before ``lora.method`` existed trained plain LoRA: their empty method cell says so.

    Only runs with a ``lora.rank`` (a LoRA config) get it, so one old run does not split a method sweep's
    ``lora`` cells in two (``lora.method=null`` next to ``lora.method=lora``).
    """
    if "lora.method" not in df or "lora.rank" not in df:
        return
    missing = df["lora.method"].isna() & df["lora.rank"].notna()
    if missing.any():
        if not (pd.api.types.is_object_dtype(df["lora.method"]) or pd.api.types.is_string_dtype(df["lora.method"])):
            df["lora.method"] = df["lora.method"].astype(object)  # all null: a float column takes no string
        df.loc[missing, "lora.method"] = DEFAULT_LORA_METHOD


def _evaluated_studies(paths: PathsLike) -> list[str]:
    """The ``evaluate.runs`` folders named by the ``evaluations.json`` of FP8Test-style jobs below ``paths``."""
    studies = set()
    for root in as_path_list(paths):
        for path in Path(root).rglob("evaluations.json"):
            try:
                studies.add(str(json.loads(path.read_text())["runs"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return sorted(studies)


def override_keys(runs: pd.DataFrame) -> list[str]:
    """The columns of ``runs`` that hold config choices and override values (seed included)."""
    keys = runs.attrs.get("override_keys")
    if keys:
        return [k for k in keys if k in runs.columns]
    meta = {"run_dir", "status", "diverged", "overrides"}
    prefixes = tuple(f"{s}." for s in (*SECTIONS, "run", "error", "task"))
    return [c for c in runs.columns if c not in meta and not c.startswith(prefixes)]


def collect_epochs(runs: PathsLike | pd.DataFrame) -> pd.DataFrame:
    """Long per-epoch table from every run's metrics.jsonl, with the run's override columns.

    One row per (run, epoch); a re-logged epoch keeps its last line and a torn
    last line (a run still writing) is skipped.

    Args:
        runs: the DataFrame from :func:`collect_runs`, or paths to collect first.
    """

    def rows_of(run_dir: str) -> list[dict]:
        by_epoch = {r["epoch"]: r for r in read_jsonl(Path(run_dir) / METRICS) if "epoch" in r}
        return [by_epoch[e] for e in sorted(by_epoch)]

    return _long_table(runs, rows_of, "epoch")


def collect_steps(runs: PathsLike | pd.DataFrame) -> pd.DataFrame:
    """Long per-step table from every run's steps.jsonl (step, epoch, loss, lr, grad_norm), with override columns.

    The rows of step 1 and every ``trainer.log_every_n_steps``-th step; a re-logged step keeps its last line.
    Runs recorded before steps.jsonl existed have no rows (the LR schedule then falls back to metrics.jsonl).
    """

    def rows_of(run_dir: str) -> list[dict]:
        by_step = {r["step"]: r for r in read_jsonl(Path(run_dir) / STEPS) if "step" in r}
        return [by_step[s] for s in sorted(by_step)]

    return _long_table(runs, rows_of, "step")


def collect_hardware(runs: PathsLike | pd.DataFrame) -> pd.DataFrame:
    """Long table of hardware.jsonl samples (t, cpu_percent, rss_mb, ...) with override columns."""
    return _long_table(runs, lambda d: [r for r in read_jsonl(Path(d) / HARDWARE) if "t" in r], "t")


def _long_table(runs: PathsLike | pd.DataFrame, rows_of, first: str) -> pd.DataFrame:
    runs = runs if isinstance(runs, pd.DataFrame) else collect_runs(runs)
    keys = ["run_dir", "status", *override_keys(runs)]
    # One DataFrame from all rows at once: 10x faster than a frame per run and a concat.
    rows = [{"run_dir": d, **r} for d in runs["run_dir"] for r in rows_of(d)]
    if not rows:
        return pd.DataFrame(columns=[*keys, first])
    table = runs[keys].merge(pd.DataFrame(rows), on="run_dir", how="inner")
    table.attrs["override_keys"] = override_keys(runs)
    return table


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs whose status is completed or early_stopped: the ones statistics use."""
    return runs[runs["status"].isin(FINISHED)]


def _tidy_key_column(col: pd.Series) -> pd.Series:
    """Whole-number floats (ints mixed with missing values) back to integers: ``lora.rank=8``, not 8.0."""
    if pd.api.types.is_float_dtype(col) and col.isna().any() and col.notna().any():
        values = col.dropna()
        if (values == values.round()).all():
            return col.astype("Int64")
    return col


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file, one per line; a missing file is empty, an unreadable line skipped."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn line from a run that is still writing
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _ordered_choices(keys: set) -> list[str]:
    known = [k for k in CHOICE_ORDER if k in keys]
    return known + sorted(k for k in keys if k not in CHOICE_ORDER)


def drop_duplicate_runs(runs: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, list[dict]]:
    """Finished runs of the same config (fingerprint) and seed count once: the first by folder is kept.

    Two studies that share runs, analysed together (``runs=[a,b]``), or a folder holding a reproducibility
    rerun would otherwise count one seed twice: an n too large, an interval too narrow, a std of 0.

    Returns:
        The runs without the duplicates, and one entry per duplicated (fingerprint, seed): the kept folder,
        the dropped ones, and the largest difference of ``metric`` between them (0.0: they agree).
    """
    key = "run.fingerprint"
    if key not in runs or "seed" not in runs:
        return runs, []
    done = runs["status"].isin(FINISHED) & runs[key].notna() & runs["seed"].notna()
    candidates = runs[done].sort_values("run_dir")
    # a rerun on another number of devices trains the same config (one fingerprint), but a sweep over the devices
    # compares them: each placement is its own cell
    placement = [candidates[k].astype(str) for k in PLACEMENT_KEYS if k in candidates]
    groups = candidates.groupby([candidates[key].astype(str), candidates["seed"].astype(str), *placement], sort=False)
    dropped, found = [], []
    for _, group in groups:
        if len(group) < 2:
            continue
        values = pd.to_numeric(group[metric], errors="coerce") if metric in group else pd.Series(dtype=float)
        spread = float(values.max() - values.min()) if values.notna().any() else float("nan")
        found.append(
            {
                "kept": group["run_dir"].iloc[0],
                "dropped": list(group["run_dir"].iloc[1:]),
                "seed": group["seed"].iloc[0],
                "metric": metric,
                "spread": spread,
            }
        )
        dropped += list(group.index[1:])
    return runs.drop(index=dropped), found


def duplicate_warnings(duplicates: list[dict]) -> list[str]:
    """One line for the runs counted once, and one per duplicate whose copies disagree on the metric."""
    if not duplicates:
        return []
    n = sum(len(d["dropped"]) for d in duplicates)
    out = [
        f"{n} duplicate run(s) (the same config fingerprint and seed as another run) counted once, not as "
        f"extra seeds: {len(duplicates)} config/seed pair(s) ran more than once."
    ]
    for d in duplicates:
        if not (d["spread"] == 0.0):  # NaN (no metric) or a real difference
            what = (
                "cannot be compared" if d["spread"] != d["spread"] else f"differ by {d['spread']:.4g} in {d['metric']}"
            )
            out.append(
                f"the runs of seed {d['seed']} in {d['kept']} and {', '.join(map(str, d['dropped']))} {what}: "
                "the same config and seed should reproduce; the first is used."
            )
    return out
