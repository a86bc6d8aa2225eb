"""The bottom layer's number checks and the one way sampled numbers are shown (legends, tables, folder names)."""

import math

import pytest

from stackwise_bench.values import is_int, is_number, short_number


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.0018662266976517971, "0.001866"),  # an Optuna-sampled LR: 4 significant digits, not 17
        (3e-05, "3e-05"),
        (2.5e-07, "2.5e-07"),
        (128, "128"),
        (0.5, "0.5"),
        (1.0, "1"),
        (0.1 + 0.2, "0.3"),
        (-0.000123456, "-0.0001235"),
        (True, "True"),  # a bool is no number
        ("adamw", "adamw"),
        (math.inf, "inf"),
    ],
)
def test_short_number(value, shown):
    assert short_number(value) == shown


def test_short_number_round_trips_within_its_digits():
    for value in (0.0018662266976517971, 7.77e-4, 123.456, 9.99999e-3):
        assert math.isclose(float(short_number(value)), value, rel_tol=5e-4)


def test_numbers_are_not_bools():
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_number(2.5) and not is_number(False) and not is_number("1")
    assert not is_number(math.nan, finite=True) and is_number(10**400, finite=True)
