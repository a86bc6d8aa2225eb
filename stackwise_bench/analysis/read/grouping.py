"""Which runs belong together: grouping keys, group labels, ``key=value`` selectors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from stackwise_bench.analysis.read.collect import override_keys
from stackwise_bench.analysis.read.numeric import is_missing
from stackwise_bench.analysis.read.run_row import parse_value
from stackwise_bench.errors import ConfigError
from stackwise_bench.runs.contract import PLACE_KEYS, is_volatile
from stackwise_bench.values import short_number

# Keys that never define a group by default: the seed is what we average over, volatile keys
# (runs/contract.py) don't change what is trained, and place keys say where data or weights live.
NON_GROUPING = ("seed", *PLACE_KEYS)
# Labels that only restate other keys (experiment=BaseFP16 is precision=fp16 + augmentation=basic).
LABEL_KEYS = ("experiment",)
LABEL_DIGITS = 6  # significant digits of a float in a cell label (format_value)


def varying_keys(runs: pd.DataFrame) -> list[str]:
    """Override columns whose value differs between runs (seed included)."""
    return [k for k in override_keys(runs) if runs[k].astype(str).nunique() > 1]


def default_group_by(runs: pd.DataFrame) -> list[str]:
    """Every varying override key except the seed and path-like keys.

    A key that only restates the others is dropped: ``experiment`` when the
    other keys already tell the groups apart (so ``precision=fp16`` can be
    matched against ``precision=fp32`` across experiments), and a config value
    no run overrode that follows from another choice (``optimizer.lr`` of
    ``optimizer=sgd``).
    """
    keys = [k for k in varying_keys(runs) if k not in NON_GROUPING and not is_volatile(k) and not k.startswith("hydra")]
    for label in [*runs.attrs.get("derived_keys", []), *LABEL_KEYS]:
        rest = [k for k in keys if k != label]
        if label in keys and rest and _n_groups(runs, rest) == _n_groups(runs, keys):
            keys = rest
    return keys


def check_group_by(runs: pd.DataFrame, group_by: list[str] | None) -> list[str]:
    """``group_by`` validated against the columns (default: :func:`default_group_by`)."""
    if group_by is None:
        return default_group_by(runs)
    missing = [k for k in group_by if k not in runs.columns]
    if missing:
        raise ConfigError(
            f"group_by key {missing[0]!r} is not a column of these runs; choose from {', '.join(override_keys(runs))}."
        )
    return list(group_by)


def group_label(values: Mapping[str, Any] | pd.Series, keys: list[str]) -> str:
    """``"lora.rank=8, precision=fp16"``; ``"all runs"`` when there are no keys."""
    if not keys:
        return "all runs"
    return ", ".join(f"{k}={format_value(values[k])}" for k in keys)


def with_group_labels(df: pd.DataFrame, keys: list[str], column: str = "group") -> pd.DataFrame:
    """A copy of ``df`` with a ``group`` column naming each row's cell."""
    out = df.copy()
    out.attrs["group_keys"] = list(keys)
    if not keys:
        out[column] = "all runs"
        return out
    parts = [k + "=" + out[k].map(format_value) for k in keys]
    label = parts[0]
    for part in parts[1:]:
        label = label + ", " + part
    out[column] = label
    return out


def iter_groups(df: pd.DataFrame, keys: list[str]):
    """Yield ``(values dict, sub-frame)`` per cell, sorted by key values where they sort."""
    if not keys:
        if len(df):
            yield {}, df
        return
    try:
        grouped = list(df.groupby(keys, dropna=False, sort=True))
    except TypeError:  # mixed types in a key column do not sort
        grouped = list(df.groupby(keys, dropna=False, sort=False))
    for values, sub in grouped:
        values = values if isinstance(values, tuple) else (values,)
        yield {k: _none_if_na(v) for k, v in zip(keys, values)}, sub


def parse_selector(spec: str | Mapping | None) -> dict[str, Any]:
    """``"precision=fp32"`` or ``"lora.rank=0,precision=fp32"`` (or a mapping) into a dict."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, Mapping):
        return _flatten_mapping(spec)
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    selector = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"baseline={spec} is not key=value; write e.g. baseline=precision=fp32.")
        selector[key.strip()] = parse_value(raw)
    return selector


def same_value(a: Any, b: Any) -> bool:
    """Equality that lets ``0`` match ``"0"`` and ``fp32`` match ``"fp32"``."""
    if is_missing(a) or is_missing(b):
        return is_missing(a) and is_missing(b)
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a).lower() == str(b).lower()


def format_value(v: Any) -> str:
    """A cell key's value in labels and tables: ``null``, whole floats as integers, other floats to 6 significant
    digits (a search's sampled ``optimizer.lr=0.00186623``, not its 17 digits; cells are grouped by the exact values,
    so two samples alike in 6 digits still are two cells)."""
    if is_missing(v):
        return "null"
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    if isinstance(v, float):
        return short_number(v, LABEL_DIGITS)
    return str(v)


def matching_cells(values: Mapping, candidates: list[Mapping], keys: list[str]) -> list[int]:
    """Indices of the candidate cells that agree with ``values`` on ``keys``.

    A key is ignored where this cell's value never occurs among the candidates
    (experiment=BaseFP16 has no fp32 twin): there it is a label, not a treatment.
    """
    usable = [k for k in keys if any(same_value(values[k], c[k]) for c in candidates)]
    return [i for i, c in enumerate(candidates) if all(same_value(values[k], c[k]) for k in usable)]


def _n_groups(runs: pd.DataFrame, keys: list[str]) -> int:
    return len(runs[keys].astype(str).drop_duplicates())


def _flatten_mapping(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten_mapping(v, name + "."))
        else:
            out[name] = v
    return out


def _none_if_na(v: Any) -> Any:
    return None if is_missing(v) else v


# The parameter count of the model a run was tested with: the tested checkpoint's where the record has it (a
# depth-time run's best.pt may hold a shallower network than it ends with), else the trained model's.
TESTED_PARAMS = ("test.checkpoint_params.total", "params.total")


def tested_params(runs: pd.DataFrame) -> pd.Series:
    """Per run, the parameter count of the model its test metrics come from (NaN where none is recorded)."""
    out = pd.Series(float("nan"), index=runs.index)
    for col in reversed(TESTED_PARAMS):
        if col in runs:
            values = pd.to_numeric(runs[col], errors="coerce")
            out = values.where(values.notna(), out)
    return out


def mixed_params_text(params: pd.Series) -> str:
    """``1,234 (2 runs), 2,345 (1 run)`` when the runs of one cell were tested with models of different sizes;
    ``""`` when they agree (or record no count)."""
    counts = params.dropna().value_counts().sort_index()
    if len(counts) < 2:
        return ""
    return ", ".join(f"{int(v):,} ({n} run{'s' if n != 1 else ''})" for v, n in counts.items())
