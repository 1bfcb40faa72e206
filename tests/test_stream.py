"""Streaming stores for outputs beyond the last-level cache (``numbabn.cpu._stream``): the
same bits as plain stores on every layout, both dtypes and ``out`` arrays that start off a
16-byte boundary, through the training forward, the eval forward, ``apply`` (the stage of
Dask's tasks and SyncBatchNorm) and the backward in training and eval; and the rule that
picks them."""

import numpy as np
import pytest
from conftest import assert_bitwise, assert_close, by_tag, layout_params, make_case
from reference import forward as ref_forward

import numbabn
from numbabn._config import MIN_INNER
from numbabn.cpu import _stream
from numbabn.cpu import activation as act
from numbabn.cpu import backward as bwd
from numbabn.cpu import forward as fwd
from numbabn.cpu.api import parallel_for, views


def _calls(x, axis, weight, bias, running_mean, running_var, offset):
    """The training output, the updated running statistics, the eval output written into an
    ``out`` that starts ``offset`` elements into its buffer, and ``apply``'s output."""
    rm, rv = running_mean.copy(), running_var.copy()
    y = numbabn.batch_norm(x, rm, rv, weight, bias, training=True, axis=axis)
    out = np.empty(x.size + offset, x.dtype)[offset:].reshape(x.shape)
    assert numbabn.batch_norm(x, rm, rv, weight, bias, training=False, axis=axis, out=out) is out
    applied = np.empty_like(x)
    lay, (xv, av) = views(x, axis % x.ndim, x, applied)
    coef = np.stack([np.linspace(0.5, 2.0, x.shape[axis]), np.linspace(-1.0, 1.0, x.shape[axis])])
    fwd.apply(parallel_for(x.size, lay.inner), lay, xv, coef, av)
    return y, rm, rv, out, applied


@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("lay", layout_params())
def test_streaming_stores_write_the_same_bits(rng, monkeypatch, lay, dtype, offset):
    x, weight, bias, running_mean, running_var = make_case(rng, lay, dtype, True)
    plain = _calls(x, lay.axis, weight, bias, running_mean, running_var, offset)
    monkeypatch.setattr(_stream, "STREAM_BYTES", 0)  # every output streams
    streamed = _calls(x, lay.axis, weight, bias, running_mean, running_var, offset)
    if lay.inner >= MIN_INNER:  # the channel-strided kernels
        assert fwd.apply_strided_stream.serial.overloads or fwd.apply_strided_stream.parallel.overloads
    else:
        assert fwd.affine_rows_stream.overloads
    for a, b in zip(plain, streamed, strict=True):
        assert_bitwise(a, b, lay.id)
    y, *_ = ref_forward(x, weight, bias, running_mean, running_var, True, 0.1, 1e-5, lay.axis)
    assert_close(streamed[0], y, dtype)


def _activated(x, z, axis, weight, bias, running_mean, running_var):
    """The training and eval forwards with each activation mode: ReLU, residual, both."""
    results = []
    for activation, residual in (("relu", None), (None, z), ("relu", z)):
        rm, rv = running_mean.copy(), running_var.copy()
        for training in (True, False):
            results.append(
                numbabn.batch_norm(
                    x, rm, rv, weight, bias, training, axis=axis, activation=activation, residual=residual
                )
            )
        results += [rm, rv]
    return results


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("lay", layout_params())
def test_streaming_activated_forward_writes_the_same_bits(rng, monkeypatch, lay, dtype):
    x, weight, bias, running_mean, running_var = make_case(rng, lay, dtype, True)
    z = rng.standard_normal(lay.shape).astype(dtype)
    z.flat[::11] = np.nan  # NaN through the residual stays NaN after the ReLU
    plain = _activated(x, z, lay.axis, weight, bias, running_mean, running_var)
    monkeypatch.setattr(_stream, "STREAM_BYTES", 0)
    streamed = _activated(x, z, lay.axis, weight, bias, running_mean, running_var)
    for a, b in zip(plain, streamed, strict=True):
        assert_bitwise(a, b, lay.id)
    if lay.inner >= MIN_INNER:  # channel-strided: the activated pass streams
        stream = act.apply_act_strided_stream
        assert stream.serial.overloads or stream.parallel.overloads, "the streaming driver never ran"


def _backwards(x, g, axis, weight, mean, invstd, x_bad):
    """The functional backward in training and in eval (with a non-finite ``x_bad``, which
    eval's ``grad_input = g * weight * invstd`` must not read), each into an ``out`` three
    elements into its buffer."""
    results = []
    for training, xx in ((True, x), (False, x_bad)):
        out = np.empty(x.size + 3, x.dtype)[3:].reshape(x.shape)
        gi, gw, gb = numbabn.batch_norm_backward(g, xx, weight, mean, invstd, training=training, axis=axis, out=out)
        assert gi is out
        results += [gi, gw, gb]
    return results


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("lay", layout_params())
def test_streaming_backward_writes_the_same_bits(rng, monkeypatch, lay, dtype):
    x, weight, *_ = make_case(rng, lay, dtype, True)
    g = rng.standard_normal(lay.shape).astype(dtype)
    g.flat[::7] = 0.0  # zeros times negative weights: -0.0, as the plain pass gives
    mean, invstd = rng.normal(size=lay.channels), rng.uniform(0.5, 2.0, lay.channels)
    x_bad = x.copy()
    x_bad.flat[::5] = np.nan
    plain = _backwards(x, g, lay.axis, weight, mean, invstd, x_bad)
    monkeypatch.setattr(_stream, "STREAM_BYTES", 0)
    streamed = _backwards(x, g, lay.axis, weight, mean, invstd, x_bad)
    for a, b in zip(plain, streamed, strict=True):
        assert_bitwise(a, b, lay.id)
    assert np.isfinite(streamed[3]).all()
    kernels = views(x, lay.ax, x)[0]
    if kernels.strided and not kernels.fused_backward:  # the backward that streams
        stream = bwd.grad_apply_strided_stream
        assert stream.serial.overloads or stream.parallel.overloads, "the streaming driver never ran"


@pytest.mark.parametrize("lay", layout_params(by_tag("NC", "NHWC", "NCHW", "big-NC", "big-NCHW")))
def test_streaming_in_place_gives_the_same_bits(rng, monkeypatch, lay):
    """``out=input``: each vector is loaded before it is streamed over."""
    x, weight, bias, running_mean, running_var = make_case(rng, lay, np.float32, True)
    expected = numbabn.batch_norm(x, running_mean, running_var, weight, bias, axis=lay.axis)
    monkeypatch.setattr(_stream, "STREAM_BYTES", 0)
    y = numbabn.batch_norm(x, running_mean, running_var, weight, bias, axis=lay.axis, out=x)
    assert y is x
    assert_bitwise(x, expected, lay.id)


def test_streams_only_large_float32_and_float64_outputs(monkeypatch):
    monkeypatch.setattr(_stream, "STREAM_BYTES", 4000)
    assert _stream.streams(np.empty(1000, np.float32))
    assert _stream.streams(np.empty((25, 20), np.float64))
    assert not _stream.streams(np.empty(999, np.float32))
    assert not _stream.streams(np.empty(4000, np.float16))  # float16 bits keep plain stores


def test_last_level_cache_is_the_largest_cache_linux_lists(tmp_path):
    for name, size in [("index0", "32K"), ("index2", "1024K"), ("index3", "32768K")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(size + "\n")
    (tmp_path / "uevent").write_text("")
    assert _stream._last_level_cache(str(tmp_path)) == 32 << 20
    assert _stream._last_level_cache(str(tmp_path / "missing")) == 32 << 20  # the default
    (tmp_path / "index3" / "size").write_text("256M\n")
    assert _stream._last_level_cache(str(tmp_path)) == 256 << 20
