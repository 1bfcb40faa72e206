"""Masks for masked statistics: a boolean array with the input's shape but 1 on the feature
axis, True where a value counts in the batch statistics (the same for every channel)."""

import numpy as np

from ._device import is_device


def check(mask, inp, use=True):
    """``mask`` checked against the checked input ``inp``: a bool array of the input's shape
    with 1 on the feature axis; for a NumPy input a NumPy array in the input's memory order
    (copied when it is not: it is ``C`` times smaller than the input), for a Dask input a
    Dask array chunked as the input, for a GPU input a GPU array as the GPU backend reads it
    (:func:`numbabn.cuda.api.mask_of`: a NumPy mask is copied to the device).  Returns
    ``(mask, kept)``, ``kept`` the number of True values, the masked count of every channel;
    ``(None, None)`` when ``use`` is False (eval, where the mask is checked and ignored)."""
    backend = inp.backend
    if not getattr(backend, "MASKS", False):
        raise NotImplementedError(
            f"mask is not supported for {type(inp.x).__name__} inputs: normalize without a mask, or on the host"
        )
    gpu = backend.DEVICE == "cuda"
    lazy = () if gpu else _dask_array_type(inp)
    if gpu and is_device(mask):
        from .cuda._arrays import as_numba

        mask = as_numba(mask)  # a numba view: NumPy's dtype and shape, for any library's array
    elif is_device(mask) or not isinstance(mask, (np.ndarray,) + lazy):
        kind = "a GPU or NumPy bool array" if gpu else "a NumPy or Dask bool array" if lazy else "a NumPy bool array"
        raise TypeError(f"mask must be {kind}, got {type(mask).__name__}")
    expected = list(inp.shape)
    expected[inp.axis] = 1
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must have dtype bool (True where a value counts), got {mask.dtype}")
    if mask.shape != tuple(expected):
        raise ValueError(
            f"mask must have shape {tuple(expected)} (the input's, with 1 on the feature axis {inp.axis}: the "
            f"same mask for every channel), got {mask.shape}"
        )
    if gpu:
        return backend.mask_of(mask, inp, use)
    if not use:
        return None, None
    if lazy:
        return _dask_mask(mask, inp)
    mask = np.ascontiguousarray(mask) if inp.c_order else np.asfortranarray(mask)
    return mask, int(np.count_nonzero(mask))


def _dask_array_type(inp):
    """``(dask.array.Array,)`` for a Dask input, else ``()``."""
    if not hasattr(inp, "c_order"):  # the Dask backend's inputs have no memory order
        import dask.array as da

        return (da.Array,)
    return ()


def _dask_mask(mask, inp):
    """A Dask input's mask as a Dask array chunked as the input (one chunk on the feature
    axis), and its True count, computed now (the mask is ``C`` times smaller than the
    input)."""
    import dask.array as da

    chunks = tuple((1,) if a == inp.axis else c for a, c in enumerate(inp.x.chunks))
    mask = da.from_array(mask, chunks=chunks) if isinstance(mask, np.ndarray) else mask.rechunk(chunks)
    return mask, int(da.count_nonzero(mask).compute())


def view(mask, c_order, lay):
    """The kernels' view of a ``mask`` in its input's memory order (C when ``c_order``, else
    F) beside the input's view of :class:`numbabn.cpu._plan.Layout` ``lay``: ``(outer,
    inner)`` for the channel-strided layouts, ``(outer // k, k * inner)`` for the
    channel-minor ones."""
    m = mask if c_order else mask.T
    columns = lay.view[2] if lay.strided else lay.view[1] // max(lay.num_channels, 1)
    return m.reshape(lay.view[0], columns)


def check_kept(kept):
    """A training call needs more than one kept value per channel, as an unmasked one needs
    more than one value (the unbiased variance divides by ``n - 1``); none is an empty batch."""
    if kept == 1:
        raise ValueError(
            "expected more than 1 value per channel when training, got a mask that keeps 1 value per channel"
        )
