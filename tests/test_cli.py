"""The commands users type, in real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, TINY


def train(args, cwd, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "stackwise_bench.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


def _env():
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


@pytest.mark.slow
def test_multirun_over_seeds(tmp_path):
    """`--multirun seed=...` writes one stable, readable folder per job; relaunching trains nothing."""
    args = ["--multirun", "seed=1,2", *TINY, "trainer.max_epochs=1", "study=cli"]
    out = train(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    study = tmp_path / "multirun" / "cli"
    jobs = sorted(p.name for p in study.iterdir() if (p / "summary.json").exists())
    assert len(jobs) == 2 and all("seed=" in j for j in jobs), jobs
    summaries = [json.loads((study / j / "summary.json").read_text()) for j in jobs]
    assert {s["run"]["seed"] for s in summaries} == {1, 2}
    assert all(s["status"] == "completed" for s in summaries)
    mtimes = {j: (study / j / "summary.json").stat().st_mtime_ns for j in jobs}
    again = train(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {j: (study / j / "summary.json").stat().st_mtime_ns for j in jobs} == mtimes


@pytest.mark.slow
def test_bad_input_exits_with_one_sentence(tmp_path):
    out = train(["lora.rank=-1", *TINY], tmp_path)
    assert out.returncode == 2
    lines = [line for line in (out.stdout + out.stderr).splitlines() if "lora.rank=-1" in line]
    assert lines and "non-negative integer" in lines[0]
    assert "Traceback" not in out.stderr
