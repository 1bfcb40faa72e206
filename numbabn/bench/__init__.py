"""numbabn's benchmark machinery, apart from the library: ``python -m numbabn bench`` and
``check``, and the contenders the asv and pytest-benchmark suites time.

- :mod:`~numbabn.bench.reference`: the float64 NumPy oracle every check compares with;
- :mod:`~numbabn.bench.cases`: the stages, one benchmark input (``Case``) and the byte model;
- :mod:`~numbabn.bench.contenders`: numbabn, NumPy and PyTorch (CPU and CUDA) per stage, and
  the check of their results against the oracle;
- :mod:`~numbabn.bench.yardsticks`: the streaming copy and triad every ratio is taken against;
- :mod:`~numbabn.bench.timing`: interleaved rounds on noisy machines, a progress bar;
- :mod:`~numbabn.bench.report`: the side-by-side table, the size sweep and its chart, JSON;
- :mod:`~numbabn.bench.floor`: ``bench --floor``, the CPU kernels against the memory floor;
- :mod:`~numbabn.bench.check`: the self-check and the GPU check;
- :mod:`~numbabn.bench.cli`: the command line.

numbabn itself is used through its public API only.  Nothing here is imported by
``import numbabn``.

Importing this package sets ``GOMP_SPINCOUNT=10000`` for the process unless the user set it
or ``OMP_WAIT_POLICY``: GNU OpenMP's idle threads (PyTorch CPU's pool) otherwise spin for
300,000 rounds after each call, long enough to take a core from the contender timed next;
with the shorter spin each library times as it does alone in its process, PyTorch's
back-to-back calls included (docs/performance_notes.rst has the figures).  GNU OpenMP reads
the variable when it loads, so it must be set before PyTorch is imported.
"""

import os

if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"
