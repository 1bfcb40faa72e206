"""Which arrays live on a GPU: decided without importing ``numba.cuda`` unless one does."""


def is_device(a):
    """True for arrays in GPU memory: anything exporting ``__cuda_array_interface__`` (numba
    device arrays, CuPy arrays, PyTorch CUDA tensors) and the CUDA simulator's arrays."""
    if a is None:
        return False
    if getattr(a, "__cuda_ndarray__", False) is True:  # numba's, real or simulated
        return True
    try:
        return hasattr(a, "__cuda_array_interface__")  # PyTorch CPU tensors raise AttributeError
    except Exception:  # noqa: BLE001 - a broken property means "not a GPU array"
        return False


def host_stream(stream, what="a host input"):
    """Raise when a ``stream`` is given for work on the host."""
    if stream is not None:
        raise ValueError(f"stream applies to GPU arrays only, got stream={stream!r} with {what}")


def host_only(name, a):
    """Raise the mixing error when ``a`` is a GPU array in a call whose input is on the host."""
    if is_device(a):
        raise TypeError(
            f"{name} is a GPU array ({type(a).__name__}) but input is a host array: "
            "host and device arrays are not mixed; move one of them"
        )


def to_host(a):
    """A NumPy copy of the GPU array ``a`` (``numba.cuda`` imported here, for a GPU array only)."""
    if getattr(a, "__cuda_ndarray__", False) is not True:
        from numba import cuda

        a = cuda.as_cuda_array(a, sync=False)
    return a.copy_to_host()
