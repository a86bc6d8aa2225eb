"""``python -m stackwise_bench.bench``: the performance figures (see ``stackwise_bench.bench``)."""

from stackwise_bench.bench.cli import main

if __name__ == "__main__":
    main()
