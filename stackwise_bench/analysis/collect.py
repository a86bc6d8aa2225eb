"""Walk run directories into tidy DataFrames: one row per run, one row per epoch.

A run directory is any folder holding a ``summary.json`` (the run record's
source of truth); runs are found at any depth below the folders given, and a
run directory is never searched further (its ``checkpoints/`` can be large).
Runs that failed, were interrupted or are still running are listed with their
status, never dropped: statistics filter on ``status`` later.

Evaluation records (``python -m stackwise_bench.evaluate`` writes them to
``<run>/eval/<name>/summary.json`` with ``kind: evaluate``) are not runs: they are
found next to their runs (:func:`find_eval_dirs`) and analysed by
:mod:`stackwise_bench.analysis.quantization`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from stackwise_bench.errors import ConfigError

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
HARDWARE = "hardware.jsonl"
FINISHED = ("completed", "early_stopped")
# Top-level summary sections flattened into metric columns (in this order);
# any other dict section the trainer adds later is flattened after them.
SECTIONS = ("train", "test", "params", "resources", "env")
# Lists (per-class accuracy, confusion matrix) stay in summary.json: read them with read_summary.
CHOICE_ORDER = ("model", "dataset", "precision", "augmentation", "optimizer", "scheduler",
                "lora", "trainer", "monitors", "experiment")
# Config values worth a column even when no run overrides them: they define the studies.
STUDY_KEYS = ("lora.rank", "optimizer.lr", "trainer.max_epochs", "trainer.batch_size")
_SKIP_DIRS = {".hydra", "checkpoints", "__pycache__"}
EVAL_DIR = "eval"  # <run>/eval/<name>/: where evaluate writes its records
EVAL_KIND = "evaluate"

PathsLike = str | os.PathLike | Iterable[str | os.PathLike]


def find_run_dirs(paths: PathsLike) -> list[Path]:
    """Every training run at or below ``paths`` (a folder with a summary.json), sorted, without duplicates.

    Evaluation records are not runs, even when ``paths`` points inside a run's ``eval/``.

    Raises:
        ConfigError: when a path does not exist.
    """
    return _find_records(paths)[0]


def find_eval_dirs(paths: PathsLike) -> list[Path]:
    """Every evaluation record at or below ``paths``, including those in the ``eval/`` of the runs found."""
    return _find_records(paths)[1]


def is_eval_record(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is ``<run>/eval/<name>/`` holding an evaluation's summary.json."""
    folder = Path(folder)
    # The folder name is checked first: a summary is read only where evaluate writes its records.
    return folder.parent.name == EVAL_DIR and read_summary(folder).get("kind") == EVAL_KIND


def _find_records(paths: PathsLike) -> tuple[list[Path], list[Path]]:
    """(training run folders, evaluation record folders) at or below ``paths``."""
    runs: dict[str, Path] = {}
    evals: dict[str, Path] = {}
    for root in _as_path_list(paths):
        if not root.exists():
            raise ConfigError(f"runs={root} does not exist; point runs= at a run or multirun folder.")
        for dirpath, dirnames, filenames in os.walk(root):
            if SUMMARY in filenames:
                found = evals if is_eval_record(dirpath) else runs
                found.setdefault(os.path.realpath(dirpath), Path(dirpath))
                if found is runs:
                    for record in _eval_records_of(Path(dirpath)):
                        evals.setdefault(os.path.realpath(record), record)
                dirnames.clear()  # a run dir holds no runs; skip its checkpoints
                continue
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
    return sorted(runs.values(), key=_natural_key), sorted(evals.values(), key=_natural_key)


def _eval_records_of(run_dir: Path) -> list[Path]:
    folder = run_dir / EVAL_DIR
    if not folder.is_dir():
        return []
    return [d for d in folder.iterdir() if (d / SUMMARY).is_file() and is_eval_record(d)]


def read_summary(run_dir: str | os.PathLike) -> dict:
    """The parsed summary.json of one run; ``{}`` when it is missing or unreadable."""
    try:
        with open(Path(run_dir) / SUMMARY) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def collect_runs(paths: PathsLike) -> pd.DataFrame:
    """One row per run found below ``paths``: overrides as columns, status, flattened metrics.

    Columns: ``run_dir``, ``status``, the config-group choices (``model``,
    ``precision``, ...), the dotted override keys (``lora.rank``,
    ``optimizer.lr``, ...; values from the resolved config so runs that did not
    override a key still get its value), ``seed``, then every scalar summary
    value flattened (``test.top1``, ``params.trainable``, ``train.time_s``, ...),
    ``overrides`` (the override strings joined) and ``error.*``.

    Args:
        paths: a run folder, a multirun/study folder, or a list of them.

    Raises:
        ConfigError: when a path does not exist or holds no runs.
    """
    run_dirs, eval_dirs = _find_records(paths)
    if not run_dirs:
        shown = ", ".join(str(p) for p in _as_path_list(paths))
        if eval_dirs:
            raise ConfigError(f"runs={shown} holds evaluation records (eval/) but no training run; point runs= at "
                              "the runs they evaluated (the folders that hold eval/): they are analysed together.")
        raise ConfigError(f"runs={shown} holds no run folders (none has a summary.json); "
                          "point runs= at the output of a training run or sweep.")
    records = [_run_row(d) for d in run_dirs]
    choices = _ordered_choices({k for r in records for k in r[1]})
    dotted = sorted({k for r in records for k in r[2]} - {"seed"})
    overridden = {k for r in records for k in r[4]}
    for row, _, _, config, _ in records:
        for key in dotted:  # a key overridden in some runs: the others' value from their config
            if key not in row:
                value = _lookup(config, key)
                row[key] = value if _is_scalar(value) else None
    df = pd.DataFrame([r[0] for r in records])
    keys = choices + dotted + ["seed"]
    for k in keys:
        if k not in df.columns:
            df[k] = None
        df[k] = _tidy_key_column(df[k])
    front = ["run_dir", "status", *keys]
    df = df[front + [c for c in df.columns if c not in front]]
    df.attrs["override_keys"] = keys
    # Config values shown for context that no run overrode (optimizer.lr follows optimizer=sgd|adamw).
    df.attrs["derived_keys"] = [k for k in STUDY_KEYS if k in dotted and k not in overridden]
    return df


def override_keys(runs: pd.DataFrame) -> list[str]:
    """The columns of ``runs`` that hold config choices and override values (seed included)."""
    keys = runs.attrs.get("override_keys")
    if keys:
        return [k for k in keys if k in runs.columns]
    meta = {"run_dir", "status", "overrides"}
    prefixes = tuple(f"{s}." for s in (*SECTIONS, "run", "error"))
    return [c for c in runs.columns if c not in meta and not c.startswith(prefixes)]


def collect_epochs(runs: PathsLike | pd.DataFrame) -> pd.DataFrame:
    """Long per-epoch table from every run's metrics.jsonl, with the run's override columns.

    One row per (run, epoch); a re-logged epoch keeps its last line and a torn
    last line (a run still writing) is skipped.

    Args:
        runs: the DataFrame from :func:`collect_runs`, or paths to collect first.
    """
    def rows_of(run_dir: str) -> list[dict]:
        by_epoch = {r["epoch"]: r for r in _read_jsonl(Path(run_dir) / METRICS) if "epoch" in r}
        return [by_epoch[e] for e in sorted(by_epoch)]

    return _long_table(runs, rows_of, "epoch")


def collect_hardware(runs: PathsLike | pd.DataFrame) -> pd.DataFrame:
    """Long table of hardware.jsonl samples (t, cpu_percent, rss_mb, ...) with override columns."""
    return _long_table(runs, lambda d: [r for r in _read_jsonl(Path(d) / HARDWARE) if "t" in r], "t")


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


# ---- one run ---------------------------------------------------------------

def _run_row(run_dir: Path) -> tuple[dict, dict, dict, dict, set]:
    """(flat row, choices, values, resolved config, keys the run overrode) for one run."""
    summary = read_summary(run_dir)
    row: dict[str, Any] = {"run_dir": str(run_dir), "status": summary.get("status") or "unknown"}
    if not summary:
        row["status"] = "unreadable"
        row["error.message"] = "summary.json is missing or not valid JSON"
    run = summary.get("run") or {}
    config = summary.get("config") or {}
    overrides = run.get("overrides")
    choices = run.get("choices")
    if overrides is None or choices is None:
        overrides, choices = _read_hydra(run_dir, overrides, choices)
    choices = {k: v for k, v in (choices or {}).items() if not str(k).startswith("hydra")}
    values = _override_values(overrides or [], choices, config)
    overridden = set(values)
    for key in STUDY_KEYS:
        value = _lookup(config, key)
        if value is not _MISSING and _is_scalar(value):
            values.setdefault(key, value)
    seed = values.pop("seed", config.get("seed"))
    seed = run.get("seed", seed)
    row.update(choices)
    row.update(values)
    row["seed"] = seed
    for section in [*SECTIONS, *sorted(k for k in summary if k not in SECTIONS)]:
        if section not in ("run", "config", "error", "status") and isinstance(summary.get(section), dict):
            _flatten(summary[section], section, row)
    _flatten({k: v for k, v in run.items() if k not in ("seed", "overrides", "choices")}, "run", row)
    row["overrides"] = " ".join(str(o) for o in overrides or [])
    if isinstance(summary.get("error"), dict):
        err = summary["error"]
        row.update({f"error.{k}": err.get(k) for k in ("type", "message", "reason") if k in err})
    return row, choices, values, config, overridden


def _tidy_key_column(col: pd.Series) -> pd.Series:
    """Whole-number floats (ints mixed with missing values) back to integers: ``lora.rank=8``, not 8.0."""
    if pd.api.types.is_float_dtype(col) and col.isna().any() and col.notna().any():
        values = col.dropna()
        if (values == values.round()).all():
            return col.astype("Int64")
    return col


def _override_values(overrides: list[str], choices: dict, config: dict) -> dict:
    """Dotted override keys -> value, typed from the resolved config where it has the key."""
    values = {}
    for item in overrides:
        item = str(item)
        if item.startswith("~") or "=" not in item:
            continue
        key, raw = item.lstrip("+").split("=", 1)
        if key.startswith("hydra.") or key.startswith("hydra/") or key in choices:
            continue
        from_config = _lookup(config, key)
        values[key] = _parse_value(raw) if from_config is _MISSING else from_config
    return {k: (v if _is_scalar(v) else json.dumps(v)) for k, v in values.items()}


def _read_hydra(run_dir: Path, overrides, choices) -> tuple[list, dict]:
    """Fallback for records without run.overrides / run.choices: Hydra's own files."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    hydra_dir = run_dir / ".hydra"
    try:
        if overrides is None and (hydra_dir / "overrides.yaml").exists():
            overrides = yaml.load((hydra_dir / "overrides.yaml").read_text(), Loader=loader)
        if choices is None and (hydra_dir / "hydra.yaml").exists():
            hydra = yaml.load((hydra_dir / "hydra.yaml").read_text(), Loader=loader) or {}
            choices = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices")
    except (OSError, yaml.YAMLError):
        pass
    return list(overrides or []), dict(choices or {})


_MISSING = object()


def _lookup(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _flatten(tree: dict, prefix: str, out: dict) -> None:
    """Scalars of a nested dict into ``out`` as ``prefix.a.b``; lists are left out."""
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            _flatten(value, name, out)
        elif _is_scalar(value):
            out[name] = value


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _parse_value(raw: str) -> Any:
    """Hydra-style typing of an override value: int, float, bool, null, else the string."""
    text = raw.strip().strip("'\"")
    lowered = text.lower()
    if lowered in ("null", "none", "~"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        return value if not (kind is float and math.isnan(value)) else text
    return text


def _read_jsonl(path: Path) -> list[dict]:
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


def _natural_key(path: Path) -> list:
    """Sort job folders 0, 1, 2, ..., 10 rather than 0, 1, 10, 2."""
    parts = []
    for part in path.parts:
        parts.append((0, int(part), "") if part.isdigit() else (1, 0, part))
    return parts


def _as_path_list(paths: PathsLike) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]
