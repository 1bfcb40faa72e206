"""``python -m numbabn``: the self-check and benchmarks of :mod:`numbabn.bench.cli`."""

import sys

from numbabn.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
