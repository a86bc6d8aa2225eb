"""What identifies a run and where it came from: the config fingerprint, the git commit, the environment.

``train`` stamps these into ``summary.json`` (``run.fingerprint``, ``run.git_sha``,
``env.*``); the run record compares them to refuse a run folder holding a different config.
Standard library only at import (omegaconf and torch are imported by the functions that take their objects).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

from stackwise_bench.runs.contract import NEUTRAL, PLACEMENT_KEYS, is_volatile


def fingerprint(cfg: Any) -> str:
    """A short hash of the resolved config (a DictConfig or a plain dict): what is trained.

    Volatile keys (:data:`~stackwise_bench.runs.contract.VOLATILE_KEYS`) are left out, and so are
    ``_target_`` paths: they say where the code lives, not what it computes (``run.git_sha`` records the code).
    """
    return hashlib.sha256(json.dumps(_essential(_as_dict(cfg)), sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_diff(old: dict, new: dict, prefix: str = "") -> str:
    """The first five keys whose values differ between two resolved configs; '' when they train the same run.

    Volatile keys and ``_target_`` paths are left out, as in :func:`fingerprint`.
    """
    keys = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}{key}"
        a, b = old.get(key, NEUTRAL.get(dotted)), new.get(key, NEUTRAL.get(dotted))
        if key == "_target_" or is_volatile(dotted) or dotted in PLACEMENT_KEYS:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = config_diff(a, b, dotted + ".")
            if sub:
                keys.append(sub)
        elif a != b:
            keys.append(f"{dotted}: {a!r} -> {b!r}")
    return "; ".join(keys[:5])


def _as_dict(cfg: Any) -> dict:
    if isinstance(cfg, dict):
        return cfg
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


_ABSENT = object()


def _essential(node: Any, prefix: str = "") -> Any:
    """``node`` without volatile keys, ``_target_`` entries and :data:`NEUTRAL` keys at their neutral value."""
    if not isinstance(node, dict):
        return node
    return {
        k: _essential(v, f"{prefix}{k}.")
        for k, v in node.items()
        if k != "_target_"
        and not is_volatile(f"{prefix}{k}")
        and f"{prefix}{k}" not in PLACEMENT_KEYS
        and NEUTRAL.get(f"{prefix}{k}", _ABSENT) != v
    }


def env_info(device) -> dict:
    """Versions, device and host of this process, for ``summary.json``'s ``env``."""
    import torch

    return {
        "torch": torch.__version__,
        "device": str(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "hostname": socket.gethostname(),
    }


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_sha() -> str | None:
    """The commit the package is checked out at; None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
