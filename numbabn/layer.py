"""``BatchNorm``: parameters, running buffers, train/eval, state dicts; each call is checked once
(:mod:`numbabn._call`) and run by the input's backend."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from . import _activation, _call, _checks, _ghost
from ._device import is_device


class _DefaultMomentum(float):
    """The type of ``momentum``'s default, 0.1: an explicit ``momentum=0.1`` is a plain float,
    so giving it together with ``decay`` is refused like any other pair."""

    __slots__ = ()

    def __repr__(self):
        return "0.1"


#: BatchNorm's default momentum (PyTorch's 0.1), a value of its own so the layer can tell
#: it from a momentum passed with ``decay``.
DEFAULT_MOMENTUM = _DefaultMomentum(0.1)


class IncompatibleKeys(NamedTuple):
    """What :meth:`BatchNorm.load_state_dict` returns, as PyTorch does."""

    missing_keys: list
    unexpected_keys: list


class BatchNorm:
    """Batch normalization layer with PyTorch's semantics and state-dict keys.

    Parameters
    ----------
    num_features : int
        ``C``, the size of the feature axis.
    eps : float, default 1e-5
        Added to the variance before the square root.
    momentum : float in [0, 1] or None, default 0.1
        Weight of the new batch in the running statistics; ``None`` is the cumulative
        average, ``momentum = 1 / num_batches_tracked``.
    affine : bool, default True
        Learn ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : bool, default True
        Keep ``running_mean`` (zeros), ``running_var`` (ones) and ``num_batches_tracked``.
        Without them eval mode normalizes with batch statistics, as PyTorch does.
    axis : int, default 1
        The feature axis of the inputs; ``-1`` for channels-last.
    dtype : numpy dtype, default float32
        Dtype of parameters, buffers and accepted inputs (float16 too with
        ``device="cuda"``).  A float32 layer also takes float16 inputs (mixed precision:
        float16 output, float32 parameters, running statistics and gradients of the
        parameters), on either device.
    decay : float in [0, 1], optional
        The same EMA in Keras's and Flax's spelling, ``decay = 1 - momentum`` (their
        "momentum", 0.9 or 0.99).  Give ``momentum`` or ``decay``, not both: numbabn never
        guesses which convention a number follows.
    device : {"cpu", "cuda"}, default "cpu"
        Where parameters and buffers live: NumPy arrays, or numba device arrays on the
        current GPU (inputs are then GPU arrays: numba, CuPy or PyTorch CUDA; outputs are
        of the input's kind).  :meth:`state_dict` always returns host arrays.
    virtual_batch_size : int >= 1, optional
        Ghost batches in training (Keras's and TabNet's name): axis 0 cut into consecutive
        batches of this many samples (the last holds the remainder), each normalized with
        its own statistics; the running statistics take one update per call from the whole
        batch's, the ghosts' merged.  NumPy and GPU inputs; the feature axis must not be 0.
        Eval ignores it.
    activation : {None, "relu"}, default None
        Fused into the normalize pass: the layer computes ``relu(bn(x) [+ residual])``,
        writing its output once, and :meth:`backward` takes the ReLU's gradient from that
        output (nothing else is kept).

    Attributes
    ----------
    weight, bias : ndarray of shape (C,) or None
        The affine parameters (None without ``affine``).
    running_mean, running_var : ndarray of shape (C,) or None
        The running statistics (None without ``track_running_stats``).
    num_batches_tracked : int or None
        Training batches seen since the last :meth:`reset_running_stats`.
    training : bool
        Training mode (True) or eval mode; see :meth:`train` and :meth:`eval`.
    grad_weight, grad_bias : ndarray of shape (C,) or None
        Set by :meth:`backward` (with ``affine``); None before the first one.
    grad_residual : array or None
        Set by :meth:`backward` when its forward had a ``residual``: the residual's gradient
        (the ReLU's masked ``grad_output``, or ``grad_output`` itself without an
        activation); None otherwise.
    update_threshold : ndarray of float64, shape (C,), or None
        Set by :meth:`backward`: the per-channel mean of ``|grad_output|`` over the values
        that share a channel, ``sum(|g|) / n``, accumulated in float64 by the backward
        reduction pass itself (no extra pass over memory); after a masked forward ``n`` is
        the kept count (a masked loss leaves the padding's gradient zero).  The "dynamic update threshold"
        ``mean(|gradients|)`` some training schemes gate parameter updates on.  None before
        the first :meth:`backward`; like ``grad_weight`` it describes the last backward
        pass, so :meth:`reset_parameters` and :meth:`reset_running_stats` leave it alone.

    Examples
    --------
    >>> import numpy as np, numbabn
    >>> bn = numbabn.BatchNorm(3)
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, (8, 3, 4, 4)).astype(np.float32)
    >>> y = bn(x)
    >>> bool(abs(y.mean()) < 1e-5), int(bn.num_batches_tracked)
    (True, 1)
    >>> gx = bn.backward(np.ones_like(y))
    """

    #: Whether :meth:`forward` and :meth:`backward` may take the common host call's quick
    #: path: false for subclasses that change how a call is made or run (SyncBatchNorm's
    #: exchanges, Batch Renormalization's limits).
    _QUICK = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._QUICK = all(
            getattr(cls, name) is getattr(BatchNorm, name)
            for name in ("_forward_call", "_run_forward", "_run_backward")
        )

    #: Attributes that stay host arrays on a GPU layer, and what a pickle drops (the last
    #: forward's, for :meth:`backward`).
    _HOST_STATE = ("update_threshold",)
    _BACKWARD_STATE = ("_saved", "_saved_mask", "_ghosts", "_saved_act", "grad_residual")

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
        virtual_batch_size: int | None = None,
        activation: str | None = None,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
            raise TypeError(f"num_features must be an int >= 1, got {type(num_features).__name__} {num_features!r}")
        if num_features < 1:
            raise ValueError(f"num_features must be an int >= 1, got {num_features!r}")
        try:
            if dtype is None:  # np.dtype(None) is float64: refused, as a forgotten argument
                raise TypeError
            dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        dtypes = _checks.FLOAT_DTYPES + ((np.dtype(np.float16),) if device == "cuda" else ())
        if dtype not in dtypes:
            raise TypeError(f"dtype must be {' or '.join(map(str, dtypes))} on device {device!r}, got {dtype}")
        if decay is not None:
            if momentum is not DEFAULT_MOMENTUM:
                raise ValueError(
                    f"give momentum (PyTorch's weight of the new batch) or decay (Keras/Flax: 1 - momentum), "
                    f"not both; got momentum={momentum!r} and decay={decay!r}"
                )
            momentum = 1.0 - _checks.check_momentum(decay, "decay", "the weight of the running statistics")
        if momentum is not None:
            momentum = _checks.check_momentum(momentum)
        if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        virtual_batch_size = _ghost.check_size(virtual_batch_size, axis)
        _activation.check(activation)
        self.activation = activation
        self.num_features = int(num_features)
        self.eps = _checks.check_eps(eps)
        self.momentum = momentum
        self.affine = _checks.check_flag(affine, "affine")
        self.track_running_stats = _checks.check_flag(track_running_stats, "track_running_stats")
        self.axis = int(axis)
        self.virtual_batch_size = virtual_batch_size
        self.dtype = dtype
        self.device = device
        if device == "cuda":
            _call.cuda_backend()  # a clear error now when there is no GPU backend, not at the first call
        self.training = True
        self.weight = self._new(1.0) if affine else None
        self.bias = self._new(0.0) if affine else None
        self.grad_weight = None
        self.grad_bias = None
        self.grad_residual = None
        self.update_threshold = None
        if track_running_stats:
            self.running_mean = self._new(0.0)
            self.running_var = self._new(1.0)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self._saved = None
        self._saved_mask = None
        self._saved_act = None
        self._ghosts = None

    @property
    def decay(self) -> float | None:
        """``1 - momentum``: the EMA rate in Keras's and Flax's spelling (None with
        ``momentum=None``)."""
        return None if self.momentum is None else 1.0 - self.momentum

    # -- modes ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> BatchNorm:
        """Set training mode (``mode=True``) or eval mode; returns ``self``."""
        self.training = _checks.check_flag(mode, "mode")
        return self

    def eval(self) -> BatchNorm:
        """Set eval mode; returns ``self``."""
        return self.train(False)

    def reset_running_stats(self) -> None:
        """Zero ``running_mean`` and ``num_batches_tracked``, set ``running_var`` to one."""
        if self.track_running_stats:
            self._assign(self.running_mean, 0.0)
            self._assign(self.running_var, 1.0)
            self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Reset the running statistics and set ``weight`` to one and ``bias`` to zero."""
        self.reset_running_stats()
        if self.affine:
            self._assign(self.weight, 1.0)
            self._assign(self.bias, 0.0)

    def _new(self, fill):
        host = np.full(self.num_features, fill, self.dtype)
        if self.device == "cpu":
            return host
        from numba import cuda

        return cuda.to_device(host)

    def _assign(self, buffer, value):
        """Write ``value`` (a scalar or a host array, cast to the layer's dtype) into ``buffer``."""
        value = np.broadcast_to(np.asarray(value).astype(self.dtype), (self.num_features,))
        if self.device == "cuda":
            buffer.copy_to_device(np.ascontiguousarray(value))
        else:
            buffer[...] = value

    # -- forward / backward -----------------------------------------------------------------
    def forward(self, x: Any, residual: Any = None, mask: Any = None) -> Any:
        """Normalize ``x``; in training mode also update the running statistics.

        As ``torch.nn.BatchNorm*d``: training (or eval without running statistics) uses the
        batch statistics; training with running statistics counts ``num_batches_tracked``
        (an empty batch counts too, as in PyTorch) and, with ``momentum=None``, averages
        cumulatively (``momentum = 1 / num_batches_tracked``).  A Dask input gives a lazy
        output (its statistics are computed during the call).

        ``residual``: an array of ``x``'s shape, dtype and kind added to the normalized value
        before the :attr:`activation`, in the same pass (a residual connection);
        :meth:`backward` then sets ``grad_residual``.

        ``mask``: a bool array of ``x``'s shape with 1 on the feature axis, True where a
        value counts in the batch statistics (padding False), the same for every channel.
        Training then normalizes every value with the statistics of the kept ones, and the
        running statistics take their update from those (their count, in the unbiased
        variance too); :meth:`backward` reuses it.  Eval ignores it.  The kinds of mask each
        input takes are those of :func:`numbabn.batch_norm` (a GPU input: a NumPy or a GPU
        bool array).
        """
        inp = self._check_input(x)
        if residual is None and mask is None and self._QUICK:
            y = self._quick_forward(inp)
            if y is not None:
                return y
        call = self._forward_call(inp, mask=mask, residual=residual)
        # The count this call leaves, worked out first: a bad one stops it before any write.
        tracked = self._tracked() + 1 if self.training and self.track_running_stats else None
        y, mean, invstd = self._run_forward(call)
        if tracked is not None:
            self.num_batches_tracked = tracked
        # The input is kept by reference for backward(), as PyTorch keeps it: modifying it in
        # place before backward() changes the gradients (PyTorch would raise; this cannot tell).
        self._saved = (inp, mean, invstd, call.training)
        self._saved_mask = None if call.mask is None else (call.mask, call.kept)
        # The ReLU's backward reads the output, kept by reference as the input is.
        relu = call.act & _activation.RELU
        self._saved_act = (y if relu else None, call.residual is not None) if call.act else None
        return y

    __call__ = forward

    def _quick_forward(self, inp):
        """The output of a forward of the checked ``inp`` when it is a common host call
        (:func:`numbabn._call.quick_forward`), with this layer's state updated as
        :meth:`forward` updates it; else None, and nothing has changed."""
        training, count = self.training, self.num_batches_tracked
        if not (training is True or training is False) or self.activation is not None:
            return None
        track = training and self.track_running_stats
        if self.virtual_batch_size is not None or (track and (type(count) is not int or count < 0)):
            return None
        momentum = self.momentum
        if momentum is None:
            momentum = 1.0 / (count + 1) if track else 0.0
        running = (None, None) if training and not track else (self.running_mean, self.running_var)
        use_batch = training or running[0] is None
        facts = _call.input_facts(inp)
        done = _call.quick_forward(inp.x, facts, self.weight, self.bias, *running, use_batch, momentum, self.eps)
        if done is None:
            return None
        y, save = done
        if track:
            self.num_batches_tracked = count + 1
        self._saved = (inp, save[0], save[1], use_batch)
        self._saved_mask = self._saved_act = self._ghosts = None
        return y

    def _forward_call(self, inp, part=False, mask=None, residual=None):
        """The checked forward call of this layer's state on the checked input ``inp``
        (``part``, ``mask`` and ``residual``: see :func:`numbabn._call.forward_call`)."""
        training = _checks.check_flag(self.training, "training")
        use_batch = training or self.running_mean is None
        track = training and self.track_running_stats
        momentum = 0.0 if self.momentum is None else self.momentum
        if track and self.momentum is None:
            momentum = 1.0 / (self._tracked() + 1)
        running = (None, None) if training and not track else (self.running_mean, self.running_var)
        settings = (use_batch, momentum, self.eps, None)
        acts = {"activation": self.activation, "residual": residual}
        return _call.forward_call(inp, self.weight, self.bias, *running, *settings, part=part, mask=mask, **acts)

    def _tracked(self):
        """``num_batches_tracked``, checked: an int >= 0 (it may have been assigned)."""
        count = self.num_batches_tracked
        if type(count) is int and count >= 0:
            return count
        if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)):
            raise TypeError(f"num_batches_tracked must be an int >= 0, got {type(count).__name__} {count!r}")
        if count < 0:
            raise ValueError(f"num_batches_tracked must be an int >= 0, got {count!r}")
        return int(count)

    def _run_forward(self, call):
        """``(output, save_mean, save_invstd)`` of a checked forward call (SyncBatchNorm
        exchanges statistics here); as ghost batches when :attr:`virtual_batch_size` asks."""
        ghosts = self._ghost_size(call)
        self._ghosts = None
        if ghosts is None:
            return call.run()
        y, mean, invstd, call.extra = _ghost.forward(call, ghosts)
        self._ghosts = (ghosts, None)
        return y, mean, invstd

    def _ghost_size(self, call):
        """The ghost batch size a training call runs with, or None (see :mod:`numbabn._ghost`)."""
        if not call.training or self.virtual_batch_size is None:
            return None
        size = _ghost.check_size(self.virtual_batch_size, self.axis)
        return size if _ghost.applies(call.inp, size) else None

    def backward(self, grad_output: Any) -> Any:
        """Gradient of the last :meth:`forward`'s output.

        Parameters
        ----------
        grad_output : ndarray
            Gradient of the loss with respect to the last output; its shape and dtype.

        Returns
        -------
        ndarray
            ``grad_input``, as :func:`numbabn.batch_norm_backward`.

        Notes
        -----
        Also sets ``grad_weight`` and ``grad_bias`` (None without affine parameters) and
        ``update_threshold``, the per-channel ``mean(|grad_output|)`` in float64, in training
        and eval mode alike (NaN for an empty batch).  For a Dask input ``grad_input`` is
        lazy and the three attributes are NumPy arrays computed during the call.
        """
        if self._saved is None:
            raise RuntimeError("backward needs a forward pass first: call the layer on an input")
        inp, mean, invstd, use_batch = self._saved
        if self._QUICK and self._saved_act is None and self._saved_mask is None and self._ghosts is None:
            facts = _call.input_facts(inp)
            done = _call.quick_backward(inp.x, facts, grad_output, self.weight, mean, invstd, use_batch)
            if done is not None:
                return self._take_gradients(inp, *done, inp.count, None)
        output, has_residual = self._saved_act or (None, False)
        g = _activation.incoming(inp, grad_output, output is not None, output)
        if self._ghosts is not None:
            size, factors = self._ghosts
            grad_input, grad_weight, grad_bias, abs_grad_sum = _ghost.backward(
                inp, g, self.weight, mean, invstd, size, factors
            )
            n = _checks.values_per_channel(inp.shape, inp.axis)
        else:
            call = _call.backward_call(inp, g, self.weight, mean, invstd, use_batch, None)
            if self._saved_mask is not None:  # the forward's mask, checked then
                call.mask, call.kept = self._saved_mask
            _activation.reuse_gradient(call, output is not None, has_residual)
            grad_input, grad_weight, grad_bias, abs_grad_sum, n = self._run_backward(call)
        grad_residual = (g if output is not None else grad_output) if has_residual else None
        return self._take_gradients(inp, grad_input, grad_weight, grad_bias, abs_grad_sum, n, grad_residual)

    def _take_gradients(self, inp, grad_input, grad_weight, grad_bias, abs_grad_sum, n, grad_residual):
        """Keep a backward's gradients on the layer (``abs_grad_sum`` over ``n`` values per
        channel gives ``update_threshold``) and return ``grad_input``."""
        self.grad_residual = grad_residual
        if self.affine:
            self.grad_weight, self.grad_bias = grad_weight, grad_bias
        self.update_threshold = inp.backend.scaled(abs_grad_sum, 1.0 / n if n else np.nan)
        return grad_input

    def _run_backward(self, call):
        """``(grad_input, grad_weight, grad_bias, abs_grad_sum, n)`` of a checked backward
        call, ``n`` the values per channel that ``abs_grad_sum`` sums over (SyncBatchNorm
        exchanges the sums here)."""
        # With a mask, update_threshold is per kept value (a masked loss leaves padding's g 0).
        n = call.kept if call.mask is not None else _checks.values_per_channel(call.inp.shape, call.inp.axis)
        return (*call.run(), n)

    def _check_input(self, x):
        """The checked input of a call on this layer: its backend must be the layer's device,
        its dtype the layer's and its channels ``num_features``."""
        inp = _call.check_input(x, self.axis, None)
        if inp.backend.DEVICE != self.device:
            where = "a GPU array" if self.device == "cuda" else "a host array (NumPy or Dask)"
            raise TypeError(
                f"input must be {where} for a layer on device {self.device!r}, got {type(x).__name__}: "
                "host and device arrays are not mixed"
            )
        if inp.dtype != self.dtype and _checks.param_dtype(inp.dtype) != self.dtype:
            also = ", or float16 (mixed precision)" if self.dtype == np.float32 else ""
            raise TypeError(f"input must have dtype {self.dtype} (the layer's{also}), got {inp.dtype}")
        if inp.num_channels != self.num_features:
            raise ValueError(
                f"input must have {self.num_features} channels (num_features) along axis {self.axis}, "
                f"got {inp.num_channels} (shape {inp.shape})"
            )
        return inp

    # -- state dicts ------------------------------------------------------------------------
    def _state_names(self):
        names = ["weight", "bias"] if self.affine else []
        if self.track_running_stats:
            names += ["running_mean", "running_var", "num_batches_tracked"]
        return names

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameters and buffers under PyTorch's keys: ``weight``, ``bias``,
        ``running_mean``, ``running_var`` and ``num_batches_tracked`` (a 0-d int64 array)."""
        out = {}
        for name in self._state_names():
            value = getattr(self, name)
            if name == "num_batches_tracked":
                out[name] = np.array(value, dtype=np.int64)
            else:
                out[name] = value.copy_to_host() if self.device == "cuda" else value.copy()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Load a state dict, PyTorch's rules: with ``strict`` every key must match; shapes
        must match; real values (bool, int or float, bfloat16 tensors too) are cast to the
        layer's dtype.  A missing ``num_batches_tracked`` (older PyTorch checkpoints) is
        allowed.  Values may be NumPy arrays, PyTorch tensors (CPU or CUDA), GPU arrays or
        anything ``numpy.asarray`` takes, whatever the layer's device.  Nothing changes
        unless all checks pass.

        Returns
        -------
        IncompatibleKeys
            ``missing_keys`` and ``unexpected_keys``.
        """
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        names = self._state_names()
        missing = [k for k in names if k not in state_dict and k != "num_batches_tracked"]
        unexpected = [k for k in state_dict if k not in names]
        if strict and (missing or unexpected):
            raise ValueError(
                f"Error(s) in loading state_dict: missing keys {missing}, unexpected keys {unexpected} "
                f"(expected keys {names}); pass strict=False to load the matching keys only"
            )
        staged = {}
        for name in names:
            if name not in state_dict:
                continue
            value = state_dict[name]
            if hasattr(value, "detach"):  # a PyTorch tensor or parameter
                value = _torch_numpy(value, name)
            elif is_device(value):
                value = _as_numba(value).copy_to_host()
            if isinstance(value, np.ma.MaskedArray):
                raise TypeError(f"{name} must not be a masked array (its mask would be ignored)")
            try:
                value = np.asarray(value)
            except (TypeError, ValueError) as e:
                raise TypeError(f"{name} must be an array of numbers, got {type(value).__name__} ({e})") from None
            if name == "num_batches_tracked":
                count = value.reshape(()) if value.size == 1 else None
                if (
                    count is None
                    or value.dtype.kind not in "iuf"
                    or not (np.isfinite(count) and count >= 0 and count == int(count))
                ):
                    raise ValueError(f"num_batches_tracked must be one integer >= 0, got {value!r}")
                staged[name] = int(count)
                continue
            if value.shape != (self.num_features,):
                raise ValueError(f"{name} must have shape ({self.num_features},), got {value.shape}")
            if value.dtype.kind not in "biuf":  # cast like PyTorch's copy_
                raise TypeError(f"{name} must be a real-valued array, got dtype {value.dtype}")
            self._check_destination(name)
            # A copy: a value may be another of the layer's own buffers, written before it is read.
            staged[name] = np.array(value, dtype=self.dtype)
        for name, value in staged.items():
            if name == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                self._assign(getattr(self, name), value)
        return IncompatibleKeys(missing, unexpected)

    def _check_destination(self, name):
        """The layer's own ``name`` buffer can take a loaded value (it may have been assigned):
        checked for every key before any is written."""
        dest = getattr(self, name)
        host = self.device == "cpu"
        if (host and not isinstance(dest, np.ndarray)) or (not host and not is_device(dest)):
            where = "a NumPy array" if host else "a GPU array"
            raise TypeError(f"the layer's {name} must be {where} to load into, got {type(dest).__name__}")
        if dest.shape != (self.num_features,):
            raise ValueError(
                f"the layer's {name} must have shape ({self.num_features},) to load into, got {dest.shape}"
            )
        if host and not dest.flags.writeable:
            raise ValueError(f"the layer's {name} must be writable to load into, got a read-only array")

    # -- pickling ---------------------------------------------------------------------------
    def __getstate__(self):
        """Parameters, buffers, gradients and settings, as host arrays; not the last forward's
        saved input (as a pickled PyTorch module keeps no autograd graph), so
        :meth:`backward` needs a new :meth:`forward` after unpickling."""
        state = dict(self.__dict__)
        for name in self._BACKWARD_STATE:
            state[name] = None
        if self.device == "cuda":
            for name, value in state.items():
                if value is not None and is_device(value):
                    state[name] = _as_numba(value).copy_to_host()
        return state

    def __setstate__(self, state):
        if state.get("device") == "cuda":
            from numba import cuda

            _call.cuda_backend()
            state = {
                k: cuda.to_device(v) if isinstance(v, np.ndarray) and k not in self._HOST_STATE else v
                for k, v in state.items()
            }
        self.__dict__.update(state)

    def __repr__(self):
        return f"BatchNorm({self._settings_repr()})"

    def _settings_repr(self, tracking=True):
        """The constructor's arguments as a repr shows them (``tracking``: with
        ``track_running_stats``, which the renormalizing layers do not take)."""
        tracked = f"track_running_stats={self.track_running_stats}, " if tracking else ""
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"{tracked}{self._extra_repr()}axis={self.axis}, dtype={self.dtype.name}"
            + (f", virtual_batch_size={self.virtual_batch_size}" if self.virtual_batch_size is not None else "")
            + (f", activation={self.activation!r}" if self.activation is not None else "")
            + (", device='cuda'" if self.device == "cuda" else "")
        )

    def _extra_repr(self):
        return ""


def _torch_numpy(tensor, name):
    """The values of the PyTorch tensor ``tensor`` (state-dict key ``name``) as a NumPy array,
    found by duck typing (numbabn does not import torch): floating tensors narrower than
    float32 (bfloat16, float16, float8, which NumPy lacks or the layer never holds) are
    widened with ``.float()`` first, exactly; anything else that does not convert is a
    TypeError naming the key."""
    try:
        t = tensor.detach().cpu()
        if t.is_floating_point() and t.element_size() < 4:
            t = t.float()
        return t.numpy()
    except Exception as e:  # noqa: BLE001 - torch raises TypeError, RuntimeError or NotImplementedError
        dtype, device = getattr(tensor, "dtype", "?"), getattr(tensor, "device", "?")
        raise TypeError(
            f"{name} must be a tensor that converts to a NumPy array (dense, of a real dtype, on the CPU or a GPU), "
            f"got {type(tensor).__name__} of dtype {dtype} on device {device} ({type(e).__name__}: {e})"
        ) from e


def _as_numba(a):
    from .cuda._arrays import as_numba

    return as_numba(a)
