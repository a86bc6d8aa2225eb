"""Cache entries built once, atomically, under a lock: the token memmaps and the locally trained BPE files.

An entry is a folder ``<cache_dir>/<name>/`` holding its files and a ``manifest.json`` (written last). It is built
in a ``.build-<name>-<pid>-<thread>-<uuid8>`` folder beside it, which records its builder (``owner.json``), and
renamed into place with ``os.replace``: a reader sees a whole entry or none, and a build that fails or is killed
leaves no entry. Builders of one entry are serialised by an ``flock`` on ``.<name>.lock``; the next build removes
the folders of builds killed mid-way on this host (:mod:`stackwise_bench.data.cache_files`, shared with the
image cache).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from stackwise_bench.data.cache_files import (
    MANIFEST,
    discard,
    lock,
    make_dir,
    publish,
    remove_dead_builds,
    write_owner,
)

log = logging.getLogger(__name__)


def open_or_build(
    entry: Path,
    check: Callable[[Path], dict | str],
    fill: Callable[[Path], dict],
    what: str,
    setting: str,
) -> tuple[dict, bool]:
    """``(manifest, built)`` of the entry at ``entry``: opened if ``check`` accepts it, else built once.

    ``check(folder)`` returns the manifest of a good entry or why it is not one; ``fill(folder)`` writes the files
    into an empty folder and returns the manifest. A damaged entry is set aside (with a warning naming why) and
    rebuilt. ``what`` names the entry in logs; ``setting`` is how the cache folder was configured, for refusals.
    """
    found = _open(entry, check, what)
    if found is not None:
        return found, False
    make_dir(entry.parent, setting, "the token ids and trained tokenizers")
    with lock(entry.parent / f".{entry.name}.lock", what):
        found = _open(entry, check, what)  # built by another process while this one waited
        if found is not None:
            return found, False
        _build(entry, fill, what)
    found = check(entry)
    if isinstance(found, str):
        raise RuntimeError(f"the {what} {entry} was built but cannot be opened: {found}")
    return found, True


def read_manifest(entry: Path, key: str, version: int) -> dict | str:
    """The manifest in ``entry`` if it is one of ``version`` for ``key``, else what is wrong with it."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"{MANIFEST} cannot be read: {getattr(exc, 'strerror', None) or exc}"
    if not isinstance(manifest, dict) or manifest.get("format") != version:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        return f"{MANIFEST} is not a version {version} manifest (format: {found!r})"
    if manifest.get("key") != key:
        return f"{MANIFEST} is for another key ({str(manifest.get('key'))[:24]})"
    return manifest


def _open(entry: Path, check: Callable[[Path], dict | str], what: str) -> dict | None:
    if not os.path.lexists(entry):
        return None
    found = check(entry)
    if not isinstance(found, str):
        return found
    log.warning("the %s %s is damaged (%s): moving it aside and rebuilding it", what, entry, found)
    aside = entry.with_name(f".damaged-{entry.name}-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(OSError):
        os.replace(entry, aside)
        discard(aside)
    return None


def _build(entry: Path, fill: Callable[[Path], dict], what: str) -> None:
    remove_dead_builds(entry.parent)
    tmp = entry.with_name(f".build-{entry.name}-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        write_owner(tmp)
        publish(tmp, entry, fill(tmp), what)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
