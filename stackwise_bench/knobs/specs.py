"""The kinds of valid value a knob can have (:class:`Spec` and its subclasses) and :func:`show` for refusals.

Each spec knows a type and a range or a set of choices, whether null is allowed, and a valid example; its
:meth:`Spec.problem` is the one-sentence refusal for a value outside them. Torch-free and config-free: the tables
that give each key its spec are in :mod:`stackwise_bench.knobs`.
"""

from __future__ import annotations

import abc
import os
import re
from collections.abc import Mapping, Sequence

from stackwise_bench.values import is_int, is_number


def show(value) -> str:
    """A value as one would type it in a Hydra override: ``null``, ``true``, ``[0.9,0.999]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value and value.isprintable() else repr(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value)


# ----------------------------------------------------------------------------------------------- specs


class Spec(abc.ABC):
    """A knob's valid values; :meth:`problem` is the refusal for a value outside them, or None.

    Args:
        example: A valid value as typed on the command line, for the refusal's "use e.g. key=example".
        null: Whether null is valid too.
        note: What the knob's special values mean, shown in parentheses (``0 = off``).
    """

    what = "a valid value"

    def __init__(self, example: str, *, null: bool = False, note: str = "", what: str | None = None):
        self.example, self.null, self.note = example, null, note
        if what is not None:
            self.what = what

    @abc.abstractmethod
    def accepts(self, value) -> bool:
        """Whether ``value`` (never None: :meth:`problem` handles null) is one of the valid values."""

    def problem(self, key: str, value) -> str | None:
        if (value is None and self.null) or (value is not None and self.accepts(value)):
            return None
        what = self.what + (", or null" if self.null else "")
        note = f" ({self.note})" if self.note else ""
        return f"{key}={show(value)} must be {what}{note}; use e.g. {key}={self.example}."


def _bounds(lo, hi, lo_open: bool, hi_open: bool) -> str:
    return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


class Int(Spec):
    """An integer (not a bool, not 4.0) in ``[min, max]``."""

    def __init__(self, example: str, *, min: int | None = None, max: int | None = None, **kw):
        self.min, self.max = min, max
        if min is None and max is None:
            what = "an integer"
        elif max is not None:
            what = f"an integer in {_bounds(min, max, False, False)}"
        else:
            what = {0: "a non-negative integer", 1: "a positive integer"}.get(min, f"an integer >= {min}")
        super().__init__(example, what=kw.pop("what", what), **kw)

    def accepts(self, value) -> bool:
        return is_int(value) and (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class Number(Spec):
    """A finite int or float in an interval; ``lo_open``/``hi_open`` exclude the ends."""

    def __init__(self, example: str, *, lo=None, hi=None, lo_open=False, hi_open=False, **kw):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        if lo is not None and hi is not None:
            what = f"a number in {_bounds(lo, hi, lo_open, hi_open)}"
        elif lo == 0:
            what = "a positive number" if lo_open else "a non-negative number"
        elif lo is not None:
            what = f"a number {'>' if lo_open else '>='} {lo}"
        else:
            what = "a finite number"
        super().__init__(example, what=kw.pop("what", what), **kw)

    def accepts(self, value) -> bool:
        if not is_number(value, finite=True):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)


class Bool(Spec):
    what = "true or false"

    def accepts(self, value) -> bool:
        return isinstance(value, bool)


class Choice(Spec):
    """One of a fixed set of strings (or integers: ``lora.qalora.bits`` is 4 or 8)."""

    def __init__(self, options: Sequence[str | int], example: str, **kw):
        self.options = tuple(options)
        words = [str(o) if o != "" else "'' (empty)" for o in self.options]
        what = "one of " + ", ".join(words) if len(words) > 2 else " or ".join(words)
        super().__init__(example, what=kw.pop("what", what), **kw)

    def accepts(self, value) -> bool:
        return (isinstance(value, str) or is_int(value)) and value in self.options


class Pattern(Spec):
    """A string that matches a regular expression in full."""

    def __init__(self, regex: str, example: str, **kw):
        self.regex = re.compile(regex)
        super().__init__(example, **kw)

    def accepts(self, value) -> bool:
        return isinstance(value, str) and self.regex.fullmatch(value) is not None


class Text(Spec):
    """A non-empty string: a path or a name whose valid values are checked where they are used."""

    what = "a non-empty string"

    def accepts(self, value) -> bool:
        return isinstance(value, str) and value.strip() != ""


class FolderName(Spec):
    """A plain folder name (no path separators); Hydra reads ``study=2024`` as an integer, which is fine."""

    what = "a plain folder name"

    def accepts(self, value) -> bool:
        if is_int(value):
            return True
        return isinstance(value, str) and value.strip() not in ("", ".", "..") and not re.search(r"[/\\]", value)


class File(Text):
    """A path to an existing file (cheap to check here, before the run builds anything); with ``folder`` also a
    folder (a language model's ``save_pretrained`` output)."""

    what = "the path of an existing file"

    def __init__(self, example: str, *, folder: bool = False, **kw):
        self.folder = folder
        if folder:
            kw.setdefault("what", "the path of an existing file or folder")
        super().__init__(example, **kw)

    def accepts(self, value) -> bool:
        if not super().accepts(value):
            return False
        path = os.path.expanduser(value)
        return os.path.isfile(path) or (self.folder and os.path.isdir(path))


class Pair(Spec):
    """Two numbers in an interval, ``[lo, hi]`` with ``lo <= hi`` when ``ordered``."""

    def __init__(self, example: str, item: Number, *, ordered: bool = False, **kw):
        self.item, self.ordered = item, ordered
        super().__init__(example, **kw)

    def accepts(self, value) -> bool:
        return (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(self.item.accepts(v) for v in value)
            and (not self.ordered or value[0] <= value[1])
        )


class ListOf(Spec):
    """A list of values that ``item`` accepts, strictly increasing when ``increasing``, empty when ``empty``."""

    def __init__(self, example: str, item: Spec, *, increasing: bool = False, empty: bool = False, **kw):
        self.item, self.increasing, self.empty = item, increasing, empty
        order = ", strictly increasing" if increasing else ""
        super().__init__(example, what=kw.pop("what", f"a list of values ({item.what} each{order})"), **kw)

    def accepts(self, value) -> bool:
        return (
            isinstance(value, (list, tuple))
            and (self.empty or len(value) > 0)
            and all(self.item.accepts(v) for v in value)
            and (not self.increasing or all(a < b for a, b in zip(value, value[1:])))
        )


class Names(Spec):
    """A module name or a non-empty list of them (whether the model has them is checked when it is built)."""

    what = "a module name or a non-empty list of module names"

    def accepts(self, value) -> bool:
        if isinstance(value, str):
            return value.strip() != ""
        return isinstance(value, (list, tuple)) and len(value) > 0 and all(Text.accepts(self, v) for v in value)
