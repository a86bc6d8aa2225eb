"""State dicts: how one differs from a model's, and loading a trainer checkpoint's weights into a model.

Checkpoints load with ``weights_only=True``: nothing in a file is executed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from stackwise_bench.errors import ConfigError, short_error


def state_dict_mismatch(state: dict, own: dict) -> str:
    """Short description of how a state dict differs from a model's, or '' when it fits."""
    parts = []
    for label, keys in (("missing", own.keys() - state.keys()), ("unexpected", state.keys() - own.keys())):
        if keys:
            parts.append(f"{len(keys)} {label} keys, e.g. {', '.join(sorted(keys)[:3])}")
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(state.keys() & own.keys())
        if state[k].shape != own[k].shape
    ]
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches, e.g. {', '.join(shapes[:2])}")
    return "; ".join(parts)


def read_checkpoint(ckpt: Path, device) -> tuple[dict, int | None]:
    """``(model state_dict, epoch)`` from a trainer checkpoint (or a bare state_dict) file.

    Raises:
        ConfigError: the file is not a torch checkpoint, or holds no state_dict of tensors.
    """
    try:
        obj = torch.load(ckpt, map_location=device, weights_only=True)
    except Exception as exc:  # zip, unpickling and format errors all mean the same to the user
        raise ConfigError(
            f"checkpoint={ckpt} could not be read as a torch checkpoint ({short_error(exc)}); "
            "the file is corrupt or truncated: point checkpoint= at another file "
            "(e.g. checkpoints/last.pt) or rerun the training that wrote it."
        ) from exc
    state = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(
            f"checkpoint={ckpt} holds no model state_dict; point it at a checkpoint written by the trainer "
            "(checkpoints/best.pt or last.pt)."
        )
    progress = obj.get("progress") if isinstance(obj, dict) else None
    return state, (progress or {}).get("epoch")


def load_weights(model: nn.Module, state: dict, ckpt: Path, described: str) -> None:
    """``model.load_state_dict(state)``, refused in one sentence when the checkpoint is from another model.

    ``described`` names the model in the message (e.g. ``resnet8 with LoRA rank 8``).
    """
    problem = state_dict_mismatch(state, model.state_dict())
    if problem:
        raise ConfigError(
            f"checkpoint={ckpt} does not fit the run's model {described} ({problem}); it was "
            "saved from a different model: point checkpoint= at a checkpoint written by this run."
        )
    model.load_state_dict(state)
