"""CIFAR-10/100 through torchvision (imported only when a CIFAR set is loaded)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import torch

from stackwise_bench.data.splits import ImageData, build_image_data
from stackwise_bench.errors import ConfigError

DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation, so an unreachable host fails instead of hanging


def _cifar_spec(name: str):
    from torchvision.datasets import CIFAR10, CIFAR100

    specs = {"cifar10": (CIFAR10, "CIFAR-10"), "cifar100": (CIFAR100, "CIFAR-100")}
    if name not in specs:
        raise ConfigError(f"dataset.name={name} is not a CIFAR dataset; use dataset.name=cifar10 or cifar100.")
    return specs[name]


def _unchecked(base: type) -> type:
    """``base`` with md5s dropped, so torchvision only checks that each file exists."""
    return type(
        f"Unchecked{base.__name__}",
        (base,),
        {
            "train_list": [[f, None] for f, _ in base.train_list],
            "test_list": [[f, None] for f, _ in base.test_list],
            "meta": {**base.meta, "md5": None},
        },
    )


def _download_cifar(cls: type, pretty: str, root: Path) -> None:
    """Download and extract the archive; on failure remove a partial tarball this call created."""
    from torchvision.datasets.utils import download_and_extract_archive

    tarball = root / cls.filename
    existed = tarball.exists()
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except Exception as err:  # URLError, timeouts, md5 mismatch of a truncated download
        if not existed:
            tarball.unlink(missing_ok=True)
        raise ConfigError(
            f"dataset.download=true: downloading {pretty} into {root} failed ({type(err).__name__}: {err}); "
            f"copy the extracted {cls.filename} to {root / cls.base_folder} and set dataset.download=false, "
            "or run on a machine with network."
        ) from err
    finally:
        socket.setdefaulttimeout(old_timeout)


def load_cifar(
    name: str = "cifar10",
    root: str = "data",
    download: bool = False,
    check_integrity: bool = True,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    train_size: int | None = None,
) -> ImageData:
    """CIFAR-10/100 through torchvision, from ``root/cifar-10(0)-batches-py``.

    Args:
        check_integrity: Verify torchvision's md5 of every file. Set it to False for
            re-packed local copies (same pickle format, different bytes): then only
            the files' existence is checked.
    """
    base, pretty = _cifar_spec(name)
    cls = base if check_integrity else _unchecked(base)
    root_path = Path(root).expanduser()
    folder = root_path / cls.base_folder
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]

    def missing() -> list[str]:
        return [f for f in files if not (folder / f).is_file()]

    if download and missing():
        _download_cifar(cls, pretty, root_path)
    if missing():
        raise ConfigError(
            f"dataset.root={root}: {pretty} files not found (expected {folder}); copy the extracted "
            f"{cls.filename} there or set dataset.download=true on a machine with network."
        )
    try:
        train, test = cls(str(root_path), train=True), cls(str(root_path), train=False)
    except RuntimeError as err:
        raise ConfigError(
            f"dataset.root={root}: {pretty} files in {folder} fail torchvision's md5 check ({err}); "
            "re-extract the original archive, or set dataset.check_integrity=false for a re-packed local copy."
        ) from err

    def to_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return x, torch.as_tensor(ds.targets, dtype=torch.long)

    (pool_x, pool_y), (test_x, test_y) = to_tensors(train), to_tensors(test)
    return build_image_data(
        name, pool_x, pool_y, test_x, test_y, [str(c) for c in train.classes], val_fraction, split_seed, train_size
    )
