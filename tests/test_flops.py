"""stackwise_bench.training.flops: per-image training FLOPs (checked against FlopCounterMode by hand and against
the analytic counts of Linear layers and a ViT block), the cached FlopMeter, the peak table and MFU.

Tiny models on the CPU; no timing is asserted.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from stackwise_bench.nn.models import create_model
from stackwise_bench.training.flops import (
    PEAK_TFLOPS,
    FlopMeter,
    eval_flops_per_image,
    mfu,
    peak_flops,
    train_flops_per_image,
)

# conf/model/vit_micro_p4.yaml's sizes: 4 tokens (8 px in 4x4 patches) of width 64, 2 heads, MLP 128.
VIT = dict(
    pretrained=False,
    img_size=8,
    patch_size=4,
    embed_dim=64,
    depth=2,
    num_heads=2,
    mlp_ratio=2.0,
    global_pool="avg",
    class_token=False,
    weight_init="jax",
)
VIT_SHAPE = (3, 8, 8)
# Analytic FLOPs per image (2 per multiply-add). One block's forward: qkv, proj, fc1, fc2, then attention's two
# matmuls (q k^T and scores v) over 2 heads of 32 dims.
N, D, HID = 4, 64, 128
QKV, PROJ, FC1, FC2 = 2 * N * D * 3 * D, 2 * N * D * D, 2 * N * D * HID, 2 * N * HID * D
BLOCK_LINEARS = QKV + PROJ + FC1 + FC2  # 262144
ATTN = 2 * (2 * N * N * D)  # 4096: per head 2*N*N*32, 2 heads, 2 matmuls
BLOCK_FWD = BLOCK_LINEARS + ATTN  # 266240
PATCH = 2 * N * (3 * 4 * 4) * D  # the 4x4x3 -> 64 patch conv: 24576
HEAD = 2 * D * 10  # 1280


def vit(depth: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return create_model("vit_micro_p4", 10, **{**VIT, "depth": depth})


def resnet8(**kw) -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet8", 10, **kw)


def by_hand(model: nn.Module, shape, batch: int = 2) -> float:
    """FlopCounterMode around one forward + cross-entropy + backward, per image (math attention, as counted)."""
    x = torch.randn(batch, *shape)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss = F.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long))
        if loss.requires_grad:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def mlp() -> nn.Sequential:
    # 8 -> 16 -> 32 -> 10 on a (1, 2, 4) "image"; forward per sample: 2*in*out per layer
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))


MLP_SHAPE = (1, 2, 4)
L1, L2, L3 = 2 * 8 * 16, 2 * 16 * 32, 2 * 32 * 10  # 256, 1024, 640
MLP_FWD = L1 + L2 + L3


def freeze(*modules: nn.Module) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


@pytest.mark.parametrize("name", ["vit_micro_p4", "resnet8"])
@pytest.mark.parametrize("batch", [2, 3])
def test_per_image_count_is_flop_counter_mode_by_hand(name, batch):
    model, shape = (vit(), VIT_SHAPE) if name == "vit_micro_p4" else (resnet8(), (3, 32, 32))
    counted = train_flops_per_image(model, shape, num_classes=10, batch=batch)
    assert counted == by_hand(model, shape, batch=batch) > 0
    assert counted == train_flops_per_image(model, shape)  # per image, whatever the batch


@pytest.mark.slow
def test_vit_count_is_analytic_and_linear_in_depth():
    counts = {d: train_flops_per_image(vit(d), VIT_SHAPE) for d in (2, 4, 8)}
    # every block trains and gets input gradients (the patch embedding below it trains): 3x its forward. The
    # patch conv: forward + weight gradient (the images need none). The head: 3x.
    assert counts[2] == 2 * 3 * BLOCK_FWD + 2 * PATCH + 3 * HEAD == 1650432
    per_block = (counts[4] - counts[2]) / 2
    assert per_block == (counts[8] - counts[4]) / 4 == 3 * BLOCK_FWD
    assert by_hand(vit(4), VIT_SHAPE) - by_hand(vit(2), VIT_SHAPE) == counts[4] - counts[2]


def test_attention_is_counted_on_the_cpu():
    # CPU SDPA runs a fused kernel FlopCounterMode has no formula for: the count forces the math path
    model = vit()
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, *VIT_SHAPE))
    fwd = eval_flops_per_image(model, VIT_SHAPE)
    assert fwd == 2 * BLOCK_FWD + PATCH + HEAD
    assert counter.get_total_flops() / 2 in (fwd, fwd - 2 * ATTN)  # what plain counting sees on this torch


def test_linear_layers_analytic_backward():
    """What FlopCounterMode counts: forward 2*in*out per layer; a weight gradient as much again where the weight
    trains; an input gradient as much again where anything upstream trains (never for the images)."""
    m = mlp()
    assert eval_flops_per_image(m, MLP_SHAPE) == MLP_FWD
    assert train_flops_per_image(m, MLP_SHAPE) == MLP_FWD + L1 + 2 * L2 + 2 * L3 == 5504
    first_frozen = mlp()
    freeze(first_frozen[1])  # no backward at all in it, and none into layer 2's input
    assert train_flops_per_image(first_frozen, MLP_SHAPE) == MLP_FWD + L2 + 2 * L3 == 4224
    middle_frozen = mlp()
    freeze(middle_frozen[3])  # a frozen layer under a trained one, over a trained one: input gradient only
    assert train_flops_per_image(middle_frozen, MLP_SHAPE) == MLP_FWD + L1 + L2 + 2 * L3 == 4480
    only_head = mlp()
    freeze(only_head[1], only_head[3])
    assert train_flops_per_image(only_head, MLP_SHAPE) == MLP_FWD + L3 == 2560
    nothing = mlp()
    freeze(nothing)  # nothing trains: the step is its forward
    assert train_flops_per_image(nothing, MLP_SHAPE) == MLP_FWD
    for model in (m, first_frozen, middle_frozen, only_head, nothing):
        assert train_flops_per_image(model, MLP_SHAPE) == by_hand(model, MLP_SHAPE)


def test_frozen_blocks_cost_less():
    full = train_flops_per_image(vit(), VIT_SHAPE)
    top = vit()
    freeze(top.blocks[1])  # under a trained block: loses its weight gradients only
    assert train_flops_per_image(top, VIT_SHAPE) == full - BLOCK_LINEARS == by_hand(top, VIT_SHAPE)
    bottom = vit()
    freeze(bottom.patch_embed, bottom.blocks[0])
    bottom.pos_embed.requires_grad_(False)  # nothing below block 1 trains: no backward through block 0 at all
    expected = full - PATCH - 2 * BLOCK_LINEARS - 2 * ATTN
    assert train_flops_per_image(bottom, VIT_SHAPE) == expected == by_hand(bottom, VIT_SHAPE)


@pytest.mark.slow
def test_lora_counts_its_real_backward():
    from stackwise_bench.nn.lora import apply_lora

    model = apply_lora(vit(), rank=4)
    counted = train_flops_per_image(model, VIT_SHAPE)
    assert counted == by_hand(model, VIT_SHAPE)
    assert 2 * BLOCK_FWD + PATCH + HEAD < counted < train_flops_per_image(vit(), VIT_SHAPE)


def test_count_is_the_same_under_autocast_no_grad_and_in_bf16():
    m = mlp()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert train_flops_per_image(m, MLP_SHAPE) == 5504
    with torch.inference_mode():
        assert train_flops_per_image(m, MLP_SHAPE) == 5504
    assert train_flops_per_image(m.to(torch.bfloat16), MLP_SHAPE) == 5504
    assert next(m.parameters()).dtype == torch.bfloat16  # the live model keeps its dtype


def test_live_model_is_untouched():
    model = resnet8(drop_path_rate=0.2)  # BatchNorm statistics and drop-path's random draws, in train mode
    model.train()
    model.stage2.eval()  # a mixed mode must come back as it was
    model.head.weight.grad = torch.full_like(model.head.weight, 0.5)
    calls = []
    model.stem.register_forward_hook(lambda *_: calls.append(1))
    state = copy.deepcopy(model.state_dict())
    modes = {name: m.training for name, m in model.named_modules()}
    rng = torch.get_rng_state()
    train_flops_per_image(model, (3, 32, 32))
    eval_flops_per_image(model, (3, 32, 32))
    assert torch.equal(torch.get_rng_state(), rng)
    assert {name: m.training for name, m in model.named_modules()} == modes
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")
    assert torch.equal(model.head.weight.grad, torch.full_like(model.head.weight, 0.5))
    assert calls == []  # the copy ran none of the live model's hooks
    model.eval()
    assert train_flops_per_image(model, (3, 32, 32)) == train_flops_per_image(resnet8(), (3, 32, 32))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="input_shape"):
        train_flops_per_image(mlp(), (8,))
    with pytest.raises(ValueError, match="input_shape"):
        train_flops_per_image(mlp(), (1, 0, 8))
    with pytest.raises(ValueError, match="batch"):
        train_flops_per_image(mlp(), MLP_SHAPE, batch=0)
    with pytest.raises(ValueError, match="logits"):
        train_flops_per_image(mlp(), MLP_SHAPE, num_classes=100)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(x.flatten(1)), self.fc(x.flatten(1))

    with pytest.raises(TypeError, match="one logits tensor"):
        train_flops_per_image(Pair(), MLP_SHAPE)


def test_flop_meter_counts_once_per_architecture():
    calls = []

    def spy(model, input_shape):
        calls.append(FlopMeter.key(model, input_shape))
        return train_flops_per_image(model, input_shape)

    meter = FlopMeter(counter=spy)
    model = vit()
    first = meter.per_image(model, VIT_SHAPE)
    assert first == train_flops_per_image(model, VIT_SHAPE)
    assert meter.per_image(model, VIT_SHAPE) == first and meter.per_image(vit(), list(VIT_SHAPE)) == first
    assert len(calls) == 1  # same architecture, even another instance: cached

    model.blocks.append(copy.deepcopy(model.blocks[-1]))  # the model grows a block (depth-as-time)
    grown = meter.per_image(model, VIT_SHAPE)
    assert len(calls) == 2 and grown - first == 3 * BLOCK_FWD
    freeze(model.blocks[0])  # the frozen set changes: recount
    assert meter.per_image(model, VIT_SHAPE) < grown and len(calls) == 3
    for p in model.blocks[0].parameters():
        p.requires_grad_(True)
    assert meter.per_image(model, VIT_SHAPE) == grown and len(calls) == 3  # back to a known architecture
    cnn = resnet8()
    small, large = meter.per_image(cnn, (3, 16, 16)), meter.per_image(cnn, (3, 32, 32))
    assert len(calls) == 5 and large > small  # another input shape: another count


def test_flop_meter_total_round_trips_bit_for_bit():
    meter = FlopMeter()
    per = [1650432.0, 1650432.0 / 3, 2448512.5]
    for i, p in enumerate(per * 5):
        meter.add(32 + i, p)
    assert meter.images == sum(32 + i for i in range(15))
    state = json.loads(json.dumps(meter.state_dict()))  # plain python numbers: any checkpoint format keeps them
    assert type(meter.state_dict()["total"]) is float and type(meter.state_dict()["images"]) is int
    resumed = FlopMeter()
    resumed.load_state_dict(state)
    for m in (meter, resumed):
        for i, p in enumerate(per * 3):
            m.add(7 + i, p)
    assert resumed.total == meter.total and resumed.images == meter.images
    assert meter.add(0, 5.0) == meter.total
    with pytest.raises(ValueError, match="images"):
        meter.add(-1, 5.0)
    with pytest.raises(ValueError, match="per_image"):
        meter.add(1, float("nan"))


def test_peak_flops_by_device_name(monkeypatch):
    assert peak_flops("NVIDIA H200", "bf16") == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12  # the specific entry before plain H100
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32") == 66.9e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert peak_flops("NVIDIA A10G", "bf16") == 70e12  # not A10's
    assert peak_flops("Some Future GPU", "bf16") is None
    assert peak_flops("NVIDIA H200", "fp8") is None  # not tabulated
    assert peak_flops("NVIDIA L40", "bf16") == 181.05e12 and peak_flops("NVIDIA L4", "bf16") == 121e12
    assert peak_flops("NVIDIA RTX 4090", "fp16") == 165.2e12
    assert all(p["fp16"] == p["bf16"] for _, p in PEAK_TFLOPS)
    assert peak_flops(torch.device("cpu"), "bf16") is None and peak_flops("cpu", "bf16") is None
    with pytest.raises(ValueError, match="precision"):
        peak_flops("NVIDIA H200", "bfloat16")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    assert peak_flops("cuda:0", "fp16") == peak_flops(torch.device("cuda"), "fp16") == 362.1e12


def test_mfu():
    assert mfu(6e12, 2.0, 10e12) == 0.3
    assert mfu(6e12, 2.0, None) is None
    assert mfu(6e12, 0.0, 10e12) is None
