"""What counts as a number in a config value: the one check every knob, record and refusal uses.

A bool is never a number here (YAML's ``true`` is not the count 1), and a float is never an integer (``4.0`` steps
is a typo for 4, said as such). Standard library only: every layer may import it.
"""

from __future__ import annotations

import math
import numbers


def is_int(value) -> bool:
    """An integer (any ``numbers.Integral``), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value, finite: bool = False) -> bool:
    """A real number (any ``numbers.Real``), not a bool; with ``finite``, not NaN or infinite either."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return not finite or isinstance(value, numbers.Integral) or math.isfinite(value)  # isfinite overflows on huge ints
