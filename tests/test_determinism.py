"""Results are bitwise identical for any number of threads (docs/design.rst: blocking and
merge order depend on the shape alone), and concurrent calls from Python threads give the
same results as sequential ones."""

import hashlib
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pytest
from conftest import BIG_LAYOUTS, PARALLEL_MIN, assert_bitwise, by_tag, make_input, make_params

import numbabn

THREADS = [1, 2]

DET_LAYOUTS = BIG_LAYOUTS


def _all_results(x, axis, params, g):
    """Every output of welford, training forward (with running stats), eval forward and both
    backward passes, as a flat list of arrays."""
    weight, bias, rm, rv = (a.copy() for a in params)
    s = numbabn.welford(x, axis=axis)
    y, mean, invstd = numbabn.batch_norm_forward(x, weight, bias, rm, rv, training=True, axis=axis)
    grads = numbabn.batch_norm_backward(g, x, weight, mean, invstd, training=True, axis=axis)
    ye, mean_e, invstd_e = numbabn.batch_norm_forward(x, weight, bias, rm, rv, training=False, axis=axis)
    grads_e = numbabn.batch_norm_backward(g, x, weight, mean_e, invstd_e, training=False, axis=axis)
    return [np.array(s.count), s.mean, s.m2, y, mean, invstd, rm, rv, *grads, ye, *grads_e]


def _with_threads(n, fn, *args):
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        assert numba.get_num_threads() == n
        return fn(*args)
    finally:
        numba.set_num_threads(old)


def test_enough_threads_to_compare():
    assert numba.config.NUMBA_NUM_THREADS >= max(THREADS)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", [pytest.param(lay, id=lay.id) for lay in DET_LAYOUTS])
def test_bitwise_identical_for_any_thread_count(layout, dtype, rng):
    assert layout.size >= PARALLEL_MIN
    x = make_input(rng, layout.shape, layout.axis, dtype, loc=100.0)
    g = rng.standard_normal(layout.shape).astype(dtype)
    params = make_params(rng, layout.channels, dtype)
    results = [_with_threads(n, _all_results, x, layout.axis, params, g) for n in THREADS]
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert_bitwise(a, b, err_msg=f"result {i}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "shape", [(8, 32, 16, 16), (64, 8, 128), (48, 1, 2048)], ids=["fused", "whole-channels", "row-ranges"]
)
def test_strided_between_the_thresholds_bitwise_for_any_thread_count(shape, dtype, rng):
    """Channel-strided arrays past PARALLEL_MIN_STRIDED but below PARALLEL_MIN run the
    parallel twins, and give the same bits for any thread count."""
    from numbabn import _call, _config

    size = int(np.prod(shape))
    assert _config.PARALLEL_MIN_STRIDED <= size < PARALLEL_MIN
    x = make_input(rng, shape, 1, dtype, loc=100.0)
    assert _call.check_input(x, 1, None).parallel
    g = rng.standard_normal(shape).astype(dtype)
    params = make_params(rng, shape[1], dtype)
    results = [_with_threads(n, _all_results, x, 1, params, g) for n in THREADS]
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert_bitwise(a, b, err_msg=f"result {i}")


def test_parallel_twins_by_layout():
    """The parallel twins start at PARALLEL_MIN_STRIDED elements for channel-strided arrays and
    at PARALLEL_MIN for channel-minor ones."""
    from numbabn import _call, _config

    def parallel(shape, axis=1):
        return _call.check_input(np.zeros(shape, np.float32), axis, None).parallel

    strided, minor = _config.PARALLEL_MIN_STRIDED, PARALLEL_MIN
    assert not parallel((strided // 256 - 1, 1, 256)) and parallel((strided // 256, 1, 256))
    assert not parallel((minor // 64 - 1, 64)) and parallel((minor // 64, 64))
    assert not parallel((strided // 64, 64)) and not parallel((1, strided // 64, 64), axis=-1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_merge_partials_identical_for_any_thread_count(dtype, rng):
    """Statistics of chunks merged with merge_stats do not depend on the thread count either."""
    layout = by_tag("big-NCHW")[0]
    x = make_input(rng, layout.shape, layout.axis, dtype)

    def run():
        parts = [numbabn.welford(p) for p in np.array_split(x, 3)]
        m = numbabn.merge_stats(*parts)
        return [m.mean, m.m2]

    a, b = (_with_threads(n, run) for n in THREADS)
    for u, v in zip(a, b, strict=True):
        assert_bitwise(u, v)


SCRIPT = textwrap.dedent(
    """
    import hashlib, sys
    import numba
    import numpy as np
    import numbabn


    def digest():
        h = hashlib.sha256()
        rng = np.random.default_rng(1234)
        for shape, axis in {cases!r}:
            C = shape[axis]
            x = (50.0 + rng.standard_normal(shape)).astype(np.float32)
            g = rng.standard_normal(shape).astype(np.float32)
            w = rng.uniform(0.5, 1.5, C).astype(np.float32)
            b = rng.standard_normal(C).astype(np.float32)
            rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
            s = numbabn.welford(x, axis=axis)
            y, mean, invstd = numbabn.batch_norm_forward(x, w, b, rm, rv, axis=axis)
            gi, gw, gb = numbabn.batch_norm_backward(g, x, w, mean, invstd, axis=axis)
            for a in (s.mean, s.m2, y, mean, invstd, rm, rv, gi, gw, gb):
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


    if __name__ == "__main__":
        assert numba.get_num_threads() == int(sys.argv[1]), numba.get_num_threads()
        print(digest())
    """
).format(cases=[(lay.shape, lay.axis) for lay in by_tag("big-NCHW", "big-fused-NCHW", "big-NC", "big-NHWC")])


def _run_script(threads):
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(threads)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    digest = proc.stdout.strip().splitlines()[-1]
    assert len(digest) == 64
    return digest


def test_bitwise_identical_across_processes_with_numba_num_threads():
    """NUMBA_NUM_THREADS=1 and =2 in fresh processes give the same bytes."""
    one, two = _run_script(1), _run_script(2)
    assert one == two
    # ... and the same as this process computes (the script really ran the kernels).
    namespace = {"__name__": "script"}
    exec(compile(SCRIPT, "<script>", "exec"), namespace)
    assert namespace["digest"]() == one


# -- Python threads ------------------------------------------------------------------------------
THREAD_LAYOUTS = by_tag("NCHW", "NHWC", "NC", "fused", "big-NCHW", "big-NC", "big-NHWC", "big-fused-NCHW")


def _job(args):
    x, axis, params, g = args
    return _all_results(x, axis, params, g)


def test_concurrent_calls_match_sequential(rng):
    """4 Python threads x 8 calls each on different arrays, small and parallel-sized mixed."""
    jobs = []
    for i in range(32):
        layout = THREAD_LAYOUTS[i % len(THREAD_LAYOUTS)]
        dtype = np.float32 if i % 3 else np.float64
        x = make_input(rng, layout.shape, layout.axis, dtype)
        g = rng.standard_normal(layout.shape).astype(dtype)
        jobs.append((x, layout.axis, make_params(rng, layout.channels, dtype), g))
    assert sum(j[0].size >= PARALLEL_MIN for j in jobs) >= 8
    assert sum(j[0].size < PARALLEL_MIN for j in jobs) >= 8
    sequential = [_job(j) for j in jobs]

    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(_job, jobs))

    for k, (a, b) in enumerate(zip(sequential, concurrent, strict=True)):
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert_bitwise(u, v, err_msg=f"job {k}, result {i}")


def test_concurrent_layers(rng):
    """Independent BatchNorm layers trained from several threads at once end in the same state
    as trained one after another."""
    layouts = by_tag("NCHW", "big-NCHW", "NHWC", "big-NHWC", "fused", "big-fused-NCHW")
    batches = [[make_input(rng, lay.shape, lay.axis, np.float32) for _ in range(3)] for lay in layouts]

    def train(k):
        lay = layouts[k]
        bn = numbabn.BatchNorm(lay.channels, axis=lay.axis, momentum=None)
        outs = []
        for x in batches[k]:
            y = bn(x)
            outs.append(hashlib.sha256(y.tobytes() + bn.backward(y).tobytes()).hexdigest())
        return outs, bn.state_dict()

    sequential = [train(k) for k in range(len(layouts))]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(train, range(len(layouts))))
    for (h1, s1), (h2, s2) in zip(sequential, concurrent, strict=True):
        assert h1 == h2
        for key in s1:
            assert_bitwise(s1[key], s2[key], err_msg=key)
