"""Non-temporal stores (``numbabn/cpu/_stream.py``) change how outputs reach memory, never
their bits: every elementwise pass gives the same bytes with streaming forced on as with
plain stores, for every layout of the grid (both kernel families, serial and parallel,
fused and not) and for outputs at any alignment."""

import numpy as np
import pytest
from conftest import assert_bitwise, dtype_params, layout_params, make_input, make_params

import numbabn
from numbabn import _config


def _all_outputs(x, g, params, axis, out=None, gout=None):
    w, b, rm, rv = (p.copy() for p in params)
    y, mean, invstd = numbabn.batch_norm_forward(x, w, b, rm, rv, axis=axis, out=out)
    ye = numbabn.batch_norm(x, rm, rv, w, b, False, axis=axis)
    gi, gw, gb = numbabn.batch_norm_backward(g, x, w, mean, invstd, axis=axis, out=gout)
    return [np.array(a) for a in (y, ye, gi, gw, gb, rm, rv)]


@pytest.mark.parametrize("lay", layout_params())
@pytest.mark.parametrize("dtype", dtype_params())
def test_streamed_outputs_are_bitwise_the_plain_ones(rng, monkeypatch, lay, dtype):
    x = make_input(rng, lay.shape, lay.axis, dtype)
    g = rng.standard_normal(lay.shape).astype(dtype)
    params = make_params(rng, lay.channels, dtype)
    monkeypatch.setattr(_config, "STREAM_BYTES", 1 << 62)
    plain = _all_outputs(x, g, params, lay.axis)
    monkeypatch.setattr(_config, "STREAM_BYTES", 0)
    streamed = _all_outputs(x, g, params, lay.axis)
    for a, b in zip(plain, streamed, strict=True):
        assert_bitwise(a, b, lay.id)


@pytest.mark.parametrize("offset", [1, 3, 7])
@pytest.mark.parametrize("shape,axis", [((4, 6, 2000), 1), ((3000, 45), 1)], ids=["strided", "minor"])
def test_streaming_into_unaligned_outputs(rng, monkeypatch, offset, shape, axis):
    """Outputs starting off a 32-byte boundary: plain head, streamed body, plain tail."""
    x = make_input(rng, shape, axis, np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    params = make_params(rng, shape[axis], np.float32)
    size = x.size
    out = np.empty(size + offset, np.float32)[offset:].reshape(shape)
    gout = np.empty(size + offset, np.float32)[offset:].reshape(shape)
    monkeypatch.setattr(_config, "STREAM_BYTES", 1 << 62)
    plain = _all_outputs(x, g, params, axis)
    monkeypatch.setattr(_config, "STREAM_BYTES", 0)
    streamed = _all_outputs(x, g, params, axis, out=out, gout=gout)
    for a, b in zip(plain, streamed, strict=True):
        assert_bitwise(a, b, str(offset))
