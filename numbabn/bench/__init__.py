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
"""
