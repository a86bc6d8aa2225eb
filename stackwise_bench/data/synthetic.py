"""A small, fully seeded synthetic image set for tests and smoke runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stackwise_bench.data.splits import ImageData, build_image_data
from stackwise_bench.errors import ConfigError


def make_synthetic(
    num_train: int = 512,
    num_test: int = 128,
    num_classes: int = 4,
    img_size: int = 32,
    seed: int = 0,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    train_size: int | None = None,
) -> ImageData:
    """A small learnable set for tests: one smooth random colour pattern per class plus noise.

    Fully determined by ``seed``. The patterns are low-frequency (4x4 upsampled), so
    crops, flips and resizing keep classes separable and a tiny convnet learns it
    in a few epochs.
    """
    if num_classes < 2 or num_train < num_classes or num_test < 1:
        raise ConfigError(
            f"dataset.num_classes={num_classes}, dataset.num_train={num_train}, dataset.num_test={num_test}: need "
            "num_classes >= 2, num_train >= num_classes and num_test >= 1; use e.g. 4, 512 and 128."
        )
    gen = torch.Generator().manual_seed(int(seed))
    templates = torch.rand(num_classes, 3, 4, 4, generator=gen)
    templates = F.interpolate(templates, size=(img_size, img_size), mode="bilinear", align_corners=False)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
        noise = torch.randn(n, 3, img_size, img_size, generator=gen) * 0.1
        x = (0.2 + 0.6 * templates[y] + noise).clamp(0, 1)
        return (x * 255).round().to(torch.uint8), y

    pool_x, pool_y = draw(num_train)
    test_x, test_y = draw(num_test)
    return build_image_data(
        "synthetic",
        pool_x,
        pool_y,
        test_x,
        test_y,
        [str(i) for i in range(num_classes)],
        val_fraction,
        split_seed,
        train_size,
    )
