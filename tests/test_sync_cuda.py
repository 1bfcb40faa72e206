"""SyncBatchNorm on GPU arrays (``device="cuda"``), in one process: ranks are threads meeting
at a barrier (``test_sync.ThreadComm``), each rank's part on the device, and every rank is
checked against a plain CPU BatchNorm on the concatenated global batch.

Runs in numba's CUDA simulator (``conftest.py``) with small blocks patched in, as
``test_cuda.py`` does, so the parts span several blocks and splits.  The simulator runs one
kernel at a time (``numba.cuda.simulator.kernel``: "no support for concurrent kernel launch"),
so there the ranks' launches take turns under a lock; on a GPU they run as they are.
"""

import threading

import numpy as np
import pytest
from conftest import TOL, Layout
from numba import cuda
from test_sync import ThreadComm, batch_axis, run_ranks, split, unwrap, with_batch

import numbabn
from numbabn import BatchNorm, SyncBatchNorm, _config
from numbabn.cuda import _arrays
from numbabn.cuda import api as gpu
from numbabn.cuda._launch import SIMULATED

#: Both kernel families with the patched tunables (CUDA_MIN_INNER = 8): channel-minor (N, C),
#: channels-last and short rows, strided rows of 12, and the feature axis first.
LAYOUTS = [
    Layout((12, 5), 1, "NC"),
    Layout((6, 3, 12), 1, "NCL"),
    Layout((6, 4, 3, 5), -1, "NHWC"),
    Layout((6, 3, 2, 3), 1, "NCHW-short-rows"),
    Layout((5, 12, 3), 0, "axis0"),
]

#: Per step, each rank's part of the batch axis: uneven, one of a single row, one empty.
SIZES = [(4, 2), (1, 5), (0, 6)]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """8 threads a block, 16 elements a block before a split, 4 threads merging a channel's
    partials (``test_cuda.small_blocks``)."""
    monkeypatch.setattr(_config, "CUDA_THREADS", 8)
    monkeypatch.setattr(_config, "CUDA_MERGE_THREADS", 4)
    monkeypatch.setattr(_config, "CUDA_BLOCK_ELEMS", 16)
    monkeypatch.setattr(_config, "CUDA_MIN_INNER", 8)


@pytest.fixture(autouse=True)
def one_kernel_at_a_time(monkeypatch):
    if not SIMULATED:
        return
    lock, launch = threading.Lock(), _arrays.launch

    def locked(*args):
        with lock:
            launch(*args)

    monkeypatch.setattr(_arrays, "launch", locked)


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


def host(a):
    return None if a is None else a.copy_to_host()


def make_layers(size, lay, dtype, rng, **kwargs):
    """``size`` GPU SyncBatchNorm layers on one ThreadComm and the CPU reference BatchNorm,
    all with the same random weight and bias."""
    comm = ThreadComm(size)
    ref = BatchNorm(lay.channels, axis=lay.axis, dtype=dtype, **kwargs)
    layers = [
        SyncBatchNorm(lay.channels, axis=lay.axis, dtype=dtype, device="cuda", comm=comm.rank(r), **kwargs)
        for r in range(size)
    ]
    if ref.affine:
        w = rng.uniform(0.5, 1.5, lay.channels).astype(dtype)
        b = rng.normal(0.0, 1.0, lay.channels).astype(dtype)
        ref.weight[...], ref.bias[...] = w, b
        for layer in layers:
            layer.weight.copy_to_device(w)
            layer.bias.copy_to_device(b)
    return comm, layers, ref


def assert_close(actual, desired, dtype, what):
    desired = np.asarray(desired, dtype=np.float64)
    tol = 4 * TOL[np.dtype(dtype)]
    scale = max(1.0, float(np.abs(desired).max())) if desired.size else 1.0
    np.testing.assert_allclose(actual, desired, rtol=tol, atol=tol * scale, err_msg=what)


def assert_same_bits(arrays, what):
    first = np.ascontiguousarray(arrays[0])
    for a in arrays[1:]:
        assert a.dtype == first.dtype and np.ascontiguousarray(a).tobytes() == first.tobytes(), what


SHARED = ("grad_weight", "grad_bias", "update_threshold", "running_mean", "running_var")


def step_and_compare(layers, ref, lay, sizes, dtype, rng):
    """One training step on every rank (device parts of sizes ``sizes``) and on ``ref`` (the
    whole batch, on the CPU): outputs and gradients to the dtype's tolerance, the global
    state (saved statistics, parameter gradients, update threshold, running statistics)
    the same bits on every rank."""
    x = rng.normal(3.0, 2.0, with_batch(lay, sum(sizes))).astype(dtype)
    g = rng.normal(0.0, 1.0, x.shape).astype(dtype)
    xs, gs = split(x, lay, sizes), split(g, lay, sizes)

    def rank(r):
        y = layers[r](dev(xs[r]))
        saved = [host(a) for a in layers[r]._saved[1:3]]
        gi = layers[r].backward(dev(gs[r]))
        return host(y), saved, host(gi)

    out = unwrap(run_ranks(len(layers), rank))
    y_ref, gi_ref = ref(x), ref.backward(g)
    for r, (y, _, gi) in enumerate(out):
        assert y.shape == gi.shape == xs[r].shape and y.dtype == gi.dtype == dtype
    ax = batch_axis(lay)
    assert_close(np.concatenate([y for y, _, _ in out], axis=ax), y_ref, dtype, "output")
    assert_close(np.concatenate([gi for _, _, gi in out], axis=ax), gi_ref, dtype, "grad_input")
    for k, what in enumerate(("save_mean", "save_invstd")):
        assert_same_bits([saved[k] for _, saved, _ in out], what)
    for name in SHARED:
        if getattr(ref, name) is None:
            assert all(getattr(layer, name) is None for layer in layers), name
            continue
        values = [host(getattr(layer, name)) for layer in layers]
        assert_same_bits(values, name)
        assert values[0].dtype == getattr(ref, name).dtype, name
        assert_close(values[0], getattr(ref, name), dtype, name)
    for layer in layers:
        assert layer.num_batches_tracked == ref.num_batches_tracked


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: lay.tag)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_two_ranks_match_global_batch(lay, dtype, rng):
    """Steps with uneven parts (one part of one row, one empty) against the CPU BatchNorm on
    the whole batch; one allgather per forward and per backward."""
    comm, layers, ref = make_layers(2, lay, dtype, rng)
    for sizes in SIZES:
        step_and_compare(layers, ref, lay, sizes, dtype, rng)
    assert comm.calls == [2 * len(SIZES)] * 2


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: lay.tag)
def test_two_ranks_with_masks_match_global_batch(lay, rng):
    """Masked steps (rank 0 a NumPy mask, rank 1 a device one): every rank's statistics of
    the values its mask keeps, merged with their kept counts, against the CPU BatchNorm on
    the whole batch and mask; a part whose mask keeps nothing, then an empty part."""
    dtype = np.float64
    _, layers, ref = make_layers(2, lay, dtype, rng)
    for sizes in [(3, 3), (0, 6)]:
        x = rng.normal(3.0, 2.0, with_batch(lay, sum(sizes))).astype(dtype)
        g = rng.normal(0.0, 1.0, x.shape).astype(dtype)
        mask = rng.random(tuple(1 if a == lay.ax else n for a, n in enumerate(x.shape))) < 0.6
        xs, gs, ms = split(x, lay, sizes), split(g, lay, sizes), split(mask, lay, sizes)
        ms[0][...] = False  # views of mask: rank 0 keeps nothing

        def rank(r, xs=xs, gs=gs, ms=ms):
            y = layers[r](dev(xs[r]), mask=ms[r] if r == 0 else dev(ms[r]))
            return host(y), host(layers[r].backward(dev(gs[r])))

        out = unwrap(run_ranks(2, rank))
        y_ref, gi_ref = ref(x, mask=mask), ref.backward(g)
        ax = batch_axis(lay)
        assert_close(np.concatenate([y for y, _ in out], axis=ax), y_ref, dtype, "output")
        assert_close(np.concatenate([gi for _, gi in out], axis=ax), gi_ref, dtype, "grad_input")
        for name in SHARED:
            values = [host(getattr(layer, name)) for layer in layers]
            assert_same_bits(values, name)
            assert_close(values[0], getattr(ref, name), dtype, name)


@pytest.mark.parametrize("kwargs", [{"momentum": None}, {"affine": False}, {"track_running_stats": False}], ids=str)
def test_settings(kwargs, rng):
    lay = LAYOUTS[1]
    _, layers, ref = make_layers(2, lay, np.float64, rng, **kwargs)
    for sizes in [(2, 4), (5, 1)]:
        step_and_compare(layers, ref, lay, sizes, np.float64, rng)


@pytest.mark.parametrize("lay", LAYOUTS[:4], ids=lambda lay: lay.tag)
def test_one_rank_is_bitwise_gpu_batchnorm(lay, rng):
    """One rank: the exchanged statistics finished by the training forward's own kernel,
    and the exchanged sums by the backward's, give the plain GPU BatchNorm's bits."""
    comm = ThreadComm(1)
    layer = SyncBatchNorm(lay.channels, axis=lay.axis, device="cuda", comm=comm.rank(0))
    plain = BatchNorm(lay.channels, axis=lay.axis, device="cuda")
    w = dev(rng.uniform(0.5, 1.5, lay.channels).astype(np.float32))
    for bn in (layer, plain):
        bn.weight.copy_to_device(w)
    for _ in range(2):
        x = dev(rng.normal(3.0, 2.0, lay.shape).astype(np.float32))
        g = dev(rng.normal(0.0, 1.0, lay.shape).astype(np.float32))
        np.testing.assert_array_equal(host(layer(x)), host(plain(x)))
        np.testing.assert_array_equal(host(layer.backward(g)), host(plain.backward(g)))
        for name in SHARED:
            np.testing.assert_array_equal(host(getattr(layer, name)), host(getattr(plain, name)), err_msg=name)
    assert comm.calls == [4]


def test_stages_on_one_part_match_the_plain_calls(rng):
    """The backend's stages on their own: ``forward_with_stats`` given the part's own
    statistics is the plain training forward (to float tolerance; here the same bits), and
    ``backward_with_sums`` given ``grad_reduce``'s sums the plain backward."""
    from numbabn import _call

    x = rng.normal(3.0, 2.0, (6, 3, 12)).astype(np.float32)
    g = rng.normal(0.0, 1.0, x.shape).astype(np.float32)
    weight, bias = (dev(rng.normal(1.0, 0.3, 3).astype(np.float32)) for _ in range(2))
    running = (
        [dev(np.zeros(3, np.float32)), dev(np.ones(3, np.float32))],
        [dev(np.zeros(3, np.float32)), dev(np.ones(3, np.float32))],
    )
    inp = _call.check_input(dev(x), 1, None)
    payload = gpu.part_stats(inp)
    assert type(payload) is np.ndarray and payload.dtype == np.float64 and payload.shape == (7,)
    count, mean, m2 = numbabn.Stats.from_array(payload)
    assert count == 72
    staged = gpu.forward_with_stats(
        _call.forward_call(inp, weight, bias, *running[0], True, 0.1, 1e-5, None),
        np.stack([np.full(mean.shape, float(count)), mean, m2]),
    )
    plain = gpu.forward(_call.forward_call(inp, weight, bias, *running[1], True, 0.1, 1e-5, None))
    for a, b in zip(staged, plain, strict=True):
        np.testing.assert_allclose(host(a), host(b), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(host(a), host(b))
    for a, b in zip(*running, strict=True):
        np.testing.assert_array_equal(host(a), host(b))
    call = _call.backward_call(inp, dev(g), weight, staged[1], staged[2], True, None)
    sums = gpu.part_sums(call)
    assert type(sums) is np.ndarray and sums.shape == (3, 3) and sums.dtype == np.float64
    np.testing.assert_array_equal(gpu.part_sums(call), sums)  # deterministic
    for a, b in zip(gpu.backward_with_sums(call, sums, count), gpu.backward(call), strict=True):
        np.testing.assert_array_equal(host(a), host(b))


def test_bad_input_on_one_rank_raises_everywhere(rng):
    """A rank whose input is a host array (the layer is on the GPU) still takes part in the
    exchange: every rank raises the same error and nothing changes."""
    lay = LAYOUTS[0]
    _, layers, _ = make_layers(2, lay, np.float32, rng)
    x = rng.normal(size=lay.shape).astype(np.float32)
    results = run_ranks(2, lambda r: layers[r](x if r == 1 else dev(x)))
    assert all(type(e) is TypeError for e in results), results
    assert len({str(e) for e in results}) == 1 and "forward failed on rank 1 of 2" in str(results[0])
    assert all(layer.num_batches_tracked == 0 for layer in layers)
    np.testing.assert_array_equal(host(layers[0].running_mean), np.zeros(lay.channels, np.float32))


def test_every_part_empty_then_a_step(rng):
    """A global batch of no values (nothing normalized, the batch counted), then a normal step."""
    lay = LAYOUTS[0]
    _, layers, ref = make_layers(2, lay, np.float32, rng)
    empty = dev(np.ones((0, lay.channels), np.float32))
    ys = unwrap(run_ranks(2, lambda r: layers[r](empty)))
    assert all(y.shape == (0, lay.channels) for y in ys)
    ref(np.ones((0, lay.channels), np.float32))
    step_and_compare(layers, ref, lay, (3, 3), np.float32, rng)


def test_gpu_layer_with_comm_is_built():
    layer = SyncBatchNorm(3, device="cuda", comm=ThreadComm(1).rank(0))
    assert layer.device == "cuda" and isinstance(layer, numbabn.BatchNorm)
