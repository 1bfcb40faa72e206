"""The backend contract: what :mod:`numbabn.cpu.api` (NumPy arrays), :mod:`numbabn.cuda.api`
(GPU arrays) and :mod:`numbabn._dask_backend` (Dask arrays) provide, as
:class:`typing.Protocol`\\ s that each backend module satisfies (``tests/test_backends.py``
checks them).

Backends receive checked calls only (:mod:`numbabn._call`): they never validate arguments
again.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Input(Protocol):
    """A checked input of one backend: the array, its feature axis and the checks of the
    arrays that come with it."""

    original: Any  # the array as the caller gave it (alias checks compare its memory)
    x: Any  # the backend's array
    axis: int  # non-negative
    num_channels: int
    dtype: Any
    shape: tuple
    backend: Backend

    def per_channel(self, a: Any, name: str, *, writable: bool = False, save: bool = False) -> Any:
        """A checked per-channel array of shape ``(C,)`` (None passes through)."""

    def like_input(self, a: Any, name: str, *, writable: bool = False) -> Any:
        """A checked array of the input's shape and dtype."""


@runtime_checkable
class Backend(Protocol):
    """A backend module: checked calls in, the backend's kind of arrays out."""

    #: ``"cpu"`` or ``"cuda"``: where its arrays live (``BatchNorm(device=...)``'s spelling).
    DEVICE: str
    Input: type

    def forward(self, call: Any) -> tuple:
        """A :class:`numbabn._call.ForwardCall` to ``(output, save_mean, save_invstd)``."""

    def backward(self, call: Any) -> tuple:
        """A :class:`numbabn._call.BackwardCall` to ``(grad_input, grad_weight, grad_bias,
        abs_grad_sum)``."""

    def batch_stats(self, inp: Input) -> tuple:
        """An input's ``(count, mean, m2)`` (:func:`numbabn.welford`)."""

    def scaled(self, a: Any, factor: float) -> Any:
        """``a * factor`` as float64, on the backend's kind of array."""

    def relu_grad(self, inp: Input, grad_output: Any, output: Any) -> Any:
        """A new array of ``grad_output`` where ``output > 0``, else 0 (the ReLU's backward)."""


@runtime_checkable
class PartBackend(Backend, Protocol):
    """A backend that also runs the stages of a training step whose statistics are merged
    elsewhere (SyncBatchNorm's processes): the host and the GPU backends."""

    def part_stats(self, inp: Input, mask: Any = None, kept: int | None = None) -> Any:
        """The part's statistics as a host float64 array ``[count, mean, m2]``; of the values
        a checked ``mask`` keeps when given (``kept``: its True count)."""

    def forward_with_stats(self, call: Any, stats: Any) -> tuple:
        """A training forward normalized with statistics merged elsewhere, (3, C) float64."""

    def part_sums(self, call: Any) -> Any:
        """The part's backward reduction, a host (3, C) float64 array."""

    def backward_with_sums(self, call: Any, sums: Any, n: float) -> tuple:
        """A backward whose reduction ``sums`` over ``n`` values per channel was summed
        elsewhere."""
