"""The packed int4 kernel path of a merged QA-LoRA model: the same weights as the reference path, packed."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from stackwise_bench.quant.int4_kernel import Int4PackedLinear, kernel_supported, pack_int4, reference_forward
from stackwise_bench.quant.qalora import GroupQuantLinear, apply_quantized_lora, merge_quantized_lora


def merged_vit(bits: int = 4, group_size: int = 32, device: str = "cpu"):
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2, num_classes=10
    )
    apply_quantized_lora(model, "qalora", 4, target_modules=r".*attn\.(qkv|proj)", bits=bits, group_size=group_size)
    with torch.no_grad():  # a trained adapter: nonzero B, so the merge moves the zero points
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    merge_quantized_lora(model)
    return model.to(device).eval()


def test_packed_layer_computes_the_reference_weights():
    model = merged_vit()
    layer = model.blocks[0].attn.qkv
    assert isinstance(layer, GroupQuantLinear)
    x = torch.randn(5, 7, layer.in_features)  # a token batch: the kernel sees it flattened
    packed = Int4PackedLinear(layer)
    ref = reference_forward(layer, x)
    out = packed(x)
    assert out.shape == ref.shape == (5, 7, layer.out_features)
    # float32 on a CPU: the two paths differ only in summation order (and the offset's float rounding)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert packed.packed.numel() * packed.packed.element_size() == layer.in_features * layer.out_features // 2


def test_pack_int4_swaps_every_4bit_layer_and_keeps_the_model_output():
    model = merged_vit()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        packed = copy.deepcopy(model)
        report = pack_int4(packed)
        out = packed(x)
    assert report["packed"] == [f"blocks.{b}.attn.{n}" for b in (0, 1) for n in ("qkv", "proj")]
    assert report["skipped"] == {}
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_layers_the_kernel_cannot_take_keep_the_reference_path():
    model = merged_vit(bits=8)
    report = pack_int4(model)
    assert report["packed"] == [] and set(report["skipped"].values()) == {"the kernel is int4 only"}
    assert kernel_supported(model.blocks[0].attn.qkv, torch.device("cpu")) == "the kernel is int4 only"


@pytest.mark.gpu
def test_packed_kernel_on_cuda_agrees_to_bfloat16_rounding():
    model = merged_vit(device="cuda")
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        ref = model(x)
        packed = copy.deepcopy(model)
        assert len(pack_int4(packed)["packed"]) == 4
        out = packed(x)
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()  # bf16 activations/scales: ~3 digits
    assert (out.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.75
