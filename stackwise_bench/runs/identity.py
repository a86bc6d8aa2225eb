"""What binds a run folder's files to their run: the stamp in every checkpoint, the recorded split, and the
files of an earlier run in a folder whose summary.json is gone.

:class:`~stackwise_bench.runs.record.RunRecord` stamps each checkpoint with ``run``: the config fingerprint
(:func:`~stackwise_bench.runs.provenance.fingerprint`, summary.json's ``run.fingerprint``), the split's sha256
(split.json's ``sha256``), and the folder and seed of the run. A resume refuses a ``last.pt`` stamped by another
run or trained on another split; a checkpoint written before checkpoints were stamped (no ``run`` key) is trusted
as it always was. Every reader here refuses a damaged file in one sentence that names it and says what to do.
torch is imported by the functions that read a checkpoint, so the torch-free analysis never loads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stackwise_bench.errors import ConfigError, short_error
from stackwise_bench.runs.contract import CHECKPOINTS, DIAGNOSTICS, HARDWARE, METRICS, SPLIT, STEPS

STAMP = "run"  # the checkpoint's key
# What to do about a split.json that cannot be compared (its checkpoint's stamp still carries the split's sha256).
SPLIT_FIX = "restore it, or delete it to resume without comparing the data with the split this run was trained on"


def stamp(run: dict, split_sha256: str | None) -> dict:
    """A checkpoint's ``run`` entry, from summary.json's ``run`` section and the split's sha256."""
    return {
        "fingerprint": run.get("fingerprint"),
        "split_sha256": split_sha256,
        "dir": run.get("dir"),
        "seed": run.get("seed"),
    }


def origin(state: Any) -> dict | None:
    """The stamp of a loaded checkpoint; None when it carries none (written before checkpoints were stamped)."""
    found = state.get(STAMP) if isinstance(state, dict) else None
    return found if isinstance(found, dict) else None


def describe(stamped: dict) -> str:
    """``the run in /runs/x (seed 7, config fingerprint 0123456789abcdef)``."""
    details = [f"{key} {stamped[key]}" for key in ("seed",) if stamped.get(key) is not None]
    if stamped.get("fingerprint"):
        details.append(f"config fingerprint {stamped['fingerprint']}")
    where = f"the run in {stamped['dir']}" if stamped.get("dir") else "another run"
    return where + (f" ({', '.join(details)})" if details else "")


def mismatch(stamped: dict | None, fingerprints: tuple[str, ...], split_sha256: str | None) -> str:
    """How a checkpoint's stamp shows it is not this run's, as the end of a sentence about it; '' when it is.

    Args:
        stamped: The checkpoint's stamp (:func:`origin`); None (an unstamped, older checkpoint) always passes.
        fingerprints: This run's config fingerprint first, then any other it was recorded under.
        split_sha256: The split this run trains on; None when not known yet.
    """
    if stamped is None:
        return ""
    theirs = stamped.get("fingerprint")
    if theirs and fingerprints and theirs not in fingerprints:
        return f"was written by {describe(stamped)}, not by this run (config fingerprint {fingerprints[0]})"
    split = stamped.get("split_sha256")
    if split and split_sha256 and split != split_sha256:
        return (
            f"was trained on another split of the data (split sha256 {split[:12]}..., this run's data gives "
            f"{split_sha256[:12]}...)"
        )
    return ""


def load(path: Path, map_location: Any, what: str, fix: str) -> dict:
    """A trainer checkpoint (``weights_only=True``), refused in one sentence when it cannot be one.

    Args:
        path: The ``.pt`` file.
        what: How the sentence names the file (e.g. ``trainer.resume=true: <path>``).
        fix: What to do, a clause (e.g. ``delete it to start the run over``).

    Raises:
        ConfigError: the file is missing, unreadable, truncated, or holds no model state.
    """
    import torch

    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} is missing; {fix}.") from exc
    except Exception as exc:  # zip, unpickling and format errors all mean the same to the user
        raise ConfigError(
            f"{what} is corrupt or truncated ({short_error(exc)}); {fix}, or put back a good copy."
        ) from exc
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ConfigError(f"{what} is not a trainer checkpoint (it holds no model state); {fix}.")
    return state


def read_origin(path: Path) -> dict | None:
    """The stamp of the checkpoint file ``path``, read without loading its tensors into memory.

    None when it carries none, or cannot be read at all (the caller's own reading says why).
    """
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint, or damaged: no stamp to report
        return None
    return origin(state)


def read_split(run_dir: Path) -> dict | None:
    """The run's recorded ``split.json``; None when it has none.

    Raises:
        ConfigError: the file cannot be read, is not JSON, or is not a split record (no ``sha256``).
    """
    path = Path(run_dir) / SPLIT
    fix = SPLIT_FIX
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(
            f"{path} cannot be read ({exc.strerror or short_error(exc)}); fix its permissions, or {fix}."
        ) from exc
    try:
        split = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({short_error(exc)}): it is damaged; {fix}.") from exc
    if not isinstance(split, dict) or not isinstance(split.get("sha256"), str):
        raise ConfigError(f"{path} is not a split record (it has no sha256 of its indices); {fix}.")
    return split


def refuse_unrecorded(run_dir: Path, may_resume: bool) -> None:
    """Refuse a folder holding a run's files but no summary.json (deleted, or lost): a new run would overwrite its
    checkpoints and append to its logs. A resume may continue from its ``last.pt``, whose stamp says whose it is.

    Raises:
        ConfigError: ``run_dir`` holds such files, and no ``last.pt`` to resume from (or ``may_resume`` is false).
    """
    found = earlier_run_files(run_dir)
    last = (Path(run_dir) / CHECKPOINTS / "last.pt").is_file()
    if not found or (may_resume and last):
        return
    resume = " set trainer.resume=true to continue from its last.pt if that is this run's," if last else ""
    raise ConfigError(
        f"hydra.run.dir={run_dir} holds files of an earlier run ({', '.join(found)}) but no summary.json saying "
        f"which run they belong to; move them aside to start a run there,{resume} or choose another hydra.run.dir."
    )


def earlier_run_files(run_dir: Path) -> list[str]:
    """The files of a run found in ``run_dir`` (checkpoints, logs, split), by name.

    Hydra's ``.hydra/`` and log, a lease and temporary files are not among them: a process killed between
    taking the lease and writing its first summary leaves only those.
    """
    run_dir = Path(run_dir)
    found = [name for name in (METRICS, STEPS, SPLIT, DIAGNOSTICS, HARDWARE) if (run_dir / name).exists()]
    checkpoints = run_dir / CHECKPOINTS
    if checkpoints.is_dir() and any(not p.name.startswith(".") for p in checkpoints.iterdir()):
        found.insert(0, f"{CHECKPOINTS}/")
    return found
