"""apply_lora / count_parameters: exact adapter counts, only adapters + head train, resumable state."""

import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.lora import adapted_layers, apply_lora, count_parameters, default_targets
from stackwise_bench.nn.models import create_model

LORA_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "lora" / "default.yaml"


def _vit(seed: int = 0, num_classes: int = 10):
    torch.manual_seed(seed)
    return create_model("vit_tiny_p4", num_classes=num_classes, img_size=32)


def _sgd_step(model, seed: int = 0):
    torch.manual_seed(seed)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_default_config_binds_and_means_full_finetuning():
    cfg = OmegaConf.load(LORA_CONFIG)
    shared = {k: v for k, v in OmegaConf.to_container(cfg).items() if not isinstance(v, dict)}
    assert shared == {
        "method": "lora",
        "rank": 0,
        "alpha": None,
        "dropout": 0.1,
        "target_modules": None,  # the model family's own
        "head": "head",
    }
    sections = {k for k, v in OmegaConf.to_container(cfg).items() if isinstance(v, dict)}
    assert sections == {"pissa", "adalora", "loha", "lokr", "vera", "oft", "qalora", "qlora"}
    inspect.signature(apply_lora).bind(torch.nn.Linear(1, 1), **cfg)
    model = create_model("resnet8", num_classes=10)
    assert apply_lora(model, **cfg) is model


def test_family_default_targets_never_hit_the_patch_embedding():
    vit = _vit()
    names = adapted_layers(vit, default_targets(vit))
    assert names == [f"blocks.{i}.attn.qkv" for i in range(len(vit.blocks))]
    assert "patch_embed.proj" in adapted_layers(vit, ["proj"])  # the trap the default avoids
    resnet = create_model("resnet8", num_classes=10)
    assert adapted_layers(resnet, default_targets(resnet)) == [
        f"stage{s}.0.conv{c}" for s in (1, 2, 3) for c in (1, 2)
    ]  # not the stem conv, not the 1x1 downsample shortcuts


@pytest.mark.parametrize("name, rank", [("deit_tiny", 0), ("deit_tiny", 2), ("deit_tiny", 8), ("deit_small", 8)])
def test_parameter_counts_match_lora_formula(name, rank):
    classes = 10
    model = create_model(name, num_classes=classes, img_size=224)
    d, depth = model.embed_dim, len(model.blocks)  # read from the model, not assumed
    assert model.blocks[0].attn.qkv.out_features == 3 * d
    base = count_parameters(model)["total"]

    counts = count_parameters(apply_lora(model, rank=rank))
    lora = depth * rank * (d + 3 * d)  # per block: A is r x d, B is 3d x r; i.e. 48 d r for 12 blocks
    head = d * classes + classes
    assert counts["lora"] == lora
    if rank == 0:
        assert counts["trainable"] == counts["total"] == base
    else:
        assert counts["trainable"] == lora + head
        assert counts["total"] == base + lora + head  # peft keeps the frozen original head next to its copy
    assert counts["size_mb"] >= counts["total"] * 4 / 2**20


def test_only_adapters_and_head_are_trainable_and_change():
    model = apply_lora(_vit(), rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("modules_to_save" in n and n.endswith("head.modules_to_save.default.weight") for n in trainable)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _sgd_step(model)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert "base_model.model.blocks.0.attn.qkv.lora_B.default.weight" in changed  # B starts at zero
    assert "base_model.model.head.modules_to_save.default.weight" in changed
    assert changed <= trainable
    for frozen in ("blocks.0.attn.qkv.base_layer.weight", "head.original_module.weight", "patch_embed.proj.weight"):
        assert f"base_model.model.{frozen}" not in changed
        assert after[f"base_model.model.{frozen}"].grad is None


def test_state_dict_resumes_into_a_rebuilt_model(tmp_path):
    trained = apply_lora(_vit(seed=0), rank=4)
    _sgd_step(trained)
    path = tmp_path / "last.pt"
    torch.save(trained.state_dict(), path)

    rebuilt = apply_lora(_vit(seed=1), rank=4)  # what the trainer does on resume
    x = torch.randn(2, 3, 32, 32)
    trained.eval(), rebuilt.eval()
    with torch.no_grad():
        assert not torch.allclose(trained(x), rebuilt(x))
        rebuilt.load_state_dict(torch.load(path, weights_only=True))  # strict
        torch.testing.assert_close(rebuilt(x), trained(x))


def test_alpha_dropout_and_hydra_call_site():
    cfg = OmegaConf.load(LORA_CONFIG)
    cfg.rank = 4  # as `lora.rank=4` on the command line; target_modules stays a ListConfig
    qkv = apply_lora(_vit(), **cfg).get_submodule("base_model.model.blocks.0.attn.qkv")
    assert qkv.r["default"] == 4 and qkv.scaling["default"] == 2.0  # alpha null -> 2 * rank
    assert qkv.lora_dropout["default"].p == 0.1

    qkv = apply_lora(_vit(), rank=8, alpha=4, dropout=0.25).get_submodule("base_model.model.blocks.0.attn.qkv")
    assert qkv.scaling["default"] == 0.5 and qkv.lora_dropout["default"].p == 0.25


def test_lora_on_resnet_convs_and_frozen_head():
    model = apply_lora(create_model("resnet8", num_classes=10), rank=2, target_modules=["conv1", "conv2"], head=None)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    counts = count_parameters(model)
    assert counts["lora"] > 0 and counts["trainable"] == counts["lora"]  # head=None: adapters only


@pytest.mark.parametrize("rank", [-1, 2.5, "8a", True, None])
def test_bad_rank_is_config_error(rank):
    model = create_model("resnet8", num_classes=10)
    with pytest.raises(
        ConfigError,
        match=rf"^lora\.rank={rank} must be a non-negative integer \(0 = full fine-tuning\); "
        r"use e\.g\. lora\.rank=8\.$",
    ):
        apply_lora(model, rank=rank)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"alpha": 0}, "alpha"),
        ({"alpha": -2.0}, "alpha"),
        ({"alpha": "x"}, "alpha"),
        ({"dropout": -0.1}, "dropout"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": "a"}, "dropout"),
    ],
)
def test_bad_alpha_or_dropout_is_config_error(kwargs, key):
    model = _vit()
    with pytest.raises(ConfigError, match=rf"^lora\.{key}="):
        apply_lora(model, rank=4, **kwargs)
    assert count_parameters(model)["lora"] == 0  # rejected before peft touched the model


def test_unmatched_targets_list_the_model_layers():
    with pytest.raises(ConfigError) as err:
        apply_lora(create_model("resnet8", num_classes=10), rank=8, target_modules=["qkv"])
    msg = str(err.value)
    assert msg.startswith(
        "lora.target_modules=['qkv'] matches no module of this model; it has: stem.conv, "
        "stage1.0.conv1, stage1.0.conv2, stage2.0.conv1,"
    )
    assert msg.endswith(", head; set lora.target_modules to some of these or lora.rank=0.")

    with pytest.raises(ConfigError, match=r"it has: proj, qkv, fc1, fc2, head;"):  # 12 blocks, deduplicated
        apply_lora(_vit(), rank=8, target_modules=["q_proj"])


def test_missing_head_is_config_error():
    with pytest.raises(ConfigError, match=r"^lora\.head=fc names no module of this model"):
        apply_lora(_vit(), rank=4, head="fc")
