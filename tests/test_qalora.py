"""QA-LoRA and QLoRA on a group-quantized base: codes, counts, training, merging onto the grid, round trip, refusals."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.lora import count_parameters
from stackwise_bench.quant.intq import quantize_int4
from stackwise_bench.quant.qalora import (
    METHODS,
    GroupQuantLinear,
    QALoRALinear,
    QLoRALinear,
    adapter_parameters,
    apply_quantized_lora,
    has_quantized_lora,
    merge_quantized_lora,
    quantize_groups,
)

QKV_PROJ = r".*attn\.(qkv|proj)"  # regex: blocks.{0,1}.attn.qkv (192 -> 576) and blocks.{0,1}.attn.proj (192 -> 192)
HEAD_PARAMS = 192 * 10 + 10
EPS = 1e-6


def vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2, num_classes=10
    )
    return model.eval()


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def layers(model: nn.Module, kind=(QALoRALinear, QLoRALinear)) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


def expand(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """A per-(row, group) tensor repeated over its group's inputs: ``(out, in)``."""
    return t.repeat_interleave(group_size, dim=1)


def random_adapters(model: nn.Module, std: float = 0.05, seed: int = 2) -> None:
    """Nonzero B (as after training), so that the adapters change the output and the merge has work to do."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def adapted(method: str, target=("qkv",), bits: int = 4, group_size: int = 32, rank: int = 4) -> nn.Module:
    model = apply_quantized_lora(vit(), method, rank, target_modules=target, bits=bits, group_size=group_size)
    random_adapters(model)
    return model


# ---------------------------------------------------------------------------------------------------- quantization


def test_the_base_is_quantized_to_codes_within_half_a_scale_with_fp16_scales_and_zero_points():
    gen = torch.Generator().manual_seed(0)
    crafted = torch.randn(6, 96, generator=gen) * 0.05
    crafted[0, :32] = 0.0  # a constant group at 0
    crafted[1, 32:64] = 0.375  # a constant positive group (an fp16 value: exact)
    crafted[2, 64:] = -0.1  # a constant negative group (not an fp16 value: off by fp16 rounding only)
    crafted[3] = crafted[3].abs() + 0.2  # no 0 in the row's range: the range is widened to include it
    for bits in (4, 8):
        for g, w in ((32, crafted), (16, crafted), (32, vit().blocks[0].attn.qkv.weight.detach())):
            q, scale, zero = quantize_groups(w, bits, g)
            levels = 2**bits - 1
            assert q.dtype == torch.uint8 and q.shape == w.shape
            assert scale.shape == zero.shape == (w.shape[0], w.shape[1] // g)
            assert int(q.max()) <= levels and (scale > 0).all()
            assert torch.equal(scale.half().float(), scale)  # fp16 values
            assert torch.equal(zero.round(), zero) and zero.min() >= 0 and zero.max() <= levels  # integer codes
            deq = expand(scale, g) * (q.float() - expand(zero, g))
            assert ((w - deq).abs() <= expand(scale, g) / 2 * (1 + EPS) + 1e-12).all()
        if bits == 4:  # the same algorithm as the int4 PTQ path
            _, s4, z4, q4 = quantize_int4(crafted, 32)
            q, scale, zero = quantize_groups(crafted, 4, 32)
            assert torch.equal(q, q4) and torch.equal(scale, s4) and torch.equal(zero, z4.float())
    q, scale, zero = quantize_groups(crafted, 4, 32)
    deq = expand(scale, 32) * (q.float() - expand(zero, 32))
    assert torch.equal(deq[0, :32], crafted[0, :32]) and torch.equal(deq[1, 32:64], crafted[1, 32:64])
    assert torch.equal(deq[2, 64:], crafted[2, 64:].half().float())  # constant groups: no division by zero


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", [4, 8])
def test_applied_layers_hold_the_quantized_base_and_compute_base_plus_adapter(method, bits):
    base = vit()
    model = adapted(method, QKV_PROJ, bits=bits)
    found = layers(model)
    assert sorted(found) == ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.1.attn.proj", "blocks.1.attn.qkv"]
    assert has_quantized_lora(model) and not has_quantized_lora(base)
    x = torch.randn(3, 5, 192, generator=torch.Generator().manual_seed(3))
    for name, layer in found.items():
        linear = base.get_submodule(name)
        assert (layer.in_features, layer.out_features) == (linear.in_features, linear.out_features)
        q, scale, zero = quantize_groups(linear.weight, bits, 32)
        assert torch.equal(layer.qweight, q) and torch.equal(layer.scale, scale) and torch.equal(layer.zero, zero)
        assert torch.equal(layer.bias, linear.bias)
        w_q = expand(scale, 32) * (q.float() - expand(zero, 32))
        a, b, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
        assert s == 2.0 and (b != 0).any()
        if method == "qalora":  # the adapter sees each group's mean: A is (r, in / g)
            assert a.shape == (4, 192 // 32)
            adapter = s * (x.reshape(3, 5, 6, 32).mean(-1) @ a.T @ b.T)
        else:
            assert a.shape == (4, 192)
            adapter = s * (x @ a.T @ b.T)
        torch.testing.assert_close(layer(x), F.linear(x, w_q, linear.bias) + adapter, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("target", [("qkv",), QKV_PROJ], ids=["qkv", "regex"])
def test_exactly_the_adapters_and_the_head_are_trainable(method, target):
    r, g = 4, 32
    model = apply_quantized_lora(vit(), method, r, target_modules=target)
    shapes = [(192, 576)] * 2 + ([(192, 192)] * 2 if target == QKV_PROJ else [])  # (in, out) per targeted layer
    if method == "qalora":
        adapters = sum(r * (i // g) + o * r for i, o in shapes)
    else:
        adapters = sum(r * (i + o) for i, o in shapes)
    assert adapter_parameters(model) == adapters == count_parameters(model)["lora"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adapters + HEAD_PARAMS
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("head.") for n in trainable)
    frozen = apply_quantized_lora(vit(), method, r, target_modules=target, head=None)
    assert sum(p.numel() for p in frozen.parameters() if p.requires_grad) == adapters


@pytest.mark.parametrize("method", METHODS)
def test_training_moves_only_the_adapters_and_the_head(method):
    model = apply_quantized_lora(vit(), method, 4, target_modules=QKV_PROJ).train()
    before = {n: t.clone() for n, t in model.state_dict(keep_vars=False).items()}
    cache = {n: b.clone() for n, b in model.named_buffers()}  # includes the non-persistent dequantized weights
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    after = model.state_dict()
    trained = {n for n in before if "lora_" in n or n.startswith("head.")}
    assert len(trained) == 4 * 2 + 2
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (name in trained), name
    assert all(torch.equal(cache[n], b) for n, b in model.named_buffers())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


# ---------------------------------------------------------------------------------------------------- merging


def fp16_bound(scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per weight, how far rounding the zero point z' to fp16 can move ``scale * (q - z')``.

    Round to nearest: ``|z' - fp16(z')| <= |z'| * 2**-11`` for normal values, ``2**-25`` for subnormals;
    ``+ EPS`` relative for the float32 arithmetic of the two sides.
    """
    return expand(scale * (zero.abs() * 2**-11 + 2**-25), group_size) * (1 + EPS) + expand(scale, group_size) * EPS


@pytest.mark.parametrize("bits", [4, 8])
def test_qalora_merges_into_the_zero_points_and_stays_on_the_integer_grid(bits):
    model = adapted("qalora", QKV_PROJ, bits=bits)
    x = images()
    with torch.no_grad():
        unmerged = model(x)
        no_adapter = copy.deepcopy(model)
        for layer in layers(no_adapter).values():
            layer.lora_B.zero_()
        plain = no_adapter(x)
    before = {n: (m.qweight.clone(), m.scale.clone(), m.merged_weight()) for n, m in layers(model).items()}
    merged = copy.deepcopy(model)
    report = merge_quantized_lora(merged)
    assert report == {
        "method": "qalora",
        "bits": bits,
        "group_size": 32,
        "layers": 4,
        "weight_bytes": report["weight_bytes"],
        "on_grid": True,
    }
    assert not has_quantized_lora(merged) and layers(model)  # the original is untouched
    deployed = layers(merged, GroupQuantLinear)
    assert sorted(deployed) == sorted(before)
    for name, layer in deployed.items():
        q, scale, w_fp = before[name]
        assert torch.equal(layer.qweight, q) and torch.equal(layer.scale, scale)  # codes and scales unchanged
        assert layer.qweight.dtype == torch.uint8 and int(layer.qweight.max()) <= 2**bits - 1
        assert torch.equal(layer.zero.half().float(), layer.zero)  # fp16 zero points
        assert not torch.equal(layer.zero, layer.zero.round())  # ... that moved off the integers: the adapter
        grid = expand(layer.scale, 32) * (layer.qweight.float() - expand(layer.zero, 32))
        assert torch.equal(layer.weight_dq, grid)  # the merged weight IS scale * (q - z'): on the grid, exactly
        # and it is the high-precision merged weight w~ + s * B A / g up to fp16 rounding of z'
        assert ((layer.weight_dq - w_fp).abs() <= fp16_bound(layer.scale, layer.zero, 32)).all()
    with torch.no_grad():
        out = merged(x)
    # Tolerance: the weights moved by at most scale * |z'| * 2**-11 (~4e-5 here: |z'| <~ 13 for 4 bits,
    # <~ 260 for 8 bits with a 16x smaller scale), i.e. ~0.2% of the weights' std (0.02); the logits
    # (|logit| < 0.6) move by about that fraction, measured ~4e-4. The adapters' own effect on the logits
    # and the error of requantizing (QLoRA's test) are both > 1e-2, so 1e-3 tells a correct merge apart.
    assert (out - unmerged).abs().max() < 1e-3
    assert (unmerged - plain).abs().max() > 1e-2


def test_qlora_merges_off_the_grid_and_requantizing_changes_the_weights():
    model = adapted("qlora", QKV_PROJ)
    x = images()
    with torch.no_grad():
        unmerged = model(x)
    originals = {
        n: (m.qweight.clone(), m.scale.clone(), m.zero.clone(), m.merged_weight()) for n, m in layers(model).items()
    }

    fp = copy.deepcopy(model)
    report = merge_quantized_lora(fp, requantize=False)
    assert report["on_grid"] is False and report["method"] == "qlora" and report["layers"] == 4
    assert set(layers(fp, nn.Linear)) >= set(originals) and not has_quantized_lora(fp)
    with torch.no_grad():
        assert (fp(x) - unmerged).abs().max() < 1e-5  # the same function, in float32
    for name, (_, scale, zero, w) in originals.items():
        weight = fp.get_submodule(name).weight.detach()
        assert torch.equal(weight, w)
        # off the original grid: (w / scale + zero) is not an integer code for most weights
        t = weight / expand(scale, 32) + expand(zero, 32)
        assert ((t - t.round()).abs() > 1e-3).float().mean() > 0.9

    requantized = copy.deepcopy(model)
    report = merge_quantized_lora(requantized, requantize=True)
    assert report["on_grid"] is True
    deployed = layers(requantized, GroupQuantLinear)
    assert sorted(deployed) == sorted(originals)
    for name, layer in deployed.items():
        q, _, _, w = originals[name]
        assert torch.equal(layer.zero, layer.zero.round())  # integer zero points again
        t = layer.weight_dq / expand(layer.scale, 32) + expand(layer.zero, 32)
        assert torch.equal(t.round().to(torch.uint8), layer.qweight) and ((t - t.round()).abs() < 1e-4).all()
        assert not torch.equal(layer.qweight, q)  # new codes: the adapter forced a second quantization ...
        assert not torch.equal(layer.weight_dq, w)  # ... which does not reproduce the trained weights
    with torch.no_grad():
        assert (requantized(x) - unmerged).abs().max() > 1e-2  # what that second rounding costs

    # QA-LoRA, by contrast: its merged fp weights are on the original grid (only the zero points shift)
    qa = adapted("qalora", QKV_PROJ)
    for layer in layers(qa).values():
        z = layer.zero - layer.delta_weight() / (32 * layer.scale)
        t = layer.merged_weight() / expand(layer.scale, 32) + expand(z, 32)
        assert torch.allclose(t, layer.qweight.float(), atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", [4, 8])
def test_weight_bytes_count_the_packed_codes_and_fp16_scales_and_zero_points(method, bits):
    model = adapted(method, QKV_PROJ, bits=bits, group_size=16)
    shapes = [(576, 192), (192, 192)] * 2  # (out, in)
    packed = sum(math.ceil(o * i * bits / 8) + 2 * 2 * o * (i // 16) for o, i in shapes)
    assert merge_quantized_lora(copy.deepcopy(model))["weight_bytes"] == packed
    if method == "qlora":
        assert merge_quantized_lora(copy.deepcopy(model), requantize=False)["weight_bytes"] == sum(
            4 * o * i for o, i in shapes
        )
    if bits == 4:
        # half a byte per code, 2 + 2 bytes per group of 16 inputs (12 per row)
        assert packed == (576 * 192 + 192 * 192) + 4 * 2 * (576 + 192) * 12


def test_merging_a_model_without_adapters_is_refused():
    with pytest.raises(ConfigError, match="no QALoRALinear or QLoRALinear"):
        merge_quantized_lora(vit())


# ---------------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_reproduces_the_logits_exactly(method):
    model = adapted(method, QKV_PROJ)
    state = model.state_dict()
    assert "blocks.0.attn.qkv.qweight" in state and "blocks.0.attn.qkv.lora_A" in state
    assert not any("weight_dq" in k for k in state)  # the cache is not saved ...
    fresh = apply_quantized_lora(vit(seed=7), method, 4, target_modules=QKV_PROJ)
    x = images()
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x))
        fresh.load_state_dict(state)  # ... but rebuilt on loading
        assert torch.equal(fresh(x), model(x))
    merged_a, merged_b = copy.deepcopy(model), copy.deepcopy(fresh)
    merge_quantized_lora(merged_a)
    merge_quantized_lora(merged_b)
    with torch.no_grad():
        assert torch.equal(merged_a(x), merged_b(x))


# ---------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "kwargs, key, hint",
    [
        ({"method": "qalora", "group_size": 40}, "lora.qalora.group_size=40", "lora.qalora.group_size=32"),
        ({"method": "qlora", "group_size": 40}, "lora.qlora.group_size=40", "in_features=192"),
        ({"method": "qalora", "group_size": 0}, "lora.qalora.group_size=0", "positive integer"),
        ({"method": "qalora", "bits": 3}, "lora.qalora.bits=3", "4 or 8"),
        ({"method": "qlora", "bits": 16}, "lora.qlora.bits=16", "4 or 8"),
        ({"method": "qalora", "target_modules": r"patch_embed\.proj"}, "lora.target_modules", "Conv2d"),
        ({"method": "qalora", "target_modules": ["proj"]}, "lora.target_modules", "patch_embed.proj"),
        ({"method": "qalora", "target_modules": ["nope"]}, "lora.target_modules", "blocks.0.attn.qkv"),
        ({"method": "qalora", "target_modules": "qkv"}, "lora.target_modules", "matches no module"),  # fullmatch
        ({"method": "qalora", "rank": 0}, "lora.rank=0", "positive integer"),
        ({"method": "qlora", "rank": 2.5}, "lora.rank=2.5", "positive integer"),
        ({"method": "qalora", "dropout": 1.0}, "lora.dropout=1.0", "[0, 1)"),
        ({"method": "qalora", "head": "classifier"}, "lora.head=classifier", "null"),
        ({"method": "qalora", "target_modules": ["qkv", "head"]}, "lora.head=head", "lora.target_modules"),
        ({"method": "lora"}, "lora.method=lora", "qalora"),
    ],
)
def test_bad_settings_are_refused_in_one_sentence_naming_the_key(kwargs, key, hint):
    model = vit()
    kwargs = {"rank": 4, **kwargs}
    with pytest.raises(ConfigError) as err:
        apply_quantized_lora(model, **kwargs)
    message = str(err.value)
    assert key in message and hint in message, message
    assert message.endswith(".") and "\n" not in message
    assert type(model.blocks[0].attn.qkv) is nn.Linear and all(p.requires_grad for p in model.parameters())
