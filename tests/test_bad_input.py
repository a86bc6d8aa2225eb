"""Every kind of bad input: one clear sentence naming the key, no training, no run that looks complete."""

from __future__ import annotations

import copy
import functools
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf

from stackwise_bench.errors import ConfigError
from stackwise_bench.train import run

from conftest import CONF, ROOT, TINY, compose, read_summary


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
    r = refuse(cfg_factory(["lora.rank=4", "lora.target_modules=[qkv]"]), tmp_path / "r")  # a ViT's name on a ResNet
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


# --- every knob's type and range (stackwise_bench/knobs/), refused before anything is built -----------------------

# One case (or more) per checked knob: the overrides (the last one sets the knob) -> what the sentence must say.
# Composed with the TINY overrides (tests/conftest.py) and checked with check_config directly: no torch work.
BAD_KNOBS = [
    ("seed=-1", r"non-negative integer"),
    # the language-model knobs, on gpt_micro and shakespeare
    # the BERT knobs, on bert_micro (GLUE's task key composes without a folder: it is checked before any reading)
    ("model=bert_micro dataset=shakespeare model.hidden=0", r"positive integer"),
    ("model=bert_micro dataset=shakespeare model.intermediate=0", r"positive integer"),
    ("model=bert_micro dataset=shakespeare model.max_positions=1", r"integer >= 2"),
    ("model=bert_micro dataset=glue dataset.root=/tmp dataset.task=boolq", r"one of cola, sst2"),
    ("model=gpt_micro dataset=shakespeare dataset.bpe_vocab_size=0", r"integer >= 257"),
    ("model=gpt_micro dataset=shakespeare dataset.corpus=hamlet", r"one of shakespeare, text"),
    ("model=gpt_micro dataset=shakespeare dataset.plays=comedies", r"one of all, pretrain, finetune"),
    ("model=gpt_micro dataset=shakespeare dataset.seq_len=0", r"positive integer"),
    ("model=gpt_micro dataset=shakespeare dataset.steps_per_epoch=0", r"positive integer"),
    ("model=gpt_micro dataset=shakespeare dataset.test_tokens=-1", r"integer >= 2, or null"),
    ("model=gpt_micro dataset=shakespeare dataset.train_tokens=0", r"positive integer, or null \(null = train by"),
    ("model=gpt_micro dataset=shakespeare dataset.tokenizer=words", r"one of byte, gpt2, bpe"),
    ("model=gpt_micro dataset=shakespeare dataset.tokenizer_files=''", r"folder path, or null"),
    ("model=gpt_micro dataset=shakespeare dataset.val_tokens=-5", r"integer >= 2, or null"),
    ("model=gpt_micro dataset=shakespeare model.context=0", r"positive integer"),
    ("model=gpt_micro dataset=shakespeare model.dropout=1.5", r"number in \[0, 1\)"),
    ("model=gpt_micro dataset=shakespeare model.family=bert", r"gpt2 or llama"),
    ("model=gpt_micro dataset=shakespeare model.nanogpt=yes", r"true or false"),
    ("model=gpt_micro dataset=shakespeare model.n_embd=0", r"positive integer"),
    ("model=gpt_micro dataset=shakespeare model.n_head=0", r"positive integer"),
    ("model=gpt_micro dataset=shakespeare model.n_layer=0", r"positive integer"),
    ("model=gpt_micro dataset=shakespeare model.vocab_size=0", r"integer >= 2, or null"),
    ("seed=1.5", r"non-negative integer"),
    ("plan=maybe", r"true or false"),
    ("study=a/b", r"plain folder name"),
    ("study=''", r"plain folder name"),
    ("lease.on_busy=never", r"skip or wait"),
    ("lease.timeout_s=0", r"positive number"),
    ("model.name=''", r"model name"),
    ("model.pretrained=yes", r"true or false"),
    ("model.checkpoint_path=/nonexistent/weights.pt", r"existing file or folder, or null"),
    ("model.img_size=0", r"positive integer"),
    ("model.img_size=32.5", r"positive integer"),
    ("model.drop_path_rate=1.0", r"number in \[0, 1\)"),
    ("model=vit_micro_p4 model.patch_size=0", r"positive integer"),
    ("model=vit_micro_p4 model.embed_dim=-64", r"positive integer"),
    ("model=vit_micro_p4 model.depth=0", r"positive integer"),
    ("model=vit_micro_p4 model.num_heads=0", r"positive integer"),
    ("model=vit_micro_p4 model.mlp_ratio=0", r"positive number"),
    ("model=vit_micro_p4 model.global_pool=mean", r"one of .*avg.*token"),
    ("model=vit_micro_p4 model.class_token=1", r"true or false"),
    ("model=vit_micro_p4 model.weight_init=xavier", r"one of .*jax"),
    ("augmentation.crop_padding=-1", r"non-negative integer \(0 = no crop\)"),
    ("augmentation.crop_padding=2.5", r"non-negative integer"),
    ("augmentation.flip=0", r"true or false"),
    ("augmentation.color_jitter=1.0", r"number in \[0, 1\)"),
    ("augmentation.rotation_deg=270", r"number in \[0, 180\]"),
    ("augmentation.erasing_p=1.5", r"probability in \[0, 1\]"),
    ("augmentation.erasing_scale=[0.5,0.1]", r"0 < lo <= hi <= 1"),
    ("augmentation.erasing_scale=[0.1]", r"two area fractions"),
    ("augmentation.auto_augment=auto", r"rand or trivial, or null \(null = off\)"),
    ("augmentation.randaug_n=0", r"positive integer, or null \(null = 2\)"),
    ("augmentation.randaug_m=11", r"number in \[0, 10\], or null \(timm's 0-10 scale"),
    ("augmentation.randaug_std=-0.5", r"non-negative number, or null \(null = 0\)"),
    ("augmentation.randaug_p=1.5", r"probability in \[0, 1\], or null \(null = 1\)"),
    ("augmentation.mixup_alpha=-1", r"non-negative number, or null \(0 and null = off\)"),
    ("augmentation.cutmix_alpha=inf", r"non-negative number, or null"),
    ("augmentation.mix_prob=2", r"probability in \[0, 1\], or null \(null = 1\)"),
    ("augmentation.switch_prob=-0.1", r"probability in \[0, 1\], or null \(null = 0\.5\)"),
    ("dataset=cifar10 dataset.name=svhn", r"cifar10 or cifar100"),
    ("dataset=cifar10 dataset.root=5", r"folder path"),
    ("dataset=cifar10 dataset.download=maybe", r"true or false"),
    ("dataset=cifar10 dataset.check_integrity=null", r"true or false"),
    ("dataset.val_fraction=0", r"number in \(0, 1\) \(best\.pt and early stopping"),
    ("dataset.val_fraction=1.0", r"number in \(0, 1\)"),
    ("dataset.split_seed=-1", r"non-negative integer"),
    ("dataset.img_size=0", r"positive integer"),
    ("dataset=digits dataset.test_fraction=1", r"number in \(0, 1\)"),
    ("dataset.train_size=0", r"positive integer, or null \(null = every training image\)"),
    ("dataset.num_train=0", r"positive integer"),
    ("dataset.num_test=0", r"positive integer"),
    ("dataset.num_classes=1", r"integer >= 2"),
    ("dataset.seed=-3", r"non-negative integer"),
    ("dataset=imagefolder dataset.cache_dir=''", r"folder path, or null \(null = <root>/\.stackwise_cache\)"),
    ("dataset=imagefolder dataset.skip_bad=maybe", r"true or false"),
    ("dataset=imagefolder dataset.workers=0", r"positive integer, or null \(null = the CPUs this process may use\)"),
    ("precision.name=fp64", r"one of fp32, fp16, bf16, fp8"),
    ("optimizer.name=lion", r"adamw or sgd"),
    ("optimizer.lr=0", r"positive number"),
    ("optimizer.lr=nan", r"positive number"),
    ("optimizer.lr=1e-3x", r"positive number"),
    ("optimizer.weight_decay=-0.01", r"non-negative number"),
    ("optimizer.betas=[0.9,1.0]", r"two numbers in \[0, 1\)"),
    ("optimizer.eps=0", r"positive number"),
    ("optimizer=sgd optimizer.momentum=-0.5", r"number in \[0, 1\)"),
    ("optimizer=sgd optimizer.nesterov=null", r"true or false"),
    ("optimizer.implementation=cuda", r"one of auto, fused, foreach, loop"),
    ("optimizer.layer_decay=0", r"number in \(0, 1\], or null \(null = off\)"),
    ("scheduler.name=linear", r"cosine or constant"),
    ("scheduler.warmup_epochs=-1", r"non-negative number \(fractions"),
    ("scheduler.min_lr_ratio=1.5", r"number in \[0, 1\]"),
    ("lora.rank=true", r"non-negative integer \(0 = full fine-tuning\)"),
    ("lora.alpha=0", r"positive number, or null \(null = 2 \* rank\)"),
    ("lora.dropout=1.0", r"number in \[0, 1\)"),
    ("lora.target_modules=[]", r"a regex or a non-empty list of module names"),
    ("lora.head=''", r"module name, or null \(null freezes the head\)"),
    ("lora.method=lorra", r"one of lora, dora, rslora, pissa, adalora, loha, lokr, ia3, vera, oft, qalora, qlora"),
    ("lora.pissa.niter=0", r"positive integer, or null \(null = an exact SVD\)"),
    ("lora.adalora.init_r=0", r"positive integer, or null \(null = ceil\(1\.5 \* rank\)\)"),
    ("lora.adalora.tinit=-1", r"non-negative integer, or null \(null = 10% of the steps\)"),
    ("lora.adalora.tfinal=-1", r"non-negative integer, or null \(null = 20% of the steps\)"),
    ("lora.adalora.delta_t=0", r"positive integer"),
    ("lora.adalora.beta1=1", r"number in \(0, 1\)"),
    ("lora.adalora.beta2=0", r"number in \(0, 1\)"),
    ("lora.adalora.orth_reg_weight=-1", r"non-negative number \(0 = no orthogonality penalty\)"),
    ("lora.loha.rank_dropout=1", r"number in \[0, 1\)"),
    ("lora.loha.module_dropout=-0.1", r"number in \[0, 1\)"),
    ("lora.lokr.decompose_both=1", r"true or false"),
    ("lora.lokr.factor=-2", r"integer >= -1 \(-1 = the most balanced factorisation\)"),
    ("lora.lokr.rank_dropout=1", r"number in \[0, 1\)"),
    ("lora.lokr.module_dropout=2", r"number in \[0, 1\)"),
    ("lora.vera.d_initial=0", r"positive number"),
    ("lora.vera.projection_seed=-1", r"non-negative integer"),
    ("lora.oft.block_size=1", r"integer >= 2"),
    ("lora.oft.coft=maybe", r"true or false"),
    ("lora.oft.eps=0", r"positive number"),
    ("lora.oft.module_dropout=1", r"number in \[0, 1\)"),
    ("lora.qalora.bits=3", r"4 or 8"),
    ("lora.qalora.group_size=0", r"positive integer"),
    ("lora.qlora.bits=16", r"4 or 8"),
    ("lora.qlora.group_size=-32", r"positive integer"),
    ("trainer.max_epochs=0", r"positive integer"),
    ("trainer.max_epochs=2.5", r"positive integer"),
    ("trainer.max_flops=0", r"positive number, or null \(null = train by trainer.max_epochs\)"),
    ("trainer.batch_size=0", r"positive integer"),
    ("trainer.accumulate=0", r"positive integer \(micro-batches per step"),
    ("trainer.eval_batch_size=0", r"positive integer, or null"),
    ("trainer.grad_clip=-1", r"non-negative number, or null \(0 and null disable clipping\)"),
    ("trainer.grad_clip=inf", r"non-negative number, or null"),
    ("trainer.early_stopping_patience=-1", r"non-negative integer, or null \(0 and null disable"),
    ("trainer.eval_every=0", r"positive integer"),
    ("trainer.label_smoothing=1.0", r"number in \[0, 1\)"),
    ("trainer.device=gpu", r"auto, cpu, cuda or cuda:N"),
    ("trainer.deterministic=null", r"true or false"),
    ("trainer.resume=maybe", r"true or false"),
    ("trainer.channels_last=2", r"true or false"),
    ("trainer.data_on_device=yes", r"true or false"),
    ("trainer.compile=on", r"true or false"),
    ("regime=depth_time regime.stacks=[2,1]", r"list of values \(a positive integer each, strictly increasing\)"),
    ("regime=depth_time regime.boundaries=[1.5]", r"a number in \(0, 1\) each, strictly increasing"),
    ("regime=depth_time regime.building_mode=sideways", r"one of append, prepend, interleave"),
    ("regime=depth_time regime.init=zeros", r"one of copy, identity, random"),
    ("regime=depth_time regime.scope=layerwise", r"rackwise or stackwise"),
    ("regime=depth_time regime.old_lr_factor=2", r"number in \[0, 1\] \(0 freezes the older blocks\)"),
    ("regime=depth_time regime.optimizer_state=keep", r"copy or reset"),
    ("regime=depth_time regime.lr_rewarm_steps=-1", r"non-negative integer"),
    ("regime=depth_time regime.seed=1.5", r"an integer"),
    ("regime=classical regime.match=maybe", r"true or false"),
    ("trainer.threads=0", r"positive integer, or null \(null keeps torch's default\)"),
    ("trainer.devices=0", r"positive integer \(ranks of one run"),
    ("trainer.strategy=zero", r"ddp or fsdp, or null \(null = ddp\)"),
    ("trainer.progress=quiet", r"one of auto, bar, log"),
    ("trainer.log_every_n_steps=0", r"positive integer"),
    ("trainer.ema=1.0", r"number in \(0, 1\), or null \(null = off\)"),
    ("trainer.ema_warmup_power=0", r"positive number, or null \(null = no warmup\)"),
    ("trainer.best_weights=best", r"raw or ema, or null \(null = raw\)"),
    ("monitors.hardware.interval_s=0", r"positive number"),
    ("monitors.hardware.gpu=sometimes", r"true or false"),
    ("monitors.hardware.power=2", r"true or false"),
    ("monitors.hardware.thermal=hot", r"true or false"),
    ("diagnostics.every_n_steps=0", r"positive integer \(a logging step every N optimizer steps\)"),
    ("diagnostics.layer_grads=some", r"true or false"),
    ("diagnostics=full diagnostics.weights=1", r"true or false"),
    ("diagnostics=full diagnostics.activations=maybe", r"true or false"),
    ("logger=tensorboard logger.tensorboard.subdir=a/b", r"folder name"),
    ("logger=tensorboard logger.tensorboard.flush_secs=0", r"positive number"),
    ("logger=mlflow logger.mlflow.tracking_uri=[1,2]", r"MLflow tracking URI"),
    ("logger=trackio logger.trackio.flush_secs=-1", r"positive number"),
    ("logger=wandb logger.wandb.mode=cloud", r"one of offline, online, disabled"),
    ("logger=wandb logger.wandb.project=[x]", r"wandb project name"),
]

# Relations between keys, a group deleted, a value never set: each message names the key and what to do.
BAD_COMBINATIONS = [
    ("~model", r"^model leaves the run without its model config; pick an option, e\.g\. model=resnet8\.$"),
    ("~lora", r"^lora leaves the run without its lora config; use lora=default"),
    ("monitors.hardware=null", r"^monitors\.hardware=null must be a monitor config with a _target_; remove it"),
    ("dataset=digits dataset.img_size=4", r"^dataset\.img_size=4 must be an integer >= 8 for dataset=digits"),
    ("dataset.num_train=2", r"^dataset\.num_train=2 must be at least dataset\.num_classes=4"),
    ("dataset=cifar10 dataset.root=null", r"^dataset\.root=null must be a folder path for dataset=cifar10; use e\.g"),
    (
        "model=vit_micro_p4 model.num_heads=3",
        r"^model\.num_heads=3 must divide model\.embed_dim=64 .*; use e\.g\. model\.num_heads=2\.$",
    ),
    (
        "model=vit_micro_p4 model.global_pool=token model.class_token=false",
        r"^model\.global_pool=token pools the class token, and model\.class_token=false removes it",
    ),
    ("scheduler.warmup_epochs=3", r"^scheduler\.warmup_epochs=3 must not exceed trainer\.max_epochs=2"),
    ("model.name=???", r"^model\.name=\?\?\? must be set; use e\.g\. model\.name=resnet8\.$"),
    ("optimizer.lr=${nope}", r"^optimizer\.lr could not be read \(Interpolation key 'nope' not found\)"),
]


def _knob_message(cfg) -> str:
    from stackwise_bench.knobs import check_config

    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    message = str(info.value)
    assert "\n" not in message and message.endswith("."), f"not one sentence: {message!r}"
    return message


@functools.lru_cache
def _composed(context: tuple[str, ...]):
    return compose(list(context))


def _compose_fast(context: list[str], setting: str):
    """``compose([*context, setting])``, with the context composed once (a Hydra compose costs ~0.2 s) and the
    ``key=value`` setting applied as Hydra applies it (its override parser, then ``OmegaConf.update``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = copy.deepcopy(_composed(tuple(context)))
    override = OverridesParser.create().parse_override(setting)
    assert not (override.is_delete() or override.is_add() or override.is_force_add()), setting
    OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
    return cfg


@pytest.mark.parametrize("overrides", ["trainer.grad_clip=-1", "model=vit_micro_p4 model.global_pool=mean"])
def test_fast_composition_is_composition(overrides):
    *context, setting = overrides.split()
    fast, slow = _compose_fast(context, setting), compose([*context, setting])
    assert OmegaConf.to_container(fast) == OmegaConf.to_container(slow)


@pytest.mark.parametrize("overrides,says", BAD_KNOBS, ids=[c[0] for c in BAD_KNOBS])
def test_bad_knob(overrides, says):
    """The sentence: ``key=value must be <what>[, or null] [(meaning)]; use e.g. key=<example>.``, and the example
    it offers is itself valid."""
    from stackwise_bench.knobs import check_config

    *context, setting = overrides.split()
    key = setting.partition("=")[0]
    message = _knob_message(_compose_fast(context, setting))
    assert re.search(rf"^{re.escape(key)}=\S* must be .*{says}.*; use e\.g\. {re.escape(key)}=\S+\.$", message), message
    example = re.search(r"; use e\.g\. (\S+)\.$", message).group(1)
    check_config(_compose_fast(context, example))  # what the sentence suggests is accepted


@pytest.mark.parametrize("overrides,says", BAD_COMBINATIONS, ids=[c[0] for c in BAD_COMBINATIONS])
def test_bad_combination(overrides, says, cfg_factory):
    message = _knob_message(cfg_factory(overrides.split()))
    assert re.search(says, message), message


def test_every_checked_knob_has_a_bad_case():
    from stackwise_bench.knobs import EVALUATE_KNOBS, EVALUATE_STUDY_KNOBS, KNOBS

    def keys(cases):
        return {c[0].split()[-1].partition("=")[0] for c in cases}

    assert sorted(set(KNOBS) - keys(BAD_KNOBS)) == []
    assert sorted(set(EVALUATE_KNOBS) - keys(BAD_EVALUATE)) == []
    assert sorted(set(EVALUATE_STUDY_KNOBS) - keys(BAD_EVALUATE_STUDY)) == []


@pytest.mark.parametrize(
    "overrides,says",
    [
        ("trainer.max_epochs=0", r"^trainer\.max_epochs=0 must be a positive integer; use e\.g\. trainer\.max_epochs="),
        ("optimizer.lr=-1", r"^optimizer\.lr=-1 must be a positive number"),
        ("augmentation.erasing_p=1.5", r"^augmentation\.erasing_p=1\.5 must be a probability in \[0, 1\]"),
        ("dataset.val_fraction=0", r"^dataset\.val_fraction=0 must be a number in \(0, 1\)"),
        ("~scheduler", r"^scheduler leaves the run without its scheduler config; use scheduler=constant"),
    ],
)
def test_bad_knob_through_run(overrides, says, tmp_path, cfg_factory):
    """The wiring: train.run checks every knob first; the run is recorded failed / config and nothing trains."""
    r = refuse(cfg_factory(overrides.split()), tmp_path / "r")
    assert re.search(says, r.message), r.message
    assert not r.problems, r.problems


# --- the evaluate command line (conf/evaluate.yaml) and evaluation studies (conf/evaluate_study.yaml) ---------------

BAD_EVALUATE = [
    ("checkpoint=5", r"^checkpoint=5 must be a run folder or a \.pt file inside one; use e\.g\."),
    (
        "quantize=int3",
        r"^quantize=int3 must be one of fp8_e4m3, fp8_e5m2, int8, int4, or null \(null = the weights as trained\)",
    ),
    ("quantize=int4 group_size=0", r"^group_size=0 must be a positive integer \(int4 weights per scale and zero point"),
    ("quantize=int4 group_size=8.5", r"^group_size=8\.5 must be a positive integer"),
    ("quantize=int8 group_size=64", r"^group_size=64 only applies to quantize=int4 \(not quantize=int8\); add quantiz"),
    ("group_size=16", r"^group_size=16 only applies to quantize=int4 \(not quantize=null\)"),
    (
        "quantize=int8 activations=true",
        r"^activations=true applies to the FP8 formats only \(quantize=int8 is weight-o",
    ),
    ("keep_head=2", r"^keep_head=2 must be true or false; use e\.g\. keep_head=true\.$"),
    ("activations=1", r"^activations=1 must be true or false"),
    ("name=a/b", r"^name=a/b must be a plain folder name, or null"),
    ("device=gpu", r"^device=gpu must be auto, cpu, cuda or cuda:N, or null"),
    ("dataset.root=[a]", r"^dataset\.root=\[a\] must be a folder path, or null"),
    ("dataset.download=maybe", r"^dataset\.download=maybe must be true or false, or null"),
    ("activations=true", r"^activations=true only applies to a quantized model; add quantize=fp8_e4m3"),
    ("keep_head=false", r"^keep_head=false only applies to a quantized model"),
    # language-model runs' samples and export (more in tests/test_lm_evaluate.py)
    ("generate=maybe", r"^generate=maybe must be true or false"),
    ("generate=true prompt=", r"^prompt='' must be non-empty text, or null \(null = a new line\)"),
    ("generate=true max_new_tokens=0", r"^max_new_tokens=0 must be a positive integer"),
    ("generate=true temperature=-0.5", r"^temperature=-0\.5 must be a non-negative number \(0 = greedy\)"),
    ("generate=true top_k=0", r"^top_k=0 must be a positive integer, or null"),
    ("generate=true seed=-1", r"^seed=-1 must be a non-negative integer below 2\*\*64"),
    ("generate=true temperature=0 samples=2", r"^samples=2 with temperature=0: greedy decoding gives one text"),
    ("export=[a]", r"^export=\[a\] must be a folder path, or null"),
    # language-model runs' zero-shot tasks (more in tests/test_zero_shot_evaluate.py)
    ("zero_shot.task=boolq", r"^zero_shot\.task=boolq must be one of lambada, hellaswag, piqa, or null"),
    ("zero_shot.task=lambada zero_shot.path=5", r"^zero_shot\.path=5 must be the task's released jsonl file"),
    ("zero_shot.task=piqa zero_shot.path=a.jsonl zero_shot.labels=5", r"^zero_shot\.labels=5 must be PIQA's labels"),
]


@pytest.mark.parametrize("argument,says", BAD_EVALUATE, ids=[c[0] for c in BAD_EVALUATE])
def test_bad_evaluate_argument(argument, says):
    """``python -m stackwise_bench.evaluate checkpoint=... <argument>``: refused before any run is read."""
    from stackwise_bench.evaluate import parse_args

    argv = (
        [argument]
        if argument.startswith("checkpoint=")
        else ["checkpoint=multirun/AugmFP16/seed=42", *argument.split()]
    )
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".") and re.search(says, message), message


BAD_EVALUATE_STUDY = [
    ("study=a/b", r"^study=a/b must be a plain folder name"),
    ("plan=2", r"^plan=2 must be true or false"),
    ("evaluate.runs=null", r"^evaluate\.runs=null must be the folder of the study whose runs are evaluated"),
    ("evaluate.checkpoint=first", r"^evaluate\.checkpoint=first must be best or last"),
    ("evaluate.quantize=int3", r"^evaluate\.quantize=int3 must be one of fp8_e4m3, fp8_e5m2, int8, int4, or null"),
    ("evaluate.quantize=int4 evaluate.group_size=-4", r"^evaluate\.group_size=-4 must be a positive integer"),
    ("evaluate.group_size=64", r"^evaluate\.group_size=64 only applies to evaluate\.quantize=int4 \(not evaluate\."),
    (
        "evaluate.quantize=int4 evaluate.activations=true",
        r"^evaluate\.activations=true applies to the FP8 formats only \(evaluate\.quantize=int4 is weight-only",
    ),
    ("evaluate.keep_head=2", r"^evaluate\.keep_head=2 must be true or false"),
    ("evaluate.activations=maybe", r"^evaluate\.activations=maybe must be true or false"),
    ("evaluate.quantize=null evaluate.activations=true", r"^evaluate\.activations=true only applies to a quantized"),
    ("evaluate.zero_shot.task=boolq", r"^evaluate\.zero_shot\.task=boolq must be one of lambada, hellaswag, piqa"),
    ("evaluate.zero_shot.task=lambada evaluate.zero_shot.path=5", r"^evaluate\.zero_shot\.path=5 must be the task's"),
    (
        "evaluate.zero_shot.task=piqa evaluate.zero_shot.path=a.jsonl evaluate.zero_shot.labels=5",
        r"^evaluate\.zero_shot\.labels=5 must be PIQA's labels file",
    ),
]


@pytest.mark.parametrize("overrides,says", BAD_EVALUATE_STUDY, ids=[c[0] for c in BAD_EVALUATE_STUDY])
def test_bad_evaluation_study_knob(overrides, says):
    """``python -m stackwise_bench.evaluate --multirun experiment=FP8Test <overrides>``: each job refuses in one
    sentence before it reads any run (the sweep's failure table records it)."""
    from hydra import compose, initialize_config_dir

    from stackwise_bench.evaluate import study_job

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate_study", overrides=["experiment=FP8Test", *overrides.split()])
    with pytest.raises(ConfigError) as info:
        study_job(cfg, job=None)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".") and re.search(says, message), message


# --- keys no config has: a + typo (Hydra's own advice for an unknown key) is refused by name --------------------


def test_misspelt_added_key_is_refused_naming_the_real_one(tmp_path, cfg_factory):
    """``+trainer.max_epoch=3`` reached the Trainer as a keyword (TypeError traceback); now one sentence, first."""
    from stackwise_bench.knobs import check_config

    r = refuse(cfg_factory(["+trainer.max_epoch=3"]), tmp_path / "r")
    assert r.message == (
        "trainer.max_epoch=3 is not a key of trainer (did you mean trainer.max_epochs?); use e.g. trainer.max_epochs=3."
    )
    assert not r.problems, r.problems
    # what is not a typo still passes: a timm model's extra keyword (create_model checks it), a monitor of one's own
    check_config(compose(["model=vit_micro_p4", "+model.qkv_bias=false"]))
    check_config(compose(["+monitors.mine._target_=my.Monitor", "+monitors.mine.every=3"]))


ADDED_KEYS = [
    ("+optimizer.weight_decai=0.1", r"^optimizer\.weight_decai=0\.1 is not a key of optimizer \(did you mean optimiz"),
    ("+lora.vera.d_init=0.2", r"^lora\.vera\.d_init=0\.2 is not a key of lora\.vera \(did you mean lora\.vera\.d_ini"),
    ("+dataset.rooot=x", r"\(did you mean dataset\.root\?\); use e\.g\. dataset\.root=x\.$"),
    ("+foo=1", r"^foo=1 is not a config key, and none is close to it; remove it\.$"),
    ("+trainer.zzzzqq=1", r"^trainer\.zzzzqq=1 is not a key of trainer, and none is close to it; remove it\.$"),
]


@pytest.mark.parametrize("override,says", ADDED_KEYS, ids=[c[0] for c in ADDED_KEYS])
def test_unknown_added_key_in_any_group(override, says):
    assert re.search(says, _knob_message(compose([override]))), override


def test_unknown_key_in_an_evaluation_study():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from stackwise_bench.knobs import check_evaluate_study_config

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="evaluate_study", overrides=["experiment=FP8Test", "+evaluate.quantise=int8"])
    with pytest.raises(ConfigError, match=r"^evaluate\.quantise=int8 is not a key of evaluate \(did you mean evalua"):
        check_evaluate_study_config(cfg)


# --- the command line: a refusal is one line, and leaves nothing behind ------------------------------------------


def cli(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "stackwise_bench.train", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_refused_run_prints_one_line_and_leaves_no_folder(tmp_path):
    """VeRA on a ResNet is refused after peft (and, through transformers, torchao) was imported: no torch
    deprecation lines before the sentence, and no ``multirun/single-runs/<date>/<time>/`` folder marked failed."""
    out = cli(["lora.method=vera", "lora.rank=4", *TINY], tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = (out.stdout + out.stderr).splitlines()
    assert len(lines) == 1 and "lora.method=vera cannot be built on resnet8" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_refusals_without_a_record_or_in_a_used_folder(tmp_path):
    """``train experiment=FP8Test`` made a folder with no summary.json; a refused run in a folder that held
    something before keeps that folder."""
    out = cli(["experiment=FP8Test"], tmp_path)
    assert out.returncode == 2 and "trains nothing" in out.stdout + out.stderr, out.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []
    used = tmp_path / "mine"
    used.mkdir()
    (used / "notes.txt").write_text("kept")
    out = cli([f"hydra.run.dir={used}", "lora.rank=-1", *TINY], tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert (used / "notes.txt").read_text() == "kept" and read_summary(used)["error"]["reason"] == "config"


@pytest.mark.slow
def test_unwritable_output_folder_is_one_sentence_before_hydra_writes(tmp_path):
    """A file where a folder of hydra.run.dir should be (what a read-only or full disk does to a mkdir, for root
    too): Hydra's OSError traceback from writing .hydra/ before; now one sentence naming the folder and the key."""
    (tmp_path / "disk").write_text("a file, not a folder")
    out = cli([f"hydra.run.dir={tmp_path / 'disk' / 'run'}", *TINY], tmp_path)
    assert out.returncode == 2
    lines = (out.stdout + out.stderr).splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, lines
    assert f"hydra.run.dir={tmp_path / 'disk' / 'run'} cannot be written ({tmp_path / 'disk'} is a file" in lines[0]
