"""The decode-once cache behind ``dataset=imagefolder``: image files -> one uint8 memmap on disk.

An entry of the cache is a folder ``<cache_dir>/<img_size>px-<key>/`` holding

- ``images.npy``: every image, decoded, resized (shorter side) and center-cropped, as uint8 ``[N, 3, S, S]``;
- ``labels.npy``: int64 ``[N]``;
- ``manifest.json``: the key, the format version, the counts and the files that could not be decoded.

The key (:func:`cache_key`) is a sha256 of the format version, the image size and the relative path, size and
mtime of every file, so a changed, added or removed file makes a new entry; an unchanged folder is never decoded
again (later runs and every job of a sweep map the same file). An entry is built in a temporary folder next to it
and renamed into place with ``os.replace``: readers see a whole entry or none. Two processes that build the same
entry at once (the first jobs of a sweep) are serialised by a lock file where the file system has ``flock``; where
it has not, both build and the second rename fails harmlessly (the first entry stays, the second is removed).

An entry whose files are missing, truncated, garbage or another version's is set aside with a warning naming the
file, and rebuilt (:mod:`stackwise_bench.data.cache_files`). A build records its host and pid in ``owner.json``;
the next build removes the ``.build-*`` folders of builders on this host that are no longer running (killed
mid-way), and leaves those of live processes and of other hosts alone.

Entries of superseded keys are left in place (another run may still map them); deleting ``cache_dir`` while no run
uses it is always safe.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stackwise_bench.data.cache_files import (
    MANIFEST,
    check_entry,
    discard,
    fsync,
    make_dir,
    publish,
    remove_dead_builds,
    write_owner,
)
from stackwise_bench.data.cache_files import lock as cache_lock
from stackwise_bench.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the pixels a file decodes to change (decoder options, resize, crop)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # compared lower-cased
BLOCK = 4096  # files decoded per round of the thread pool (bounds the futures held at once, paces the log)


def decode_file(path: str | os.PathLike, size: int):
    """One image file -> uint8 ``[3, size, size]``: RGB (grey replicated, alpha dropped, EXIF orientation applied),
    the shorter side resized to ``size`` (bilinear, antialiased), then the center ``size`` x ``size`` crop.

    Raises whatever torchvision raises for a file it cannot read or decode (RuntimeError).
    """
    import torch
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as TF

    img = decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    if img.dtype != torch.uint8:  # 16-bit PNGs decode to uint16
        img = TF.to_dtype(img, torch.uint8, scale=True)
    img = TF.resize(img, [int(size)], antialias=True)
    return TF.center_crop(img, [int(size), int(size)])


def cache_key(root: Path, rel_paths: Sequence[str], size: int) -> str:
    """sha256 of the format version, ``size`` and (relative path, bytes, mtime_ns) of every file, in order."""
    digest = hashlib.sha256(f"stackwise-imagefolder v{FORMAT_VERSION} size={int(size)}\n".encode())
    for rel in rel_paths:
        try:
            st = os.stat(root / rel)
        except OSError as exc:  # removed (or its folder made unreadable) since the scan
            raise ConfigError(
                f"{root / rel} cannot be read any more ({exc.strerror or exc}): the image folder changed while it was "
                "being read; run again once nothing writes to it."
            ) from exc
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass
class CacheEntry:
    """An opened entry: ``images`` is a copy-on-write memmap (writes never reach the file), ``labels`` in RAM."""

    path: Path
    images: np.ndarray
    labels: np.ndarray
    manifest: dict
    built: bool  # this call decoded the files (False: an existing entry was opened)

    @property
    def bad(self) -> list[dict]:
        """``{"index", "path", "error"}`` of every file that could not be decoded (its row is zeros)."""
        return list(self.manifest.get("bad", []))


def open_or_build(
    cache_dir: Path,
    cache_dir_setting: str,
    root: Path,
    rel_paths: Sequence[str],
    labels: np.ndarray,
    size: int,
    workers: int,
    key: str | None = None,
) -> CacheEntry:
    """The entry for these files at ``size``: opened if it exists, else built (once, even across processes).

    ``cache_dir_setting`` is how ``dataset.cache_dir`` was given (``null`` or the path), for the refusals.
    """
    key = key or cache_key(root, rel_paths, size)
    entry = cache_dir / f"{int(size)}px-{key[:24]}"
    lock = cache_dir / f".{entry.name}.lock"
    labels = np.asarray(labels, dtype=np.int64)
    found = _open(entry, key, labels, size)
    if found is None:
        make_dir(cache_dir, cache_dir_setting, "the decoded images")
        with cache_lock(lock, "image cache"):
            found = _open(entry, key, labels, size)  # built by another process while this one waited
            if found is None:
                _build(entry, key, root, rel_paths, labels, size, workers, cache_dir_setting)
                found = _open(entry, key, labels, size)
                if found is None:
                    raise RuntimeError(f"the image cache {entry} was built but cannot be opened")
                found.built = True
    if found.bad and not found.built:
        _retry_bad(found, root, size, lock)
    return found


def _retry_bad(entry: CacheEntry, root: Path, size: int, lock: Path) -> None:
    """Decode again the files that failed when ``entry`` was built; cache those that decode now.

    A file's key is its size and mtime, which a fixed permission (chmod) or a flaky network mount does not change:
    without this, such a file would stay "could not be decoded" until it is touched. Recovered rows go into the
    mapping at once (copy-on-write, so this process sees them even where the cache is read-only) and into the
    file and manifest where they can be written (rows of undecodable files are used by no reader).
    """
    recovered = {}
    for bad in entry.bad:
        try:
            recovered[bad["index"]] = decode_file(root / bad["path"], size).numpy()
        except Exception:  # still bad
            continue
    if not recovered:
        return
    for i, pixels in recovered.items():
        entry.images[i] = pixels
    entry.manifest["bad"] = [b for b in entry.bad if b["index"] not in recovered]
    log.info("%d file(s) that could not be decoded when the cache was built decode now", len(recovered))
    from stackwise_bench.runs.files import atomic_write_text

    try:
        with cache_lock(lock, "image cache"):
            rows = np.load(entry.path / "images.npy", mmap_mode="r+")
            for i, pixels in recovered.items():
                rows[i] = pixels
            rows.flush()
            del rows
            current = json.loads((entry.path / MANIFEST).read_text())
            if not isinstance(current, dict):  # replaced since it was opened: left to the next run's check
                raise ValueError(f"{MANIFEST} is not a cache manifest")
            current["bad"] = [b for b in current.get("bad", []) if b["index"] not in recovered]
            atomic_write_text(entry.path / MANIFEST, json.dumps(current, indent=1) + "\n")
    except (OSError, ValueError) as exc:  # a read-only cache: the next run tries them again
        log.info("could not update the image cache %s (%s): the recovered files stay in this run only", entry.path, exc)


def _open(entry: Path, key: str, labels: np.ndarray, size: int) -> CacheEntry | None:
    """The entry at ``entry`` if it is complete and for these files; None if there is none. A damaged entry (only a
    hand-edited, half-copied or foreign one can be: entries appear by rename) is moved aside, so that it is rebuilt."""
    if not os.path.lexists(entry):
        return None
    found = check_entry(entry, key, labels, size, FORMAT_VERSION)
    if not isinstance(found, str):
        manifest, images, cached = found
        return CacheEntry(entry, images, cached, manifest, built=False)
    log.warning("the image cache %s is damaged (%s): moving it aside and rebuilding it", entry, found)
    aside = entry.with_name(f".damaged-{entry.name}-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(OSError):
        os.replace(entry, aside)
        discard(aside)
    return None


def _build(
    entry: Path,
    key: str,
    root: Path,
    rel_paths: Sequence[str],
    labels: np.ndarray,
    size: int,
    workers: int,
    setting: str,
) -> None:
    """Decode every file into a temporary folder beside ``entry``, then rename it into place."""
    n = len(rel_paths)
    remove_dead_builds(entry.parent)
    tmp = entry.with_name(f".build-{entry.name}-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    started = time.perf_counter()
    try:
        write_owner(tmp)
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
        _reserve(tmp / "images.npy", n, size, entry.parent, setting)
        log.info("decoding %d images from %s into the cache %s (%d threads)", n, root, entry, workers)
        bad = _decode_all([root / rel for rel in rel_paths], size, images, workers)
        images.flush()
        del images
        np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
        seconds = time.perf_counter() - started
        manifest = {
            "format": FORMAT_VERSION,
            "key": key,
            "root": str(root),
            "img_size": int(size),
            "num_images": n,
            "bad": [{"index": i, "path": rel_paths[i], "error": why} for i, why in bad],
            "build_s": round(seconds, 3),
            "workers": workers,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        publish(tmp, entry, manifest, "image cache")
        log.info("cached %d images in %.1f s (%.0f img/s)", n, seconds, n / max(seconds, 1e-9))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise _no_space(entry.parent, setting, n, size) from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _decode_all(paths: list[Path], size: int, out: np.ndarray, workers: int) -> list[tuple[int, str]]:
    """Decode ``paths`` into the rows of ``out`` on ``workers`` threads; (index, reason) of those that failed.

    torchvision's decoders and torch's resize release the GIL, so threads decode in parallel. Torch runs one
    intra-op thread meanwhile (the threads are the parallelism; nested pools would oversubscribe the cores).
    """
    import torch

    def one(i: int) -> tuple[int, str] | None:
        try:
            out[i] = decode_file(paths[i], size).numpy()
        except Exception as exc:  # a corrupt, truncated, unsupported or unreadable file
            return i, _reason(exc)
        return None

    # torchvision 0.29 deprecates its decoders for TorchCodec's (not a dependency here), once per call: say it once.
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
    bad: list[tuple[int, str]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started, reported = time.perf_counter(), 0.0
    try:
        with ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="imagefolder-decode") as pool:
            for start in range(0, len(paths), BLOCK):
                bad += [r for r in pool.map(one, range(start, min(start + BLOCK, len(paths)))) if r is not None]
                elapsed = time.perf_counter() - started
                done = min(start + BLOCK, len(paths))
                if elapsed - reported > 30 and done < len(paths):
                    reported = elapsed
                    log.info("decoded %d / %d images (%.0f img/s)", done, len(paths), done / elapsed)
    finally:
        torch.set_num_threads(threads)
    return sorted(bad)


def _reason(exc: Exception) -> str:
    """The first sentence of torchvision's message, without its C++ source location:
    ``decode_png, .../decode_png.cpp:62, Internal error.`` -> ``Internal error.``"""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\w+, \S+:\d+, ", "", text)
    return re.split(r"(?<=\.) ", text, maxsplit=1)[0][:200]  # its first sentence


def _reserve(path: Path, n: int, size: int, cache_dir: Path, setting: str) -> None:
    """Allocate the images file's blocks now: a full disk is then one error here, not a SIGBUS mid-build."""
    nbytes = int(n) * 3 * int(size) ** 2
    if not hasattr(os, "posix_fallocate") or nbytes == 0:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise _no_space(cache_dir, setting, n, size) from exc
        # EOPNOTSUPP/EINVAL: a file system without fallocate (some network mounts); write as we go
    finally:
        os.close(fd)


def _no_space(cache_dir: Path, setting: str, n: int, size: int) -> ConfigError:
    need = n * 3 * size**2 / 1e9
    try:
        free = f"{shutil.disk_usage(cache_dir).free / 1e9:.1f} GB free"
    except OSError:
        free = "too little space"
    return ConfigError(
        f"dataset.cache_dir={setting}: the cache of {n} images at {size} px needs {need:.1f} GB and {cache_dir} "
        f"has {free}; free space there or point dataset.cache_dir at a bigger disk."
    )


# ------------------------------------------------------------------------ derived files inside an entry


def read_json(path: Path) -> dict | None:
    """A small JSON file the cache derived earlier (statistics of a split), or None."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def write_json(path: Path, content: dict) -> None:
    """Best effort: a read-only cache (built by someone else) just recomputes next time."""
    from stackwise_bench.runs.files import atomic_write_text

    with contextlib.suppress(OSError):
        atomic_write_text(path, json.dumps(content) + "\n")


def gather_to_disk(images: np.ndarray, idx: np.ndarray, path: Path) -> np.ndarray | None:
    """``images[idx]`` written to ``path`` (once; atomically) and mapped copy-on-write: a subset larger than RAM.

    None when it cannot be written (a read-only cache): the caller gathers into RAM instead.
    """
    shape = (len(idx), *images.shape[1:])
    with contextlib.suppress(OSError, ValueError, EOFError):  # none yet, or a damaged one: written again
        found = np.load(path, mmap_mode="c", allow_pickle=False)
        if isinstance(found, np.ndarray) and found.shape == shape and found.dtype == images.dtype:
            return found
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(exist_ok=True)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=images.dtype, shape=shape)
        rows = max(1, (64 << 20) // max(1, int(np.prod(shape[1:]))))  # ~64 MB per copy
        for start in range(0, len(idx), rows):
            out[start : start + rows] = images[idx[start : start + rows]]
        out.flush()
        del out
        fsync(tmp)
        os.replace(tmp, path)  # a concurrent writer's identical file may be replaced: harmless
    except OSError as exc:
        log.warning("could not write %s (%s): gathering the subset in memory", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return None
    return np.load(path, mmap_mode="c")
