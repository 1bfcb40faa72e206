"""float16 data on the CPU: float16 in and out, float32 parameters and running statistics
(PyTorch's mixed precision), float64 arithmetic, each output the float64 oracle correctly
rounded to float16 (to one float16 ulp: the kernels fold ``x * a + b`` where the oracle
divides), every layout, the variants, Dask arrays, and bad input refused with nothing
changed."""

import numpy as np
import pytest
from conftest import assert_bitwise, by_tag, layout_params, make_input, make_params
from reference import backward as ref_backward
from reference import forward as ref_forward

import numbabn
from numbabn.cpu import _half
from numbabn.cpu.activation import relu_grad_flat

F16, F32 = np.float16, np.float32


def assert_ulps(actual, expected64, ulps=1.0):
    """``actual`` (float16) within ``ulps`` float16 ulps of the float64 ``expected64``."""
    assert actual.dtype == np.float16
    expected16 = expected64.astype(F16)
    spacing = np.spacing(np.abs(expected16)).astype(np.float64)
    error = np.abs(actual.astype(np.float64) - expected16.astype(np.float64))
    finite = np.isfinite(expected64)
    assert np.all(error[finite] <= ulps * spacing[finite]), float(np.max(error[finite] / spacing[finite]))
    assert_bitwise(np.isnan(actual), np.isnan(expected16))


def test_conversions_round_correctly():
    """Every float16 widens exactly; float64 values round as NumPy rounds them (correctly),
    midpoints and their neighbours, subnormals, overflow and NaN included."""
    every = np.arange(1 << 16, dtype=np.uint16)
    out = np.empty(every.shape, np.uint16)
    relu_grad_flat(False, every, np.ones(every.shape, np.uint16) * 0x3C00, out)  # y = 1: out = g
    nan = np.isnan(every.view(F16))
    assert_bitwise(out[~nan], every[~nan])
    assert np.all(np.isnan(out[nan].view(F16)))
    rng = np.random.default_rng(0)
    halves = rng.integers(0, 0x7BFF, 20000).astype(np.uint16).view(F16).astype(np.float64)
    above = np.nextafter(halves.astype(F16), F16(np.inf)).astype(np.float64)
    mid = (halves + above) / 2
    v = np.concatenate(
        [
            mid,
            np.nextafter(mid, np.inf),
            np.nextafter(mid, -np.inf),
            -mid,
            rng.normal(size=20000) * 10.0 ** rng.integers(-9, 6, 20000),
            [0.0, -0.0, np.inf, -np.inf, 65504.0, 65519.999, 65520.0, 1e6, 2.0**-25, 2.0**-24, 1e-9],
        ]
    )
    y = np.empty(v.shape, F16)
    _put_all(v, y)
    with np.errstate(over="ignore"):
        assert_bitwise(y, v.astype(F16))


def _put_all(v, y):
    """``y[k] = v[k]`` through the kernels' ``put`` (float64 in, float16 out)."""
    from numba import njit

    @njit
    def run(v, bits):
        for k in range(v.shape[0]):
            _half.put(bits, k, v[k])

    run(v, y.view(np.uint16))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "lay",
    layout_params(
        by_tag("NC", "NCHW", "NHWC", "axis0", "fused-NCHW", "big-fused-NCHW", "big-NC", "big-NHWC", "big-NCL")
    ),
)
def test_forward_and_backward_match_the_oracle(rng, lay, training):
    x = make_input(rng, lay.shape, lay.axis, F16)
    w, b, rm, rv = make_params(rng, lay.channels, F32)
    g = rng.normal(size=lay.shape).astype(F16)
    rm1, rv1 = rm.copy(), rv.copy()
    y, mean, invstd = numbabn.batch_norm_forward(x, w, b, rm, rv, training=training, axis=lay.axis)
    y64, mean64, invstd64, rm64, rv64 = ref_forward(x, w, b, rm1, rv1, training, 0.1, 1e-5, lay.axis)
    assert y.dtype == F16 and mean.dtype == np.float64
    assert_ulps(y, y64)
    # Statistics of float16 data run in float32 lanes: within 1e-6 standard deviations.
    np.testing.assert_allclose(mean, mean64, rtol=0, atol=1e-6 * float(np.max(1 / invstd64)))
    assert rm.dtype == F32
    np.testing.assert_allclose(rm, rm64, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rv, rv64, rtol=1e-6, atol=1e-6)
    gi, gw, gb = numbabn.batch_norm_backward(g, x, w, mean, invstd, training=training, axis=lay.axis)
    gi64, gw64, gb64 = ref_backward(g, x, w, mean, invstd, training, lay.axis)
    assert gi.dtype == F16 and gw.dtype == F32 and gb.dtype == F32
    scale = float(np.abs(gi64).max())
    np.testing.assert_allclose(gi.astype(np.float64), gi64, rtol=1e-3, atol=1e-3 * scale)
    np.testing.assert_allclose(gw, gw64, rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(gw64).max())))
    np.testing.assert_allclose(gb, gb64, rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(gb64).max())))


def test_statistics_are_those_of_the_float16_values(rng):
    """float16 data widens exactly: its statistics are the float32 copy's, bit for bit."""
    x = make_input(rng, (64, 32, 9, 9), 1, F16)
    s16, s32 = numbabn.welford(x), numbabn.welford(x.astype(F32))
    assert s16.count == s32.count
    assert_bitwise(s16.mean, s32.mean)
    assert_bitwise(s16.m2, s32.m2)


def test_float32_layer_takes_float16_input(rng):
    x = make_input(rng, (16, 4, 6), 1, F16)
    bn = numbabn.BatchNorm(4)
    ref = numbabn.BatchNorm(4, dtype=np.float64)
    y = bn(x)
    y64 = ref(x.astype(np.float64))
    assert_ulps(y, y64)
    assert bn.running_mean.dtype == F32 and bn.num_batches_tracked == 1
    np.testing.assert_allclose(bn.running_var, ref.running_var, rtol=1e-6)
    gi = bn.backward(np.ones_like(y))
    assert gi.dtype == F16 and bn.grad_weight.dtype == F32
    bn.eval()
    assert_ulps(bn(x), ref.eval()(x.astype(np.float64)))


def test_matches_pytorch_float16_on_the_cpu(rng):
    torch = pytest.importorskip("torch")
    x = make_input(rng, (8, 6, 5, 5), 1, F16)
    g = rng.normal(size=x.shape).astype(F16)
    bn = numbabn.BatchNorm(6)
    y = bn(x)
    gi = bn.backward(g)
    tbn = torch.nn.BatchNorm2d(6)
    xt = torch.tensor(x, requires_grad=True)
    yt = tbn(xt)  # PyTorch's mixed mode: float16 data, float32 parameters
    yt.backward(torch.tensor(g))
    np.testing.assert_allclose(y.astype(np.float64), yt.detach().numpy().astype(np.float64), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(gi.astype(np.float64), xt.grad.numpy().astype(np.float64), atol=4e-3, rtol=4e-3)
    np.testing.assert_allclose(bn.running_var, tbn.running_var.numpy(), rtol=1e-5)


@pytest.mark.parametrize("variant", ["mask", "relu", "ghost", "ghost-minor", "renorm"])
def test_variants_take_float16(rng, variant):
    x = make_input(rng, (12, 5, 8), 1, F16)
    x64 = x.astype(np.float64)
    z = rng.normal(size=x.shape).astype(F16)
    if variant == "mask":
        mask = rng.random((12, 1, 8)) < 0.7
        y = numbabn.batch_norm_forward(x, mask=mask)[0]
        y64 = numbabn.batch_norm_forward(x64, mask=mask)[0]
    elif variant == "relu":
        y = numbabn.batch_norm_forward(x, activation="relu", residual=z)[0]
        y64 = numbabn.batch_norm_forward(x64, activation="relu", residual=z.astype(np.float64))[0]
    elif variant == "ghost":
        y = numbabn.BatchNorm(5, virtual_batch_size=5)(x)
        y64 = numbabn.BatchNorm(5, dtype=np.float64, virtual_batch_size=5)(x64)
    elif variant == "ghost-minor":  # (N, C): every ghost in one driver
        x = make_input(rng, (40, 5), 1, F16)
        layer = numbabn.BatchNorm(5, virtual_batch_size=8)
        y = layer(x)
        y64 = numbabn.BatchNorm(5, dtype=np.float64, virtual_batch_size=8)(x.astype(np.float64))
        gi = layer.backward(np.ones_like(y))
        assert gi.dtype == F16 and layer.grad_weight.dtype == F32
    else:
        layer = numbabn.BatchRenorm(5, rmax=1.5, dmax=0.5)
        layer.running_mean[...] = 1.0
        y = layer(x)
        ref = numbabn.BatchRenorm(5, rmax=1.5, dmax=0.5, dtype=np.float64)
        ref.running_mean[...] = 1.0
        y64 = ref(x64)
        gi = layer.backward(np.ones_like(y))
        assert gi.dtype == F16 and layer.grad_weight.dtype == F32
    assert_ulps(y, y64)


def test_dask_arrays_of_float16(rng):
    da = pytest.importorskip("dask.array")
    x = make_input(rng, (16, 4, 6), 1, F16)
    rm, rv = np.zeros(4, F32), np.ones(4, F32)
    expected = numbabn.batch_norm(x, rm.copy(), rv.copy(), training=True)
    y = numbabn.batch_norm(da.from_array(x, chunks=(5, 2, 6)), rm, rv, training=True)
    assert y.dtype == F16
    assert_ulps(y.compute(), expected.astype(np.float64), ulps=1)


def test_float16_parameters_are_refused_with_nothing_changed(rng):
    x = make_input(rng, (4, 3, 5), 1, F16)
    rm, rv = np.zeros(3, F32), np.ones(3, F32)
    with pytest.raises(
        TypeError, match=r"weight must have dtype float32 for float16 input \(float16 data takes float32"
    ):
        numbabn.batch_norm(x, rm, rv, np.ones(3, F16), None, training=True)
    with pytest.raises(TypeError, match=r"running_mean must have dtype float32 for float16 input"):
        numbabn.batch_norm(x, np.zeros(3, F16), rv, training=True)
    assert_bitwise(rm, np.zeros(3, F32))
    assert_bitwise(rv, np.ones(3, F32))
    with pytest.raises(TypeError, match=r"dtype must be float32 or float64 on device 'cpu', got float16"):
        numbabn.BatchNorm(3, dtype=F16)
    with pytest.raises(TypeError, match=r"input must have dtype float64 \(the layer's\), got float16"):
        numbabn.BatchNorm(3, dtype=np.float64)(x)
