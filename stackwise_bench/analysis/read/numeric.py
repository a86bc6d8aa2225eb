"""The number checks and means every stage of the analysis shares, written once."""

from __future__ import annotations

from typing import Any

import pandas as pd

from stackwise_bench import values

NAN = float("nan")


is_number = values.is_number  # an int or a float (numpy's too), never a bool: JSON's ``true`` is not the count 1
is_int = values.is_int  # a whole number given as an int (numpy's too), never a bool


def is_missing(value: Any) -> bool:
    """None, NaN or pandas' NA; False for anything ``pd.isna`` cannot judge (a list, a dict)."""
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def mean_of(values: Any) -> float:
    """The mean of the numbers among ``values`` (text and NaN left out); NaN when there are none."""
    x = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    return float(x.mean()) if len(x) else NAN


def max_of(values: Any) -> float:
    """The largest number among ``values``; NaN when there are none."""
    x = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    return float(x.max()) if len(x) else NAN
