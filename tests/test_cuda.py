"""The GPU backend, specified against the float64 oracle and the CPU kernels.

Runs in numba's CUDA simulator (``conftest.py`` turns it on), on tiny arrays with a small
block size and block workload patched in, so every array spans many blocks and splits and
both kernel families run.  The simulator runs kernels as Python, so a separate test compiles
every kernel to PTX for a real GPU (``_ptx_check.py``).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_bitwise, assert_close, channel_shape, make_input, make_params, reduce_axes
from numba import cuda
from reference import backward as ref_backward
from reference import forward as ref_forward
from reference import stats as ref_stats

import numbabn
from numbabn import _config
from numbabn.cuda._launch import SIMULATED

#: (shape, axis): strided rows (inner >= 8 with the patched CUDA_MIN_INNER), channel-minor
#: rows (N, C), channels-last and short inner rows, rows not a multiple of the block width.
LAYOUTS = [((5, 3, 12), 1), ((37, 5), 1), ((3, 4, 3, 5), -1), ((4, 3, 2, 3), 1), ((2, 3, 20), 1)]
DTYPES = [np.float32, np.float64]
F16_TOL = 2e-3


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """8 threads a block (4 x 2 or 8 x 1), 16 elements a block before a split, 4 threads
    merging a channel's partials (so each takes several splits, then the tree)."""
    monkeypatch.setattr(_config, "CUDA_THREADS", 8)
    monkeypatch.setattr(_config, "CUDA_MERGE_THREADS", 4)
    monkeypatch.setattr(_config, "CUDA_BLOCK_ELEMS", 16)
    monkeypatch.setattr(_config, "CUDA_MIN_INNER", 8)


def dev(a):
    return None if a is None else cuda.to_device(np.ascontiguousarray(a))


def host(a):
    return a.copy_to_host()


def _ids(layouts):
    return [f"{'x'.join(map(str, s))}@{a}" for s, a in layouts]


@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=_ids(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_forward_backward_match_oracle_and_cpu(rng, shape, axis, dtype, training, affine):
    x = make_input(rng, shape, axis, dtype)
    c = shape[axis]
    w, b, rm, rv = make_params(rng, c, dtype)
    if not affine:
        w = b = None
    g = rng.standard_normal(shape).astype(dtype)
    drm, drv = dev(rm), dev(rv)
    y, mean, invstd = numbabn.batch_norm_forward(
        dev(x), dev(w), dev(b), drm, drv, training=training, momentum=0.2, axis=axis
    )
    assert isinstance(y, type(dev(x))) and y.shape == x.shape and y.dtype == x.dtype
    ey, emean, einvstd, erm, erv = ref_forward(x, w, b, rm, rv, training, 0.2, 1e-5, axis)
    assert_close(host(y), ey, dtype)
    assert_close(host(mean), emean, np.float64, rtol=1e-11)
    assert_close(host(invstd), einvstd, np.float64, rtol=1e-11)
    assert_close(host(drm), erm, dtype)
    assert_close(host(drv), erv, dtype)
    # The CPU kernels on the same data: same results to rounding of the blocked sums.
    cpu_rm, cpu_rv = rm.copy(), rv.copy()
    cy, cmean, cinvstd = numbabn.batch_norm_forward(x, w, b, cpu_rm, cpu_rv, training=training, momentum=0.2, axis=axis)
    assert_close(host(y), cy, dtype)
    assert_close(host(drv), cpu_rv, dtype)

    gi, gw, gb = numbabn.batch_norm_backward(dev(g), dev(x), dev(w), mean, invstd, training=training, axis=axis)
    egi, egw, egb = ref_backward(g, x, w, host(mean), host(invstd), training, axis)
    assert_close(host(gi), egi, dtype)
    n = x.size // c
    assert_close(host(gw), egw, dtype, scale=n)
    assert_close(host(gb), egb, dtype, scale=n)
    assert host(gw).dtype == dtype


@pytest.mark.parametrize("shape,axis", LAYOUTS[:3], ids=_ids(LAYOUTS[:3]))
def test_float16_storage_float32_arithmetic(rng, shape, axis):
    x = make_input(rng, shape, axis, np.float16)
    c = shape[axis]
    w, b, rm, rv = (a.astype(np.float32) for a in make_params(rng, c, np.float32))
    drm = dev(rm)
    y, mean, invstd = numbabn.batch_norm_forward(dev(x), dev(w), dev(b), drm, dev(rv), axis=axis)
    assert y.dtype == np.float16
    ey, emean, einvstd, erm, _ = ref_forward(x, w, b, rm, rv, True, 0.1, 1e-5, axis)
    assert_close(host(y), ey, np.float16, rtol=F16_TOL)
    assert_close(host(mean), emean, np.float64, rtol=1e-11)  # statistics stay float64
    assert_close(host(drm), erm, np.float32)
    g = rng.standard_normal(shape).astype(np.float16)
    gi, gw, gb = numbabn.batch_norm_backward(dev(g), dev(x), dev(w), mean, invstd, axis=axis)
    egi, egw, egb = ref_backward(g, x, w, host(mean), host(invstd), True, axis)
    assert gi.dtype == np.float16 and gw.dtype == np.float32
    assert_close(host(gi), egi, np.float16, rtol=F16_TOL)
    assert_close(host(gw), egw, np.float32, scale=x.size // c)


def test_float16_layer_parameters_and_running_statistics(rng):
    """``BatchNorm(dtype=float16, device="cuda")``: float16 weight, bias and running
    statistics, read into float64 arithmetic in the kernels, stores rounded to float16;
    training and eval forwards and backwards against the float64 oracle."""
    shape, c = (6, 3, 10), 3
    x = make_input(rng, shape, 1, np.float16)
    g = rng.standard_normal(shape).astype(np.float16)
    w, b, rm, rv = make_params(rng, c, np.float16)
    bn = numbabn.BatchNorm(c, dtype=np.float16, device="cuda", momentum=0.2)
    bn.load_state_dict({"weight": w, "bias": b, "running_mean": rm, "running_var": rv, "num_batches_tracked": 0})
    y = bn(dev(x))
    ey, emean, einvstd, erm, erv = ref_forward(x, w, b, rm, rv, True, 0.2, 1e-5, 1)
    assert y.dtype == np.float16 and bn.running_mean.dtype == np.float16
    assert_close(host(y), ey, np.float16, rtol=F16_TOL)
    # The EMA step in float64, rounded once to float16: the oracle rounded, to one ulp.
    for got, want in ((bn.running_mean, erm), (bn.running_var, erv)):
        np.testing.assert_allclose(host(got), want.astype(np.float16), rtol=2**-10, atol=2**-24)
    assert not np.array_equal(host(bn.running_mean), rm)
    gi = bn.backward(dev(g))
    egi, egw, egb = ref_backward(g, x, w, emean, einvstd, True, 1)
    assert gi.dtype == np.float16
    assert_close(host(gi), egi, np.float16, rtol=F16_TOL)
    assert_close(host(bn.grad_weight), egw, np.float16, rtol=F16_TOL, scale=x.size // c)
    assert_close(host(bn.grad_bias), egb, np.float16, rtol=F16_TOL, scale=x.size // c)
    bn.eval()
    rm1, rv1 = host(bn.running_mean), host(bn.running_var)
    ey, emean, einvstd, _, _ = ref_forward(x, w, b, rm1, rv1, False, 0.2, 1e-5, 1)
    assert_close(host(bn(dev(x))), ey, np.float16, rtol=F16_TOL)
    egi, _, _ = ref_backward(g, x, w, emean, einvstd, False, 1)
    assert_close(host(bn.backward(dev(g))), egi, np.float16, rtol=F16_TOL)
    np.testing.assert_array_equal(host(bn.running_mean), rm1)  # eval leaves them


@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=_ids(LAYOUTS))
@pytest.mark.parametrize(
    "dtype,threads,running",
    [(np.float64, 8, True), (np.float32, 64, False), (np.float16, 64, True)],
    ids=["float64-8-running", "float32-64", "float16-64-running"],
)
def test_one_launch_forward_and_backward_have_the_bits_of_three(rng, monkeypatch, shape, axis, dtype, threads, running):
    """Arrays whose every channel one reduction block covers (a large CUDA_BLOCK_ELEMS here)
    run the training forward and the backward (training and eval) in one launch each (the
    reduction, the per-channel step and the elementwise pass in the block); outputs, saved and
    running statistics and gradients have the bits of the three launches (CUDA_FUSE_ELEMS =
    0).  (4, 3, 2, 3) has short rows of several columns per channel: three launches either way."""
    from numbabn.cuda import _arrays

    monkeypatch.setattr(_config, "CUDA_THREADS", threads)
    monkeypatch.setattr(_config, "CUDA_BLOCK_ELEMS", 4096)
    names, real = [], _arrays.launch
    monkeypatch.setattr(_arrays, "launch", lambda kernel, *a: (names.append(kernel.__name__), real(kernel, *a)))
    x = make_input(rng, shape, axis, dtype)
    g = rng.standard_normal(shape).astype(dtype)
    g.flat[0] = -0.0  # a channel whose sums may be -0.0: the merge's sign of a zero
    pdtype = np.float32 if dtype == np.float16 else dtype
    w, b, rm, rv = (a.astype(pdtype) for a in make_params(rng, shape[axis], pdtype))
    results = {}
    for fuse in (1 << 18, 0):
        monkeypatch.setattr(_config, "CUDA_FUSE_ELEMS", fuse)
        names.clear()
        drm, drv = (dev(rm), dev(rv)) if running else (None, None)
        y, mean, invstd = numbabn.batch_norm_forward(
            dev(x), dev(w), dev(b), drm, drv, training=True, momentum=0.3, axis=axis
        )
        results[fuse] = [host(a) for a in (y, mean, invstd, *((drm, drv) if running else ()))]
        for training in (True, False):
            grads = numbabn.batch_norm_backward(dev(g), dev(x), dev(w), mean, invstd, training=training, axis=axis)
            results[fuse] += [host(a) for a in grads]
        results[fuse, "names"] = list(names)
    family = "strided" if len(shape) == 3 else "minor"
    if shape != (4, 3, 2, 3):
        assert results[1 << 18, "names"] == [f"train_{family}", f"backward_{family}", f"backward_{family}"]
    else:
        assert results[1 << 18, "names"] == results[0, "names"]
    assert len(results[0, "names"]) == 9
    for a, e in zip(results[1 << 18], results[0], strict=True):
        assert_bitwise(a, e)


def test_stability_large_mean_float32(rng):
    """|mean| / std = 1e4 in float32: exact statistics, where E[x^2] - E[x]^2 is garbage."""
    x = (1e4 + rng.standard_normal((40, 3, 9))).astype(np.float32)
    st = numbabn.welford(dev(x))
    _, _, evar = ref_stats(x)
    np.testing.assert_allclose(host(st.m2) / st.count, evar, rtol=1e-10)
    naive = (x * x).mean(axis=(0, 2)) - x.mean(axis=(0, 2)) ** 2  # float32, as a naive kernel would
    assert np.max(np.abs(naive - evar) / evar) > 0.1


@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=_ids(LAYOUTS))
def test_welford_and_merge_on_device(rng, shape, axis):
    x = make_input(rng, shape, axis, np.float64)
    whole = numbabn.welford(dev(x), axis=axis)
    parts = [numbabn.welford(dev(p), axis=axis) for p in np.array_split(x, 3, axis=0)]
    merged = numbabn.merge_stats(*parts)
    cpu = numbabn.welford(x, axis=axis)
    for s in (whole, merged):
        assert s.count == cpu.count
        np.testing.assert_allclose(host(s.mean), cpu.mean, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(host(s.m2), cpu.m2, rtol=1e-12)
    # to_array copies GPU statistics to the host: the payload of their host copies.
    on_host = numbabn.Stats(merged.count, host(merged.mean), host(merged.m2))
    np.testing.assert_array_equal(merged.to_array(), on_host.to_array())


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the simulator's float64 squares
@pytest.mark.parametrize("block_elems", [16, 4096], ids=["split", "one-block"])
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=_ids(LAYOUTS))
def test_float64_values_whose_squares_overflow(rng, monkeypatch, shape, axis, block_elems):
    """Values around 1e160, as on the CPU (``test_numerics``): a finite mean, ``m2 = inf``,
    outputs ``bias``, zero ``grad_input`` and ``grad_weight``; nothing NaN.  ``one-block``
    covers every channel with one reduction block, so the one-launch kernels run."""
    monkeypatch.setattr(_config, "CUDA_BLOCK_ELEMS", block_elems)
    x = 1e160 * make_input(rng, shape, axis, np.float64)
    w, b, _, _ = make_params(rng, shape[axis], np.float64)
    s = numbabn.welford(dev(x), axis=axis)
    np.testing.assert_allclose(host(s.mean), np.mean(x, axis=reduce_axes(x.ndim, axis)), rtol=1e-13, atol=1e-147)
    assert (host(s.m2) == np.inf).all()
    y, mean, invstd = numbabn.batch_norm_forward(dev(x), dev(w), dev(b), axis=axis)
    np.testing.assert_array_equal(host(y), np.broadcast_to(b.reshape(channel_shape(x.ndim, axis)), x.shape))
    assert (host(invstd) == 0.0).all() and np.isfinite(host(mean)).all()
    gi, gw, _ = numbabn.batch_norm_backward(dev(rng.standard_normal(x.shape)), dev(x), dev(w), mean, invstd, axis=axis)
    assert (host(gi) == 0.0).all() and (host(gw) == 0.0).all()


def test_deterministic_run_to_run(rng):
    x = make_input(rng, (37, 5), 1, np.float32)
    first = numbabn.batch_norm_forward(dev(x))
    second = numbabn.batch_norm_forward(dev(x))
    for a, b in zip(first, second, strict=True):
        assert_bitwise(host(a), host(b))


@pytest.mark.skipif(not SIMULATED, reason="numba device arrays transpose only in 2-D on hardware")
def test_dense_permutations_are_viewed_not_copied(rng):
    """A channels-last buffer seen as NCHW (PyTorch's channels_last) and an F-ordered array:
    both dense, both handled in place, outputs in the input's memory order."""
    nhwc = make_input(rng, (3, 4, 5, 6), -1, np.float64)
    d = dev(nhwc).transpose((0, 3, 1, 2))  # NCHW shape, channels-last memory
    y, _, _ = numbabn.batch_norm_forward(d, axis=1)
    x = nhwc.transpose(0, 3, 1, 2)
    assert y.strides == d.strides
    assert_close(host(y), ref_forward(x, None, None, None, None, True, 0.1, 1e-5, 1)[0], np.float64)
    f = np.asfortranarray(make_input(rng, (6, 4, 5), 1, np.float64))
    d = cuda.to_device(f)  # not dev(), which would make it C-contiguous
    y, _, _ = numbabn.batch_norm_forward(d)
    assert y.strides == d.strides
    assert_close(host(y), ref_forward(f, None, None, None, None, True, 0.1, 1e-5, 1)[0], np.float64)


def test_out_and_in_place(rng):
    x = make_input(rng, (5, 3, 12), 1, np.float32)
    expected = ref_forward(x, None, None, None, None, True, 0.1, 1e-5, 1)[0]
    out = cuda.device_array_like(x)
    assert numbabn.batch_norm(dev(x), None, None, training=True, out=out) is out
    assert_close(host(out), expected, np.float32)
    d = dev(x)
    numbabn.batch_norm(d, None, None, training=True, out=d)
    assert_close(host(d), expected, np.float32)


def test_batchnorm_layer_on_device_matches_cpu_layer(rng):
    x = make_input(rng, (6, 3, 10), 1, np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    gpu, cpu = numbabn.BatchNorm(3, device="cuda"), numbabn.BatchNorm(3)
    state = {k: v for k, v in cpu.state_dict().items()}
    state["weight"] = rng.uniform(0.5, 1.5, 3).astype(np.float32)
    cpu.load_state_dict(state)
    gpu.load_state_dict({k: dev(v) if v.ndim else v for k, v in state.items()})  # device values load too
    for _ in range(2):
        assert_close(host(gpu(dev(x))), cpu(x), np.float32)
        assert_close(host(gpu.backward(dev(g))), cpu.backward(g), np.float32)
    assert_close(host(gpu.grad_weight), cpu.grad_weight, np.float32, scale=60)
    assert_close(host(gpu.update_threshold), cpu.update_threshold, np.float64, rtol=1e-12)
    gs, cs = gpu.state_dict(), cpu.state_dict()
    assert all(type(v) is np.ndarray for v in gs.values())
    for k in cs:
        assert_close(gs[k], cs[k], np.float32, err_msg=k)
    gpu.eval(), cpu.eval()
    assert_close(host(gpu(dev(x))), cpu(x), np.float32)
    gpu.reset_parameters()
    assert np.all(host(gpu.running_var) == 1) and gpu.num_batches_tracked == 0
    assert "device='cuda'" in repr(gpu)


def test_batch_renorm_on_device_matches_cpu(rng):
    x = make_input(rng, (6, 3, 10), 1, np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    gpu = numbabn.BatchRenorm(3, device="cuda", rmax=1.2, dmax=0.3)
    cpu = numbabn.BatchRenorm(3, rmax=1.2, dmax=0.3)
    state = cpu.state_dict()
    state["weight"] = rng.uniform(0.5, 1.5, 3).astype(np.float32)
    state["running_mean"] = rng.normal(0.0, 2.0, 3).astype(np.float32)
    cpu.load_state_dict(state)
    gpu.load_state_dict(state)
    for _ in range(2):
        assert_close(host(gpu(dev(x))), cpu(x), np.float32)
        assert_close(host(gpu.backward(dev(g))), cpu.backward(g), np.float32)
        assert_close(gpu.r, cpu.r, np.float64, rtol=1e-6)
    assert np.any(cpu.d != 0)
    assert_close(host(gpu.grad_weight), cpu.grad_weight, np.float32, scale=60)
    assert_close(host(gpu.grad_bias), cpu.grad_bias, np.float32, scale=60)
    for k, v in cpu.state_dict().items():
        assert_close(gpu.state_dict()[k], v, np.float32, err_msg=k)
    gpu.eval(), cpu.eval()
    assert_close(host(gpu(dev(x))), cpu(x), np.float32)


def test_ghost_batches_on_device_match_cpu(rng):
    x = make_input(rng, (7, 3, 10), 1, np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    for cls, kw in ((numbabn.BatchNorm, {}), (numbabn.BatchRenorm, dict(rmax=1.2, dmax=0.3))):
        gpu = cls(3, device="cuda", virtual_batch_size=3, **kw)
        cpu = cls(3, virtual_batch_size=3, **kw)
        state = cpu.state_dict()
        state["running_mean"] = rng.normal(0.0, 2.0, 3).astype(np.float32)
        cpu.load_state_dict(state)
        gpu.load_state_dict(state)
        assert_close(host(gpu(dev(x))), cpu(x), np.float32)
        assert_close(host(gpu.backward(dev(g))), cpu.backward(g), np.float32)
        assert_close(host(gpu.grad_weight), cpu.grad_weight, np.float32, scale=60)
        assert_close(host(gpu.update_threshold), cpu.update_threshold, np.float64, rtol=1e-6)
        for k, v in cpu.state_dict().items():
            assert_close(gpu.state_dict()[k], v, np.float32, err_msg=k)


# -- masked statistics ---------------------------------------------------------------------------


def _mask(rng, shape, axis, keep=0.6):
    mshape = list(shape)
    mshape[axis % len(shape)] = 1
    return rng.random(mshape) < keep


def _as_mask(mask, kind):
    """``mask`` as the GPU call takes it: a NumPy array (copied to the device) or a device one."""
    return mask if kind == "numpy" else dev(mask)


def masked_oracle(x, mask, w, b, g, eps, axis):
    """float64 ``(y, mean, var, grad_input, grad_weight, grad_bias)`` of the masked training
    forward and its exact backward: statistics over the kept values, the statistics'
    gradient terms at the kept values only, sums over every value."""
    x, g = x.astype(np.float64), g.astype(np.float64)
    cs, red = channel_shape(x.ndim, axis), reduce_axes(x.ndim, axis)
    full = np.broadcast_to(mask, x.shape)
    kept = np.where(full, x, np.nan)
    mean, var = np.nanmean(kept, axis=red), np.nanvar(kept, axis=red)
    invstd = 1 / np.sqrt(var + eps)
    w = np.ones(mean.shape) if w is None else w.astype(np.float64)
    b = np.zeros(mean.shape) if b is None else b.astype(np.float64)
    xhat = (x - mean.reshape(cs)) * invstd.reshape(cs)
    y = xhat * w.reshape(cs) + b.reshape(cs)
    gb, gw = g.sum(axis=red), (g * xhat).sum(axis=red)
    a, n = (w * invstd).reshape(cs), int(mask.sum())
    gi = g * a - full * (a / n) * (gb.reshape(cs) + xhat * gw.reshape(cs))
    return y, mean, var, gi, gw, gb


MASK_CASES = [(np.float32, "numpy"), (np.float64, "device")]


#: Each layout once, the mask kinds and dtypes taking turns (the simulator is slow).
MASKED_LAYOUTS = [
    pytest.param(shape, axis, *MASK_CASES[i % 2], id=f"{_ids([(shape, axis)])[0]}-{MASK_CASES[i % 2][1]}")
    for i, (shape, axis) in enumerate(LAYOUTS)
]


@pytest.mark.parametrize("shape,axis,dtype,kind", MASKED_LAYOUTS)
def test_masked_forward_backward_match_oracle_and_cpu(rng, shape, axis, dtype, kind):
    """Masked training forward (NaN padding reaching no statistic) and backward on the GPU
    against the float64 oracle and the host kernels, both kinds of mask."""
    c = shape[axis]
    x = make_input(rng, shape, axis, dtype)
    w, b, rm, rv = make_params(rng, c, dtype)
    mask = _mask(rng, shape, axis)
    dropped = ~np.broadcast_to(mask, shape)
    padded = x.copy()
    padded[dropped] = np.nan
    drm, drv = dev(rm), dev(rv)
    y, mean, invstd = numbabn.batch_norm_forward(
        dev(padded), dev(w), dev(b), drm, drv, momentum=0.2, axis=axis, mask=_as_mask(mask, kind)
    )
    g = rng.standard_normal(shape).astype(dtype)
    ey, emean, evar, egi, egw, egb = masked_oracle(x, mask, w, b, g, 1e-5, axis)
    assert np.all(np.isnan(host(y)[dropped]))  # NaN padding normalized is NaN, and stays there
    assert_close(host(y)[~dropped], ey[~dropped], dtype)
    assert_close(host(mean), emean, np.float64, rtol=1e-11)
    assert_close(1 / host(invstd) ** 2 - 1e-5, evar, np.float64, rtol=1e-9)
    n = int(mask.sum())
    assert_close(host(drm), 0.8 * rm + 0.2 * emean, dtype)
    assert_close(host(drv), 0.8 * rv + 0.2 * evar * n / (n - 1), dtype)
    cpu_rm, cpu_rv = rm.copy(), rv.copy()
    cy, cmean, cinvstd = numbabn.batch_norm_forward(padded, w, b, cpu_rm, cpu_rv, momentum=0.2, axis=axis, mask=mask)
    assert_close(host(y)[~dropped], cy[~dropped], dtype)
    assert_close(host(drv), cpu_rv, dtype)

    # The backward of the forward on finite padding (every value's gradient is finite).
    _, mean, invstd = numbabn.batch_norm_forward(dev(x), dev(w), dev(b), axis=axis, mask=_as_mask(mask, kind))
    gi, gw, gb = numbabn.batch_norm_backward(dev(g), dev(x), dev(w), mean, invstd, axis=axis, mask=_as_mask(mask, kind))
    assert gi.dtype == gw.dtype == dtype
    assert_close(host(gi), egi, dtype)
    assert_close(host(gw), egw, dtype, scale=x.size // c)
    assert_close(host(gb), egb, dtype, scale=x.size // c)
    _, cmean, cinvstd = numbabn.batch_norm_forward(x, w, b, axis=axis, mask=mask)
    cgi, cgw, _ = numbabn.batch_norm_backward(g, x, w, cmean, cinvstd, axis=axis, mask=mask)
    assert_close(host(gi), cgi, dtype)
    assert_close(host(gw), cgw, dtype, scale=x.size // c)


@pytest.mark.parametrize("shape,axis", LAYOUTS[:3], ids=_ids(LAYOUTS[:3]))
def test_a_mask_keeping_everything_gives_the_unmasked_bits(rng, shape, axis):
    """With every value kept the masked kernels make the unmasked ones' arithmetic: the same
    outputs, statistics, running statistics and gradients, bit for bit."""
    c = shape[axis]
    x = make_input(rng, shape, axis, np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    w, b, rm, rv = make_params(rng, c, np.float32)
    results = []
    for mask in (None, dev(np.ones(_mask(rng, shape, axis).shape, bool))):
        drm, drv = dev(rm), dev(rv)
        y, mean, invstd = numbabn.batch_norm_forward(dev(x), dev(w), dev(b), drm, drv, axis=axis, mask=mask)
        grads = numbabn.batch_norm_backward(dev(g), dev(x), dev(w), mean, invstd, axis=axis, mask=mask)
        results.append([host(a) for a in (y, mean, invstd, drm, drv, *grads)])
    for a, e in zip(*results, strict=True):
        assert_bitwise(a, e)


@pytest.mark.parametrize("kind", ["numpy", "device"])
def test_masked_batchnorm_layer_on_device_matches_cpu_layer(rng, kind):
    """Two masked training steps (the backward reusing the forward's mask), then eval,
    which ignores the mask."""
    shape = (6, 3, 10)
    gpu, cpu = numbabn.BatchNorm(3, device="cuda"), numbabn.BatchNorm(3)
    state = cpu.state_dict()
    state["weight"] = rng.uniform(0.5, 1.5, 3).astype(np.float32)
    cpu.load_state_dict(state)
    gpu.load_state_dict(state)
    for _ in range(2):
        x = make_input(rng, shape, 1, np.float32)
        g = rng.standard_normal(shape).astype(np.float32)
        mask = _mask(rng, shape, 1)
        assert_close(host(gpu(dev(x), mask=_as_mask(mask, kind))), cpu(x, mask=mask), np.float32)
        assert_close(host(gpu.backward(dev(g))), cpu.backward(g), np.float32)
        assert_close(host(gpu.grad_weight), cpu.grad_weight, np.float32, scale=60)
        assert_close(host(gpu.update_threshold), cpu.update_threshold, np.float64, rtol=1e-12)
    for k, v in cpu.state_dict().items():
        assert_close(gpu.state_dict()[k], v, np.float32, err_msg=k)
    gpu.eval(), cpu.eval()
    assert_close(host(gpu(dev(x), mask=_as_mask(mask, kind))), cpu(x), np.float32)
    assert_close(host(gpu.backward(dev(g))), cpu.backward(g), np.float32)


def test_masked_batch_renorm_on_device_matches_cpu(rng):
    """r and d from the masked statistics, on the device as on the host."""
    shape = (6, 3, 10)
    x = make_input(rng, shape, 1, np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    mask = _mask(rng, shape, 1)
    gpu = numbabn.BatchRenorm(3, device="cuda", rmax=1.2, dmax=0.3)
    cpu = numbabn.BatchRenorm(3, rmax=1.2, dmax=0.3)
    state = cpu.state_dict()
    state["running_mean"] = rng.normal(0.0, 2.0, 3).astype(np.float32)
    cpu.load_state_dict(state)
    gpu.load_state_dict(state)
    assert_close(host(gpu(dev(x), mask=dev(mask))), cpu(x, mask=mask), np.float32)
    assert_close(gpu.r, cpu.r, np.float64, rtol=1e-6)
    assert_close(gpu.d, cpu.d, np.float64, rtol=1e-6)
    assert np.any(cpu.d != 0) and np.any(cpu.r != 1)
    assert_close(host(gpu.backward(dev(g))), cpu.backward(g), np.float32)
    assert_close(host(gpu.grad_weight), cpu.grad_weight, np.float32, scale=60)
    assert_close(host(gpu.grad_bias), cpu.grad_bias, np.float32, scale=60)
    for k, v in cpu.state_dict().items():
        assert_close(gpu.state_dict()[k], v, np.float32, err_msg=k)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the simulator's NaN arithmetic
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.parametrize("kind", ["numpy", "device"])
def test_a_mask_keeping_nothing_is_an_empty_batch_on_device(rng, kind):
    """NaN output and statistics, running statistics untouched, the batch counted; the
    backward gives the host's values (NaN where they are NaN), for BatchNorm and BatchRenorm."""
    shape = (5, 3, 12)
    x = make_input(rng, shape, 1, np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    none = np.zeros((5, 1, 12), bool)
    for cls, kw in ((numbabn.BatchNorm, {}), (numbabn.BatchRenorm, dict(rmax=1.2, dmax=0.3))):
        gpu, cpu = cls(3, device="cuda", **kw), cls(3, **kw)
        y = host(gpu(dev(x), mask=_as_mask(none, kind)))
        assert np.all(np.isnan(y)) and gpu.num_batches_tracked == 1
        assert np.all(host(gpu.running_mean) == 0) and np.all(host(gpu.running_var) == 1)
        cpu(x, mask=none)
        for a, e in zip(
            (host(gpu.backward(dev(g))), host(gpu.grad_weight), host(gpu.grad_bias)),
            (cpu.backward(g), cpu.grad_weight, cpu.grad_bias),
            strict=True,
        ):
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-4, equal_nan=True)
        if cls is numbabn.BatchRenorm:
            assert np.all(np.isnan(gpu.r)) and np.all(np.isnan(cpu.r))


@pytest.mark.parametrize("kind", ["numpy", "device"])
def test_one_kept_value_is_refused_on_device_with_nothing_changed(rng, kind):
    x = make_input(rng, (5, 3, 12), 1, np.float32)
    one = np.zeros((5, 1, 12), bool)
    one[2, 0, 7] = True
    bn = numbabn.BatchNorm(3, device="cuda")
    with pytest.raises(ValueError, match="a mask that keeps 1 value per channel"):
        bn(dev(x), mask=_as_mask(one, kind))
    assert bn.num_batches_tracked == 0 and np.all(host(bn.running_var) == 1) and np.all(host(bn.running_mean) == 0)


def _bad_masks():
    good = np.ones((5, 1, 12), bool)
    cases = [
        (lambda: good.astype(np.int8), TypeError, "mask must have dtype bool"),
        (lambda: dev(good.astype(np.uint8)), TypeError, "mask must have dtype bool"),
        (lambda: dev(np.ones((5, 3, 12), bool)), ValueError, r"mask must have shape \(5, 1, 12\)"),
        (lambda: np.ones((5, 12), bool), ValueError, r"mask must have shape \(5, 1, 12\)"),
        (lambda: [[True]], TypeError, "mask must be a GPU or NumPy bool array, got list"),
        (lambda: cuda.to_device(np.asfortranarray(good)), ValueError, "mask must be a dense GPU array with the"),
    ]
    ids = ["int8", "device-uint8", "device-shape", "ndim", "list", "device-F-order"]
    if SIMULATED:  # the simulator's arrays allow any strides
        cases.append((lambda: dev(np.ones((5, 1, 24), bool))[:, :, ::2], ValueError, "mask must be a dense GPU array"))
        ids.append("device-strided")
    return [pytest.param(*case, id=i) for case, i in zip(cases, ids, strict=True)]


@pytest.mark.parametrize("make,exc,match", _bad_masks())
def test_bad_masks_on_device_are_refused_with_nothing_changed(rng, make, exc, match):
    x = dev(make_input(rng, (5, 3, 12), 1, np.float32))
    bn = numbabn.BatchNorm(3, device="cuda")
    before = bn.state_dict()
    mask = make()
    with pytest.raises(exc, match=match):
        bn(x, mask=mask)
    with pytest.raises(exc, match=match):
        bn.eval()(x, mask=mask)  # checked in eval too, where it is ignored
    assert bn.num_batches_tracked == 0
    for k, v in bn.state_dict().items():
        assert_bitwise(v, before[k], k)
    rm, rv = dev(np.zeros(3, np.float32)), dev(np.ones(3, np.float32))
    with pytest.raises(exc, match=match):
        numbabn.batch_norm(x, rm, rv, training=True, mask=mask)
    assert np.all(host(rm) == 0) and np.all(host(rv) == 1)


def test_device_masks_in_the_input_memory_order(rng):
    """A channels-last input seen as NCHW takes a mask dense in that order (``(N, 1, H, W)``,
    the length-1 axis anywhere); an F-ordered input an F-ordered mask; NumPy masks any."""
    nhwc = make_input(rng, (3, 4, 5, 6), -1, np.float64)
    x = nhwc.transpose(0, 3, 1, 2)  # NCHW shape, channels-last memory
    mask = _mask(rng, x.shape, 1)
    want = numbabn.batch_norm_forward(x, mask=mask)[0]
    d = dev(nhwc).transpose((0, 3, 1, 2)) if SIMULATED else None
    if d is not None:  # numba device arrays transpose only in 2-D on hardware
        for m in (dev(mask), mask):
            assert_close(host(numbabn.batch_norm_forward(d, mask=m)[0]), want, np.float64)
    f = np.asfortranarray(make_input(rng, (6, 4, 5), 1, np.float64))
    fmask = _mask(rng, f.shape, 1)
    want = numbabn.batch_norm_forward(f, mask=fmask)[0]
    for m in (cuda.to_device(np.asfortranarray(fmask)), fmask, np.ascontiguousarray(fmask)):
        assert_close(host(numbabn.batch_norm_forward(cuda.to_device(f), mask=m)[0]), want, np.float64)


# -- bad input -----------------------------------------------------------------------------------


def _state(arrays):
    return [host(a).copy() for a in arrays]


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(weight=np.ones(3, np.float32)), TypeError, "weight is a host array"),
        (dict(weight=cuda.to_device(np.ones(4, np.float32))), ValueError, r"weight must have shape \(3,\)"),
        (dict(bias=cuda.to_device(np.ones(3, np.float64))), TypeError, "bias must have dtype float32"),
        (dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\]"),
        (dict(out=cuda.to_device(np.ones((4, 3, 12), np.float32))), ValueError, "out must have shape"),
        (dict(stream="fast"), TypeError, "stream must be"),
        (dict(axis=3), ValueError, "axis must be in"),
    ],
    ids=["host-weight", "weight-len", "bias-dtype", "momentum", "out-shape", "stream", "axis"],
)
def test_bad_input_leaves_buffers_untouched(rng, change, exc, match):
    x = dev(make_input(rng, (5, 3, 12), 1, np.float32))
    rm, rv = dev(np.full(3, 0.5, np.float32)), dev(np.full(3, 2.0, np.float32))
    before = _state([rm, rv])
    kwargs = dict(weight=None, bias=None, training=True, momentum=0.1, axis=1, out=None)
    kwargs.update(change)
    with pytest.raises(exc, match=match):
        numbabn.batch_norm(x, rm, rv, **kwargs)
    for a, b in zip(_state([rm, rv]), before, strict=True):
        assert_bitwise(a, b)


def test_mixing_host_and_device_is_a_type_error(rng):
    x = make_input(rng, (5, 3, 12), 1, np.float32)
    with pytest.raises(TypeError, match="running_mean is a GPU array .* input is a host array"):
        numbabn.batch_norm(x, dev(np.zeros(3, np.float32)), np.ones(3, np.float32), training=True)
    with pytest.raises(TypeError, match="grad_output is a host array"):
        numbabn.batch_norm_backward(x, dev(x), None, dev(np.zeros(3)), dev(np.ones(3)))
    with pytest.raises(TypeError, match="input must be a GPU array"):
        numbabn.BatchNorm(3, device="cuda")(x)
    with pytest.raises(ValueError, match="stream applies to GPU arrays only"):
        numbabn.batch_norm_forward(x, stream=0)


@pytest.mark.skipif(not SIMULATED, reason="the simulator's arrays allow any strides")
def test_non_dense_device_input_is_refused(rng):
    x = dev(make_input(rng, (6, 3, 10), 1, np.float32))[:, :, ::2]
    with pytest.raises(ValueError, match="input must be a dense GPU array"):
        numbabn.batch_norm_forward(x)


def test_require_says_what_is_missing(monkeypatch):
    import importlib.util

    from numbabn import _call
    from numbabn import cuda as backend

    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "0")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(_call, "_CUDA", [])  # as in a process that has not used the GPU yet
    missing = r"numba-cuda package, which is not installed: pip install 'numbabn\[cuda\]'"
    with pytest.raises(RuntimeError, match=missing):
        backend.require()
    with pytest.raises(RuntimeError, match="numba-cuda"):
        numbabn.BatchNorm(3, device="cuda")


@pytest.mark.parametrize("shape", [(4, 0), (0, 3), (0, 3, 5)], ids=["no-channels", "no-rows", "no-rows-3d"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_empty_inputs_match_the_cpu(shape, training):
    """Arrays with no elements: the same shapes, values (NaN statistics of an empty batch
    included) and dtypes as the CPU functions, forward and backward."""
    x = np.zeros(shape, np.float32)
    c = shape[1]
    stats = {} if training else {"running_mean": np.zeros(c, np.float32), "running_var": np.ones(c, np.float32)}
    want = numbabn.batch_norm_forward(x, training=training, **stats)
    got = numbabn.batch_norm_forward(dev(x), training=training, **{k: dev(v) for k, v in stats.items()})
    want_b = numbabn.batch_norm_backward(x, x, None, want[1], want[2], training=training)
    got_b = numbabn.batch_norm_backward(dev(x), dev(x), None, got[1], got[2], training=training)
    for a, b in zip((*got, *got_b), (*want, *want_b), strict=True):
        a = host(a)
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_configured_launches_are_reused_per_kernel_grid_block_and_stream(monkeypatch):
    """``_arrays.launch`` configures ``kernel[grid, block, stream]`` once per key and passes
    every call's arguments through (on hardware; the simulator configures each time)."""
    from numbabn.cuda import _arrays

    configured, ran = [], []

    class Kernel:
        def __getitem__(self, config):
            configured.append(config)
            return lambda *args: ran.append((config, args))

    monkeypatch.setattr(_arrays, "SIMULATED", False)
    monkeypatch.setattr(_arrays, "_LAUNCHERS", {})
    k = Kernel()
    _arrays.launch(k, (4, 2), (8, 1), 0, "x", 1)
    _arrays.launch(k, (4, 2), (8, 1), 0, "y", 2)
    _arrays.launch(k, (5, 2), (8, 1), 0, "z")
    assert configured == [((4, 2), (8, 1), 0), ((5, 2), (8, 1), 0)]
    assert [args for _, args in ran] == [("x", 1), ("y", 2), ("z",)]


def _numpy_refused_by_numba_cuda():
    """Why numba-cuda cannot compile kernels with the installed NumPy, or None.  numba-cuda
    0.30.4 still registers ``np.row_stack``, which NumPy 2.5 removed, when it loads its
    lowering; asked only where NumPy lacks ``row_stack``, in a process with the simulator off."""
    if hasattr(np, "row_stack"):
        return None
    code = "from numbabn.cuda import _require_compiler\n_require_compiler()"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if run.returncode == 0 or "row_stack" not in run.stderr:
        return None
    from importlib.metadata import version

    return (
        f"numba-cuda {version('numba-cuda')} cannot compile kernels with NumPy {np.__version__} "
        "(it needs np.row_stack, removed in NumPy 2.5); .ci/run compiles the PTX with numbabn[cuda]'s numpy<2.5"
    )


def test_require_names_a_numpy_that_numba_cuda_cannot_compile_with():
    """numba-cuda 0.30.4 breaks on NumPy 2.5 (np.row_stack is gone) only when it first compiles
    a kernel; require() finds that up front, in a fresh process with the simulator off.  An
    older NumPy is made to look like 2.5 by deleting ``np.row_stack``."""
    if not hasattr(np, "row_stack") and _numpy_refused_by_numba_cuda() is None:
        pytest.skip(f"numba-cuda compiles with NumPy {np.__version__}: nothing to refuse")
    code = (
        "import numpy\nif hasattr(numpy, 'row_stack'):\n    del numpy.row_stack\n"
        "from numbabn.cuda import require\n"
        "try:\n    require()\nexcept RuntimeError as e:\n    print(e)\n"
    )
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    said = run.stdout
    assert "numba-cuda" in said and f"NumPy {np.__version__}" in said and "row_stack" in said, said
    assert "pip install 'numpy<2.5'" in said, said


def test_kernels_compile_for_a_real_gpu():
    """numba-cuda's typing and NVVM accept every kernel for sm_90, all three dtypes."""
    refused = _numpy_refused_by_numba_cuda()
    if refused:
        pytest.skip(refused)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    script = os.path.join(os.path.dirname(__file__), "_ptx_check.py")
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    # 24 kernels x 3 dtypes, plus float16 data with float32 per-channel arrays (7 kernels).
    assert run.stdout.count("ok ") == 3 * 26 + 7, run.stdout


def test_gpu_check_command_runs(capsys):
    """``python -m numbabn check --device cuda``'s machinery on tiny shapes (in the simulator
    its timings mean nothing; its checks still compare with the float64 oracle)."""
    from numbabn.bench import check

    lines = []
    timing, checks = [("NC", (64, 8), 1)], [((40, 4), 1), ((3, 2, 12), 1)]
    assert check.gpu_check(timing, checks, dtypes=("float32",), reps=1, out=lines.append)
    assert sum(line.startswith("check") and line.endswith("ok") for line in lines) == 6
    assert any(line.startswith("NC 64x8") for line in lines)


def test_gpu_check_without_backend_says_why(monkeypatch, capsys):
    import importlib.util

    from numbabn.bench.cli import main

    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "0")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert main(["check", "--device", "cuda"]) == 2
    assert "pip install 'numbabn[cuda]'" in capsys.readouterr().err


def test_streams_of_every_library_are_accepted(rng):
    """A numba stream is used as is; CuPy's (``.ptr``), PyTorch's (``.cuda_stream``) and raw
    ``cudaStream_t`` ints are wrapped (0, the default stream, here: the simulator has no
    external streams); anything else is a TypeError naming ``stream``."""
    from types import SimpleNamespace

    from numbabn.cuda._arrays import stream_of

    s = cuda.stream()
    assert stream_of(s, None) is s
    for handle in (0, SimpleNamespace(ptr=0), SimpleNamespace(cuda_stream=0)):
        assert type(stream_of(handle, None)).__module__.startswith("numba")
    for bad in ("fast", 1.5, True):
        with pytest.raises(TypeError, match="stream must be a numba, CuPy or PyTorch stream"):
            stream_of(bad, None)
    x = make_input(rng, (5, 3, 12), 1, np.float32)
    y, _, _ = numbabn.batch_norm_forward(dev(x), stream=s)
    s.synchronize()
    assert_close(host(y), ref_forward(x, None, None, None, None, True, 0.1, 1e-5, 1)[0], np.float32)


@pytest.mark.skipif(not SIMULATED, reason="numba device arrays transpose only in 2-D on hardware")
def test_grad_output_must_share_the_input_layout(rng):
    """Same order (length-1 axes may carry any stride) is accepted; another order is a
    ValueError naming grad_output."""
    x = make_input(rng, (1, 3, 4, 5), 1, np.float64)
    y, mean, invstd = numbabn.batch_norm_forward(dev(x))
    g = np.ones_like(x)
    from numbabn.cuda._arrays import strided

    odd = strided(dev(g), g.shape, (8, *g.strides[1:]))  # another stride on the length-1 axis
    assert odd.strides[0] == 8
    got = numbabn.batch_norm_backward(odd, dev(x), None, mean, invstd)
    want = ref_backward(g, x, None, host(mean), host(invstd), True, 1)
    for a, e, scale in zip(got, want, (None, x.size // 3, x.size // 3), strict=True):
        assert_close(host(a), e, np.float64, scale=scale)
    f = np.asfortranarray(g)
    with pytest.raises(ValueError, match="grad_output must have the same memory layout as input"):
        numbabn.batch_norm_backward(cuda.to_device(f), dev(x), None, mean, invstd)


# -- host threads sharing one stream ---------------------------------------------------------------

THREADS = 4
ROUNDS = 2 if SIMULATED else 25  # calls of each kind per thread in the free-running test


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch goes through ``_arrays.launch``; in the simulator one at a time (its
    kernel context is process-wide, so two host threads cannot run kernels at once there).
    Setting ``launches.lockstep`` to a barrier makes the threads' launches alternate: each
    thread's k-th launch runs after every thread has done its (k-1)-th, as host threads on one
    stream may interleave them on a GPU."""
    import threading
    from types import SimpleNamespace

    from numbabn.cuda import _arrays

    real, lock = _arrays.launch, threading.Lock()
    state = SimpleNamespace(lockstep=None)

    def launch(*args):
        if state.lockstep is not None:
            state.lockstep.wait()
        if SIMULATED:
            with lock:
                real(*args)
        else:
            real(*args)

    monkeypatch.setattr(_arrays, "launch", launch)
    return state


def _threaded(fn, inputs):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(inputs)) as pool:
        return list(pool.map(fn, inputs))


def _train_forward(x):
    rm, rv = np.zeros(3, x.dtype), np.ones(3, x.dtype)
    y, mean, invstd = numbabn.batch_norm_forward(dev(x), None, None, drm := dev(rm), drv := dev(rv), momentum=0.5)
    return [host(a) for a in (y, mean, invstd, drm, drv)]


def _eval_forward(x):
    rm, rv = x.mean(axis=(0, 2)), x.var(axis=(0, 2))
    return [host(a) for a in numbabn.batch_norm_forward(dev(x), None, None, dev(rm), dev(rv), training=False)]


def _backward(x):
    g = np.cos(x)
    _, mean, invstd = numbabn.batch_norm_forward(x)
    return [host(a) for a in numbabn.batch_norm_backward(dev(g), dev(x), None, dev(mean), dev(invstd))]


def _welford(x):
    s = numbabn.welford(dev(x))
    return [np.array(s.count), host(s.mean), host(s.m2)]


def _cpu(fn, x):
    """The CPU functions on the same data, through the same wrapper (``dev``/``host`` are no-ops)."""
    g = globals()
    saved = g["dev"], g["host"]
    g["dev"], g["host"] = (lambda a: a), np.asarray
    try:
        return fn(x)
    finally:
        g["dev"], g["host"] = saved


CALLS = [_train_forward, _eval_forward, _backward, _welford]


def _inputs(rng):
    """One (9, 3, 8) float64 input per thread (three splits a channel with the patched blocks),
    each with its own per-channel means and scales, so one call's partials in another's
    results are far off."""
    return [make_input(rng, (9, 3, 8), 1, np.float64, loc=10.0 * (i + 1)) for i in range(THREADS)]


@pytest.mark.parametrize("fn", CALLS, ids=[f.__name__.strip("_") for f in CALLS])
def test_threads_on_one_stream_interleaving_launches_get_their_own_results(rng, launches, fn):
    """Host threads calling on the same (default) stream, their launches forced to alternate:
    each call's partials and coefficients are its own (work buffers shared per stream let a
    call read another's partials between its reduction and its finish launches)."""
    import threading

    xs = _inputs(rng)
    launches.lockstep = threading.Barrier(THREADS, timeout=60)
    got = _threaded(fn, xs)
    launches.lockstep = None
    for i, (x, results) in enumerate(zip(xs, got, strict=True)):
        for k, (a, e) in enumerate(zip(results, _cpu(fn, x), strict=True)):
            assert_close(a, e, np.float64, err_msg=f"thread {i}, result {k}")


def test_threads_on_one_stream_match_the_cpu(rng, launches):
    """4 host threads, each a few training forwards, backwards and statistics of its own inputs
    on the default stream, free-running (on a GPU their launches interleave as they come)."""
    xs = _inputs(rng)

    def work(x):
        return [fn(x + k) for k in range(ROUNDS) for fn in CALLS]

    got = _threaded(work, xs)
    for i, (x, results) in enumerate(zip(xs, got, strict=True)):
        want = [_cpu(fn, x + k) for k in range(ROUNDS) for fn in CALLS]
        for j, (r, e) in enumerate(zip(results, want, strict=True)):
            for a, b in zip(r, e, strict=True):
                assert_close(a, b, np.float64, err_msg=f"thread {i}, call {j}")


def test_calls_one_after_another_reuse_their_work_arrays(rng):
    """Uncontended, a call takes the work arrays the one before returned (no allocation per
    call): one free array per (stream, tag, dtype) after any number of sequential calls."""
    from numbabn.cuda import _arrays

    _arrays._FREE.clear()
    x = make_input(rng, (9, 3, 8), 1, np.float64)
    for fn in CALLS * 2:
        fn(x)
    assert _arrays._FREE and all(len(free) == 1 for free in _arrays._FREE.values()), _arrays._FREE
    with pytest.raises(RuntimeError, match="one_call"):
        _arrays.scratch("part", (3, 1, 3), "f8", cuda.default_stream())
