"""Every kind of bad input: one clear sentence naming the key, no training, no run that looks complete."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch

from stackwise_bench.errors import ConfigError
from stackwise_bench.train import run

from conftest import read_summary


@dataclass
class Refusal:
    message: str  # the ConfigError's text
    problems: list[str]  # broken promises of a refusal; empty when the run was refused cleanly


def refuse(cfg, run_dir) -> Refusal:
    """Run ``cfg`` expecting a ConfigError; list what a clean refusal must not do.

    A clean refusal is one sentence, a summary with ``status: failed`` and ``reason: config``,
    and no metrics or best checkpoint (nothing was trained).
    """
    with pytest.raises(ConfigError) as info:
        run(cfg, run_dir)
    message = str(info.value)
    summary = read_summary(run_dir)
    problems = []
    if "\n" in message or not message.rstrip().endswith("."):
        problems.append(f"not one sentence: {message!r}")
    if summary["status"] != "failed" or summary["error"]["reason"] != "config":
        problems.append(f"summary says {summary['status']} / {summary.get('error', {}).get('reason')}")
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints" / "best.pt").exists():
        problems.append("training started before the refusal")
    return Refusal(message, problems)


@pytest.mark.parametrize("rank", ["-1", "2.5"])
def test_bad_lora_rank(rank, tmp_path, cfg_factory):
    r = refuse(cfg_factory([f"lora.rank={rank}"]), tmp_path / "r")
    assert re.search(rf"lora\.rank={rank}.*non-negative integer", r.message), r.message
    assert not r.problems, r.problems


def test_lora_on_model_without_targets_lists_its_modules(tmp_path, cfg_factory):
    r = refuse(cfg_factory(["lora.rank=4"]), tmp_path / "r")
    assert re.search(r"lora\.target_modules", r.message), r.message
    assert not r.problems, r.problems
    assert "stage1" in r.message and "head" in r.message


def test_fp16_on_device_that_cannot_run_it(tmp_path, cfg_factory):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = refuse(cfg_factory(["precision=fp16", "trainer.device=cuda"]), tmp_path / "r")
    assert re.search(r"trainer\.device=cuda", r.message), r.message
    assert not r.problems, r.problems


def test_precision_probe_failure_is_refused(tmp_path, cfg_factory, monkeypatch):
    """A device whose autocast probe fails (e.g. an old GPU) gets one sentence, before training."""
    import stackwise_bench.training.precision as precision

    def broken(name, device):
        raise RuntimeError("float16 matmul not implemented")

    monkeypatch.setattr(precision, "_probe", broken)
    r = refuse(cfg_factory(["precision=fp16"]), tmp_path / "r")
    assert re.search(r"precision=fp16 cannot run on device cpu", r.message), r.message
    assert not r.problems, r.problems


def test_missing_cifar_offline(tmp_path, cfg_factory):
    r = refuse(cfg_factory(["dataset=cifar10", f"dataset.root={tmp_path / 'nothing'}"]), tmp_path / "r")
    assert re.search(r"dataset\.root=", r.message), r.message
    assert not r.problems, r.problems
    assert "cifar-10-batches-py" in r.message


def test_pretrained_weights_offline(tmp_path, cfg_factory):
    r = refuse(cfg_factory(["model=deit_tiny", "model.pretrained=true"]), tmp_path / "r")
    assert re.search(r"model\.pretrained=true", r.message), r.message
    assert not r.problems, r.problems
    assert "model.pretrained=false" in r.message and "model.checkpoint_path" in r.message


def test_batch_larger_than_training_set(tmp_path, cfg_factory):
    r = refuse(cfg_factory(["trainer.batch_size=4096"]), tmp_path / "r")
    assert re.search(r"trainer\.batch_size=4096 is larger", r.message), r.message
    assert not r.problems, r.problems


def test_corrupt_checkpoint_on_resume(tmp_path, cfg_factory):
    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    r = refuse(cfg_factory(["trainer.resume=true"]), run_dir)
    assert re.search(r"trainer\.resume=true: .*last\.pt is corrupt", r.message), r.message
    assert not r.problems, r.problems


def test_mismatched_checkpoint_on_resume(tmp_path, cfg_factory):
    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, run_dir / "checkpoints" / "last.pt")
    r = refuse(cfg_factory(["trainer.resume=true"]), run_dir)
    assert re.search(r"does not match this model", r.message), r.message
    assert not r.problems, r.problems


def test_unknown_key(cfg_factory):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="trainer.max_epoch"):
        cfg_factory(["trainer.max_epoch=3"])


def test_negative_grad_clip(tmp_path, cfg_factory):
    """A negative clip norm scales every gradient by a negative factor: ascent, at chance, recorded completed."""
    r = refuse(cfg_factory(["trainer.grad_clip=-1"]), tmp_path / "r")
    assert re.search(r"^trainer\.grad_clip=-1 must be a non-negative number", r.message), r.message
    assert not r.problems, r.problems
