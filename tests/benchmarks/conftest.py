"""pytest-benchmark suite: numbabn beside NumPy and PyTorch on the same arrays.

A plain ``pytest`` runs each benchmark once, as a test, and checks its result against the
float64 oracle; the beyond-cache arrays are left out there (deselected) so the suite stays
quick.  Timing is on when asked for: ``--benchmark-only``, ``--benchmark-enable`` or an option
that saves or compares timings (``--benchmark-json``, ``--benchmark-save``,
``--benchmark-autosave``, ``--benchmark-compare``, ``--benchmark-histogram``)::

    pytest tests/benchmarks --benchmark-only                  # the tables, side by side
    pytest tests/benchmarks --benchmark-only --benchmark-autosave
    pytest tests/benchmarks --benchmark-only --benchmark-compare   # against the last save
    pytest tests/benchmarks --benchmark-only -k "train and NCHW"
"""

import pytest
from conftest import timing

from numbabn.bench import cases, contenders

#: (layout, feature axis, {size: shape}), float32: small is 16 KB (in L1/L2), cache about
#: 2 MB (in the last-level cache), beyond 64 MB (streams from memory on most machines).
LAYOUTS = [
    ("NCHW", 1, {"small": (4, 16, 8, 8), "cache": (32, 64, 16, 16), "beyond": (256, 64, 32, 32)}),
    ("NHWC", -1, {"small": (4, 8, 8, 16), "cache": (32, 16, 16, 64), "beyond": (256, 32, 32, 64)}),
    ("NC", 1, {"small": (256, 16), "cache": (2048, 256), "beyond": (65536, 256)}),
]

CASES = [(layout, axis, size, shape) for layout, axis, shapes in LAYOUTS for size, shape in shapes.items()]

#: The contenders, as named in :data:`numbabn.bench.contenders.BACKENDS`.
CONTENDERS = ["numbabn", "numpy", "torch"]


def pytest_ignore_collect(collection_path, config):
    """Without pytest-benchmark (the test extra installs it; ``-p no:benchmark`` turns it off)
    the suite is left out, not failed."""
    if collection_path.name.startswith("test_") and not config.pluginmanager.hasplugin("benchmark"):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    """Deselect the beyond-cache cases of this suite unless the run times it."""
    if timing(config):
        return
    here = str(__file__).rsplit("/", 1)[0]
    drop = [item for item in items if str(item.path).startswith(here) and "-beyond" in item.nodeid]
    if drop:
        config.hook.pytest_deselected(items=drop)
        dropped = set(drop)
        items[:] = [item for item in items if item not in dropped]


@pytest.fixture(scope="module", params=CASES, ids=[f"{lay}-{size}" for lay, _, size, _ in CASES])
def case(request):
    """One :class:`numbabn.bench.cases.Case` (module scope: tests are grouped by case, so
    one case's arrays are alive at a time)."""
    layout, axis, size, shape = request.param
    c = cases.Case(shape, axis, "float32", layout)
    c.size_label = size
    return c


@pytest.fixture(scope="module")
def expected(case):
    """The float64 oracle's results of every stage on ``case``, computed once."""
    return contenders.expected(case)


@pytest.fixture(scope="module", params=CONTENDERS)
def contender(request, case):
    """``(Backend, {stage: callable})`` of one contender on ``case``; skipped where it cannot
    run (PyTorch not installed)."""
    backend = contenders.BACKENDS[request.param]
    why = backend.unavailable()
    if why is not None:
        pytest.skip(f"{backend.name}: {why}")
    return backend, backend.prepare(case)
