"""Masked statistics: the batch statistics and the running-statistics update count the
values a mask keeps (a float64 oracle over the kept values), every value is normalized with
them, the backward is PyTorch autograd of the same formula, and bad masks are refused with
nothing changed."""

import numpy as np
import pytest
from conftest import assert_bitwise, assert_close, channel_shape, make_input, make_params, reduce_axes

import numbabn
from numbabn import _jit

#: (shape, axis): NCHW (fused), NCL rows (not fused: few channels, long rows), (N, C),
#: channels-last, short inner rows (channel-minor, inner > 1), and sizes past the parallel
#: threshold for both kernel families.
LAYOUTS = [
    ((6, 5, 8, 10), 1),
    ((3, 2, 5000), 1),
    ((64, 6), 1),
    ((5, 4, 3, 6), -1),
    ((9, 6, 5), 1),
    ((24, 16, 40, 40), 1),
    ((4096, 40), 1),
]
LAYOUT_IDS = ["nchw", "ncl-rows", "nc", "nhwc", "short-inner", "nchw-large", "nc-large"]


def mask_for(rng, shape, axis, keep=0.6):
    mshape = list(shape)
    mshape[axis % len(shape)] = 1
    return rng.random(mshape) < keep


def oracle(x, mask, weight, bias, eps, axis):
    """float64 ``(y, mean, biased var, kept count)`` of the masked training forward."""
    x = x.astype(np.float64)
    cs, red = channel_shape(x.ndim, axis), reduce_axes(x.ndim, axis)
    full = np.broadcast_to(mask, x.shape)
    kept = np.where(full, x, np.nan)
    mean, var = np.nanmean(kept, axis=red), np.nanvar(kept, axis=red)
    y = (x - mean.reshape(cs)) / np.sqrt(var.reshape(cs) + eps) * weight.reshape(cs) + bias.reshape(cs)
    return y, mean, var, int(mask.sum())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=LAYOUT_IDS)
def test_training_forward_matches_the_oracle(rng, shape, axis, dtype):
    num_channels = shape[axis]
    w, b, rm, rv = make_params(rng, num_channels, dtype)
    x = make_input(rng, shape, axis, dtype)
    mask = mask_for(rng, shape, axis)
    # Padding holds garbage, NaN included: it must reach no statistic.
    x[np.broadcast_to(~mask, shape)] = np.nan
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = numbabn.batch_norm_forward(x, w, b, rm, rv, axis=axis, mask=mask)
    y64, mean64, var64, n = oracle(x, mask, w, b, 1e-5, axis)
    kept = np.broadcast_to(mask, shape)
    assert_close(y[kept], y64[kept], dtype)
    assert np.all(np.isnan(y[~kept]))  # NaN padding normalized is NaN, and stays there
    assert_close(mean, mean64, dtype)
    assert_close(1 / invstd**2 - 1e-5, var64, dtype)
    assert_close(rm, 0.9 * rm0 + 0.1 * mean64, dtype)
    assert_close(rv, 0.9 * rv0 + 0.1 * var64 * n / (n - 1), dtype)


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS[:5], ids=LAYOUT_IDS[:5])
def test_backward_matches_torch_autograd(rng, shape, axis):
    torch = pytest.importorskip("torch")
    num_channels = shape[axis]
    w, b, _, _ = make_params(rng, num_channels, np.float64)
    x = make_input(rng, shape, axis, np.float64)
    mask = mask_for(rng, shape, axis)
    g = rng.standard_normal(shape)
    y, mean, invstd = numbabn.batch_norm_forward(x, w, b, axis=axis, mask=mask)
    gi, gw, gb = numbabn.batch_norm_backward(g, x, w, mean, invstd, axis=axis, mask=mask)
    cs, red = channel_shape(len(shape), axis), reduce_axes(len(shape), axis)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    mt = torch.tensor(np.broadcast_to(mask, shape).astype(np.float64))
    count = mt.sum(red, keepdim=True)
    m = (xt * mt).sum(red, keepdim=True) / count
    v = (((xt - m) * mt) ** 2).sum(red, keepdim=True) / count
    yt = wt.reshape(cs) * (xt - m) / torch.sqrt(v + 1e-5) + bt.reshape(cs)
    yt.backward(torch.tensor(g))
    assert_close(y, yt.detach().numpy(), np.float64)
    assert_close(gi, xt.grad.numpy(), np.float64)
    assert_close(gw, wt.grad.numpy(), np.float64)
    assert_close(gb, bt.grad.numpy(), np.float64)


@pytest.mark.parametrize(("shape", "axis"), [LAYOUTS[0], LAYOUTS[5], LAYOUTS[6]], ids=["nchw", "large", "nc-large"])
def test_serial_and_parallel_kernels_give_the_same_bits(rng, monkeypatch, shape, axis):
    x = make_input(rng, shape, axis, np.float32)
    mask = mask_for(rng, shape, axis)
    g = rng.standard_normal(shape).astype(np.float32)

    def step():
        y, mean, invstd = numbabn.batch_norm_forward(x, axis=axis, mask=mask)
        return (y, mean, invstd, *numbabn.batch_norm_backward(g, x, None, mean, invstd, axis=axis, mask=mask))

    parallel = step()
    monkeypatch.setattr(_jit, "_SERIAL_ONLY", True)
    for a, b in zip(parallel, step(), strict=True):
        assert_bitwise(a, b)


def test_layer_reuses_the_mask_and_eval_ignores_it(rng):
    shape, axis = (6, 5, 8, 10), 1
    x = make_input(rng, shape, axis, np.float32)
    mask = mask_for(rng, shape, axis)
    g = rng.standard_normal(shape).astype(np.float32)
    bn = numbabn.BatchNorm(5)
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    y, mean, invstd = numbabn.batch_norm_forward(x, bn.weight, bn.bias, rm, rv, mask=mask)
    assert_bitwise(bn(x, mask=mask), y)
    assert_bitwise(bn.running_var, rv)
    gi, gw, gb = numbabn.batch_norm_backward(g, x, bn.weight, mean, invstd, mask=mask)
    assert_bitwise(bn.backward(g), gi)
    assert_bitwise(bn.grad_weight, gw)
    # Per kept value: sum |g| over every value, over the kept count.
    assert_close(bn.update_threshold, np.abs(g.astype(np.float64)).sum(axis=(0, 2, 3)) / mask.sum(), np.float64)
    bn.eval()
    plain = numbabn.BatchNorm(5)
    plain.load_state_dict(bn.state_dict())
    plain.eval()
    assert_bitwise(bn(x, mask=mask), plain(x))
    assert_bitwise(bn.backward(g), plain.backward(g))


def test_batch_renorm_with_a_mask(rng):
    """r and d come from the masked statistics."""
    shape, axis = (6, 5, 8, 10), 1
    x = make_input(rng, shape, axis, np.float64)
    mask = mask_for(rng, shape, axis)
    bn = numbabn.BatchRenorm(5, dtype=np.float64, rmax=1.1, dmax=0.1)
    bn.running_mean[:] = rng.normal(size=5)
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    y = bn(x, mask=mask)
    _, mean, var, _ = oracle(x, mask, np.ones(5), np.zeros(5), 1e-5, axis)
    s = np.sqrt(rv + 1e-5)
    r = np.clip(np.sqrt(var + 1e-5) / s, 1 / 1.1, 1.1)
    d = np.clip((mean - rm) / s, -0.1, 0.1)
    assert_close(bn.r, r, np.float64)
    assert_close(bn.d, d, np.float64)
    cs = channel_shape(4, axis)
    expected = (x - mean.reshape(cs)) / np.sqrt(var.reshape(cs) + 1e-5) * r.reshape(cs) + d.reshape(cs)
    assert_close(y, expected, np.float64)
    assert np.all(np.isfinite(bn.backward(np.ones_like(y))))


def test_all_false_is_an_empty_batch_and_one_kept_value_is_refused(rng):
    shape, axis = (6, 5, 8, 10), 1
    x = make_input(rng, shape, axis, np.float32)
    bn = numbabn.BatchNorm(5)
    before = bn.state_dict()
    y = bn(x, mask=np.zeros((6, 1, 8, 10), bool))
    assert np.all(np.isnan(y)) and bn.num_batches_tracked == 1
    assert_bitwise(bn.running_mean, before["running_mean"])
    assert_bitwise(bn.running_var, before["running_var"])
    one = np.zeros((6, 1, 8, 10), bool)
    one[2, 0, 3, 4] = True
    with pytest.raises(ValueError, match="a mask that keeps 1 value per channel"):
        bn(x, mask=one)
    assert bn.num_batches_tracked == 1
    assert_bitwise(bn.running_var, before["running_var"])


@pytest.mark.parametrize(
    ("mask", "exc", "match"),
    [
        (np.ones((6, 1, 8, 10), np.int8), TypeError, "mask must have dtype bool"),
        (np.ones((6, 5, 8, 10), bool), ValueError, r"mask must have shape \(6, 1, 8, 10\)"),
        (np.ones((6, 1, 8), bool), ValueError, r"mask must have shape \(6, 1, 8, 10\)"),
        ([[True]], TypeError, "mask must be a NumPy bool array, got list"),
    ],
)
def test_bad_masks_are_refused_with_nothing_changed(rng, mask, exc, match):
    x = make_input(rng, (6, 5, 8, 10), 1, np.float32)
    bn = numbabn.BatchNorm(5)
    before = bn.state_dict()
    with pytest.raises(exc, match=match):
        bn(x, mask=mask)
    with pytest.raises(exc, match=match):
        bn.eval()(x, mask=mask)  # checked in eval too, where it is ignored
    for k, v in bn.state_dict().items():
        assert_bitwise(v, before[k], k)
    rm, rv = before["running_mean"].copy(), before["running_var"].copy()
    with pytest.raises(exc, match=match):
        numbabn.batch_norm(x, rm, rv, training=True, mask=mask)
    assert_bitwise(rm, before["running_mean"])


def test_ghost_combination_is_refused_clearly(rng):
    x = make_input(rng, (16, 6), 1, np.float32)
    mask = np.ones((16, 1), bool)
    with pytest.raises(NotImplementedError, match="virtual_batch_size and mask together"):
        numbabn.batch_norm_forward(x, mask=mask, virtual_batch_size=4)
