"""A new user's install: the wheel (with conf/ inside) in a fresh environment trains from an empty folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


def sh(args, cwd, timeout=600, **env):
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("hatchling", reason="the test extra installs hatchling, which builds the wheel offline")
    dist = tmp_path_factory.mktemp("dist")
    out = sh(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)],
        cwd=dist,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (built,) = dist.glob("stackwise_bench-*.whl")
    return built


def test_wheel_ships_the_config_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix("stackwise_bench/conf/") for n in names if n.startswith("stackwise_bench/conf/")}
    expected = {str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert expected and shipped == expected


def test_installed_wheel_trains_from_an_empty_folder(wheel, tmp_path):
    """pip install <wheel> into a fresh environment (reusing the installed dependencies), then train one epoch."""
    venv = tmp_path / "venv"
    out = sh([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    python = str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    out = sh([python, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", str(wheel)], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    where = sh([python, "-c", "import stackwise_bench.configs as c; print(c.__file__); print(c.CONF_DIR)"], cwd=empty)
    module_file, conf_dir = where.stdout.split()
    assert str(venv) in module_file and str(venv) in conf_dir, where.stdout  # the wheel's copy, not the clone
    out = sh(
        [
            python,
            "-m",
            "stackwise_bench.train",
            "trainer.max_epochs=1",
            "trainer.device=cpu",
            "monitors=none",
            "hydra.run.dir=multirun/one",
        ],
        cwd=empty,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((empty / "multirun" / "one" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["train"]["epochs_run"] == 1
    assert summary["config"]["dataset"]["_target_"] == "stackwise_bench.data.load_digits"
