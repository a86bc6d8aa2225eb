"""Batch mixup / CutMix: label mass conserved, lambda = the pixels' share, one draw per (seed, epoch, step)."""

from __future__ import annotations

import pytest
import torch

from stackwise_bench.data.augment import BatchAugment
from stackwise_bench.data.mixup import Mixup, build_mixing, step_generator
from stackwise_bench.errors import ConfigError

K = 5  # classes


def batch(n: int = 8, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, K, (n,), generator=g)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_soft_targets_conserve_label_mass(mixup, cutmix, smoothing):
    x, y = batch()
    mix = Mixup(mixup, cutmix)
    for step in range(20):
        lam, _ = mix.draw(x.shape, step_generator(0, 0, step))
        _, targets, dominant = mix(x, y, K, smoothing, step_generator(0, 0, step))
        torch.testing.assert_close(targets.sum(1), torch.ones(len(y)))  # label mass conserved per sample
        # the sample's own label carries lam (plus smoothing's share), its partner's 1 - lam
        own = targets.gather(1, y[:, None]).squeeze(1)
        partner = targets.gather(1, y.flip(0)[:, None]).squeeze(1)
        same = y == y.flip(0)
        off = smoothing / K
        torch.testing.assert_close(own[~same], torch.full_like(own[~same], lam * (1 - smoothing) + off))
        torch.testing.assert_close(partner[~same], torch.full_like(own[~same], (1 - lam) * (1 - smoothing) + off))
        assert torch.equal(dominant, y if lam >= 0.5 else y.flip(0))
        assert torch.equal(targets.argmax(1)[~same], dominant[~same])  # the dominant label is the heavier one


def test_mixup_blends_each_sample_with_its_partner_by_lambda():
    x, y = batch()
    mix = Mixup(0.8, 0.0)
    lam, box = mix.draw(x.shape, step_generator(1, 2, 3))
    mixed, _, _ = mix(x, y, K, 0.0, step_generator(1, 2, 3))
    assert box is None and 0 < lam < 1
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))


@pytest.mark.parametrize("step", range(12))
def test_cutmix_lambda_is_the_share_of_own_pixels(step):
    """Lambda is corrected to the box: the share of each image that is still its own equals lam exactly."""
    x, y = batch(n=6, size=17)
    x = x + torch.arange(6).view(6, 1, 1, 1) * 10  # every sample distinguishable from its partner
    mix = Mixup(0.0, 1.0)
    lam, box = mix.draw(x.shape, step_generator(0, 1, step))
    mixed, targets, _ = mix(x, y, K, 0.0, step_generator(0, 1, step))
    assert box is not None
    top, bottom, left, right = box
    own = (mixed == x).all(1).float().mean(dim=(1, 2))  # per sample: fraction of pixels untouched
    pasted = (mixed == x.flip(0)).all(1)
    torch.testing.assert_close(own, torch.full((6,), lam, dtype=own.dtype))
    assert pasted[:, top:bottom, left:right].all() and pasted.float().mean() == pytest.approx(1 - lam)
    torch.testing.assert_close(
        targets.gather(1, y[:, None]).squeeze(1)[y != y.flip(0)],
        torch.tensor(lam).expand(int((y != y.flip(0)).sum())).float(),
    )


def test_one_draw_per_seed_epoch_and_step():
    x, y = batch()
    mix = Mixup(0.8, 1.0)
    a = mix(x, y, K, 0.1, step_generator(42, 3, 7))
    b = mix(x, y, K, 0.1, step_generator(42, 3, 7))
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # the same step: bit-identical
    draws = {mix.draw(x.shape, step_generator(42, e, s)) for e in range(3) for s in range(5)}
    assert len(draws) == 15  # another step or epoch: another lambda / box
    assert mix.draw(x.shape, step_generator(42, 3, 7)) != mix.draw(x.shape, step_generator(43, 3, 7))


def test_mix_prob_and_switch_prob():
    x, _ = batch()
    draws = [Mixup(0.8, 1.0, prob=0.5, switch_prob=0.25).draw(x.shape, step_generator(0, 0, s)) for s in range(400)]
    unmixed = [lam == 1.0 and box is None for lam, box in draws]
    cutmix = [box is not None for _, box in draws]
    assert 0.4 < sum(unmixed) / 400 < 0.6
    mixed = 400 - sum(unmixed)
    assert 0.15 < sum(cutmix) / mixed < 0.35
    assert all(
        lam == 1.0 for lam, _ in (Mixup(0.8, 1.0, prob=0.0).draw(x.shape, step_generator(0, 0, s)) for s in range(20))
    )


def test_batch_augment_holds_the_mixing_and_leaves_images_to_the_trainer():
    aug = BatchAugment(crop_padding=0, flip=False, mixup_alpha=0.8, cutmix_alpha=1.0)
    x, _ = batch()
    assert aug.enabled and not aug.image_ops and isinstance(aug.mixing, Mixup)
    assert torch.equal(aug(x, torch.Generator().manual_seed(0)), x)
    assert BatchAugment(mixup_alpha=0.0, cutmix_alpha=None).mixing is None
    assert build_mixing(None, 1.0, None, None).prob == 1.0 and build_mixing(None, 1.0, None, None).switch_prob == 0.5


@pytest.mark.parametrize(
    "args, key",
    [
        ((-0.1, None, None, None), "augmentation.mixup_alpha=-0.1"),
        ((None, float("inf"), None, None), "augmentation.cutmix_alpha=inf"),
        ((0.8, None, 1.5, None), "augmentation.mix_prob=1.5"),
        ((0.8, None, None, -1), "augmentation.switch_prob=-1"),
    ],
)
def test_bad_settings_are_config_errors(args, key):
    with pytest.raises(ConfigError, match=key):
        build_mixing(*args)
