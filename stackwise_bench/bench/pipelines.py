"""Data pipelines against torchvision's: in-memory batches, an image folder's cache, and DeiT's augmentation."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stackwise_bench.bench.harness import Budget, compare, interleaved
from stackwise_bench.configs import CONF_DIR
from stackwise_bench.training.precision import synchronize


class PILSet(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: uint8 HWC row -> PIL image -> transform."""

    def __init__(self, x_hwc, y, transform):
        self.x, self.y, self.transform = x_hwc, y, transform

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def torch_loader_img_s(loader, device: torch.device) -> float:
    """img/s of one pass over a torch DataLoader, each batch copied to ``device`` (the reference pipelines)."""
    synchronize(device)
    t0 = time.perf_counter()
    seen = 0
    for xb, yb in loader:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        seen += len(yb)
    synchronize(device)
    return seen / (time.perf_counter() - t0)


def batch_loader_img_s(loader, device: torch.device, epochs: range) -> float:
    """img/s of a BatchLoader over the given epochs (each epoch number draws its own order and augmentation)."""
    synchronize(device)
    t0 = time.perf_counter()
    seen = sum(len(yb) for epoch in epochs for _, yb in loader.epoch(epoch))
    synchronize(device)
    return seen / (time.perf_counter() - t0)


def reference_loader(dataset, batch: int, device: torch.device):
    """torchvision's way: a DataLoader with 2 workers, pinned memory on CUDA.

    The workers persist: each figure times it after a warm-up pass, so their start-up is not counted against it.
    """
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=2,
        drop_last=True,
        persistent_workers=True,
        pin_memory=device.type == "cuda",
    )


def fig_pipeline(b: Budget, work: Path) -> list[dict]:
    """BatchLoader + BatchAugment ÷ torchvision's per-sample PIL DataLoader (2 workers), at 32 and 224 px."""
    from stackwise_bench.training.precision import resolve_device

    device = resolve_device("auto")
    gen = torch.Generator().manual_seed(0)
    x_all = torch.randint(0, 256, (4 * b.pipeline_images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y_all = torch.randint(0, 10, (len(x_all),), generator=gen)
    out = []
    for size in (32, 224):
        n = len(x_all) if size == 32 else b.pipeline_images  # 224 px batches cost ~50x more: fewer of them
        out.append(_pipeline_row(b, x_all[:n], y_all[:n], size, device))
    return out


def _pipeline_row(b: Budget, x: torch.Tensor, y: torch.Tensor, size: int, device: torch.device) -> dict:
    """One size: the batched pipeline ÷ the per-sample PIL DataLoader, crop + flip (+ resize) + normalise."""
    from torchvision import transforms as T

    from stackwise_bench.data import BatchLoader
    from stackwise_bench.data.augment import BatchAugment

    batch, mean, std = 128, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    ours = BatchLoader(
        x,
        y,
        batch,
        device=device,
        out_size=size,
        mean=mean,
        std=std,
        augment=BatchAugment(),
        shuffle=True,
        drop_last=True,
    )
    tf = [T.RandomCrop(32, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip()]
    tf += [T.Resize(size)] if size != 32 else []
    tf += [T.ToTensor(), T.Normalize(mean, std)]
    ref = reference_loader(PILSet(x.permute(0, 2, 3, 1).contiguous().numpy(), y.numpy(), T.Compose(tf)), batch, device)

    def ours_pass(rep):
        return batch_loader_img_s(ours, device, range(rep + 1, rep + 2))  # rep -1 is the warm-up pass

    def ref_pass(_):
        return torch_loader_img_s(ref, device)

    ours_pass(-1), ref_pass(-1)  # warm-up: workers, allocator, kernels
    s = interleaved(b.reps, {"batched": ours_pass, "torchvision": ref_pass})
    return {
        "figure": "pipeline",
        "setting": f"img/s, batched / torchvision PIL: crop+flip{'+resize' if size != 32 else ''}+normalise to "
        f"{size} px, batch {batch}",
        "unit": "img/s",
        "goal": ">= 6" if size == 32 else ">= 2.5",
        **compare(s, "batched", "torchvision"),
    }


def _write_jpegs(root: Path, counts: dict, classes: int, size: tuple[int, int] = (240, 320)) -> int:
    """Photo-like JPEGs (a smooth random colour field plus noise, quality 90) in ``root/<part>/c<k>/``."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    written = 0
    for part, count in counts.items():
        for i in range(count):
            field = F.interpolate(torch.rand(1, 3, 6, 8, generator=gen) * 255, size=size, mode="bilinear")
            noise = torch.randint(-12, 13, field.shape, generator=gen)
            pixels = (field + noise).clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
            folder = root / part / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
            written += 1
    return written


def fig_imagefolder(b: Budget, work: Path) -> list[dict]:
    """dataset=imagefolder's cache through BatchLoader ÷ torchvision ImageFolder, and the cache build ÷ an epoch."""
    from stackwise_bench.training.precision import resolve_device

    device = resolve_device("auto")
    return [row for size in (32, 224) for row in _imagefolder_rows(b, work, size, device)]


def _imagefolder_rows(b: Budget, work: Path, size: int, device: torch.device) -> list[dict]:
    """One size: the cached pipeline ÷ ImageFolder + DataLoader, and the one-off cache build ÷ an ImageFolder epoch."""
    import shutil

    from stackwise_bench.data import BatchLoader, load_imagefolder
    from stackwise_bench.data.augment import BatchAugment
    from stackwise_bench.data.imagefolder import _cpus

    classes, threads = 10, _cpus()
    # Each reference image costs a JPEG decode and a resize every epoch: 224 px gets a quarter of the images.
    n = b.pipeline_images if size == 32 else b.pipeline_images // 4
    root = work / f"imagefolder-{size}"
    files = _write_jpegs(root, {"train": n, "val": max(classes, n // 10), "test": max(classes, n // 10)}, classes)
    batch = min(128, n // 2)  # drop_last: a tiny budget still gets batches
    data = load_imagefolder(str(root), img_size=size, cache_dir=str(work / f"cache-{size}"))
    ours = BatchLoader(
        data.train_x,  # a view of the memory-mapped cache (train/ is one run of it)
        data.train_y,
        batch,
        device=device,
        mean=data.mean,
        std=data.std,
        augment=BatchAugment(crop_padding=4, flip=True),
        shuffle=True,
        drop_last=True,
    )
    epochs = 8 if size == 32 else 1  # a 32 px epoch of the cache takes a few ms: time several
    ref = reference_loader(_torchvision_imagefolder(root / "train", size, data.mean, data.std), batch, device)

    def cached_pass(rep):
        return batch_loader_img_s(ours, device, range((rep + 1) * epochs, (rep + 2) * epochs))

    def ref_pass(_):
        return torch_loader_img_s(ref, device)

    def build_pass(rep):  # the first run's cost: scan, decode and cache every file, open the splits
        cache = work / f"build-{size}-{rep}"
        t0 = time.perf_counter()
        load_imagefolder(str(root), img_size=size, cache_dir=str(cache))
        seconds = time.perf_counter() - t0
        shutil.rmtree(cache)
        return files / seconds

    cached_pass(-1), ref_pass(-1)  # warm-up: workers, allocator, page cache
    s = interleaved(b.reps, {"cached": cached_pass, "imagefolder": ref_pass, "build": build_pass})
    per_1k = 1000 / statistics.median(s["build"])
    return [
        {
            "figure": "imagefolder",
            "setting": f"img/s, cache+BatchLoader / ImageFolder+DataLoader(2 workers), JPEG->{size} px, b{batch}",
            "unit": "img/s",
            "goal": ">= 5" if size == 32 else "",
            **compare(s, "cached", "imagefolder"),
        },
        {
            "figure": "imagefolder",
            "setting": f"cache build img/s ({per_1k:.2f} s/1k JPEGs, {threads} threads, ->{size} px) / an "
            "ImageFolder epoch",
            "unit": "img/s",
            "goal": "",
            "build_s_per_1k": per_1k,
            "files": files,
            **compare(s, "build", "imagefolder"),
        },
    ]


def _torchvision_imagefolder(folder: Path, size: int, mean, std):
    """torchvision's ImageFolder with the cache's work done per sample, every epoch, then crop, flip, normalise."""
    from torchvision import datasets
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.Resize(size),  # the cache's resize (shorter side, antialiased) and center crop, per sample
            T.CenterCrop(size),
            T.RandomCrop(size, padding=4, padding_mode="reflect"),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    return datasets.ImageFolder(str(folder), transform=tf)


def fig_deit_augment(b: Budget, work: Path) -> list[dict]:
    """augmentation=deit ÷ basic: batched pipeline img/s at 32 px (uint8 -> augment -> normalise), with deit's
    per-batch mixup/CutMix applied after the loader as the trainer applies it."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from stackwise_bench.data import BatchLoader
    from stackwise_bench.data.mixup import step_generator
    from stackwise_bench.training.precision import resolve_device

    device = resolve_device("auto")
    batch, classes = 128, 10
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4 * b.pipeline_images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, classes, (len(x),), generator=gen)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)

    def arm(option: str):
        augment = instantiate(OmegaConf.load(Path(CONF_DIR) / "augmentation" / f"{option}.yaml"))
        loader = BatchLoader(
            x, y, batch, device=device, mean=mean, std=std, augment=augment, shuffle=True, drop_last=True
        )

        def one_pass(rep):
            epoch = rep + 1  # rep -1 is the warm-up pass
            synchronize(device)
            t0 = time.perf_counter()
            seen = 0
            for step, (xb, yb) in enumerate(loader.epoch(epoch)):
                if augment.mixing is not None:  # the trainer mixes every batch the loader yields
                    xb, _, _ = augment.mixing(xb, yb, classes, 0.1, step_generator(0, epoch, step))
                seen += len(yb)
            synchronize(device)
            return seen / (time.perf_counter() - t0)

        return one_pass

    s = interleaved(b.reps, {"deit": arm("deit"), "basic": arm("basic")}, warmup=True)
    return [
        {
            "figure": "deit_augment",
            "setting": f"img/s, augmentation=deit (RandAugment n2 m9 mstd0.5 + erasing + mixup/CutMix) / basic "
            f"(crop+flip), normalise, 32 px, batch {batch}",
            "unit": "img/s",
            "goal": "",
            **compare(s, "deit", "basic"),
        }
    ]
