"""RunRecord: the one module that writes a run directory, and its never-overwrite policy.

Layout (:mod:`stackwise_bench.runs.contract`): ``summary.json`` (atomic, carries the
status from start to end), ``metrics.jsonl``, ``hardware.jsonl``, ``split.json`` and
``checkpoints/{last,best}.pt``. Every whole-file write goes through a temporary file
and ``os.replace``, so a crash never leaves a half-written summary or checkpoint behind.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import traceback
from pathlib import Path
from typing import Any

from stackwise_bench.errors import ConfigError
from stackwise_bench.runs.contract import (
    CHECKPOINTS,
    FINISHED,
    HARDWARE,
    METRICS,
    SCHEMA_VERSION,
    SPLIT,
    STATUSES,
    SUMMARY,
    read_summary,
)
from stackwise_bench.runs.provenance import config_diff

log = logging.getLogger(__name__)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def same_run(summary: dict, config: dict, fingerprint: str) -> bool:
    """Whether a recorded run trains what ``config`` trains.

    Equal fingerprints say so at once. They also differ when only the code moved (``_target_`` paths)
    or the record predates the current fingerprint, so then the configs' values decide.
    """
    if summary.get("run", {}).get("fingerprint") == fingerprint:
        return True
    return isinstance(summary.get("config"), dict) and not config_diff(summary["config"], config)


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


class RunRecord:
    """Writes one run directory; monitors and the trainer write only through it."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.dir / CHECKPOINTS
        self.summary: dict[str, Any] = read_summary(self.dir) or {}
        self._lock = threading.Lock()

    # ---- the folder policy: never overwrite --------------------------------
    def prepare(self, config: dict, fingerprint: str, may_resume: bool) -> dict | None:
        """Decide what a run of ``config`` may do in this folder, before anything is written.

        Args:
            config: The resolved config of the run about to start.
            fingerprint: Its :func:`~stackwise_bench.runs.provenance.fingerprint`.
            may_resume: ``trainer.resume=true``, or a sweep job (which always continues its own folder).

        Returns:
            The folder's summary when it already holds this run finished (nothing to do), else None:
            the folder is new, or holds an unfinished run of the same config that continues here (its
            earlier attempt is kept in ``previous_attempts``).

        Raises:
            ConfigError: the folder holds a run of a different config, or an unfinished one and
                ``may_resume`` is false.
        """
        old = self.summary
        if not old:
            return None
        if not same_run(old, config, fingerprint):
            diff = config_diff(old.get("config", {}), config)
            raise ConfigError(
                f"hydra.run.dir={self.dir} already holds a run with a different config ({diff}); "
                "choose another hydra.run.dir (or study) instead of overwriting it."
            )
        if old.get("status") in FINISHED:
            log.info("%s is already %s with the same config: nothing to do", self.dir, old["status"])
            return old
        if not may_resume:
            raise ConfigError(
                f"hydra.run.dir={self.dir} already holds a {old.get('status')} run; set trainer.resume=true to "
                "continue it from checkpoints/last.pt, or choose another hydra.run.dir."
            )
        attempt = {k: old.get(k) for k in ("status", "error")}
        attempt["ended_at"] = old.get("run", {}).get("ended_at")
        old.setdefault("previous_attempts", []).append(attempt)
        return None

    def can_resume(self) -> bool:
        """Whether a ``last.pt`` is here to continue from."""
        return self.checkpoint_path("last").is_file()

    # ---- summary.json -------------------------------------------------
    def write_summary(self) -> None:
        with self._lock:
            atomic_write_text(self.dir / SUMMARY, json.dumps(self.summary, indent=2, default=_jsonable) + "\n")

    def update(self, **sections: Any) -> None:
        """Merge top-level sections (``train={...}``) into the summary and write it."""
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(self.summary.get(key), dict):
                self.summary[key].update(value)
            else:
                self.summary[key] = value
        self.write_summary()

    def start(self, **sections: Any) -> None:
        self.summary["schema_version"] = SCHEMA_VERSION
        self.summary["status"] = "running"
        self.summary["error"] = None
        self.update(**sections)

    def finish(self, status: str, **sections: Any) -> None:
        if status not in STATUSES:  # the contract's list is what analysis and sweeps read: no other word gets in
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        self.summary.setdefault("run", {})["ended_at"] = now_iso()
        self.summary["status"] = status
        self.update(**sections)

    def fail(self, exc: BaseException, reason: str | None = None) -> None:
        """Record a failure with its traceback; ``reason`` is a short tag such as ``diverged``."""
        self.summary["error"] = {
            "type": type(exc).__name__,
            "message": str(exc),
            "reason": reason or type(exc).__name__,
            "traceback": "".join(traceback.format_exception(exc)),
        }
        self.finish("failed")

    # ---- append-only logs ---------------------------------------------
    def _append(self, name: str, row: dict) -> None:
        with self._lock, open(self.dir / name, "a") as f:
            f.write(json.dumps(row, default=_jsonable) + "\n")

    def log_epoch(self, row: dict) -> None:
        """Append the epoch's metrics, and beat the summary's heartbeat so a stale `running` run can be told apart."""
        self._append(METRICS, row)
        self.summary.setdefault("run", {})["updated_at"] = now_iso()
        self.summary["progress"] = {"epoch": row.get("epoch"), "step": row.get("step")}
        self.write_summary()

    def log_hardware(self, row: dict) -> None:
        self._append(HARDWARE, row)

    def rewrite_metrics(self, rows: list[dict]) -> None:
        """On resume: the metrics file becomes exactly the checkpoint's history."""
        text = "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows)
        with self._lock:
            atomic_write_text(self.dir / METRICS, text)

    def write_split(self, split: dict) -> None:
        atomic_write_text(self.dir / SPLIT, json.dumps(split, default=_jsonable) + "\n")

    # ---- checkpoints ----------------------------------------------------
    def checkpoint_path(self, name: str) -> Path:
        return self.ckpt_dir / f"{name}.pt"

    def save_checkpoint(self, name: str, state: dict) -> None:
        import torch

        self.ckpt_dir.mkdir(exist_ok=True)
        path = self.checkpoint_path(name)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, name: str, map_location: Any = "cpu") -> dict:
        import torch

        return torch.load(self.checkpoint_path(name), map_location=map_location, weights_only=True)


def _jsonable(obj: Any) -> Any:
    """Fallback for json: tensors and numpy scalars become Python numbers/lists."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)
