"""Thin entry point: the scenarios live in the package (`multihead.benchmarks`), so an installed wheel
runs them too. `python benchmarks/bench.py ARGS` is `python -m multihead bench ARGS`."""

import sys

from multihead.benchmarks.bench import main

if __name__ == "__main__":
    sys.exit(main())
