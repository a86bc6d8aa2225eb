"""The tracker backends (logger=tensorboard|mlflow|trackio|wandb), read back with each tool's own reader.

Each backend is driven directly with a hand-built :class:`TrackerRun` (no training): the values come back value for
value; a resume that logs the steps after its checkpoint again leaves one value per (key, step); two processes
writing one MLflow store and one trackio project at once lose and corrupt nothing; a missing package is one sentence.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from stackwise_bench.runs.tracking import TrackerRun, Trackers
from stackwise_bench.training.loggers import HeldSteps, MissingTracker, check_available, require

# trackio fixes its folder when it is imported: point it at a scratch folder first (conftest should do this for the
# whole session; this covers running this module alone). Every test uses its own project, so they share it safely.
if "trackio" not in sys.modules:
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="trackio-tests-")

ROOT = Path(__file__).resolve().parents[1]
RUN_NAME = "lora.rank=8,seed=42"


@pytest.fixture
def trackio_dir() -> Path:
    import trackio.utils

    folder = Path(trackio.utils.TRACKIO_DIR)
    if not str(folder).startswith(tempfile.gettempdir()):
        pytest.skip(f"trackio was imported before TRACKIO_DIR pointed at a scratch folder ({folder})")
    return folder


def tracker_run(study_dir: Path, study: str, state: dict | None = None, resume_step: int | None = None) -> TrackerRun:
    run_dir = study_dir / RUN_NAME
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"lora": {"rank": 8, "targets": ["qkv"]}, "optimizer": {"lr": 0.001}, "note": "x" * 7000}
    params = {"lora.rank": 8, "lora.targets": ["qkv"], "optimizer.lr": 0.001, "note": "x" * 7000, "odd:key=[0]": 1}
    params.update({f"many.p{i}": i for i in range(150)})  # more than one MLflow batch of params
    return TrackerRun(run_dir, RUN_NAME, study, study_dir, config, params, dict(state or {}), resume_step)


# ---- what the tests log, and what a tracker must hold afterwards ---------------------------------------------------
# Values are multiples of 1/4, exact in float32 (TensorBoard's scalars).
def rows(steps: range, seqs: range) -> list[tuple[str, dict[str, float], int]]:
    out = []
    for s in steps:
        out.append(("train", {"train/loss": 100 - s * 0.25, "train/lr": s * 0.5}, s))
        if s % 5 == 0:
            out.append(("diagnostics", {"diagnostics/grad_norm/stage1.0": s * 0.75}, s))
        if s % 10 == 9:
            out.append(("epoch", {"epoch/val_top1": s * 0.25, "epoch/train_loss": 50 - s * 0.25}, s))
    out += [("hardware", {"hardware/cpu_percent": q * 2.0, "hardware/rss_mb": 500 + q * 0.5}, q) for q in seqs]
    return out


def expected(*parts: list) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] sorted by step, each (key, step) once (a relogged step has the same value)."""
    table: dict[str, dict[int, float]] = {}
    for part in parts:
        for _stream, metrics, step in part:
            for key, value in metrics.items():
                table.setdefault(key, {})[step] = value
    return {key: sorted(by_step.items()) for key, by_step in table.items()}


def feed(tracker, part: list, status: str = "completed", summary: dict | None = None) -> None:
    for stream, metrics, step in part:
        tracker.log_metrics(metrics, step, stream)
    tracker.log_summary(summary or {"test.top1": 0.75})
    tracker.close(status)


FIRST = rows(range(0, 30), range(0, 12))  # the first attempt got to step 29 (checkpoint at 19) and sample 11
SECOND = rows(range(20, 40), range(12, 20))  # the resume from step 19 logs 20.. again; samples go on from 12
RESUME_STEP = 19


def assert_series(got: dict[str, list[tuple[int, float]]], want: dict[str, list[tuple[int, float]]]) -> None:
    for key, series in want.items():
        assert got.get(key) == series, key


# ---- the shared parts ----------------------------------------------------------------------------------------------
def test_missing_package_is_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an uninstalled package looks like to import
    sentence = (
        'logger=mlflow needs the mlflow package; install the tracking extra: pip install "stackwise_bench[track]".'
    )
    with pytest.raises(MissingTracker) as caught:
        require("mlflow", "mlflow")
    assert str(caught.value) == sentence
    with pytest.raises(MissingTracker, match="logger=mlflow needs the mlflow package"):
        check_available(["tensorboard", "my_own_tracker", "mlflow", "wandb"])
    check_available(["tensorboard", "trackio", "wandb", "my_own_tracker"])  # installed here: no error

    from stackwise_bench.training.loggers.mlflow_logger import MLflowLogger

    reports = []
    trackers = Trackers([MLflowLogger()], lambda: tracker_run(tmp_path, "missing"), reports.append)
    trackers.log("train", {"loss": 1.0}, 0)
    trackers.log("train", {"loss": 2.0}, 1)
    trackers.close("completed")
    assert reports == [{"mlflow": {"state": {}, "error": f"MissingTracker: {sentence}"}}]


def test_importing_the_backends_imports_no_tracker():
    code = (
        "import sys\n"
        "import stackwise_bench.training.loggers.tensorboard_logger, stackwise_bench.training.loggers.mlflow_logger\n"
        "import stackwise_bench.training.loggers.trackio_logger, stackwise_bench.training.loggers.wandb_logger\n"
        "print(sorted({'tensorboard', 'mlflow', 'trackio', 'wandb', 'torch'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env(), check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


class FakeTracker:
    def __init__(self, name: str, fail_on: int | None = None):
        self.name, self.fail_on, self.calls, self.closed = name, fail_on, [], None

    def open(self, run):
        return {"opened": self.name}

    def log_metrics(self, metrics, step, stream):
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise sqlite3.OperationalError("database is locked")
        self.calls.append((stream, dict(metrics), step))

    def log_summary(self, summary):
        self.calls.append(("summary", dict(summary), None))

    def close(self, status):
        self.closed = status


def test_fan_out_keeps_going_without_a_failing_tracker(tmp_path):
    good, bad = FakeTracker("good"), FakeTracker("bad", fail_on=1)
    reports = []
    trackers = Trackers([bad, good], lambda: tracker_run(tmp_path, "fan"), reports.append)
    for step in range(3):
        trackers.log("train", {"loss": float(step), "step": step}, step)
    trackers.summary({"test": {"top1": 0.5}, "status": "completed"})
    trackers.close("completed")
    assert [c[2] for c in good.calls[:3]] == [0, 1, 2] and good.calls[-1] == ("summary", {"test.top1": 0.5}, None)
    assert good.closed == "completed" and bad.closed == "failed" and len(bad.calls) == 1
    assert reports[-1]["bad"]["error"] == "OperationalError: database is locked"
    assert reports[-1]["good"] == {"state": {"opened": "good"}, "error": None}


def test_held_steps_skip_only_what_is_held_after_the_checkpoint():
    held = HeldSteps(10, {"a": [5, 11, 12], "b": [11]})
    assert held.fresh({"a": 1.0, "b": 2.0}, 11) == {}
    assert held.fresh({"a": 1.0, "b": 2.0}, 12) == {"b": 2.0}
    assert held.fresh({"a": 1.0}, 5) == {"a": 1.0}  # at or before the checkpoint: never logged again, never looked up
    lazily = HeldSteps(-1, lambda key: [0, 1] if key == "a" else [])
    assert lazily.fresh({"a": 1.0, "c": 3.0}, 1) == {"c": 3.0}


# ---- TensorBoard -----------------------------------------------------------------------------------------------------
def _tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_values_resume_and_config(tmp_path):
    from stackwise_bench.training.loggers.tensorboard_logger import TensorBoardLogger

    run = tracker_run(tmp_path, "tb")
    tracker = TensorBoardLogger()
    state = tracker.open(run)
    feed(tracker, FIRST, summary={"test.top1": 0.5})
    folder = Path(state["logdir"])
    assert folder == run.run_dir / "tensorboard"
    assert_series(_scalars(_tensorboard(folder)) | _scalars(_tensorboard(folder / "hardware")), expected(FIRST))

    again = TensorBoardLogger()
    again.open(tracker_run(tmp_path, "tb", state, RESUME_STEP))
    feed(again, SECOND, "completed", {"test.top1": 0.75})
    main, hardware = _tensorboard(folder), _tensorboard(folder / "hardware")
    got = _scalars(main) | _scalars(hardware)
    assert_series(got, expected(FIRST, SECOND))
    assert got["summary/test.top1"] == [(39, 0.75)]  # the first attempt's (at step 29) was after the checkpoint
    assert [e.step for e in main.Tensors("config/text_summary")] == [0]  # the config once, not again on resume
    table = main.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| `lora.rank` | 8 |" in table and "| `odd:key=[0]` | 1 |" in table
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    hparams = {tag: HParamsPluginData.FromString(raw) for tag, raw in main.PluginTagToContent("hparams").items()}
    assert [m.name.tag for m in hparams["_hparams_/experiment"].experiment.metric_infos] == ["summary/test.top1"]
    session = hparams["_hparams_/session_start_info"].session_start_info.hparams
    assert session["lora.rank"].number_value == 8 and session["lora.targets"].string_value == "['qkv']"


# ---- MLflow ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_study(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow-study")  # one database for the module's MLflow tests (creating one takes s)


def _mlflow_series(client, run_id: str, keys) -> dict[str, list[tuple[int, float]]]:
    from stackwise_bench.training.loggers.mlflow_logger import mlflow_key

    out = {}
    for key in keys:
        history = sorted(client.get_metric_history(run_id, mlflow_key(key)), key=lambda m: (m.step, m.timestamp))
        out[key] = [(m.step, m.value) for m in history]
    return out


@pytest.mark.slow
def test_mlflow_values_params_and_resume(mlflow_study):
    from mlflow import MlflowClient

    from stackwise_bench.training.loggers.mlflow_logger import MLflowLogger, mlflow_key

    study = f"study-{uuid.uuid4().hex[:6]}"
    tracker = MLflowLogger()
    state = tracker.open(tracker_run(mlflow_study, study))
    assert state["tracking_uri"] == f"sqlite:///{mlflow_study.resolve() / 'mlflow.db'}"
    feed(tracker, FIRST, "interrupted")
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    [found] = client.search_runs([client.get_experiment_by_name(study).experiment_id])
    assert found.info.run_id == state["run_id"] and found.info.run_name == RUN_NAME
    assert found.info.status == "KILLED"
    params = found.data.params
    assert len(params["note"]) == 6000 and params[mlflow_key("odd:key=[0]")] == "1" and params["many.p149"] == "149"
    assert_series(_mlflow_series(client, state["run_id"], expected(FIRST)), expected(FIRST))

    # A resume that lost its state (killed before it was recorded) finds the run by name; params are not re-logged.
    again = MLflowLogger()
    assert again.open(tracker_run(mlflow_study, study, {}, RESUME_STEP))["run_id"] == state["run_id"]
    feed(again, SECOND, "completed", {"test.top1": 0.5})
    want = expected(FIRST, SECOND)
    got = _mlflow_series(client, state["run_id"], [*want, "summary/test.top1"])
    assert_series(got, want)
    assert got["summary/test.top1"] == [(29, 0.75), (39, 0.5)]
    assert client.get_run(state["run_id"]).info.status == "FINISHED"

    # A new run with the same name and no state (a folder made again) is a new MLflow run, not the old one continued.
    fresh = MLflowLogger()
    assert fresh.open(tracker_run(mlflow_study, study))["run_id"] != state["run_id"]
    fresh.close("failed")


@pytest.mark.slow
def test_mlflow_keeps_everything_of_a_study_inside_its_folder(mlflow_study, tmp_path, monkeypatch):
    """MLflow's default artifact root is <cwd>/mlruns: the study's experiment points inside the study folder."""
    from mlflow import MlflowClient

    from stackwise_bench.training.loggers.mlflow_logger import MLflowLogger

    monkeypatch.chdir(tmp_path)  # somewhere else than the study folder
    tracker = MLflowLogger()
    state = tracker.open(tracker_run(mlflow_study, f"study-{uuid.uuid4().hex[:6]}"))
    feed(tracker, FIRST, "completed")
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    for uri in (
        client.get_experiment(state["experiment_id"]).artifact_location,
        client.get_run(state["run_id"]).info.artifact_uri,
    ):
        assert uri.startswith(mlflow_study.resolve().as_uri() + "/"), uri
    assert list(tmp_path.iterdir()) == []


def test_a_tracker_store_that_is_not_a_database_is_one_sentence(tmp_path):
    """A garbage mlflow.db dropped the tracker with SQLAlchemy's three-line message; now a sentence naming it."""
    study = tmp_path / "study"
    study.mkdir()
    (study / "mlflow.db").write_bytes(b"garbage")
    reports = []
    trackers = Trackers([_mlflow()], lambda: tracker_run(study, "s"), reports.append)
    trackers.log("train", {"loss": 1.0}, 1)
    trackers.close("completed")
    assert reports[0]["mlflow"]["error"] == (
        f"ConfigError: {(study / 'mlflow.db').resolve()} is not a readable SQLite database (file is not a database); "
        "move it away, and MLflow starts a new store (the run folders keep every value)."
    )


def _mlflow():
    from stackwise_bench.training.loggers.mlflow_logger import MLflowLogger

    return MLflowLogger()


# ---- trackio ---------------------------------------------------------------------------------------------------------
def _trackio_series(project: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from trackio.sqlite_storage import SQLiteStorage

    out: dict[str, list[tuple[int, float]]] = {}
    for row in SQLiteStorage.get_logs(project, run_id=run_id):
        for key, value in row.items():
            if key not in ("step", "timestamp"):
                out.setdefault(key, []).append((row["step"], value))
    return {key: sorted(series) for key, series in out.items()}


def test_trackio_values_resume_and_failed_writes(trackio_dir, monkeypatch):
    from trackio.sqlite_storage import SQLiteStorage

    from stackwise_bench.training.loggers.trackio_logger import TrackioLogger

    study = f"study-{uuid.uuid4().hex[:6]}"
    tracker = TrackioLogger(flush_secs=3600)  # only epoch/test rows and close write: the rest waits in the buffer
    state = tracker.open(tracker_run(trackio_dir / "runs", study))
    feed(tracker, FIRST, "interrupted")
    assert (trackio_dir / f"{study}.db").is_file()
    assert_series(_trackio_series(study, state["run_id"]), expected(FIRST))
    config = SQLiteStorage.get_run_config(study, run_id=state["run_id"])
    assert config["_Group"] == study and config["lora.rank"] == 8 and config["odd:key=[0]"] == 1
    assert SQLiteStorage.get_runs(study) == [RUN_NAME]

    # Resumed by name (its state was lost); the database fails once mid-run: the error reaches us, nothing is lost.
    again = TrackioLogger(flush_secs=0)
    assert again.open(tracker_run(trackio_dir / "runs", study, {}, RESUME_STEP))["run_id"] == state["run_id"]
    cut = SECOND.index(next(r for r in SECOND if r[2] == 30))  # the first step the first attempt did not log
    for stream, metrics, step in SECOND[:cut]:
        again.log_metrics(metrics, step, stream)
    real = SQLiteStorage.bulk_log
    monkeypatch.setattr(SQLiteStorage, "bulk_log", staticmethod(lambda **kw: (_ for _ in ()).throw(OSError("disk"))))
    with pytest.raises(OSError, match="disk"):
        again.log_metrics(SECOND[cut][1], SECOND[cut][2], SECOND[cut][0])
    monkeypatch.setattr(SQLiteStorage, "bulk_log", staticmethod(real))
    feed(again, SECOND[cut + 1 :], "completed", {"test.top1": 0.5})
    got = _trackio_series(study, state["run_id"])
    assert_series(got, expected(FIRST, SECOND))
    assert got["summary/test.top1"] == [(29, 0.75), (39, 0.5)]
    assert SQLiteStorage.get_runs(study) == [RUN_NAME]  # one run, continued


# ---- wandb -----------------------------------------------------------------------------------------------------------
def _wandb_series(files) -> tuple[dict[str, list[tuple[int, float]]], list[int]]:
    from stackwise_bench.training.loggers.wandb_files import history

    out: dict[str, list[tuple[int, float]]] = {}
    steps = []
    for path in files:
        for row in history(path):
            steps.append(row["_step"])
            axis = row.get("global_step", row.get("hardware_seq"))
            for key, value in row.items():
                if not key.startswith("_") and key not in ("global_step", "hardware_seq"):
                    out.setdefault(key, []).append((axis, value))
    return {key: sorted(series) for key, series in out.items()}, steps


@pytest.mark.slow
def test_wandb_offline_values_and_resume(tmp_path):
    import wandb

    from stackwise_bench.training.loggers.wandb_files import segments
    from stackwise_bench.training.loggers.wandb_logger import WandbLogger, run_id

    run = tracker_run(tmp_path, "wb")
    tracker = WandbLogger()
    state = tracker.open(run)
    assert state["run_id"] == run_id(run) == run_id(tracker_run(tmp_path, "wb"))  # derived from the folder: stable
    feed(tracker, FIRST, "interrupted")
    assert wandb.run is None  # nothing of the run left in wandb's globals
    [first] = segments(run.run_dir / "wandb", state["run_id"])
    assert_series(_wandb_series([first])[0], expected(FIRST))

    again = WandbLogger()
    again.open(tracker_run(tmp_path, "wb", state, RESUME_STEP))
    feed(again, SECOND)
    files = segments(run.run_dir / "wandb", state["run_id"])
    assert len(files) == 2 and files[0] == first
    got, steps = _wandb_series(files)
    assert_series(got, expected(FIRST, SECOND))
    assert steps == list(range(len(steps)))  # _step goes on across segments: `wandb sync` replays them in order


# ---- parallel writers ------------------------------------------------------------------------------------------------
PARALLEL_JOB = """
import sys
from pathlib import Path
from stackwise_bench.runs.tracking import TrackerRun
from stackwise_bench.training.loggers.mlflow_logger import MLflowLogger
from stackwise_bench.training.loggers.trackio_logger import TrackioLogger

study_dir, study, name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
run = TrackerRun(study_dir / name, name, study, study_dir, {}, {"job": name}, {}, None)
mlflow, trackio = MLflowLogger(), TrackioLogger(flush_secs=3600)
for tracker in (mlflow, trackio):
    tracker.open(run)
for step in range(STEPS):
    for tracker in (mlflow, trackio):  # MLflow: one write per step
        tracker.log_metrics({f"train/k{k}": step * 1000.0 + k for k in range(KEYS)}, step, "train")
    if step % 3 == 0:
        trackio.flush()  # trackio: a write (a database lock) every 3 steps, while the other job does the same
trackers = (mlflow, trackio)
for tracker in trackers:
    tracker.close("completed")
"""
STEPS, KEYS = 300, 4


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_parallel_jobs_share_one_mlflow_store_and_one_trackio_project(tmp_path, trackio_dir):
    from mlflow import MlflowClient
    from trackio.sqlite_storage import SQLiteStorage

    study = f"par-{uuid.uuid4().hex[:6]}"
    code = PARALLEL_JOB.replace("STEPS", str(STEPS)).replace("KEYS", str(KEYS))
    names = ["seed=1", "seed=2"]
    jobs = [  # both start on a study with no database yet: they race to create MLflow's tables too
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path), study, name],
            cwd=ROOT,
            env=_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for name in names
    ]
    for job in jobs:
        out, _ = job.communicate(timeout=300)
        assert job.returncode == 0, out

    want = {f"train/k{k}": [(s, s * 1000.0 + k) for s in range(STEPS)] for k in range(KEYS)}
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(study).experiment_id])
    assert sorted(r.info.run_name for r in runs) == names and {r.info.status for r in runs} == {"FINISHED"}
    for found in runs:
        assert _mlflow_series(client, found.info.run_id, want) == want
    records = {r["name"]: r["id"] for r in SQLiteStorage.get_run_records(study)}
    assert sorted(records) == names
    for name in names:
        assert _trackio_series(study, records[name]) == want
    for db in (tmp_path / "mlflow.db", trackio_dir / f"{study}.db"):
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
