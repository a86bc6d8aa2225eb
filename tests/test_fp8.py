"""precision=fp8: refused without FP8 tensor cores; the layer filter picks exactly the Linear layers that suit FP8."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.models import create_model
from stackwise_bench.quant import fp8

DEIT_BLOCK_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # 192x576, 192x192, 192x768, 768x192
DEIT_TINY_FP8 = [f"blocks.{i}.{layer}" for i in range(12) for layer in DEIT_BLOCK_LAYERS]


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and message.count(". ") == 0


def test_refuses_on_cpu_naming_the_hardware():
    with pytest.raises(ConfigError) as info:
        fp8.check_support(torch.device("cpu"))
    message = str(info.value)
    assert message.startswith("precision=fp8 needs an NVIDIA GPU of compute capability 8.9 or newer")
    assert "device is cpu" in message and "precision=bf16" in message and one_sentence(message)


def test_refuses_a_gpu_without_fp8_tensor_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"A100-SXM4-80GB has compute capability 8\.0") as info:
        fp8.check_support(torch.device("cuda"))
    assert one_sentence(str(info.value))


def test_refuses_without_torchao(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao.float8 raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ConfigError, match=r"needs torchao.*pip install") as info:
        fp8.check_support(torch.device("cuda"))
    assert one_sentence(str(info.value))


@pytest.fixture(scope="module")
def deit_tiny():
    return create_model("deit_tiny", num_classes=16, pretrained=False)  # a 192x16 head fits FP8's shape rule


def test_filter_picks_the_48_block_linears_of_deit_tiny(deit_tiny):
    assert fp8.classifier_names(deit_tiny) == ("head",)
    assert fp8.select_layers(deit_tiny) == DEIT_TINY_FP8
    linears = [n for n, m in deit_tiny.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(set(linears) - set(DEIT_TINY_FP8)) == ["head"]  # never the head, although 192 and 16 divide by 16
    assert isinstance(deit_tiny.patch_embed.proj, nn.Conv2d)  # the patch embedding is a conv: not a Linear


def test_filter_needs_both_dimensions_divisible_by_16():
    model = nn.Sequential()
    model.add_module("ok", nn.Linear(32, 64))
    model.add_module("odd_in", nn.Linear(20, 64))
    model.add_module("odd_out", nn.Linear(64, 24))
    model.add_module("conv", nn.Conv2d(16, 16, 1))
    model.add_module("head", nn.Linear(64, 32))
    assert fp8.select_layers(model) == ["ok"]
    assert fp8.select_layers(model, head=()) == ["ok", "head"]


def test_filter_with_lora_keeps_frozen_bases_and_skips_adapters_and_head(deit_tiny):
    import copy

    from stackwise_bench.nn.lora import apply_lora

    model = apply_lora(copy.deepcopy(deit_tiny), rank=16)  # rank 16 adapters would pass the shape rule
    chosen = fp8.select_layers(model)
    prefix = "base_model.model."
    expected = [prefix + n + (".base_layer" if n.endswith("qkv") else "") for n in DEIT_TINY_FP8]
    assert chosen == expected
    assert not any("lora_" in n or ".head." in n for n in chosen)


def test_convert_for_training_swaps_exactly_the_filtered_layers(deit_tiny):
    """torchao's module swap runs on the CPU too (only training in FP8 needs the GPU)."""
    import copy

    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    model = copy.deepcopy(deit_tiny)
    converted = fp8.convert_for_training(model)
    assert converted == DEIT_TINY_FP8
    assert [n for n, m in model.named_modules() if isinstance(m, Float8Linear)] == DEIT_TINY_FP8
    assert type(model.head) is nn.Linear
    assert model.state_dict().keys() == deit_tiny.state_dict().keys()  # checkpoints keep their layout


def test_train_refuses_fp8_on_this_cpu(tmp_path, cfg_factory):
    """Through the real entrypoint: one sentence before anything is trained."""
    from stackwise_bench.train import run

    from conftest import read_summary

    # cfg_factory pins trainer.device=cpu, so this holds on a GPU machine too
    with pytest.raises(ConfigError, match=r"precision=fp8 needs an NVIDIA GPU of compute capability 8\.9") as info:
        run(cfg_factory(["precision=fp8", "monitors=none"]), tmp_path / "r")
    assert one_sentence(str(info.value))
    summary = read_summary(tmp_path / "r")
    assert summary["status"] == "failed" and summary["error"]["reason"] == "config"
    assert not (tmp_path / "r" / "checkpoints").exists()
