"""What a run folder's ``.lease`` file says: read and checked field by field, described, written whole.

The file is another process's, a user's or another version's, so a reader may find it empty, cut short,
garbage, a folder or a link to nothing. :func:`examine` never raises for such a file and never takes it for
a holder: it says what is wrong with it, in words that fit into a sentence (:mod:`stackwise_bench.runs.lease`
refuses it with them).
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import time
from pathlib import Path

MAX_BYTES = 64 * 1024  # a lease is a few hundred bytes: a bigger file is not one, and is not read whole


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What every lease holds (:func:`stackwise_bench.runs.lease.acquire` writes them all), and what each must be.
FIELDS = {
    "token": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "host": (lambda v: isinstance(v, str) and bool(v), "a host name"),
    "pid": (lambda v: type(v) is int and 0 < v < 2**31, "a process id"),  # pid_t: os.kill overflows past it
    "heartbeat": (_finite, "a time in seconds"),
    "timeout_s": (lambda v: _finite(v) and v > 0, "a positive number of seconds"),
}


def examine(path: Path) -> tuple[dict | None, str | None]:
    """``(lease, None)``; ``(None, None)`` when there is no lease file; ``(None, what is wrong)`` for a file that
    is not a lease (``"it is not JSON"``, ``"its pid 'abc' is not a process id"``)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None, ("it is a link to a file that does not exist" if os.path.lexists(path) else None)
    except OSError as exc:  # a folder in its place, no permission, an I/O error
        return None, f"it cannot be read ({exc.strerror or exc})"
    if len(raw) > MAX_BYTES:
        return None, f"it is larger than {MAX_BYTES // 1024} KiB"
    if not raw.strip():
        return None, "it is empty"
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: "[[[[..."
        return None, "it is not JSON"
    if not isinstance(data, dict):
        return None, f"it holds a JSON {type(data).__name__}, not an object"
    for key, (valid, what) in FIELDS.items():
        if key not in data:
            return None, f"it has no {key}"
        if not valid(data[key]):
            return None, f"its {key} {reprlib.repr(data[key])} is not {what}"
    return data, None


def read(path: Path) -> dict | None:
    """The lease at ``path``; None when there is none, or the file there is not a lease."""
    return examine(path)[0]


def write(path: Path, content: dict) -> None:
    """Write ``content`` to ``path`` and flush it to the disk (a lease is moved into place whole, never rewritten)."""
    with open(path, "w") as f:
        f.write(json.dumps(content))
        f.flush()
        os.fsync(f.fileno())


def describe(holder: dict) -> str:
    """``pid 123 on host gpu7 (since 2026-11-29T01:02:03+00:00, heartbeat 4 s ago)``.

    A ``holder`` that stands for a file that is not a lease (``{"problem": ...}``, from
    :func:`stackwise_bench.runs.lease.live_holder`) is described as one.
    """
    if holder.get("problem"):
        return f"an unreadable lease file: {holder['problem']}; remove it if no process is writing this folder"
    age = time.time() - float(holder["heartbeat"])
    return f"pid {holder['pid']} on host {holder['host']} (since {holder.get('started_at')}, heartbeat {age:.0f} s ago)"
