"""Model factory: the small CIFAR ResNets in plain torch (:mod:`stackwise_bench.nn.resnet`),
every other name from timm; and what kind of model a net is (:func:`is_convnet`).

timm (~2.5 s to import here) is imported only on the timm branch, so a ResNet run
never pays for it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from urllib.parse import urlsplit

import torch
from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.resnet import RESNET_BLOCKS, CifarResNet
from stackwise_bench.nn.state_dict import short_error, state_dict_mismatch
from stackwise_bench.values import is_int

# Short names used by conf/model/*.yaml -> (timm architecture, extra timm kwargs).
TIMM_ALIASES = {
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "deit_small": ("deit_small_patch16_224", {}),
    # ViT-Tiny widths with 4x4 patches: 64 tokens at 32 px, the usual from-scratch CIFAR ViT.
    "vit_tiny_p4": ("vit_tiny_patch16_224", {"patch_size": 4}),
    # timm's ViT cut down for the CPU smoke studies (why each size: conf/model/vit_micro_p4.yaml, which
    # repeats them as overridable keys; tests/test_models.py keeps the two equal).
    "vit_micro_p4": (
        "vit_tiny_patch16_224",
        {
            "patch_size": 4,
            "embed_dim": 64,
            "depth": 2,
            "num_heads": 2,
            "mlp_ratio": 2.0,
            "global_pool": "avg",
            "class_token": False,
            "weight_init": "jax",
        },
    ),
}
_FETCH_ERROR_MODULES = {"huggingface_hub", "httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3"}


def create_model(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    img_size: int = 32,
    drop_path_rate: float = 0.0,
    **timm_kwargs,
) -> nn.Module:
    """Build a classifier by name.

    Args:
        name: ``resnet8``/``resnet14`` (plain torch), an alias from ``TIMM_ALIASES``, or any timm model name.
        num_classes: Size of the classification head.
        pretrained: Start from timm's published weights (timm models only).
        checkpoint_path: Local weights file (a state_dict, or a checkpoint holding one under ``model``/``state_dict``);
            takes precedence over ``pretrained``. A head with a different class count is re-initialised.
        img_size: Input resolution, passed to timm models that take it (the CIFAR ResNets take any size).
        drop_path_rate: Stochastic depth rate.
        **timm_kwargs: Passed to ``timm.create_model``.

    Raises:
        ConfigError: Unknown name, unavailable weights, or a checkpoint that does not fit the model.
    """
    if not is_int(num_classes) or num_classes < 1:
        raise ConfigError(f"num_classes={num_classes!r} must be a positive integer; check the dataset config.")
    if not is_int(img_size) or img_size < 1:
        raise ConfigError(f"model.img_size={img_size!r} must be a positive integer; use e.g. model.img_size=32.")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ConfigError(
            f"model.drop_path_rate={drop_path_rate!r} must be in [0, 1); use e.g. model.drop_path_rate=0.1."
        )
    path = str(checkpoint_path) if checkpoint_path else None
    if path is not None and not os.path.isfile(path):
        raise ConfigError(
            f"model.checkpoint_path={path} is not a file; point it at a local weights file or set it to null."
        )
    if name in RESNET_BLOCKS:
        return _create_resnet(name, num_classes, pretrained, path, drop_path_rate, timm_kwargs)
    return _create_timm(name, num_classes, pretrained, path, img_size, drop_path_rate, timm_kwargs)


def _create_resnet(name, num_classes, pretrained, path, drop_path_rate, extra) -> CifarResNet:
    if extra:
        key = next(iter(extra))
        raise ConfigError(
            f"model.{key}={extra[key]!r} is not an option of {name}; remove it "
            "(only timm models take extra keyword arguments)."
        )
    if pretrained and path is None:
        raise ConfigError(
            f"model.pretrained=true: {name} has no published pretrained weights; use "
            "model.pretrained=false, or model.checkpoint_path=<local file> to start from your own."
        )
    model = CifarResNet(RESNET_BLOCKS[name], num_classes, drop_path_rate=drop_path_rate)
    if path is not None:
        state = _read_state_dict(path)
        own = model.state_dict()
        if any(k in own and v.shape != own[k].shape for k, v in state.items() if k.startswith("head.")):
            state = {k: v for k, v in state.items() if not k.startswith("head.")}  # new class count: fresh head
            own = {k: v for k, v in own.items() if not k.startswith("head.")}
        problem = state_dict_mismatch(state, own)
        if problem:
            raise ConfigError(
                f"model.checkpoint_path={path} does not fit {name} ({problem}); point it at weights saved from {name}."
            )
        model.load_state_dict(state, strict=False)
    return model


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling, zip and format errors all mean the same to the user
        raise ConfigError(
            f"model.checkpoint_path={path} could not be read as torch weights ({short_error(e)}); "
            "point it at a file written by torch.save(model.state_dict(), path)."
        ) from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):  # trainer checkpoints keep the weights under one of these
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(
            f"model.checkpoint_path={path} holds no state_dict of tensors; "
            "point it at a file written by torch.save(model.state_dict(), path)."
        )
    prefixes = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
    return {next((k[len(p) :] for p in prefixes if k.startswith(p)), k): v for k, v in obj.items()}


def _create_timm(name, num_classes, pretrained, path, img_size, drop_path_rate, extra) -> nn.Module:
    import timm  # lazy on purpose, see the module docstring

    arch, alias_kwargs = TIMM_ALIASES.get(name, (name, {}))
    if not timm.is_model(arch):
        raise ConfigError(
            f"model.name={name} is neither {', '.join([*RESNET_BLOCKS, *TIMM_ALIASES])} nor a timm "
            "model; use one of those or a name from timm.list_models()."
        )
    kwargs = {**alias_kwargs, **extra, "img_size": img_size}
    if drop_path_rate:  # only when asked: not every timm model takes it
        kwargs["drop_path_rate"] = drop_path_rate
    if path is not None:
        return _create_timm_from_file(timm, arch, num_classes, path, kwargs)
    if pretrained:
        return _create_timm_pretrained(timm, arch, num_classes, kwargs)
    return _build_timm(timm, arch, num_classes=num_classes, **kwargs)


def _build_timm(timm, arch: str, **kwargs) -> nn.Module:
    try:
        return timm.create_model(arch, **kwargs)
    except TypeError as e:
        if "img_size" in str(e):  # a model without an img_size argument (most CNNs): it takes any size
            kwargs.pop("img_size")
            return _build_timm(timm, arch, **kwargs)
        extra = [k for k in kwargs if k not in ("num_classes", "pretrained", "pretrained_cfg_overlay", "img_size")]
        raise ConfigError(
            f"model: timm could not build {arch} with {extra} ({short_error(e)}); "
            "remove the model.* keys it does not take."
        ) from e


def _create_timm_from_file(timm, arch: str, num_classes: int, path: str, kwargs: dict) -> nn.Module:
    # Loaded through timm (checkpoint_filter_fn resamples position embeddings etc.), but as a
    # state_dict overlay built with the checkpoint's own class count rather than file=path: with
    # file=path and a different class count timm drops the head and loads with strict=False,
    # which silently accepts a file that belongs to another model.
    try:
        state = timm.models.load_state_dict(path)  # weights_only=True, unwraps model/state_dict/EMA entries
    except Exception as e:
        raise ConfigError(
            f"model.checkpoint_path={path} could not be read as torch weights ({short_error(e)}); "
            "point it at a file written by torch.save(model.state_dict(), path)."
        ) from e
    classifier = timm.models.get_pretrained_cfg_value(arch, "classifier") or "head"
    classifier = classifier if isinstance(classifier, str) else classifier[0]
    head = state.get(f"{classifier}.weight")
    file_classes = head.shape[0] if isinstance(head, torch.Tensor) and head.ndim == 2 else num_classes
    overlay = {"state_dict": state, "num_classes": file_classes}
    try:
        model = _build_timm(
            timm, arch, num_classes=file_classes, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
        )
    except ConfigError:
        raise
    except (RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(
            f"model.checkpoint_path={path} does not fit {arch} ({short_error(e, 300)}); "
            f"point it at weights saved from {arch}."
        ) from e
    if file_classes != num_classes:
        model.reset_classifier(num_classes)  # fine-tuning on a new label set: fresh head
    return model


def _create_timm_pretrained(timm, arch: str, num_classes: int, kwargs: dict) -> nn.Module:
    # Cached weights first, without touching the network; only then probe the hub briefly.
    # Offline, huggingface_hub's own retries (1+2+4+8+8 s per file) took 47 s to give up here.
    build = dict(num_classes=num_classes, pretrained=True, **kwargs)
    with _hub_cache_only():
        try:
            return _build_timm(timm, arch, **build)
        except Exception as e:
            if not _is_fetch_error(e):
                raise
    reason = _hub_unreachable()
    if reason is None:
        try:
            return _build_timm(timm, arch, **build)
        except Exception as e:
            if not _is_fetch_error(e):
                raise
            reason = short_error(e)
    raise ConfigError(
        f"model.pretrained=true: could not fetch timm weights for {arch} ({reason}); "
        "use model.pretrained=false or model.checkpoint_path=<local file>."
    )


def _is_fetch_error(e: BaseException) -> bool:
    # OSError covers missing files, sockets and huggingface_hub's LocalEntryNotFoundError;
    # RuntimeError is timm's "no pretrained weights exist"; the rest are HTTP client errors.
    return isinstance(e, (OSError, RuntimeError)) or type(e).__module__.split(".")[0] in _FETCH_ERROR_MODULES


@contextlib.contextmanager
def _hub_cache_only():
    """Make huggingface_hub use its local cache only (it reads this flag per request)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when a TCP connection succeeds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "not in the local cache and HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct connection proves nothing; let the download try
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    outcome: list[str | None] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"not in the local cache and {host} is unreachable: {e}")

    # A thread, because DNS resolution ignores the socket timeout.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"not in the local cache and {host} did not answer within {timeout:g} s"


def is_convnet(model: nn.Module) -> bool:
    """More than one 2-D convolution: channels_last pays off. A ViT's single patch-embedding conv does not count."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1
