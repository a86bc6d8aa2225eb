"""optimizer.layer_decay: per-layer learning rates of a ViT (timm's grouping), applied by our scheduler."""

from __future__ import annotations

import pytest
import timm

from stackwise_bench.build import build_model
from stackwise_bench.errors import ConfigError
from stackwise_bench.train import run
from stackwise_bench.training.optim import build_optimizer, build_scheduler
from stackwise_bench.training.trainer import base_lr

from conftest import compose, read_summary

DEPTH, DECAY, LR, WD = 2, 0.5, 1e-3, 0.05


@pytest.fixture
def vit():
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, embed_dim=32, depth=DEPTH, num_heads=2,
        num_classes=4,
    )  # fmt: skip


def expected_layer(name: str) -> int:
    """BEiT's numbering, written out: embeddings 0, block i at i + 1, the head (and fc_norm) at depth + 1.

    The final ``norm`` of a class-token ViT shares the last block's layer: timm's ViT matcher maps it to
    MATCH_PREV_GROUP on purpose (BEiT put it at the top).
    """
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith("norm."):
        return DEPTH
    return DEPTH + 1


def group_of(optimizer, param) -> dict:
    (group,) = [g for g in optimizer.param_groups if any(p is param for p in g["params"])]
    return group


def test_lr_scale_is_decay_to_the_layers_above(vit):
    optimizer = build_optimizer(vit, "adamw", lr=LR, weight_decay=WD, layer_decay=DECAY)
    seen = set()
    for name, p in vit.named_parameters():
        group = group_of(optimizer, p)
        scale = DECAY ** (DEPTH + 1 - expected_layer(name))
        assert group["lr_scale"] == pytest.approx(scale), name
        assert group["lr"] == pytest.approx(LR * scale), name  # LambdaLR scales each group's initial rate
        # our no-decay rule survives the regrouping: matrices decay; norms, biases and the learned tokens do not
        free = name in ("pos_embed", "cls_token")
        assert group["weight_decay"] == (WD if p.ndim > 1 and not free else 0.0), name
        seen.add(expected_layer(name))
    assert seen == set(range(DEPTH + 2))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(vit.parameters()))


def test_the_scheduler_keeps_the_per_layer_ratios(vit):
    optimizer = build_optimizer(vit, "adamw", lr=LR, weight_decay=WD, layer_decay=DECAY)
    scheduler = build_scheduler(optimizer, "cosine", steps_per_epoch=10, max_epochs=3, warmup_epochs=1)
    for _ in range(17):  # into the cosine part, past the warmup
        optimizer.step()
        scheduler.step()
    head = group_of(optimizer, vit.head.weight)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(head["lr"] * group["lr_scale"])
    assert 0 < base_lr(optimizer) == pytest.approx(head["lr"])  # the row's "lr" is the unscaled rate


def test_off_keeps_the_two_groups(vit):
    groups = build_optimizer(vit, "adamw", lr=LR, weight_decay=WD).param_groups
    assert len(groups) == 2 and all("lr_scale" not in g for g in groups)
    one = build_optimizer(vit, "adamw", lr=LR, weight_decay=WD, layer_decay=1.0).param_groups
    assert all(g["lr"] == LR for g in one)


def test_lora_adapters_are_grouped_by_the_block_they_sit_in():
    cfg = compose(["model=vit_micro_p4", "lora.rank=2"])
    model, _, _ = build_model(cfg, num_classes=4)
    optimizer = build_optimizer(model, "adamw", lr=LR, weight_decay=WD, layer_decay=DECAY)
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" in name:
            block = int(name.split("blocks.")[1].split(".")[0])
            assert group_of(optimizer, p)["lr_scale"] == pytest.approx(DECAY ** (DEPTH - block)), name


def test_a_model_timm_cannot_group_is_refused():
    from stackwise_bench.nn.models import create_model

    with pytest.raises(ConfigError, match=r"^optimizer\.layer_decay=0\.75 needs a model timm can number by layer"):
        build_optimizer(create_model("resnet8", 4), "sgd", lr=0.1, layer_decay=0.75)


def test_depth_time_with_layer_decay_is_refused_before_training(tmp_path):
    cfg = compose(["model=vit_micro_p4", "regime=depth_time", "optimizer.layer_decay=0.75", "monitors=none"])
    with pytest.raises(ConfigError, match=r"optimizer\.layer_decay sets per-layer learning rates .* regime=depth_t"):
        run(cfg, tmp_path / "r")
    assert read_summary(tmp_path / "r")["error"]["reason"] == "config"
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
