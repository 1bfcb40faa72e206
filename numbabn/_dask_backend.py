"""The Dask backend: batch normalization and exact statistics of arrays larger than one
machine.

The backend of :mod:`numbabn._call` for ``dask.array.Array`` inputs; :mod:`numbabn.dask` is
the public API on top of it (:func:`numbabn.dask.welford`, with the options only a Dask array
has).

Every task runs numbabn's serial CPU kernels on one chunk (Dask supplies the parallelism, so
a task never takes the parallel kernels' lock nor starts numba threads).  Reductions are
trees fixed by the chunk grid and ``split_every``:

- statistics: one ``(count, mean, M2)`` partial per chunk, Chan-merged per column of chunks
  that share channels (chunks along the feature axis make several columns), each column's
  chunks in C order of their block index, ``split_every`` partials per merge task;
- backward: one ``(sum g, sum g * (x - mean), sum |g|)`` partial per chunk, summed the same way.

So a given chunking gives the same bits under every scheduler, worker count and rerun.  A
training forward computes the ``(C,)`` statistics during the call (the first pass over the
input) and returns the normalization as a lazy map over concrete coefficients (the second
pass, when the result is computed or stored): no lazy statistic feeds the map, so a chunk is
read, normalized and released without waiting for the others.
"""

from __future__ import annotations

import itertools
import math
from typing import ClassVar

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from . import _activation, _checks
from ._backend import Backend
from ._device import host_stream, is_device
from ._math import chan_merge_channels
from .cpu import api as _host
from .cpu import stats as _stats
from .stats import Stats

#: Partials merged (or summed) per task of a reduction tree when ``split_every`` is None
#: (:func:`numbabn.dask.welford`'s default).
SPLIT_EVERY = 16

#: Where this backend's arrays live (``BatchNorm.device``'s spelling): chunks are host arrays.
DEVICE = "cpu"
#: Masked statistics run here (``numbabn._mask``): the mask a Dask array chunked as the input.
MASKS = True


class Input:
    """A checked Dask input: a ``dask.array.Array`` of NumPy chunks, float32 or float64,
    ``ndim >= 2``, with known chunk sizes; its feature axis (non-negative) and the
    per-channel and like-input checks of its call."""

    __slots__ = ("original", "x", "axis", "num_channels", "dtype", "shape")
    #: The backend that runs this input's calls, this module: bound by :mod:`numbabn._call`,
    #: which loads every backend.
    backend: ClassVar[Backend]

    def __init__(self, x, axis, stream, name="input"):
        host_stream(stream, "a Dask input")
        _dask_array(x, name)
        _checks.check_input(x, name, _checks.INPUT_DTYPES)
        self.axis = _checks.norm_axis(axis, x.ndim)
        if any(math.isnan(s) for s in x.shape):
            raise ValueError(
                f"{name} must have known chunk sizes, got shape {x.shape}; call {name}.compute_chunk_sizes() first"
            )
        self.original = self.x = x
        self.shape = x.shape
        self.num_channels = x.shape[self.axis]
        self.dtype = x.dtype

    def per_channel(self, a, name, *, writable=False, save=False):
        """A per-channel NumPy array, checked as on the host (shape ``(C,)``, the input's
        dtype or float64 when ``save``, writable when updated in place); Dask and GPU
        arrays are refused: per-channel values are small and needed at call time."""
        if a is None:
            return None
        if isinstance(a, da.Array):
            raise TypeError(
                f"{name} must be a NumPy array, got a Dask array: per-channel arguments of a Dask input are "
                f"NumPy arrays (compute it first, e.g. {name}.compute())"
            )
        if is_device(a):
            raise TypeError(
                f"{name} must be a NumPy array, got a GPU array ({type(a).__name__}): per-channel arguments of a "
                "Dask input are NumPy arrays; copy it to the host"
            )
        dtype = _checks.param_dtype(self.dtype)  # float16 data takes float32 parameters
        return _checks.per_channel(a, self.num_channels, dtype, name, writable=writable, allow_f64=save)

    def like_input(self, a, name, *, writable=False):
        """A Dask array of the input's shape and dtype, rechunked to the input's chunks when
        they differ.  Nothing is written into arguments on this backend (results are lazy
        arrays), so a writable like-input (``out=``) is refused."""
        if writable:
            raise TypeError(
                f"{name}= is not supported for Dask inputs: results are lazy Dask arrays; store them with "
                "dask.array.store or dask.array.to_zarr"
            )
        if not isinstance(a, da.Array):
            raise TypeError(
                f"{name} must be a Dask array (the input is one), got {type(a).__name__}; wrap it with "
                f"dask.array.from_array({name}, chunks=input.chunks)"
            )
        _dask_array(a, name)
        _checks.check_like(self.x, a, name)
        return a if a.chunks == self.x.chunks else a.rechunk(self.x.chunks)


def _dask_array(x, name):
    if not isinstance(x, da.Array):
        raise TypeError(f"{name} must be a dask.array.Array, got {type(x).__name__}")
    meta = getattr(x, "_meta", None)
    if type(meta) is not np.ndarray:
        raise TypeError(f"{name} must be a Dask array of NumPy chunks, got chunks of type {type(meta).__name__}")


# -- the backend's names ------------------------------------------------------------------------


def forward(call):
    """``(lazy output, save_mean, save_invstd)`` of a checked
    :class:`numbabn._call.ForwardCall`: in training the statistics are computed now (and the
    running statistics updated in place once they are), the output is a lazy map."""
    inp = call.inp
    if call.training and inp.x.size == 0:
        # An empty batch, as on the host: an empty output, running statistics untouched.
        coef = np.full((2, inp.num_channels), np.nan)
        save = np.full((2, inp.num_channels), np.nan)
    elif call.training and call.mask is not None and call.kept == 0:
        # A mask keeping nothing: an empty batch, every value NaN, running statistics untouched.
        coef = np.full((2, inp.num_channels), np.nan)
        save = np.full((2, inp.num_channels), np.nan)
    elif call.training:
        (stats,) = dask.compute(statistics(inp, mask=call.mask))
        return forward_with_stats(call, (stats.count, stats.mean, stats.m2))
    else:
        coef, save = _host.eval_coef(call.running_mean, call.running_var, call.weight, call.bias, call.eps, inp.dtype)
    return _normalize(call, coef), save[0], save[1]


def forward_with_stats(call, stats):
    """:func:`forward` in training, normalized with the statistics ``stats`` (rows count,
    mean and M2) computed already: the running statistics are updated in place now, the
    output is a lazy map."""
    inp = call.inp
    running = (call.running_mean, call.running_var)
    count, mean, m2 = stats[0], stats[1], stats[2]
    settings = (call.momentum, call.eps, inp.dtype, call.limits, call.m2)
    coef, save = _host.finish(count, mean, m2, call.weight, call.bias, *running, *settings)
    if save.shape[0] > 2:
        call.extra = save[2:]
    return _normalize(call, coef), save[0], save[1]


def _normalize(call, coef):
    """The lazy normalize of a checked forward call with coefficients ``coef`` (2, C): its
    activation and residual (``call.act``) applied in the same task."""
    inp = call.inp
    if not call.act:
        return _map_channels(_apply_block, "numbabn-batch-norm", inp, coef, (inp.x, "input"))
    if call.residual is None:
        return _map_channels(_relu_block, "numbabn-batch-norm-relu", inp, coef, (inp.x, "input"))
    fn = _residual_relu_block if call.act & _activation.RELU else _residual_block
    return _map_channels(fn, "numbabn-batch-norm-add", inp, coef, (inp.x, "input"), (call.residual, "residual"))


def relu_grad(inp, grad_output, output):
    """The ReLU's backward, lazy: ``grad_output`` where ``output > 0``, else 0 (a NaN output
    passes the gradient, as in PyTorch)."""
    return da.where(output <= 0, inp.dtype.type(0), grad_output)


def backward(call):
    """``(lazy grad_input, grad_weight, grad_bias, abs_grad_sum)`` of a checked
    :class:`numbabn._call.BackwardCall`: the per-channel sums are computed now (one pass
    over ``grad_output`` and ``input``), ``grad_input`` is a lazy map."""
    inp = call.inp
    mean = np.ascontiguousarray(call.save_mean, dtype=np.float64)
    invstd = np.ascontiguousarray(call.save_invstd, dtype=np.float64)
    (sums,) = dask.compute(grad_sums(inp, call.grad_output, mean))
    masked = call.mask is not None
    n = call.kept if masked else _checks.values_per_channel(inp.shape, inp.axis)
    coef, grads = _host.grad_coefs(sums, n, call.weight, mean, invstd, call.training, inp.dtype)
    arrays = (call.grad_output, "grad_output"), (inp.x, "input")
    if masked:  # the mask's chunks span one channel each: Dask broadcasts them over the channels'
        gi = _map_channels(_masked_grad_apply_block, "numbabn-masked-backward", inp, coef, *arrays, (call.mask, "mask"))
    else:
        gi = _map_channels(_grad_apply_block, "numbabn-batch-norm-backward", inp, coef, *arrays)
    affine = grads[:2].astype(_checks.param_dtype(inp.dtype))
    return gi, affine[0], affine[1], grads[2]


def scaled(a, factor):
    """``a * factor`` as float64 (per-channel results of this backend are NumPy arrays)."""
    return np.asarray(a, dtype=np.float64) * factor


def batch_stats(inp):
    """:func:`numbabn.welford` of a checked :class:`Input`, computed now: ``(count, mean,
    m2)``."""
    (stats,) = dask.compute(statistics(inp))
    return stats


# -- reductions: one partial per chunk, a fixed tree per column of chunks ----------------------


def statistics(inp, split_every=None, mask=None):
    """A ``Delayed`` of the :class:`numbabn.Stats` of a checked :class:`Input` (of the values
    a checked ``mask``, chunked as the input with one chunk on the feature axis, keeps)."""
    x, axis = inp.x, inp.axis
    token = tokenize(x, axis, split_every, None if mask is None else mask.name)

    def leaf(idx):
        if mask is None:
            return (block_stats, (x.name, *idx), axis, _declared(x, idx))
        m = (mask.name, *(0 if a == axis else i for a, i in enumerate(idx)))
        return (masked_block_stats, (x.name, *idx), m, axis, _declared(x, idx))

    roots, dsk = _tree(f"numbabn-welford-{token}", x.chunks, axis, leaf, _merge_stats, split_every)
    name = f"numbabn-welford-{token}"
    # The kept count is the mask's, known once its chunks are: the columns' merged count.
    dsk[name] = (_concat_stats, roots, _checks.values_per_channel(inp.shape, axis) if mask is None else None)
    deps = [x] if mask is None else [x, mask]
    return Delayed(name, HighLevelGraph.from_collections(name, dsk, dependencies=deps))


def grad_sums(inp, grad_output, mean, split_every=None):
    """A ``Delayed`` of ``(sum g, sum g * (x - mean), sum |g|)`` per channel, (3, C) float64,
    of ``grad_output`` (chunked as the input) and the input."""
    x, axis = inp.x, inp.axis
    token = tokenize(grad_output, x, axis, mean, split_every)
    prefix = f"numbabn-grad-sums-{token}"
    dsk = {}
    offsets = np.cumsum((0,) + x.chunks[axis])
    for j in range(len(x.chunks[axis])):
        dsk[(f"{prefix}-mean", j)] = mean[offsets[j] : offsets[j + 1]].copy()

    def leaf(idx):
        g, xb = (grad_output.name, *idx), (x.name, *idx)
        return (_block_grad_sums, g, xb, axis, (f"{prefix}-mean", idx[axis]), _declared(x, idx))

    roots, tree = _tree(prefix, x.chunks, axis, leaf, _sum_parts, split_every)
    dsk.update(tree)
    dsk[prefix] = (_concat_sums, roots)
    return Delayed(prefix, HighLevelGraph.from_collections(prefix, dsk, dependencies=[grad_output, x]))


def _tree(prefix, chunks, axis, leaf, merge, split_every):
    """Tasks of one reduction tree per column of chunks (the chunks sharing channels):
    ``leaf(idx)`` for each block index, in C order, then ``merge`` of ``split_every``
    consecutive results per task, level by level.  Returns the roots' keys (one per column,
    in channel order) and the tasks."""
    split_every = _split_every(split_every)
    dsk = {}
    columns = [[] for _ in chunks[axis]]
    for idx in itertools.product(*(range(len(c)) for c in chunks)):
        key = (f"{prefix}-chunk", *idx)
        dsk[key] = leaf(idx)
        columns[idx[axis]].append(key)
    roots = []
    for j, keys in enumerate(columns):
        level = 0
        while len(keys) > 1:
            merged = []
            for k in range(0, len(keys), split_every):
                key = (f"{prefix}-merge-{level}", j, k // split_every)
                dsk[key] = (merge, keys[k : k + split_every])
                merged.append(key)
            keys, level = merged, level + 1
        roots.append(keys[0])
    return roots, dsk


def _split_every(split_every):
    if split_every is None:
        return SPLIT_EVERY
    if isinstance(split_every, bool) or not isinstance(split_every, (int, np.integer)):
        raise TypeError(f"split_every must be an int >= 2 or None, got {type(split_every).__name__}")
    if split_every < 2:
        raise ValueError(f"split_every must be an int >= 2 or None, got {split_every}")
    return int(split_every)


def _declared(x, idx):
    """What chunk ``idx`` of ``x`` must be, as its graph says: ``(index, shape, dtype)``."""
    return idx, tuple(c[i] for c, i in zip(x.chunks, idx, strict=True)), x.dtype


def _checked_block(block, declared, name="input"):
    """The chunk as an ndarray, if it has the shape and dtype its array declares: a graph
    whose chunks compute to something else (``map_blocks`` with wrong ``chunks`` or
    ``meta``) would otherwise give statistics of other counts than the array's shape."""
    block = np.asarray(block)
    idx, shape, dtype = declared
    if block.shape != shape or block.dtype != dtype:
        raise ValueError(
            f"{name} chunk {idx} computed to shape {block.shape} and dtype {block.dtype}, but the Dask array "
            f"declares shape {shape} and dtype {dtype} for it (check the chunks and meta of the graph that makes it)"
        )
    return block


def block_stats(block, axis, declared):
    """``(count, mean, M2)`` of one chunk: the serial kernel (float count, float64 (C,))."""
    x = _checks.contiguous(_checked_block(block, declared))
    stats = np.empty((3, x.shape[axis]))
    lay, (xv,) = _host.views(x, axis, x)
    _stats.welford(False, lay, xv, stats)
    return float(_checks.values_per_channel(x.shape, axis)), stats[1], stats[2]


def masked_block_stats(block, mask, axis, declared):
    """``(count, mean, M2)`` of the values of one chunk that its mask chunk keeps."""
    x = _checks.contiguous(_checked_block(block, declared))
    mask = _checked_block(mask, _mask_declared(declared, axis), "mask")
    stats = np.empty((3, x.shape[axis]))
    count = _host.masked_stats(x, axis, mask, stats)
    return float(count), stats[1], stats[2]


def _merge_stats(parts):
    """Chan's merge of partials, left to right (the inputs are left unchanged)."""
    n, mean, m2 = parts[0]
    mean, m2 = mean.copy(), m2.copy()
    for nb, mean_b, m2_b in parts[1:]:
        n = chan_merge_channels(n, mean, m2, nb, mean_b, m2_b)
    return n, mean, m2


def _concat_stats(columns, count):
    if count is None:  # every column of chunks holds the same kept values of its channels
        count = columns[0][0] if columns else 0.0
    mean = np.concatenate([c[1] for c in columns])
    m2 = np.concatenate([c[2] for c in columns])
    return Stats(count, mean, m2)


def _block_grad_sums(g, x, axis, mean, declared):
    g, x = _checked_block(g, declared, "grad_output"), _checked_block(x, declared)
    return _host.grad_reduce(g, x, axis, mean, parallel=False)


def _sum_parts(parts):
    total = parts[0].copy()
    for p in parts[1:]:
        total += p
    return total


def _concat_sums(columns):
    return np.concatenate(columns, axis=1)


# -- maps over concrete coefficients -------------------------------------------------------------


def _map_channels(fn, token, inp, coef, *arrays):
    """``fn(*blocks, coef_block, axis)`` over the blocks of ``arrays``, ``(array, name)``
    pairs chunked as the input and of its dtype, each block checked against its declared
    shape and dtype, ``coef_block`` the columns of the (k, C) NumPy ``coef`` for the block's
    channels.  The coefficients travel inside each task (they are small) rather than as a
    Dask array of their own, which the blockwise map joined to every chunk (slower, see
    docs/performance_notes.rst)."""
    x = inp.x
    names = tuple(n for _, n in arrays)
    name = f"{token}-{tokenize(fn.__name__, coef, inp.axis, *(a.name for a, _ in arrays))}"
    meta = np.empty((0,) * x.ndim, dtype=inp.dtype)
    block_fn = _WithCoef(fn, coef, inp.axis, names, inp.dtype)
    return da.map_blocks(block_fn, *(a for a, _ in arrays), name=name, dtype=inp.dtype, meta=meta)


class _WithCoef:
    """A block function of :func:`_map_channels`: ``fn`` with the block's columns of ``coef``
    (found from Dask's ``block_info``), its blocks (of the arrays ``names``) checked first."""

    def __init__(self, fn, coef, axis, names, dtype):
        self.fn, self.coef, self.axis, self.names, self.dtype = fn, coef, axis, names, dtype

    def _declared(self, declared, name):
        return _mask_declared(declared, self.axis) if name == "mask" else declared

    def __call__(self, *blocks, block_info=None):
        info = block_info[0]
        location = info["array-location"]
        # A lazy map reads its chunks when computed, after the call's checks: a chunk that
        # computes to another shape or dtype raises here, not as a wrong output.
        declared = (tuple(info["chunk-location"]), tuple(hi - lo for lo, hi in location), self.dtype)
        blocks = [_checked_block(b, self._declared(declared, n), n) for b, n in zip(blocks, self.names, strict=True)]
        lo, hi = location[self.axis]
        return self.fn(*blocks, self.coef[:, lo:hi], self.axis)


def _mask_declared(declared, axis):
    """What a mask chunk beside an input chunk ``declared`` must be: one value per position
    of the chunk's channels, bool."""
    idx, shape, _ = declared
    return idx, tuple(1 if a == axis else n for a, n in enumerate(shape)), np.dtype(np.bool_)


def _apply_block(x, coef, axis):
    return _host.apply(x, axis, np.ascontiguousarray(coef), parallel=False)


def _relu_block(x, coef, axis):
    return _host.apply(x, axis, np.ascontiguousarray(coef), parallel=False, mode=_activation.RELU)


def _residual_block(x, z, coef, axis):
    return _host.apply(x, axis, np.ascontiguousarray(coef), parallel=False, residual=z, mode=_activation.RESIDUAL)


def _residual_relu_block(x, z, coef, axis):
    mode = _activation.RESIDUAL | _activation.RELU
    return _host.apply(x, axis, np.ascontiguousarray(coef), parallel=False, residual=z, mode=mode)


def _grad_apply_block(g, x, coef, axis):
    return _host.grad_apply(g, x, axis, np.ascontiguousarray(coef), parallel=False)


def _masked_grad_apply_block(g, x, mask, coef, axis):
    return _host.masked_grad_apply(g, x, axis, mask, np.ascontiguousarray(coef))
