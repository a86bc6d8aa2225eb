"""Batched RandAugment / TrivialAugment: each op equals torchvision's single-image function; draws are per step.

Tolerances: geometric ops 1e-5 (the same grid and bilinear grid_sample as torchvision; only the float64 -> float32
rounding of the matrix differs), colour ops 1e-6 (torchvision's formulas with a per-sample factor: the products
round in a different order), AutoContrast/Equalize exact (torchvision's own batched kernels), Posterize exact on
the uint8 grid (it is defined on 8-bit levels; see ``_posterize``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from stackwise_bench.data.augment import BatchAugment
from stackwise_bench.data.randaugment import OPS, RandAugment, TrivialAugment, apply_ops, build_auto_augment
from stackwise_bench.errors import ConfigError

STRENGTHS = (0.0, 0.35, 0.9, 1.0)
BILINEAR = InterpolationMode.BILINEAR


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def images():
    """uint8 images (the grid the loader's floats come from) with structure, so every op changes something."""
    u = torch.randint(0, 256, (4, 3, 13, 11), dtype=torch.uint8, generator=gen(7))
    u[:, :, 4:9, 3:8] //= 3  # a darker block: something to shear, sharpen and equalize
    return u


def reference(name: str, img: torch.Tensor, strength: float, sign: float, wide: bool = False) -> torch.Tensor:
    """torchvision's RandAugment / TrivialAugmentWide op on one image, with the magnitude that ``strength`` is."""
    h, w = img.shape[-2:]
    v = strength * sign
    if name == "Identity":
        return img
    if name in ("ShearX", "ShearY"):
        deg = math.degrees(math.atan(v * (0.99 if wide else 0.3)))
        shear = [deg, 0.0] if name == "ShearX" else [0.0, deg]
        return TF.affine(
            img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=BILINEAR, center=[0, 0]
        )
    if name in ("TranslateX", "TranslateY"):
        size = w if name == "TranslateX" else h
        t = int(v * (32.0 if wide else 150.0 / 331.0 * size))
        move = [t, 0] if name == "TranslateX" else [0, t]
        return TF.affine(img, angle=0.0, translate=move, scale=1.0, shear=[0.0, 0.0], interpolation=BILINEAR)
    if name == "Rotate":
        return TF.rotate(img, angle=v * (135.0 if wide else 30.0), interpolation=BILINEAR)
    enhance = 1.0 + v * (0.99 if wide else 0.9)
    if name == "Brightness":
        return TF.adjust_brightness(img, enhance)
    if name == "Color":
        return TF.adjust_saturation(img, enhance)
    if name == "Contrast":
        return TF.adjust_contrast(img, enhance)
    if name == "Sharpness":
        return TF.adjust_sharpness(img, enhance)
    if name == "Posterize":
        return TF.posterize(img, int(round(8 - strength * (6 if wide else 4))))
    if name == "Solarize":
        return TF.solarize(img, 1.0 - strength)
    return {"AutoContrast": TF.autocontrast, "Equalize": TF.equalize}[name](img)


@pytest.mark.parametrize("wide", [False, True], ids=["rand", "wide"])
@pytest.mark.parametrize("name", OPS)
def test_each_op_equals_torchvision(name, wide, images):
    """Every sample of one batched call (its own strength and sign) against torchvision on that image alone."""
    x = images.float() / 255
    cases = [(s, sign) for s in STRENGTHS for sign in (1.0, -1.0)]
    batch = x.repeat(len(cases), 1, 1, 1)
    k = len(images)
    op = torch.full((len(batch),), OPS.index(name))
    strength = torch.tensor([s for s, _ in cases], dtype=torch.float64).repeat_interleave(k)
    sign = torch.tensor([g for _, g in cases], dtype=torch.float64).repeat_interleave(k)
    out = apply_ops(batch, op, strength, sign, wide=wide)
    assert out.shape == batch.shape and out.min() >= 0 and out.max() <= 1
    for i, (s, g) in enumerate(cases):
        got = out[i * k : (i + 1) * k]
        if name == "Posterize":  # uint8 semantics: compare on the uint8 grid
            want = torch.stack([reference(name, u, s, g, wide) for u in images])
            assert torch.equal(got.mul(255).round().to(torch.uint8), want), (s, g)
            continue
        want = torch.stack([reference(name, img, s, g, wide) for img in x])
        atol = 1e-5 if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate") else 1e-6
        torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=f"{name} strength={s} sign={g}")


def test_mixed_ops_in_one_batch_match_their_single_op_results(images):
    """Grouping by op (index_select / index_copy) puts every sample back in its place."""
    x = images.float().div(255).repeat(8, 1, 1, 1)[: len(OPS) * 2]
    op = torch.arange(len(OPS)).repeat(2)
    strength = torch.linspace(0.1, 1.0, len(op), dtype=torch.float64)
    sign = torch.where(torch.arange(len(op)) % 3 == 0, -1.0, 1.0).double()
    out = apply_ops(x, op, strength, sign)
    for i in range(len(op)):
        alone = apply_ops(x[i : i + 1], op[i : i + 1], strength[i : i + 1], sign[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("policy", [RandAugment(2, 9.0, 0.5, 0.5), RandAugment(3, 5.0), TrivialAugment()])
def test_deterministic_per_generator_state(policy):
    x = torch.rand(32, 3, 12, 12, generator=gen(3))
    out = policy(x, gen(11))
    assert torch.equal(out, policy(x, gen(11)))  # the same (seed, epoch, step) generator: the same batch
    assert not torch.equal(out, policy(x, gen(12)))  # another step: other ops and magnitudes
    assert not torch.equal(out, x) and out.min() >= 0 and out.max() <= 1


def test_ops_are_drawn_per_sample():
    """32 copies of one image come out different: ops and magnitudes are per sample, not per batch."""
    x = torch.rand(1, 3, 12, 12, generator=gen(4)).expand(32, -1, -1, -1).contiguous()
    out = RandAugment(2, 9.0, 0.5)(x, gen(5))
    distinct = {tuple(o.flatten()[:40].tolist()) for o in out}
    assert len(distinct) > 16


def test_magnitude_zero_without_noise_leaves_only_parameter_free_ops():
    """m=0, std=0: geometric and colour ops are identities; only AutoContrast and Equalize change a sample
    (the images are on the uint8 grid, where Posterize keeps all 8 bits, and below Solarize's threshold 1)."""
    x = torch.randint(0, 255, (64, 3, 10, 10), generator=gen(6)).float() / 255
    policy = RandAugment(1, 0.0, 0.0)
    g = gen(9)
    op = torch.randint(len(OPS), (64,), generator=gen(9))  # the first draw of the policy's stream
    out = policy(x, g)
    free = torch.tensor([OPS[o] in ("AutoContrast", "Equalize") for o in op])
    changed = (out - x).abs().amax(dim=(1, 2, 3)) > 1e-5
    assert not changed[~free].any()


def test_batch_augment_runs_the_policy_after_crop_and_flip():
    x = torch.rand(16, 3, 12, 12, generator=gen(1))
    aug = BatchAugment(crop_padding=2, flip=True, auto_augment="rand", randaug_n=2, randaug_m=9, randaug_std=0.5)
    assert aug.image_ops and aug.enabled and aug.mixing is None
    out = aug(x, gen(2))
    assert torch.equal(out, aug(x, gen(2))) and not torch.equal(out, BatchAugment(crop_padding=2)(x, gen(2)))
    assert isinstance(BatchAugment(auto_augment="trivial").auto_augment, TrivialAugment)
    assert BatchAugment().auto_augment is None


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(auto_augment="auto"), "augmentation.auto_augment=auto"),
        (dict(auto_augment="rand", randaug_n=0), "augmentation.randaug_n=0"),
        (dict(auto_augment="rand", randaug_m=11), "augmentation.randaug_m=11"),
        (dict(auto_augment="rand", randaug_std=-1), "augmentation.randaug_std=-1"),
        (dict(auto_augment="rand", randaug_p=2), "augmentation.randaug_p=2"),
    ],
)
def test_bad_settings_are_config_errors(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        build_auto_augment(kwargs.get("auto_augment"), *(kwargs.get(f"randaug_{k}") for k in ("n", "m", "std", "p")))
