"""Where and how a run computes: device, precision, seed, threads, determinism, data placement, layout.

One :class:`Runtime` is built per process run (``build.build_runtime``) and given to
the Trainer, the loaders and ``evaluate``, so training and evaluation make the same
decisions the same way: none of them resolves a device or seeds anything itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random

import torch

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.models import is_convnet
from stackwise_bench.training.precision import autocast, check_precision, make_scaler, resolve_device
from stackwise_bench.values import is_int

log = logging.getLogger(__name__)

# The trainer config keys that belong to the runtime rather than to the training loop.
RUNTIME_KEYS = ("device", "deterministic", "threads", "data_on_device", "channels_last", "compile")


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The resolved execution settings of one run (build with :meth:`create`)."""

    device: torch.device
    precision: str = "fp32"
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    deterministic: bool = True
    data_on_device: bool = True  # the whole uint8 dataset on the device (else host memory; each batch pinned)
    channels_last: bool = True  # NHWC for convnets
    compile: bool = False  # torch.compile the model

    @classmethod
    def create(
        cls,
        device: str = "auto",
        precision: str = "fp32",
        seed: int = 0,
        threads: int | None = None,
        deterministic: bool = True,
        data_on_device: bool = True,
        channels_last: bool = True,
        compile: bool = False,
    ) -> Runtime:
        """Resolve ``device`` (``auto`` = CUDA when present) and refuse what it cannot run, in one sentence.

        Raises:
            ConfigError: an unknown or unavailable device, a precision the device cannot run, bad threads.
        """
        if threads is not None and (not is_int(threads) or threads < 1):
            raise ConfigError(
                f"trainer.threads={threads} must be a positive integer or null (torch's default); "
                "use e.g. trainer.threads=1."
            )
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"seed={seed!r} must be an integer; use e.g. seed=42.")
        # cuBLAS reads this when it creates its first handle: it makes CUDA matmuls deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        dev = resolve_device(device)
        check_precision(precision, dev)
        if precision == "fp16" and dev.type == "cpu":
            log.warning(
                "precision=fp16 on a CPU trains several times slower than fp32 (CPUs have few float16 kernels: "
                "4-5x for a small ViT, 60-100x for resnet8's convolutions), so a CPU precision study would time "
                "the emulation; use precision=bf16 for reduced precision on a CPU, and fp16 on a GPU."
            )
        return cls(
            dev, precision, seed, threads, bool(deterministic), bool(data_on_device), bool(channels_last), bool(compile)
        )

    def apply(self) -> None:
        """One seed for Python, NumPy and torch; threads; deterministic kernels where the backend has them."""
        import numpy as np

        if self.threads:
            torch.set_num_threads(self.threads)
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.manual_seed(self.seed)
        torch.use_deterministic_algorithms(self.deterministic, warn_only=True)
        # Deterministic mode also NaN-fills every new tensor, a debugging aid for kernels that read
        # memory they never wrote (none here: reruns and resumes are checked bit for bit in the
        # tests). It cost ~11% of a resnet8 step on the CPU.
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.deterministic = self.deterministic
        torch.backends.cudnn.benchmark = not self.deterministic

    def autocast(self):
        """The autocast context of this run's precision (a no-op for fp32)."""
        return autocast(self.precision, self.device)

    def scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16; a pass-through otherwise."""
        return make_scaler(self.precision, self.device)

    def wants_channels_last(self, model: torch.nn.Module) -> bool:
        """``trainer.channels_last`` and a convnet: the one place that decides the model's and the batches' layout."""
        return self.channels_last and is_convnet(model)

    def eval_batch_size(self, requested: int | None, batch_size: int) -> int:
        """``trainer.eval_batch_size``; null: 512 on a GPU, which big batches keep busy, the training batch on
        a CPU, where bigger batches overflow the caches (resnet8 evaluates ~1.7x slower at 512 than at 128)."""
        if requested is not None:
            return requested
        return 512 if self.device.type == "cuda" else batch_size
