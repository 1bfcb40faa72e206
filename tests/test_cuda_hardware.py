"""On a real GPU only: PyTorch CUDA tensors and CuPy arrays through the public API (the
caller's kind of array back, channels_last kept, the caller's current stream used), and
run-to-run determinism of the device's parallel reductions.

The CUDA simulator runs one block at a time and has no PyTorch or CuPy arrays, so none of
this can run there: ``tools/gpu_check.sh`` runs this file with the simulator off.
"""

import numpy as np
import pytest
from conftest import assert_bitwise
from numba import cuda

import numbabn
from numbabn.cuda._launch import SIMULATED

pytestmark = pytest.mark.skipif(
    SIMULATED or not cuda.is_available(), reason="needs a real CUDA GPU (run with NUMBA_ENABLE_CUDASIM=0 on one)"
)


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip(f"PyTorch {torch.__version__} here has no CUDA device")
    return torch


def _cupy():
    return pytest.importorskip("cupy", reason="CuPy is not installed")


def _check_against_cpu(x_host, y, mean, invstd, axis):
    ref_y, ref_mean, ref_invstd = numbabn.batch_norm_forward(x_host, axis=axis)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(invstd, ref_invstd, rtol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_torch_cuda_tensors_in_torch_tensors_out(channels_last):
    torch = _torch_cuda()
    x = torch.randn(8, 16, 9, 9, device="cuda") * 2 + 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y, mean, invstd = numbabn.batch_norm_forward(x)
    torch.cuda.synchronize()
    for a in (y, mean, invstd):
        assert isinstance(a, torch.Tensor) and a.is_cuda
    assert y.stride() == x.stride()  # the input's memory layout
    x_host = x.cpu().numpy()
    _check_against_cpu(x_host, y.cpu().numpy(), mean.cpu().numpy(), invstd.cpu().numpy(), 1)
    g = torch.randn_like(x)
    gi, gw, gb = numbabn.batch_norm_backward(g, x, None, mean, invstd)
    torch.cuda.synchronize()
    assert isinstance(gi, torch.Tensor) and gi.stride() == x.stride()
    ref = numbabn.batch_norm_backward(g.cpu().numpy(), x_host, None, mean.cpu().numpy(), invstd.cpu().numpy())
    for a, e in zip((gi, gw, gb), ref, strict=True):
        np.testing.assert_allclose(a.cpu().numpy(), e, rtol=1e-4, atol=1e-4)
    s = numbabn.welford(x)
    assert isinstance(s.mean, torch.Tensor)
    np.testing.assert_allclose(s.mean.cpu().numpy(), numbabn.welford(x_host).mean, rtol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_torch_bool_masks_on_torch_tensors(channels_last):
    """A torch.bool CUDA mask of shape (N, 1, H, W) (read where it lies, in the input's
    memory order) and a NumPy one (copied): the host's masked results."""
    torch = _torch_cuda()
    x = torch.randn(8, 16, 9, 9, device="cuda") * 2 + 3
    mask = torch.rand(8, 1, 9, 9, device="cuda") < 0.7
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        mask = mask.contiguous(memory_format=torch.channels_last)
    x_host, m_host, g = x.cpu().numpy(), mask.cpu().numpy(), torch.randn_like(x)
    ref_y, ref_mean, ref_invstd = numbabn.batch_norm_forward(x_host, mask=m_host)
    ref = numbabn.batch_norm_backward(g.cpu().numpy(), x_host, None, ref_mean, ref_invstd, mask=m_host)
    for m in (mask, m_host):
        y, mean, invstd = numbabn.batch_norm_forward(x, mask=m)
        grads = numbabn.batch_norm_backward(g, x, None, mean, invstd, mask=m)
        torch.cuda.synchronize()
        np.testing.assert_allclose(y.cpu().numpy(), ref_y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(mean.cpu().numpy(), ref_mean, rtol=1e-12, atol=1e-12)
        for a, e in zip(grads, ref, strict=True):
            np.testing.assert_allclose(a.cpu().numpy(), e, rtol=1e-4, atol=1e-4)


def test_torch_layer_on_the_gpu_and_the_current_stream():
    torch = _torch_cuda()
    from numbabn.cuda import _arrays

    bn = numbabn.BatchNorm(16, device="cuda")
    x = torch.randn(4, 16, 7, 7, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert int(_arrays.stream_of(None, x)) == side.cuda_stream  # the caller's current stream
        y = bn(x)
        gi = bn.backward(torch.ones_like(y))
    side.synchronize()
    assert isinstance(y, torch.Tensor) and isinstance(gi, torch.Tensor)
    ref = numbabn.BatchNorm(16)
    np.testing.assert_allclose(y.cpu().numpy(), ref(x.cpu().numpy()), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean.copy_to_host(), ref.running_mean, rtol=1e-6, atol=1e-7)


def test_cupy_arrays_in_cupy_arrays_out_on_the_current_stream():
    cp = _cupy()
    from numbabn.cuda import _arrays

    x = cp.random.standard_normal((64, 32), dtype=cp.float32) * 3 + 1
    with cp.cuda.Stream() as side:
        assert int(_arrays.stream_of(None, x)) == side.ptr
        y, mean, invstd = numbabn.batch_norm_forward(x)
    side.synchronize()
    for a in (y, mean, invstd):
        assert isinstance(a, cp.ndarray)
    _check_against_cpu(cp.asnumpy(x), cp.asnumpy(y), cp.asnumpy(mean), cp.asnumpy(invstd), 1)
    nhwc = cp.ascontiguousarray(cp.random.standard_normal((4, 6, 6, 32), dtype=cp.float32))
    s = numbabn.welford(nhwc, axis=-1)
    assert isinstance(s.mean, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(s.m2), numbabn.welford(cp.asnumpy(nhwc), axis=-1).m2, rtol=1e-12)


@pytest.mark.parametrize("shape, axis", [((64, 32, 56, 56), 1), ((32, 28, 28, 64), -1), ((65536, 64), 1)])
def test_device_results_are_bitwise_identical_run_to_run(shape, axis):
    """Many blocks per channel and concurrent merges on a real device (where scheduling
    varies from run to run, unlike the simulator's one block at a time), masked calls too."""
    rng = np.random.default_rng(0)
    x = cuda.to_device((rng.standard_normal(shape) * 2 + 5).astype(np.float32))
    g = cuda.to_device(rng.standard_normal(shape).astype(np.float32))
    mask = cuda.to_device(rng.random(tuple(1 if a == axis % len(shape) else n for a, n in enumerate(shape))) < 0.7)
    runs = []
    for _ in range(3):
        y, mean, invstd = numbabn.batch_norm_forward(x, axis=axis)
        gi, gw, gb = numbabn.batch_norm_backward(g, x, None, mean, invstd, axis=axis)
        s = numbabn.welford(x, axis=axis)
        masked = numbabn.batch_norm_forward(x, axis=axis, mask=mask)
        masked += numbabn.batch_norm_backward(g, x, None, *masked[1:], axis=axis, mask=mask)
        runs.append([a.copy_to_host() for a in (y, mean, invstd, gi, gw, gb, s.mean, s.m2, *masked)])
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert_bitwise(a, b)
