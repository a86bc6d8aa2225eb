"""Hyperparameter search as a study: Optuna's ask-and-tell over ordinary run folders, resumable by its total.

``hparams_search=<preset>`` (``conf/hparams_search/``) selects ``hydra/sweeper=optuna``
(``conf/hydra/sweeper/optuna.yaml``), whose target is :class:`SearchSweeper` (a Hydra plugin: Hydra instantiates
sweepers only from the ``hydra_plugins`` package, so the wheel ships a three-line subclass there, see
``stackwise_bench/runs/hydra_plugin/``). It keeps the config keys and the search grammar of Hydra's Optuna sweeper
(``interval(a, b)``, ``tag(log, interval(a, b))``, ``choice(...)``, ``range(...)``; other overrides stay fixed).

Written here rather than taken from hydra-optuna-sweeper, because that plugin (1.2, 1.3) requires optuna<3, whose
SQLite storage fails under SQLAlchemy 2 and whose fANOVA fails on current scikit-learn; and because a study needs:

* ``n_trials`` is the study's total of COMPLETE trials in its storage (``<study>/optuna.db``): a relaunch of the
  same command runs only the rest;
* a trial that a killed or stopped launch left unfinished is asked again with the same params, so it gets the
  same job folder (``override_dirname``) and resumes from its ``last.pt``; a trial whose folder already finished
  is scored from it without training;
* the objective is read from each trial's ``summary.json`` (``hydra.sweeper.objective``, by default
  ``train.best_val_top1``), never from what the app returns (test top-1), and never a ``test.*`` key.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
from pathlib import Path

from hydra.core.utils import filter_overrides
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig

from stackwise_bench.errors import ConfigError
from stackwise_bench.runs import naming
from stackwise_bench.runs.contract import FINISHED, UnreadableSummary, read_summary
from stackwise_bench.runs.launch import current, launcher_lines
from stackwise_bench.runs.search_config import (
    SearchSweeperConf,
    check_search,
    override_value,
    params_lines,
    search_space,
)
from stackwise_bench.runs.search_store import RETRIED, count, end_stale_trials, log_best, open_study, resume_unfinished
from stackwise_bench.runs.study import outcome_path, read_record
from stackwise_bench.values import is_number, short_number

log = logging.getLogger(__name__)


class SearchSweeper(Sweeper):
    """Ask a batch of trials, launch them as jobs, score each from its run folder, tell; until n_trials complete."""

    def __init__(self, sampler=None, n_trials: int = 20, **settings) -> None:
        settings["n_trials"] = n_trials
        check_search({**dataclasses.asdict(SearchSweeperConf()), **settings})
        self.sampler = sampler  # functools.partial (``_partial_: true``): seeded per launch in :meth:`sweep`
        self.settings = settings

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.job_idx = 0

    def sweep(self, arguments: list[str]) -> None:
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        space, fixed = search_space(params_lines(self.settings.get("params")) + list(arguments))
        study = open_study(self.config, create=True)
        end_stale_trials(study)
        resume_unfinished(study)
        study.sampler = self._sampler(len(study.trials))
        s, launch = self.settings, current()
        batch = s.get("n_jobs") or self.config.hydra.launcher.get("n_jobs") or 1
        to_go = s["n_trials"] - count(study, "COMPLETE") - count(study, "RUNNING")  # RUNNING: other live launchers
        log.info(
            "search %s: %d of %d trials complete, %d to run",
            sweep_dir,
            count(study, "COMPLETE"),
            s["n_trials"],
            max(0, to_go),
        )
        while to_go > 0 and not (launch and launch.stopped_by()):
            trials = [study.ask(space) for _ in range(min(batch, to_go))]
            jobs = [[*fixed.values(), *(f"{k}={override_value(v)}" for k, v in t.params.items())] for t in trials]
            folders = trial_folders(self.config, trials, jobs)
            for trial, overrides, folder in zip(trials, jobs, folders):
                trial.set_user_attr("job", folder)
                trial.set_user_attr("launcher", {"host": socket.gethostname(), "pid": os.getpid()})
                launcher_lines().labels[" ".join(filter_overrides(overrides))] = folder
            returns = self.launcher.launch(jobs, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            failed = sum(self._tell(study, t, r, sweep_dir, launch) for t, r in zip(trials, returns))
            to_go -= len(trials)
            if failed / len(trials) > s["max_failure_rate"]:
                log.error(
                    "%d of %d trials of this batch failed (max_failure_rate=%s): the search stops",
                    failed,
                    len(trials),
                    s["max_failure_rate"],
                )
                break
        log_best(study, sweep_dir)

    def _sampler(self, offset: int):
        """The configured sampler; a continued study's launch gets seed + its trials so far: new, reproducible draws."""
        import optuna

        if self.sampler is None:
            return optuna.samplers.TPESampler()
        if not callable(self.sampler) or isinstance(self.sampler, optuna.samplers.BaseSampler):
            return self.sampler
        seed = self.sampler.keywords.get("seed") if hasattr(self.sampler, "keywords") else None
        return self.sampler(seed=seed + offset) if seed is not None and offset else self.sampler()

    def _tell(self, study, trial, ret, sweep_dir: Path, launch) -> bool:
        """Score one finished job and tell Optuna; True when it failed (for the failure rate)."""
        import optuna

        job = trial.user_attrs["job"]
        run_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg is not None else sweep_dir / job
        status = job_outcome(launch, job, run_dir)
        value = objective_value(run_dir, self.settings["objective"]) if status in DONE else None
        if value is not None:
            study.tell(trial, value)
            log.info("trial %d: %s = %s (%s)", trial.number, self.settings["objective"], short_number(value), job)
            return False
        outcome = status if status in RETRIED else ("no objective" if status in DONE else "failed")
        trial.set_user_attr("outcome", outcome)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log.warning(
            "trial %d (%s) ended %s: recorded as failed%s",
            trial.number,
            job,
            outcome,
            "; the next launch continues it" if outcome in RETRIED else "",
        )
        return outcome not in RETRIED


DONE = (*FINISHED, "skipped")


def job_outcome(launch, job: str, run_dir: Path) -> str:
    """How the job ended, as it reported to its launch; from its summary.json where it reported nothing."""
    if launch is not None:
        path = outcome_path(launch.dir, job)
        if path.exists():
            try:
                return read_record(path, "status", "")["status"]
            except ConfigError:
                pass  # unreadable (a full disk, a hand edit): its summary.json says how it ended
    try:
        return (read_summary(run_dir) or {}).get("status") or "failed"
    except UnreadableSummary:
        return "failed"


def objective_value(run_dir: Path, key: str) -> float | None:
    """The finished run's value of ``key`` (dotted into summary.json), or None where it has none."""
    try:
        node = read_summary(run_dir) or {}
    except UnreadableSummary:
        return None
    if node.get("status") not in FINISHED:
        return None
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if not is_number(node) or not math.isfinite(node):
        return None
    return float(node)


def trial_folders(config: DictConfig, trials: list, jobs: list[list[str]]) -> list[str]:
    """Each trial's job folder: its sampled values to their significant digits, more where two would share a name.

    Kept in the study's names (:mod:`stackwise_bench.runs.naming`): a trial asked again gets its folder back.
    """
    sweep_dir = config.hydra.sweep.dir
    identities = [job_name(config, overrides) for overrides in jobs]
    tries = {i: naming.search_candidates(t.params, override_value) for i, t in zip(identities, trials)}
    with naming.names_lock(sweep_dir) as names:
        folders = naming.assign(names, sweep_dir, tries)
    return [folders[i] for i in identities]


def job_name(config: DictConfig, overrides: list[str]) -> str:
    """The job's identity, as Hydra builds it (``hydra.job.override_dirname``): its folder in studies named that way."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser

    d = config.hydra.job.config.override_dirname
    parsed = OverridesParser.create().parse_overrides(overrides)
    return get_overrides_dirname(parsed, list(d.exclude_keys), d.item_sep, d.kv_sep)
