"""The benchmark's old command, kept: ``python scripts/benchmark.py [--quick] [--only NAME,...] [--out PATH]``.

It runs ``python -m stackwise_bench.bench`` (the package's docstring lists the figures); flags are the same.
"""

from stackwise_bench.bench.cli import main

if __name__ == "__main__":
    main()
