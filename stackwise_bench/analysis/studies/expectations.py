"""Expected values checked per cell: literature ranges and exact formulas → validation.json.

The YAML file holds a list under ``expectations:`` (or is the list itself)::

    expectations:
      - name: resnet8 on digits reaches the literature range
        where: {model: resnet8, dataset: digits}    # runs it applies to (default: all)
        metric: test.top1
        range: [90, 100]                           # inclusive; null for an open end
        stat: mean                                 # mean (default) | min | max | every
      - name: LoRA trains 48·d·r + head parameters (12 blocks × qkv: r·(d + 3d))
        where: {model: deit_tiny, lora.rank: {gt: 0}}
        metric: params.trainable
        formula: 48 * d * r + head                 # checked on every run of the cell
        vars: {d: 192, head: 192 * 10 + 10}
        tolerance: 0                               # absolute

``where`` values are a value, a list of values, or operators ``{gt, ge, lt,
le, ne, eq, in}``. Formula names are ``vars``, ``r`` (= ``lora.rank``), any
column of the run table (``params.total``) or ``config.<key>`` from the run's
resolved config. Formulas are parsed, never ``eval``'d: numbers, names and
``+ - * / // % **`` only.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stackwise_bench.analysis.read.formatting import markdown_table
from stackwise_bench.analysis.read.grouping import format_value, group_label, iter_groups, same_value
from stackwise_bench.analysis.read.numeric import is_number
from stackwise_bench.analysis.studies.formula import evaluate, parse_formula
from stackwise_bench.errors import ConfigError
from stackwise_bench.runs.contract import FINISHED, read_summary

ALIASES = {"r": "lora.rank", "rank": "lora.rank", "alpha": "lora.alpha"}
_KEYS = {"name", "where", "metric", "range", "stat", "formula", "vars", "tolerance", "rel_tolerance"}
_STATS = {"mean": np.mean, "min": np.min, "max": np.max}
_OPS = {
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
    "ne": lambda a, b: not same_value(a, b),
    "eq": same_value,
    "in": lambda a, b: any(same_value(a, x) for x in b),
}


def load_expectations(path: str | Path) -> list[dict]:
    """Parse and validate an expectations YAML file.

    Raises:
        ConfigError: when the file is missing, not YAML, or an entry is malformed.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"expect={path} does not exist; give the path of an expectations YAML file.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"expect={path} is not valid YAML ({exc.__class__.__name__}); fix the file.") from exc
    entries = data.get("expectations") if isinstance(data, Mapping) else data
    if not isinstance(entries, list):
        raise ConfigError(f"expect={path} must hold a list under 'expectations:'; see the module docstring.")
    for i, e in enumerate(entries):
        if not isinstance(e, Mapping) or "metric" not in e or ("range" in e) == ("formula" in e):
            raise ConfigError(f"expectation #{i + 1} in {path} needs a metric and exactly one of range or formula.")
        unknown = set(e) - _KEYS
        if unknown:
            raise ConfigError(
                f"expectation #{i + 1} in {path} has unknown key {sorted(unknown)[0]!r}; "
                f"allowed: {', '.join(sorted(_KEYS))}."
            )
        if e.get("stat", "mean") not in (*_STATS, "every"):
            raise ConfigError(f"expectation #{i + 1} stat={e['stat']} must be mean, min, max or every.")
        if "formula" in e:
            parse_formula(str(e["formula"]))
    return [dict(e) for e in entries]


def check_expectations(runs: pd.DataFrame, expectations: list[dict], group_by: list[str]) -> list[dict]:
    """One result per (expectation, cell): value, expected, ``passed`` (None = nothing to check)."""
    done = runs[runs["status"].isin(FINISHED)]
    results = []
    for i, e in enumerate(expectations):
        name = e.get("name") or f"expectation {i + 1}"
        metric = e["metric"]
        if metric not in runs.columns:
            raise ConfigError(f"expectation {name!r}: metric {metric} is not a column of these runs.")
        subset = done[_where_mask(done, e.get("where") or {}, name)]
        cells = list(iter_groups(subset, group_by))
        if not cells:
            results.append(
                {
                    "name": name,
                    "metric": metric,
                    "group": None,
                    "passed": None,
                    "detail": "no finished run matches 'where'",
                }
            )
        for values, cell in cells:
            base = {
                "name": name,
                "metric": metric,
                "group": group_label(values, group_by),
                "cell": {k: _plain(v) for k, v in values.items()},
                "n": len(cell),
            }
            check = _check_formula if "formula" in e else _check_range
            results.append({**base, **check(e, cell, metric)})
    return results


def summarize_validation(results: list[dict]) -> dict:
    counts = {
        "passed": sum(r["passed"] is True for r in results),
        "failed": sum(r["passed"] is False for r in results),
        "skipped": sum(r["passed"] is None for r in results),
    }
    return {**counts, "results": results}


def _check_range(e: dict, cell: pd.DataFrame, metric: str) -> dict:
    lo, hi = (list(e["range"]) + [None, None])[:2]
    x = pd.to_numeric(cell[metric], errors="coerce").dropna().to_numpy()
    if not len(x):
        return {
            "check": "range",
            "expected": [lo, hi],
            "value": None,
            "passed": None,
            "detail": f"no value of {metric} in this cell",
        }
    stat = e.get("stat", "mean")
    vals = x if stat == "every" else np.array([_STATS[stat](x)])
    ok = bool(np.all((lo is None or vals >= lo) & (hi is None or vals <= hi)))
    value = [float(v) for v in vals] if stat == "every" else float(vals[0])
    return {
        "check": "range",
        "stat": stat,
        "expected": [lo, hi],
        "value": value,
        "passed": ok,
        "detail": f"{stat} {metric} = {_show(value)} {'within' if ok else 'outside'} [{lo}, {hi}]",
    }


def _check_formula(e: dict, cell: pd.DataFrame, metric: str) -> dict:
    tree = parse_formula(str(e["formula"]))
    tol, rel = float(e.get("tolerance", 0)), float(e.get("rel_tolerance", 0))
    expected, actual, ok = [], [], True
    for _, row in cell.iterrows():
        want = evaluate(tree, _Names(row, e.get("vars") or {}))
        got = pd.to_numeric(row[metric], errors="coerce")
        expected.append(want)
        actual.append(None if pd.isna(got) else float(got))
        ok &= not pd.isna(got) and abs(got - want) <= max(tol, rel * abs(want))
    return {
        "check": "formula",
        "formula": str(e["formula"]),
        "expected": _one(expected),
        "value": _one(actual),
        "passed": bool(ok),
        "detail": f"{metric} = {_show(_one(actual))}, formula gives {_show(_one(expected))}",
    }


class _Names:
    """Resolves formula names: vars (themselves formulas), aliases, run columns, config.*."""

    def __init__(self, row: pd.Series, variables: Mapping):
        self.row, self.vars, self._config = row, dict(variables), None

    def __getitem__(self, name: str) -> float:
        if name in self.vars:
            value = self.vars[name]
            return evaluate(parse_formula(value), self) if isinstance(value, str) else float(value)
        column = ALIASES.get(name, name)
        if column in self.row.index and not pd.isna(self.row[column]):
            return float(self.row[column])
        if name.startswith("config."):
            if self._config is None:
                self._config = (read_summary(self.row["run_dir"]) or {}).get("config") or {}
            node: Any = self._config
            for part in name.split(".")[1:]:
                node = node.get(part) if isinstance(node, Mapping) else None
            if is_number(node):
                return float(node)
        raise ConfigError(
            f"formula name {name!r} is not a var, a run column or a numeric config.<key>; add it under vars:."
        )


def validation_md(v: dict | None) -> str:
    """The report section of :func:`summarize_validation`'s result; empty without expectations."""
    if v is None:
        return ""
    rows = [
        {
            "expectation": r["name"],
            "cell": r.get("group") or "–",
            "result": {True: "pass", False: "FAIL", None: "skipped"}[r["passed"]],
            "detail": r.get("detail", ""),
        }
        for r in v["results"]
    ]
    return (
        f"## Expectations\n\n{v['passed']} passed, {v['failed']} failed, {v['skipped']} skipped "
        "(details in validation.json).\n\n" + markdown_table(pd.DataFrame(rows))
    )


def _where_mask(df: pd.DataFrame, where: Mapping, name: str) -> pd.Series:
    mask = pd.Series(True, index=df.index)
    for key, cond in where.items():
        if key not in df.columns:
            raise ConfigError(f"expectation {name!r}: where key {key} is not a column of these runs.")
        if isinstance(cond, Mapping):
            for op, arg in cond.items():
                if op not in _OPS:
                    raise ConfigError(f"expectation {name!r}: where operator {op} must be one of {', '.join(_OPS)}.")
                mask &= df[key].map(lambda v, f=_OPS[op], a=arg: not pd.isna(v) and bool(f(v, a)))
        elif isinstance(cond, list):
            mask &= df[key].map(lambda v, c=cond: any(same_value(v, x) for x in c))
        else:
            mask &= df[key].map(lambda v, c=cond: same_value(v, c))
    return mask


def _one(values: list):
    """A single value when every run agrees (the usual case within a cell), else the list."""
    distinct = {format_value(v) for v in values}
    return values[0] if len(distinct) == 1 else values


def _show(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return format_value(round(value, 4) if isinstance(value, float) else value)


def _plain(v):
    return v.item() if hasattr(v, "item") else v
