"""Masks for masked statistics: a boolean array with the input's shape but 1 on the feature
axis, True where a value counts in the batch statistics (the same for every channel)."""

import numpy as np

from ._device import is_device


def check(mask, inp):
    """``mask`` checked against the checked input ``inp``: a NumPy bool array of the input's
    shape with 1 on the feature axis, in the input's memory order (copied when it is not:
    it is ``C`` times smaller than the input).  Returns ``(mask, kept)``, ``kept`` the number
    of True values, the masked count of every channel."""
    if not getattr(inp.backend, "MASKS", False):
        kind = "a GPU array" if inp.backend.DEVICE == "cuda" else "a Dask array"
        raise NotImplementedError(
            f"mask takes NumPy inputs, got {kind} input: masked statistics have host kernels only so far; "
            "compute on the host, or normalize without a mask"
        )
    if is_device(mask) or not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a NumPy bool array, got {type(mask).__name__}")
    expected = list(inp.shape)
    expected[inp.axis] = 1
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must have dtype bool (True where a value counts), got {mask.dtype}")
    if mask.shape != tuple(expected):
        raise ValueError(
            f"mask must have shape {tuple(expected)} (the input's, with 1 on the feature axis {inp.axis}: the "
            f"same mask for every channel), got {mask.shape}"
        )
    mask = np.ascontiguousarray(mask) if inp.c_order else np.asfortranarray(mask)
    return mask, int(np.count_nonzero(mask))


def view(mask, inp):
    """The kernels' view of a checked ``mask`` beside :meth:`Input.view` of the input:
    ``(outer, inner)`` for the channel-strided layouts, ``(outer // k, k * inner)`` for the
    channel-minor ones."""
    m = mask if inp.c_order else mask.T
    return m.reshape(inp.layout.view[0], -1)


def check_kept(kept):
    """A training call needs more than one kept value per channel, as an unmasked one needs
    more than one value (the unbiased variance divides by ``n - 1``); none is an empty batch."""
    if kept == 1:
        raise ValueError(
            "expected more than 1 value per channel when training, got a mask that keeps 1 value per channel"
        )
