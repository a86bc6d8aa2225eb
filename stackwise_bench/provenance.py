"""What identifies a run and where it came from: the config fingerprint, the git commit, the environment.

``train.py`` stamps these into ``summary.json`` (``run.fingerprint``, ``run.git_sha``,
``env.*``) and compares fingerprints to refuse a run folder holding a different config.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Keys that may differ between a run and its resumption without changing what is trained.
VOLATILE_KEYS = ("trainer.resume", "trainer.progress", "trainer.log_every_n_steps", "monitors", "study", "plan")


def fingerprint(cfg: DictConfig) -> str:
    """A short hash of the resolved config, ignoring keys that don't change the result."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for dotted in VOLATILE_KEYS:
        *parents, leaf = dotted.split(".")
        node = container
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_diff(old: dict, new: dict, prefix: str = "") -> str:
    """The first five keys whose values differ between two resolved configs, volatile keys left out."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = config_diff(a, b, f"{prefix}{key}.")
            if sub:
                keys.append(sub)
        elif a != b and f"{prefix}{key}" not in VOLATILE_KEYS:
            keys.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return "; ".join(keys[:5])


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


def git_sha() -> str | None:
    """The commit the package is checked out at; None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
