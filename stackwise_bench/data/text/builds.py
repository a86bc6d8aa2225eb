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
import errno
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from stackwise_bench.data.cache_files import MANIFEST, OWNER, discard, remove_dead_builds, write_owner
from stackwise_bench.errors import ConfigError

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
    make_dir(entry.parent, setting)
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
        manifest = fill(tmp)
        for child in tmp.iterdir():
            if child.name != OWNER:
                fsync(child)
        (tmp / OWNER).unlink()
        with open(tmp / MANIFEST, "w") as f:  # written last: a folder with a manifest is complete
            f.write(json.dumps(manifest, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, entry)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) and not entry.exists():
                raise
            log.info("another process finished the %s %s first: using its copy", what, entry)
        with contextlib.suppress(OSError):
            fsync(entry.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_dir(cache_dir: Path, setting: str) -> None:
    """Create ``cache_dir`` and prove it writable, or refuse naming ``dataset.cache_dir``."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cache_dir / f".write-probe.{os.getpid()}.{threading.get_ident()}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        where = "" if setting == str(cache_dir) else f" ({cache_dir})"
        raise ConfigError(
            f"dataset.cache_dir={setting}{where} cannot be written ({exc.strerror or exc}); point dataset.cache_dir "
            "at a writable folder (the token ids and trained tokenizers are cached there)."
        ) from exc


@contextlib.contextmanager
def lock(path: Path, what: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` while the block runs; none where the platform or file system has none
    (concurrent builders are then still safe, only wasteful: the second rename finds the entry and drops its copy).

    The image cache holds the same lock (``image_cache._lock``); this one names what it waits for.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building the %s %s: waiting for it", what, path.name[1:-5])
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no locks on this file system
        yield
    finally:
        os.close(fd)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
