"""Tracker backends (``logger=...``): TensorBoard, MLflow, trackio, wandb, as sinks of the run record's dicts.

Each backend implements :class:`stackwise_bench.runs.tracking.Tracker` and is built by ``hydra.utils.instantiate``
from ``conf/logger/<name>.yaml``. None of them imports its package before :meth:`open`: importing this package costs
nothing, and a run without trackers never loads mlflow or wandb. A missing package is one sentence
(:class:`MissingTracker`); the training entry calls :func:`check_available` so it comes before training starts.

What they share (this module):

* :func:`require`: the import that turns ``ImportError`` into that sentence.
* :class:`HeldSteps`: what a continued tracker run already holds, so a resume skips the (key, step) pairs it
  would otherwise log twice (the run recomputes them deterministically after its checkpoint).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType

from stackwise_bench.errors import ConfigError

# The package each logger option needs (the option name is the key of ``cfg.logger``).
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "trackio": "trackio", "wandb": "wandb"}
INSTALL = 'pip install "stackwise_bench[track]"'
# How each backend maps the run's final status (summary.json "status") onto its own "this run ended well".
FINISHED_WELL = ("completed", "early_stopped")


class MissingTracker(ConfigError):
    """A configured logger whose package is not installed."""


def missing(logger_name: str, package: str) -> str:
    """The one sentence for a logger whose package is missing."""
    return f"logger={logger_name} needs the {package} package; install the tracking extra: {INSTALL}."


def require(module: str, logger_name: str) -> ModuleType:
    """Import ``module`` for ``logger_name``, or raise :class:`MissingTracker` (one sentence, naming the fix)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingTracker(missing(logger_name, module.split(".")[0])) from exc


def check_available(names: Iterable[str]) -> None:
    """Raise :class:`MissingTracker` for the first of ``names`` (``cfg.logger`` keys) whose package is missing.

    Looks the packages up without importing them (``find_spec``), so the check is instant. Names this module does
    not know (a tracker of the user's own) are left to their own import.
    """
    for name in names:
        package = PACKAGES.get(name)
        if package is not None and not _installed(package):
            raise MissingTracker(missing(name, package))


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken install, or a module already imported without a spec
        return sys.modules.get(package) is not None


class HeldSteps:
    """The (key, step) pairs a continued tracker run already holds after the point the run continues from.

    A resumed run recomputes the steps after its checkpoint's global step ``floor`` and logs them again; the attempt
    before it may have logged some of them already. ``fresh`` drops those pairs, so the tracker ends up with one value
    per (key, step). Steps before ``floor`` are never logged again (the run continues after it), so only ``floor`` and
    later steps are looked up (``floor`` itself: the end-of-run rows of an attempt stopped in its test phase); a run
    restarted from scratch has ``floor=-1`` (every step may be held).

    Args:
        floor: The global step the run continues from (-1: from scratch).
        held: Either a mapping ``key -> steps`` read once, or a function ``key -> steps`` called the first time a key
            is logged (MLflow reads one key's history at a time).
    """

    def __init__(self, floor: int, held: Mapping[str, Iterable[int]] | Callable[[str], Iterable[int]]):
        self.floor = floor
        self._load = held if callable(held) else None
        self._held: dict[str, set[int]] = {} if callable(held) else {k: self._above(v) for k, v in held.items()}

    def _above(self, steps: Iterable[int]) -> set[int]:
        return {int(s) for s in steps if int(s) >= self.floor}

    def _steps(self, key: str) -> set[int]:
        if key not in self._held:
            self._held[key] = self._above(self._load(key)) if self._load else set()
        return self._held[key]

    def fresh(self, metrics: Mapping[str, float], step: int) -> dict[str, float]:
        """The part of ``metrics`` at ``step`` the tracker run does not hold yet."""
        if step < self.floor:
            return dict(metrics)
        return {k: v for k, v in metrics.items() if step not in self._steps(k)}
