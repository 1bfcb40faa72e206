"""Ghost batches on channel-minor layouts (NHWC, (N, C)): every ghost of a call in one driver.

A ghost is a slice of axis 0; on a C-contiguous input its rows are consecutive rows of the
``(outer, C * inner)`` view.  The drivers take each array as a *pair* of 3-D views ``(a, b)``:
``a`` (G', rows, width) the ghosts of ``virtual_batch_size`` samples, ``a[g]`` one ghost's
super-rows; ``b`` the remainder ghost, ``(1, rows', width')``, or ``a[:0]`` when there is
none (:func:`ghost_of` picks ghost ``g`` of a pair).  Two pairs per array:

- the reduction views ``x`` (and ``g``): each ghost's super-rows those of a call on its
  slice alone (:func:`numbabn.cpu._plan.widen`), so its statistics have that call's blocking
  and bits;
- the elementwise views ``xe``, ``ye`` (and ``ge``, ``gie``): each ghost's widest super-rows
  of at most ``WIDEN_TO`` values, long loops whatever the slice's blocking (an elementwise
  pass gives the same bits on any view).

The training forward is one parallel loop over every ghost's ``(split, tile)`` tasks, each
the task of a call on that ghost's slice (:func:`numbabn.cpu.stats.minor_partial`); then
each ghost's partials merged as that call merges them, its finalize
(:func:`numbabn._math.finish_channel`: fold coefficients, saved statistics, Batch
Renormalization's ``r`` and ``d``), the running statistics' one update from the ghosts'
statistics Chan-merged in order, and one parallel elementwise pass over every row with its
ghost's coefficients.  The backward is the same over ``(sum g, sum g * (x - mean),
sum |g|)``.  So each ghost's results have the bits of a call on its slice, in two parallel
regions, as a call on the whole batch.

The GPU runs ghost batches as one call per ghost (:mod:`numbabn._ghost`): these drivers have
no twin in ``numbabn/cuda``.

A driver that reduces blocks takes ``rows_at`` first: the address of its per-block leaf's
code (``minor_rows`` or ``grad_partial``) for a ghost's view, which it calls through
(:func:`numbabn._jit.by_address`).
"""

import numba
import numpy as np
from numba import prange

from .._config import TASK_ELEMS
from .._jit import OPTIONS, indirect, leaf, stage, twin
from .._math import chan_merge_channels, channel_invstd, fold
from ._half import put, value
from ._plan import plan, repeat_inner, super_rows
from .backward import add_partials, grad_coefs, grad_partial
from .forward import finish_channels
from .stats import merge_partials, minor_partial, minor_rows

#: ``r * grad_xhat + d * grad_bias`` of Batch Renormalization rounded as NumPy rounds it, each
#: product then the sum, as the backward of one ghost's slice combines them: numbabn's
#: ``contract`` would fuse it into one FMA, of other bits.  Said explicitly: a function
#: without the option inherits its first caller's.
exact = numba.njit(**dict(OPTIONS, fastmath=False))


@stage
def ghost_of(a, b, g):
    """Ghost ``g``'s entry of a pair ``(a, b)``: ``a``'s ghosts first, then ``b``'s.  Parallel
    loops take a pair as its two arrays: given the tuple, the drivers' parallel twins left
    their outputs unwritten (numba 0.68; a small loop did not show it)."""
    if g < a.shape[0]:
        return a[g]
    return b[g - a.shape[0]]


@leaf
def ghost_task(task, ga, per_a, per_b):
    """Task ``task`` of a loop over ``per_a`` tasks for each of the first ``ga`` ghosts, then
    ``per_b`` for each of the others, as ``(ghost, task within the ghost)``."""
    if task < ga * per_a:
        return task // per_a, task % per_a
    u = task - ga * per_a
    return ga + u // per_b, u % per_b


@leaf
def ghost_plan(shape, num_channels, inner):
    """``(k, ct, ntiles, nsplit)`` of the ghosts of a reduction view of shape ``(G', rows,
    width)``: the super-rows and blocking (:func:`numbabn.cpu._plan.plan`) of a call on one
    ghost's slice."""
    k = super_rows(shape[2], num_channels, inner)
    ct, ntiles, nsplit = plan(shape[1], k * num_channels, inner)
    return k, ct, ntiles, nsplit


@stage
def ghost_partials(x, num_channels, inner):
    """The partials of every ghost of the reduction views ``x``, allocated: a pair ``(G',
    3, nsplit, k * C)`` as :func:`numbabn.cpu.stats.partials_minor` fills them; and the
    plans of both (:func:`ghost_plan`)."""
    xa, xb = x
    plan_a = ghost_plan(xa.shape, num_channels, inner)
    plan_b = ghost_plan(xb.shape, num_channels, inner)
    pa = np.empty((xa.shape[0], 3, plan_a[3], plan_a[0] * num_channels))
    pb = np.empty((xb.shape[0], 3, plan_b[3], plan_b[0] * num_channels))
    return (pa, pb), plan_a, plan_b


@stage
def ghost_stats(rows_at, x, inner, stats):
    """``stats[g]`` (3, C): ghost ``g``'s ``(count, mean, M2)`` as a call on its slice
    computes it: one parallel loop over every ghost's ``(split, tile)`` tasks, then each
    ghost's partials merged in split order."""
    num_channels = stats.shape[2]
    (pa, pb), (ka, cta, nta, nsa), (kb, ctb, ntb, nsb) = ghost_partials(x, num_channels, inner)
    xa, xb = x
    ga = xa.shape[0]
    for t in prange(ga * nsa * nta + xb.shape[0] * nsb * ntb):
        task = np.int64(t)  # int64, as in the serial twin (see stats.partials_strided)
        g, local = ghost_task(task, ga, nsa * nta, nsb * ntb)
        k, ct, ntiles, nsplit = (ka, cta, nta, nsa) if g < ga else (kb, ctb, ntb, nsb)
        part = ghost_of(pa, pb, g)
        minor_partial(rows_at, ghost_of(xa, xb, g), k * num_channels, inner, nsplit, ct, ntiles, local, part)
    for g in range(stats.shape[0]):
        merge_partials(ghost_of(pa, pb, g), ka if g < ga else kb, stats[g])


@stage
def finish_plain(stats, weight, bias, eps, coef, save, g):
    """Ghost ``g``'s :func:`numbabn._math.finish_channel` without running buffers nor Batch
    Renormalization (``save`` (3, G, C): mean, invstd, M2): the same arithmetic in loops
    that vectorize, as the ghosts' G-fold finalize wants."""
    n, mean, m2, invstd = stats[g, 0], stats[g, 1], stats[g, 2], save[1, g]
    for c in range(m2.shape[0]):  # alone, as in finish_channels
        invstd[c] = channel_invstd(n[c], m2[c], eps)
    for c in range(m2.shape[0]):
        coef[g, 0, c], coef[g, 1, c] = fold(mean[c], invstd[c], weight[c], bias[c])
        save[0, g, c] = mean[c]
        save[2, g, c] = m2[c]


@leaf
def finish_ghosts(stats, weight, bias, running_mean, running_var, momentum, eps, coef, save):
    """Each ghost's finalize (:func:`numbabn.cpu.forward.finish_channels`) from ``stats``
    (G, 3, C) into ``coef`` (G, 2, C) and ``save`` (rows, G, C) (``_math.save_rows``' rows,
    each ``(G, C)``); then the running statistics' one update (when given) from the ghosts'
    statistics Chan-merged in order.  Batch Renormalization's ``r`` and ``d`` (``save`` of
    five rows) take the running statistics before that update: each ghost finalizes with a
    copy of them, which its own update changes."""
    rows, num_ghosts, num_channels = save.shape
    running = np.empty((2, running_mean.shape[0] if rows >= 4 else 0), running_mean.dtype)
    mine = np.empty((rows, num_channels))  # contiguous: finish_channels' loops vectorize
    for g in range(num_ghosts if rows >= 4 else 0):
        # Loops, not slice copies (see docs/design.rst).
        for c in range(running.shape[1]):
            running[0, c] = running_mean[c]
            running[1, c] = running_var[c]
        for i in range(3, rows):  # Batch Renormalization's (rmax, dmax)
            for c in range(num_channels):
                mine[i, c] = save[i, g, c]
        finish_channels(stats[g], weight, bias, running[0], running[1], momentum, eps, coef[g], mine)
        for i in range(rows):
            for c in range(num_channels):
                save[i, g, c] = mine[i, c]
    for g in range(num_ghosts if rows < 4 else 0):
        finish_plain(stats, weight, bias, eps, coef, save, g)
    if running_mean.shape[0] == 0:
        return
    merged = np.zeros((3, num_channels))
    n = 0.0
    for g in range(num_ghosts):
        n = chan_merge_channels(n, merged[1], merged[2], stats[g, 0, 0], stats[g, 1], stats[g, 2])
    merged[0] = n
    # The update alone: this finalize's coefficients and saved rows go to scratch.
    scratch = np.empty((2, 2, num_channels))
    finish_channels(merged, weight, bias, running_mean, running_var, momentum, eps, scratch[0], scratch[1])


@leaf
def expand_ghosts(coef, inner, ga, ka, kb, width):
    """Each ghost's per-channel rows ``coef[g]`` (G, r, C) repeated along the super-rows of
    its elementwise view (:func:`numbabn.cpu._plan.expand`; ``ka`` rows per super-row for
    the first ``ga`` ghosts, ``kb`` for the rest), as (G, r, width)."""
    num_ghosts, r, num_channels = coef.shape
    out = np.empty((num_ghosts, r, width))
    step = num_channels * inner
    for g in range(num_ghosts):
        for i in range(r):
            values, row = coef[g, i], out[g, i]
            for m in range(ka if g < ga else kb):
                if inner > 1:
                    repeat_inner(values, inner, row[m * step : (m + 1) * step])
            if inner == 1:  # (N, C), channels-last: plain copies, in a loop that vectorizes
                for m in range(ka if g < ga else kb):
                    for c in range(num_channels):
                        row[m * step + c] = values[c]
    return out


@stage
def expand_pair(coef, inner, xe):
    """:func:`expand_ghosts` for the ghosts of the elementwise views ``xe``."""
    xa, xb = xe
    num_channels = coef.shape[2]
    ka = super_rows(xa.shape[2], num_channels, inner)
    kb = super_rows(xb.shape[2], num_channels, inner)
    return expand_ghosts(coef, inner, xa.shape[0], ka, kb, max(xa.shape[2], xb.shape[2]))


@stage
def chunk_rows(shape):
    """``(rows per task, tasks per ghost)`` of an elementwise pass over the ghosts of a view
    of shape ``(G', rows, width)``: tasks of about ``TASK_ELEMS`` values."""
    step = max(1, TASK_ELEMS // max(shape[2], 1))
    return step, (shape[1] + step - 1) // step


@leaf
def chunk_count(shape_a, shape_b):
    """The tasks of an elementwise pass over the views of a pair of shapes ``shape_a`` and
    ``shape_b`` (:func:`ghost_chunk`)."""
    return shape_a[0] * chunk_rows(shape_a)[1] + shape_b[0] * chunk_rows(shape_b)[1]


@leaf
def ghost_chunk(task, shape_a, shape_b):
    """Task ``task`` of an elementwise pass over the views of a pair of shapes: ``(ghost, r0,
    r1)``, rows ``[r0, r1)`` of that ghost's view.  Leaves on integers, as
    :func:`ghost_task` and :func:`ghost_plan`: inlined, such steps multiplied the parallel
    drivers' compile time."""
    step_a, per_a = chunk_rows(shape_a)
    step_b, per_b = chunk_rows(shape_b)
    g, chunk = ghost_task(task, shape_a[0], per_a, per_b)
    rows, step = (shape_a[1], step_a) if g < shape_a[0] else (shape_b[1], step_b)
    r0 = chunk * step
    return g, r0, min(r0 + step, rows)


@leaf
def affine_rows(x2, a, b, r0, r1, y2):
    """``y2[o] = x2[o] * a + b`` for rows ``o`` in ``[r0, r1)`` (float64 arithmetic, rounded
    on store, as :func:`numbabn.cpu.forward.normalize_minor`).  A leaf: the parallel loop
    that calls it compiles in a fraction of the time of one that holds it."""
    for o in range(r0, r1):
        xr, yr = x2[o], y2[o]
        for j in range(x2.shape[1]):
            put(yr, j, value(xr, j) * a[j] + b[j])


@stage
def normalize_ghosts(xe, inner, coef, ye):
    """``y = x * a + b`` on every row of the elementwise views, with its ghost's
    coefficients ``coef[g]`` (2, C), as :func:`numbabn.cpu.forward.normalize_minor`."""
    ab = expand_pair(coef, inner, xe)
    (xa, xb), (ya, yb) = xe, ye
    for t in prange(chunk_count(xa.shape, xb.shape)):
        g, r0, r1 = ghost_chunk(np.int64(t), xa.shape, xb.shape)
        affine_rows(ghost_of(xa, xb, g), ab[g, 0], ab[g, 1], r0, r1, ghost_of(ya, yb, g))


@twin
def train_ghosts_minor(rows_at, x, inner, weight, bias, running_mean, running_var, momentum, eps, xe, ye, save):
    """Driver, ghost batches' training forward (see the module): ``x`` the reduction views,
    ``xe`` and ``ye`` the elementwise views of the input and output; ``save`` (rows, G, C)
    float64 receives each ghost's rows of ``_math.save_rows`` (mean, invstd, M2, then Batch
    Renormalization's ``r`` and ``d`` where its rows bring ``rmax`` and ``dmax``)."""
    num_ghosts, num_channels = save.shape[1], save.shape[2]
    stats = np.empty((num_ghosts, 3, num_channels))
    ghost_stats(rows_at, x, inner, stats)
    coef = np.empty((num_ghosts, 2, num_channels))
    finish_ghosts(stats, weight, bias, running_mean, running_var, momentum, eps, coef, save)
    normalize_ghosts(xe, inner, coef, ye)


@stage
def ghost_grad_sums(rows_at, g, x, inner, mean, sums):
    """``sums[k]`` (3, C): ghost ``k``'s ``(sum g, sum g * (x - mean[k]), sum |g|)``, as
    :func:`numbabn.cpu.backward.sums_minor` on its slice (``g``, ``x``: reduction views)."""
    num_ghosts, num_channels = mean.shape
    (pa, pb), (ka, cta, nta, nsa), (kb, ctb, ntb, nsb) = ghost_partials(x, num_channels, inner)
    (ga_, gb_), (xa, xb) = g, x
    ga = xa.shape[0]
    means = np.empty((num_ghosts, 1, num_channels))  # loops, not a reshape (see docs/design.rst)
    for k in range(num_ghosts):
        for c in range(num_channels):
            means[k, 0, c] = mean[k, c]
    centre = expand_ghosts(means, inner, ga, ka, kb, max(xa.shape[2], xb.shape[2]))
    for t in prange(ga * nsa * nta + xb.shape[0] * nsb * ntb):
        task = np.int64(t)  # int64, as in the serial twin (see stats.partials_strided)
        k, local = ghost_task(task, ga, nsa * nta, nsb * ntb)
        s, ct, ntiles, nsplit = (ka, cta, nta, nsa) if k < ga else (kb, ctb, ntb, nsb)
        g2, x2, part = ghost_of(ga_, gb_, k), ghost_of(xa, xb, k), ghost_of(pa, pb, k)
        args = (g2, x2, s * num_channels, inner, centre[k, 0], nsplit, ct, ntiles, local, part)
        indirect(grad_partial, rows_at, args)
    for k in range(num_ghosts):
        add_partials(ghost_of(pa, pb, k), ka if k < ga else kb, sums[k])


@exact
def add_ghost(grads, rounded, factors, g, total):
    """Add ghost ``g``'s ``grads`` (3, C) to ``total`` (3, C): ``grad_weight`` and
    ``grad_bias`` as its own call returns them (rounded to the input's dtype through
    ``rounded`` (2, C) of that dtype), with Batch Renormalization's ``factors`` (2, G, C)
    when given (non-empty)."""
    num_channels = total.shape[1]
    for c in range(num_channels):
        rounded[0, c] = grads[0, c]
        rounded[1, c] = grads[1, c]
        total[2, c] += grads[2, c]
    if factors.shape[0] == 0:
        for c in range(num_channels):
            total[0, c] += rounded[0, c]
            total[1, c] += rounded[1, c]
    else:
        for c in range(num_channels):
            gx, gb = np.float64(rounded[0, c]), np.float64(rounded[1, c])
            total[0, c] += factors[0, g, c] * gx + factors[1, g, c] * gb
            total[1, c] += gb


@leaf
def ghost_coefs(sums, n_a, n_b, ga, weight, mean, invstd, factors, rounded, coef, total):
    """Each ghost's :func:`numbabn.cpu.backward.grad_coefs` (``n_a`` values per channel for
    the first ``ga`` ghosts, ``n_b`` for the rest, ``weight[g]`` its weight) into ``coef``
    (G, 3, C); ``total`` (3, C) receives the ghosts' ``(grad_weight, grad_bias, sum |g|)``
    added in order (:func:`add_ghost`)."""
    grads = np.empty((3, sums.shape[2]))
    total[:] = 0.0
    for g in range(sums.shape[0]):
        n = n_a if g < ga else n_b
        grad_coefs(sums[g], n, weight[g], mean[g], invstd[g], True, coef[g], grads)
        add_ghost(grads, rounded, factors, g, total)


@leaf
def grad_rows(g2, x2, abd, depends_on_x, r0, r1, gi2):
    """``grad_input = g * A + x * B + D`` for rows ``[r0, r1)``, ``abd`` the rows ``(A, B,
    D)``; ``g * A`` where the input does not count (as
    :func:`numbabn.cpu.backward.apply_minor`).  A leaf, as :func:`affine_rows`."""
    a = abd[0]
    b = abd[1]
    d = abd[2]
    if depends_on_x:
        for o in range(r0, r1):
            gr, xr, out = g2[o], x2[o], gi2[o]
            for j in range(x2.shape[1]):
                put(out, j, value(gr, j) * a[j] + value(xr, j) * b[j] + d[j])
    else:
        for o in range(r0, r1):
            gr, out = g2[o], gi2[o]
            for j in range(x2.shape[1]):
                put(out, j, value(gr, j) * a[j])


@stage
def apply_ghosts(ge, xe, inner, coef, gie):
    """``grad_input = g * A + x * B + D`` on every row of the elementwise views with its
    ghost's coefficients ``coef[g]`` (3, C), as :func:`numbabn.cpu.backward.apply_minor`."""
    num_ghosts, num_channels = coef.shape[0], coef.shape[2]
    abd = expand_pair(coef, inner, xe)
    (ga_, gb_), (xa, xb), (gia, gib) = ge, xe, gie
    depends_on_x = np.zeros(num_ghosts, np.bool_)  # per ghost, as apply_minor's
    for k in range(num_ghosts):
        b, d = coef[k, 1], coef[k, 2]
        nonzero = False
        for c in range(num_channels):  # a reduction that vectorizes, not a branch per channel
            nonzero |= (b[c] != 0.0) | (d[c] != 0.0)
        depends_on_x[k] = nonzero
    for t in prange(chunk_count(xa.shape, xb.shape)):
        k, r0, r1 = ghost_chunk(np.int64(t), xa.shape, xb.shape)
        g2, x2, gi2 = ghost_of(ga_, gb_, k), ghost_of(xa, xb, k), ghost_of(gia, gib, k)
        grad_rows(g2, x2, abd[k], depends_on_x[k], r0, r1, gi2)


@twin
def backward_ghosts_minor(rows_at, g, x, inner, weight, mean, invstd, factors, ge, xe, gie, total):
    """Driver, ghost batches' training backward (see the module): ``g`` and ``x`` the
    reduction views of ``grad_output`` and the input, ``ge``, ``xe`` and ``gie`` the
    elementwise views of those and ``grad_input``; ghost ``k``'s weight (times Batch
    Renormalization's ``r``, rounded to the input's dtype) ``weight[k]``, its saved
    ``mean[k]`` and ``invstd[k]``; ``total`` (3, C) receives ``(grad_weight, grad_bias,
    sum |g|)`` summed over the ghosts."""
    num_ghosts, num_channels = mean.shape
    sums = np.empty((num_ghosts, 3, num_channels))
    ghost_grad_sums(rows_at, g, x, inner, mean, sums)
    coef = np.empty((num_ghosts, 3, num_channels))
    xa, xb = x
    n_a = float(xa.shape[1] * xa.shape[2] // num_channels)
    n_b = float(xb.shape[1] * xb.shape[2] // num_channels)
    rounded = np.empty((2, num_channels), xa.dtype)
    ghost_coefs(sums, n_a, n_b, xa.shape[0], weight, mean, invstd, factors, rounded, coef, total)
    apply_ghosts(ge, xe, inner, coef, gie)


#: The stages the host backend runs here; host-only (see the module).
DRIVERS = ("forward_train_ghosts", "backward_ghosts")


def forward_train_ghosts(parallel, x, inner, weight, bias, running_mean, running_var, momentum, eps, xe, ye, save):
    """Training forward of ghost batches (view pairs as in the module) into ``ye``; ``save``
    (rows, G, C) float64."""
    at = minor_rows.address(x[0][0])  # a ghost's view
    train_ghosts_minor(parallel, at, x, inner, weight, bias, running_mean, running_var, momentum, eps, xe, ye, save)


def backward_ghosts(parallel, g, x, inner, weight, mean, invstd, factors, ge, xe, gie, total):
    """Training backward of ghost batches (view pairs as in the module): ``gie`` receives
    ``grad_input``, ``total`` (3, C) the per-channel sums."""
    at = grad_partial.address(g[0][0], x[0][0])
    backward_ghosts_minor(parallel, at, g, x, inner, weight, mean, invstd, factors, ge, xe, gie, total)
