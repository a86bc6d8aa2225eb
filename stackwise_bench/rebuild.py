"""A trained run rebuilt from its folder, for evaluation: checkpoint, config, data, model.

:func:`rebuild` builds the data, the model (+ LoRA) and the test loader exactly as
``train.py`` does, from the run's own config (:func:`run_config`), and loads the
checkpoint found by :func:`resolve_checkpoint` (``weights_only=True``) into it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

from stackwise_bench.errors import ConfigError


def resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, Path]:
    """``(run_dir, checkpoint file)`` from a run folder or a ``.pt`` path inside one."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        ckpt = path / "checkpoints" / "best.pt"
        if not ckpt.is_file():
            raise ConfigError(f"checkpoint={checkpoint} is a folder without checkpoints/best.pt; point checkpoint= at a "
                              "run folder whose training finished at least one epoch, or at a .pt file inside one.")
        return path, ckpt
    if not path.is_file():
        raise ConfigError(f"checkpoint={checkpoint} does not exist; point it at a run folder or a .pt file inside one.")
    for parent in path.resolve().parents:
        if (parent / "summary.json").is_file() or (parent / ".hydra" / "config.yaml").is_file():
            return parent, path
    raise ConfigError(f"checkpoint={checkpoint} is not inside a run folder (no summary.json or .hydra/config.yaml "
                      "above it), so its model and data are unknown; point it at a checkpoint under a run's checkpoints/.")


def run_config(run_dir: Path, source: dict, device: str | None, dataset: dict) -> dict:
    """The run's resolved config (summary.json, else .hydra/config.yaml) with the allowed overrides applied."""
    from omegaconf import OmegaConf

    config = source.get("config")
    if not config and (run_dir / ".hydra" / "config.yaml").is_file():
        config = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=True)
    if not isinstance(config, dict) or not {"model", "dataset", "trainer", "precision", "lora"} <= set(config):
        raise ConfigError(f"checkpoint: {run_dir} has no usable run config (summary.json 'config' or .hydra/config.yaml); "
                          "evaluate a folder written by python -m stackwise_bench.train.")
    config = json.loads(json.dumps(config))  # a private copy
    if device is not None:
        config["trainer"]["device"] = device
    for key, value in dataset.items():
        if value is None:
            continue
        if key not in config["dataset"]:
            raise ConfigError(f"dataset.{key}={value}: the run's dataset ({config['dataset'].get('_target_')}) has no "
                              f"{key} option; drop dataset.{key}.")
        config["dataset"][key] = value
    # The checkpoint replaces every weight: never fetch pretrained weights or read the start file again.
    config["model"].update(pretrained=False, checkpoint_path=None)
    return config


class Built(NamedTuple):
    """What one evaluation needs: the model with the checkpoint loaded, the test loader, the autocast."""

    model: object
    loader: object
    amp: object
    device: object
    compile: bool
    classes: list
    epoch: int | None


def rebuild(config: dict, ckpt: Path, datasets: dict | None = None) -> Built:
    """Data, model (+ LoRA) and the test loader exactly as ``train.py`` builds them; the checkpoint loaded.

    ``datasets``: a dict kept by the caller across calls (``evaluate_study``), so runs with the same
    dataset config read it once.
    """
    import torch
    from omegaconf import OmegaConf

    from stackwise_bench.data import BatchLoader
    from stackwise_bench.train import build_model, instantiate, loader_options

    cfg = OmegaConf.create(config)
    trainer = instantiate(cfg.trainer, precision=cfg.precision.name, seed=cfg.seed, resume=False)
    trainer.seed_everything()
    state, epoch = _load_state(ckpt, trainer.device)
    key = json.dumps(config["dataset"], sort_keys=True, default=str)
    data = datasets.get(key) if datasets is not None else None
    if data is None:
        data = instantiate(cfg.dataset)
        if datasets is not None:
            datasets[key] = data
    model, _, _ = build_model(cfg, data.num_classes)  # FP8 layers keep nn.Linear's state_dict keys
    model = model.to(trainer.device)
    if trainer.wants_channels_last(model):  # as Trainer.fit does before training
        model = model.to(memory_format=torch.channels_last)
    _load_weights(model, state, ckpt, cfg)
    loader = BatchLoader(data.test_x, data.test_y, trainer.eval_batch_size,
                         **loader_options(data, trainer, cfg.model.img_size, model))
    return Built(model=model, loader=loader, amp=trainer.amp, device=trainer.device, compile=trainer.compile,
                  classes=list(data.classes), epoch=epoch)


def _load_state(ckpt: Path, device) -> tuple[dict, int | None]:
    import torch

    from stackwise_bench.models import short_error

    try:
        obj = torch.load(ckpt, map_location=device, weights_only=True)
    except Exception as exc:  # zip, unpickling and format errors all mean the same to the user
        raise ConfigError(f"checkpoint={ckpt} could not be read as a torch checkpoint ({short_error(exc)}); "
                          "the file is corrupt or truncated: point checkpoint= at another file "
                          "(e.g. checkpoints/last.pt) or rerun the training that wrote it.") from exc
    state = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"checkpoint={ckpt} holds no model state_dict; point it at a checkpoint written by the trainer "
                          "(checkpoints/best.pt or last.pt).")
    progress = obj.get("progress") if isinstance(obj, dict) else None
    return state, (progress or {}).get("epoch")


def _load_weights(model, state: dict, ckpt: Path, cfg) -> None:
    from stackwise_bench.models import state_dict_mismatch

    problem = state_dict_mismatch(state, model.state_dict())
    if problem:
        lora = f" with LoRA rank {cfg.lora.rank}" if cfg.lora.rank else ""
        raise ConfigError(f"checkpoint={ckpt} does not fit the run's model {cfg.model.name}{lora} ({problem}); it was "
                          "saved from a different model: point checkpoint= at a checkpoint written by this run.")
    model.load_state_dict(state)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
