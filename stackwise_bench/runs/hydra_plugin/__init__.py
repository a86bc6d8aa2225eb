"""Shipped in the wheel as ``hydra_plugins/stackwise_bench_search/`` (pyproject.toml: hatch ``force-include``).

Hydra instantiates sweepers only from the ``hydra_plugins`` package, which it scans at start: this package holds
nothing but a subclass of :class:`stackwise_bench.runs.search.SearchSweeper` and its config schema, so that scan
stays cheap and the code lives (and is edited) in ``stackwise_bench/runs/search.py``. An editable install copies
these files: reinstall (``pip install -e .``) after changing them.
"""
