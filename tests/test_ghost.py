"""Ghost batches (``virtual_batch_size``): each ghost is a training call on its slice (the
same bits), the running statistics take one update from the merged statistics, the backward
is each ghost's own (PyTorch autograd of the same loop), ``BatchNorm``'s bits when one ghost
holds the batch, and bad sizes refused with nothing changed."""

import numpy as np
import pytest
from conftest import assert_bitwise, assert_close, channel_shape, make_input, make_params, reduce_axes

import numbabn

#: (shape, axis): NCHW (fused kernels), (N, C), channels-last, (N, C, L) sequences.
LAYOUTS = [((10, 6, 5, 5), 1), ((70, 6), 1), ((9, 5, 5, 6), -1), ((11, 4, 300), 1)]
LAYOUT_IDS = ["nchw", "nc", "nhwc", "ncl"]
V = 4


def ghosts(n, v=V):
    return [(i, min(i + v, n)) for i in range(0, n, v)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=LAYOUT_IDS)
def test_each_ghost_is_a_training_call_on_its_slice(rng, shape, axis, dtype):
    num_channels = shape[axis]
    w, b, rm, rv = make_params(rng, num_channels, dtype)
    x = make_input(rng, shape, axis, dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = numbabn.batch_norm_forward(x, w, b, rm, rv, axis=axis, virtual_batch_size=V)
    assert mean.shape == invstd.shape == (len(ghosts(shape[0])), num_channels)
    for g, (i0, i1) in enumerate(ghosts(shape[0])):
        y_g, mean_g, invstd_g = numbabn.batch_norm_forward(x[i0:i1], w, b, axis=axis)
        assert_bitwise(y[i0:i1], y_g)
        assert_bitwise(mean[g], mean_g)
        assert_bitwise(invstd[g], invstd_g)
    # One update, from the whole batch's statistics, as BatchNorm's.
    red = reduce_axes(len(shape), axis)
    x64 = x.astype(np.float64)
    n = x.size // num_channels
    assert_close(rm, 0.9 * rm0 + 0.1 * x64.mean(red), dtype)
    assert_close(rv, 0.9 * rv0 + 0.1 * x64.var(red) * n / (n - 1), dtype)
    rm_bn, rv_bn = rm0.copy(), rv0.copy()
    numbabn.batch_norm_forward(x, w, b, rm_bn, rv_bn, axis=axis)
    assert_close(rm, rm_bn, dtype, rtol=1e-12 if dtype == np.float64 else None)
    assert_close(rv, rv_bn, dtype, rtol=1e-12 if dtype == np.float64 else None)


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=LAYOUT_IDS)
def test_backward_matches_torch_autograd_of_the_ghost_loop(rng, shape, axis):
    torch = pytest.importorskip("torch")
    num_channels = shape[axis]
    w, b, _, _ = make_params(rng, num_channels, np.float64)
    x = make_input(rng, shape, axis, np.float64)
    g = rng.standard_normal(shape)
    y, mean, invstd = numbabn.batch_norm_forward(x, w, b, axis=axis, virtual_batch_size=V)
    gi, gw, gb = numbabn.batch_norm_backward(g, x, w, mean, invstd, axis=axis, virtual_batch_size=V)
    cs, red = channel_shape(len(shape), axis), reduce_axes(len(shape), axis)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    pieces = []
    for i0, i1 in ghosts(shape[0]):
        xs = xt[i0:i1]
        m, v = xs.mean(red, keepdim=True), xs.var(red, keepdim=True, unbiased=False)
        pieces.append(wt.reshape(cs) * (xs - m) / torch.sqrt(v + 1e-5) + bt.reshape(cs))
    yt = torch.cat(pieces)
    yt.backward(torch.tensor(g))
    assert_close(y, yt.detach().numpy(), np.float64)
    assert_close(gi, xt.grad.numpy(), np.float64)
    assert_close(gw, wt.grad.numpy(), np.float64)
    assert_close(gb, bt.grad.numpy(), np.float64)
    # Each ghost's grad_input is its own backward's, bit for bit.
    for k, (i0, i1) in enumerate(ghosts(shape[0])):
        gi_k = numbabn.batch_norm_backward(g[i0:i1], x[i0:i1], w, mean[k], invstd[k], axis=axis)[0]
        assert_bitwise(gi[i0:i1], gi_k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=LAYOUT_IDS)
def test_one_ghost_holding_the_batch_is_batchnorm_bit_for_bit(rng, shape, axis, dtype):
    ghost = numbabn.BatchNorm(shape[axis], axis=axis, dtype=dtype, virtual_batch_size=shape[0])
    bn = numbabn.BatchNorm(shape[axis], axis=axis, dtype=dtype)
    names = ("weight", "bias", "running_mean", "running_var")
    state = dict(zip(names, make_params(rng, shape[axis], dtype), strict=True))
    ghost.load_state_dict(state, strict=False), bn.load_state_dict(state, strict=False)
    x = make_input(rng, shape, axis, dtype)
    g = rng.standard_normal(shape).astype(dtype)
    assert_bitwise(ghost(x), bn(x))
    assert_bitwise(ghost.backward(g), bn.backward(g))
    for name in ("grad_weight", "grad_bias", "update_threshold"):
        assert_bitwise(getattr(ghost, name), getattr(bn, name), name)
    for k, v in bn.state_dict().items():
        assert_bitwise(ghost.state_dict()[k], v, k)


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS[:2], ids=LAYOUT_IDS[:2])
def test_layer_with_ghost_batches(rng, shape, axis):
    bn = numbabn.BatchNorm(shape[axis], axis=axis, virtual_batch_size=V)
    plain = numbabn.BatchNorm(shape[axis], axis=axis)
    x = make_input(rng, shape, axis, np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    rm, rv = plain.running_mean.copy(), plain.running_var.copy()
    y, mean, invstd = numbabn.batch_norm_forward(x, None, None, rm, rv, axis=axis, virtual_batch_size=V)
    assert_bitwise(bn(x), y)
    assert_bitwise(bn.running_mean, rm)
    assert bn.num_batches_tracked == 1
    gi, gw, gb = numbabn.batch_norm_backward(g, x, bn.weight, mean, invstd, axis=axis, virtual_batch_size=V)
    assert_bitwise(bn.backward(g), gi)
    assert_bitwise(bn.grad_weight, gw)
    assert_bitwise(bn.grad_bias, gb)
    assert_close(bn.update_threshold, np.abs(g.astype(np.float64)).mean(reduce_axes(len(shape), axis)), np.float64)
    # Eval ignores virtual_batch_size.
    plain.load_state_dict(bn.state_dict())
    bn.eval(), plain.eval()
    assert_bitwise(bn(x), plain(x))
    assert_bitwise(bn.backward(g), plain.backward(g))
    assert "virtual_batch_size=4" in repr(bn)


def test_batch_renorm_with_ghost_batches(rng):
    """Every ghost gets its own r and d, from the running statistics before the call's one
    update; gradients as PyTorch autograd of the same loop with r and d detached."""
    torch = pytest.importorskip("torch")
    shape, axis = (10, 6, 5, 5), 1
    bn = numbabn.BatchRenorm(6, dtype=np.float64, rmax=1.2, dmax=0.2, virtual_batch_size=V)
    w, b, rm, rv = make_params(rng, 6, np.float64)
    bn.load_state_dict({"weight": w, "bias": b, "running_mean": rm, "running_var": 3 * rv}, strict=False)
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    x = make_input(rng, shape, axis, np.float64)
    g = rng.standard_normal(shape)
    y = bn(x)
    gi = bn.backward(g)
    assert bn.r.shape == bn.d.shape == (3, 6)
    cs, red = channel_shape(4, axis), reduce_axes(4, axis)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, bn.weight, bn.bias))
    s = np.sqrt(rv + bn.eps)
    pieces = []
    for k, (i0, i1) in enumerate(ghosts(shape[0])):
        xs = xt[i0:i1]
        m, v = xs.mean(red, keepdim=True), xs.var(red, keepdim=True, unbiased=False)
        s_b = torch.sqrt(v + bn.eps)
        r = torch.clamp(s_b / torch.tensor(s).reshape(cs), 1 / 1.2, 1.2).detach()
        d = torch.clamp((m - torch.tensor(rm).reshape(cs)) / torch.tensor(s).reshape(cs), -0.2, 0.2).detach()
        assert_close(bn.r[k], r.numpy().ravel(), np.float64)
        assert_close(bn.d[k], d.numpy().ravel(), np.float64)
        pieces.append(wt.reshape(cs) * ((xs - m) / s_b * r + d) + bt.reshape(cs))
    torch.cat(pieces).backward(torch.tensor(g))
    assert_close(y, torch.cat(pieces).detach().numpy(), np.float64)
    assert_close(gi, xt.grad.numpy(), np.float64)
    assert_close(bn.grad_weight, wt.grad.numpy(), np.float64)
    assert_close(bn.grad_bias, bt.grad.numpy(), np.float64)
    assert np.any(bn.d != 0) and np.any(bn.r != 1)


@pytest.mark.parametrize(
    ("size", "exc", "match"),
    [
        (0, ValueError, "virtual_batch_size must be an int >= 1 or None, got 0"),
        (-2, ValueError, "virtual_batch_size must be an int >= 1 or None, got -2"),
        (2.5, TypeError, "virtual_batch_size must be an int >= 1 or None, got float 2.5"),
        (True, TypeError, "virtual_batch_size must be an int >= 1 or None, got bool True"),
    ],
)
def test_bad_sizes_are_refused(rng, size, exc, match):
    with pytest.raises(exc, match=match):
        numbabn.BatchNorm(6, virtual_batch_size=size)
    x = make_input(rng, (16, 6), 1, np.float32)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    with pytest.raises(exc, match=match):
        numbabn.batch_norm_forward(x, None, None, rm, rv, virtual_batch_size=size)
    assert np.all(rm == 0) and np.all(rv == 1)


def test_ghost_calls_refused_with_nothing_changed(rng):
    with pytest.raises(ValueError, match="the feature axis must not be 0, got axis=0"):
        numbabn.BatchNorm(6, axis=0, virtual_batch_size=4)
    x = make_input(rng, (6, 16), 0, np.float32)
    with pytest.raises(ValueError, match="the feature axis must not be 0"):
        numbabn.batch_norm_forward(x, axis=-2, virtual_batch_size=4)
    # (9, 6) in ghosts of 4: the last ghost holds 1 sample, 1 value per channel.
    bn = numbabn.BatchNorm(6, virtual_batch_size=4)
    before = bn.state_dict()
    with pytest.raises(ValueError, match="ghost batch of 1 value per channel"):
        bn(make_input(rng, (9, 6), 1, np.float32))
    for k, v in bn.state_dict().items():
        assert_bitwise(v, before[k], k)
    # One sample of a sequence has L values per channel: a fine ghost.
    y = numbabn.BatchNorm(6, virtual_batch_size=4)(make_input(rng, (9, 6, 3), 1, np.float32))
    assert np.all(np.isfinite(y))
    x = make_input(rng, (16, 6), 1, np.float32)
    y, mean, invstd = numbabn.batch_norm_forward(x, virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"save_mean must have shape \(4, 6\)"):
        numbabn.batch_norm_backward(x, x, None, mean[:3], invstd, virtual_batch_size=4)


def test_dask_arrays_are_refused_clearly(rng):
    da = pytest.importorskip("dask.array")
    x = da.from_array(make_input(rng, (16, 6), 1, np.float32), chunks=(5, 6))
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    with pytest.raises(TypeError, match="virtual_batch_size takes NumPy or GPU arrays, got a Dask array"):
        numbabn.batch_norm_forward(x, None, None, rm, rv, virtual_batch_size=4)
    assert np.all(rm == 0) and np.all(rv == 1)


# -- channel-minor inputs: every ghost in one host driver (numbabn.cpu.ghost) ---------------

#: (shape, axis, virtual_batch_size): (N, C), channels-last, short rows (channel-minor with
#: inner > 1, and several rows per sample), remainders, and sizes past ``PARALLEL_MIN`` so the
#: parallel twins run.
ONE_DRIVER = [
    ((70, 6), 1, 4),
    ((9, 5, 5, 6), -1, 4),
    ((13, 4, 5), 1, 4),
    ((10, 3, 4, 5), 2, 3),
    ((256, 512), 1, 32),
    ((70, 16, 16, 32), -1, 32),
]
ONE_DRIVER_IDS = ["nc", "nhwc", "short-rows", "rows-per-sample", "nc-parallel", "nhwc-parallel-remainder"]


def _layer_step(rng, shape, axis, v, dtype, renorm):
    """A layer's training forward and backward with ghost batches: every result."""
    c = shape[axis]
    bn = (
        numbabn.BatchRenorm(c, axis=axis, dtype=dtype, rmax=1.2, dmax=0.3, virtual_batch_size=v)
        if renorm
        else numbabn.BatchNorm(c, axis=axis, dtype=dtype, virtual_batch_size=v)
    )
    w, b, rm, rv = make_params(rng, c, dtype)
    bn.load_state_dict({"weight": w, "bias": b, "running_mean": rm, "running_var": 3 * rv}, strict=False)
    x = make_input(rng, shape, axis, dtype)
    g = rng.standard_normal(shape).astype(dtype)
    out = {"y": bn(x), "grad_input": bn.backward(g)}
    out |= {k: getattr(bn, k) for k in ("grad_weight", "grad_bias", "update_threshold", "running_mean", "running_var")}
    if renorm:
        out |= {"r": bn.r, "d": bn.d}
    return out


@pytest.mark.parametrize("renorm", [False, True], ids=["bn", "renorm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis", "v"), ONE_DRIVER, ids=ONE_DRIVER_IDS)
def test_one_driver_has_the_bits_of_a_call_per_ghost(monkeypatch, shape, axis, v, dtype, renorm):
    """The one-driver path against one backend call per ghost (the path of every other
    input, itself checked against calls on the slices above): every result, bit for bit,
    Batch Renormalization's ``r`` and ``d`` and the running statistics included."""
    from numbabn.cpu import api

    assert api.ghosts_fit(api.Input(make_input(np.random.default_rng(0), shape, axis, dtype), axis, None))
    one = _layer_step(np.random.default_rng(1), shape, axis, v, dtype, renorm)
    monkeypatch.setattr(api, "ghosts_fit", lambda inp: False)
    each = _layer_step(np.random.default_rng(1), shape, axis, v, dtype, renorm)
    for k, a in each.items():
        assert_bitwise(one[k], a, k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "axis", "v"), [ONE_DRIVER[1], ONE_DRIVER[5]], ids=["nhwc", "nhwc-parallel-remainder"]
)
def test_one_driver_is_the_calls_on_the_slices(rng, shape, axis, v, dtype):
    """Each ghost's output, saved statistics and ``grad_input`` are those of calls on its
    slice; ``grad_weight`` and ``grad_bias`` are theirs (in the input's dtype, as those calls
    return them) added in order in float64."""
    num_channels = shape[axis]
    w, b, _, _ = make_params(rng, num_channels, dtype)
    x = make_input(rng, shape, axis, dtype)
    g = rng.standard_normal(shape).astype(dtype)
    y, mean, invstd = numbabn.batch_norm_forward(x, w, b, axis=axis, virtual_batch_size=v)
    gi, gw, gb = numbabn.batch_norm_backward(g, x, w, mean, invstd, axis=axis, virtual_batch_size=v)
    sums = np.zeros((2, num_channels))
    for k, (i0, i1) in enumerate(ghosts(shape[0], v)):
        y_k, mean_k, invstd_k = numbabn.batch_norm_forward(x[i0:i1], w, b, axis=axis)
        gi_k, gw_k, gb_k = numbabn.batch_norm_backward(g[i0:i1], x[i0:i1], w, mean_k, invstd_k, axis=axis)
        for name, got, want in (("y", y[i0:i1], y_k), ("mean", mean[k], mean_k), ("invstd", invstd[k], invstd_k)):
            assert_bitwise(got, want, name)
        assert_bitwise(gi[i0:i1], gi_k, "grad_input")
        sums += (gw_k, gb_k)
    assert_bitwise(gw, sums[0].astype(dtype), "grad_weight")
    assert_bitwise(gb, sums[1].astype(dtype), "grad_bias")


def test_one_driver_writes_out_in_place_too(rng):
    """``out=`` (the input itself too) and an F-ordered input (one call per ghost) give the
    one-driver path's values."""
    shape, axis, v = (70, 16, 16, 32), -1, 32
    x = make_input(rng, shape, axis, np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    y, mean, invstd = numbabn.batch_norm_forward(x, axis=axis, virtual_batch_size=v)
    gi = numbabn.batch_norm_backward(g, x, None, mean, invstd, axis=axis, virtual_batch_size=v)[0]
    out = np.empty_like(x)
    assert numbabn.batch_norm_forward(x, axis=axis, virtual_batch_size=v, out=out)[0] is out
    assert_bitwise(out, y)
    grad_out = np.empty_like(x)
    assert (
        numbabn.batch_norm_backward(g, x, None, mean, invstd, axis=axis, virtual_batch_size=v, out=grad_out)[0]
        is grad_out
    )
    assert_bitwise(grad_out, gi)
    f = np.asfortranarray(x)
    assert_bitwise(np.ascontiguousarray(numbabn.batch_norm_forward(f, axis=axis, virtual_batch_size=v)[0]), y)
    inplace = x.copy()
    numbabn.batch_norm_forward(inplace, axis=axis, virtual_batch_size=v, out=inplace)
    assert_bitwise(inplace, y)
