"""MLflow: one experiment per study, one MLflow run per job, in a store inside the study folder.

The default store is ``sqlite:///<study_dir>/mlflow.db``, never the user's global default, and a local store's
artifacts go to ``<study_dir>/mlartifacts`` (MLflow's default is ``<cwd>/mlruns``): a study's everything stays in its
folder. MLflow 3's file store
(``./mlruns``) is in maintenance mode and refuses to open unless ``MLFLOW_ALLOW_FILE_STORE=true`` is set in the
environment (for the runs and for ``mlflow ui``); SQLite is what MLflow points users to instead. Parallel jobs share
that database safely: SQLite serialises the writers (MLflow waits up to 20 s on a lock), and the one step that is not
safe to race, creating the database's tables and the study's experiment, runs under a file lock in the study folder.

Only ``MlflowClient`` is used, never the fluent ``mlflow.start_run`` state: joblib reuses worker processes between
jobs, and nothing of one job may leak into the next.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from stackwise_bench.runs.stores import check_sqlite, sqlite_path
from stackwise_bench.runs.tracking import TrackerRun
from stackwise_bench.training.loggers import FINISHED_WELL, HeldSteps, require

# MLflow's limits (mlflow.utils.validation): entities per log_batch call, a param's value, a key's length.
MAX_PARAMS = 100
MAX_METRICS = 1000
MAX_VALUE = 6000
MAX_KEY = 250
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")  # what MLflow accepts on every OS: the rest becomes "_"
LOCK_TIMEOUT_S = 300  # creating the tables takes seconds; a lock held longer is a stuck job
ARTIFACTS = "mlartifacts"  # a local store's artifact root, in the study folder (MLflow's default: <cwd>/mlruns)
SERVERS = ("http://", "https://", "databricks")  # tracking URIs whose server decides where artifacts go


def mlflow_key(key: str) -> str:
    """``key`` as a valid MLflow param/metric name: allowed characters only, no empty, ``.`` or ``..`` path parts."""
    parts = [p if p not in (".", "..") else "_" for p in _BAD_KEY_CHARS.sub("_", key).split("/") if p]
    return "/".join(parts)[:MAX_KEY] or "_"


def mlflow_status(status: str) -> str:
    """The run's final status as MLflow's: a stopped run is KILLED, a failed one FAILED."""
    if status in FINISHED_WELL:
        return "FINISHED"
    return "KILLED" if status == "interrupted" else "FAILED"


def _quoted(text: str) -> str | None:
    """``text`` as a literal of MLflow's search syntax, or None where it holds both kinds of quote."""
    for quote in ("'", '"'):
        if quote not in text:
            return f"{quote}{text}{quote}"
    return None


class MLflowLogger:
    """Logs the run's dicts to MLflow with ``MlflowClient.log_batch``.

    Args:
        name: The key of this tracker in ``summary.json["loggers"]``.
        tracking_uri: Where to log; None = ``sqlite:///<study_dir>/mlflow.db``. A server (``http://...``) works too.
    """

    def __init__(self, name: str = "mlflow", tracking_uri: str | None = None):
        self.name = name
        self.tracking_uri = tracking_uri
        self._client = None
        self._run_id: str | None = None
        self._held: HeldSteps | None = None
        self._keys: dict[str, str] = {}
        self._last_step = 0

    # ---- opening --------------------------------------------------------------------------------
    def open(self, run: TrackerRun) -> dict:
        require("mlflow", self.name)
        filelock = require("filelock", self.name)
        from mlflow import MlflowClient

        study_dir = Path(run.study_dir).resolve()
        uri = self.tracking_uri or f"sqlite:///{study_dir / 'mlflow.db'}"
        study_dir.mkdir(parents=True, exist_ok=True)
        store = sqlite_path(uri)
        if store is not None:
            check_sqlite(store, "move it away, and MLflow starts a new store (the run folders keep every value)")
        # A local store's artifacts default to <cwd>/mlruns: keep them in the study folder with the store.
        artifacts = None if uri.startswith(SERVERS) else (study_dir / ARTIFACTS).as_uri()
        # The first client of a new database creates its tables (Alembic): two jobs doing it at once collide.
        with filelock.FileLock(str(study_dir / ".mlflow.lock"), timeout=LOCK_TIMEOUT_S):
            self._client = MlflowClient(tracking_uri=uri)
            experiment_id = self._experiment(run.study, artifacts)
        found = self._find(experiment_id, run)
        if found is None:
            self._run_id = self._client.create_run(experiment_id, run_name=run.name, tags=self._tags(run)).info.run_id
            held_params: set[str] = set()
        else:
            self._run_id = found.info.run_id
            self._client.update_run(self._run_id, status="RUNNING")
            floor = -1 if run.resume_step is None else run.resume_step
            self._held = HeldSteps(floor, self._history(set(found.data.metrics)))
            held_params = set(found.data.params)
        self._last_step = run.resume_step or 0
        self._log_params(run.params, held_params)
        return {"run_id": self._run_id, "experiment_id": experiment_id, "tracking_uri": uri}

    def _experiment(self, study: str, artifacts: str | None) -> str:
        """The study's experiment id, created on first use (another job may create it first: then it is found).

        ``artifacts``: the new experiment's artifact location (None: the server's default).
        """
        from mlflow.exceptions import MlflowException

        for _ in range(5):
            experiment = self._client.get_experiment_by_name(study)
            if experiment is not None:
                if experiment.lifecycle_stage == "deleted":
                    self._client.restore_experiment(experiment.experiment_id)
                return experiment.experiment_id
            try:
                return self._client.create_experiment(study, artifact_location=artifacts)
            except MlflowException as exc:  # "already exists": a job without the lock (a server store) won the race
                if "exist" not in str(exc).lower():
                    raise
                time.sleep(0.2)
        raise RuntimeError(f"MLflow experiment {study!r} could neither be created nor found")

    def _find(self, experiment_id: str, run: TrackerRun):
        """The MLflow run an earlier attempt of this run logged to, or None (a new run)."""
        from mlflow.exceptions import MlflowException

        run_id = run.state.get("run_id")
        if run_id:
            try:
                found = self._client.get_run(run_id)
                if found.info.experiment_id == experiment_id:
                    return found
            except MlflowException:
                pass  # gone (another store, or deleted): look it up by name below
        literal = _quoted(run.name)
        # By name only for a resume: an attempt killed before its state was recorded. A run from scratch with no state
        # is new, even where the name is taken (a run folder deleted and made again must not inherit old values).
        if run.resume_step is None or literal is None:
            return None
        runs = self._client.search_runs(
            [experiment_id], f"attributes.run_name = {literal}", order_by=["attributes.start_time DESC"], max_results=1
        )
        return runs[0] if runs else None

    @staticmethod
    def _tags(run: TrackerRun) -> dict[str, str]:
        return {"stackwise.run_dir": str(run.run_dir), "stackwise.study": run.study}

    def _history(self, keys: set[str]):
        """Reads one metric's logged steps the first time the resumed run logs it (keys it never had: none)."""

        def steps(key: str) -> list[int]:
            name = self._key(key)
            if name not in keys:
                return []
            return [m.step for m in self._client.get_metric_history(self._run_id, name)]

        return steps

    def _log_params(self, params: dict[str, Any], held: set[str]) -> None:
        from mlflow.entities import Param

        todo: dict[str, str] = {}
        for key, value in params.items():
            name = self._key(key)
            if name not in held and name not in todo:  # a resume: params already there stay (re-logging may fail)
                todo[name] = str(value)[:MAX_VALUE]
        items = [Param(k, v) for k, v in todo.items()]
        for start in range(0, len(items), MAX_PARAMS):
            self._client.log_batch(self._run_id, params=items[start : start + MAX_PARAMS], synchronous=True)

    def _key(self, key: str) -> str:
        if key not in self._keys:
            self._keys[key] = mlflow_key(key)
        return self._keys[key]

    # ---- logging --------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int, stream: str) -> None:
        from mlflow.entities import Metric

        if self._held is not None:
            metrics = self._held.fresh(metrics, step)
        if stream != "hardware":
            self._last_step = max(self._last_step, step)
        now = int(time.time() * 1000)
        items = [Metric(self._key(k), float(v), now, int(step)) for k, v in metrics.items()]
        for start in range(0, len(items), MAX_METRICS):
            self._client.log_batch(self._run_id, metrics=items[start : start + MAX_METRICS], synchronous=True)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.log_metrics({f"summary/{k}": v for k, v in summary.items()}, self._last_step, "summary")

    def close(self, status: str) -> None:
        if self._client is not None and self._run_id is not None:
            self._client.set_terminated(self._run_id, status=mlflow_status(status))
        self._client = None
