"""Each stage of numbabn beside NumPy and PyTorch CPU on the same arrays: one pytest-benchmark
group per (stage, layout, size), so ``pytest tests/benchmarks --benchmark-only`` prints the
contenders side by side.  Every result is checked against the float64 oracle."""

import pytest

from numbabn.bench import contenders
from numbabn.bench.timing import torch_threads

#: Stage (as in :mod:`numbabn.bench.cases`) -> what it times.
STAGES = {
    "stats": "statistics (numbabn.welford)",
    "train": "training forward, running statistics updated",
    "eval": "eval forward",
    "backward": "training backward",
    "layer": "BatchNorm forward + backward",
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage(benchmark, stage, case, contender, expected):
    backend, stages = contender
    benchmark.group = f"{stage} {case.layout} {case.size_label} {case.shape}"
    benchmark.extra_info.update(stage=stage, layout=case.layout, shape=list(case.shape), MB=case.nbytes / 1e6)
    fn = stages[stage]
    with torch_threads():  # PyTorch gets as many threads as numba
        got = benchmark(fn)
    backend.synchronize()

    contenders.check_result(backend, stage, got, case, expected)
