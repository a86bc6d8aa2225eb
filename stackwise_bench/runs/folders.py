"""Finding run folders and evaluation records below given paths, and the run folder of a checkpoint.

A run directory is any folder holding a ``summary.json`` (the run record's
source of truth); runs are found at any depth below the folders given, and a
run directory is never searched further (its ``checkpoints/`` can be large).

Evaluation records (``python -m stackwise_bench.evaluate`` writes them to
``<run>/eval/<name>/summary.json`` with ``kind: evaluate``) are not runs: they are
found next to their runs (:func:`find_eval_dirs`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from stackwise_bench.errors import ConfigError
from stackwise_bench.runs.contract import CHECKPOINTS, EVAL_DIR, EVAL_KIND, SUMMARY, UnreadableSummary, read_summary

_SKIP_DIRS = {".hydra", CHECKPOINTS, "__pycache__"}

PathsLike = str | os.PathLike | Iterable[str | os.PathLike]


def find_run_dirs(paths: PathsLike) -> list[Path]:
    """Every training run at or below ``paths`` (a folder with a summary.json), sorted, without duplicates.

    Evaluation records are not runs, even when ``paths`` points inside a run's ``eval/``.

    Raises:
        ConfigError: when a path does not exist.
    """
    return find_records(paths)[0]


def find_eval_dirs(paths: PathsLike) -> list[Path]:
    """Every evaluation record at or below ``paths``, including those in the ``eval/`` of the runs found."""
    return find_records(paths)[1]


def is_eval_record(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is ``<run>/eval/<name>/`` holding an evaluation's summary.json."""
    folder = Path(folder)
    # The folder name is checked first: a summary is read only where evaluate writes its records.
    if folder.parent.name != EVAL_DIR:
        return False
    try:
        return (read_summary(folder) or {}).get("kind") == EVAL_KIND
    except UnreadableSummary:
        return False  # listed as a run, where the analysis reports it as unreadable


def find_records(paths: PathsLike) -> tuple[list[Path], list[Path]]:
    """(training run folders, evaluation record folders) at or below ``paths``."""
    runs: dict[str, Path] = {}
    evals: dict[str, Path] = {}
    for root in as_path_list(paths):
        if not root.exists():
            raise ConfigError(f"runs={root} does not exist; point runs= at a run or multirun folder.")
        for dirpath, dirnames, filenames in os.walk(root):
            if SUMMARY in filenames:
                found = evals if is_eval_record(dirpath) else runs
                found.setdefault(os.path.realpath(dirpath), Path(dirpath))
                if found is runs:
                    for record in _eval_records_of(Path(dirpath)):
                        evals.setdefault(os.path.realpath(record), record)
                dirnames.clear()  # a run dir holds no runs; skip its checkpoints
                continue
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
    return sorted(runs.values(), key=_natural_key), sorted(evals.values(), key=_natural_key)


def find_evaluation(run_dir: Path, name: str, fingerprint: str) -> dict | None:
    """A completed evaluation of ``run_dir`` named ``name`` (or numbered ``name_2``, or ``name-2`` as earlier versions
    numbered them) with this fingerprint: its summary."""
    parent = Path(run_dir) / EVAL_DIR
    if not parent.is_dir():
        return None
    numbered = re.compile(rf"{re.escape(name)}([_-]\d+)?")
    for path in sorted(parent.iterdir()):
        if numbered.fullmatch(path.name):
            summary = read_summary(path) or {}
            if summary.get("status") == "completed" and summary.get("run", {}).get("fingerprint") == fingerprint:
                return summary
    return None


def shown_path(path: str | os.PathLike) -> str:
    """A path as the logs print it: relative to the current folder when under it, else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path.cwd())) or "."
    except ValueError:
        return str(absolute)


def _eval_records_of(run_dir: Path) -> list[Path]:
    folder = run_dir / EVAL_DIR
    if not folder.is_dir():
        return []
    return [d for d in folder.iterdir() if (d / SUMMARY).is_file() and is_eval_record(d)]


def _natural_key(path: Path) -> list:
    """Sort job folders 0, 1, 2, ..., 10 rather than 0, 1, 10, 2."""
    parts = []
    for part in path.parts:
        parts.append((0, int(part), "") if part.isdigit() else (1, 0, part))
    return parts


def as_path_list(paths: PathsLike) -> list[Path]:
    """``paths`` (one path or several) as a list of Paths."""
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def resolve_checkpoint(checkpoint: str | os.PathLike) -> tuple[Path, Path]:
    """``(run_dir, checkpoint file)`` from a run folder (its ``best.pt``) or a ``.pt`` path inside one.

    Raises:
        ConfigError: no such file, a folder without ``best.pt``, or a file outside any run folder.
    """
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        ckpt = path / CHECKPOINTS / "best.pt"
        if not ckpt.is_file():
            raise ConfigError(
                f"checkpoint={checkpoint} is a folder without checkpoints/best.pt; point checkpoint= at a "
                "run folder whose training finished at least one epoch, or at a .pt file inside one."
            )
        return path, ckpt
    if not path.is_file():
        raise ConfigError(f"checkpoint={checkpoint} does not exist; point it at a run folder or a .pt file inside one.")
    for parent in path.resolve().parents:
        if (parent / SUMMARY).is_file() or (parent / ".hydra" / "config.yaml").is_file():
            return parent, path
    raise ConfigError(
        f"checkpoint={checkpoint} is not inside a run folder (no summary.json or .hydra/config.yaml "
        "above it), so its model and data are unknown; point it at a checkpoint under a run's checkpoints/."
    )


def recorded_config(run_dir: Path, summary: dict | None) -> dict:
    """The run's resolved config: its summary's ``config``, else (older records) ``.hydra/config.yaml``.

    Raises:
        ConfigError: neither holds a config with the model, dataset, trainer, precision and lora groups.
    """
    config = (summary or {}).get("config")
    if not config and (Path(run_dir) / ".hydra" / "config.yaml").is_file():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(Path(run_dir) / ".hydra" / "config.yaml"), resolve=True)
    if not isinstance(config, dict) or not {"model", "dataset", "trainer", "precision", "lora"} <= set(config):
        raise ConfigError(
            f"checkpoint: {run_dir} has no usable run config (summary.json 'config' or .hydra/config.yaml); "
            "evaluate a folder written by python -m stackwise_bench.train."
        )
    return config
