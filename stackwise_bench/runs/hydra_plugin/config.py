"""The schema of ``hydra.sweeper`` for OptunaSearchSweeper (tests bind conf/hydra/sweeper/optuna.yaml to it)."""

from stackwise_bench.runs.search_config import SearchSweeperConf

__all__ = ["SearchSweeperConf"]
