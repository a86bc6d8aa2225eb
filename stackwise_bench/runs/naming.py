"""Job folder names of a study: the keys that vary across its sweep, kept so that every relaunch finds them.

A job's *identity* is Hydra's ``hydra.job.override_dirname``: every override of the job except the keys that do
not change what is trained (``hydra.job.config.override_dirname.exclude_keys``). Studies launched before this
module named their folders by it, e.g. ``dataset=digits,model.depth=4,model=vit_micro_p4,optimizer.lr=0.003,...``.
Now a job's folder is named by the keys that vary across its sweep (``model.depth=4,seed=1``), or ``job`` when
nothing varies; the shared overrides are in the launch record (``launch.json``'s ``shared``).

``<study>/.study/folders.json`` maps each identity to its folder, append-only: a name once given is never given
to another job nor changed, so a relaunch (the same grid, a wider one, a resumed search trial) finds the same
folders. A study that has folders or launches but no such file was named the old way: it keeps the old names
(scheme ``full``), unless its launch records name each job's folder (the file was lost): then they rebuild it.
Each job resolves its own folder from the file (``hydra.sweep.subdir: ${sb.job_folder:...}``,
conf/hydra/output/study.yaml), so this works for any launcher (joblib, submitit, Slurm) and for the search
sweeper; an identity the file lacks keeps its old, full name, and a grid job outside the folders its launch
planned is refused (runs/job.py: check_launch_record).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from omegaconf import OmegaConf

from stackwise_bench.errors import ConfigError, short_error
from stackwise_bench.runs.files import atomic_write_text

NAMES_FILE = "folders.json"
SINGLE = "job"  # the folder of a sweep in which nothing varies
MAX_NAME = 200  # bytes of a job folder's name: file systems take 255 per component, its outcome file adds ".json"
VARYING, FULL = "varying", "full"
_NOT_JOBS = {".study", ".submitit", "multirun.yaml", "optuna.db"}  # what a study folder holds besides its jobs


def names_path(sweep_dir: str | os.PathLike) -> Path:
    return Path(sweep_dir) / ".study" / NAMES_FILE


def read_names(sweep_dir: str | os.PathLike) -> dict:
    """``{"scheme", "keys", "folders"}`` of the study: recorded, or (no record yet) detected from what it holds.

    Raises:
        ConfigError: the record exists but cannot be read (garbage, truncated, another layout).
    """
    path = names_path(sweep_dir)
    if not path.exists():
        recorded = _recorded_folders(Path(sweep_dir))
        if recorded:  # the record is gone but the launches remember which folder each job had
            return {"scheme": VARYING, "keys": [], "folders": recorded}
        return {"scheme": FULL if _has_jobs(Path(sweep_dir)) else VARYING, "keys": [], "folders": {}}
    try:
        data = json.loads(path.read_text())
        why = None if isinstance(data, dict) and isinstance(data.get("folders"), dict) else "no 'folders' in it"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        data, why = None, getattr(exc, "strerror", None) or short_error(exc)
    if why is not None:
        raise ConfigError(
            f"{path} is not a readable record of the study's job folders ({why}); restore it from a copy: "
            "without it a relaunch would not find the folders it names."
        )
    return {"scheme": VARYING, "keys": [], **data}


def _recorded_folders(sweep_dir: Path) -> dict[str, str]:
    """``{identity: folder}`` from the study's launch records (``launch.json``'s planned jobs, oldest first), for a
    study named by its varying keys whose ``folders.json`` went missing; empty for launches made before names were
    recorded (their jobs carry no identity) or unreadable ones."""
    folders: dict[str, str] = {}
    for launch in sorted((sweep_dir / ".study" / "launches").glob("*/launch.json")):
        try:
            jobs = json.loads(launch.read_text()).get("jobs") or {}
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue
        for folder, job in jobs.items() if isinstance(jobs, dict) else ():
            if isinstance(job, dict) and isinstance(job.get("identity"), str):
                folders.setdefault(job["identity"], folder)
    return folders


def _has_jobs(sweep_dir: Path) -> bool:
    """Whether the study was launched before its names were recorded (it holds job folders or launches)."""
    if (sweep_dir / ".study" / "launches").is_dir() or (sweep_dir / "optuna.db").exists():
        return True
    try:
        return any(p.name not in _NOT_JOBS for p in sweep_dir.iterdir())
    except OSError:
        return False


@contextlib.contextmanager
def names_lock(sweep_dir: str | os.PathLike) -> Iterator[dict]:
    """The study's names, read and written under a lock: two launches at once never give one name twice."""
    path = names_path(sweep_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            names = read_names(sweep_dir)
            before = json.dumps(names, sort_keys=True)
            yield names
            if json.dumps(names, sort_keys=True) != before or not path.exists():
                atomic_write_text(path, json.dumps(names, indent=2, sort_keys=True) + "\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def assign(names: dict, sweep_dir: str | os.PathLike, candidates: dict[str, list[str]]) -> dict[str, str]:
    """Give each job (``{identity: [names to try, best first]}``) its folder in ``names`` (updated in place).

    Returns ``{identity: folder}``. A recorded identity keeps its folder; an old-style study names by identity. A
    new job gets its first candidate that no other job of the study holds, else its identity, else that with a hash.
    """
    folders = names["folders"]
    if names["scheme"] == FULL:  # named by identity, as before this module; one too long for a folder is recorded
        for identity in candidates:  # with a short name instead (each job resolves its folder from the record)
            if identity not in folders and not _fits(identity):
                folders[identity] = _short_name(identity, [], sweep_dir, set(folders.values()))
        return {identity: folders.get(identity, identity) for identity in candidates}
    taken = set(folders.values())
    out = {}
    for identity, tries in candidates.items():
        if identity not in folders:
            name = _short_name(identity, tries, sweep_dir, taken)
            folders[identity] = name
            taken.add(name)
        out[identity] = folders[identity]
    return out


def _short_name(identity: str, tries: list[str], sweep_dir, taken: set[str]) -> str:
    """The first of ``tries`` (then the identity) that fits and is free, else ``<first try>-<hash>``: cut by bytes,
    its digest lengthened until it is free, so never another job's folder."""
    head = (tries[0] if tries else identity or SINGLE).replace(os.sep, "_")
    head = head.encode()[: MAX_NAME // 2].decode("utf-8", "ignore")  # bytes, not characters
    free = lambda n: n and n not in taken and not (Path(sweep_dir) / n).exists()  # noqa: E731
    digest = hashlib.sha1(identity.encode()).hexdigest()
    hashed = (f"{head}-{digest[:k]}" for k in range(8, len(digest) + 1))
    return next(n for n in (*(t for t in (*tries, identity) if _fits(t)), *hashed) if free(n))


def _fits(name: str) -> bool:
    """A folder name every file system takes (a long identity, e.g. with a long path in a shared override
    that changed between launches, would fail with ENAMETOOLONG); its outcome file adds ``%2F`` for each ``/``."""
    return len(name.encode()) + 2 * name.count(os.sep) <= MAX_NAME


def grid_candidates(names: dict, jobs: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    """Each grid job's (``{identity: {key: override}}``) name: its overrides of the keys that vary across the sweep.

    The keys that named the study's folders in earlier launches are added (and this launch's recorded), so the
    folders of one study read alike; ``job`` where nothing varies.
    """
    keys = sorted(set(names["keys"]) | set(varying_keys(jobs.values())))
    if names["scheme"] == VARYING:
        names["keys"] = keys
    return {i: [",".join(sorted(o[k] for k in keys if k in o)) or SINGLE] for i, o in jobs.items()}


def search_candidates(params: dict, as_override) -> list[str]:
    """A search trial's names: its sampled values to 4 significant digits, then more where another trial has those."""
    from stackwise_bench.values import short_number

    def name(digits: int) -> str:
        shown = (short_number(v, digits) if isinstance(v, float) else as_override(v) for v in params.values())
        return ",".join(sorted(f"{k}={v}" for k, v in zip(params, shown)))

    return list(dict.fromkeys(name(d) for d in (4, 6, 8, 10, 12, 17)))


def parse_jobs(jobs: Iterable[list[str]], exclude_keys, item_sep: str = ",", kv_sep: str = "=") -> dict:
    """``{identity: {key: override}}`` of each job's override list, as Hydra names it (``override_dirname``)."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, out = OverridesParser.create(), {}
    for overrides in jobs:
        parsed = parser.parse_overrides(list(overrides))
        identity = get_overrides_dirname(parsed, list(exclude_keys), item_sep, kv_sep)
        out[identity] = {o.key_or_group: o.input_line for o in parsed if o.key_or_group not in exclude_keys}
    return out


def varying_keys(jobs: Iterable[dict[str, str]]) -> list[str]:
    """The keys whose override differs between the jobs (or that some jobs lack)."""
    jobs = list(jobs)
    keys = {k for job in jobs for k in job}
    return sorted(k for k in keys if len({job.get(k) for job in jobs}) > 1)


def shared_overrides(jobs: Iterable[dict[str, str]]) -> dict[str, str]:
    """The overrides every job has alike (what the folder names leave out)."""
    jobs = list(jobs)
    if not jobs:
        return {}
    return {k: v for k, v in jobs[0].items() if all(job.get(k) == v for job in jobs[1:])}


def job_folder(sweep_dir, identity) -> str:
    """The resolver of ``hydra.sweep.subdir``: the job's recorded folder, else its identity (the old name)."""
    identity = "" if identity is None else str(identity)
    try:
        data = json.loads(names_path(str(sweep_dir)).read_text())
        return str(data["folders"].get(identity, identity))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return identity


OmegaConf.register_new_resolver("sb.job_folder", job_folder, replace=True)
