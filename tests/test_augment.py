"""BatchAugment: batched crop / flip / jitter / rotation / erasing, checked against simple references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from stackwise_bench.data.augment import BatchAugment
from stackwise_bench.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf" / "augmentation"
OFF = dict(crop_padding=0, flip=False)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def batch():
    return torch.rand(16, 3, 12, 12, generator=gen(123))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(OFF, color_jitter=0.4),
        dict(OFF, rotation_deg=30),
        dict(OFF, erasing_p=1.0),
        dict(color_jitter=0.4, rotation_deg=15, erasing_p=0.25),
    ],
)
def test_shapes_ranges_and_determinism(batch, kwargs):
    aug = BatchAugment(**kwargs)
    out = aug(batch, gen(1))
    assert out.shape == batch.shape and out.dtype == batch.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, aug(batch, gen(1)))
    assert not torch.equal(out, aug(batch, gen(2)))
    assert not torch.equal(out, batch)


@pytest.mark.parametrize("flip", [False, True])
def test_crop_matches_per_sample_reference(batch, flip):
    p = 3
    out = BatchAugment(crop_padding=p, flip=flip)(batch, gen(5))
    _, _, h, w = batch.shape
    offsets = []
    for i in range(len(batch)):
        # Independent reference: numpy's reflect pad, then every possible (flipped) crop of this one sample.
        padded = np.pad(batch[i].numpy(), ((0, 0), (p, p), (p, p)), mode="reflect")
        hits = [
            (dy, dx, f)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            for f in (False, True)
            if np.array_equal(
                padded[:, dy : dy + h, dx : dx + w][:, :, ::-1] if f else padded[:, dy : dy + h, dx : dx + w],
                out[i].numpy(),
            )
        ]
        assert len(hits) == 1, f"sample {i} is not a {h}x{w} crop of its padded image"
        offsets.append(hits[0])
    assert len({o[:2] for o in offsets}) > 3  # per-sample offsets, not one shift for the whole batch
    assert any(o[:2] != (p, p) for o in offsets)  # content really moved
    assert any(o[2] for o in offsets) == flip


def test_flip_flips_some_samples_and_keeps_others(batch):
    out = BatchAugment(crop_padding=0, flip=True)(batch, gen(0))
    flipped = [torch.equal(o, x.flip(-1)) for o, x in zip(out, batch)]
    kept = [torch.equal(o, x) for o, x in zip(out, batch)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert any(flipped) and any(kept)


def test_color_jitter_scales_a_gray_image_uniformly():
    gray = torch.full((32, 3, 8, 8), 0.5)
    out = BatchAugment(**OFF, color_jitter=0.4)(gray, gen(0))
    # Contrast and saturation leave a flat gray image alone; only brightness in [0.6, 1.4] acts.
    assert torch.equal(out, out[:, :1, :1, :1].expand_as(out))
    assert out.min() >= 0.3 - 1e-6 and out.max() <= 0.7 + 1e-6 and out.std() > 0.01


def test_rotation_keeps_centre_and_moves_corners():
    ones = torch.ones(64, 3, 15, 15)
    out = BatchAugment(**OFF, rotation_deg=45)(ones, gen(0))
    torch.testing.assert_close(out[:, :, 7, 7], torch.ones(64, 3))
    assert (out[:, :, 0, 0] < 0.5).float().mean() > 0.5  # most samples rotate a corner out of view
    small = BatchAugment(**OFF, rotation_deg=1e-4)(ones, gen(0))
    torch.testing.assert_close(small, ones, atol=1e-3, rtol=0)


def test_erasing_fills_one_rectangle_with_the_image_mean(batch):
    out = BatchAugment(**OFF, erasing_p=1.0, erasing_scale=(0.1, 0.3))(batch, gen(0))
    for o, x in zip(out, batch):
        mask = (o != x).any(0)
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
        assert mask[box].all() and mask.sum() == mask[box].numel()  # exactly one filled rectangle
        assert 0.05 <= mask.float().mean() <= 0.4
        torch.testing.assert_close(o[:, box[0], box[1]], x.mean((1, 2), keepdim=True).expand_as(o[:, box[0], box[1]]))
    assert torch.equal(
        BatchAugment(**OFF, erasing_p=1e-9, color_jitter=0.1)(batch, gen(0)),
        BatchAugment(**OFF, color_jitter=0.1)(batch, gen(0)),
    )


def test_none_yaml_is_identity_and_disabled(batch):
    aug = instantiate(OmegaConf.load(CONF / "none.yaml"))
    assert not aug.enabled and torch.equal(aug(batch, gen(0)), batch)


def test_yaml_options_build_the_documented_recipes():
    basic = instantiate(OmegaConf.load(CONF / "basic.yaml"))
    ext = instantiate(OmegaConf.load(CONF / "extended.yaml"))
    assert (basic.crop_padding, basic.flip, basic.color_jitter, basic.rotation_deg, basic.erasing_p) == (
        4,
        True,
        0,
        0,
        0,
    )
    assert (ext.crop_padding, ext.flip, ext.color_jitter, ext.rotation_deg, ext.erasing_p) == (4, True, 0.4, 15, 0.25)
    assert basic.enabled and ext.enabled


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(crop_padding=-1), "augmentation.crop_padding"),
        (dict(color_jitter=1.5), "augmentation.color_jitter"),
        (dict(rotation_deg=-5), "augmentation.rotation_deg"),
        (dict(erasing_p=2), "augmentation.erasing_p"),
        (dict(erasing_scale=(0.5, 0.1)), "augmentation.erasing_scale"),
    ],
)
def test_bad_settings_are_config_errors(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        BatchAugment(**kwargs)


def test_padding_larger_than_image_is_a_config_error():
    with pytest.raises(ConfigError, match="augmentation.crop_padding=8"):
        BatchAugment(crop_padding=8)(torch.rand(2, 3, 8, 8), gen(0))
