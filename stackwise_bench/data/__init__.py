"""Datasets as uint8 tensors, a deterministic train/val split, and an on-device batch loader.

Every loader returns an :class:`ImageData` holding the whole dataset as uint8
``[N, 3, H, W]`` CPU tensors; :class:`BatchLoader` moves a set to the training
device once and serves normalised, augmented batches with tensor ops only
(airbench style: no DataLoader workers, no PIL).

The loaders live one per source (``digits``, ``cifar``, ``synthetic``, ``imagefolder``: a user's own
folders, decoded once into a uint8 memmap cache); each imports
its heavy library (torchvision) only when called, so importing this package stays cheap.
"""

from stackwise_bench.data.cifar import load_cifar
from stackwise_bench.data.digits import DIGITS_TEST_SEED, load_digits
from stackwise_bench.data.imagefolder import load_imagefolder
from stackwise_bench.data.loader import BatchLoader
from stackwise_bench.data.splits import ImageData, split_train_val
from stackwise_bench.data.synthetic import make_synthetic

__all__ = [
    "DIGITS_TEST_SEED",
    "BatchLoader",
    "ImageData",
    "load_cifar",
    "load_digits",
    "load_imagefolder",
    "make_synthetic",
    "split_train_val",
]
