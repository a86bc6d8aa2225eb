"""Every option of every config group composes, binds to its _target_ and instantiates."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF

GROUPS = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in CONF.iterdir() if p.is_dir()}
OPTIONS = [(g, o) for g, opts in sorted(GROUPS.items()) for o in opts]


def targets(node, path=""):
    """Every mapping with a _target_ inside a YAML tree, with its dotted path."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            yield from targets(value, f"{path}.{key}" if path else str(key))


def resolve_target(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_groups_are_the_designed_ones():
    for group, first in {
        "model": "resnet8",
        "dataset": "digits",
        "precision": "fp32",
        "augmentation": "basic",
        "optimizer": "adamw",
        "scheduler": "cosine",
        "lora": "default",
        "trainer": "default",
        "monitors": "default",
    }.items():
        assert first in GROUPS[group]
    assert {"resnet8", "resnet14", "deit_tiny", "deit_small", "vit_tiny_p4"} <= set(GROUPS["model"])
    assert {"digits", "cifar10", "cifar100", "synthetic"} <= set(GROUPS["dataset"])
    assert {"fp32", "fp16", "bf16"} <= set(GROUPS["precision"])


def signature_of(target):
    """What a target's YAML keys must bind to.

    The Trainer's YAML also holds the runtime's knobs (build_runtime takes those) and the task's and step
    parts' (build_task and build_parts read build.PART_KEYS), and Hydra's launcher plugins take ``**kwargs``,
    so their keys are bound against the plugin's config schema instead.
    """
    from stackwise_bench.build import GROUP_KEYS, PART_KEYS
    from stackwise_bench.training.runtime import RUNTIME_KEYS, Runtime
    from stackwise_bench.training.trainer import Trainer

    if target is Trainer:
        trainer, runtime = inspect.signature(Trainer), inspect.signature(Runtime.create)
        params = [p for p in trainer.parameters.values() if p.name != "runtime"]
        params += [runtime.parameters[k] for k in RUNTIME_KEYS]
        params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in PART_KEYS + GROUP_KEYS]
        return inspect.Signature(sorted(params, key=lambda p: p.kind))
    module = getattr(target, "__module__", "")
    if module.startswith("hydra_plugins."):
        return launcher_schema(target)
    return inspect.signature(target)


def launcher_schema(launcher):
    """A signature with one keyword per field of the launcher plugin's registered config dataclass."""
    import dataclasses

    target = f"{launcher.__module__}.{launcher.__name__}"
    schemas = importlib.import_module(launcher.__module__.rpartition(".")[0] + ".config")  # what Hydra validates with
    for schema in vars(schemas).values():
        if dataclasses.is_dataclass(schema) and getattr(schema, "_target_", None) == target:
            fields = [f.name for f in dataclasses.fields(schema) if f.name != "_target_"]
            return inspect.Signature([inspect.Parameter(f, inspect.Parameter.KEYWORD_ONLY) for f in fields])
    raise AssertionError(f"no config schema registered for {target}")


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF)))
def test_every_target_binds_its_yaml_keys(path: Path):
    """torchtune's trick: a typo in any YAML key fails here, without building anything."""
    tree = yaml.safe_load(path.read_text()) or {}
    for where, node in targets(tree):
        fn = resolve_target(node["_target_"])
        keys = {k: v for k, v in node.items() if not k.startswith("_") and k != "defaults"}  # defaults: Hydra's list
        signature_of(fn).bind_partial(**keys)  # raises TypeError on an unknown key
        assert keys or where or not signature_of(fn).parameters, f"{path}: empty target"


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local", "submitit_slurm"])
def test_launcher_yaml_typo_is_caught(launcher):
    """The launcher binding can fail: a misspelt key of each launcher YAML is refused."""
    node = yaml.safe_load((CONF / "hydra" / "launcher" / f"{launcher}.yaml").read_text())
    with pytest.raises(TypeError):
        signature_of(resolve_target(node["_target_"])).bind_partial(timeout_minutes=60)


@pytest.mark.slow
@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option, cfg_factory):
    if group == "experiment":
        cfg = cfg_factory([f"experiment={option}"])
    else:
        cfg = cfg_factory([f"{group}={option}"])
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group == "experiment":
        assert container["study"] == option  # each preset names its own study folder
    else:
        chosen = yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}
        # logger options can be chosen together (logger=[tensorboard,trackio]): each lands under its own name
        composed = container[group][option] if group == "logger" and chosen else container.get(group) or {}
        for key, value in chosen.items():  # the option's own values are what got composed
            interpolation = isinstance(value, str) and value.startswith("${")  # resolved above by to_container
            if key != "defaults" and not isinstance(value, dict) and not interpolation:
                assert composed[key] == value, (group, option, key)


@pytest.mark.slow
@pytest.mark.parametrize("option", GROUPS["model"])
def test_every_model_instantiates(option, cfg_factory):
    import torch

    if "causal_lm" in OmegaConf.load(CONF / "model" / f"{option}.yaml")["_target_"]:  # a language model
        cfg = cfg_factory([f"model={option}", "dataset=shakespeare"])
        # Two blocks at most: gpt2_large's 36 take 40 s to initialise on a CPU; the published sizes' exact parameter
        # counts are checked on the meta device (tests/test_causal_lm.py).
        model = instantiate(cfg.model, vocab_size=256, n_layer=min(cfg.model.n_layer, 2))
        with torch.no_grad():
            assert model.eval()(torch.zeros(1, 8, dtype=torch.long)).logits.shape == (1, 8, 256)
        return
    if "bert" in OmegaConf.load(CONF / "model" / f"{option}.yaml")["_target_"]:  # an encoder: both of its heads
        cfg = cfg_factory([f"model={option}", "dataset=shakespeare"])
        depth = min(cfg.model.n_layer, 2)  # the published sizes' counts: tests/test_bert_train.py, on the meta device
        x = torch.zeros(1, 8, dtype=torch.long)
        with torch.no_grad():
            model = instantiate(cfg.model, vocab_size=260, pad_token_id=256, n_layer=depth)
            assert model.eval()(input_ids=x).logits.shape == (1, 8, 260)
            model = instantiate(
                cfg.model, vocab_size=260, pad_token_id=256, n_layer=depth, head="classifier", num_labels=3
            )
            assert model.eval()(input_ids=x).logits.shape == (1, 3)
        return
    cfg = cfg_factory([f"model={option}", "model.pretrained=false"])
    model = instantiate(cfg.model, num_classes=10)
    x = torch.randn(1, 3, cfg.model.img_size, cfg.model.img_size)
    with torch.no_grad():
        assert model.eval()(x).shape == (1, 10)


@pytest.mark.parametrize("option", GROUPS["augmentation"])
def test_every_augmentation_instantiates(option, cfg_factory):
    import torch

    aug = instantiate(cfg_factory([f"augmentation={option}"]).augmentation)
    x = torch.rand(4, 3, 32, 32)
    assert aug(x, torch.Generator().manual_seed(0)).shape == x.shape
    assert aug.enabled == (option != "none")


@pytest.mark.parametrize("option", ["digits", "synthetic"])
def test_offline_datasets_instantiate(option, cfg_factory):
    data = instantiate(cfg_factory([f"dataset={option}"]).dataset)
    assert data.train_x.dtype.is_floating_point is False and data.train_x.shape[1:] == (3, 32, 32)
    assert len(data.val_y) > 0 and len(data.test_y) > 0


@pytest.mark.parametrize("optimizer", GROUPS["optimizer"])
@pytest.mark.parametrize("scheduler", GROUPS["scheduler"])
def test_optimizer_and_scheduler_instantiate(optimizer, scheduler, cfg_factory):
    import torch

    cfg = cfg_factory([f"optimizer={optimizer}", f"scheduler={scheduler}"])
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = instantiate(cfg.optimizer, model=model)
    sched = instantiate(cfg.scheduler, optimizer=opt, steps_per_epoch=10, max_epochs=2)
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays[0] == 0.0 and decays[-1] == cfg.optimizer.weight_decay
    no_decay = next(g for g in opt.param_groups if g["weight_decay"] == 0.0)
    assert len(no_decay["params"]) == 3  # linear bias, norm weight, norm bias
    for _ in range(20):
        opt.step()
        sched.step()
    lr = opt.param_groups[0]["lr"]
    assert lr == pytest.approx(0.0, abs=1e-12) if scheduler == "cosine" else lr == pytest.approx(cfg.optimizer.lr)


@pytest.mark.slow
@pytest.mark.parametrize("precision", GROUPS["precision"])
def test_trainer_and_monitors_instantiate(precision, cfg_factory):

    from stackwise_bench.build import build_runtime, build_trainer

    cfg = cfg_factory([f"precision={precision}"])
    if precision == "fp8":  # needs FP8 tensor cores: refused on the CPU (test_fp8.py; on a GPU: test_gpu.py)
        with pytest.raises(Exception, match=r"precision=fp8 needs .*compute capability 8\.9"):
            build_runtime(cfg)
        return
    trainer = build_trainer(cfg, build_runtime(cfg))
    assert trainer.runtime.precision == precision and str(trainer.device) == "cpu"
    monitors = [instantiate(node) for node in cfg.monitors.values()]
    assert monitors and all(hasattr(m, "start") and hasattr(m, "stop") for m in monitors)


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local", "submitit_slurm"])
def test_every_launcher_composes_with_our_defaults(launcher):
    """Each launcher YAML composes into the app's Hydra config and resolves (submitit_slurm's requeue defaults too)."""
    from hydra import compose, initialize_config_dir

    from stackwise_bench.runs.job import cores_per_job, default_n_jobs  # registers ${sb.n_jobs:}

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    chosen = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    written = yaml.safe_load((CONF / "hydra" / "launcher" / f"{launcher}.yaml").read_text())
    assert chosen["_target_"] == written["_target_"]
    if launcher == "joblib":
        assert chosen["n_jobs"] == default_n_jobs() and cores_per_job(chosen["n_jobs"]) >= 1
    else:
        assert chosen["submitit_folder"].endswith("multirun/default/.submitit/%j")
    if launcher == "submitit_slurm":
        assert (chosen["gpus_per_node"], chosen["max_num_timeout"], chosen["signal_delay_s"]) == (1, 5, 120)
