"""FP8 post-training quantization: exact FP8 values, scales that never overflow, what quantize_model reports."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.models import create_model
from stackwise_bench.quant.ptq import FORMATS, fake_quantize, pow2_scale, quantize_model

FMTS = sorted(FORMATS)


def awkward_weights(dtype: torch.dtype) -> torch.Tensor:
    """Conv weights whose channels span 60 decades, a zero channel, and amaxes exactly at and next to fmax * 2**k."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 8, 3, 3, generator=gen) * torch.logspace(-30, 30, 40).view(-1, 1, 1, 1)
    fmax = torch.finfo(dtype).max
    w[0] = 0.0
    for i, amax in enumerate([fmax, fmax / 2, fmax * 2**-20, 3e38, 1e-40]):  # the last is float32-subnormal
        w[1 + 2 * i, 0, 0, 0] = amax
        w[2 + 2 * i, 0, 0, 0] = torch.nextafter(torch.tensor(amax), torch.tensor(float("inf")))
    return w


@pytest.mark.parametrize("fmt", FMTS)
def test_round_trip_changes_nothing(fmt):
    """The dequantized weight is an FP8 value times its power-of-two scale: a second cast and requantizing are exact."""
    dtype = FORMATS[fmt]
    for w in (awkward_weights(dtype), torch.randn(64, 48), torch.randn(16, 3, 3, 3) * 0.05):
        q, scale = fake_quantize(w, dtype)
        scaled = q.float() * scale
        assert torch.equal(scaled.to(dtype).float(), scaled)  # exactly representable in the format
        assert torch.equal(fake_quantize(q, dtype)[0], q)  # a second quantization changes nothing
        assert not torch.equal(q, w)  # and the first one really rounded


@pytest.mark.parametrize("fmt", FMTS)
def test_per_channel_scale_never_overflows(fmt):
    dtype = FORMATS[fmt]
    fmax = torch.finfo(dtype).max
    w = awkward_weights(dtype)
    q, scale = fake_quantize(w, dtype)
    amax = w.abs().flatten(1).amax(1)
    scaled_amax = amax * scale.flatten()
    assert scale.shape == (40, 1, 1, 1) and torch.isfinite(scale).all() and (scale > 0).all()
    assert (scaled_amax <= fmax).all()  # no weight needs saturating...
    big = amax > 1e-30  # ...and the scale is the largest that fits (tiny channels hit the exponent clamp)
    assert (scaled_amax[big] > fmax / 2).all()
    assert torch.isfinite(q).all()
    assert torch.equal(q[0], torch.zeros_like(q[0]))

    # What a scale that overshoots would cost: a plain cast past fmax is inf in e5m2 (NaN or fmax in e4m3fn,
    # by torch version and device); fake_quantize also clamps (saturates) before casting.
    assert torch.isinf(torch.tensor([70000.0]).to(torch.float8_e5m2).float()).all()


def test_pow2_scale_is_exact_at_the_boundaries():
    dtype = torch.float8_e4m3fn
    amax = torch.tensor([448.0, 448.0 * 2**-7, 449.0, 224.0, 1.0])
    assert pow2_scale(amax, dtype).tolist() == [1.0, 2.0**7, 0.5, 2.0, 256.0]


def test_unknown_format_is_one_sentence():
    with pytest.raises(
        ConfigError, match=r"^quantize=int3 is not a supported format; use quantize=fp8_e4m3, fp8_e5m2, int8 or int4 "
    ):
        quantize_model(nn.Linear(4, 4), "int3")


def resnet8() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=10).eval()


@pytest.mark.parametrize("keep_head", [True, False])
def test_quantize_model_report(keep_head):
    model = resnet8()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    model, report = quantize_model(model, "fp8_e4m3", keep_head=keep_head)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert report["layers"] == convs + ([] if keep_head else ["head"])
    assert report["kept_high_precision"] == (["head"] if keep_head else [])
    head = model.head.weight
    assert torch.equal(head, original["head.weight"]) == keep_head
    for name in report["layers"]:
        w = model.get_submodule(name).weight
        assert torch.equal(fake_quantize(w, torch.float8_e4m3fn)[0], w)  # what the model holds is FP8
    n_conv = sum(model.get_submodule(n).weight.numel() for n in convs)
    channels = sum(model.get_submodule(n).weight.shape[0] for n in convs)
    quantized = n_conv + (0 if keep_head else head.numel())
    total = sum(p.numel() for p in model.parameters()) * 4
    assert report["weight_bytes_before"] == total
    assert report["weight_bytes_after"] == total - 3 * quantized + channels + (0 if keep_head else 10)
    assert report["compression"] > 3.5 and 0 < report["weight_rel_error"] < 0.05
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items() if "running" in k)  # BN untouched


def test_activation_quantization_feeds_fp8_inputs():
    model, report = quantize_model(resnet8(), "fp8_e4m3", activations=True)
    assert report["activations"] == "dynamic_per_tensor"
    seen = {}

    def capture(name):
        def hook(module, args):
            seen[name] = args[0]

        return hook

    # Registered after the quantizer, so it sees what the layer will compute with.
    for name in report["layers"]:
        model.get_submodule(name).register_forward_pre_hook(capture(name))
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    assert set(seen) == set(report["layers"])
    for x in seen.values():
        _, scale = fake_quantize(x, torch.float8_e4m3fn, per_channel=False)
        assert torch.equal((x * scale).to(torch.float8_e4m3fn).float(), x * scale)


def test_lora_adapters_are_merged_before_quantizing():
    """Each deployed weight W + BA is quantized once, not W and the adapters separately."""
    import copy

    from stackwise_bench.nn.lora import apply_lora

    model = apply_lora(resnet8(), rank=4, target_modules=["conv1"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)  # peft starts B at zero: make the adapters matter
    base = model.get_base_model().stage2[0].conv1.base_layer.weight.clone()
    reference = copy.deepcopy(model).merge_and_unload()
    merged, report = quantize_model(model, "fp8_e4m3")
    assert not any("lora_" in n for n, _ in merged.named_modules())
    assert "stage2.0.conv1" in report["layers"] and report["kept_high_precision"] == ["head"]
    want = reference.stage2[0].conv1.weight
    assert not torch.equal(want, base)
    assert torch.equal(merged.stage2[0].conv1.weight, fake_quantize(want, torch.float8_e4m3fn)[0])
