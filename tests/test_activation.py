"""The fused activation and residual add, ``y = relu(bn(x) + residual)``: the float64
composition as the oracle, PyTorch autograd for the gradients, every layout and dtype, the
variants and backends that take them, and bad input refused with nothing changed."""

import numpy as np
import pytest
from conftest import (
    assert_bitwise,
    assert_close,
    by_tag,
    channel_shape,
    layout_params,
    make_case,
    make_input,
    make_params,
)
from reference import backward as ref_backward
from reference import forward as ref_forward
from test_sync import ThreadComm, run_ranks, unwrap

import numbabn

MODES = [
    pytest.param(("relu", False), id="relu"),
    pytest.param((None, True), id="residual"),
    pytest.param(("relu", True), id="residual-relu"),
]


def composed(y64, z, activation):
    """The float64 oracle of the fused forms: ``act(y64 + z)``."""
    v = y64 if z is None else y64 + z.astype(np.float64)
    return np.maximum(v, 0.0) if activation == "relu" else v


def residual_for(rng, x, with_residual):
    return rng.normal(0.0, 1.0, x.shape).astype(x.dtype) if with_residual else None


#: Every layout with the residual and the ReLU (every stage of the activated kernels runs);
#: the common layouts in every mode and dtype.
FORWARD_CASES = [
    pytest.param(lay.values[0], np.float32, ("relu", True), id=f"{lay.id}-float32-residual-relu")
    for lay in layout_params()
] + [
    pytest.param(lay.values[0], dtype, mode.values[0], id=f"{lay.id}-{np.dtype(dtype).name}-{mode.id}")
    for lay in layout_params(by_tag("NC", "NCHW", "NHWC", "fused-NCHW", "big-NC"))
    for dtype in (np.float32, np.float64)
    for mode in MODES
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("lay", "dtype", "mode"), FORWARD_CASES)
def test_forward_matches_the_composition(rng, lay, dtype, training, mode):
    activation, with_residual = mode
    x, w, b, rm, rv = make_case(rng, lay, dtype, True)
    z = residual_for(rng, x, with_residual)
    rm1, rv1 = rm.copy(), rv.copy()
    settings = dict(training=training, axis=lay.axis)
    y, mean, invstd = numbabn.batch_norm_forward(x, w, b, rm, rv, **settings, activation=activation, residual=z)
    y64, mean64, invstd64, rm64, rv64 = ref_forward(x, w, b, rm1, rv1, training, 0.1, 1e-5, lay.axis)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, composed(y64, z, activation), dtype)
    # The statistics and the running-statistics update are batch norm's own, bit for bit.
    plain, mean_p, invstd_p = numbabn.batch_norm_forward(x, w, b, rm1, rv1, **settings)
    assert_bitwise(mean, mean_p)
    assert_bitwise(invstd, invstd_p)
    assert_bitwise(rm, rm1)
    assert_bitwise(rv, rv1)
    if not with_residual:  # rounding commutes with the ReLU: exactly the plain output's ReLU
        assert_bitwise(y, np.maximum(plain, dtype(0)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lay", layout_params(by_tag("NCHW", "NC", "NHWC", "axis0", "big-fused-NCHW", "big-NC")))
def test_backward_matches_the_oracle(rng, lay, dtype, mode):
    activation, with_residual = mode
    x, w, b, rm, rv = make_case(rng, lay, dtype, True)
    z = residual_for(rng, x, with_residual)
    g = rng.normal(0.0, 1.0, x.shape).astype(dtype)
    y, mean, invstd = numbabn.batch_norm_forward(x, w, b, axis=lay.axis, activation=activation, residual=z)
    output = y if activation else None
    grads = numbabn.batch_norm_backward(
        g, x, w, mean, invstd, axis=lay.axis, activation=activation, output=output, residual=with_residual
    )
    assert len(grads) == 3 + with_residual
    # The gradient reaching batch norm: g where the output is positive (with a ReLU).
    g_bn = np.where(y > 0, g, 0).astype(dtype) if activation else g
    expected = ref_backward(g_bn, x, w, mean, invstd, True, lay.axis)
    for actual, exact in zip(grads[:3], expected, strict=True):
        assert_close(actual, exact, dtype, scale=max(1.0, float(np.abs(exact).max())))
    if with_residual:
        assert_bitwise(grads[3], g_bn)
        if not activation:
            assert grads[3] is g  # the residual's gradient is grad_output itself


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("shape", "axis"), [((6, 5, 4, 4), 1), ((16, 7), 1), ((4, 3, 3, 6), -1)])
def test_gradients_match_pytorch_autograd(rng, shape, axis, mode):
    torch = pytest.importorskip("torch")
    activation, with_residual = mode
    x = make_input(rng, shape, axis, np.float64)
    w, b, _, _ = make_params(rng, shape[axis], np.float64)
    z = residual_for(rng, x, with_residual)
    g = rng.normal(0.0, 1.0, shape)
    # numbabn: the layer, channels-last through its axis.
    bn = numbabn.BatchNorm(shape[axis], axis=axis, dtype=np.float64, activation=activation)
    bn.weight[...], bn.bias[...] = w, b
    y = bn(x, z)
    gx = bn.backward(g)
    # PyTorch: batch_norm on channels-first tensors, the same formula.
    perm = (0, x.ndim - 1, *range(1, x.ndim - 1)) if axis == -1 else tuple(range(x.ndim))
    xt = torch.tensor(x.transpose(perm), requires_grad=True)
    wt, bt = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    zt = torch.tensor(z.transpose(perm), requires_grad=True) if with_residual else None
    yt = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True, eps=1e-5)
    if with_residual:
        yt = yt + zt
    if activation:
        yt = torch.relu(yt)
    yt.backward(torch.tensor(g.transpose(perm)))
    back = np.argsort(perm)
    np.testing.assert_allclose(y, yt.detach().numpy().transpose(back), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gx, xt.grad.numpy().transpose(back), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(bn.grad_weight, wt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(bn.grad_bias, bt.grad.numpy(), rtol=1e-10, atol=1e-10)
    if with_residual:
        np.testing.assert_allclose(bn.grad_residual, zt.grad.numpy().transpose(back), rtol=1e-12, atol=1e-12)
    else:
        assert bn.grad_residual is None


def test_layer_eval_and_repr(rng):
    x = make_input(rng, (8, 4, 5), 1, np.float32)
    z = rng.normal(size=x.shape).astype(np.float32)
    bn = numbabn.BatchNorm(4, activation="relu")
    assert repr(bn).endswith("activation='relu')")
    bn(x, z)
    bn.eval()
    y = bn(x, z)
    plain = numbabn.BatchNorm(4)
    plain.load_state_dict(bn.state_dict())
    plain.eval()
    y64 = plain(x).astype(np.float64)  # eval: y = x * a + b rounded, then the fused add
    np.testing.assert_allclose(y, np.maximum(y64 + z, 0), rtol=0, atol=1e-6)
    g = np.ones_like(y)
    gx = bn.backward(g)
    assert_close(
        gx, np.where(y > 0, 1.0, 0.0) * (bn.weight / np.sqrt(bn.running_var + 1e-5)).reshape(1, 4, 1), np.float32
    )


def test_relu_keeps_nan_and_its_gradient_passes_it(rng):
    x = make_input(rng, (6, 3, 8), 1, np.float64)
    x[0, 1, 2] = np.nan  # channel 1's statistics are NaN: its outputs too
    y, mean, invstd = numbabn.batch_norm_forward(x, activation="relu")
    assert np.all(np.isnan(y[:, 1])) and not np.any(np.isnan(y[:, [0, 2]]))
    g = np.ones_like(x)
    gx, *_ = numbabn.batch_norm_backward(g, x, None, mean, invstd, activation="relu", output=y)
    assert not np.any(np.isnan(gx[:, 0]))


@pytest.mark.parametrize("mode", MODES)
def test_out_may_be_the_residual(rng, mode):
    activation, _ = mode
    x = make_input(rng, (4, 32, 6, 6), 1, np.float32)
    z = rng.normal(size=x.shape).astype(np.float32)
    expected = numbabn.batch_norm(x, None, None, training=True, activation=activation, residual=z)
    y = numbabn.batch_norm(x, None, None, training=True, activation=activation, residual=z, out=z)
    assert y is z
    assert_bitwise(y, expected)


@pytest.mark.parametrize("mode", MODES)
def test_masked_statistics_with_activation(rng, mode):
    activation, with_residual = mode
    x = make_input(rng, (6, 4, 10), 1, np.float32)
    mask = rng.random((6, 1, 10)) < 0.6
    z = residual_for(rng, x, with_residual)
    y, mean, invstd = numbabn.batch_norm_forward(x, mask=mask, activation=activation, residual=z)
    plain, mean_p, invstd_p = numbabn.batch_norm_forward(x, mask=mask)
    assert_bitwise(mean, mean_p)
    cs = channel_shape(3, 1)
    y64 = (x - mean.reshape(cs)) * invstd.reshape(cs)
    assert_close(y, composed(y64, z, activation), np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    out = y if activation else None
    gx, gw, gb = numbabn.batch_norm_backward(g, x, None, mean, invstd, mask=mask, activation=activation, output=out)
    g_bn = np.where(y > 0, g, 0).astype(np.float32) if activation else g
    assert_bitwise(gx, numbabn.batch_norm_backward(g_bn, x, None, mean, invstd, mask=mask)[0])


@pytest.mark.parametrize("mode", MODES)
def test_ghost_batches_with_activation(rng, mode):
    activation, with_residual = mode
    x = make_input(rng, (10, 3, 4, 4), 1, np.float64)
    z = residual_for(rng, x, with_residual)
    bn = numbabn.BatchNorm(3, dtype=np.float64, virtual_batch_size=4, activation=activation)
    y = bn(x, z)
    for i0 in range(0, 10, 4):
        part = slice(i0, min(10, i0 + 4))
        y64 = ref_forward(x[part], None, None, None, None, True, 0.1, 1e-5)[0]
        assert_close(y[part], composed(y64, None if z is None else z[part], activation), np.float64)
    g = rng.normal(size=x.shape)
    gx = bn.backward(g)
    plain = numbabn.BatchNorm(3, dtype=np.float64, virtual_batch_size=4)
    plain(x)
    g_bn = np.where(y > 0, g, 0.0) if activation else g
    assert_bitwise(gx, plain.backward(g_bn))
    assert_bitwise(bn.grad_weight, plain.grad_weight)


def test_batch_renorm_with_activation(rng):
    x = make_input(rng, (8, 5, 6), 1, np.float32)
    z = rng.normal(size=x.shape).astype(np.float32)
    rn = numbabn.BatchRenorm(5, rmax=1.5, dmax=0.5, activation="relu")
    rn.running_mean[...] = 1.0
    plain = numbabn.BatchRenorm(5, rmax=1.5, dmax=0.5)
    plain.running_mean[...] = 1.0
    y = rn(x, z)
    y_plain = plain(x).astype(np.float64)
    np.testing.assert_allclose(y, np.maximum(y_plain + z, 0), rtol=0, atol=2e-6)
    assert_bitwise(rn.running_var, plain.running_var)
    g = rng.normal(size=x.shape).astype(np.float32)
    gx = rn.backward(g)
    assert_bitwise(gx, plain.backward(np.where(y > 0, g, 0).astype(np.float32)))
    assert_bitwise(rn.grad_residual, np.where(y > 0, g, 0).astype(np.float32))
    # The functional form, with the factors the layer used.
    rm, rv = np.ones(5, np.float32), np.ones(5, np.float32)
    yf, mean, invstd, r, d = numbabn.batch_renorm_forward(x, None, None, rm, rv, activation="relu", residual=z)
    gxf, gw, gb, gz = numbabn.batch_renorm_backward(
        g, x, None, mean, invstd, r, d, activation="relu", output=yf, residual=True
    )
    assert_bitwise(gz, np.where(yf > 0, g, 0).astype(np.float32))


def test_sync_batchnorm_with_activation_matches_one_process(rng):
    x = make_input(rng, (12, 4, 5), 1, np.float64)
    z = rng.normal(size=x.shape)
    g = rng.normal(size=x.shape)
    whole = numbabn.BatchNorm(4, dtype=np.float64, activation="relu")
    y = whole(x, z)
    gx = whole.backward(g)
    comm = ThreadComm(2)
    parts = [slice(0, 5), slice(5, 12)]

    def rank(r):
        bn = numbabn.SyncBatchNorm(4, dtype=np.float64, activation="relu", comm=comm.rank(r))
        yr = bn(x[parts[r]], z[parts[r]])
        return yr, bn.backward(g[parts[r]]), bn.grad_weight, bn.grad_residual

    results = unwrap(run_ranks(2, rank))
    np.testing.assert_allclose(np.concatenate([r[0] for r in results]), y, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), gx, rtol=1e-12, atol=1e-12)
    assert_bitwise(results[0][2], results[1][2])  # the global batch's, on every rank
    np.testing.assert_allclose(results[0][2], whole.grad_weight, rtol=1e-12)
    assert_bitwise(np.concatenate([r[3] for r in results]), whole.grad_residual)


@pytest.mark.parametrize("mode", MODES)
def test_dask_arrays_match_the_host(rng, mode):
    da = pytest.importorskip("dask.array")
    activation, with_residual = mode
    x = make_input(rng, (12, 6, 8), 1, np.float32)
    z = residual_for(rng, x, with_residual)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    expected, mean, invstd = numbabn.batch_norm_forward(
        x, None, None, rm.copy(), rv.copy(), activation=activation, residual=z
    )
    xd = da.from_array(x, chunks=(5, 3, 8))
    zd = None if z is None else da.from_array(z, chunks=(4, 6, 8))  # rechunked to x's chunks
    yd, mean_d, invstd_d = numbabn.batch_norm_forward(xd, None, None, rm, rv, activation=activation, residual=zd)
    np.testing.assert_allclose(yd.compute(), expected, rtol=0, atol=1e-6)
    g = rng.normal(size=x.shape).astype(np.float32)
    out = expected if activation else None
    host = numbabn.batch_norm_backward(g, x, None, mean, invstd, activation=activation, output=out, residual=True)
    outd = da.from_array(expected, chunks=(5, 3, 8)) if activation else None
    lazy = numbabn.batch_norm_backward(
        da.from_array(g, chunks=(5, 3, 8)),
        xd,
        None,
        mean_d,
        invstd_d,
        activation=activation,
        output=outd,
        residual=True,
    )
    np.testing.assert_allclose(lazy[0].compute(), host[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lazy[3]), host[3], rtol=0, atol=0)


# -- bad input ------------------------------------------------------------------------------


def _state(bn):
    return [a.copy() for a in (bn.weight, bn.bias, bn.running_mean, bn.running_var)] + [bn.num_batches_tracked]


def _same_state(bn, before):
    for a, b in zip(_state(bn), before, strict=True):
        assert_bitwise(a, b) if isinstance(a, np.ndarray) else (a == b or pytest.fail(f"{a} != {b}"))


@pytest.mark.parametrize("activation", ["gelu", "ReLU", 1, True])
def test_unknown_activation_is_refused(rng, activation):
    with pytest.raises(ValueError, match=r"activation must be None or 'relu', got"):
        numbabn.BatchNorm(3, activation=activation)
    x = make_input(rng, (4, 3, 5), 1, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"activation must be None or 'relu'"):
        numbabn.batch_norm(x, rm, rv, training=True, activation=activation)
    assert_bitwise(rm, np.zeros(3, np.float32))


@pytest.mark.parametrize(
    ("residual", "error", "match"),
    [
        (np.zeros((4, 3, 6), np.float32), ValueError, r"residual must have shape \(4, 3, 5\)"),
        (np.zeros((4, 3, 5), np.float64), TypeError, r"residual must have dtype float32"),
        ([[0.0]], TypeError, r"residual"),
    ],
)
def test_bad_residual_is_refused_with_nothing_changed(rng, residual, error, match):
    bn = numbabn.BatchNorm(3, activation="relu")
    x = make_input(rng, (4, 3, 5), 1, np.float32)
    before = _state(bn)
    with pytest.raises(error, match=match):
        bn(x, residual)
    _same_state(bn, before)


def test_residual_overlapping_running_stats_is_refused(rng):
    x = make_input(rng, (4, 3, 5), 1, np.float32)
    buf = np.zeros(60, np.float32)
    z = buf.reshape(4, 3, 5)
    rm, rv = buf[:3], np.ones(3, np.float32)
    with pytest.raises(ValueError, match="running_mean.*residual|residual.*running_mean"):
        numbabn.batch_norm(x, rm, rv, training=True, residual=z)
    assert_bitwise(buf, np.zeros(60, np.float32))


def test_backward_needs_the_output_with_relu(rng):
    x = make_input(rng, (4, 3, 5), 1, np.float32)
    y, mean, invstd = numbabn.batch_norm_forward(x, activation="relu")
    g = np.ones_like(x)
    with pytest.raises(ValueError, match=r"output \(the forward's output\) is required with activation='relu'"):
        numbabn.batch_norm_backward(g, x, None, mean, invstd, activation="relu")
    with pytest.raises(ValueError, match=r"output is only read with activation='relu'"):
        numbabn.batch_norm_backward(g, x, None, mean, invstd, output=y)
    with pytest.raises(ValueError, match=r"output must have shape"):
        numbabn.batch_norm_backward(g, x, None, mean, invstd, activation="relu", output=y[:2])
    with pytest.raises(TypeError, match=r"residual must be a bool, got str 'yes'"):
        numbabn.batch_norm_backward(g, x, None, mean, invstd, residual="yes")


# -- the GPU backend (numba's CUDA simulator; conftest.py turns it on) -----------------------


@pytest.fixture
def gpu(monkeypatch):
    """The CUDA backend with small blocks (as tests/test_cuda.py), so arrays span many."""
    cuda = pytest.importorskip("numba.cuda")
    from numbabn import _config

    monkeypatch.setattr(_config, "CUDA_THREADS", 8)
    monkeypatch.setattr(_config, "CUDA_MERGE_THREADS", 4)
    monkeypatch.setattr(_config, "CUDA_BLOCK_ELEMS", 16)
    monkeypatch.setattr(_config, "CUDA_MIN_INNER", 8)
    return cuda


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("shape", "axis"), [((5, 3, 12), 1), ((37, 5), 1), ((3, 4, 3, 5), -1)])
def test_gpu_layer_matches_the_host(rng, gpu, shape, axis, mode):
    activation, with_residual = mode
    x = make_input(rng, shape, axis, np.float32)
    z = residual_for(rng, x, with_residual)
    g = rng.normal(size=shape).astype(np.float32)
    num_channels = shape[axis]
    dev = numbabn.BatchNorm(num_channels, axis=axis, activation=activation, device="cuda")
    cpu = numbabn.BatchNorm(num_channels, axis=axis, activation=activation)
    for training in (True, False):
        dev.train(training), cpu.train(training)
        y = dev(gpu.to_device(x), None if z is None else gpu.to_device(z)).copy_to_host()
        expected = cpu(x, z)
        assert_close(y, expected, np.float32)
        gx = dev.backward(gpu.to_device(g)).copy_to_host()
        assert_close(gx, cpu.backward(g), np.float32, scale=10)
        assert_close(dev.grad_weight.copy_to_host(), cpu.grad_weight, np.float32, scale=10)
        if with_residual:
            assert_close(np.asarray(dev.grad_residual.copy_to_host()), cpu.grad_residual, np.float32)
    assert_close(dev.running_var.copy_to_host(), cpu.running_var, np.float32)


def test_gpu_functional_backward_with_relu(rng, gpu):
    x = make_input(rng, (6, 3, 10), 1, np.float64)
    g = rng.normal(size=x.shape)
    y, mean, invstd = numbabn.batch_norm_forward(gpu.to_device(x), activation="relu")
    gx, gw, gb, gz = numbabn.batch_norm_backward(
        gpu.to_device(g), gpu.to_device(x), None, mean, invstd, activation="relu", output=y, residual=True
    )
    y = y.copy_to_host()
    g_bn = np.where(y > 0, g, 0.0)
    assert_bitwise(gz.copy_to_host(), g_bn)
    expected = ref_backward(g_bn, x, None, mean.copy_to_host(), invstd.copy_to_host(), True, 1)
    assert_close(gx.copy_to_host(), expected[0], np.float64)


def test_a_mask_given_as_the_residual_is_refused_with_a_hint(rng):
    bn = numbabn.BatchNorm(3)
    x = make_input(rng, (4, 3, 5), 1, np.float32)
    before = _state(bn)
    with pytest.raises(TypeError, match=r"got a bool array: a mask goes in as mask="):
        bn(x, np.ones((4, 1, 5), bool))
    _same_state(bn, before)


def test_gpu_masked_statistics_with_activation(rng, gpu):
    x = make_input(rng, (6, 4, 10), 1, np.float32)
    z = rng.normal(size=x.shape).astype(np.float32)
    mask = rng.random((6, 1, 10)) < 0.6
    expected, mean, _ = numbabn.batch_norm_forward(x, mask=mask, activation="relu", residual=z)
    y, mean_d, _ = numbabn.batch_norm_forward(gpu.to_device(x), mask=mask, activation="relu", residual=gpu.to_device(z))
    assert_close(mean_d.copy_to_host(), mean, np.float64, rtol=1e-12)
    assert_close(y.copy_to_host(), expected, np.float32)
