"""Every kind of bad input: one clear sentence naming the key, no training, no run that looks complete."""

from __future__ import annotations

import pytest
import torch

from conftest import read_summary
from stackwise_bench.errors import ConfigError
from stackwise_bench.train import run


def assert_refused(cfg, run_dir, match):
    with pytest.raises(ConfigError, match=match) as info:
        run(cfg, run_dir)
    message = str(info.value)
    assert "\n" not in message and message.rstrip().endswith(".")
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and summary["error"]["reason"] == "config"
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints" / "best.pt").exists()
    return message


@pytest.mark.parametrize("rank", ["-1", "2.5"])
def test_bad_lora_rank(rank, tmp_path, cfg_factory):
    assert_refused(cfg_factory([f"lora.rank={rank}"]), tmp_path / "r", rf"lora\.rank={rank}.*non-negative integer")


def test_lora_on_model_without_targets_lists_its_modules(tmp_path, cfg_factory):
    msg = assert_refused(cfg_factory(["lora.rank=4"]), tmp_path / "r", r"lora\.target_modules")
    assert "stage1" in msg and "head" in msg


def test_fp16_on_device_that_cannot_run_it(tmp_path, cfg_factory):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_refused(cfg_factory(["precision=fp16", "trainer.device=cuda"]), tmp_path / "r", r"trainer\.device=cuda")


def test_precision_probe_failure_is_refused(tmp_path, cfg_factory, monkeypatch):
    """A device whose autocast probe fails (e.g. an old GPU) gets one sentence, before training."""
    import stackwise_bench.precision as precision

    def broken(name, device):
        raise RuntimeError("float16 matmul not implemented")

    monkeypatch.setattr(precision, "_probe", broken)
    assert_refused(cfg_factory(["precision=fp16"]), tmp_path / "r", r"precision=fp16 cannot run on device cpu")


def test_missing_cifar_offline(tmp_path, cfg_factory):
    msg = assert_refused(cfg_factory(["dataset=cifar10", f"dataset.root={tmp_path / 'nothing'}"]), tmp_path / "r",
                         r"dataset\.root=")
    assert "cifar-10-batches-py" in msg


def test_pretrained_weights_offline(tmp_path, cfg_factory):
    msg = assert_refused(cfg_factory(["model=deit_tiny", "model.pretrained=true"]), tmp_path / "r",
                         r"model\.pretrained=true")
    assert "model.pretrained=false" in msg and "model.checkpoint_path" in msg


def test_batch_larger_than_training_set(tmp_path, cfg_factory):
    assert_refused(cfg_factory(["trainer.batch_size=4096"]), tmp_path / "r", r"trainer\.batch_size=4096 is larger")


def test_corrupt_checkpoint_on_resume(tmp_path, cfg_factory):
    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    assert_refused(cfg_factory(["trainer.resume=true"]), run_dir, r"trainer\.resume=true: .*last\.pt is corrupt")


def test_mismatched_checkpoint_on_resume(tmp_path, cfg_factory):
    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, run_dir / "checkpoints" / "last.pt")
    assert_refused(cfg_factory(["trainer.resume=true"]), run_dir, r"does not match this model")


def test_unknown_key(cfg_factory):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="trainer.max_epoch"):
        cfg_factory(["trainer.max_epoch=3"])
