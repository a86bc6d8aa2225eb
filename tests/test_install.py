"""A new user's install: the wheel (with conf/ inside) in a fresh environment trains from an empty folder."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

# The benchmark's smallest budget (stackwise_bench.bench.harness.Budget's fields): the command runs, nothing is timed.
TINY_BUDGET = {
    "reps": 1,
    "steps": {"resnet8": 3, "vit_tiny_p4": 3},
    "batch": {"resnet8": 8, "vit_tiny_p4": 4},
    "warmup_steps": 1,
    "pipeline_images": 128,
    "startup_reps": 1,
    "sweep_reps": 1,
    "sweep_epochs": 1,
    "sweep_default_epochs": 1,
    "compile": False,
}


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


@pytest.mark.slow
def test_wheel_ships_the_config_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix("stackwise_bench/conf/") for n in names if n.startswith("stackwise_bench/conf/")}
    expected = {str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert expected and shipped == expected


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A fresh environment with the wheel installed (and the running environment's dependencies): its python."""
    root = tmp_path_factory.mktemp("install")
    venv = root / "venv"
    out = sh([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    python = str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    share_running_packages(python, root)
    out = sh([python, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", str(wheel)], cwd=root)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return venv, python


def share_running_packages(python: str, cwd: Path) -> None:
    """Let the environment of ``python`` import what this interpreter can: a .pth file naming our site-packages.

    ``venv --system-site-packages`` shares the *base* interpreter's site-packages. When this interpreter is itself
    a virtual environment's, the dependencies live in its own site-packages, which the new one would not see.
    ``site.addsitedir`` also runs the .pth files there (an editable install's path comes after the wheel's copy).
    """
    code = "import json, site, sysconfig; print(json.dumps([sysconfig.get_path('purelib'), *site.getsitepackages()]))"
    out = sh([python, "-c", code], cwd=cwd)
    assert out.returncode == 0, out.stderr[-2000:]
    own, *seen = json.loads(out.stdout)
    missing = [d for d in site.getsitepackages() if d not in seen]
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in missing)
    (Path(own) / "_running_environment.pth").write_text(lines)


@pytest.mark.slow
def test_installed_wheel_trains_from_an_empty_folder(installed, tmp_path):
    """pip install <wheel> into a fresh environment (reusing the installed dependencies), then train one epoch."""
    venv, python = installed
    empty = tmp_path / "empty"
    empty.mkdir()
    code = "import stackwise_bench.configs as c, stackwise_bench.bench as b; print(c.__file__, c.CONF_DIR, b.__file__)"
    where = sh([python, "-c", code], cwd=empty)
    assert where.returncode == 0, where.stderr[-3000:]
    assert all(str(venv) in path for path in where.stdout.split()), where.stdout  # the wheel's copy, not the clone
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


@pytest.mark.slow
def test_installed_wheel_runs_the_benchmark_from_an_empty_folder(installed, tmp_path):
    """``python -m stackwise_bench.bench --quick --only overhead`` from the wheel, on the tiniest budget.

    The real --quick budget takes minutes (bf16 on a CPU); the command, the figure and the report are the same.
    """
    _, python = installed
    run_as_m = (
        "import json, runpy, sys; from stackwise_bench.bench import harness; "
        "harness.BUDGETS['quick'] = harness.Budget(**json.loads(sys.argv.pop(1))); "
        "runpy.run_module('stackwise_bench.bench', run_name='__main__', alter_sys=True)"
    )
    args = ["--quick", "--only", "overhead"]
    out = sh([python, "-c", run_as_m, json.dumps(TINY_BUDGET), *args], cwd=tmp_path, OMP_NUM_THREADS="1")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "multirun" / "benchmark" / "quick.json").read_text())  # in the current folder
    assert report["command"] == "python -m stackwise_bench.bench --quick --only overhead"
    assert [(r["figure"], r["a"], r["b"]) for r in report["rows"]] == [("overhead", "framework", "bare")] * 4
    assert all(r["ratio"] > 0 for r in report["rows"]) and "A/B" in out.stdout
