"""Shared layouts, dtypes, tolerances and data helpers for the numbabn tests.

Layouts cover both kernel families (channel-strided rows of ``inner >= MIN_INNER`` and
channel-minor rows), the boundaries between them, rows longer than one Welford ``BLOCK``,
channel-minor rows of more than one ``TILE``, and arrays of at least ``PARALLEL_MIN``
elements so the parallel drivers run.  Shapes are built from ``numbabn._config`` so they keep
straddling the boundaries if the tunables change; the constants are only read, never patched
(they are compiled into the kernels).
"""

import getpass
import math
import os
import tempfile
import zlib

# The determinism tests compare 1 and 2 threads in-process; numba fixes its pool size at
# import, so make sure it has at least two even on a one-core machine.
if "NUMBA_NUM_THREADS" not in os.environ and (os.cpu_count() or 1) < 2:
    os.environ["NUMBA_NUM_THREADS"] = "2"

# Under pytest-xdist each worker process keeps its own numba cache: numba names a new cache
# entry's data file from the index it read, so two processes saving different signatures of
# one kernel at once can leave an index entry pointing at the other's code.
if os.environ.get("PYTEST_XDIST_WORKER") and "NUMBA_CACHE_DIR" not in os.environ:
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"numbabn-tests-{getpass.getuser()}", os.environ["PYTEST_XDIST_WORKER"]
    )

# The CUDA tests run numbabn's GPU kernels in numba's CUDA simulator unless told otherwise
# (NUMBA_ENABLE_CUDASIM=0 on a machine with a GPU runs the same tests on the device).  numba
# reads the switch when it is first imported, so it is set before anything imports numba.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from numbabn import _config  # noqa: E402
from numbabn.cpu.api import parallel_for  # noqa: E402

# Hypothesis profiles: "dev" (random examples, a fresh set each run), "ci" (derandomized: the
# same examples every run, chosen from the test's source, so a CI failure reproduces), loaded
# when the CI variable is set; HYPOTHESIS_PROFILE names one explicitly.  The property tests on
# arrays past PARALLEL_MIN take PARALLEL_PROPERTIES: the loaded profile with fewer examples.
settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", settings.get_profile("dev"), derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
PARALLEL_PROPERTIES = settings(settings.default, max_examples=6)

#: pytest-benchmark options that mean "time it"; any one of them switches timing on.
TIMING_OPTIONS = (
    "benchmark_only",
    "benchmark_enable",
    "benchmark_json",
    "benchmark_save",
    "benchmark_autosave",
    "benchmark_compare",
    "benchmark_histogram",
)

#: Most pytest-xdist workers ``-n auto`` starts (pyproject's addopts): each compiles the
#: kernels its tests need, so more than a few cost more compiling than they save.
MAX_WORKERS = 4


def timing(config):
    """Whether this run times the benchmarks (else each runs once, as a test)."""
    return any(config.getoption(name, None) for name in TIMING_OPTIONS)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """A run that does not time the benchmarks runs each once, as a test: pytest-benchmark's
    ``--benchmark-disable``, set before its session starts (which would otherwise warn, in
    every xdist worker, that it turned timing off)."""
    if not timing(config) and hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core up to :data:`MAX_WORKERS`, and none when the run times
    benchmarks, which need the machine to themselves; ``PYTEST_XDIST_AUTO_NUM_WORKERS`` is
    left to pytest-xdist."""
    if timing(config):
        return 0
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, MAX_WORKERS)


MIN_INNER = _config.MIN_INNER
BLOCK = _config.BLOCK
TILE = _config.TILE
PARALLEL_MIN = _config.PARALLEL_MIN
FUSE_CHANNELS = _config.FUSE_CHANNELS
FUSE_BYTES = _config.FUSE_BYTES
MINOR_ROWS = _config.MINOR_ROWS
WIDEN_TO = _config.WIDEN_TO


def _rows_for(per_row, minimum=PARALLEL_MIN):
    """Smallest batch size putting an array of ``per_row`` elements per batch row at or just
    above ``minimum`` elements."""
    return -(-minimum // per_row) + 1


class Layout:
    """An input shape and its feature axis."""

    def __init__(self, shape, axis, tag):
        self.shape = tuple(int(s) for s in shape)
        self.axis = axis
        self.tag = tag

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def ax(self):
        return self.axis % self.ndim

    @property
    def channels(self):
        return self.shape[self.ax]

    @property
    def n(self):
        """Values per channel."""
        return math.prod(self.shape) // self.channels

    @property
    def inner(self):
        return math.prod(self.shape[self.ax + 1 :])

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def id(self):
        return f"{self.tag}-{'x'.join(map(str, self.shape))}@{self.axis}"

    def __repr__(self):
        return f"Layout({self.shape}, axis={self.axis})"


SMALL_LAYOUTS = [
    Layout((8, 5), 1, "NC"),
    Layout((6, 4, 7), 1, "NCL"),
    Layout((3, 5, 4, 4), 1, "NCHW"),
    Layout((2, 3, 2, 3, 4), 1, "NCDHW"),
    Layout((3, 4, 4, 5), -1, "NHWC"),
    Layout((5, 3, 4), 0, "axis0"),
    Layout((3, 4, 5, 2), 2, "axis2"),
    Layout((4, 6, 3), 1, "tiny-inner"),
    Layout((3, 4, MIN_INNER - 1), 1, "inner-below-min"),
    Layout((3, 4, MIN_INNER), 1, "inner-at-min"),
    Layout((3, 4, MIN_INNER + 1), 1, "inner-above-min"),
    Layout((2, 3, 8, MIN_INNER // 8), 1, "NCHW-inner-min"),
    Layout((3, 2, 2 * BLOCK + 17), 1, "rows-over-block"),
    Layout((6, TILE + 52), 1, "NC-two-tiles"),
    Layout((3, 2 * (TILE // 5) + 3, 5), 1, "minor-two-tiles"),
    Layout((2 * MINOR_ROWS + 3, 7), 1, "NC-many-rows"),
    Layout((5, 3, 9, 6), -1, "NHWC-many-rows"),
    Layout((3, FUSE_CHANNELS, MIN_INNER), 1, "fused"),
    Layout((2, FUSE_CHANNELS + 1, 8, 9), 1, "fused-NCHW"),
    Layout((7, 1, 9), 1, "one-channel"),
    # channel-minor super-rows (``numbabn.cpu._plan.widen``): k = 3 rows per super-row
    Layout((3 * MINOR_ROWS, 5), 1, "NC-super-rows"),
    Layout((4, 8, 8, 6), -1, "NHWC-super-rows"),
    # a prime number of rows: no super-rows
    Layout((2 * MINOR_ROWS + 1, 6), 1, "NC-prime-rows"),
    Layout((1, 3, 8), 1, "batch-of-one"),
]

BIG_LAYOUTS = [
    # channel-strided, several row ranges per channel
    Layout((_rows_for(2 * 2048), 2, 2048), 1, "big-NCL"),
    # channel-strided, rows longer than a block
    Layout((_rows_for(3 * (BLOCK + 1000)), 3, BLOCK + 1000), 1, "big-rows-over-block"),
    Layout((_rows_for(8 * 16 * 16), 8, 16, 16), 1, "big-NCHW"),
    # channel-minor
    Layout((_rows_for(70), 70), 1, "big-NC"),
    Layout((_rows_for(16 * 8 * 70), 16, 8, 70), -1, "big-NHWC"),
    Layout((_rows_for(TILE + 52), TILE + 52), 1, "big-NC-two-tiles"),
    Layout((3 * 7 * MINOR_ROWS * 16, 9), 1, "big-NC-super-rows"),
    # channel-strided, one whole channel per task (fused statistics + normalize)
    Layout((_rows_for(FUSE_CHANNELS * 64), FUSE_CHANNELS, 8, 8), 1, "big-fused-NCHW"),
    Layout((_rows_for(FUSE_CHANNELS * (BLOCK + 104)), FUSE_CHANNELS, BLOCK + 104), 1, "big-fused-rows-over-block"),
]

LAYOUTS = SMALL_LAYOUTS + BIG_LAYOUTS

# The grid must keep covering what the kernels distinguish.
assert all(lay.size >= PARALLEL_MIN for lay in BIG_LAYOUTS)
assert not any(parallel_for(lay.size, lay.inner) for lay in SMALL_LAYOUTS)  # the serial twins
assert all(lay.size < 3 * PARALLEL_MIN for lay in BIG_LAYOUTS)
assert {lay.inner for lay in LAYOUTS} >= {MIN_INNER - 1, MIN_INNER, MIN_INNER + 1}
assert any(lay.inner > BLOCK for lay in SMALL_LAYOUTS) and any(lay.inner > BLOCK for lay in BIG_LAYOUTS)
assert any(lay.inner == 1 and lay.channels > TILE for lay in BIG_LAYOUTS)
assert all(lay.n >= 2 for lay in LAYOUTS)


def _super_rows(lay):
    """Rows per super-row the channel-minor kernels use for ``lay`` (1: none)."""
    if lay.inner >= MIN_INNER:
        return 1
    outer = lay.size // (lay.channels * lay.inner)
    k = max(1, min(outer // MINOR_ROWS, WIDEN_TO // max(lay.channels * lay.inner, 1)))
    while outer % k:
        k -= 1
    return k


assert {_super_rows(lay) for lay in SMALL_LAYOUTS} >= {1, 3, 4}
assert any(_super_rows(lay) > 4 for lay in BIG_LAYOUTS)


def _fused(lay, itemsize=8):
    outer = lay.size // (lay.channels * lay.inner)
    return lay.inner >= MIN_INNER and lay.channels >= FUSE_CHANNELS and 2 * outer * lay.inner * itemsize <= FUSE_BYTES


assert any(_fused(lay) for lay in SMALL_LAYOUTS) and any(_fused(lay) for lay in BIG_LAYOUTS)
assert any(lay.inner >= MIN_INNER and not _fused(lay, 4) for lay in BIG_LAYOUTS)
assert any(
    lay.inner == 1 and (lay.size // lay.channels) % MINOR_ROWS not in (0, lay.size // lay.channels) for lay in LAYOUTS
)


def by_tag(*tags):
    """The layouts with these tags, in this order."""
    found = {lay.tag: lay for lay in LAYOUTS}
    return [found[t] for t in tags]


DTYPES = [np.float32, np.float64]

#: Relative tolerance (to the float64 oracle's scale) of values rounded to the input dtype.
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}

#: Statistics: float64 data is summed in float64; float32 and float16 data in float32 lanes
#: whose block partials merge in float64 (docs/math.rst): the mean within this many of its
#: standard deviations, the variance within it relative.
STATS_RTOL = {np.dtype(np.float64): 1e-11, np.dtype(np.float32): 1e-6, np.dtype(np.float16): 1e-6}


def stats_rtol(dtype):
    """The statistics' tolerance for data of ``dtype`` (:data:`STATS_RTOL`)."""
    return STATS_RTOL[np.dtype(dtype)]


def layout_params(layouts=LAYOUTS):
    return [pytest.param(lay, id=lay.id) for lay in layouts]


def dtype_params():
    return [pytest.param(np.dtype(d), id=np.dtype(d).name) for d in DTYPES]


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: reproducible, different per test case."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def channel_shape(ndim, axis):
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return tuple(shape)


def reduce_axes(ndim, axis):
    axis %= ndim
    return tuple(i for i in range(ndim) if i != axis)


def make_input(rng, shape, axis, dtype, loc=3.0):
    """Per-channel offset and scale, so channels differ and the mean is not zero."""
    num_channels = shape[axis % len(shape)]
    cs = channel_shape(len(shape), axis)
    mu = rng.uniform(-loc, loc, num_channels).reshape(cs)
    sd = rng.uniform(0.5, 2.0, num_channels).reshape(cs)
    return (mu + sd * rng.standard_normal(shape)).astype(dtype)


def make_params(rng, num_channels, dtype):
    """``(weight, bias, running_mean, running_var)``: non-trivial, weight of both signs."""
    weight = rng.uniform(0.5, 1.5, num_channels) * rng.choice([-1.0, 1.0], num_channels)
    bias = rng.normal(0.0, 1.0, num_channels)
    running_mean = rng.normal(0.0, 1.0, num_channels)
    running_var = rng.uniform(0.5, 2.0, num_channels)
    return tuple(a.astype(dtype) for a in (weight, bias, running_mean, running_var))


def assert_close(actual, expected, dtype, *, rtol=None, scale=None, err_msg=""):
    """``actual`` (rounded to ``dtype``) agrees with the float64 ``expected`` to the dtype's
    tolerance, absolute part relative to the scale of ``expected``."""
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    tol = TOL[np.dtype(dtype)] if rtol is None else rtol
    if scale is None:
        finite = expected[np.isfinite(expected)]
        scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=tol, atol=tol * scale, err_msg=err_msg)


def assert_bitwise(a, b, err_msg=""):
    """Same shape, dtype and bytes (NaNs included)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype, err_msg)
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), err_msg


AFFINE = [pytest.param(True, id="affine"), pytest.param(False, id="no-affine")]
TRAINING = [pytest.param(True, id="train"), pytest.param(False, id="eval")]


def make_case(rng, layout, dtype, affine):
    """``(x, weight, bias, running_mean, running_var)`` for ``layout``; no affine pair (None)
    unless ``affine``."""
    x = make_input(rng, layout.shape, layout.axis, dtype)
    weight, bias, running_mean, running_var = make_params(rng, layout.channels, dtype)
    if not affine:
        weight = bias = None
    return x, weight, bias, running_mean, running_var
