"""The devices figure (stackwise_bench/bench/devices.py): one run on 1 and N devices through the real entrypoint,
its speed as a ratio to 1 device, the ranks read back from the run folder, and the losses of both runs equal.

No speed is asserted: on a CPU the ranks share the cores, and the figure only proves the path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys

import pytest
import torch

from stackwise_bench.bench import cli, devices, harness
from stackwise_bench.bench.figures import FIGURES


def test_registered_and_device_counts_follow_the_machine(monkeypatch):
    assert FIGURES["devices"] is devices.fig_devices
    quick = harness.BUDGETS["quick"]
    monkeypatch.setattr(devices, "cpu_cores", lambda: 2)
    assert devices.device_counts(quick, cuda=False, batch=64) == [1, 2]
    monkeypatch.setattr(devices, "cpu_cores", lambda: 1)  # 2 processes even on 1 core: the path is the point
    assert devices.device_counts(quick, cuda=False, batch=64) == [1, 2]
    monkeypatch.setattr(devices, "cpu_cores", lambda: 16)  # capped: the CPU figure stays short
    assert devices.device_counts(quick, cuda=False, batch=64) == [1, 2, 4]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert devices.device_counts(quick, cuda=True, batch=256) == [1, 2, 4, 8]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 6)
    assert devices.device_counts(quick, cuda=True, batch=252) == [1, 2, 4, 6]
    assert devices.device_counts(quick, cuda=True, batch=256) == [1, 2, 4]  # 256 / 6 does not divide
    chosen = dataclasses.replace(quick, devices=(2, 4))
    assert chosen == quick  # --devices leaves the quick budget the quick budget (lm.size_of)
    assert devices.device_counts(chosen, cuda=False, batch=64) == [1, 2, 4]
    with pytest.raises(ValueError, match="divide evenly"):
        devices.device_counts(dataclasses.replace(quick, devices=(3,)), cuda=False, batch=64)
    assert cli._counts("1,2,4") == (1, 2, 4)
    with pytest.raises(Exception, match="positive integers"):
        cli._counts("1,two")
    assert list(devices.arm_names("vit_micro_p4", [1, 2], fsdp=True)) == ["1", "2 ddp", "2 fsdp"]
    assert list(devices.arm_names("resnet8", [1, 2, 4], fsdp=True)) == ["1", "2 ddp", "4 ddp"]


def test_speed_skips_the_first_epoch_and_loss_delta_pairs_rows_by_step():
    rows = [{"train_img_s": 10.0}, {"train_img_s": 100.0}, {"train_img_s": 300.0}, {"train_img_s": 200.0}]
    assert devices.epoch_speed(rows, "img/s") == 200.0
    assert devices.epoch_speed([{"train_token_s": 1.0}, {"train_token_s": 5.0}], "tok/s") == 5.0
    with pytest.raises(RuntimeError, match="2 or more"):
        devices.epoch_speed(rows[:1], "img/s")
    one = {"losses": [{"step": 20, "train_loss": 2.0, "val_loss": 1.9}, {"step": 40, "train_loss": 1.5}]}
    two = {"losses": [{"step": 20, "train_loss": 2.0, "val_loss": 1.9 + 3e-5}, {"step": 40, "train_loss": 1.5}]}
    assert devices.max_loss_delta([two], [one]) == pytest.approx(3e-5)
    assert devices.max_loss_delta([{"losses": one["losses"][:1]}], [one]) == math.inf  # a step missing


@pytest.mark.slow
def test_quick_figure_runs_two_ranks_end_to_end(tmp_path):
    """``python -m stackwise_bench.bench --quick --only devices``: vit_micro_p4 on 1 and 2 CPU processes."""
    out = tmp_path / "q.json"
    cmd = [sys.executable, "-m", "stackwise_bench.bench", "--quick", "--only", "devices", "--out", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert all("error" not in r for r in rows), rows
    assert [(r["devices"], r["strategy"]) for r in rows] == [(2, "ddp"), (2, "fsdp")]  # vit_micro_p4: fsdp too
    for r in rows:
        assert (r["world_size"], r["backend"], r["base_world_size"]) == (2, "gloo", 1)
        assert (r["threads_per_rank"], r["base_threads"], r["total_threads"]) == (1, 2, 2) and r["proves_path_only"]
        one, many = r["runs"]["1"], r["runs"][r["a"]]
        # the ratio is computed from the speeds measured in the run folders
        assert r["samples"][r["a"]] == [x["speed"] for x in many] and r["samples"]["1"] == [x["speed"] for x in one]
        ratios = [x["speed"] / y["speed"] for x, y in zip(many, one)]
        assert r["ratio"] == pytest.approx(statistics.median(ratios)) and min(r["a_median"], r["b_median"]) > 0
        # the same run on 2 ranks: every logged train and val loss within the tolerance of the 1-device run's
        assert r["max_abs_loss_delta"] == devices.max_loss_delta(many, one) <= devices.LOSS_TOLERANCE
        assert r["losses_agree"] and len(many[0]["losses"]) == devices.SIZES["quick"].epochs
    assert "A/B" in done.stdout and "world_size 2" in done.stdout
