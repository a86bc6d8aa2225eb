"""What every dataset loader returns: :class:`ImageData`, and the deterministic train/val split."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch

from stackwise_bench.errors import ConfigError


@dataclass
class ImageData:
    """A dataset split into train / val / test, all uint8 ``[N, 3, H, W]`` CPU tensors.

    ``train_x`` is the training part after validation was carved out; ``mean`` and
    ``std`` are its per-channel statistics in [0, 1]. ``split`` is what goes into
    ``split.json``; its indices refer to the training pool before the carve-out (imagefolder: rows of its cache).
    """

    name: str
    train_x: torch.Tensor = field(repr=False)
    train_y: torch.Tensor = field(repr=False)
    val_x: torch.Tensor = field(repr=False)
    val_y: torch.Tensor = field(repr=False)
    test_x: torch.Tensor = field(repr=False)
    test_y: torch.Tensor = field(repr=False)
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    split: dict = field(repr=False)
    # What the loader wants the run record to keep beside the split (JSON-ready; empty for the built-in sets):
    # dataset=imagefolder puts its cache (path, key, built or reused) and the files skipped as undecodable here.
    notes: dict = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def split_train_val(labels: torch.Tensor, val_fraction: float, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, deterministic split of ``range(len(labels))`` into sorted (train_idx, val_idx).

    Each class contributes ``round(val_fraction * class_size)`` samples to validation,
    chosen by a permutation from a CPU generator seeded with ``split_seed`` only.
    """
    if not 0.0 < val_fraction < 1.0:
        # 0 would leave nothing to pick best.pt and early stopping by: epoch 1 would stay "best" forever.
        raise ConfigError(
            f"dataset.val_fraction={val_fraction} must be in (0, 1): best.pt and early stopping are "
            "chosen on the validation split; use e.g. dataset.val_fraction=0.1."
        )
    if int(split_seed) != split_seed or split_seed < 0:
        raise ConfigError(
            f"dataset.split_seed={split_seed} must be a non-negative integer; use e.g. dataset.split_seed=0."
        )
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    gen = torch.Generator().manual_seed(int(split_seed))
    train_parts, val_parts = [], []
    for cls in torch.unique(labels, sorted=True):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = int(math.floor(val_fraction * len(idx) + 0.5))
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    train_idx = torch.sort(torch.cat(train_parts)).values if train_parts else torch.zeros(0, dtype=torch.long)
    val_idx = torch.sort(torch.cat(val_parts)).values if val_parts else torch.zeros(0, dtype=torch.long)
    if len(val_idx) == 0:
        raise ConfigError(
            f"dataset.val_fraction={val_fraction} leaves no validation sample out of {len(labels)}; "
            "raise dataset.val_fraction or use more training data."
        )
    return train_idx, val_idx


def _channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of a uint8 ``[N, C, H, W]`` tensor in [0, 1], exact integer sums in chunks."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    total_sq = torch.zeros(x.shape[1], dtype=torch.float64)
    for part in x.split(chunk):
        part = part.to(torch.float64)
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
    count = x.numel() / x.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).clamp_min(1e-6).tolist())


def subset_train(
    train_idx: torch.Tensor, labels: torch.Tensor, train_size: int, split_seed: int, name: str
) -> torch.Tensor:
    """The first ``train_size`` of ``train_idx`` in a seeded, class-interleaved order, sorted.

    Each class is permuted (a generator seeded with ``split_seed`` + 1, so the choice never depends on the
    run seed), and its i-th image gets the key (i + ½) / class size: sorting by key deals the classes out in
    proportion, so every subset keeps the class shares, and a smaller subset is part of every larger one
    (a data-scaling study adds images, it never swaps them).
    """
    labels = torch.as_tensor(labels).reshape(-1).cpu()[train_idx]
    n_classes = len(torch.unique(labels))
    if int(train_size) != train_size or not n_classes <= train_size <= len(train_idx):
        raise ConfigError(
            f"dataset.train_size={train_size} must be a whole number between {n_classes} (one image per class) "
            f"and the {len(train_idx)} training images {name} has after validation is carved out; "
            f"use e.g. dataset.train_size={max(n_classes, len(train_idx) // 2)}, or null for all of them."
        )
    gen = torch.Generator().manual_seed(int(split_seed) + 1)
    keys = torch.empty(len(labels), dtype=torch.float64)
    for cls in torch.unique(labels, sorted=True):
        where = torch.nonzero(labels == cls).flatten()
        order = torch.randperm(len(where), generator=gen)
        keys[where[order]] = (torch.arange(len(where), dtype=torch.float64) + 0.5) / len(where)
    chosen = torch.sort(keys, stable=True).indices[: int(train_size)]
    return torch.sort(train_idx[chosen]).values


def build_image_data(
    name, pool_x, pool_y, test_x, test_y, classes, val_fraction, split_seed, train_size: int | None = None
) -> ImageData:
    """Carve validation out of the training pool (then keep ``train_size`` images of the rest, when given) and
    compute train-only statistics."""
    train_idx, val_idx = split_train_val(pool_y, val_fraction, split_seed)
    if train_size is not None:
        train_idx = subset_train(train_idx, pool_y, train_size, split_seed, name)
    lists = {"train_idx": train_idx.tolist(), "val_idx": val_idx.tolist()}
    digest = hashlib.sha256(json.dumps(lists, separators=(",", ":")).encode()).hexdigest()
    split = {
        "val_fraction": float(val_fraction),
        "split_seed": int(split_seed),
        "train_size": None if train_size is None else int(train_size),
        "num_train": len(train_idx),
        "num_val": len(val_idx),
        **lists,
        "sha256": digest,
    }
    train_x = pool_x[train_idx].contiguous()
    mean, std = _channel_stats(train_x)
    return ImageData(
        name,
        train_x,
        pool_y[train_idx].contiguous(),
        pool_x[val_idx].contiguous(),
        pool_y[val_idx].contiguous(),
        test_x.contiguous(),
        test_y.contiguous(),
        list(classes),
        mean,
        std,
        split,
    )
