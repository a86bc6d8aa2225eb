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


def short_number(value, digits: int = 4) -> str:
    """A number as a person reads it: at most ``digits`` significant digits, no trailing zeros, no 17-digit float
    tail (``0.0018662266976517971`` -> ``0.001866``, ``3e-05`` -> ``3e-05``, ``128`` -> ``128``, ``0.5`` -> ``0.5``).

    Integers are shown whole. Used for sampled hyperparameters in legends, tables and job-folder names; two
    values that differ only past ``digits`` print the same, so a caller that needs uniqueness checks for it.
    """
    if not is_number(value):
        return str(value)
    if is_int(value):
        return str(int(value))
    if not math.isfinite(value):
        return str(value)
    text = f"{value:.{digits}g}"
    if "e" in text:  # 1e-05, not 1.000e-05; the exponent without a leading zero stays Python's (1e-05)
        mantissa, exponent = text.split("e")
        if "." in mantissa:
            mantissa = mantissa.rstrip("0").rstrip(".")
        text = f"{mantissa}e{exponent}"
    return text
