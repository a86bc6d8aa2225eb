"""``hydra/sweeper=optuna``'s target: the study's Optuna search (:mod:`stackwise_bench.runs.search`)."""

from stackwise_bench.runs import search


class OptunaSearchSweeper(search.SearchSweeper):
    """Hydra's name for :class:`stackwise_bench.runs.search.SearchSweeper` (plugins live in ``hydra_plugins``)."""
