"""Batched image augmentation on the training device (airbench style).

Every op works on a whole batch with tensor ops: no per-sample Python loops, no
PIL. Random parameters are drawn on a CPU ``torch.Generator`` and then moved to
the batch's device, so a batch is augmented identically on CPU and GPU and a
run resumed mid-epoch reproduces the same augmentations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from stackwise_bench.data.mixup import build_mixing
from stackwise_bench.data.randaugment import build_auto_augment
from stackwise_bench.errors import ConfigError

# Per-channel luma weights (ITU-R BT.601), as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


class BatchAugment:
    """Random crop, flip, colour jitter, rotation and erasing on a batch.

    Args:
        crop_padding: Reflect-pad by this many pixels, then crop back at a random
            per-sample offset (a translation of up to ±crop_padding). 0 = off.
        flip: Horizontal flip with probability 0.5 per sample.
        color_jitter: Strength s of brightness/contrast/saturation jitter; each
            factor is drawn uniformly from [1-s, 1+s] per sample. 0 = off.
        rotation_deg: Rotate each sample by an angle drawn from
            [-rotation_deg, rotation_deg] (bilinear, zero fill). 0 = off.
        erasing_p: Probability per sample of erasing one random rectangle.
        erasing_scale: Range of the erased area as a fraction of the image.
        auto_augment: ``rand`` (RandAugment), ``trivial`` (TrivialAugmentWide) or None (off), after crop/flip
            (:mod:`~stackwise_bench.data.randaugment`).
        randaug_n, randaug_m, randaug_std, randaug_p: RandAugment's ops per sample (None: 2), magnitude on
            timm's 0-10 scale (None: 9), per-op magnitude noise std (None: 0) and op probability (None: 1).
        mixup_alpha, cutmix_alpha, mix_prob, switch_prob: batch mixing with soft targets, timm's knobs (None or 0
            alphas: off; :mod:`~stackwise_bench.data.mixup`). Held here as :attr:`mixing` and applied by the
            trainer, which has the labels; ``__call__`` does the image ops only.

    Every new knob defaults to None, not 0 or false: a run recorded before the knob existed reads it as None,
    so a relaunched study still finds its finished runs the same config.
    """

    def __init__(
        self,
        crop_padding: int = 4,
        flip: bool = True,
        color_jitter: float = 0.0,
        rotation_deg: float = 0.0,
        erasing_p: float = 0.0,
        erasing_scale: Sequence[float] = (0.02, 0.33),
        auto_augment: str | None = None,
        randaug_n: int | None = None,
        randaug_m: float | None = None,
        randaug_std: float | None = None,
        randaug_p: float | None = None,
        mixup_alpha: float | None = None,
        cutmix_alpha: float | None = None,
        mix_prob: float | None = None,
        switch_prob: float | None = None,
    ) -> None:
        if int(crop_padding) != crop_padding or crop_padding < 0:
            raise ConfigError(
                f"augmentation.crop_padding={crop_padding} must be a non-negative integer; use e.g. 4 (0 = no crop)."
            )
        if not 0.0 <= color_jitter < 1.0:
            raise ConfigError(f"augmentation.color_jitter={color_jitter} must be in [0, 1); use e.g. 0.4 (0 = off).")
        if rotation_deg < 0 or rotation_deg > 180:
            raise ConfigError(f"augmentation.rotation_deg={rotation_deg} must be in [0, 180]; use e.g. 15 (0 = off).")
        if not 0.0 <= erasing_p <= 1.0:
            raise ConfigError(f"augmentation.erasing_p={erasing_p} must be a probability in [0, 1]; use e.g. 0.25.")
        scale = tuple(float(v) for v in erasing_scale)
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ConfigError(
                f"augmentation.erasing_scale={list(scale)} must be two area fractions 0 < lo <= hi <= 1; "
                "use e.g. [0.02, 0.33]."
            )
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        self.color_jitter = float(color_jitter)
        self.rotation_deg = float(rotation_deg)
        self.erasing_p = float(erasing_p)
        self.erasing_scale = scale
        self.auto_augment = build_auto_augment(auto_augment, randaug_n, randaug_m, randaug_std, randaug_p)
        self.mixing = build_mixing(mixup_alpha, cutmix_alpha, mix_prob, switch_prob)

    @property
    def image_ops(self) -> bool:
        """Whether any per-image op is on (what ``__call__`` does)."""
        return bool(self.crop_padding or self.flip or self.color_jitter or self.rotation_deg or self.erasing_p) or (
            self.auto_augment is not None
        )

    @property
    def enabled(self) -> bool:
        """Whether any op is on, batch mixing included; a disabled augment returns its input unchanged."""
        return self.image_ops or self.mixing is not None

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in (("auto", self.auto_augment), ("mixing", self.mixing)) if v)
        return (
            f"BatchAugment(crop_padding={self.crop_padding}, flip={self.flip}, color_jitter={self.color_jitter}, "
            f"rotation_deg={self.rotation_deg}, erasing_p={self.erasing_p}, erasing_scale={self.erasing_scale}{extra})"
        )

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a float batch ``[B, C, H, W]`` with values in [0, 1]; returns a new tensor in [0, 1].

        Order: crop/flip, RandAugment/TrivialAugment (as timm: on the cropped image), rotation, colour jitter,
        erasing (last, as timm's RandomErasing).
        """
        if not self.image_ops:
            return x
        if self.crop_padding or self.flip:
            x = random_crop_flip(x, self.crop_padding, self.flip, generator)
        if self.auto_augment is not None:
            x = self.auto_augment(x, generator)
        if self.rotation_deg:
            x = random_rotate(x, self.rotation_deg, generator)
        if self.color_jitter:
            x = color_jitter(x, self.color_jitter, generator)
        if self.erasing_p:
            x = random_erase(x, self.erasing_p, self.erasing_scale, generator)
        return x


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` floats uniform in [lo, hi), drawn on the CPU generator, then moved to ``device``."""
    u = torch.rand(n, generator=generator) * (hi - lo) + lo
    return u.to(device, non_blocking=True)


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Map indices in [-size+1, 2*size-2] into [0, size) as reflect padding does (edge not repeated)."""
    i = i.abs()
    return torch.where(i >= size, 2 * (size - 1) - i, i)


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop from a ``padding``-pixel reflect-padded image, then horizontal flip with p=0.5.

    Both are folded into one gather with reflect-aware indices, so the padded copy
    is never built: measured ~2x faster on 2 CPU cores than pad + gather + a
    ``torch.where`` flip, and ~5x faster than 4-way advanced indexing.
    """
    b, c, h, w = x.shape
    if padding >= min(h, w):
        raise ConfigError(
            f"augmentation.crop_padding={padding} must be smaller than the image size {h}x{w} "
            "(reflect padding needs it); use e.g. augmentation.crop_padding=4."
        )
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator) - padding
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator) - padding
    flip_mask = torch.rand(b, generator=generator) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    # Only the 3B parameters cross to the device; the B*H*W index is built there.
    dy, dx, flip_mask = torch.stack([dy, dx, flip_mask.long()]).to(x.device, non_blocking=True)
    rows = _reflect(dy[:, None] + torch.arange(h, device=x.device), h)
    cols = _reflect(dx[:, None] + torch.arange(w, device=x.device), w)
    cols = torch.where(flip_mask.bool()[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * w + cols[:, None, :]).reshape(b, 1, h * w)
    return x.reshape(b, c, h * w).gather(2, index.expand(b, c, h * w)).reshape(b, c, h, w)


def random_rotate(x: torch.Tensor, max_deg: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each sample by a uniform angle in [-max_deg, max_deg] with one batched grid_sample."""
    b = x.shape[0]
    angle = _uniform(b, -max_deg, max_deg, generator, x.device) * (math.pi / 180.0)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Zero fill outside the image, as torchvision's RandomRotation default.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [1-s, 1+s] per sample (torchvision semantics)."""
    if x.shape[1] != 3:
        raise ConfigError(
            f"augmentation.color_jitter={strength} needs 3-channel images, got {x.shape[1]}; "
            "set augmentation.color_jitter=0."
        )
    b = x.shape[0]
    factors = _uniform(3 * b, 1.0 - strength, 1.0 + strength, generator, x.device).to(x.dtype).view(3, b, 1, 1, 1)
    x = (x * factors[0]).clamp_(0.0, 1.0)
    mean = _gray(x).mean(dim=(2, 3), keepdim=True)
    x = torch.lerp(mean.expand_as(x), x, factors[1]).clamp_(0.0, 1.0)
    return torch.lerp(_gray(x).expand_as(x), x, factors[2]).clamp_(0.0, 1.0)


def random_erase(x: torch.Tensor, p: float, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Erase one random rectangle per sample with probability ``p`` (aspect ratio in [0.3, 3.3]).

    The rectangle is filled with that image's own per-channel mean. torchvision's usual
    "RandomErasing with 0 after Normalize" fills with the training set's mean instead;
    erasing runs here before normalisation, and the image's own mean keeps the patch at
    the image's brightness, so the occlusion does not add a dark or bright block.
    """
    b, _, h, w = x.shape
    apply = torch.rand(b, generator=generator) < p
    area = (torch.rand(b, generator=generator) * (scale[1] - scale[0]) + scale[0]) * (h * w)
    log_r = torch.rand(b, generator=generator) * (math.log(3.3) - math.log(0.3)) + math.log(0.3)
    ratio = log_r.exp()
    eh = (area * ratio).sqrt().round().clamp(1, h).long()
    ew = (area / ratio).sqrt().round().clamp(1, w).long()
    top = (torch.rand(b, generator=generator) * (h - eh + 1)).floor().long()
    left = (torch.rand(b, generator=generator) * (w - ew + 1)).floor().long()
    params = torch.stack([apply.long(), top, eh, left, ew], 1).to(x.device, non_blocking=True)
    apply, top, eh, left, ew = params.unbind(1)
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & apply.bool()[:, None, None])[:, None]
    return torch.where(mask, x.mean(dim=(2, 3), keepdim=True), x)
