"""Compute accounting: the FLOPs of a training step per image, a cached meter of a run's total, and MFU.

Runs are compared at equal compute, including runs whose model grows deeper while it trains, so every run
records the FLOPs its training steps did. Counting is :class:`torch.utils.flop_counter.FlopCounterMode`'s:

* What it counts: matmuls (``mm``, ``addmm``, ``bmm``, ``baddbmm``), convolutions forward and
  ``convolution_backward``, and attention, at 2 FLOPs per multiply-add, from the shapes alone (so the count does
  not depend on dtype, device or autocast). Everything else (norms, activations, softmax, bias adds, the loss,
  the optimizer update) counts zero: the usual "model FLOPs" of compute-budget papers, which those ops add
  well under a percent to for ViTs and ResNets.
* The backward it counts is the one autograd really runs, so frozen parameters cost what they cost in
  training. Measured on ``nn.Linear`` layers (tests/test_flops.py asserts the exact numbers): a layer costs
  ``2*in*out`` per sample forward, plus as much again for its weight gradient when its weight trains, plus as
  much again for its input gradient when anything upstream trains. So a fully trained MLP costs 3x forward,
  except its first layer (2x: the images need no gradient); a frozen layer in the middle (a LoRA base layer
  under a trainable adapter, a frozen block under trainable ones) costs 2x (input gradient only); frozen
  layers *before* the first trainable parameter cost forward only, since autograd never reaches them.
  Convolutions follow the same rule (``convolution_backward``'s output mask).
* Attention is counted with PyTorch's math SDPA backend forced: on a CPU, ``F.scaled_dot_product_attention``
  runs a fused kernel FlopCounterMode has no formula for (it would count zero: DeiT-Tiny at 224 px read
  6.39 GFLOPs per image instead of 7.46), and the GPU's fused kernels are counted with the backward's recomputation of
  the scores. The math path counts the two forward and four backward matmuls of attention on every device,
  without recomputation: model FLOPs, as MFU defines them.

Counting runs a real forward and backward (of ``batch`` images, 2 by default) on a throwaway copy of the model,
far too slow to do every step: :class:`FlopMeter` counts once per architecture (type, parameter shapes,
input shape, which parameters train) and caches. Nothing here knows Hydra, files or logging.
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from stackwise_bench.values import is_int

# Dense (no sparsity) peak TFLOP/s from vendor datasheets: bf16/fp16 tensor cores with fp32 accumulation (what
# PyTorch's half-precision matmuls use; equal to bf16 on every part listed), and plain FP32 (no TF32).
# First match of the substring in the device name (torch.cuda.get_device_name) wins: specific names come first.
PEAK_TFLOPS = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("GH200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "fp32": 80.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6}),
    ("L40", {"bf16": 181.05, "fp16": 181.05, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    ("RTX 4090", {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6}),
    ("RTX 3090", {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6}),
]
# The run's precision names (training/precision.py). fp8 has no column: its peak is not tabulated (None).
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
_CUDA_DEVICE = re.compile(r"cuda(:\d+)?")


def peak_flops(device_name: str | torch.device | int | None, precision: str) -> float | None:
    """Dense peak FLOP/s of a GPU at ``precision`` (``fp32``, ``fp16``, ``bf16``; ``fp8``: None), from
    :data:`PEAK_TFLOPS`.

    Args:
        device_name: The GPU's name as ``torch.cuda.get_device_name`` spells it (``"NVIDIA H200"``), matched by
            substring. A CUDA device (``torch.device``, an index, ``"cuda:0"``, or None for the current one) is
            looked up by its name; a CPU device has no peak (None).
        precision: One of :data:`PRECISIONS`.

    Returns:
        FLOP/s, or None for a device (or precision) the table does not know.

    Raises:
        ValueError: ``precision`` is not a precision name.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    if isinstance(device_name, str) and not _CUDA_DEVICE.fullmatch(device_name):
        name = device_name
    elif isinstance(device_name, torch.device) and device_name.type != "cuda":
        return None
    else:
        name = torch.cuda.get_device_name(device_name)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return float(round(peaks[precision] * 1e12)) if precision in peaks else None  # 66.9e12, not .01 more
    return None


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops`` done in ``seconds``, as a fraction of the ``peak`` FLOP/s.

    None when the peak is unknown (None) or the ratio is undefined (``seconds`` or ``peak`` not positive).
    """
    if peak is None or peak <= 0 or seconds <= 0:
        return None
    return flops / seconds / peak


def train_flops_per_image(
    model: nn.Module, input_shape: tuple[int, int, int], num_classes: int | None = None, batch: int = 2
) -> float:
    """FLOPs of one training step's forward and backward, per image, for ``model`` as it trains now.

    Runs the forward, a cross-entropy loss and the backward of ``batch`` random images (``(batch, *input_shape)``)
    under FlopCounterMode and divides by ``batch``. What is counted (matmuls, convolutions, attention; the real
    backward, so parameters with ``requires_grad=False`` get no weight gradients and layers before the first
    trainable parameter no backward at all): this module's docstring. A model with nothing to train counts its
    forward only.

    The count runs on a deep copy of the model, on the model's device, in train mode and fp32 with autocast off
    (FLOPs do not depend on dtype; a bf16 run counts the same), and with the global RNGs forked: the live model's
    weights, gradients, BatchNorm statistics and train/eval modes, and the RNG streams, are as they were. The copy
    runs none of the model's module hooks (monitors, activation quantisers: not the model's compute) and briefly
    doubles the parameter memory. A ``torch.compile``'d model is counted through its original module.

    Args:
        model: The classifier (LoRA-wrapped or not), with ``requires_grad`` set as in training.
        input_shape: One image's shape, ``(channels, height, width)``.
        num_classes: The head's size, to check the logits against; default: the logits' last dimension.
        batch: Images counted at once (the count is per image whatever the batch; 2 keeps it cheap).

    Raises:
        ValueError: A bad ``input_shape``/``batch``, or logits that are not ``(batch, num_classes)``.
        TypeError: The model does not return one logits tensor.
    """
    return _count(model, input_shape, batch, train=True, num_classes=num_classes)


def eval_flops_per_image(model: nn.Module, input_shape: tuple[int, int, int], batch: int = 2) -> float:
    """FLOPs of one image's forward in eval mode under ``torch.no_grad``: what an evaluation pass costs.

    Evaluation is not training compute: a run's training FLOPs (``train.flops``) count its training steps only,
    the usual convention of compute-budget papers (so runs that evaluate more often are not charged for it);
    this function is for reporting evaluation's own cost. Counted on a copy, as :func:`train_flops_per_image`.
    """
    return _count(model, input_shape, batch, train=False, num_classes=None)


def _count(model: nn.Module, input_shape, batch: int, train: bool, num_classes: int | None) -> float:
    shape = _image_shape(input_shape)
    if not is_int(batch) or batch < 1:
        raise ValueError(f"batch={batch!r} must be a positive integer")
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the same module, uncompiled
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=cuda))  # dropout, drop-path, the images: on a fork
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad() if train else torch.no_grad())
        stack.enter_context(torch.autocast(device.type, enabled=False))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        twin = _copy(model).float().train(train)
        x = torch.randn(batch, *shape, device=device)
        with FlopCounterMode(display=False) as counter:
            logits = twin(x)
            if not isinstance(logits, torch.Tensor):
                raise TypeError(f"{type(model).__name__} returned {type(logits).__name__}, not one logits tensor")
            classes = logits.shape[-1] if num_classes is None else num_classes
            if logits.shape != (batch, classes):
                raise ValueError(f"logits of shape {tuple(logits.shape)}, expected ({batch}, {classes})")
            if train:
                loss = F.cross_entropy(logits.float(), torch.arange(batch, device=device) % classes)
                if loss.requires_grad:  # else nothing trains: the step is its forward
                    loss.backward()
        del twin
    return counter.get_total_flops() / batch


def _image_shape(input_shape) -> tuple[int, int, int]:
    try:
        shape = tuple(input_shape)
        shape = tuple(operator.index(s) for s in shape if not isinstance(s, bool)) if len(shape) == 3 else ()
    except TypeError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape={input_shape!r} must be one image's (channels, height, width)")
    return shape


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy without the module hooks: their callables are shared, not copied (a bound method would
    drag its monitor object into the copy), then dropped, so the copy's forward reports to nobody."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for attr in _HOOK_DICTS:
            for hook in getattr(module, attr, {}).values():
                memo[id(hook)] = hook
    twin = copy.deepcopy(model, memo)
    for module in twin.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(module, attr, None)
            if hooks is not None:
                hooks.clear()
        for p in module.parameters(recurse=False):
            p.grad = None
    return twin


class FlopMeter:
    """A run's training FLOPs: per-image counts cached per architecture, and the running total.

    ``per_image(model, input_shape)`` counts (with :func:`train_flops_per_image`) only the first time it sees an
    architecture: the model's type, its parameters' shapes (so a model grown or cut to another depth is another
    architecture), the input shape, and which parameters train (freezing or unfreezing a stack changes the
    backward); see :meth:`key`. ``add(images, per_image)`` accumulates; ``total`` is the FLOPs so far.
    ``state_dict``/``load_state_dict`` hold the total and image count as plain Python numbers, so a resumed run
    continues the same sum bit for bit (the cache is not saved: a recount gives the same numbers).

    Args:
        counter: Counts a cache miss, ``counter(model, input_shape) -> float``; default
            :func:`train_flops_per_image`.
    """

    def __init__(self, counter: Callable[[nn.Module, tuple[int, int, int]], float] | None = None):
        self._counter = counter or train_flops_per_image
        self._cache: dict[tuple, float] = {}
        self.total = 0.0
        self.images = 0

    @staticmethod
    def key(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple:
        """What the count depends on: the model's type, its parameters' shapes (in module order, so another depth
        is another key), the input shape, and the parameters' ``requires_grad`` flags.

        A walk of the module tree (0.3-0.9 ms for DeiT-Tiny's 276 modules on a busy 2-core machine): cheap next to
        a training step, but a trainer may as well look up once per epoch and again after it changes the depth or
        the frozen set, and ``add`` every step.
        """
        model = getattr(model, "_orig_mod", model)
        params = []
        stack = [model]
        while stack:
            module = stack.pop()
            params.extend(p for p in module._parameters.values() if p is not None)
            stack.extend(reversed([c for c in module._modules.values() if c is not None]))
        return (
            type(model).__name__,
            tuple(p.shape for p in params),
            _image_shape(input_shape),
            tuple(p.requires_grad for p in params),
        )

    def per_image(self, model: nn.Module, input_shape: tuple[int, int, int]) -> float:
        """Forward + backward FLOPs per image of ``model`` as it is now (counted on a cache miss only)."""
        key = self.key(model, input_shape)
        if key not in self._cache:
            self._cache[key] = float(self._counter(model, key[2]))
        return self._cache[key]

    def add(self, images: int, per_image: float) -> float:
        """Account ``images`` trained at ``per_image`` FLOPs each; returns the new total."""
        if not is_int(images) or images < 0:
            raise ValueError(f"images={images!r} must be a non-negative integer")
        if not math.isfinite(per_image) or per_image < 0:
            raise ValueError(f"per_image={per_image!r} must be a finite non-negative number of FLOPs")
        self.total += images * float(per_image)
        self.images += images
        return self.total

    def state_dict(self) -> dict:
        return {"total": self.total, "images": self.images}

    def load_state_dict(self, state: dict) -> None:
        self.total = float(state["total"])
        self.images = int(state["images"])
