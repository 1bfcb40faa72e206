"""numbabn's GPU launch layer (``numbabn.cuda._launch``) against a stub driver, without a GPU.

The layer is numba-cuda's real-GPU path, so these tests need numba with the simulator off;
under the simulator (the test suite's default) one test reruns this file in a subprocess
with ``NUMBA_ENABLE_CUDASIM=0``.  The stub replaces what needs a driver: the compiled-kernel
lookup, ``cuda.core.launch``, the stream conversion, numba's allocations and contexts.  Every
launch is recorded (kernel, packed arguments, grid, block, stream) and its arguments are
checked against numba-cuda's own argument preparation (``_Kernel._prepare_args``) of the
same arrays.

``python tests/test_cuda_launch.py`` prints the Python time of calls up to the driver.
"""

import ctypes
import itertools
import os
import subprocess
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")  # run as a script: the layer's own path

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numba import cuda  # noqa: E402

from numbabn.cuda._launch import SIMULATED  # noqa: E402

needs_real_numba = pytest.mark.skipif(
    SIMULATED, reason="the launch layer runs with the simulator off (test_launch_layer_with_the_simulator_off)"
)


def test_launch_layer_with_the_simulator_off():
    """This file's tests in a process with the simulator off (numba's real-GPU path, stubbed)."""
    if not SIMULATED:
        pytest.skip("the simulator is off here: this file's tests run in this process")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", NUMBABN_CUDA_LAUNCH="fast")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider", "-n", "0"]
    run = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-3000:]


# -- the stub driver --------------------------------------------------------------------------


class FakeMemory:
    """Device memory as numba's ``MemoryPointer`` shows it, at a made-up address."""

    _next = itertools.count(1)

    def __init__(self, nbytes, ptr=None):
        self.size = nbytes
        self.device_pointer = ptr if ptr is not None else (next(self._next) << 24)
        self.owner = self

    @property
    def device_ctypes_pointer(self):
        return ctypes.c_size_t(self.device_pointer)

    def view(self, start, stop=None):
        stop = self.size if stop is None else stop
        return FakeMemory(stop - start, self.device_pointer + start)


def device_array(shape, dtype=np.float64, strides=None, stream=0, ptr=None):
    """A numba ``DeviceNDArray`` over fake memory (C order unless ``strides``)."""
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    from numbabn.cuda._launch import c_strides

    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    dtype = np.dtype(dtype)
    strides = c_strides(shape, dtype.itemsize) if strides is None else tuple(strides)
    extent = sum((n - 1) * abs(s) for n, s in zip(shape, strides, strict=True)) + dtype.itemsize
    return DeviceNDArray(shape, strides, dtype, stream=stream, gpu_data=FakeMemory(max(extent, 1), ptr))


class FakeStream:
    def __init__(self, handle):
        self.handle = handle

    def __int__(self):
        return self.handle

    def __bool__(self):
        return bool(self.handle)


class Recorder:
    """What the stub driver saw: ``launches`` (name, argtypes, packed, grid, block, stream),
    ``compiled`` (name, argtypes), ``allocations`` (shapes).  A launch is kept as the driver
    received it (the stub adds as little as it can to the time of a call) and read as a
    namespace."""

    def __init__(self):
        self.raw, self.compiled, self.allocations = [], [], []

    @property
    def launches(self):
        return _Launches(self.raw)

    @property
    def names(self):
        return [launch.name for launch in self.launches]


class _Launches(list):
    def __init__(self, raw):
        super().__init__(
            SimpleNamespace(
                name=kernel.name, argtypes=kernel.argtypes, packed=args, grid=config.grid, block=config.block, stream=s
            )
            for s, config, kernel, args in raw
        )
        self.raw = raw

    def clear(self):
        self.raw.clear()
        super().clear()


@pytest.fixture
def stub(monkeypatch):
    from numbabn import cuda as backend
    from numbabn.cuda import _arrays, _launch

    rec = Recorder()

    def compiled(dispatcher, argtypes):
        rec.compiled.append((dispatcher.py_func.__name__, argtypes))
        return SimpleNamespace(name=dispatcher.py_func.__name__, argtypes=argtypes)

    def driver_launch(stream, config, kernel, args):
        rec.raw.append((stream, config, kernel, args))

    def fake_device_array(shape, dtype=np.float64, stream=0):
        rec.allocations.append(shape)
        return device_array(shape, dtype)

    def fake_to_device(host, stream=0):
        return device_array(np.shape(host), np.asarray(host).dtype)

    import contextlib

    from numba.cuda.cudadrv import devices

    context = object()
    monkeypatch.setattr(devices._runtime, "ensure_context", contextlib.nullcontext)
    monkeypatch.setattr(_launch, "FAST", True)
    monkeypatch.setattr(_launch, "compiled", compiled)
    monkeypatch.setattr(_launch, "driver_launch", driver_launch)
    monkeypatch.setattr(_launch, "core_stream", lambda s: int(s) if s else 0)
    monkeypatch.setattr(_launch, "_KERNELS", {})
    monkeypatch.setattr(cuda, "current_context", lambda: context)
    monkeypatch.setattr(cuda, "device_array", fake_device_array)
    monkeypatch.setattr(cuda, "to_device", fake_to_device)
    monkeypatch.setattr(cuda, "default_stream", lambda: FakeStream(0))
    monkeypatch.setattr(cuda, "external_stream", FakeStream)
    monkeypatch.setattr(backend, "_FOUND_DEVICE", True)
    monkeypatch.setattr(_arrays, "_FREE", {})
    monkeypatch.setattr(_arrays, "_RECORDED", {})
    monkeypatch.setattr(_arrays, "_WORKSPACES", {})
    monkeypatch.setattr(_arrays, "_DEFAULT_STREAM", [])
    monkeypatch.setattr(_arrays, "to_host", lambda a, stream: np.zeros(a.shape, a.dtype))
    _arrays._constant.cache_clear()
    _arrays._sink.cache_clear()
    yield rec
    _arrays._constant.cache_clear()
    _arrays._sink.cache_clear()


def numba_prepared(ty, array):
    """numba-cuda's own kernel arguments for ``array`` typed ``ty`` (``_Kernel._prepare_args``),
    as plain values."""
    from numba.cuda.dispatcher import _Kernel

    out = []
    _Kernel._prepare_args(SimpleNamespace(extensions=[]), ty, array, 0, [], out)
    return [getattr(v, "value", v) for v in out]


def check_against_numba(launch):
    """Each argument of a recorded launch, unpacked by its numba type, is what numba-cuda's
    argument preparation gives for a numba array of the same memory, shape and strides (and
    for the same scalar); returns the arrays' (ptr, shape, strides)."""
    from numba import types

    packed, arrays = list(launch.packed), []
    for ty in launch.argtypes:
        if isinstance(ty, types.Array):
            n = 5 + 2 * ty.ndim
            mine, packed = packed[:n], packed[n:]
            shape, strides = tuple(mine[5 : 5 + ty.ndim]), tuple(mine[5 + ty.ndim :])
            assert mine[3] == np.dtype(str(ty.dtype)).itemsize
            a = device_array(shape, np.dtype(str(ty.dtype)), strides, ptr=mine[4])
            assert a._numba_type_ == ty, (launch.name, a._numba_type_, ty)
            assert numba_prepared(ty, a) == mine, launch.name
            arrays.append((mine[4], shape, strides))
        else:
            value, packed = packed[0], packed[1:]
            assert numba_prepared(ty, value) == [value], (launch.name, ty, value)
    assert not packed, f"{launch.name}: {len(packed)} arguments left over"
    return arrays


# -- argument packing -------------------------------------------------------------------------

LAYOUT_CASES = [
    ((4, 3), None),  # C
    ((4, 3), (8, 32)),  # F (float64)
    ((4, 3), (48, 8)),  # rows padded: neither
    ((4, 3, 5), (120, 40, 8)),  # C, 3-D
    ((4, 1, 5), (40, 8, 8)),  # C with an odd stride on a length-1 axis
    ((1, 6), (8, 8)),  # both C and F: numba says C
    ((5, 3), (0, 8)),  # broadcast
    ((2, 3, 4), (8, 16, 48)),  # F, 3-D
    ((2, 3, 4), (96, 8, 24)),  # a permutation (channels-last-like): A
    ((7,), (16,)),  # 1-D strided
]


@needs_real_numba
@pytest.mark.parametrize("shape,strides", LAYOUT_CASES)
def test_arrays_pack_as_numba_prepares_them(shape, strides):
    from numbabn.cuda import _launch

    a = device_array(shape, np.float64, strides)
    d = _launch.describe(a)
    ty = a._numba_type_
    assert _launch.argtypes_of((d.sig,)) == (ty,)
    assert list(d.abi) == numba_prepared(ty, a)
    assert d.ptr == a.device_ctypes_pointer.value and d.shape == a.shape and d.strides == a.strides
    assert _launch.layout_of(shape, a.strides, 8) == ty.layout


@needs_real_numba
def test_layout_matches_numba_on_every_small_shape_and_stride():
    """``layout_of`` against numba's own flags, over all shapes and strides of up to 3 axes of
    lengths 0-3 and strides in {0, 4, 8, 16, 24, 48} (float32)."""
    from numba.cuda.cudadrv.dummyarray import Array as Dummy

    from numbabn.cuda._launch import layout_of

    for ndim in (1, 2, 3):
        for shape in itertools.product(range(4), repeat=ndim):
            for strides in itertools.product((0, 4, 8, 16, 24, 48), repeat=ndim):
                flags = Dummy.from_desc(0, shape, strides, 4).flags
                size = int(np.prod(shape))
                broadcast = 0 in strides and size != 0
                want = (
                    "C"
                    if flags["C_CONTIGUOUS"] and not broadcast
                    else "F"
                    if flags["F_CONTIGUOUS"] and not broadcast
                    else "A"
                )
                assert layout_of(shape, strides, 4) == want, (shape, strides)


@needs_real_numba
@pytest.mark.parametrize("value", [0.1, 3, True, False, np.float64(2.5)])
def test_scalars_pack_as_numba_prepares_them(value):
    from numba.core.typing.typeof import Purpose, typeof

    from numbabn.cuda import _launch

    (ty,) = _launch.argtypes_of((type(value),))
    assert ty == typeof(value, Purpose.argument)
    assert numba_prepared(ty, value) == [value]


@needs_real_numba
def test_one_compile_per_signature_and_the_launch_recorded(stub):
    from numbabn.cuda import _launch
    from numbabn.cuda import stats as S

    a, b = device_array(5), device_array(5)
    for _ in range(3):
        _launch.launch(S.copy_cast, (1,), (128,), FakeStream(7), a, 2.0, b)
    _launch.launch(S.copy_cast, (1,), (128,), 0, a, 2.0, device_array(5, np.float32))
    assert [name for name, _ in stub.compiled] == ["copy_cast", "copy_cast"]
    first = stub.launches[0]
    assert (first.grid, first.block, first.stream) == ((1, 1, 1), (128, 1, 1), 7)
    assert stub.launches[-1].stream == 0
    for launch in stub.launches:
        check_against_numba(launch)


# -- the drivers on the stub ------------------------------------------------------------------

# (shape, axis, memory order as numpy would make it): C (N, C), NCHW, channels-last (the
# channel axis fastest in memory), an F-ordered NCHW.
DRIVER_CASES = [((32, 64), 1, "C"), ((4, 8, 6, 40), 1, "C"), ((4, 6, 5, 16), -1, "C"), ((4, 8, 6, 40), 1, "F")]


def _input(shape, order, dtype=np.float32):
    itemsize = np.dtype(dtype).itemsize
    strides = np.empty(shape, dtype, order=order).strides
    assert itemsize
    return device_array(shape, dtype, strides)


@needs_real_numba
@pytest.mark.parametrize("shape,axis,order", DRIVER_CASES)
def test_forward_backward_launches(stub, monkeypatch, shape, axis, order):
    """Each stage's kernels, geometry (from ``_plan``), stream, and arguments as numba would
    prepare them; the input's memory is what the kernels read.  These arrays are small: a
    training forward is one launch, or three with CUDA_FUSE_ELEMS = 0."""
    import numbabn
    from numbabn import _config
    from numbabn.cuda import _arrays, _plan

    x, y, g = _input(shape, order), _input(shape, order), _input(shape, order)
    c = shape[axis]
    rm, rv, w = device_array(c, np.float32), device_array(c, np.float32), device_array(c, np.float32)
    x3 = _arrays.view3(x, axis % len(shape), _arrays.dense_order(x))
    p = _plan.plan(*x3.shape)
    strided, egrid, eblock = _plan.elementwise(*x3.shape)
    fam = "strided" if p.strided else "minor"
    xptr = x.device_ctypes_pointer.value
    three = [f"partials_{fam}", "finish_channels", "normalize_rows" if strided else "normalize_columns"]
    numbabn.batch_norm_forward(x, w, None, rm, rv, training=True, axis=axis, out=y, stream=5)
    if _plan.one_block(p, x3.size):
        assert stub.names == [f"train_{fam}"]
        (one,) = stub.launches
        assert one.grid[:2] == p.grid and one.block[:2] == (p.bx, p.by) and one.stream == 5
        arrays = check_against_numba(one)
        assert arrays[0][0] == xptr and arrays[-1][0] == y.device_ctypes_pointer.value
    else:  # short rows of several columns per channel (the F-ordered NCHW)
        assert p.q > 1 and stub.names == three

    stub.launches.clear()
    monkeypatch.setattr(_config, "CUDA_FUSE_ELEMS", 0)
    _, mean, invstd = numbabn.batch_norm_forward(x, w, None, rm, rv, training=True, axis=axis, out=y, stream=5)
    assert stub.names == three
    red, fin, norm = stub.launches
    assert red.grid[:2] == p.grid and red.block[:2] == (p.bx, p.by)
    assert fin.grid[0] == c and norm.grid[:2] == egrid and norm.block[:2] == eblock
    assert {launch.stream for launch in stub.launches} == {5}
    for launch in stub.launches:
        arrays = check_against_numba(launch)
        if launch is red or launch is norm:
            assert arrays[0][0] == xptr  # the input, viewed without a copy
    assert check_against_numba(norm)[-1][0] == y.device_ctypes_pointer.value

    stub.launches.clear()
    numbabn.batch_norm(x, rm, rv, w, None, False, axis=axis, out=y)
    assert stub.names == ["eval_channels", "normalize_rows" if strided else "normalize_columns"]
    assert {launch.stream for launch in stub.launches} == {0}
    for launch in stub.launches:
        check_against_numba(launch)

    stub.launches.clear()
    numbabn.batch_norm_backward(g, x, w, mean, invstd, axis=axis, out=y)
    assert stub.names == [f"grad_partials_{fam}", "grad_channels", "apply_rows" if strided else "apply_columns"]
    for launch in stub.launches:
        check_against_numba(launch)


@needs_real_numba
@pytest.mark.parametrize("shape,axis,order", DRIVER_CASES)
def test_sync_stages_launches(stub, shape, axis, order):
    """SyncBatchNorm's stages: the statistics (partials, then a channel merge), the forward
    on given statistics (their (3, C) upload as one partial per channel, then normalize),
    the gradient sums alone, the backward on given sums over the global count; all on the
    caller's stream, arguments as numba would prepare them."""
    import numbabn
    from numbabn import _call
    from numbabn.cuda import _arrays, _plan
    from numbabn.cuda import api as gpu

    x, y, g = _input(shape, order), _input(shape, order), _input(shape, order)
    c = shape[axis]
    rm, rv, w = device_array(c, np.float32), device_array(c, np.float32), device_array(c, np.float32)
    inp = _call.check_input(x, axis, 5)
    x3 = _arrays.view3(x, axis % len(shape), _arrays.dense_order(x))
    fam = "strided" if _plan.plan(*x3.shape).strided else "minor"
    strided = _plan.elementwise(*x3.shape)[0]
    payload = gpu.part_stats(inp)
    assert type(payload) is np.ndarray and payload.shape == (2 * c + 1,)
    count, mean, m2 = numbabn.Stats.from_array(payload)
    assert stub.names == [f"partials_{fam}", "channel_stats"] and mean.shape == (c,)
    stub.launches.clear()
    call = _call.forward_call(inp, w, None, rm, rv, True, 0.1, 1e-5, y, part=True)
    _, save_mean, save_invstd = gpu.forward_with_stats(call, np.stack([np.full(c, 3.0 * count), mean, m2]))
    assert stub.names == ["finish_channels", "normalize_rows" if strided else "normalize_columns"]
    part = check_against_numba(stub.launches[0])[0]
    assert part[1] == (3, 1, c) and stub.launches[0].packed[11] == 1  # the statistics, q = 1
    stub.launches.clear()
    bcall = _call.backward_call(inp, g, w, save_mean, save_invstd, True, y)
    sums = gpu.part_sums(bcall)
    assert type(sums) is np.ndarray and sums.shape == (3, c)
    assert stub.names == [f"grad_partials_{fam}", "grad_sums"]
    gpu.backward_with_sums(bcall, sums, 3 * count)
    assert stub.names[2:] == ["grad_channels", "apply_rows" if strided else "apply_columns"]
    assert stub.launches[2].packed[11:13] == (1, float(3 * count))  # q = 1, the global n
    for launch in stub.launches:
        check_against_numba(launch)
        assert launch.stream == 5


@needs_real_numba
@pytest.mark.parametrize("shape,axis,order", DRIVER_CASES)
def test_masked_launches(stub, shape, axis, order):
    """Masked calls: the masked statistics, the finish and normalize of the plain forward;
    the plain gradient sums, then the coefficients and the masked elementwise pass; the
    mask (a NumPy one, copied to the device; or a device one, counted on the device first)
    a 2-D bool array in the input's memory order, all as numba would prepare them.  SyncBatchNorm's
    stages take it too.  (The stub's device-to-host copies read zeros: a device mask counts
    0 here, an empty batch, whose output is x * NaN + NaN.)"""
    import numbabn
    from numbabn import _call
    from numbabn.cuda import _arrays, _plan
    from numbabn.cuda import api as gpu

    x, y, g = _input(shape, order), _input(shape, order), _input(shape, order)
    c = shape[axis]
    rm, rv, w = device_array(c, np.float32), device_array(c, np.float32), device_array(c, np.float32)
    x3 = _arrays.view3(x, axis % len(shape), _arrays.dense_order(x))
    outer, _, inner = x3.shape
    fam = "strided" if _plan.plan(*x3.shape).strided else "minor"
    apply = "rows" if _plan.elementwise(*x3.shape)[0] else "columns"
    mshape = tuple(1 if a == axis % len(shape) else n for a, n in enumerate(shape))
    mask = np.ones(mshape, bool)
    mask.flat[::3] = False
    _, mean, invstd = numbabn.batch_norm_forward(x, w, None, rm, rv, axis=axis, out=y, stream=5, mask=mask)
    assert stub.names == [f"masked_partials_{fam}", "finish_channels", f"normalize_{apply}"]
    mk = check_against_numba(stub.launches[0])[1]
    assert mk[1:] == ((outer, inner), (inner, 1)) and stub.launches[0].argtypes[1].dtype.name == "bool"
    stub.launches.clear()
    numbabn.batch_norm_backward(g, x, w, mean, invstd, axis=axis, out=y, stream=5, mask=mask)
    assert stub.names == [f"grad_partials_{fam}", "grad_sums", "grad_channels", f"apply_{apply}_masked"]
    assert stub.launches[2].packed[11:13] == (1, float(mask.sum()))  # q = 1, the kept count
    for launch in stub.launches:
        check_against_numba(launch)
        assert launch.stream == 5

    stub.launches.clear()
    inp = _call.check_input(x, axis, 5)
    call = _call.forward_call(inp, w, None, rm, rv, True, 0.1, 1e-5, y, part=True, mask=mask)
    payload = gpu.part_stats(inp, call.mask, call.kept)
    assert stub.names == [f"masked_partials_{fam}", "channel_stats"] and payload[0] == mask.sum()
    stub.launches.clear()
    bcall = _call.backward_call(inp, g, w, mean, invstd, True, y, mask=mask)
    gpu.backward_with_sums(bcall, np.zeros((3, c)), 40.0)
    assert stub.names == ["grad_channels", f"apply_{apply}_masked"]
    assert stub.launches[0].packed[11:13] == (1, 40.0)  # q = 1, the global kept count

    stub.launches.clear()
    device_mask = device_array(mshape, np.bool_, np.ones(mshape, bool, order=order).strides)
    numbabn.batch_norm_forward(x, w, None, rm, rv, axis=axis, out=y, stream=5, mask=device_mask)
    assert stub.names == ["count_true", f"normalize_{apply}"]
    flat = check_against_numba(stub.launches[0])[0]
    assert flat[0] == device_mask.device_ctypes_pointer.value and flat[1:] == ((outer * inner,), (1,))
    for launch in stub.launches:
        check_against_numba(launch)
        assert launch.stream == 5


@needs_real_numba
@pytest.mark.parametrize("shape,dtype", [((2, 64), np.float64), ((3, 5), np.float32), ((2, 1), np.float64)])
def test_rows_are_numba_rows(stub, shape, dtype):
    """``_arrays.rows(a)`` gives what numba's ``a[i]`` gives, without numba's indexing."""
    from numbabn.cuda import _arrays

    a = device_array(shape, dtype, stream=FakeStream(3))
    for i, row in enumerate(_arrays.rows(a)):
        want = a[i]
        assert type(row) is type(want) and row.stream is want.stream
        assert row.__cuda_array_interface__ == want.__cuda_array_interface__
        assert (row.shape, row.strides, row.dtype, row.size) == (want.shape, want.strides, want.dtype, want.size)
        assert row.gpu_data.size == want.gpu_data.size and row._numba_type_ == want._numba_type_


@needs_real_numba
def test_repeated_calls_compile_nothing_and_reuse_work_arrays(stub):
    """After the first call: no compiled-kernel lookup, no work-array allocation; the only
    allocation is the saved (mean, invstd) that batch_norm_forward returns (batch_norm
    discards them: none)."""
    import numbabn
    from numbabn.cuda import _arrays

    x, y = _input((32, 64), "C"), _input((32, 64), "C")
    rm, rv = device_array(64, np.float32), device_array(64, np.float32)
    numbabn.batch_norm(x, rm, rv, None, None, True, out=y)
    compiled, allocations = len(stub.compiled), len(stub.allocations)
    for _ in range(5):
        numbabn.batch_norm(x, rm, rv, None, None, True, out=y)
    assert len(stub.compiled) == compiled == 1  # the one-launch training forward
    assert stub.allocations[allocations:] == []
    for _ in range(3):
        numbabn.batch_norm_forward(x, None, None, rm, rv, training=True, out=y)
    assert stub.allocations[allocations:] == [(2, 64)] * 3  # the returned (mean, invstd) only
    assert len(_arrays._RECORDED) == 1 and len(stub.launches) == 9  # one recording, replayed


@needs_real_numba
def test_calls_in_flight_at_once_take_different_workspaces(stub, monkeypatch):
    """A call started while another holds its workspace (host threads on one stream) takes
    another; both go back to the stream's free list."""
    import numbabn
    from numbabn.cuda import _arrays, _launch

    x, y = _input((32, 64), "C"), _input((32, 64), "C")
    rm, rv = device_array(64, np.float32), device_array(64, np.float32)
    numbabn.batch_norm(x, rm, rv, None, None, True, out=y)  # recorded, one workspace made
    seen, real = [], _launch.driver_launch

    def launch(stream, config, kernel, args):
        seen.append(args)
        if len(seen) == 1:  # a second call while the first is between taking and returning
            numbabn.batch_norm(x, rm, rv, None, None, True, out=y)
        real(stream, config, kernel, args)

    monkeypatch.setattr(_launch, "driver_launch", launch)
    numbabn.batch_norm(x, rm, rv, None, None, True, out=y)
    part = 11 + 4  # train_minor's arguments: x (3-D, 11 values), then part, whose data is its 5th
    assert len(seen) == 2 and seen[0][part] != seen[1][part]
    (free,) = _arrays._WORKSPACES.values()
    assert len(free) == 2


@needs_real_numba
def test_a_recording_per_stream_and_tunables_and_the_values_of_each_call(stub, monkeypatch):
    """A replay launches on its own call's stream with its own call's pointers and floats; a
    new stream or new tunables make a new recording (the tunables fix the geometry)."""
    import numbabn
    from numbabn import _config
    from numbabn.cuda import _arrays

    x, y = _input((32, 64), "C"), _input((32, 64), "C")
    x2, y2 = _input((32, 64), "C"), _input((32, 64), "C")
    rm, rv = device_array(64, np.float32), device_array(64, np.float32)
    numbabn.batch_norm(x, rm, rv, None, None, True, momentum=0.1, out=y, stream=3)
    numbabn.batch_norm(x2, rm, rv, None, None, True, momentum=0.25, out=y2, stream=4)
    first, second = stub.launches
    assert (first.stream, second.stream) == (3, 4) and len(_arrays._RECORDED) == 2
    for launch, a, b, momentum in ((first, x, y, 0.1), (second, x2, y2, 0.25)):
        arrays = check_against_numba(launch)
        assert arrays[0][0] == a.device_ctypes_pointer.value and arrays[-1][0] == b.device_ctypes_pointer.value
        assert momentum in launch.packed
    numbabn.batch_norm(x2, rm, rv, None, None, True, out=y2, stream=4)
    assert len(_arrays._RECORDED) == 2  # replayed
    monkeypatch.setattr(_config, "CUDA_THREADS", 128)
    numbabn.batch_norm(x2, rm, rv, None, None, True, out=y2, stream=4)
    assert len(_arrays._RECORDED) == 3 and stub.launches[-1].block[:2] == (32, 4)


@needs_real_numba
def test_a_recorded_driver_cannot_read_a_per_call_value(stub):
    """Pointers and float arguments are placeholders while a driver is recorded: a driver
    that branched on one would be wrong for the next call, so reading one raises."""
    from numbabn.cuda import _arrays, _launch

    slot = _launch.Slot(0)
    for read in (bool, float, int, lambda v: v < 1.0):
        with pytest.raises(TypeError, match="per-call value"):
            read(slot)

    @_arrays.one_call
    def branches(x3, eps, stream):
        if eps > 0.5:
            pass

    with pytest.raises(TypeError, match="per-call value"):
        branches(_launch.Dev(1 << 24, (2, 3, 1), (24, 8, 8), np.dtype("f8")), 0.1, 0)


@needs_real_numba
def test_numba_mode_is_read_from_the_environment():
    code = "from numbabn.cuda import _launch; print(_launch.MODE, _launch.FAST)"
    for mode, want in (("numba", "numba False"), ("fast", "fast True"), ("", "fast True")):
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", NUMBABN_CUDA_LAUNCH=mode)
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert run.stdout.strip() == want, run.stderr
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", NUMBABN_CUDA_LAUNCH="cupy")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "NUMBABN_CUDA_LAUNCH must be 'fast' or 'numba'" in run.stderr


# -- the disk cache ---------------------------------------------------------------------------


ALL_KERNELS = {
    "stats": ("partials_strided", "partials_minor", "channel_stats", "merge_channels", "copy_cast"),
    "forward": (
        "finish_channels",
        "eval_channels",
        "normalize_rows",
        "normalize_columns",
        "train_strided",
        "train_minor",
    ),
    "backward": (
        "grad_partials_strided",
        "grad_partials_minor",
        "grad_sums",
        "grad_channels",
        "apply_rows",
        "apply_columns",
    ),
    "masked": (
        "masked_partials_strided",
        "masked_partials_minor",
        "apply_rows_masked",
        "apply_columns_masked",
        "count_true",
    ),
}


@needs_real_numba
def test_every_kernel_is_cached_on_disk_keyed_by_numbabn_sources():
    import importlib

    from numbabn.cuda import _launch

    codegen = SimpleNamespace(magic_tuple=lambda: ((13, 0), (9, 0)))
    for module, names in ALL_KERNELS.items():
        m = importlib.import_module(f"numbabn.cuda.{module}")
        for name in names:
            cache = getattr(m, name)._cache
            assert type(cache).__name__ == "KernelCache", name
            key = cache._index_key((), codegen)
            assert key[-1] == ("numbabn-sources", _launch.sources_hash()) and key[1] == ((13, 0), (9, 0))


@needs_real_numba
def test_sources_hash_changes_with_any_source(tmp_path):
    from numbabn.cuda._launch import sources_hash

    names = ("a.py", "b.py")
    for n in names:
        (tmp_path / n).write_text("x = 1\n")
    before = sources_hash(str(tmp_path), names)
    (tmp_path / "b.py").write_text("x = 2\n")
    sources_hash.cache_clear()
    assert sources_hash(str(tmp_path), names) != before


@needs_real_numba
def test_cache_can_be_turned_off():
    code = "from numbabn.cuda import stats; print(type(stats.partials_minor._cache).__name__)"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", NUMBABN_CUDA_CACHE="0")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "NullCache", run.stderr


# -- Python time up to the driver -------------------------------------------------------------


def stub_timing(n=2000):
    """Microseconds of Python per call with the stub driver: the whole training forward call
    on (32, 64) float32 (``numbabn.batch_norm`` with running stats and ``out=``), the eval
    forward and the backward (``out=``; the gradients of weight and bias returned), its driver
    alone (``cuda.forward.forward_train`` on prepared views), and one launch through the
    layer."""
    import numbabn
    from numbabn.cuda import _arrays
    from numbabn.cuda import forward as F
    from numbabn.cuda import stats as S

    x, y = _input((32, 64), "C"), _input((32, 64), "C")
    rm, rv = device_array(64, np.float32), device_array(64, np.float32)
    w, b = device_array(64, np.float32), device_array(64, np.float32)
    x3, y3 = _arrays.view3(x, 1, [0, 1]), _arrays.view3(y, 1, [0, 1])
    save = device_array((2, 64))
    a, d = device_array(64), device_array(64, np.float32)
    stream = FakeStream(0)
    _, mean, invstd = numbabn.batch_norm_forward(x, w, b, rm, rv, training=True)
    rows = {
        "training forward, whole call": lambda: numbabn.batch_norm(x, rm, rv, w, b, True, out=y),
        "eval forward, whole call": lambda: numbabn.batch_norm(x, rm, rv, w, b, False, out=y),
        "backward, whole call": lambda: numbabn.batch_norm_backward(y, x, w, mean, invstd, out=x),
        "training forward, driver only": lambda: F.forward_train(x3, w, b, rm, rv, 0.1, 1e-5, y3, save, stream),
        "one launch (3 arguments)": lambda: _arrays.launch(S.copy_cast, 1, 128, stream, a, 2.0, d),
    }
    out = {}
    for name, f in rows.items():
        f()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                f()
            best = min(best, (time.perf_counter() - t) / n * 1e6)
        out[name] = best
    return out


@needs_real_numba
def test_print_python_time_up_to_the_driver(stub, capsys):
    """Prints the figures (``pytest -s``); a figure, not a timed assertion."""
    times = stub_timing(200)
    with capsys.disabled():
        print("\nstub driver, us of Python per call: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    assert all(v > 0 for v in times.values())
    assert len(stub.compiled) >= 4  # the calls went through the layer


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider", "-n", "0", "-s", "-k", "print_python_time"]))
