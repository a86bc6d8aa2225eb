"""FP8 training (``precision=fp8``): a hardware check and torchao's float8 conversion of chosen Linear layers.

torchao is an optional extra (``pip install -e ".[fp8]"``) and is imported only by
:func:`convert_for_training`, i.e. only for ``precision=fp8`` on a capable GPU, so
nothing else pays its ~5 s import. The layer filter is a pure function of module
names and shapes, so it is tested without a GPU or torchao.

Converted layers run their matmuls in FP8 with dynamic per-tensor scales (torchao's
default recipe); everything else runs under bf16 autocast (``precision.py`` maps
fp8 to bf16 for the rest of the model). torch.compile (``trainer.compile=true``)
is what makes torchao's casts fast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.heads import HEAD_NAMES, classifier_names, is_head

MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (sm_89) and Hopper (sm_90) onwards
DIM_MULTIPLE = 16  # torch._scaled_mm needs both matrix dimensions divisible by 16
HARDWARE = (
    "an NVIDIA GPU of compute capability 8.9 or newer (Ada: L4, L40, RTX 40xx; Hopper: H100, H200; "
    "or Blackwell) with torchao installed"
)
INSTEAD = (
    "use precision=bf16 (or fp16) here, or quantize a finished run after training with "
    "python -m stackwise_bench.evaluate checkpoint=<run folder> quantize=fp8_e4m3"
)


def check_support(device: torch.device) -> None:
    """Refuse ``precision=fp8`` anywhere but a GPU with FP8 tensor cores and torchao.

    Raises:
        ConfigError: one sentence naming the hardware it needs and what to use instead.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ConfigError(f"precision=fp8 needs {HARDWARE}, and this run's device is {device}; {INSTEAD}.")
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        raise ConfigError(
            f"precision=fp8 needs {HARDWARE}, and {torch.cuda.get_device_name(device)} has compute capability "
            f"{capability[0]}.{capability[1]}; {INSTEAD}."
        )
    try:
        import torchao.float8  # noqa: F401  (lazy on purpose, see the module docstring)
    except ImportError as exc:
        raise ConfigError(
            f"precision=fp8 needs torchao, which is not installed ({exc}); "
            'pip install -e ".[fp8]" (or pip install torchao), or use precision=bf16.'
        ) from exc


def is_fp8_layer(name: str, module: nn.Module, head: Sequence[str] = HEAD_NAMES) -> bool:
    """Whether the layer at ``name`` is trained in FP8.

    Only ``nn.Linear`` layers with both dimensions divisible by 16 qualify. Never
    the classifier head (its logits feed the loss directly and it is tiny) and never
    LoRA adapters (a rank-r matmul gains nothing from FP8, and the adapters are all
    that LoRA trains). Names may carry peft's ``base_model.model.`` prefix: a frozen
    ``qkv.base_layer`` still qualifies.
    """
    if not isinstance(module, nn.Linear):
        return False
    if is_head(name, head) or any(p.startswith("lora_") for p in name.split(".")):
        return False
    return module.in_features % DIM_MULTIPLE == 0 and module.out_features % DIM_MULTIPLE == 0


def select_layers(model: nn.Module, head: Sequence[str] | None = None) -> list[str]:
    """Names of the layers :func:`convert_for_training` converts, in module order."""
    head = tuple(head) if head is not None else classifier_names(model)
    return [name for name, module in model.named_modules() if name and is_fp8_layer(name, module, head)]


def convert_for_training(model: nn.Module, head: Sequence[str] | None = None) -> list[str]:
    """Swap the selected Linear layers for torchao ``Float8Linear`` in place; returns their names.

    Call after ``apply_lora`` and before the optimizer is built, as ``build.build_model`` does.

    Raises:
        ConfigError: when no layer qualifies (FP8 would change nothing but the name).
    """
    from torchao.float8 import convert_to_float8_training  # lazy on purpose, see the module docstring

    chosen = select_layers(model, head)
    if not chosen:
        raise ConfigError(
            "precision=fp8 found no Linear layer with both dimensions divisible by 16 outside the head "
            "in this model; use precision=bf16 for it."
        )
    wanted = set(chosen)
    convert_to_float8_training(model, module_filter_fn=lambda module, fqn: fqn in wanted)
    return chosen
