"""create_model: every configured model builds and runs; weights load or fail with a clear ConfigError."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.models import create_model
from stackwise_bench.nn.resnet import BasicBlock

ROOT = Path(__file__).resolve().parents[1]
# The image models' options; the causal language models' (gpt_*, llama_*) are tests/test_lm_train.py's, the
# encoders' (bert_*) tests/test_bert_train.py's.
MODEL_CONFIGS = sorted(
    p
    for p in (ROOT / "conf" / "model").glob("*.yaml")
    if not any(k in yaml.safe_load(p.read_text())["_target_"] for k in ("causal_lm", "nn.bert"))
)
IMG_SIZE = {"resnet8": 32, "resnet14": 32, "vit_tiny_p4": 32, "vit_micro_p4": 8, "deit_tiny": 224, "deit_small": 224}


def _weighted_layers(model):
    """Convs and Linears on the main path (shortcut projections excluded), as in the 6n+2 count."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in n]


def _same_weights(a: dict, b: dict, skip: str = "<none>") -> bool:
    return all(torch.equal(a[k], b[k]) for k in a if not k.startswith(skip))


def test_model_configs_cover_every_option():
    assert {p.stem for p in MODEL_CONFIGS} == set(IMG_SIZE)


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_model_config_binds_and_sizes_match(path):
    cfg = yaml.safe_load(path.read_text())
    target = cfg.pop("_target_")
    assert target == "stackwise_bench.nn.models.create_model"
    inspect.signature(create_model).bind(num_classes=10, **cfg)  # TypeError on a key create_model lacks
    assert cfg["img_size"] == IMG_SIZE[cfg["name"]]
    assert cfg["pretrained"] is cfg["name"].startswith("deit")
    from stackwise_bench.nn.models import TIMM_ALIASES

    sizes = {k: v for k, v in cfg.items() if k not in inspect.signature(create_model).parameters}
    assert sizes == {k: v for k, v in TIMM_ALIASES.get(cfg["name"], ("", {}))[1].items() if k in sizes}


@pytest.mark.parametrize("name", sorted(IMG_SIZE))
def test_forward_shape_at_native_size(name):
    torch.manual_seed(0)
    size = IMG_SIZE[name]
    batch = 2 if size == 32 else 1  # DeiT at 224 px: one image keeps it cheap
    model = create_model(name, num_classes=7, img_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, size, size))
    assert out.shape == (batch, 7)
    assert torch.isfinite(out).all()


def test_hydra_instantiate_passes_num_classes():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "model" / "resnet8.yaml")
    model = instantiate(cfg, num_classes=3)
    assert model.head.out_features == 3


@pytest.mark.parametrize("name, blocks, layers", [("resnet8", 1, 8), ("resnet14", 2, 14)])
def test_resnet_layout(name, blocks, layers):
    model = create_model(name, num_classes=10)
    for stage in ("stage1", "stage2", "stage3"):
        assert len(getattr(model, stage)) == blocks
        assert all(isinstance(b, BasicBlock) for b in getattr(model, stage))
    assert [c.out_channels for c in (model.stage1[0].conv2, model.stage2[0].conv2, model.stage3[0].conv2)] == [
        16,
        32,
        64,
    ]
    assert len(_weighted_layers(model)) == layers  # 6n + 2
    assert isinstance(model.stem.conv, nn.Conv2d) and model.stem.conv.kernel_size == (3, 3)
    assert isinstance(model.head, nn.Linear) and model.head.in_features == 64


def test_resnet_stages_can_be_hooked():
    model = create_model("resnet8", num_classes=10)
    shapes = {}
    for stage in ("stem", "stage1", "stage2", "stage3"):
        getattr(model, stage).register_forward_hook(lambda m, i, o, s=stage: shapes.__setitem__(s, tuple(o.shape)))
    model(torch.randn(2, 3, 32, 32))
    assert shapes == {
        "stem": (2, 16, 32, 32),
        "stage1": (2, 16, 32, 32),
        "stage2": (2, 32, 16, 16),
        "stage3": (2, 64, 8, 8),
    }


@pytest.mark.slow
def test_resnet_run_imports_neither_timm_nor_peft():
    code = (
        "import sys; from stackwise_bench.nn.models import create_model; "
        "from stackwise_bench.nn.lora import apply_lora, count_parameters; "
        "m = apply_lora(create_model('resnet8', 10), rank=0); count_parameters(m); "
        "print(sorted(k for k in ('timm', 'peft', 'transformers') if k in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_name_is_config_error():
    with pytest.raises(ConfigError, match=r"model\.name=resnet9 .*timm\.list_models"):
        create_model("resnet9", num_classes=10)


@pytest.mark.parametrize("name", ["resnet8", "resnet14"])
def test_resnet_pretrained_points_to_checkpoint_path(name):
    with pytest.raises(ConfigError, match=r"model\.pretrained=true: .*model\.checkpoint_path"):
        create_model(name, num_classes=10, pretrained=True)


def test_resnet_rejects_timm_only_kwargs():
    with pytest.raises(ConfigError, match=r"model\.global_pool="):
        create_model("resnet8", num_classes=10, global_pool="avg")


@pytest.mark.parametrize("hub_state", ["offline_env", "unreachable"])
def test_pretrained_without_weights_fails_fast(monkeypatch, tmp_path, hub_state):
    import timm  # noqa: F401  (import cost is not what is timed)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    # huggingface_hub reads HF_HUB_OFFLINE from the environment once, at import; set the flag itself.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", hub_state == "offline_env")
    if hub_state == "unreachable":  # online mode: exercises the reachability probe
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    # Failing fast means never handing timm a download while the hub is out of reach: offline,
    # huggingface_hub's own retries (1+2+4+8+8 s per file) took ~47 s here. Every build timm was asked
    # for ran in cache-only mode; how long that takes is the benchmark's business, not a test's.
    from stackwise_bench.nn import models

    builds = []
    real_build = models._build_timm
    monkeypatch.setattr(
        models, "_build_timm", lambda *a, **k: builds.append(constants.HF_HUB_OFFLINE) or real_build(*a, **k)
    )
    with pytest.raises(ConfigError) as err:
        create_model("deit_tiny", num_classes=10, pretrained=True, img_size=224)
    assert builds == [True]  # one cache-only attempt, then the reachability answer: no online download was tried
    msg = str(err.value)
    assert msg.startswith("model.pretrained=true: could not fetch timm weights for deit_tiny_patch16_224 (")
    assert msg.endswith("; use model.pretrained=false or model.checkpoint_path=<local file>.")
    assert "HF_HUB_OFFLINE is set" in msg if hub_state == "offline_env" else "127.0.0.1 is unreachable" in msg
    assert constants.HF_HUB_OFFLINE is (hub_state == "offline_env")  # the cache-only switch is restored


def test_resnet_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    source = create_model("resnet8", num_classes=10)
    source(torch.randn(4, 3, 32, 32))  # move BN running stats away from their init
    path = tmp_path / "r8.pt"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)  # trainer-style checkpoint

    torch.manual_seed(1)
    same = create_model("resnet8", num_classes=10, checkpoint_path=str(path))
    assert _same_weights(source.state_dict(), same.state_dict())

    torch.save(source.state_dict(), path)  # bare state_dict, new class count: head re-initialised
    other = create_model("resnet8", num_classes=100, checkpoint_path=path)
    assert other.head.out_features == 100
    assert _same_weights(source.state_dict(), other.state_dict(), skip="head.")


def test_timm_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    source = create_model("vit_tiny_p4", num_classes=10)
    path = tmp_path / "vit.pt"
    torch.save(source.state_dict(), path)
    same = create_model("vit_tiny_p4", num_classes=10, checkpoint_path=str(path))
    assert _same_weights(source.state_dict(), same.state_dict())  # head kept when the class count matches
    other = create_model("vit_tiny_p4", num_classes=5, checkpoint_path=str(path))
    assert other.head.out_features == 5
    assert _same_weights(source.state_dict(), other.state_dict(), skip="head.")


@pytest.mark.parametrize("target, source", [("resnet8", "resnet14"), ("vit_tiny_p4", "resnet8")])
def test_mismatched_checkpoint_is_config_error(tmp_path, target, source):
    path = tmp_path / f"{source}.pt"
    torch.save(create_model(source, num_classes=10).state_dict(), path)
    with pytest.raises(ConfigError, match=r"model\.checkpoint_path=.* does not fit .*([Mm]issing|[Uu]nexpected)"):
        create_model(target, num_classes=10, checkpoint_path=str(path))


@pytest.mark.parametrize("name", ["resnet8", "vit_tiny_p4"])
def test_unreadable_or_missing_checkpoint_is_config_error(tmp_path, name):
    with pytest.raises(ConfigError, match=r"model\.checkpoint_path=.* is not a file"):
        create_model(name, num_classes=10, checkpoint_path=str(tmp_path / "absent.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=r"model\.checkpoint_path=.* could not be read"):
        create_model(name, num_classes=10, checkpoint_path=str(junk))
