"""scikit-learn's bundled 8x8 digits, read with numpy (no scikit-learn import)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stackwise_bench.data.splits import ImageData, build_image_data, split_train_val
from stackwise_bench.errors import ConfigError

DIGITS_TEST_SEED = 0  # fixed: the digits test split never depends on the run seed or split_seed


def load_digits(
    val_fraction: float = 0.1,
    split_seed: int = 0,
    img_size: int = 32,
    test_fraction: float = 0.2,
    train_size: int | None = None,
) -> ImageData:
    """scikit-learn's bundled 8x8 digits, upsampled (bilinear) to ``img_size`` and replicated to RGB.

    The test split is stratified with the fixed ``DIGITS_TEST_SEED`` so it is the same
    for every run seed and every ``split_seed``; validation is carved from the rest.
    """
    if int(img_size) != img_size or img_size < 8:
        raise ConfigError(f"dataset.img_size={img_size} must be an integer >= 8 (digits are 8x8); use e.g. 32.")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(
            f"dataset.test_fraction={test_fraction} must be in (0, 1); use e.g. dataset.test_fraction=0.2."
        )
    table = np.loadtxt(_digits_file(), delimiter=",", dtype=np.float32)  # 64 pixels (0..16) + the label per row
    x = torch.from_numpy(table[:, :64]).reshape(-1, 1, 8, 8) * (255.0 / 16.0)
    if img_size != 8:
        x = F.interpolate(x, size=(int(img_size), int(img_size)), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(table[:, 64]).long()
    pool_idx, test_idx = split_train_val(y, test_fraction, DIGITS_TEST_SEED)
    return build_image_data(
        "digits",
        x[pool_idx],
        y[pool_idx],
        x[test_idx],
        y[test_idx],
        [str(i) for i in range(10)],
        val_fraction,
        split_seed,
        train_size,
    )


def _digits_file() -> Path:
    """The digits table inside the installed scikit-learn, found without importing it.

    ``import sklearn`` pulls in scipy and costs ~1 s of a run's start-up; the data
    is one 60 kB gzipped CSV, read here with numpy.
    """
    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0]) / "datasets" / "data" / "digits.csv.gz" if folders else None
    if path is None or not path.is_file():
        raise ConfigError(
            "dataset=digits reads the digits table shipped with scikit-learn, which is not installed; "
            "pip install scikit-learn, or use dataset=synthetic or dataset=cifar10."
        )
    return path
