"""One run's summary.json (and, for older records, its Hydra files) flattened into one table row."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from stackwise_bench.runs.contract import FINISHED, UnreadableSummary, read_summary

# Top-level summary sections flattened into metric columns (in this order);
# any other dict section the trainer adds later is flattened after them.
SECTIONS = ("train", "test", "params", "resources", "env")
# Lists (per-class accuracy, confusion matrix) stay in summary.json: read them with read_summary.
# Lists of names worth a column are the exception: one cell of the names joined ("sw_power_cap, hw_slowdown").
JOINED_LISTS = ("resources.throttle_reasons",)
# Config values worth a column even when no run overrides them: they define the studies.
STUDY_KEYS = ("lora.rank", "lora.method", "optimizer.lr", "trainer.max_epochs", "trainer.batch_size")
# The value of a key (or config group) a run deleted with ``~key``: a treatment of its own, not a missing value.
DELETED = "deleted"
# Config groups chosen as lists of options (``logger=[tensorboard,mlflow]``): a column of their names joined with
# "+", NO_OPTION for none (the group's ``none`` option resolves to an empty mapping).
LIST_GROUPS = ("logger",)
NO_OPTION = "none"
# Besides every ``test.*`` number: what a finished run holds non-finite only when it diverged. Records written
# before runs were checked for it say ``completed`` beside them (python's json reads their bare NaN).
DIVERGENCE_KEYS = ("train.final_train_loss", "train.final_val_loss", "train.best_val_top1")


def run_row(run_dir: Path) -> tuple[dict, dict, dict, dict, set]:
    """(flat row, choices, values, resolved config, keys the run overrode) for one run."""
    try:
        summary, problem = read_summary(run_dir) or {}, "summary.json is missing"
    except UnreadableSummary as exc:  # listed with its reason, so one damaged folder does not hide a study
        summary, problem = {}, str(exc)
    row: dict[str, Any] = {"run_dir": str(run_dir), "status": summary.get("status") or "unknown"}
    if not summary:
        row["status"] = "unreadable"
        row["error.message"] = problem
    run = summary.get("run") or {}
    config = summary.get("config") or {}
    overrides = run.get("overrides")
    choices = run.get("choices")
    if overrides is None or choices is None:
        overrides, choices = _read_hydra(run_dir, overrides, choices)
    choices = {k: v for k, v in (choices or {}).items() if not str(k).startswith("hydra")}
    values = _override_values(overrides or [], choices, config)
    # A fine-tune from a pretraining run's folder (model=bert_* model.checkpoint_path=...): what that run was launched
    # with, as columns of their own (pretrained.regime=depth_time), so its arms are cells and a baseline.
    pretrained = summary.get("pretrained")
    if isinstance(pretrained, dict):
        values.update({f"pretrained.{k}": parse_value(str(v)) for k, v in pretrained.items()})
    overridden = set(values)
    for key in STUDY_KEYS:
        value = lookup(config, key)
        if value is not _MISSING and is_scalar(value):
            values.setdefault(key, value)
    seed = values.pop("seed", config.get("seed"))
    seed = run.get("seed", seed)
    row.update(choices)
    row.update(values)
    row["seed"] = seed
    for section in [*SECTIONS, *sorted(k for k in summary if k not in SECTIONS)]:
        if section not in ("run", "config", "error", "status", "pretrained") and isinstance(summary.get(section), dict):
            _flatten(summary[section], section, row)
    _flatten({k: v for k, v in run.items() if k not in ("seed", "overrides", "choices")}, "run", row)
    for key in JOINED_LISTS:
        names = lookup(summary, key)
        if isinstance(names, list):
            row[key] = ", ".join(str(n) for n in names)
    row["overrides"] = " ".join(str(o) for o in overrides or [])
    if isinstance(summary.get("error"), dict):
        err = summary["error"]
        row.update({f"error.{k}": err.get(k) for k in ("type", "message", "reason") if k in err})
    mark_diverged(row)
    return row, choices, values, config, overridden


def mark_diverged(row: dict) -> None:
    """Set ``row["diverged"]``; a finished run with a non-finite loss or test number becomes ``failed``/diverged.

    Such a run is never averaged into a cell: the statistics use finished runs only.
    """
    row["diverged"] = row.get("error.reason") == "diverged"
    if row["status"] not in FINISHED:
        return
    bad = next((k for k in row if (k in DIVERGENCE_KEYS or k.startswith("test.")) and _non_finite(row[k])), None)
    if bad is not None:
        message = f"recorded {row['status']} with {bad} = {row[bad]}: the run diverged"
        row.update({"status": "failed", "diverged": True, "error.reason": "diverged", "error.message": message})


def _non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _override_values(overrides: list[str], choices: dict, config: dict) -> dict:
    """Override keys -> value, typed from the resolved config where it has the key; deleted keys -> DELETED.

    A deletion is ``~key`` in a single run and ``~key=null`` in a sweep job; deleting a config
    group (``~monitors``) also drops it from the run's choices, so it lands here too.
    """
    values = {}
    for item in overrides:
        item = str(item)
        deleted = item.startswith("~")
        if not deleted and "=" not in item:
            continue
        key, _, raw = item.lstrip("~+").partition("=")
        if key.startswith("hydra.") or key.startswith("hydra/") or key in choices:
            continue
        if deleted:
            values[key] = DELETED
            continue
        from_config = lookup(config, key)
        if raw.strip().startswith("[") and isinstance(from_config, dict):  # logger=[tensorboard,mlflow]
            values[key] = "+".join(n.strip().strip("'\"") for n in raw.strip()[1:-1].split(",") if n.strip())
            values[key] = values[key] or NO_OPTION
            continue
        values[key] = parse_value(raw) if from_config is _MISSING else from_config
    return {k: options_text(k, v) for k, v in values.items()}


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


def lookup(tree: dict, dotted: str) -> Any:
    """The value at ``dotted`` (``a.b.c``) in a nested dict, or the ``_MISSING`` sentinel."""
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
        elif is_scalar(value):
            out[name] = value


def config_cell(config: dict, dotted: str) -> Any:
    """The resolved config's value at ``dotted`` as a table cell (None where the config lacks it)."""
    value = lookup(config, dotted)
    return None if value is _MISSING else options_text(dotted, value)


def options_text(key: str, value: Any) -> Any:
    """A table cell for ``value``; a config group chosen as a list of options (``logger=[tensorboard,mlflow]``
    resolves to ``{"tensorboard": {"_target_": ...}, "mlflow": {...}}``) becomes its names, ``tensorboard+mlflow``,
    and an empty one of :data:`LIST_GROUPS` ``none``; anything else :func:`cell_value`."""
    if isinstance(value, dict):
        if not value and key in LIST_GROUPS:
            return NO_OPTION
        if value and all(isinstance(v, dict) and "_target_" in v for v in value.values()):
            return "+".join(str(k) for k in value)
    return cell_value(value)


def cell_value(value: Any) -> Any:
    """``value`` as one table cell: scalars as they are, a dict or list as its JSON text."""
    return value if is_scalar(value) else json.dumps(value)


def is_scalar(value: Any) -> bool:
    """Whether ``value`` fits in one table cell (None, str, int, float or bool)."""
    return value is None or isinstance(value, (str, int, float, bool))


def parse_value(raw: str) -> Any:
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
