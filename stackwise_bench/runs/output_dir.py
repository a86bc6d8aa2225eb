"""A single run's output folder: checked before Hydra writes into it, and gone again when the run is refused.

Hydra creates ``hydra.run.dir`` and writes ``.hydra/`` and the job's log into it before the app runs, so a folder
that cannot be written (a read-only or full disk, a file where a folder should be) would end in a Hydra ``OSError``
traceback. :func:`prepare` (``StudyCallback.on_run_start``, before Hydra writes anything) proves the folder
writable, or refuses in one sentence.

A run refused before any work (bad input) leaves nothing behind: :func:`discard` removes the folder, and the
parents it needed, only where :func:`prepare` saw that this process created them. A folder that held anything
before (``hydra.run.dir=<an existing run>``) is never removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from stackwise_bench.errors import ConfigError
from stackwise_bench.runs.contract import CHECKPOINTS, METRICS, STEPS, read_summary
from stackwise_bench.runs.files import check_writable

# The folders this process created for its run: the run folder -> the topmost folder created with it.
_created: dict[Path, Path] = {}


def prepare(folder: str | os.PathLike, key: str = "hydra.run.dir") -> None:
    """Create ``folder`` and prove it writable; remember what was created for :func:`discard`.

    Raises:
        ConfigError: it cannot be created or written (``key`` names the setting to change); nothing is left.
    """
    folder = _absolute(folder)
    top = _first_missing(folder)
    try:
        check_writable(folder, key)
    except ConfigError:
        if top is not None:
            _remove_empty(folder, top)  # a full disk may let the mkdir through and fail the probe
        raise
    if top is not None:
        _created[folder] = top


def check_existing(folder: str | os.PathLike, config) -> None:
    """Refuse, before Hydra rewrites its ``.hydra/`` and log in it, a run folder that this training config may not
    touch (:func:`~stackwise_bench.runs.record.refuse_other_run`; the run checks again under the lease).

    Raises:
        ConfigError: the folder holds another config's run, an unfinished one without ``trainer.resume=true``,
            or run files without a summary.
    """
    folder = _absolute(folder)
    if not folder.is_dir() or "trainer" not in config:  # a new folder, or not a training app
        return
    from omegaconf import OmegaConf

    from stackwise_bench.runs.folder_policy import refuse_other_run
    from stackwise_bench.runs.provenance import fingerprint

    try:
        job = OmegaConf.to_container(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]), resolve=True)
    except Exception:  # an interpolation only the job itself can resolve: the run's own check still follows
        return
    summary = read_summary(folder) or {}
    refuse_other_run(folder, summary, job, fingerprint(job), bool(job["trainer"].get("resume")))


def discard(folder: str | os.PathLike) -> bool:
    """Remove the run folder of a refused run, where this process created it and nothing was trained in it.

    Returns whether it was removed.
    """
    folder = _absolute(folder)
    top = _created.pop(folder, None)
    if top is None or not folder.is_dir():
        return False
    if any((folder / name).exists() for name in (CHECKPOINTS, METRICS, STEPS)):  # work done: not a refusal's leftovers
        return False
    shutil.rmtree(folder, ignore_errors=True)
    _remove_empty(folder.parent, top)
    return True


def _remove_empty(folder: Path, top: Path) -> None:
    """Remove ``folder`` and its parents up to ``top`` while they are empty."""
    for place in (folder, *folder.parents):
        if not place.is_relative_to(top):
            return
        if not place.exists():
            continue
        try:
            place.rmdir()
        except OSError:  # not empty (another run of the day), or gone already
            return


def _first_missing(folder: Path) -> Path | None:
    """The topmost folder of ``folder``'s path that does not exist yet (None: it exists)."""
    missing = None
    for place in (folder, *folder.parents):
        if os.path.lexists(place):
            return missing
        missing = place
    return missing


def _absolute(folder: str | os.PathLike) -> Path:
    return Path(os.path.abspath(folder))  # as Hydra makes hydra.runtime.output_dir (no symlinks resolved)
