"""SyncBatchNorm in one process: ranks are threads meeting at a barrier, and every rank is
checked against a plain BatchNorm on the concatenated global batch."""

import pickle
import threading

import numpy as np
import pytest
from conftest import BIG_LAYOUTS, TOL, Layout, by_tag

import numbabn
from numbabn import BatchNorm, SyncBatchNorm

#: Long enough for a cold numba compile in one thread while the others wait at the barrier.
BARRIER_TIMEOUT = 300


class ThreadComm:
    """An in-process communicator of ``size`` ranks: ``comm.rank(r).allgather(obj)`` returns
    every rank's object (a pickled copy, as MPI delivers) in rank order.  With ``buffers``,
    ranks also have mpi4py's buffer ``Allgather(sendbuf, recvbuf)`` and ``Get_size()``,
    which refuse buffers of different sizes on different ranks, as MPI does."""

    def __init__(self, size, buffers=False):
        self.size = size
        self._barrier = threading.Barrier(size, timeout=BARRIER_TIMEOUT)
        self._slots = [None] * size
        self.calls = [0] * size
        self.buffer_calls = [0] * size
        self._rank_class = _BufferRankComm if buffers else _RankComm

    def rank(self, r):
        return self._rank_class(self, r)

    def allgather(self, r, obj):
        self.calls[r] += 1
        self._slots[r] = pickle.dumps(obj)
        self._barrier.wait()
        out = [pickle.loads(s) for s in self._slots]
        self._barrier.wait()
        return out

    def buffer_allgather(self, r, sendbuf, recvbuf):
        self.buffer_calls[r] += 1
        self._slots[r] = np.array(sendbuf, copy=True)
        self._barrier.wait()
        sizes = [a.size for a in self._slots]
        if any(n != sizes[0] for n in sizes) or recvbuf.size != self.size * sizes[0]:
            self._barrier.wait()
            raise RuntimeError(f"MPI: message truncated (buffer sizes {sizes}, receive {recvbuf.size})")
        recvbuf.reshape(self.size, -1)[...] = [a.ravel() for a in self._slots]
        self._barrier.wait()


class _RankComm:
    def __init__(self, comm, r):
        self.comm, self.r = comm, r

    def allgather(self, obj):
        return self.comm.allgather(self.r, obj)


class _BufferRankComm(_RankComm):
    def Allgather(self, sendbuf, recvbuf):  # noqa: N802 - mpi4py's name
        self.comm.buffer_allgather(self.r, sendbuf, recvbuf)

    def Get_size(self):  # noqa: N802 - mpi4py's name
        return self.comm.size


def run_ranks(size, fn):
    """``[fn(0), ..., fn(size - 1)]``, each in its own thread; exceptions are returned in
    place of results (a hung rank fails the test at the barrier's timeout)."""
    results = [None] * size

    def target(r):
        try:
            results[r] = fn(r)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            results[r] = e

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * BARRIER_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results


def unwrap(results):
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def batch_axis(lay):
    """The axis that the ranks split: the first one that is not the feature axis."""
    return 1 if lay.ax == 0 else 0


def split(a, lay, sizes):
    ax = batch_axis(lay)
    assert sum(sizes) == a.shape[ax]
    return np.split(a, np.cumsum(sizes)[:-1], axis=ax)


def with_batch(lay, n):
    shape = list(lay.shape)
    shape[batch_axis(lay)] = n
    return tuple(shape)


def assert_close(actual, desired, dtype, what):
    desired = np.asarray(desired, dtype=np.float64)
    scale = max(1.0, float(np.abs(desired).max())) if desired.size else 1.0
    np.testing.assert_allclose(
        actual, desired, rtol=4 * TOL[np.dtype(dtype)], atol=4 * TOL[np.dtype(dtype)] * scale, err_msg=what
    )


def make_layers(size, num_features, dtype, rng, buffers=False, **kwargs):
    """``size`` SyncBatchNorm layers on one ThreadComm (``buffers``: with mpi4py's buffer
    methods) and the reference BatchNorm, all with the same random weight and bias
    (``num_features`` may be a Layout: its channels and axis)."""
    if isinstance(num_features, Layout):
        kwargs["axis"] = num_features.axis
        num_features = num_features.channels
    comm = ThreadComm(size, buffers)
    ref = BatchNorm(num_features, dtype=dtype, **kwargs)
    layers = [SyncBatchNorm(num_features, dtype=dtype, comm=comm.rank(r), **kwargs) for r in range(size)]
    if ref.affine:
        w = rng.uniform(0.5, 1.5, num_features).astype(dtype)
        b = rng.normal(0.0, 1.0, num_features).astype(dtype)
        for layer in (ref, *layers):
            layer.weight[...] = w
            layer.bias[...] = b
    return comm, layers, ref


def step_and_compare(layers, ref, lay, sizes, dtype, rng, backward=True):
    """One training step on every rank (parts of sizes ``sizes``) and on ``ref`` (the whole
    batch); checks outputs, gradients and state against ``ref``, and the shared state bitwise
    across ranks."""
    x = rng.normal(3.0, 2.0, with_batch(lay, sum(sizes))).astype(dtype)
    g = rng.normal(0.0, 1.0, x.shape).astype(dtype)
    xs, gs = split(x, lay, sizes), split(g, lay, sizes)

    def rank(r):
        y = layers[r](xs[r])
        gi = layers[r].backward(gs[r]) if backward else None
        return y, gi

    out = unwrap(run_ranks(len(layers), rank))
    y_ref = ref(x)
    for r, (y, _) in enumerate(out):
        assert y.shape == xs[r].shape and y.dtype == dtype
    assert_close(np.concatenate([y for y, _ in out], axis=batch_axis(lay)), y_ref, dtype, "output")
    if backward:
        gi_ref = ref.backward(g)
        assert_close(np.concatenate([gi for _, gi in out], axis=batch_axis(lay)), gi_ref, dtype, "grad_input")
        names = ["update_threshold"] + (["grad_weight", "grad_bias"] if ref.affine else [])
        for name in names:
            for layer in layers:
                assert_close(getattr(layer, name), getattr(ref, name), dtype, name)
                np.testing.assert_array_equal(getattr(layer, name), getattr(layers[0], name), err_msg=name)
            assert getattr(layers[0], name).dtype == getattr(ref, name).dtype
    if ref.track_running_stats:
        for layer in layers:
            assert layer.num_batches_tracked == ref.num_batches_tracked
            for name in ("running_mean", "running_var"):
                assert_close(getattr(layer, name), getattr(ref, name), dtype, name)
                assert getattr(layer, name).tobytes() == getattr(layers[0], name).tobytes(), name
    return out


LAYOUTS = [
    Layout((12, 5), 1, "NC"),
    Layout((6, 3, 4, 5), 1, "NCHW"),
    Layout((6, 4, 3, 5), -1, "NHWC"),
    Layout((5, 12, 3), 0, "axis0"),
]

SIZES = {2: [(4, 2), (1, 5), (3, 3)], 3: [(2, 5, 1), (0, 3, 3), (6, 0, 1)]}


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: lay.tag)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_matches_global_batch(lay, dtype, size, momentum, rng):
    """Several steps with uneven parts (a part of one row, an empty part) against BatchNorm
    on the whole batch."""
    comm, layers, ref = make_layers(size, lay, dtype, rng, momentum=momentum)
    for sizes in SIZES[size]:
        step_and_compare(layers, ref, lay, sizes, dtype, rng)
    assert comm.calls == [2 * len(SIZES[size])] * size  # one allgather per forward and per backward


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: lay.tag)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_buffer_exchange_matches_object_exchange(lay, momentum, rng):
    """A communicator with mpi4py's buffer methods exchanges float64 buffers (a header, then
    the payloads: two Allgathers per step, no pickled object) and gives the same bits as the
    object exchange, against BatchNorm on the whole batch."""
    seed = int(rng.integers(1 << 30))
    runs = []
    for buffers in (False, True):
        comm, layers, ref = make_layers(3, lay, np.float32, np.random.default_rng(seed), buffers, momentum=momentum)
        step_rng = np.random.default_rng(seed + 1)
        outs = [step_and_compare(layers, ref, lay, sizes, np.float32, step_rng) for sizes in SIZES[3]]
        runs.append((outs, [state(layer) for layer in layers]))
        steps = 2 * len(SIZES[3])
        assert (comm.calls, comm.buffer_calls) == (
            ([steps] * 3, [0] * 3) if not buffers else ([0] * 3, [2 * steps] * 3)
        )
    (outs_o, state_o), (outs_b, state_b) = runs
    for step_o, step_b in zip(outs_o, outs_b, strict=True):
        for (y_o, gi_o), (y_b, gi_b) in zip(step_o, step_b, strict=True):
            np.testing.assert_array_equal(y_o, y_b)
            np.testing.assert_array_equal(gi_o, gi_b)
    assert state_o == state_b


@pytest.mark.parametrize("lay", [BIG_LAYOUTS[0], *by_tag("big-NHWC")], ids=lambda lay: lay.tag)
def test_matches_global_batch_parallel_kernels(lay, rng):
    """Parts large enough for the parallel drivers (the threads share them under a lock)."""
    n = lay.shape[batch_axis(lay)]
    _, layers, ref = make_layers(2, lay, np.float32, rng)
    step_and_compare(layers, ref, Layout(with_batch(lay, n), lay.axis, lay.tag), (n, n // 2), np.float32, rng)


@pytest.mark.parametrize("kwargs", [{"affine": False}, {"track_running_stats": False}, {"decay": 0.9}], ids=str)
def test_settings(kwargs, rng):
    lay = LAYOUTS[1]
    _, layers, ref = make_layers(2, lay, np.float64, rng, **kwargs)
    for sizes in [(2, 4), (5, 1)]:
        step_and_compare(layers, ref, lay, sizes, np.float64, rng)


def test_forward_only_steps(rng):
    """Training forwards without backwards (a backward is not owed)."""
    lay = LAYOUTS[0]
    _, layers, ref = make_layers(3, lay, np.float32, rng)
    for sizes in [(3, 4, 5), (1, 1, 1)]:
        step_and_compare(layers, ref, lay, sizes, np.float32, rng, backward=False)


def test_one_rank_is_bitwise_batchnorm(rng):
    """One rank: the staged kernels give BatchNorm's bits."""
    for lay in [*LAYOUTS, BIG_LAYOUTS[0]]:
        comm, (layer,), ref = make_layers(1, lay, np.float32, rng)
        for _ in range(2):
            x = rng.normal(3.0, 2.0, lay.shape).astype(np.float32)
            g = rng.normal(0.0, 1.0, lay.shape).astype(np.float32)
            np.testing.assert_array_equal(layer(x), ref(x))
            np.testing.assert_array_equal(layer.backward(g), ref.backward(g))
            for name in ("grad_weight", "grad_bias", "update_threshold", "running_mean", "running_var"):
                np.testing.assert_array_equal(getattr(layer, name), getattr(ref, name), err_msg=name)
        assert comm.calls == [4]


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: lay.tag)
def test_payload_is_welford_to_array(lay, rng):
    """A rank's forward payload is ``Stats.to_array()`` of its part's ``welford``, bit for
    bit, an empty part's included (count 0)."""
    from numbabn import _call
    from numbabn.cpu import api as host

    x = rng.normal(3.0, 2.0, lay.shape).astype(np.float32)
    batch_axis = 1 if lay.axis % x.ndim == 0 else 0
    for part in (x, x.take([], axis=batch_axis)):
        payload = host.part_stats(_call.check_input(part, lay.axis, None))
        assert payload.dtype == np.float64 and payload.shape == (2 * x.shape[lay.axis] + 1,)
        assert payload.base is not None and payload.flags.c_contiguous  # a view: nothing copied
        np.testing.assert_array_equal(payload, numbabn.welford(part, axis=lay.axis).to_array())


def test_payload_of_no_channels():
    """Without channels the payload is the count alone, as ``Stats.to_array`` gives it."""
    from numbabn import stats

    payload = stats.payload(6, np.empty((3, 0)))
    np.testing.assert_array_equal(payload, numbabn.Stats(6, np.zeros(0), np.zeros(0)).to_array())


def test_every_part_empty(rng):
    """A global batch of no values: empty outputs, running statistics untouched, the batch
    counted (as BatchNorm on an empty batch)."""
    lay = LAYOUTS[1]
    _, layers, ref = make_layers(2, lay, np.float32, rng)
    step_and_compare(layers, ref, lay, (3, 2), np.float32, rng)
    before = [layer.running_mean.copy() for layer in layers]
    step_and_compare(layers, ref, lay, (0, 0), np.float32, rng)
    for layer, rm in zip(layers, before, strict=True):
        np.testing.assert_array_equal(layer.running_mean, rm)
        assert layer.num_batches_tracked == 2


def test_bad_grad_output_after_empty_global_batch(rng):
    """After a global batch of no values the backward exchanges nothing, so a rank's bad
    grad_output raises there alone, and no rank waits."""
    _, layers, _ = make_layers(2, 3, np.float32, rng)
    empty = np.ones((0, 3), np.float32)
    unwrap(run_ranks(2, lambda r: layers[r](empty)))
    results = run_ranks(2, lambda r: layers[r].backward(empty if r == 0 else np.ones((1, 3), np.float32)))
    assert isinstance(results[0], np.ndarray) and results[0].shape == (0, 3)
    assert isinstance(results[1], ValueError) and "grad_output" in str(results[1])


def test_dask_input_refused_everywhere(rng):
    da = pytest.importorskip("dask.array")
    _, layers, _ = make_layers(2, 3, np.float32, rng)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    results = run_ranks(2, lambda r: layers[r](da.from_array(x) if r == 1 else x))
    assert_same_error(results, TypeError, "rank 1", "NumPy arrays")
    assert all(layer.num_batches_tracked == 0 for layer in layers)


def state(layer):
    return pickle.dumps((layer.state_dict(), layer.grad_weight, layer.grad_bias, layer.update_threshold))


@pytest.mark.parametrize("buffers", [False, True], ids=["objects", "buffers"])
def test_global_batch_of_one_value_raises_everywhere(rng, buffers):
    """One value per channel in the global batch (a rank's single value, the other rank
    empty): the same ValueError on every rank, and nothing changed."""
    _, layers, _ = make_layers(2, 5, np.float32, rng, buffers)
    x = rng.normal(size=(1, 5)).astype(np.float32)
    unwrap(run_ranks(2, lambda r: layers[r](np.concatenate([x, x])[: 2 - r])))
    before = [state(layer) for layer in layers]
    results = run_ranks(2, lambda r: layers[r](x[: 1 - r]))
    assert all(isinstance(e, ValueError) for e in results), results
    assert len({str(e) for e in results}) == 1
    assert "more than 1 value per channel" in str(results[0]) and "global batch" in str(results[0])
    assert [state(layer) for layer in layers] == before
    # the ranks are still in step: a good batch goes through
    unwrap(run_ranks(2, lambda r: layers[r](np.concatenate([x, x])[: r + 1])))
    assert all(layer.num_batches_tracked == 2 for layer in layers)


def test_local_batch_of_one_value(rng):
    """A rank with one value per channel is fine when the global batch has more."""
    lay = LAYOUTS[0]
    _, layers, ref = make_layers(3, lay, np.float32, rng)
    step_and_compare(layers, ref, lay, (1, 1, 1), np.float32, rng)


def test_eval_exchanges_nothing(rng):
    lay = LAYOUTS[1]
    comm, layers, ref = make_layers(2, lay, np.float32, rng)
    step_and_compare(layers, ref, lay, (2, 4), np.float32, rng)
    calls = list(comm.calls)
    x = rng.normal(3.0, 2.0, lay.shape).astype(np.float32)
    g = rng.normal(0.0, 1.0, lay.shape).astype(np.float32)
    # Each rank's statistics run on its own slice (float32 lanes by block): the running
    # statistics agree with the single layer's to rounding, and bit for bit between ranks.
    ref.load_state_dict(layers[0].state_dict())
    ref.eval()
    y_ref, gi_ref = ref(x), ref.backward(g)
    for layer in layers:  # one rank at a time: an exchange would wait at the barrier
        layer.eval()
        np.testing.assert_array_equal(layer(x), y_ref)
        np.testing.assert_array_equal(layer.backward(g), gi_ref)
        np.testing.assert_array_equal(layer.update_threshold, ref.update_threshold)
    assert comm.calls == calls
    # back in training mode, the exchange resumes
    for layer in layers:
        layer.train()
    ref.train()
    step_and_compare(layers, ref, lay, (3, 3), np.float32, rng)
    assert comm.calls == [c + 2 for c in calls]


def test_backward_after_eval_forward_exchanges_nothing(rng):
    """A backward follows its forward: after an eval forward, no exchange even back in
    training mode."""
    comm, (a, b), _ = make_layers(2, 3, np.float32, rng)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    a.eval()
    a(x)
    a.train()
    a.backward(x)
    assert comm.calls == [0, 0]


def test_comm_none_is_batchnorm(rng):
    lay = LAYOUTS[2]
    layer = SyncBatchNorm(lay.channels, axis=lay.axis, momentum=None)
    ref = BatchNorm(lay.channels, axis=lay.axis, momentum=None)
    for _ in range(2):
        x = rng.normal(3.0, 2.0, lay.shape).astype(np.float32)
        np.testing.assert_array_equal(layer(x), ref(x))
        np.testing.assert_array_equal(layer.backward(x), ref.backward(x))
    np.testing.assert_array_equal(layer.running_var, ref.running_var)
    assert isinstance(layer, BatchNorm) and numbabn.SyncBatchNorm is SyncBatchNorm


def test_from_batchnorm(rng):
    bn = BatchNorm(4, eps=1e-3, momentum=None, axis=-1, dtype=np.float64)
    bn(rng.normal(size=(6, 4)))
    bn.weight[...] = rng.normal(size=4)
    bn.eval()
    comm = ThreadComm(1).rank(0)
    sync = SyncBatchNorm.from_batchnorm(bn, comm)
    assert type(sync) is SyncBatchNorm and sync.comm is comm
    for name in ("eps", "momentum", "affine", "track_running_stats", "axis", "dtype", "device", "training"):
        assert getattr(sync, name) == getattr(bn, name), name
    for name, value in bn.state_dict().items():
        np.testing.assert_array_equal(getattr(sync, name), value)
    assert sync.weight is not bn.weight  # copies
    sync.weight[...] = 0
    assert bn.weight.any()
    plain = SyncBatchNorm.from_batchnorm(BatchNorm(3, affine=False, track_running_stats=False, decay=0.99), None)
    assert plain.comm is None and plain.weight is None and plain.running_mean is None
    assert plain.momentum == pytest.approx(0.01)
    with pytest.raises(TypeError, match="bn must be a numbabn.BatchNorm"):
        SyncBatchNorm.from_batchnorm(object(), comm)


def test_bad_comm():
    with pytest.raises(TypeError, match="comm must have an allgather"):
        SyncBatchNorm(3, comm=object())
    layer = SyncBatchNorm(3)
    layer.comm = "not a communicator"
    with pytest.raises(TypeError, match="comm must have an allgather.*got str"):
        layer(np.ones((4, 3), np.float32))
    assert layer.num_batches_tracked == 0


@pytest.mark.parametrize(
    "result",
    [lambda obj: None, lambda obj: [], lambda obj: obj, lambda obj: [obj[-1]], lambda obj: (obj, obj[:2])],
    ids=["None", "empty", "the object itself", "payloads alone", "a truncated object"],
)
def test_bad_allgather_result(result):
    class Comm:
        def allgather(self, obj):
            return result(obj)

    layer = SyncBatchNorm(3, comm=Comm())
    before = state(layer)
    with pytest.raises(TypeError, match="comm.allgather must return the list of every rank's object"):
        layer(np.ones((4, 3), np.float32))
    assert state(layer) == before and layer.num_batches_tracked == 0


def test_backward_needs_the_comm_of_its_synchronized_forward(rng):
    comm, (layer,), _ = make_layers(1, 3, np.float32, rng)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    layer(x)
    layer.comm = None
    with pytest.raises(RuntimeError, match="comm is None now"):
        layer.backward(x)
    assert layer.grad_weight is None and layer.update_threshold is None
    layer.comm = comm.rank(0)
    layer.backward(x)  # the saved forward still stands
    assert layer.grad_weight is not None


def assert_same_error(results, kind, *fragments):
    assert all(type(e) is kind for e in results), results
    assert len({str(e) for e in results}) == 1, results
    for fragment in fragments:
        assert fragment in str(results[0])


@pytest.mark.parametrize("buffers", [False, True], ids=["objects", "buffers"])
def test_ranks_disagree_on_channels(rng, buffers):
    comm = ThreadComm(2, buffers)
    layers = [SyncBatchNorm(3 + r, comm=comm.rank(r)) for r in range(2)]
    before = [state(layer) for layer in layers]
    results = run_ranks(2, lambda r: layers[r](rng.normal(size=(4, 3 + r)).astype(np.float32)))
    assert_same_error(results, ValueError, "num_features", "[3, 4]")
    assert [state(layer) for layer in layers] == before
    # With buffers: the headers disagree, so every rank sends its object instead of a payload.
    assert (comm.buffer_calls, comm.calls) == (([1, 1], [1, 1]) if buffers else ([0, 0], [1, 1]))


@pytest.mark.parametrize("buffers", [False, True], ids=["objects", "buffers"])
def test_ranks_disagree_on_dtype(rng, buffers):
    comm = ThreadComm(2, buffers)
    dtypes = [np.float32, np.float64]
    layers = [SyncBatchNorm(3, dtype=dtypes[r], comm=comm.rank(r)) for r in range(2)]
    results = run_ranks(2, lambda r: layers[r](rng.normal(size=(4, 3)).astype(dtypes[r])))
    assert_same_error(results, TypeError, "dtypes", "['float32', 'float64']")
    assert all(layer.num_batches_tracked == 0 for layer in layers)


@pytest.mark.parametrize("buffers", [False, True], ids=["objects", "buffers"])
def test_ranks_disagree_on_axis(rng, buffers):
    """Layers built with another feature axis on one rank, whose input has the same number
    of channels there: the same ValueError on every rank, nothing changed."""
    comm = ThreadComm(2, buffers)
    axes = [1, -1]
    layers = [SyncBatchNorm(3, axis=axes[r], comm=comm.rank(r)) for r in range(2)]
    before = [state(layer) for layer in layers]
    x = rng.normal(size=(2, 3, 4, 3)).astype(np.float32)
    results = run_ranks(2, lambda r: layers[r](x))
    assert_same_error(results, ValueError, "axis", "[1, -1]")
    assert [state(layer) for layer in layers] == before


@pytest.mark.parametrize("buffers", [False, True], ids=["objects", "buffers"])
@pytest.mark.parametrize(("momenta", "shown"), [((0.1, 0.2), "[0.1, 0.2]"), ((None, 0.1), "[None, 0.1]")])
def test_ranks_disagree_on_momentum(rng, buffers, momenta, shown):
    """Ranks updating their running statistics with different momenta would drift apart:
    the same ValueError on every rank, nothing changed."""
    comm = ThreadComm(2, buffers)
    layers = [SyncBatchNorm(3, momentum=momenta[r], comm=comm.rank(r)) for r in range(2)]
    before = [state(layer) for layer in layers]
    results = run_ranks(2, lambda r: layers[r](rng.normal(size=(4, 3)).astype(np.float32)))
    assert_same_error(results, ValueError, "momentum", shown)
    assert [state(layer) for layer in layers] == before


@pytest.mark.parametrize("buffers", [False, True], ids=["objects", "buffers"])
def test_cumulative_ranks_disagree_on_num_batches_tracked(rng, buffers):
    """With momentum=None the update's weight is 1 / num_batches_tracked, so ranks counting
    differently would end with different running statistics: the same ValueError on every
    rank, nothing changed, and the ranks go on once their counts agree."""
    _, layers, _ = make_layers(2, 4, np.float32, rng, buffers, momentum=None)
    x = rng.normal(3.0, 2.0, (5, 4)).astype(np.float32)
    unwrap(run_ranks(2, lambda r: layers[r](x)))
    layers[1].num_batches_tracked = 3
    before = [state(layer) for layer in layers]
    results = run_ranks(2, lambda r: layers[r](x))
    assert_same_error(results, ValueError, "num_batches_tracked", "[1, 3]")
    assert [state(layer) for layer in layers] == before
    layers[1].num_batches_tracked = 1
    unwrap(run_ranks(2, lambda r: layers[r](x)))
    assert [layer.num_batches_tracked for layer in layers] == [2, 2]
    assert layers[0].running_var.tobytes() == layers[1].running_var.tobytes()


@pytest.mark.parametrize("buffers", [False, True], ids=["objects", "buffers"])
def test_num_batches_tracked_may_differ_with_a_momentum(rng, buffers):
    """With a momentum the count does not enter the update (as in PyTorch): ranks whose
    counts differ train together and keep the same running statistics."""
    _, layers, _ = make_layers(2, 4, np.float32, rng, buffers)
    layers[1].num_batches_tracked = 5
    x = rng.normal(3.0, 2.0, (5, 4)).astype(np.float32)
    unwrap(run_ranks(2, lambda r: layers[r](x)))
    assert [layer.num_batches_tracked for layer in layers] == [1, 6]
    assert layers[0].running_var.tobytes() == layers[1].running_var.tobytes()


@pytest.mark.parametrize("buffers", [False, True], ids=["objects", "buffers"])
def test_bad_input_on_one_rank_raises_everywhere(rng, buffers):
    """A rank whose own input fails its checks still takes part in the exchange: every rank
    raises the same error naming it, and no rank hangs or changes anything."""
    _, layers, _ = make_layers(3, 4, np.float32, rng, buffers)
    before = [state(layer) for layer in layers]
    results = run_ranks(3, lambda r: layers[r](np.ones((3, 5 if r == 1 else 4), np.float32)))
    assert_same_error(results, ValueError, "forward failed on rank 1 of 3", "channels")
    assert isinstance(results[1].__cause__, ValueError)
    assert [state(layer) for layer in layers] == before


@pytest.mark.parametrize("buffers", [False, True], ids=["objects", "buffers"])
def test_bad_grad_output_on_one_rank_raises_everywhere(rng, buffers):
    _, layers, _ = make_layers(2, 4, np.float32, rng, buffers)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    unwrap(run_ranks(2, lambda r: layers[r](x)))
    results = run_ranks(2, lambda r: layers[r].backward(x if r == 0 else x[:2]))
    assert_same_error(results, ValueError, "backward failed on rank 1 of 2", "grad_output")
    assert all(layer.grad_weight is None and layer.update_threshold is None for layer in layers)
    # still in step
    unwrap(run_ranks(2, lambda r: layers[r].backward(x)))
    np.testing.assert_array_equal(layers[0].grad_weight, layers[1].grad_weight)


@pytest.mark.parametrize("buffers", [False, True], ids=["objects", "buffers"])
def test_ranks_in_different_steps(rng, buffers):
    """One rank calls forward while another calls backward: both stop."""
    _, layers, _ = make_layers(2, 4, np.float32, rng, buffers)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    unwrap(run_ranks(2, lambda r: layers[r](x)))
    results = run_ranks(2, lambda r: layers[r](x) if r == 0 else layers[r].backward(x))
    assert_same_error(results, RuntimeError, "steps", "['forward', 'backward']")
    assert all(layer.num_batches_tracked == 1 and layer.grad_weight is None for layer in layers)


def test_comm_reassigned_between_steps(rng):
    """A communicator assigned between steps serves from the next step on: an object one,
    then one with buffer methods (nothing of the first one's is reused), then None (a plain
    BatchNorm, exchanging nothing)."""
    lay = LAYOUTS[1]
    comm, layers, ref = make_layers(2, lay, np.float32, rng)
    step_and_compare(layers, ref, lay, (2, 4), np.float32, rng)
    buffered = ThreadComm(2, buffers=True)
    for r, layer in enumerate(layers):
        layer.comm = buffered.rank(r)
    step_and_compare(layers, ref, lay, (3, 1), np.float32, rng)
    assert comm.calls == [2, 2] and buffered.buffer_calls == [4, 4] and buffered.calls == [0, 0]
    x = rng.normal(size=lay.shape).astype(np.float32)
    for layer in layers:
        layer.comm = None
        np.testing.assert_array_equal(layer(x), ref(x))
    assert buffered.buffer_calls == [4, 4]


def test_pickle_drops_comm(rng):
    comm = ThreadComm(1).rank(0)
    layer = SyncBatchNorm(3, comm=comm)
    layer(rng.normal(size=(4, 3)).astype(np.float32))
    copy = pickle.loads(pickle.dumps(layer))
    assert type(copy) is SyncBatchNorm and copy.comm is None
    np.testing.assert_array_equal(copy.running_mean, layer.running_mean)
    assert copy.num_batches_tracked == 1
    assert repr(layer).startswith("SyncBatchNorm(3, ") and "comm=_RankComm" in repr(layer)
