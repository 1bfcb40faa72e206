"""Batch Renormalization: the float64 oracle, PyTorch autograd with ``r`` and ``d`` held
fixed, ``BatchNorm``'s bits at ``rmax=1, dmax=0``, and bad limits with nothing changed.
(The GPU and Dask backends: ``test_cuda.py`` and ``test_dask.py``.)"""

import pickle

import numpy as np
import pytest
from conftest import assert_bitwise, assert_close, channel_shape, make_input, make_params, reduce_axes, stats_rtol

import numbabn

#: (shape, axis): NCHW with the fused kernels, NCHW rows, (N, C), channels-last.
LAYOUTS = [((8, 6, 5, 5), 1), ((2, 4, 3000), 1), ((64, 6), 1), ((4, 5, 5, 6), -1)]
LAYOUT_IDS = ["nchw", "rows", "nc", "nhwc"]


def oracle(x, weight, bias, running_mean, running_var, eps, rmax, dmax, axis):
    """float64 ``(y, r, d, mean, biased var)`` of a training step, straight from the formulas."""
    x = x.astype(np.float64)
    cs, red = channel_shape(x.ndim, axis), reduce_axes(x.ndim, axis)
    mean, var = x.mean(red), x.var(red)
    s_b = np.sqrt(var + eps)
    s = np.sqrt(running_var.astype(np.float64) + eps)
    r = np.clip(s_b / s, 1 / rmax, rmax)
    d = np.clip((mean - running_mean) / s, -dmax, dmax)
    xhat = (x - mean.reshape(cs)) / s_b.reshape(cs)
    y = weight.astype(np.float64).reshape(cs) * (xhat * r.reshape(cs) + d.reshape(cs)) + bias.reshape(cs)
    return y, r, d, mean, var


def layer(rng, shape, axis, dtype, **kw):
    num_channels = shape[axis]
    bn = numbabn.BatchRenorm(num_channels, axis=axis, dtype=dtype, **kw)
    w, b, rm, rv = make_params(rng, num_channels, dtype)
    bn.load_state_dict({"weight": w, "bias": b, "running_mean": rm, "running_var": 4 * rv, "num_batches_tracked": 3})
    return bn


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=LAYOUT_IDS)
def test_training_step_matches_the_oracle(rng, shape, axis, dtype):
    bn = layer(rng, shape, axis, dtype, rmax=1.5, dmax=0.5)
    x = make_input(rng, shape, axis, dtype)
    before = {k: v.copy() for k, v in bn.state_dict().items()}
    y = bn(x)
    y64, r, d, mean, var = oracle(
        x, bn.weight, bn.bias, before["running_mean"], before["running_var"], bn.eps, 1.5, 0.5, axis
    )
    assert y.dtype == dtype
    assert_close(y, y64, dtype)
    # r and d come from the batch statistics: float32 lanes for float32 data.
    tol = 1e-12 if dtype == np.float64 else 2 * stats_rtol(dtype)
    assert_close(bn.r, r, np.float64, rtol=tol)
    assert_close(bn.d, d, np.float64, rtol=tol)
    assert np.all(bn.r <= 1.5) and np.all(bn.r >= 1 / 1.5) and np.all(np.abs(bn.d) <= 0.5)
    assert np.any(bn.r != 1) and np.any(bn.d != 0)  # the correction is active in this case
    # The running statistics update as BatchNorm's: batch statistics, unbiased variance.
    n = x.size // shape[axis]
    assert_close(bn.running_mean, 0.9 * before["running_mean"] + 0.1 * mean, dtype)
    assert_close(bn.running_var, 0.9 * before["running_var"] + 0.1 * var * n / (n - 1), dtype)
    assert bn.num_batches_tracked == 4


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=LAYOUT_IDS)
def test_backward_matches_torch_autograd_with_r_and_d_fixed(rng, shape, axis):
    torch = pytest.importorskip("torch")
    bn = layer(rng, shape, axis, np.float64, rmax=1.2, dmax=0.3)
    x = make_input(rng, shape, axis, np.float64)
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    bn(x)
    g = rng.standard_normal(shape)
    grad_input = bn.backward(g)
    cs, red = channel_shape(len(shape), axis), reduce_axes(len(shape), axis)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(bn.weight, requires_grad=True)
    bt = torch.tensor(bn.bias, requires_grad=True)
    mean, var = xt.mean(red, keepdim=True), xt.var(red, keepdim=True, unbiased=False)
    s_b = torch.sqrt(var + bn.eps)
    s = torch.sqrt(torch.tensor(rv) + bn.eps).reshape(cs)
    r = torch.clamp(s_b / s, 1 / 1.2, 1.2).detach()
    d = torch.clamp((mean - torch.tensor(rm).reshape(cs)) / s, -0.3, 0.3).detach()
    y = wt.reshape(cs) * ((xt - mean) / s_b * r + d) + bt.reshape(cs)
    y.backward(torch.tensor(g))
    assert_close(grad_input, xt.grad.numpy(), np.float64)
    assert_close(bn.grad_weight, wt.grad.numpy(), np.float64)
    assert_close(bn.grad_bias, bt.grad.numpy(), np.float64)
    assert_close(bn.update_threshold, np.abs(g).mean(red), np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=LAYOUT_IDS)
def test_rmax_1_dmax_0_is_batchnorm_bit_for_bit(rng, shape, axis, dtype):
    renorm = layer(rng, shape, axis, dtype, rmax=1.0, dmax=0.0)
    bn = numbabn.BatchNorm(shape[axis], axis=axis, dtype=dtype)
    bn.load_state_dict(renorm.state_dict())
    for _ in range(2):
        x = make_input(rng, shape, axis, dtype)
        g = rng.standard_normal(shape).astype(dtype)
        assert_bitwise(renorm(x), bn(x))
        assert_bitwise(renorm.backward(g), bn.backward(g))
        for name in ("grad_weight", "grad_bias", "update_threshold"):
            assert_bitwise(getattr(renorm, name), getattr(bn, name), name)
    for k, v in bn.state_dict().items():
        assert_bitwise(renorm.state_dict()[k], v, k)
    renorm.eval(), bn.eval()
    assert_bitwise(renorm(x), bn(x))


def test_eval_is_batchnorm_eval(rng):
    shape, axis = (8, 6, 5, 5), 1
    renorm = layer(rng, shape, axis, np.float32)
    bn = numbabn.BatchNorm(6)
    bn.load_state_dict(renorm.state_dict())
    x = make_input(rng, shape, axis, np.float32)
    renorm.eval(), bn.eval()
    g = rng.standard_normal(shape).astype(np.float32)
    assert_bitwise(renorm(x), bn(x))
    assert_bitwise(renorm.backward(g), bn.backward(g))
    assert_bitwise(renorm.grad_weight, bn.grad_weight)


def test_limits_ramp_between_steps(rng):
    """rmax and dmax are plain attributes a schedule may raise: each step clips with the
    values it finds."""
    shape, axis = (64, 6), 1
    bn = layer(rng, shape, axis, np.float64, rmax=1.0, dmax=0.0)
    x = make_input(rng, shape, axis, np.float64, loc=20.0)
    bn(x)
    assert np.all(bn.r == 1) and np.all(bn.d == 0)
    bn.rmax, bn.dmax = 1.1, 0.2
    bn(x)
    assert np.max(np.abs(bn.d)) == pytest.approx(0.2) and np.all(bn.r <= 1.1)
    assert "rmax=1.1, dmax=0.2" in repr(bn)


def test_functional_pair_matches_the_layer(rng):
    shape, axis = (4, 5, 5, 6), -1
    bn = layer(rng, shape, axis, np.float32)
    w, b, rm, rv = (bn.weight.copy(), bn.bias.copy(), bn.running_mean.copy(), bn.running_var.copy())
    x = make_input(rng, shape, axis, np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    y, mean, invstd, r, d = numbabn.batch_renorm_forward(x, w, b, rm, rv, axis=axis)
    gi, gw, gb = numbabn.batch_renorm_backward(g, x, w, mean, invstd, r, d, axis=axis)
    assert_bitwise(y, bn(x))
    assert_bitwise(gi, bn.backward(g))
    assert_bitwise(gw, bn.grad_weight)
    assert_bitwise(gb, bn.grad_bias)
    assert_bitwise(rm, bn.running_mean)
    assert_bitwise(r, bn.r)


def test_empty_batch_and_pickle(rng):
    bn = layer(rng, (8, 6, 5, 5), 1, np.float32)
    before = bn.state_dict()
    y = bn(np.empty((0, 6, 5, 5), np.float32))
    assert y.shape == (0, 6, 5, 5) and bn.num_batches_tracked == 4
    assert_bitwise(bn.running_var, before["running_var"])
    x = make_input(rng, (8, 6, 5, 5), 1, np.float32)
    bn(x)
    copy = pickle.loads(pickle.dumps(bn))
    assert (copy.rmax, copy.dmax) == (bn.rmax, bn.dmax)
    assert_bitwise(copy.r, bn.r)
    with pytest.raises(RuntimeError, match="backward needs a forward"):
        copy.backward(x)
    assert list(bn.state_dict()) == list(numbabn.BatchNorm(6).state_dict())


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        (dict(rmax=0.5), ValueError, "rmax must be a finite float >= 1, got 0.5"),
        (dict(dmax=-1.0), ValueError, "dmax must be a finite float >= 0, got -1.0"),
        (dict(rmax=float("inf")), ValueError, "rmax must be a finite float >= 1, got inf"),
        (dict(dmax=float("nan")), ValueError, "dmax must be a finite float >= 0, got nan"),
        (dict(rmax="3"), TypeError, "rmax must be a finite float >= 1, got str '3'"),
    ],
)
def test_bad_limits_are_refused_with_nothing_changed(rng, kw, exc, match):
    with pytest.raises(exc, match=match):
        numbabn.BatchRenorm(6, **kw)
    bn = layer(rng, (64, 6), 1, np.float32, rmax=2.0, dmax=1.0)
    name, value = next(iter(kw.items()))
    with pytest.raises(exc, match=match):
        setattr(bn, name, value)
    assert (bn.rmax, bn.dmax) == (2.0, 1.0)
    x = make_input(rng, (64, 6), 1, np.float32)
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    with pytest.raises(exc, match=match):
        numbabn.batch_renorm_forward(x, None, None, rm, rv, **kw)
    assert_bitwise(rm, bn.running_mean)
    assert_bitwise(rv, bn.running_var)


def test_bad_calls_leave_every_buffer_unchanged(rng):
    bn = layer(rng, (64, 6), 1, np.float32)
    before = bn.state_dict()
    with pytest.raises(TypeError, match="input must have dtype float32"):
        bn(make_input(rng, (64, 6), 1, np.float64))
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        bn(make_input(rng, (1, 6), 1, np.float32))
    x = make_input(rng, (64, 6), 1, np.float32)
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        numbabn.batch_renorm_forward(x, None, None, None, None)
    rm = before["running_mean"].copy()
    with pytest.raises(ValueError, match="running_var must have shape"):
        numbabn.batch_renorm_forward(x, None, None, rm, np.ones(5, np.float32))
    assert_bitwise(rm, before["running_mean"])
    for k, v in bn.state_dict().items():
        assert_bitwise(v, before[k], k)
    y, mean, invstd, r, d = numbabn.batch_renorm_forward(x, None, None, rm, before["running_var"].copy())
    with pytest.raises(ValueError, match="r must be finite"):
        numbabn.batch_renorm_backward(x, x, None, mean, invstd, np.full(6, np.nan), d)
    with pytest.raises(ValueError, match=r"d must have shape \(6,\)"):
        numbabn.batch_renorm_backward(x, x, None, mean, invstd, r, d[:5])


def test_sync_batch_renorm_without_a_comm_is_batch_renorm(rng):
    """(Across processes: ``test_sync_mpi.py`` runs SyncBatchRenorm on 2 and 3 MPI ranks.)"""
    sync = numbabn.SyncBatchRenorm(6, rmax=1.5, dmax=0.5)
    plain = layer(rng, (64, 6), 1, np.float32, rmax=1.5, dmax=0.5)
    sync.load_state_dict(plain.state_dict())
    x = make_input(rng, (64, 6), 1, np.float32)
    g = rng.standard_normal((64, 6)).astype(np.float32)
    assert_bitwise(sync(x), plain(x))
    assert_bitwise(sync.backward(g), plain.backward(g))
    assert_bitwise(sync.grad_weight, plain.grad_weight)
    assert_bitwise(sync.r, plain.r)
    assert "SyncBatchRenorm(6" in repr(sync) and "rmax=1.5" in repr(sync)
    with pytest.raises(ValueError, match="rmax must be a finite float >= 1"):
        numbabn.SyncBatchRenorm(6, rmax=0.0)


def test_sync_layers_with_a_mask_on_one_rank_are_the_masked_layer(rng):
    """(Across processes: ``test_sync_mpi.py``, masked counts on 2 and 3 MPI ranks.)"""

    class Comm:
        def allgather(self, obj):
            return [obj]

    x = make_input(rng, (64, 6), 1, np.float32)
    g = rng.standard_normal((64, 6)).astype(np.float32)
    mask = rng.random((64, 1)) < 0.5
    sync, plain = numbabn.SyncBatchRenorm(6, comm=Comm()), numbabn.BatchRenorm(6)
    for layer in (sync, plain):
        layer.running_mean[:] = 0.3
    assert_close(sync(x, mask=mask), plain(x, mask=mask), np.float32)
    assert_close(sync.backward(g), plain.backward(g), np.float32)
    for name in ("running_mean", "running_var", "grad_weight", "update_threshold", "r", "d"):
        assert_close(getattr(sync, name), getattr(plain, name), np.float32, err_msg=name)
