"""On a CUDA device: bit-identical reruns, fp16/bf16 steps, FP8 training, one job per GPU, exact re-evaluation.

Marked ``gpu``: skipped where torch sees no CUDA device (tests/conftest.py). ``scripts/gpu_check.sh``
runs them together with the benchmark's GPU rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from stackwise_bench.train import run

from conftest import ROOT, TINY, compose, read_metrics, read_summary

pytestmark = pytest.mark.gpu

ON_GPU = ["trainer.device=cuda", "trainer.max_epochs=2", "monitors=none"]
TIMING = ("_time_s", "_img_s")


def numbers(run_dir) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.endswith(TIMING)} for row in read_metrics(run_dir)]


def test_deterministic_reruns_are_bit_identical(tmp_path):
    cfg = compose(ON_GPU)
    first, second = run(cfg, tmp_path / "a"), run(cfg, tmp_path / "b")
    assert first["env"]["device"].startswith("cuda") and first["status"] == "completed"
    assert numbers(tmp_path / "a") == numbers(tmp_path / "b")
    assert first["test"]["confusion_matrix"] == second["test"]["confusion_matrix"]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_trains(precision, tmp_path):
    summary = run(compose([*ON_GPU, f"precision={precision}"]), tmp_path / precision)
    assert summary["status"] == "completed", summary.get("error")
    rows = read_metrics(tmp_path / precision)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    assert summary["test"]["top1"] > 50.0  # 4 classes: chance is 25%
    scaler = torch.load(tmp_path / precision / "checkpoints" / "last.pt", weights_only=True)["scaler"]
    assert bool(scaler) == (precision == "fp16")  # a GradScaler only where float16 gradients need it
    if precision == "fp16":
        assert scaler["scale"] > 0


def test_fp8_training_steps(tmp_path):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9+")
    pytest.importorskip("torchao")
    overrides = [*ON_GPU, "precision=fp8", "model=vit_tiny_p4", "model.pretrained=false", "trainer.max_epochs=1"]
    summary = run(compose(overrides), tmp_path / "fp8")
    assert summary["status"] == "completed", summary.get("error")
    assert summary["precision"]["fp8_layers"] and not any("head" in n for n in summary["precision"]["fp8_layers"])
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in read_metrics(tmp_path / "fp8"))


def test_one_job_per_gpu_in_a_sweep(tmp_path):
    from stackwise_bench.runs.job import default_n_jobs, visible_gpus

    gpus = visible_gpus()
    assert gpus >= 1 and default_n_jobs() == gpus  # the default sweep runs one job per GPU
    sweep = [o for o in TINY if not o.startswith(("trainer.device", "monitors."))]
    args = ["seed=1,2", *sweep, "trainer.max_epochs=1", "monitors=none", "study=gpus"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "stackwise_bench.train", "--multirun", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = [read_summary(d) for d in (tmp_path / "multirun" / "gpus").iterdir() if (d / "summary.json").exists()]
    assert len(summaries) == 2 and all(s["status"] == "completed" for s in summaries)
    devices = [s["env"]["device"] for s in summaries]
    assert all(d.startswith("cuda") for d in devices)
    if gpus >= 2:  # two jobs started together on two GPUs: each held its own
        assert len(set(devices)) == 2, devices
    assert not list((tmp_path / "multirun" / "gpus" / ".study").glob("gpu_slots/*"))  # every slot was handed back


def test_evaluate_reproduces_test_top1_on_the_gpu(tmp_path):
    from stackwise_bench.evaluation import evaluate_checkpoint

    summary = run(compose(ON_GPU), tmp_path / "run")
    evaluation = evaluate_checkpoint(tmp_path / "run")
    assert evaluation["run"]["device"].startswith("cuda")
    assert evaluation["test"]["top1"] == summary["test"]["top1"] and evaluation["test"]["matches_recorded"] is True
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["test"] == summary["test"]


def test_power_energy_and_diagnostics_on_the_gpu(tmp_path):
    """NVML readings on a real GPU: power in watts, energy from the counter (or integrated), per-image energy."""
    overrides = [
        "trainer.device=cuda",
        "trainer.max_epochs=2",
        "monitors.hardware.interval_s=0.1",
        "diagnostics=full",
        "diagnostics.every_n_steps=2",
    ]
    summary = run(compose(overrides), tmp_path / "power")
    assert summary["status"] == "completed", summary.get("error")
    resources = summary["resources"]
    print(
        "gpu resources:",
        json.dumps(
            {k: v for k, v in resources.items() if "energy" in k or "power" in k or "temp" in k or "throttl" in k}
        ),
    )
    rows = [json.loads(line) for line in (tmp_path / "power" / "hardware.jsonl").read_text().splitlines()]
    powers = [r["gpu_power_w"] for r in rows if r["gpu_power_w"] is not None]
    assert powers and all(10 < p < 2000 for p in powers)  # watts, not milliwatts
    assert resources["energy_j"] is not None and resources["energy_j"] > 0
    assert resources["energy_source"]["gpu"] in ("nvml_total_energy", "nvml_power_integrated")
    assert resources["energy_j_per_img"] == pytest.approx(resources["energy_j"] / resources["images"])
    assert resources["gpu_temp_max_c"] is not None and resources["thermal_throttled"] in (True, False)
    diag = [json.loads(line) for line in (tmp_path / "power" / "diagnostics.jsonl").read_text().splitlines()]
    assert diag[-1]["kind"] == "weights" and any(r.get("activations") for r in diag)


LM_ON_GPU = [
    "model=gpt_micro",
    "dataset=shakespeare",
    "trainer.device=cuda",
    "trainer.max_epochs=2",
    "trainer.batch_size=16",
    "dataset.steps_per_epoch=20",
    "dataset.val_tokens=8192",
    "dataset.test_tokens=8192",
    "monitors=none",
]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_language_model_reruns_bit_identical_and_evaluate_reproduces_its_loss(precision, tmp_path):
    """gpt_micro on the plays' bytes on the GPU: two runs give the same rows, and evaluate re-tests best.pt to the
    run's own test loss (with the KV cache's greedy samples equal to the uncached ones, tests/test_lm_evaluate)."""
    from stackwise_bench.evaluation import evaluate_checkpoint

    cfg = compose([*LM_ON_GPU, f"precision={precision}"], tiny=False)
    first, second = run(cfg, tmp_path / "a"), run(cfg, tmp_path / "b")
    assert first["status"] == "completed" and first["env"]["device"].startswith("cuda"), first.get("error")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith(("_time_s", "_token_s"))} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / "b"))
    again = evaluate_checkpoint(tmp_path / "a")
    assert again["test"]["loss"] == first["test"]["loss"] == second["test"]["loss"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_train_what_one_gpu_trains(strategy, tmp_path):
    """NCCL: 2 GPUs at batch 32 each (SyncBatchNorm for the ResNet under DDP) equal 1 GPU at 64, row by row."""
    model = "resnet8" if strategy == "ddp" else "vit_micro_p4"
    args = [*ON_GPU, f"model={model}", "dataset=digits", "trainer.batch_size=64", "trainer.channels_last=false"]
    if model == "resnet8":
        args += ["optimizer=sgd", "optimizer.lr=0.01"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name, extra in (("one", []), ("two", ["trainer.devices=2", f"trainer.strategy={strategy}"])):
        command = [sys.executable, "-m", "stackwise_bench.train", *args, *extra, f"hydra.run.dir={tmp_path / name}"]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = read_summary(tmp_path / "two")
    assert summary["env"]["world_size"] == 2 and summary["env"]["backend"] == "nccl"
    for a, b in zip(numbers(tmp_path / "one"), numbers(tmp_path / "two"), strict=True):
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (key, a, b)
