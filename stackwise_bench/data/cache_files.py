"""The files of a cache folder (the image cache, the token and BPE caches), written atomically and read back with
suspicion (:mod:`stackwise_bench.data.image_cache`, :mod:`stackwise_bench.data.text.builds`).

Anything in the cache folder may have been hand-edited, half-copied, truncated or written by another version:
:func:`check_entry` says which file is wrong and how, so that the entry is set aside and rebuilt instead of
raising. :func:`remove_dead_builds` removes what builds killed mid-way (``kill -9``, a node lost) left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from stackwise_bench.errors import ConfigError
from stackwise_bench.runs.lease import pid_alive

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
OWNER = "owner.json"  # in a folder being built: the builder's host and pid


def check_entry(entry: Path, key: str, labels: np.ndarray, size: int, version: int) -> tuple | str:
    """``(manifest, images, labels)`` of the entry in ``entry`` (images mapped copy-on-write), or what is wrong
    with it: which file, and how (missing, truncated, garbage, another version's, other files')."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError) as exc:  # missing, unreadable, not JSON (UnicodeDecodeError is a ValueError)
        return f"{MANIFEST} cannot be read: {getattr(exc, 'strerror', None) or exc}"
    n = len(labels)
    if not isinstance(manifest, dict) or manifest.get("format") != version:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        return f"{MANIFEST} is not a version {version} cache manifest (format: {found!r})"
    if manifest.get("key") != key:
        return f"{MANIFEST} is for other files (key {str(manifest.get('key'))[:24]})"
    bad = manifest.get("bad", [])
    if not isinstance(bad, list) or not all(_bad_row(b, n) for b in bad):
        return f"{MANIFEST} lists its undecodable files in an unknown form"
    images = _array(entry / "images.npy", (n, 3, size, size), np.uint8, mmap=True)
    if isinstance(images, str):
        return images
    cached = _array(entry / "labels.npy", (n,), None, mmap=False)
    if isinstance(cached, str):
        return cached
    if not np.array_equal(cached, labels):
        return "labels.npy does not match the class folders"
    return manifest, images, cached.astype(np.int64, copy=False)


def _bad_row(row, n: int) -> bool:
    return (
        isinstance(row, dict)
        and isinstance(row.get("index"), int)
        and 0 <= row["index"] < n
        and isinstance(row.get("path"), str)
        and isinstance(row.get("error"), str)
    )


def _array(path: Path, shape: tuple, dtype, mmap: bool) -> np.ndarray | str:
    """The array in ``path`` (mapped copy-on-write with ``mmap``), or why it is not one of ``shape`` (and ``dtype``)."""
    try:
        arr = np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # missing, truncated, garbage, not .npy
        return f"{path.name} cannot be read: {getattr(exc, 'strerror', None) or str(exc)[:120]}"
    if not isinstance(arr, np.ndarray):  # an .npz archive
        return f"{path.name} is not a single array"
    if arr.shape != shape or (dtype is not None and arr.dtype != dtype) or arr.dtype.kind not in "iu":
        return f"{path.name} holds {arr.dtype} {tuple(arr.shape)}, not {np.dtype(dtype or np.int64)} {shape}"
    return arr


def discard(path: Path) -> None:
    """Remove a folder or file set aside; what cannot be removed stays (the next build tries again)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def remove_dead_builds(cache_dir: Path) -> None:
    """Remove what builds killed before they finished left in ``cache_dir``: ``.build-*`` folders whose builder (its
    ``owner.json``, else the pid in the folder's name) was on this host and is no longer running, and ``.damaged-*``
    entries set aside but not yet removed. A build of a live process, or of another host, is never touched."""
    try:
        names = [e.name for e in os.scandir(cache_dir) if e.name.startswith((".build-", ".damaged-"))]
    except OSError:
        return
    for name in names:
        path = cache_dir / name
        owner = build_owner(path) if name.startswith(".build-") else None
        if owner is not None:
            if owner["host"] != socket.gethostname():
                log.info(
                    "leaving %s: its builder, pid %s on host %s, may still run there", path, owner["pid"], owner["host"]
                )
                continue
            if pid_alive(owner["pid"]):
                continue
            log.info("removing %s, left by a build (pid %s) that ended before it finished", path, owner["pid"])
        elif name.startswith(".build-"):
            continue  # no owner to be found: not one of ours
        discard(path)


def write_owner(build: Path) -> None:
    """Record in the folder ``build`` which process builds it (read by :func:`remove_dead_builds`)."""
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (build / OWNER).write_text(json.dumps(owner) + "\n")


def build_owner(path: Path) -> dict | None:
    """``{"host", "pid"}`` of the build in ``path``: its owner.json, else (killed before writing it, or an older
    version's build) the pid in its name, on this host."""
    try:
        owner = json.loads((path / OWNER).read_text())
        if isinstance(owner, dict) and isinstance(owner.get("pid"), int) and isinstance(owner.get("host"), str):
            return {"host": owner["host"], "pid": owner["pid"]}
    except (OSError, ValueError):
        pass
    named = re.search(r"-(\d+)-\d+-[0-9a-f]{8}$", path.name)
    return {"host": socket.gethostname(), "pid": int(named.group(1))} if named else None


def make_dir(cache_dir: Path, setting: str, holds: str) -> None:
    """Create ``cache_dir`` and prove it writable, or refuse naming ``dataset.cache_dir`` and what it ``holds``."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cache_dir / f".write-probe.{os.getpid()}.{threading.get_ident()}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        where = "" if setting == str(cache_dir) else f" ({cache_dir})"
        raise ConfigError(
            f"dataset.cache_dir={setting}{where} cannot be written ({exc.strerror or exc}); point dataset.cache_dir "
            f"at a writable folder ({holds} are cached there)."
        ) from exc


@contextlib.contextmanager
def lock(path: Path, what: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (``.<entry>.lock``) while the block runs; none where the platform or file
    system has none (concurrent builders are then still safe, only wasteful: the second rename finds the entry and
    drops its copy). ``what`` names the cache in the waiting message."""
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
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, entry: Path, manifest: dict, what: str) -> None:
    """Make the build folder ``tmp`` the cache entry ``entry``: every file synced, the owner file gone, the manifest
    written last (a folder with a manifest is complete), one rename. Where another process published the entry
    first, its copy is kept (``tmp`` is the caller's to remove)."""
    for child in tmp.iterdir():
        if child.name != OWNER:
            fsync(child)
    (tmp / OWNER).unlink()
    with open(tmp / MANIFEST, "w") as f:
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
