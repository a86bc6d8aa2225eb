"""Writing files so that a crash or a full disk never leaves a half-written one: the run record's file primitives.

Every whole-file write goes through a temporary file and ``os.replace``, so readers see the old file or the
new one; a write that fails (a full disk, a quota, a read-only mount) removes its temporary file, leaves the
previous file as it was and raises :class:`RecordWriteError` (``reason = "io"``), also where torch reports the
failed write as its own RuntimeError (:func:`serialisation_cause`). A failed append is cut back.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path
from typing import Any

from stackwise_bench.errors import ConfigError

log = logging.getLogger(__name__)


class RecordWriteError(OSError):
    """A file of the run record could not be written; the previous version of the file is left as it was.

    ``reason`` is the run record's ``error.reason``; ``path`` is the file that could not be written.
    It is an OSError, so code that already handles OSError keeps doing so.
    """

    reason = "io"

    def __init__(self, message: str, path: str | os.PathLike, code: int | None = None):
        super().__init__(code, message)
        self.message, self.path = message, Path(path)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # joblib/loky hand a sweep job's exception back by pickle
        return type(self), (self.message, str(self.path), self.errno)


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}


def write_error(path: str | os.PathLike, exc: OSError) -> RecordWriteError:
    """The :class:`RecordWriteError` (one sentence: the file, the OS error, what to do) for ``exc`` writing ``path``."""
    if isinstance(exc, RecordWriteError):
        return exc
    what = exc.strerror or str(exc) or type(exc).__name__
    name = errno.errorcode.get(exc.errno) if exc.errno is not None else None
    cause = f"{what}, {name}" if name else what
    if exc.errno in _NO_SPACE:
        fix = "free space on that disk (or raise its quota)"
    elif exc.errno in _NO_PERMISSION:
        fix = "make that folder writable"
    else:
        fix = "check that disk"
    message = (
        f"{path} could not be written ({cause}); {fix}, or point hydra.run.dir (or hydra.sweep.dir) at another disk."
    )
    return RecordWriteError(message, path, exc.errno)


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:  # the write already failed: say so rather than hide it behind this
        log.warning("could not remove the temporary file %s (%s)", path, exc)


# How torch's zip writer (caffe2's inline_container.cc) words a write it could not finish.
_TORCH_WRITER = ("inline_container.cc", "PytorchStreamWriter")


def serialisation_cause(exc: RuntimeError) -> OSError | None:
    """The OSError behind a RuntimeError that torch raised for a failed write, or None for any other RuntimeError.

    When the file's ``write`` fails (``ENOSPC``), torch's writer goes on and then fails on its own check
    (``[enforce fail at inline_container.cc:...] unexpected pos ...``): the OSError is that RuntimeError's
    context. Without one (torch wrote the file itself), its message is the cause.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(exc).strip()
    if any(mark in text for mark in _TORCH_WRITER):
        return OSError(None, f"torch could not finish writing it: {text.splitlines()[0]}")
    return None


def atomic_write(path: Path, write: Any, mode: str) -> None:
    """Write ``path`` through a temporary file and ``os.replace``: the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise write_error(path, exc) from exc
    except RuntimeError as exc:  # torch.save's zip writer reports a failed write (a full disk) as RuntimeError
        _remove(tmp)
        cause = serialisation_cause(exc)
        if cause is None:
            raise
        raise write_error(path, cause) from exc
    except BaseException:  # Ctrl-C mid-write: the old file stays, and so must no half-written temporary file
        _remove(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a mix.

    Raises:
        RecordWriteError: the write failed (a full disk, ...); ``path`` is as it was and no temporary file is left.
    """
    atomic_write(Path(path), lambda f: f.write(text), "w")


def append_bytes(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path``; a failed append is cut back to where the file ended, never half a line.

    Raises:
        RecordWriteError: the append failed; the file is as it was.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass  # the write error below is the news
            raise write_error(path, exc) from exc
    finally:
        os.close(fd)


def claim_new_dir(base: str | Path, sep: str = "_") -> Path:
    """Create and return the folder ``base``, or the first free ``base<sep>2``, ``base<sep>3``, ...

    Never returns a folder that existed: ``mkdir`` without ``exist_ok`` is the lock, so two processes
    claiming the same name at once get different folders. The parent is created as needed.
    """
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        candidate = base if n == 1 else base.with_name(f"{base.name}{sep}{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1


def check_writable(folder: Path, key: str) -> None:
    """Create ``folder`` as needed and prove it writable with a probe file (``os.access`` lies on NFS and for root)."""
    probe = folder / f".write-probe.{os.getpid()}.{threading.get_ident()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        why = exc.strerror or str(exc)
        for place in (folder, *folder.parents):  # a file where a folder of the path should be
            if place.exists():
                if not place.is_dir():
                    why = f"{place} is a file, not a folder"
                break
        raise ConfigError(
            f"{key}={folder} cannot be written ({why}); point {key} (or hydra.sweep.dir) at a writable folder."
        ) from exc
