"""Shared fixtures: compose the real config in-process (importing torch+timm+peft costs seconds per process)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from stackwise_bench.runs.contract import METRICS, read_summary  # noqa: F401  (the tests read records as the package does)

# The analysis tests' hand-built studies (peft_study, precision_studies, ...) are fixtures of every test module.
pytest_plugins = ["fixtures_analysis"]

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A tiny but real run: resnet8 on the synthetic set, two epochs, no background sampling delay. On the CPU:
# the tests that mean it say so, so a GPU workstation runs the same numbers (GPU tests: tests/test_gpu.py).
TINY_DATA = ["dataset=synthetic", "dataset.num_train=256", "dataset.num_test=64"]
TINY = TINY_DATA + [
    "trainer.device=cpu",
    "trainer.max_epochs=2",
    "trainer.batch_size=32",
    "trainer.eval_batch_size=64",
    "trainer.progress=log",
    "monitors.hardware.interval_s=0.05",
]


def compose(overrides: list[str] | None = None, tiny: bool = True):
    """The real config from conf/, as `python -m stackwise_bench.train <overrides>` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = list(overrides or [])
    base = TINY if tiny else []
    for group in {o.split("=")[0] for o in overrides if "." not in o.split("=")[0]}:
        # the test picks its own option of this group: drop the tiny defaults that belong to it
        base = [o for o in base if o.split("=")[0] != group and not o.startswith(f"{group}.")]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=base + overrides)


@pytest.fixture
def cfg_factory():
    return compose


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / METRICS).read_text().splitlines()]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # No network here; make hub libraries fail fast instead of retrying.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(autouse=True)
def _torch_threads():
    # A run given `threads` sets torch's process-wide thread count; the next in-process test must not inherit it.
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    # trackio fixes its folder when it is imported: a scratch one, so no test writes to a user's trackio projects
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="trackio-tests-")
    # the markers (gpu, slow) are declared in pyproject.toml; --strict-markers refuses any other


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def wait_for(condition, what: str, timeout: float = 300.0) -> None:
    """Poll ``condition`` until it holds (a subprocess's progress); fail naming ``what`` after ``timeout`` s."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)
