"""Per-layer training diagnostics: how the optimizer moves each layer, measured without slowing the loop.

Optimizer studies (SGD vs AdamW on the CIFAR ResNets, LoRA on ViTs) want per-layer gradient norms,
update-to-weight ratios and activation statistics. Measuring them every step would cost a host
transfer per tensor; here the only per-step work is keeping the global gradient norm's tensor that
clipping returned (no device op, no host sync). Everything else happens on *logging steps*
(``step % every_n_steps == 0``) and leaves the device in ONE transfer per row. Nothing here draws random
numbers or writes to a gradient or weight, so training is bit-identical with or without diagnostics
(tests/test_diagnostics.py).

A *layer* is a named group of parameters at stage/block/head granularity (:func:`layer_name`, in
:mod:`stackwise_bench.training.layer_stats` with the statistics themselves). The
rows are plain dicts of Python floats (None where not finite); the trainer hands them to the run
record, which writes ``diagnostics.jsonl``. Nothing here writes files or talks to loggers.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.training.layer_stats import (  # noqa: F401  (re-exported: the diagnostics' vocabulary)
    ACTIVATION_STATS,
    WRAPPER_PREFIXES,
    activation_stats,
    channel_dim,
    layer_name,
    norms,
    strip_wrappers,
    to_float,
)
from stackwise_bench.values import is_int

WEIGHT_STATS = ("norm", "mean", "std", "max_abs", "near_zero_frac")
_HOOKS_SILENT = (
    "diagnostics: the activation hooks did not fire in this logging step's forward, so activation statistics are "
    "None; a torch.compile'd forward ignores hooks added after compilation unless "
    "torch._dynamo.config.skip_nnmodule_hook_guards = False (it then recompiles once for logging steps), "
    "or set diagnostics.activations=false."
)
NEAR_ZERO = 1e-3  # |w| < NEAR_ZERO * max|w| of the layer counts as near zero (pruning-style, scale-free)


class Diagnostics:
    """Per-layer gradient, weight and activation statistics on logging steps; the global gradient norm every step.

    Args:
        every_n_steps: A logging step every this many optimizer steps (``step % every_n_steps == 0``).
        layer_grads: Per-layer gradient norms on logging steps.
        weights: Per-layer weight norms and update-to-weight ratios ‖Δw‖/‖w‖ (snapshots the trainable weights
            on logging steps).
        activations: Per-layer activation statistics (:func:`activation_stats`) from forward hooks that live
            for the logging step's forward only.

    Per training step (``step`` is the 1-based global step)::

        if diag.due(step): diag.before_forward()
        loss.backward(); norm = clip_grad_norm_(...)  # or None without clipping
        diag.after_backward(step, grad_norm=norm)
        optimizer.step(); row = diag.after_step(step, epoch)  # a dict on logging steps, else None
    """

    def __init__(
        self, every_n_steps: int = 50, layer_grads: bool = True, weights: bool = False, activations: bool = False
    ):
        if not is_int(every_n_steps) or every_n_steps < 1:
            raise ConfigError(
                f"diagnostics.every_n_steps={every_n_steps!r} must be a positive integer; "
                "use e.g. diagnostics.every_n_steps=50."
            )
        for key, value in (("layer_grads", layer_grads), ("weights", weights), ("activations", activations)):
            if not isinstance(value, bool):
                raise ConfigError(f"diagnostics.{key}={value!r} must be true or false; use diagnostics.{key}=true.")
        self.every_n_steps = every_n_steps
        self.layer_grads, self.weights, self.activations = layer_grads, weights, activations
        self.layer_names: list[str] = []
        self._params: list[nn.Parameter] | None = None
        self._hooks: list = []
        self._acc: torch.Tensor | None = None  # a restored interval: [sum, max, finite count, non-finite count]
        self._norms: list = []  # the global norm of each step since the last row (tensors stay on the device)
        self._index_cache: dict[tuple, torch.Tensor] = {}
        self._warned = False
        self._reset_step()

    def _reset_step(self) -> None:
        self._step_norm = self._layer_grads = self._snapshot = self._before_norms = None
        self._has_grad: list[bool] = []
        self._acts: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ setup
    def attach(self, model: nn.Module) -> None:
        """Find the layers of ``model`` (its trainable parameters, in model order) and their modules.

        Call once the model is on its device, and again whenever its trainable parameters change (a
        growing depth-time stack, unfreezing). A ``torch.compile`` wrapper is looked through.
        """
        self.remove_hooks()
        model = getattr(model, "_orig_mod", model)
        modules = dict(model.named_modules())
        index: dict[str, int] = {}  # layer -> position, in order of first appearance
        self._params, self._param_layer, self._modules = [], [], {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            layer = layer_name(name)
            if layer not in index:
                index[layer] = len(index)
                module = modules.get(strip_wrappers(name)[0] + layer)
                if module is not None:  # cls_token, pos_embed: parameters of the root, no module to hook
                    self._modules[layer] = module
            self._params.append(p)
            self._param_layer.append(index[layer])
        self.layer_names = list(index)
        self._device = self._params[0].device if self._params else torch.device("cpu")
        self._index_cache, self._acc, self._norms = {}, None, []
        self._reset_step()

    def due(self, step: int) -> bool:
        """Whether the 1-based global ``step`` is a logging step."""
        return step % self.every_n_steps == 0

    def before_forward(self) -> None:
        """Register the activation hooks for this (logging) step's forward; nothing else. Removed in after_step."""
        if not self.activations:
            return
        self._require_attached()
        self.remove_hooks()
        self._hooks = [m.register_forward_hook(self._hook(layer)) for layer, m in self._modules.items()]

    def _hook(self, layer: str):
        def hook(module, args, output):
            x = _first_tensor(output)
            if x is not None and x.is_floating_point():
                self._acts[layer] = activation_stats(x)  # detached inside: no graph is kept alive

        return hook

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _require_attached(self) -> None:
        if self._params is None:
            raise RuntimeError("Diagnostics.attach(model) must be called before the training loop uses it.")

    # ------------------------------------------------------------------ per step
    def after_backward(self, step: int, grad_norm=None, inv_scale=None) -> None:
        """Record this step's gradients; call every step before ``optimizer.step``.

        On logging steps call it before clipping (and without ``grad_norm``): the per-layer norms are then those
        of the gradients backward produced, and the global norm is measured from them. On other steps, pass
        the norm clipping computed (free), after clipping.

        Args:
            step: The 1-based global step being run.
            grad_norm: The global gradient norm before clipping (``clip_grad_norm_``'s return value), or None
                when not clipping: then it is measured here on logging steps only, and other steps are not
                counted in the interval mean/max.
            inv_scale: 1/loss-scale when the gradients are still scaled (a GradScaler without ``unscale_``);
                multiplies every norm measured from them, ``grad_norm`` included. None when they are true.
        """
        logging = step % self.every_n_steps == 0
        if not logging:  # the hot path: keep clipping's norm tensor for the row; no device work, no sync
            if grad_norm is not None:
                self._norms.append(grad_norm if inv_scale is None else grad_norm * inv_scale)
            return
        self._require_attached()
        with torch.no_grad():
            if logging and (self.layer_grads or grad_norm is None):
                present = [i for i, p in enumerate(self._params) if p.grad is not None]
                self._has_grad = [False] * len(self.layer_names)
                for i in present:
                    self._has_grad[self._param_layer[i]] = True
                squares = self._per_layer_squares([self._params[i].grad for i in present], present)
                if inv_scale is not None:
                    squares = squares * (inv_scale * inv_scale)
                self._layer_grads = squares.sqrt()
                if grad_norm is None:
                    grad_norm = squares.sum().sqrt()
                    inv_scale = None  # already applied
            if grad_norm is not None:
                grad_norm = grad_norm.detach().float() if torch.is_tensor(grad_norm) else torch.tensor(float(grad_norm))
                if inv_scale is not None:
                    grad_norm = grad_norm * inv_scale
                self._accumulate(grad_norm.reshape(()))
                if logging:
                    self._step_norm = grad_norm
            if logging and self.weights:
                self._snapshot = torch._foreach_mul([p.detach() for p in self._params], 1.0)  # an exact copy
                self._before_norms = self._per_layer_squares(self._snapshot).sqrt()

    def _per_layer_squares(self, tensors: list[torch.Tensor], which: list[int] | None = None) -> torch.Tensor:
        """Per-layer sums of squared norms of ``tensors`` (one per trainable parameter listed in ``which``)."""
        which = list(range(len(self._params))) if which is None else which
        key = (self._device, tuple(which))
        if key not in self._index_cache:  # built once per set of present grads: no host->device copy per step
            self._index_cache[key] = torch.tensor(
                [self._param_layer[i] for i in which], dtype=torch.long, device=self._device
            )
        squares = torch.zeros(len(self.layer_names), device=self._device)
        return squares.index_add_(0, self._index_cache[key], norms(tensors, self._device).square())

    def _accumulate(self, norm: torch.Tensor) -> None:
        """Keep one step's global norm for the interval's sum/max/counts (reduced on the device at the row)."""
        self._norms.append(norm)

    def _interval(self) -> torch.Tensor:
        """[sum, max, finite count, non-finite count] of the global norms since the last row, on the device.

        One stack and a few reductions per row, instead of device ops on every step; a restored checkpoint's
        interval (:meth:`restore`) is folded in.
        """
        acc = self._acc
        if self._norms:
            norms = torch.stack(
                [
                    n.detach().reshape(()).float().to(self._device)
                    if torch.is_tensor(n)
                    else torch.tensor(float(n), device=self._device)
                    for n in self._norms
                ]
            )
            finite = torch.isfinite(norms)
            new = torch.stack(
                [
                    torch.where(finite, norms, 0.0).sum(),
                    torch.where(finite, norms, -math.inf).max(),
                    finite.sum().float(),
                    (~finite).sum().float(),
                ]
            )
            acc = (
                new
                if acc is None
                else torch.stack([acc[0] + new[0], acc[1].maximum(new[1]), acc[2] + new[2], acc[3] + new[3]])
            )
        if acc is None:  # no norm this interval; filled on the device (a host tensor would be a copy and a sync)
            acc = torch.zeros(4, device=self._device)
            acc[1] = -math.inf
        return acc

    def state(self) -> list[float] | None:
        """The interval's running [sum, max, finite count, non-finite count], for a checkpoint (one host transfer).

        A resumed run restores it (:meth:`restore`), so the first row after a resume covers the same steps,
        with the same numbers, as in an uninterrupted run.
        """
        if self._acc is None and not self._norms:
            return None
        return self._interval().tolist()

    def restore(self, state: list[float] | None) -> None:
        """Continue the interval a checkpoint's :meth:`state` recorded (call after :meth:`attach`)."""
        self._acc = None if state is None else torch.tensor(state, dtype=torch.float32, device=self._device)
        self._norms = []

    def after_step(self, step: int, epoch: int) -> dict | None:
        """The diagnostics row on logging steps (after ``optimizer.step``), None otherwise; removes the hooks.

        Every number of the row leaves the device in one transfer.
        """
        if not self.due(step):
            return None
        self._require_attached()
        if self._hooks and not self._acts and not self._warned:
            self._warned = True
            warnings.warn(_HOOKS_SILENT, RuntimeWarning, stacklevel=2)
        self.remove_hooks()
        with torch.no_grad():
            pieces = self._row_tensors()
            values = torch.cat([t.to(self._device).float().reshape(-1) for t in pieces.values()]).tolist()
        numbers, start = {}, 0
        for key, t in pieces.items():
            numbers[key], start = values[start : start + t.numel()], start + t.numel()
        row = self._row(step, epoch, numbers)
        self._acc, self._norms = None, []
        self._reset_step()
        return row

    def _row_tensors(self) -> dict[str, torch.Tensor]:
        """The device tensors of this row, by name, to be moved to the host together."""
        nan = torch.full((1,), math.nan, device=self._device)
        pieces = {"step_norm": nan if self._step_norm is None else self._step_norm, "acc": self._interval()}
        if self.layer_grads and self._layer_grads is not None:
            pieces["layer_grads"] = self._layer_grads
        if self.weights:
            params = [p.detach() for p in self._params]
            pieces["weight_norm"] = self._per_layer_squares(params).sqrt()
            if self._snapshot is not None:
                torch._foreach_sub_(self._snapshot, params)  # the snapshot is ours: it becomes -Δw in place
                pieces["update_ratio"] = self._per_layer_squares(self._snapshot).sqrt() / self._before_norms
        if self.activations:
            for layer in self._modules:
                pieces[f"act:{layer}"] = self._acts.get(layer, nan.expand(len(ACTIVATION_STATS)))
        return pieces

    def _row(self, step: int, epoch: int, numbers: dict[str, list[float]]) -> dict:
        total, peak, count, nonfinite = numbers["acc"]
        row = {
            "kind": "step",
            "step": int(step),
            "epoch": int(epoch),
            "grad_norm": to_float(numbers["step_norm"][0]),
            "grad_norm_mean": total / count if count else None,
            "grad_norm_max": to_float(peak) if count else None,
            "grad_norm_steps": int(count),
            "nonfinite_steps": int(nonfinite),
        }
        if self.layer_grads or self.weights:
            layers = {name: {} for name in self.layer_names}
            for i, name in enumerate(self.layer_names):
                if self.layer_grads:
                    has = "layer_grads" in numbers and self._has_grad[i]
                    layers[name]["grad_norm"] = to_float(numbers["layer_grads"][i]) if has else None
                if self.weights:
                    layers[name]["weight_norm"] = to_float(numbers["weight_norm"][i])
                    ratio = numbers["update_ratio"][i] if "update_ratio" in numbers else math.nan
                    layers[name]["update_ratio"] = to_float(ratio)
            row["layers"] = layers
        if self.activations:
            row["activations"] = {
                layer: {k: to_float(v) for k, v in zip(ACTIVATION_STATS, numbers[f"act:{layer}"])}
                for layer in self._modules
            }
        return row

    # ------------------------------------------------------------------ end of training
    def final_weights(self, model: nn.Module) -> dict:
        """Per-layer statistics of ALL parameters (trainable or not), grouped as the step rows are.

        ``{"kind": "weights", "layers": {layer: {"trainable", "norm", "mean", "std", "max_abs", "near_zero_frac"}}}``;
        std is the population std; near_zero_frac is the fraction with |w| < 1e-3 * max|w| of that layer
        (:data:`NEAR_ZERO`; 1.0 for an all-zero layer). One host transfer.
        """
        groups: dict[str, list[nn.Parameter]] = {}
        for name, p in getattr(model, "_orig_mod", model).named_parameters():
            groups.setdefault(layer_name(name), []).append(p)
        if not groups:
            return {"kind": "weights", "layers": {}}
        device = next(iter(groups.values()))[0].device
        stats = []
        with torch.no_grad():
            for params in groups.values():
                flat = torch.cat([p.detach().float().reshape(-1).to(device) for p in params])
                if flat.numel() == 0:  # e.g. a placeholder parameter: nothing to describe
                    stats.append(torch.full((len(WEIGHT_STATS),), math.nan, device=device))
                    continue
                std, mean = torch.std_mean(flat, correction=0)
                max_abs = flat.abs().max()
                near = torch.where(max_abs > 0, (flat.abs() < NEAR_ZERO * max_abs).float().mean(), 1.0)
                stats.append(torch.stack([torch.linalg.vector_norm(flat), mean, std, max_abs, near]))
            values = torch.stack(stats).tolist()
        return {
            "kind": "weights",
            "layers": {
                layer: {"trainable": any(p.requires_grad for p in params)}
                | {k: to_float(v) for k, v in zip(WEIGHT_STATS, row)}
                for (layer, params), row in zip(groups.items(), values)
            },
        }


def _first_tensor(output) -> torch.Tensor | None:
    """A hook's output, or the first tensor of a tuple/list/dict output."""
    if torch.is_tensor(output):
        return output
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((t for t in items if torch.is_tensor(t)), None)
