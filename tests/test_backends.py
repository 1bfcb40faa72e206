"""Every backend satisfies the backend contract (:mod:`numbabn._backend`), and its checked
inputs satisfy the input contract."""

import dask.array as da
import numpy as np
import pytest
from numba import cuda

from numbabn import _backend, _call
from numbabn import _dask_backend as dask_backend
from numbabn.cpu import api as host


def test_host_and_gpu_backends_run_every_stage():
    gpu = _call.cuda_backend()
    for backend in (host, gpu):
        assert isinstance(backend, _backend.PartBackend), backend.__name__
    assert isinstance(dask_backend, _backend.Backend)
    assert not isinstance(dask_backend, _backend.PartBackend)  # SyncBatchNorm refuses Dask parts


def test_each_backend_is_bound_to_its_inputs():
    """``_call`` loads each backend once and binds it: its ``Input.backend`` is the module."""
    for backend in (_call.backend_of(np.ones((2, 2))), _call.cuda_backend(), _call.dask_backend()):
        assert backend.Input.backend is backend, backend.__name__
    assert _call.backend_of(np.ones((2, 2))) is host
    assert _call.dask_backend() is dask_backend


@pytest.mark.parametrize("kind", ["numpy", "gpu", "dask"])
def test_checked_inputs(kind):
    x = np.ones((4, 3, 5), np.float32)
    arrays = {"numpy": lambda: x, "gpu": lambda: cuda.to_device(x), "dask": lambda: da.from_array(x, chunks=2)}
    inp = _call.check_input(arrays[kind](), 1, None)
    assert isinstance(inp, _backend.Input)
    assert isinstance(inp.backend, _backend.Backend)
    assert (inp.axis, inp.num_channels, inp.shape) == (1, 3, (4, 3, 5))
