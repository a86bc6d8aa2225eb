"""The Optuna storage of a hyperparameter search (:mod:`stackwise_bench.runs.search`): what it holds, and repairs.

The study folder's own ``optuna.db`` (or ``hydra.sweeper.storage``) keeps every trial: its params, state, value
and its job folder (user attribute ``job``). A launch first ends the trials that a launcher gone from this host
left RUNNING, then asks again (same params, so the same folder, which resumes from its ``last.pt`` or is scored
as it stands) every trial that ended interrupted, stopped, busy or with its launcher gone.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from omegaconf import DictConfig

from stackwise_bench.errors import ConfigError, short_error
from stackwise_bench.runs.contract import SEARCH_DB
from stackwise_bench.runs.lease import pid_alive
from stackwise_bench.runs.stores import check_sqlite, sqlite_path
from stackwise_bench.values import short_number

log = logging.getLogger(__name__)

DEFAULT_STUDY_NAME = "search"  # the name inside the study's own optuna.db (the folder names the study)
# A trial that ended like this is asked again by the next launch (same params: its folder resumes or is scored).
RETRIED = ("interrupted", "stopped", "busy", "launcher gone")


def storage_url(sweep_dir: Path, storage: str | None) -> str:
    """The configured storage, or the study folder's own SQLite file."""
    return storage or f"sqlite:///{(Path(sweep_dir) / SEARCH_DB).resolve()}"


def study_name(sweeper: DictConfig, study: str | None) -> str:
    """The name inside the storage: fixed, so a relaunch continues the same study.

    The study folder's own optuna.db holds one study, ``search``: a renamed folder keeps its search. A shared
    storage (``hydra.sweeper.storage=<url>``) holds many: there the study's name (``study=``) tells them apart.
    """
    return sweeper.get("study_name") or (study if sweeper.get("storage") else DEFAULT_STUDY_NAME)


def check_store(config: DictConfig) -> None:
    """Refuse a search database that is not one (garbage, truncated) in one sentence, before Optuna opens it."""
    url = storage_url(Path(config.hydra.sweep.dir), config.hydra.sweeper.get("storage"))
    path = sqlite_path(url)
    if path is not None:
        check_sqlite(path, "it holds the search's trials: restore it from a copy, or move it away to start over")


def open_study(config: DictConfig, create: bool = False):
    """The study's Optuna study (created on a first launch); ConfigError where the stored one disagrees."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    sweeper = config.hydra.sweeper
    sweep_dir = Path(config.hydra.sweep.dir)
    url, name = storage_url(sweep_dir, sweeper.get("storage")), study_name(sweeper, config.get("study"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what each trial did
    check_store(config)
    try:
        if not create:
            return optuna.load_study(study_name=name, storage=url)
        study = optuna.create_study(storage=url, study_name=name, direction=sweeper.direction, load_if_exists=True)
    except ValueError as exc:
        raise ConfigError(f"the search stored in {url} cannot continue with these settings ({exc}).") from exc
    except SQLAlchemyError as exc:  # a server storage that is not Optuna's, or a file damaged since the check
        raise ConfigError(
            f"the search storage {url} cannot be read ({short_error(exc)}); point hydra.sweeper.storage at an "
            "Optuna storage, or restore its file from a copy."
        ) from exc
    stored = study.user_attrs.get("objective")
    if stored is None:
        study.set_user_attr("objective", sweeper.objective)
    elif stored != sweeper.objective or study.direction.name.lower() != sweeper.direction:
        raise ConfigError(
            f"the search in {url} optimises {stored} ({study.direction.name.lower()}), not "
            f"{sweeper.objective} ({sweeper.direction}); start another study (study=<name>) to search for that."
        )
    return study


def count(study, state: str) -> int:
    return sum(t.state.name == state for t in study.trials)


def end_stale_trials(study) -> None:
    """Trials left RUNNING by a launcher of this host that is gone: failed, so :func:`resume_unfinished` asks again.

    They carry no ``outcome`` (only a launcher that is still there records one): that is how they are told apart.
    A launcher on another host cannot be checked from here: its trials are left to it.
    """
    import optuna

    for t in study.trials:
        who = t.user_attrs.get("launcher") or {}
        gone = not who or (who.get("host") == socket.gethostname() and not pid_alive(int(who["pid"])))
        if t.state.name == "RUNNING" and gone:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            log.warning(
                "trial %d (%s): its launcher is gone; the search continues it", t.number, t.user_attrs.get("job")
            )


def resume_unfinished(study) -> None:
    """Ask again, with the same params, every trial that was interrupted, stopped, busy or left by its launcher."""
    pending = {t.user_attrs.get("job") for t in study.trials if t.state.name in ("COMPLETE", "RUNNING", "WAITING")}
    for t in study.trials:
        job = t.user_attrs.get("job")
        ended = t.user_attrs.get("outcome", "launcher gone")  # none recorded: failed by end_stale_trials
        if t.state.name == "FAIL" and ended in RETRIED and job is not None and job not in pending:
            study.enqueue_trial(t.params, user_attrs={"job": job, "continues": t.number})
            pending.add(job)


def log_best(study, sweep_dir: Path) -> None:
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if done:
        best = study.best_trial
        log.info(
            "search %s: %d complete trials; best trial %d (%s): %s = %s, %s",
            sweep_dir,
            len(done),
            best.number,
            best.user_attrs.get("job"),
            study.user_attrs.get("objective"),
            short_number(best.value),
            shown_params(best.params),
        )


def shown_params(params: dict) -> str:
    """Sampled values to their significant digits (``optimizer.lr=0.001866``), not Optuna's 17-digit floats."""
    return ", ".join(f"{k}={short_number(v)}" for k, v in params.items())


def search_plan(config: DictConfig) -> str:
    """``plan=true`` for a search: what its storage holds and what a launch would run."""
    sweeper = config.hydra.sweeper
    url = storage_url(Path(config.hydra.sweep.dir), sweeper.get("storage"))
    lines = [
        f"search {config.hydra.sweep.dir} ({url}): {sweeper.direction} {sweeper.objective}, n_trials={sweeper.n_trials}"
    ]
    empty = f"  no trials yet: a launch runs {sweeper.n_trials}"
    if not sweeper.get("storage") and not (Path(config.hydra.sweep.dir) / SEARCH_DB).exists():
        return "\n".join([*lines, empty])
    try:
        study = open_study(config)
    except KeyError:  # the storage holds no study of this name yet
        return "\n".join([*lines, empty])
    states = {s: count(study, s) for s in ("COMPLETE", "FAIL", "RUNNING", "WAITING")}
    lines.append("  " + ", ".join(f"{n} {s.lower()}" for s, n in states.items()))
    if states["COMPLETE"]:
        best = study.best_trial
        shown = f"{sweeper.objective} = {short_number(best.value)}, {shown_params(best.params)}"
        lines.append(f"  best: trial {best.number} ({best.user_attrs.get('job')}), {shown}")
    lines.append(f"  a launch runs {max(0, sweeper.n_trials - states['COMPLETE'])} more trial(s)")
    return "\n".join(lines)
