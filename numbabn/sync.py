"""``SyncBatchNorm``: a :class:`~numbabn.BatchNorm` whose training steps normalize with the
statistics of the global batch that several processes hold parts of.

Each training forward exchanges one small float64 payload per process (its part's
:class:`~numbabn.Stats`, ``2 C + 1`` numbers) and each backward the per-channel gradient
sums (``3 C`` numbers), through one ``allgather`` each; everything else is the
single-process kernels, on the local part.  The parts are merged in rank order, the same
order on every rank, so every rank computes the same bits.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

from ._backend import PartBackend
from .layer import DEFAULT_MOMENTUM, BatchNorm
from .stats import merge_parts as _merge_parts


class SyncBatchNorm(BatchNorm):
    """Batch normalization over a batch split across processes (data-parallel training).

    A :class:`BatchNorm` (same parameters, buffers, state-dict keys and methods) whose
    training steps agree across the processes of ``comm``: every rank normalizes with the
    mean and variance of the global batch (all ranks' inputs together), updates the same
    running statistics, and gets the gradients of the global batch's normalization.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, axis, dtype, decay, device,
    activation
        As :class:`BatchNorm`.  With ``device="cuda"`` the data, parameters and buffers stay
        on the GPU and only the small payloads below go through the host.
    comm : object with ``allgather(obj) -> list``, optional
        The processes' communicator: ``allgather`` takes this rank's object and returns
        every rank's object in rank order.  An mpi4py communicator as it is
        (``MPI.COMM_WORLD``), or a small wrapper around ``torch.distributed`` (see the
        data-parallel page of the guide).  ``None`` makes a plain :class:`BatchNorm`.

    Notes
    -----
    Training forward: each rank computes its part's statistics ``(count, mean, M2)``
    (:func:`numbabn.welford`), sends ``("forward", C, dtype, axis, momentum,
    num_batches_tracked, Stats.to_array())`` in one ``allgather`` (``num_batches_tracked``
    only with ``momentum=None``, else None), and merges the received parts left to right in
    rank order with Chan's formula (that of :func:`numbabn.merge_stats`), as one array's
    blocks are merged.  The global ``count``, ``mean`` and ``M2`` give the normalization and
    the running-statistics update (unbiased variance ``M2 / (count - 1)`` of the global
    batch)::

        n = na + nb;  d = mean_b - mean_a
        mean = mean_a + d * nb / n
        M2   = M2_a + M2_b + d**2 * na * nb / n

    Training backward: each rank reduces its part to ``(sum g, sum g * (x - mean),
    sum |g|)`` per channel, and the ranks' sums, exchanged in one ``allgather``, are added in
    rank order; ``grad_input`` follows from the global sums over the global ``n``, and
    ``grad_weight``, ``grad_bias`` and ``update_threshold`` are the global batch's, the same
    bits on every rank.

    A ``comm`` that also has mpi4py's buffer methods ``Allgather(sendbuf, recvbuf)`` and
    ``Get_size()`` (every mpi4py communicator) exchanges float64 buffers instead of pickled
    objects: first a header of seven numbers per rank (step, ``C``, dtype, ``axis``,
    ``momentum``, ``num_batches_tracked`` with ``momentum=None``, whether the rank's checks
    failed), then, when every header agrees and none failed, the payloads; otherwise every
    rank makes the object exchange, whose checks raise the errors below.

    Ranks may hold different batch sizes, empty ones included (an empty part gives an empty
    output).  The global batch needs more than one value per channel; otherwise, and when
    any rank's step fails its checks (a bad input, ranks disagreeing on ``num_features``,
    ``dtype``, ``axis`` or ``momentum``, or with ``momentum=None`` on
    ``num_batches_tracked``, which weighs the update), every rank raises the same error and
    no rank changes its state.  Eval mode exchanges nothing.  Every rank must make the same
    training calls in the same order (each is a collective operation): a rank that skips
    one, or is in eval mode while the others train, leaves the others waiting in
    ``allgather``.

    ``comm`` is not pickled (nor deep-copied): an unpickled layer has ``comm=None`` until it
    is given one again (``layer.comm = MPI.COMM_WORLD``).

    Examples
    --------
    Run with ``mpiexec -n 4 python train.py``; each rank trains on its own part of each
    global batch:

    >>> from mpi4py import MPI  # doctest: +SKIP
    >>> bn = numbabn.SyncBatchNorm(64, comm=MPI.COMM_WORLD)  # doctest: +SKIP
    >>> y = bn(x_local)  # doctest: +SKIP
    >>> grad_x_local = bn.backward(grad_y_local)  # doctest: +SKIP
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = DEFAULT_MOMENTUM,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        axis: int = 1,
        dtype: Any = np.float32,
        decay: float | None = None,
        device: str = "cpu",
        comm: Any = None,
        activation: str | None = None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            axis=axis,
            dtype=dtype,
            decay=decay,
            device=device,
            activation=activation,
        )
        self.comm = comm
        self._wire = None  # the _Wire of self.comm, made on first use
        self._check_comm()
        # Values per channel of the last forward's global batch when that forward was
        # synchronized (its backward then is too), else None.
        self._sync_count = None
        self._exchanged = False

    @classmethod
    def from_batchnorm(cls, bn: BatchNorm, comm: Any) -> SyncBatchNorm:
        """A :class:`SyncBatchNorm` with ``bn``'s settings (``eps``, ``momentum``, ``affine``,
        ``track_running_stats``, ``axis``, ``dtype``, ``device``, train/eval mode) and
        copies of its parameters and buffers, as ``torch.nn.SyncBatchNorm.
        convert_sync_batchnorm`` converts a module; ``bn`` is left as it was."""
        if not isinstance(bn, BatchNorm):
            raise TypeError(f"bn must be a numbabn.BatchNorm, got {type(bn).__name__}")
        new = cls(
            bn.num_features,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            axis=bn.axis,
            dtype=bn.dtype,
            device=bn.device,
            comm=comm,
            activation=bn.activation,
        )
        new.load_state_dict(bn.state_dict())
        return new.train(bn.training)

    def _check_comm(self):
        """The :class:`_Wire` of ``self.comm`` (None without one), made and checked when the
        communicator is new: it may have been assigned since the constructor."""
        comm = self.comm
        wire = self._wire
        if wire is not None and wire.comm is comm:
            return wire
        if comm is None:
            return None
        if not callable(getattr(comm, "allgather", None)):
            raise TypeError(
                "comm must have an allgather(obj) -> list method returning every rank's obj in rank order "
                f"(an mpi4py communicator such as MPI.COMM_WORLD, or a wrapper), or be None; got {type(comm).__name__}"
            )
        self._wire = _Wire(comm)
        return self._wire

    def _syncing(self):
        """Whether a forward now is synchronized: training mode with a communicator."""
        return self.comm is not None and self.training

    def _syncs(self):
        """:meth:`_syncing`, with the communicator checked: once per step, in
        :meth:`forward`."""
        if not self._syncing():
            return False
        self._check_comm()
        return True

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: Any, residual: Any = None, mask: Any = None) -> Any:
        """Normalize ``x``, this rank's part of the global batch; in training mode with a
        ``comm``, with the global batch's statistics (a collective call: every rank makes
        it).  See :meth:`BatchNorm.forward` and the class notes; with a ``mask`` the global
        statistics are those of the values every rank's mask keeps; ``residual`` is this
        rank's part."""
        if not self._syncs():
            return super().forward(x, residual, mask)
        return self._collective("forward", functools.partial(super().forward, residual=residual, mask=mask), x)

    __call__ = forward

    def _forward_call(self, inp, part=False, mask=None, residual=None):
        return super()._forward_call(inp, part=part or self._syncing(), mask=mask, residual=residual)

    def _run_forward(self, call):
        if not (call.training and self._syncing()):
            result = call.run()
            self._sync_count = None
            return result
        inp = call.inp
        backend = inp.backend
        if not isinstance(backend, PartBackend):
            raise TypeError(
                f"SyncBatchNorm's synchronized training takes NumPy arrays (GPU arrays on device 'cuda'), got "
                f"{type(inp.x).__name__} (compute a Dask array's part first)"
            )
        # With momentum=None the update weighs the batch by 1 / num_batches_tracked: the
        # ranks' counts must agree, as their running statistics would drift apart otherwise.
        tracked = self._tracked() if self.momentum is None and self.track_running_stats else None
        # The part's statistics on the host (a GPU part's copied on the input's stream).
        mine = backend.part_stats(inp) if call.mask is None else backend.part_stats(inp, call.mask, call.kept)
        parts = self._exchange("forward", mine, tracked=tracked)
        stats = np.empty((3, inp.num_channels))
        count = int(_merge_parts(parts, stats))
        if count == 1:
            counts = [int(p[0]) for p in parts]
            raise ValueError(
                "expected more than 1 value per channel when training, got 1 value per channel in the global "
                f"batch (values per channel on each rank, in rank order: {counts})"
            )
        if count == 0:  # every part empty: the plain empty batch (empty output, no update)
            result = call.run()
        else:
            result = backend.forward_with_stats(call, stats)
        self._sync_count = count
        return result

    # -- backward ---------------------------------------------------------------------------
    def backward(self, grad_output: Any) -> Any:
        """Gradient of the last :meth:`forward`'s output on this rank's part; after a
        synchronized forward, a collective call whose ``grad_weight``, ``grad_bias`` and
        ``update_threshold`` are the global batch's.  See :meth:`BatchNorm.backward`."""
        if self._saved is None or not self._sync_count:  # 0: every part was empty, nothing to exchange
            return super().backward(grad_output)
        if self._check_comm() is None:
            raise RuntimeError(
                "backward of a synchronized forward exchanges the gradient sums, but comm is None now: give the "
                "layer its communicator back (every rank's backward is a collective call)"
            )
        return self._collective("backward", super().backward, grad_output)

    def _run_backward(self, call):
        n = self._sync_count
        if not (n and call.training):
            return super()._run_backward(call)
        backend = call.inp.backend
        parts = self._exchange("backward", backend.part_sums(call))  # host arrays
        total = parts[0]  # the exchange's own array: summed in place
        for p in parts[1:]:  # in rank order, the same on every rank
            total += p
        return (*backend.backward_with_sums(call, total, n), n)

    # -- the exchange -----------------------------------------------------------------------
    def _collective(self, step, method, arg):
        """``method(arg)``, making sure this rank takes part in the step's exchange
        even when its own checks fail, so that no rank waits forever and every rank raises."""
        self._exchanged = False
        try:
            return method(arg)
        except Exception as error:
            if self._exchanged:
                raise
            self._exchange(step, _Failure(type(error).__name__, str(error)), error)
            raise  # not reached: the exchange raised

    def _exchange(self, step, payload, error=None, tracked=None):
        """Every rank's payload of this step, stacked in rank order in a new float64 array
        (the caller's own: the backward sums into it), after checking that all ranks made the
        same step with the same channels, dtype, axis, momentum and ``tracked`` (a cumulative
        forward's ``num_batches_tracked``, else None): otherwise (or when a rank sent a
        :class:`_Failure`) every rank raises the same error."""
        self._exchanged = True
        wire = self._check_comm()
        if wire.size:
            return self._exchange_buffers(wire, step, payload, error, tracked)
        return _checked(step, self._allgather(step, payload, tracked), error)

    def _allgather(self, step, payload, tracked):
        # dtype.str ("<f4"), not dtype.name: the name is a slow Python-level property.
        sent = (step, self.num_features, self.dtype.str, self.axis, self.momentum, tracked, payload)
        gathered = self.comm.allgather(sent)
        if not (
            isinstance(gathered, (list, tuple))
            and gathered
            and all(isinstance(e, (tuple, list)) and len(e) == len(sent) for e in gathered)
        ):
            kind = type(gathered).__name__
            raise TypeError(
                f"comm.allgather must return the list of every rank's object (this rank's among them), got {kind}"
                + (f" of {len(gathered)} items" if isinstance(gathered, (list, tuple)) else "")
            )
        return gathered

    def _exchange_buffers(self, wire, step, payload, error, tracked):
        """:meth:`_exchange` through mpi4py's buffer ``Allgather``: a header of seven float64
        (step, C, dtype, axis, momentum, tracked, failed) from every rank, then, when they all
        agree and none failed, the payloads as one float64 array; otherwise every rank (each
        sees every header) makes the object exchange, whose checks raise the same error
        everywhere."""
        failed = type(payload) is _Failure
        settings = (self.num_features, self.dtype.char, self.axis, self.momentum)
        header = wire.header(step, settings, -1.0 if tracked is None else tracked)
        if failed:
            header = header.copy()
            header[-1] = 1.0
        wire.comm.Allgather(header, wire.headers)
        # Every rank sent this rank's header and none failed, compared as bytes (numpy's
        # any/all on so small an array cost about as much as the exchange).
        if failed or wire.headers.tobytes() != wire.agreed[step]:
            return _checked(step, self._allgather(step, payload, tracked), error)  # raises
        payload = np.ascontiguousarray(payload, dtype=np.float64)
        parts = np.empty((wire.size, *payload.shape))
        wire.comm.Allgather(payload, parts)
        return parts

    # -- pickling ---------------------------------------------------------------------------
    def __getstate__(self):
        state = super().__getstate__()
        state["comm"] = None  # a communicator belongs to its processes
        state["_wire"] = None
        state["_sync_count"] = None
        state["_exchanged"] = False
        return state

    def __repr__(self):
        comm = "" if self.comm is None else f", comm={type(self.comm).__name__}"
        return "Sync" + super().__repr__()[:-1] + comm + ")"


def _checked(step, gathered, error):
    """The payloads of ``gathered``, every rank's ``(step, C, dtype.str, axis, momentum,
    tracked, payload)``, stacked in rank order, or the error that every rank raises: a rank's
    failure (a :class:`_Failure` payload), or ranks that disagree on anything but the payload."""
    agreed = list(gathered[0][:-1])  # a list: a comm may deliver the tuples as lists
    for e in gathered:  # the common case in one loop: every rank sent the same step's payload
        if type(e[-1]) is _Failure or list(e[:-1]) != agreed:
            break
    else:
        return np.array([e[-1] for e in gathered], dtype=np.float64)
    failed = [(r, e[-1]) for r, e in enumerate(gathered) if isinstance(e[-1], _Failure)]
    if failed:
        rank, failure = failed[0]
        others = f" (and ranks {[r for r, _ in failed[1:]]})" if len(failed) > 1 else ""
        exc = _EXCEPTIONS.get(failure.kind, RuntimeError)
        raise exc(
            f"SyncBatchNorm {step} failed on rank {rank} of {len(gathered)}{others}, so on every rank, "
            f"nothing changed: {failure.kind}: {failure.message}"
        ) from error
    for k, (what, exc) in enumerate(_AGREED):
        values = [e[k] for e in gathered]
        if any(v != values[0] for v in values):
            if what == "dtypes":
                values = [np.dtype(v).name for v in values]
            why = " (momentum=None weighs each batch by 1 / num_batches_tracked)" if k == _TRACKED else ""
            raise exc(
                f"SyncBatchNorm ranks disagree on their {what}{why}, which must be the same on every rank, so "
                f"every rank stops, nothing changed: got {values} (in rank order)"
            )
    raise AssertionError("unreachable: the loop above found a failure or a disagreement")


class _Wire:
    """What a layer's exchanges over one communicator reuse, made when the layer first
    exchanges over it: ``size`` is 0 for a communicator of pickled objects; for one with
    mpi4py's buffer interface (``Allgather`` and ``Get_size``), the fast path, its size, the
    headers' receive buffer, and per step the layer's header and the bytes the receive buffer
    holds when every rank agrees (remade when the layer's settings change)."""

    __slots__ = ("comm", "size", "headers", "settings", "sent", "agreed")

    def __init__(self, comm):
        self.comm = comm
        buffered = callable(getattr(comm, "Allgather", None)) and callable(getattr(comm, "Get_size", None))
        self.size = size = comm.Get_size() if buffered else 0
        self.headers = np.empty((size, _HEADER_SIZE))
        self.settings = None
        self.sent = self.agreed = None

    def header(self, step, settings, tracked):
        """This rank's header of ``step`` for the layer's ``settings`` ``(C, dtype.char,
        axis, momentum)`` and ``tracked`` (-1 for none), with ``agreed[step]`` its bytes
        repeated for every rank."""
        if settings != self.settings:
            self.settings = settings
            self.sent = {s: _header(s, *settings) for s in _STEPS}
            self.agreed = {s: h.tobytes() * self.size for s, h in self.sent.items()}
        header = self.sent[step]
        if header[_TRACKED] != tracked:  # a cumulative layer's count: changes every forward
            header[_TRACKED] = tracked
            self.agreed[step] = header.tobytes() * self.size
        return header


#: The steps' codes in a buffer exchange's header.
_STEPS = {"forward": 0.0, "backward": 1.0}

#: What the ranks must agree on, in the order of the exchange's fields (the payload last),
#: each with the exception a disagreement raises.
_AGREED = (
    ("steps", RuntimeError),
    ("num_features", ValueError),
    ("dtypes", TypeError),
    ("axis", ValueError),
    ("momentum", ValueError),
    ("num_batches_tracked", ValueError),
)

#: Where ``num_batches_tracked`` is in the fields and in a buffer exchange's header.
_TRACKED = 5

#: A buffer exchange's header: the fields of :data:`_AGREED`, then whether the rank failed.
_HEADER_SIZE = len(_AGREED) + 1


def _header(step, num_features, char, axis, momentum):
    """A buffer exchange's header ``[step, C, dtype, axis, momentum, tracked, failed]``
    (float64; momentum -1 for None, tracked -1 until :meth:`_Wire.header` sets it)."""
    m = -1.0 if momentum is None else momentum
    return np.array([_STEPS[step], num_features, ord(char), axis, m, -1.0, 0.0], dtype=np.float64)


class _Failure(NamedTuple):
    """What a rank whose own checks failed sends instead of its payload."""

    kind: str
    message: str


_EXCEPTIONS = {e.__name__: e for e in (TypeError, ValueError, RuntimeError, NotImplementedError)}
