"""RandAugment and TrivialAugment (wide) on whole batches, every sample with its own ops and magnitudes.

The 14 ops and their ranges are torchvision's (``transforms.v2.RandAugment`` / ``TrivialAugmentWide``); each op
here equals torchvision's single-image function on the same parameters (``tests/test_randaugment.py``). Written
here rather than used from torchvision or timm because both draw from the global RNG and work on one image at a
time (torchvision's transform applies *one* op choice to a whole batch tensor; timm works on PIL images in
DataLoader workers): here every random number comes from the step's CPU generator, so a batch is augmented
identically on any device and after a resume, and each op runs once per batch on the group of samples that drew
it (a loop over the 14 op kinds, never over samples). AutoContrast and Equalize need no parameters and are
torchvision's own batched kernels (Equalize: per-image histograms with ``scatter_add_``).

Two choices differ from torchvision's defaults, and match timm's (DeiT's) instead: geometric ops resample
bilinearly (torchvision: nearest, which turns a sheared 32 px image into staircases), and the RandAugment
magnitude ``m`` is on timm's 0-10 scale (DeiT's ``rand-m9`` = 0.9 of every op's range; torchvision's
``magnitude=9`` of 31 bins is ``m=3``). The fill outside a warped image is 0, as torchvision's default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stackwise_bench.errors import ConfigError
from stackwise_bench.values import is_int

OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
    "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)  # fmt: skip
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
# Ops whose magnitude torchvision negates with probability 0.5.
SIGNED = (*GEOMETRIC, "Brightness", "Color", "Contrast", "Sharpness")
# Each op's value at full strength (torchvision's last magnitude bin), (RandAugment, TrivialAugmentWide).
# Translate is a fraction of the image size for RandAugment (150/331) and 32 pixels for the wide space.
FULL = {
    "ShearX": (0.3, 0.99),  # tan of the shear angle
    "ShearY": (0.3, 0.99),
    "Rotate": (30.0, 135.0),  # degrees
    "Brightness": (0.9, 0.99),  # factor 1 +- this
    "Color": (0.9, 0.99),
    "Contrast": (0.9, 0.99),
    "Sharpness": (0.9, 0.99),
    "Posterize": (4.0, 6.0),  # bits taken from 8
    "Solarize": (1.0, 1.0),  # threshold 1 - this
}
TRANSLATE = 150.0 / 331.0  # RandAugment's translation at full strength, as a fraction of the image size
WIDE_TRANSLATE = 32.0  # TrivialAugmentWide's, in pixels
LEVELS = 10.0  # timm's magnitude scale: m=10 is every op at full strength
BINS = 31  # TrivialAugmentWide's magnitude bins (torchvision's default)
_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


class RandAugment:
    """``num_ops`` ops per sample, each drawn uniformly from :data:`OPS` and applied with probability ``prob``.

    Args:
        num_ops: Ops applied in sequence to every sample.
        magnitude: Strength on timm's 0-10 scale (a fraction ``magnitude / 10`` of each op's range).
        magnitude_std: Per sample and op, the magnitude is drawn from N(magnitude, std) and clipped to [0, 10]
            (timm's ``mstd``); 0 = every op at ``magnitude``.
        prob: Probability that a drawn op is applied (timm: 0.5; torchvision: 1).
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.0, prob: float = 1.0):
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = num_ops, magnitude, magnitude_std, prob

    def __repr__(self) -> str:
        return f"RandAugment(n={self.num_ops}, m={self.magnitude}, std={self.magnitude_std}, p={self.prob})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b = x.shape[0]
        for _ in range(self.num_ops):  # every draw is made whatever the knobs, so the stream never shifts
            op = torch.randint(len(OPS), (b,), generator=generator)
            noise = torch.randn(b, generator=generator, dtype=torch.float64)
            sign = torch.where(torch.rand(b, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
            applied = torch.rand(b, generator=generator) < self.prob
            level = (self.magnitude + self.magnitude_std * noise).clamp(0.0, LEVELS)
            x = apply_ops(x, torch.where(applied, op, 0), level / LEVELS, sign)
        return x


class TrivialAugment:
    """TrivialAugmentWide: one op per sample, its magnitude a uniform one of :data:`BINS` bins of the wide ranges."""

    def __repr__(self) -> str:
        return "TrivialAugment()"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b = x.shape[0]
        op = torch.randint(len(OPS), (b,), generator=generator)
        strength = torch.randint(BINS, (b,), generator=generator, dtype=torch.float64) / (BINS - 1)
        sign = torch.where(torch.rand(b, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
        return apply_ops(x, op, strength, sign, wide=True)


def build_auto_augment(
    kind: str | None, n: int | None, m: float | None, std: float | None, p: float | None
) -> RandAugment | TrivialAugment | None:
    """The ``augmentation.auto_augment`` policy from its knobs (null ``randaug_*`` take their defaults)."""
    if kind is None:
        return None
    if kind == "trivial":
        return TrivialAugment()
    if kind != "rand":
        raise ConfigError(f"augmentation.auto_augment={kind} is not known; use rand, trivial or null (off).")
    n, m = 2 if n is None else n, 9.0 if m is None else m
    std, p = 0.0 if std is None else std, 1.0 if p is None else p
    if not is_int(n) or n < 1:
        raise ConfigError(f"augmentation.randaug_n={n} must be a positive integer; use e.g. augmentation.randaug_n=2.")
    if not 0 <= m <= LEVELS:
        raise ConfigError(
            f"augmentation.randaug_m={m} must be in [0, 10] (timm's scale); use e.g. augmentation.randaug_m=9."
        )
    if not 0 <= std < math.inf:
        raise ConfigError(f"augmentation.randaug_std={std} must be a non-negative number; use e.g. 0.5.")
    if not 0 <= p <= 1:
        raise ConfigError(f"augmentation.randaug_p={p} must be a probability in [0, 1]; use e.g. 0.5.")
    return RandAugment(n, float(m), float(std), float(p))


# ------------------------------------------------------------------------------------------------ the ops


def apply_ops(
    x: torch.Tensor, op: torch.Tensor, strength: torch.Tensor, sign: torch.Tensor, wide: bool = False
) -> torch.Tensor:
    """Sample ``i`` of ``x`` (float ``[B, 3, H, W]`` in [0, 1]) through op ``OPS[op[i]]`` at ``strength[i]``.

    ``op``, ``strength`` (a fraction of the op's full range, in [0, 1]) and ``sign`` (+-1, used by
    :data:`SIGNED` ops) are CPU tensors. The batch is sorted by op once, so each op's group is a contiguous
    slice (the five geometric ops one slice, one warp), and put back in order with one ``index_select``: two
    gathers and two host-to-device copies per call, whatever the number of op kinds drawn.
    """
    if x.shape[1] != 3:
        raise ConfigError(
            f"augmentation.auto_augment needs 3-channel images, got {x.shape[1]}; set augmentation.auto_augment=null."
        )
    order = torch.argsort(op, stable=True)
    counts = torch.bincount(op, minlength=len(OPS)).tolist()
    if counts[0] == len(op):
        return x
    op, strength, sign = op[order], strength[order], sign[order]
    full = torch.tensor([FULL.get(name, (0.0, 0.0))[int(wide)] for name in OPS], dtype=torch.float64)
    signed = torch.tensor([name in SIGNED for name in OPS])
    value = strength * full[op] * torch.where(signed[op], sign, 1.0)
    first, last = OPS.index(GEOMETRIC[0]), OPS.index(GEOMETRIC[-1])
    geo = slice(sum(counts[:first]), sum(counts[: last + 1]))
    theta = _geometry(op[geo], (strength * sign)[geo], x.shape[-2:], wide)
    # one copy of the indices and one of the parameters to the device
    indices = torch.cat([order, torch.argsort(order)]).to(x.device, non_blocking=True)
    floats = torch.cat([value.float(), theta.flatten()]).to(x.device, x.dtype, non_blocking=True)
    value, theta = floats[: len(op)].view(-1, 1, 1, 1), floats[len(op) :].view(-1, 2, 3)
    xs = _rows(x, indices[: len(op)])
    pieces = [xs[: counts[0]]]
    if geo.stop > geo.start:
        pieces.append(_warp(xs[geo], theta))
    at = geo.stop
    for name in OPS[last + 1 :]:
        n = counts[OPS.index(name)]
        if n:
            pieces.append(_COLOUR[name](xs[at : at + n], value[at : at + n]))
        at += n
    return _rows(torch.cat(pieces), indices[len(op) :])


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` along the batch as a 2-D ``index_select``: ~3x faster on a CPU than on the 4-D tensor."""
    return x.reshape(len(x), -1).index_select(0, index).view(len(index), *x.shape[1:])


def _geometry(op: torch.Tensor, value: torch.Tensor, size, wide: bool) -> torch.Tensor:
    """Per-sample inverse affine matrices ``[G, 2, 3]`` of torchvision's F.affine / F.rotate calls in RandAugment.

    ShearX/Y: ``affine(shear=degrees(atan(v)), center=[0, 0])`` (the top-left corner); TranslateX/Y:
    ``affine(translate=int(v))`` (whole pixels, truncated); Rotate: ``rotate(angle=v)`` (which negates the angle).
    In float64 on the CPU, as torchvision computes its matrix in Python floats.
    """
    h, w = size
    zero = torch.zeros_like(value)

    def where(name: str, v: torch.Tensor) -> torch.Tensor:
        return torch.where(op == OPS.index(name), v, zero)

    shear = value * FULL["ShearX"][int(wide)]
    shear_deg = torch.rad2deg(torch.atan(shear))
    move = WIDE_TRANSLATE if wide else TRANSLATE
    tx = where("TranslateX", torch.trunc(value * (move if wide else move * w)))
    ty = where("TranslateY", torch.trunc(value * (move if wide else move * h)))
    corner = (op == OPS.index("ShearX")) | (op == OPS.index("ShearY"))
    cx, cy = torch.where(corner, -0.5 * w, zero), torch.where(corner, -0.5 * h, zero)
    angle = where("Rotate", -value * FULL["Rotate"][int(wide)])
    return _inverse_affine(angle, where("ShearX", shear_deg), where("ShearY", shear_deg), tx, ty, cx, cy)


def _inverse_affine(angle, shear_x, shear_y, tx, ty, cx, cy) -> torch.Tensor:
    """torchvision's ``_get_inverse_affine_matrix`` (scale 1), one matrix per sample; angles in degrees."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    m2 = cx - d * (cx + tx) + b * (cy + ty)
    m5 = cy + c * (cx + tx) - a * (cy + ty)
    return torch.stack([torch.stack([d, -b, m2], 1), torch.stack([-c, a, m5], 1)], 1)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_affine_grid`` + ``grid_sample`` (zero fill) with one matrix per sample: one call for all.

    The grid is built by broadcasting, not torchvision's ``bmm`` against a ``[1, H*W, 3]`` base (on a CPU a
    bmm with inner size 3 cost more than the resampling); the same products, summed in the same order.
    """
    g, _, h, w = x.shape
    cols = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, dtype=x.dtype, device=x.device).view(1, 1, w)
    rows = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, dtype=x.dtype, device=x.device).view(1, h, 1)
    t = theta / torch.tensor([0.5 * w, 0.5 * h], dtype=x.dtype, device=x.device).view(1, 2, 1)
    t = t.view(g, 6, 1, 1)
    gx = cols * t[:, 0] + rows * t[:, 1] + t[:, 2]
    gy = cols * t[:, 3] + rows * t[:, 4] + t[:, 5]
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` with a per-sample factor ``[G, 1, 1, 1]``."""
    return (a * factor + b * (1.0 - factor)).clamp_(0.0, 1.0)


def _sharpness(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_sharpness: blend with a 3x3 smoothing (8 neighbours + 5 x centre, / 13) inside a
    one-pixel border. The smoothing as shifted sums: a depthwise 3x3 conv2d cost ~10x more on a CPU."""
    h, w = x.shape[-2:]
    if h <= 2 or w <= 2:
        return x
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    centre = x[..., 1:-1, 1:-1]
    blurred = (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:] + 4.0 * centre) / 13.0
    out = x.clone()
    out[..., 1:-1, 1:-1] = centre + (blurred - centre) * (1.0 - (1.0 + value))
    return out.clamp_(0.0, 1.0)


def _posterize(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Keep ``round(8 - value)`` bits of each 8-bit level, as torchvision's posterize of a uint8 image.

    On the uint8 grid (``x * 255`` rounded), not torchvision's float formula ``floor(x * 2**bits) / 2**bits``:
    RandAugment's posterize is defined on 8-bit images (its float path maps white to 255/256 even at 8 bits).
    """
    bits = torch.round(8.0 - value)
    step = torch.pow(2.0, 8.0 - bits)
    return torch.floor(x.mul(255.0).round_() / step).mul_(step).div_(255.0)


def _autocontrast(x: torch.Tensor, _) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    return TF.autocontrast(x)


def _equalize(x: torch.Tensor, _) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    return TF.equalize(x)  # on the uint8 grid (torchvision converts), back to float


_COLOUR = {
    "Brightness": lambda x, v: x.mul(1.0 + v).clamp_(0.0, 1.0),
    "Color": lambda x, v: _blend(x, _gray(x), 1.0 + v),
    "Contrast": lambda x, v: _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), 1.0 + v),
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": lambda x, v: torch.where(x >= 1.0 - v, 1.0 - x, x),
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
}
