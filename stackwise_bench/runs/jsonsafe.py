"""Strict JSON for every file the tool writes: NaN and infinities become null, numpy/torch values plain numbers.

Python's ``json`` writes a float NaN as a bare ``NaN``, which strict readers (``jq``, JavaScript, Go, most
JSON libraries outside Python) reject. A non-finite number is never a result worth keeping as one: a run
that produced it is recorded ``failed`` with ``error.reason: diverged`` (training/trainer.py), so null loses
nothing. Standard library only (the analysis imports it); torch and numpy are handled by their ``tolist``.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf, also numpy's float64) replaced by None, at any depth."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(value) for value in obj]
    return obj


def plain(obj: Any) -> Any:
    """The ``default`` of :func:`dumps`: tensors and numpy values as Python numbers/lists, paths as text."""
    if hasattr(obj, "tolist"):  # torch tensors, numpy arrays and scalars (numpy's float32 is no Python float)
        return finite(obj.tolist())
    return str(obj)  # Path, and anything else: its text rather than a TypeError mid-write


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always writes strict JSON (see the module docstring); ``kwargs`` as json's."""
    return json.dumps(finite(obj), allow_nan=False, default=plain, **kwargs)
