"""stackwise_bench.bench (``python -m stackwise_bench.bench``): its measuring parts work, on a budget far too small
to mean anything.

No timing is asserted: speed is shown by running the benchmark, not by tests.
"""

from __future__ import annotations

import json

import pytest
import torch

from stackwise_bench.bench import cli, gpu, harness, knobs, overhead, peft, pipelines
from stackwise_bench.bench.figures import FIGURES
from stackwise_bench.bench.report import met
from stackwise_bench.nn.models import create_model
from stackwise_bench.training.flops import train_flops_per_image

TINY = harness.Budget(
    reps=1,
    steps={"resnet8": 3, "vit_tiny_p4": 3},
    batch={"resnet8": 8, "vit_tiny_p4": 4},
    warmup_steps=1,
    pipeline_images=128,
    startup_reps=1,
    sweep_reps=1,
    sweep_epochs=1,
    sweep_default_epochs=1,
    compile=False,
)


def test_interleaved_alternates_order_and_discards_warmup():
    calls = []
    arms = {name: (lambda r, name=name: calls.append((name, r)) or float(r + 1)) for name in "ab"}
    samples = harness.interleaved(3, arms, warmup=True)
    assert calls == [("a", -1), ("b", -1), ("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert samples == {"a": [1.0, 2.0, 3.0], "b": [1.0, 2.0, 3.0]}
    row = harness.compare({"a": [2.0, 4.0, 9.0], "b": [1.0, 4.0, 3.0]}, "a", "b")
    assert (row["ratio"], row["ratio_min"], row["ratio_max"], row["a_median"]) == (2.0, 1.0, 3.0, 4.0)


def test_step_clock_times_any_optimizer_between_steps():
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([param], lr=0.1)
    with harness.StepClock(torch.device("cpu")) as clock:
        for _ in range(4):
            param.grad = torch.ones(3)
            opt.step()
    opt.step()  # after the block: not timed
    assert len(clock.marks) == 4 and clock.img_s(batch=10, warmup=1) > 0
    with pytest.raises(RuntimeError, match="optimizer steps"):
        clock.img_s(batch=10, warmup=3)


@pytest.mark.slow
def test_framework_and_bare_arms_train_the_same_setup(tmp_path):
    overrides = harness.train_overrides("resnet8", "fp32", TINY)
    cfg = harness.compose(overrides)
    assert (cfg.trainer.max_epochs, cfg.trainer.batch_size, cfg.augmentation.crop_padding) == (1, 8, 0)
    rows = []
    assert harness.framework_img_s(overrides, tmp_path / "fw", TINY, rows) > 0
    assert len(rows) == 1 and rows[0]["step"] >= TINY.steps["resnet8"]
    assert harness.bare_img_s(overrides, TINY) > 0


def test_flops_and_peak_table(monkeypatch):
    flops = train_flops_per_image(create_model("resnet8", 10, img_size=32), (3, 32, 32), num_classes=10, batch=4)
    assert 3e7 < flops < 3e8  # ~12.5M multiply-adds forward at 32 px, x2 FLOPs, x3 with backward
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 PCIe")
    assert gpu.peak_flops(None, "bf16") == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA A100-SXM4-80GB")
    assert gpu.peak_flops(None, "fp32") == 19.5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Some Future GPU")
    assert gpu.peak_flops(None, "bf16") is None


@pytest.mark.slow
def test_knob_figures_measure_each_arm():
    cpu = torch.device("cpu")
    adamw = knobs._adamw_knob(TINY, cpu, model="resnet8")
    assert (adamw["a"], adamw["b"]) == ("loop", "fused") and adamw["foreach_ms"] > 0
    inference = knobs._inference_knobs(TINY, cpu)
    assert [(r["a"], r["b"]) for r in inference] == [("512", "64"), ("inference_mode", "no_grad")]
    assert all(r["a_median"] > 0 and r["b_median"] > 0 for r in inference)


def test_main_writes_json_and_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(harness.BUDGETS, "quick", TINY)
    fake = {
        "figure": "overhead",
        "setting": "fake",
        "unit": "img/s",
        "goal": ">= 0.97",
        **harness.compare({"framework": [99.0], "bare": [100.0]}, "framework", "bare"),
    }
    monkeypatch.setitem(FIGURES, "overhead", lambda b, work: [fake])
    if torch.cuda.is_available():  # the real GPU rows are gpu_check.sh's minutes, not this test's
        monkeypatch.setitem(FIGURES, "gpu", lambda b, work: [{**fake, "figure": "gpu"}])
    out = tmp_path / "bench.json"
    rows = cli.main(["--quick", "--only", "overhead,gpu", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["mode"] == "quick" and report["machine"]["torch"] == torch.__version__
    assert [r["figure"] for r in report["rows"]] == [r["figure"] for r in rows] == ["overhead", "gpu"]
    assert met(rows[0]) == "yes" and met({**rows[0], "ratio": 0.9}) == "NO"
    printed = capsys.readouterr().out
    assert "A/B" in printed and " 0.99 " in printed
    if not torch.cuda.is_available():
        assert rows[1]["skipped"] and "no CUDA device" in printed
    with pytest.raises(SystemExit):
        cli.main(["--only", "nonsense"])


@pytest.mark.slow
def test_diagnostics_isolated_cost_rows():
    rows = overhead._diagnostics_isolated("resnet8", 8, every=50)
    assert [r["setting"].split(":")[0] for r in rows] == ["isolated"] * 2
    assert all(0 < r["ratio"] <= 1 and r["logging_step_ms"] >= 0 and r["per_step_ms"] > 0 for r in rows)


@pytest.mark.slow
def test_int4_figure_compares_packed_and_reference(tmp_path):
    rows = peft.fig_int4(TINY, tmp_path)
    cpu = rows[0]
    assert cpu["figure"] == "int4" and "48 layers packed" in cpu["setting"]  # 12 blocks x qkv, proj, fc1, fc2
    assert cpu["a"] == "int4_packed" and cpu["b"] == "reference" and cpu["ratio"] > 0


@pytest.mark.slow
def test_peft_figure_times_every_method_against_lora(tmp_path):
    rows = peft.fig_peft(TINY, tmp_path)
    assert [r["a"] for r in rows] == [m for m in peft.PEFT_METHODS if m != "lora"]
    assert all(r["b"] == "lora" and r["ratio"] > 0 for r in rows)


@pytest.mark.slow
def test_imagefolder_figure_compares_the_cache_with_torchvision(tmp_path):
    rows = pipelines.fig_imagefolder(TINY, tmp_path)
    assert [(r["a"], r["b"]) for r in rows] == [("cached", "imagefolder"), ("build", "imagefolder")] * 2
    assert [r["goal"] for r in rows] == [">= 5", "", "", ""]
    assert all(r["ratio"] > 0 and r["a_median"] > 0 for r in rows)
    assert rows[1]["build_s_per_1k"] > 0 and rows[1]["files"] == TINY.pipeline_images + 2 * 12
    assert not list(tmp_path.glob("build-*"))  # every timed build's cache was removed again


def test_deit_augment_figure_compares_deit_and_basic(tmp_path):
    (row,) = pipelines.fig_deit_augment(TINY, tmp_path)
    assert row["a"] == "deit" and row["b"] == "basic" and row["ratio"] > 0
