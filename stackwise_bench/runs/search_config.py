"""A search's settings and search space: ``hydra.sweeper`` checked at launch, Hydra's Optuna sweeper grammar.

``interval(a, b)`` and ``tag(log, interval(a, b))`` are continuous (integers if both ends are), ``range(a, b, s)``
of integers a stepped integer, ``a,b,c`` (``choice``) and any other range categorical; every other override is
fixed and given to each trial as it is. Used by the sweeper (:mod:`stackwise_bench.runs.search`) and by the
study's launch checks and plan (:mod:`stackwise_bench.runs.study`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig

from stackwise_bench.errors import ConfigError
from stackwise_bench.values import is_int, is_number

PLUGIN_TARGET = "hydra_plugins.stackwise_bench_search.sweeper.OptunaSearchSweeper"
OBJECTIVE = "train.best_val_top1"


@dataclasses.dataclass
class SearchSweeperConf:
    """The keys of ``hydra.sweeper`` for :class:`SearchSweeper` (tests bind conf/hydra/sweeper/optuna.yaml to it)."""

    _target_: str = PLUGIN_TARGET
    sampler: Any = None
    direction: str = "maximize"
    objective: str = OBJECTIVE
    storage: Any = None
    study_name: Any = None
    n_trials: int = 20
    n_jobs: Any = None
    max_failure_rate: float = 1.0
    params: Any = None


def check_search(sweeper: DictConfig | dict) -> None:
    """One sentence for the first bad key of a search's ``hydra.sweeper`` (run at launch, before anything)."""
    s = dict(sweeper)
    if s.get("direction") not in ("maximize", "minimize"):
        raise ConfigError(f"hydra.sweeper.direction={s.get('direction')} must be maximize or minimize.")
    objective = s.get("objective")
    if not isinstance(objective, str) or not objective.strip():
        raise ConfigError(f"hydra.sweeper.objective={objective} must name a summary.json key, e.g. {OBJECTIVE}.")
    if objective.startswith("test."):
        raise ConfigError(
            f"hydra.sweeper.objective={objective} would select on the test set; search on a validation metric, "
            f"e.g. hydra.sweeper.objective={OBJECTIVE}, and report the best trial's test accuracy."
        )
    n = s.get("n_trials")
    if not is_int(n) or n < 1:
        raise ConfigError(f"hydra.sweeper.n_trials={n} must be a positive integer (the study's total), e.g. 20.")
    jobs = s.get("n_jobs")
    if jobs is not None and (not is_int(jobs) or jobs < 1):
        raise ConfigError(f"hydra.sweeper.n_jobs={jobs} must be a positive integer or null (the launcher's n_jobs).")
    rate = s.get("max_failure_rate")
    if not is_number(rate) or not 0 <= rate <= 1:
        raise ConfigError(f"hydra.sweeper.max_failure_rate={rate} must be a number in [0, 1], e.g. 1.0.")


def params_lines(params) -> list[str]:
    """``hydra.sweeper.params`` as override strings (the preset's, before the command line's)."""
    return [f"{k}={v}" for k, v in (params or {}).items()]


def search_space(arguments: list[str]) -> tuple[dict, dict[str, str]]:
    """``({key: Optuna distribution}, {key: fixed override})``; a key given twice: the last one counts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    space, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed[key] = override.input_line or key
    if not space:
        raise ConfigError(
            "the search has nothing to search: give hydra.sweeper.params (a conf/hparams_search/ preset) or "
            "an override such as optimizer.lr='tag(log,interval(1e-4,1e-1))'."
        )
    return space, fixed


def distribution(override):
    """The Optuna distribution of one sweep override (Hydra's Optuna sweeper's grammar)."""
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    key, value = override.get_key_element(), override.value()
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    if override.is_range_sweep() and not value.shuffle and all(isinstance(v, int) for v in (value.start, value.step)):
        values = list(override.sweep_iterator())
        return IntDistribution(int(values[0]), int(values[-1]), step=int(value.step))
    if override.is_choice_sweep() or override.is_range_sweep():
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    raise ConfigError(
        f"{key}={override.input_line} cannot be searched; use interval(), tag(log, interval()) or a list."
    )


def probe_overrides(space: dict, fixed: dict[str, str]) -> list[str]:
    """A job of the search (each searched key at its lowest value or first choice), composed at launch as a check."""
    first = {k: d.choices[0] if hasattr(d, "choices") else d.low for k, d in space.items()}
    return [*fixed.values(), *(f"{k}={override_value(v)}" for k, v in first.items())]


def override_value(value) -> str:
    """A sampled value as an override: floats in full (repr), so the job trains the exact value Optuna asked.

    Folder names and logs show it to its significant digits (:func:`stackwise_bench.runs.naming.search_candidates`).
    """
    return repr(value) if isinstance(value, float) else str(value)


def is_search(config: DictConfig) -> bool:
    return str(config.hydra.sweeper.get("_target_", "")).endswith(".OptunaSearchSweeper")
