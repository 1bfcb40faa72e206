"""Ghost batches on channel-minor layouts (NHWC, (N, C)): every ghost of a call in one driver.

A ghost is a slice of axis 0; on a C-contiguous input each ghost's rows are consecutive rows
of the ``(outer, C * inner)`` view, so the ghosts of ``virtual_batch_size`` samples are one
``(G, rows, width)`` array ``xa``, each ``xa[g]`` the channel-minor view a call on that slice
alone takes (super-rows of :func:`numbabn.cpu._plan.widen`), and the remainder, when there is
one, ``xb`` of shape ``(1, rows', width')``; with none, ``xb`` is ``xa[:0]``.

The training forward is one parallel loop over ``(ghost, split, tile)`` tasks, each the
task a call on that ghost's slice would run (:func:`numbabn.cpu.stats.minor_partial`, with
the slice's blocking); then each ghost's partials merged as that call merges them, its
finalize (:func:`numbabn._math.finish_channel`: fold coefficients, saved statistics, Batch
Renormalization's ``r`` and ``d``), the running statistics' one update from the ghosts'
statistics Chan-merged in order, and one parallel elementwise pass over every row with its
ghost's coefficients.  The backward is the same over ``(sum g, sum g * (x - mean),
sum |g|)``.  So each ghost's results have the bits of a call on its slice, and the input
crosses the threads once per pass, as a call on the whole batch would.

The GPU runs ghost batches as one call per ghost (:mod:`numbabn._ghost`): there is no twin
in ``numbabn/cuda``.

A driver that reduces blocks takes ``rows_at`` first: the address of its per-block leaf's
code (``minor_rows`` or ``grad_columns``) for a ghost's view, which it calls through
(:func:`numbabn._jit.by_address`).
"""

import numba
import numpy as np
from numba import prange

from .._config import TASK_ELEMS
from .._jit import OPTIONS, leaf, stage, twin
from .._math import chan_merge_channels
from ._plan import expand, plan, super_rows
from .backward import add_partials, grad_coefs, grad_columns, grad_partial
from .forward import finish_channels
from .stats import merge_partials, minor_partial, minor_rows

#: ``r * grad_xhat + d * grad_bias`` of Batch Renormalization rounded as NumPy rounds it, each
#: product then the sum, as the backward of one ghost's slice combines them: numbabn's
#: ``contract`` would fuse it into one FMA, of other bits.  Said explicitly: a function
#: without the option inherits its first caller's.
exact = numba.njit(**dict(OPTIONS, fastmath=False))


@stage
def ghost_of(a, b, g):
    """Ghost ``g``'s entry: ``a``'s ghosts first, then ``b``'s."""
    if g < a.shape[0]:
        return a[g]
    return b[g - a.shape[0]]


@stage
def ghost_plan(view, num_channels, inner):
    """``(k, ct, ntiles, nsplit)`` of the ghosts of ``view`` (G, rows, width): the super-rows
    and blocking (:func:`numbabn.cpu._plan.plan`) of a call on one ghost's slice."""
    k = super_rows(view.shape[2], num_channels, inner)
    ct, ntiles, nsplit = plan(view.shape[1], k * num_channels, inner)
    return k, ct, ntiles, nsplit


@stage
def ghost_task(task, ga, per_a, per_b):
    """Task ``task`` of a loop over ``per_a`` tasks for each of ``a``'s ``ga`` ghosts, then
    ``per_b`` for each of ``b``'s, as ``(ghost, task within the ghost)``."""
    if task < ga * per_a:
        return task // per_a, task % per_a
    u = task - ga * per_a
    return ga + u // per_b, u % per_b


@stage
def ghost_partials(rows_at, xa, xb, num_channels, inner, pa, pb):
    """Every ghost's channel-minor partials (:func:`numbabn.cpu.stats.partials_minor`) into
    its ``pa[g]`` or ``pb[g]`` (3, nsplit, k * C): one parallel loop over all their tasks."""
    ka, cta, nta, nsa = ghost_plan(xa, num_channels, inner)
    kb, ctb, ntb, nsb = ghost_plan(xb, num_channels, inner)
    ga = xa.shape[0]
    for t in prange(ga * nsa * nta + xb.shape[0] * nsb * ntb):
        task = np.int64(t)  # int64, as in the serial twin (see stats.partials_strided)
        g, local = ghost_task(task, ga, nsa * nta, nsb * ntb)
        k, ct, ntiles, nsplit = (ka, cta, nta, nsa) if g < ga else (kb, ctb, ntb, nsb)
        part = ghost_of(pa, pb, g)
        minor_partial(rows_at, ghost_of(xa, xb, g), k * num_channels, inner, nsplit, ct, ntiles, local, part)


@stage
def ghost_stats(rows_at, xa, xb, inner, stats):
    """``stats[g]`` (3, C): ghost ``g``'s ``(count, mean, M2)``, as a call on its slice."""
    num_channels = stats.shape[2]
    ka, _, _, nsa = ghost_plan(xa, num_channels, inner)
    kb, _, _, nsb = ghost_plan(xb, num_channels, inner)
    pa = np.empty((xa.shape[0], 3, nsa, ka * num_channels))
    pb = np.empty((xb.shape[0], 3, nsb, kb * num_channels))
    ghost_partials(rows_at, xa, xb, num_channels, inner, pa, pb)
    for g in range(stats.shape[0]):
        merge_partials(ghost_of(pa, pb, g), ka if g < xa.shape[0] else kb, stats[g])


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
    for g in range(num_ghosts):
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
    if running_mean.shape[0] == 0:
        return
    merged = np.zeros((3, num_channels))
    n = 0.0
    for g in range(num_ghosts):
        n = chan_merge_channels(n, merged[1], merged[2], stats[g, 0, 0], stats[g, 1], stats[g, 2])
    merged[0] = n
    # The update alone: this finalize's coefficients and saved rows go to scratch.
    finish_channels(
        merged,
        weight,
        bias,
        running_mean,
        running_var,
        momentum,
        eps,
        np.empty((2, num_channels)),
        np.empty((2, num_channels)),
    )


@leaf
def expand_ghosts(coef, inner, ga, ka, kb, width):
    """Each ghost's per-channel rows ``coef[g]`` (G, r, C) repeated along its super-rows
    (:func:`numbabn.cpu._plan.expand`; ``ka`` rows per super-row for the first ``ga``
    ghosts, ``kb`` for the rest), as (G, r, width)."""
    num_ghosts, r, num_channels = coef.shape
    out = np.zeros((num_ghosts, r, width))
    for g in range(num_ghosts):
        k = ka if g < ga else kb
        for i in range(r):
            row = expand(coef[g, i], inner, k)
            for j in range(row.shape[0]):
                out[g, i, j] = row[j]
    return out


@stage
def chunk_rows(view):
    """Rows per task of an elementwise pass over the ghosts of ``view`` (G, rows, width):
    about ``TASK_ELEMS`` values, and how many tasks each ghost takes."""
    step = max(1, TASK_ELEMS // max(view.shape[2], 1))
    return step, (view.shape[1] + step - 1) // step


@stage
def ghost_chunk(task, xa, xb):
    """Task ``task`` of an elementwise pass over every ghost's rows, in chunks of
    :func:`chunk_rows`: ``(ghost, r0, r1)``, its rows ``[r0, r1)`` of that ghost's view."""
    step_a, per_a = chunk_rows(xa)
    step_b, per_b = chunk_rows(xb)
    g, chunk = ghost_task(task, xa.shape[0], per_a, per_b)
    step = step_a if g < xa.shape[0] else step_b
    r0 = chunk * step
    return g, r0, min(r0 + step, ghost_of(xa, xb, g).shape[0])


@stage
def chunk_count(xa, xb):
    """The tasks of an elementwise pass over every ghost's rows (:func:`ghost_chunk`)."""
    return xa.shape[0] * chunk_rows(xa)[1] + xb.shape[0] * chunk_rows(xb)[1]


@stage
def normalize_ghosts(xa, xb, inner, coef, ya, yb):
    """``y = x * a + b`` on every row, with its ghost's coefficients ``coef[g]`` (2, C), as
    :func:`numbabn.cpu.forward.normalize_minor` on that ghost's view."""
    ga, num_channels = xa.shape[0], coef.shape[2]
    ka = super_rows(xa.shape[2], num_channels, inner)
    kb = super_rows(xb.shape[2], num_channels, inner)
    ab = expand_ghosts(coef, inner, ga, ka, kb, max(xa.shape[2], xb.shape[2]))
    for t in prange(chunk_count(xa, xb)):
        g, r0, r1 = ghost_chunk(np.int64(t), xa, xb)
        x2, y2 = ghost_of(xa, xb, g), ghost_of(ya, yb, g)
        a = ab[g, 0]
        b = ab[g, 1]
        for o in range(r0, r1):
            for j in range(x2.shape[1]):
                y2[o, j] = x2[o, j] * a[j] + b[j]


@twin
def train_ghosts_minor(rows_at, xa, xb, inner, weight, bias, running_mean, running_var, momentum, eps, ya, yb, save):
    """Driver, ghost batches' training forward on channel-minor views (see the module):
    ``save`` (rows, G, C) float64 receives each ghost's rows of ``_math.save_rows`` (mean,
    invstd, M2, then Batch Renormalization's ``r`` and ``d`` where its rows bring ``rmax``
    and ``dmax``), ``ya`` and ``yb`` the output."""
    num_ghosts, num_channels = save.shape[1], save.shape[2]
    stats = np.empty((num_ghosts, 3, num_channels))
    ghost_stats(rows_at, xa, xb, inner, stats)
    coef = np.empty((num_ghosts, 2, num_channels))
    finish_ghosts(stats, weight, bias, running_mean, running_var, momentum, eps, coef, save)
    normalize_ghosts(xa, xb, inner, coef, ya, yb)


@stage
def ghost_grad_sums(rows_at, goa, gob, xa, xb, inner, mean, sums):
    """``sums[g]`` (3, C): ghost ``g``'s ``(sum g, sum g * (x - mean[g]), sum |g|)``, as
    :func:`numbabn.cpu.backward.sums_minor` on its slice."""
    num_channels = mean.shape[1]
    ga = xa.shape[0]
    ka, cta, nta, nsa = ghost_plan(xa, num_channels, inner)
    kb, ctb, ntb, nsb = ghost_plan(xb, num_channels, inner)
    means = np.empty((mean.shape[0], 1, num_channels))  # loops, not a reshape (see docs/design.rst)
    for g in range(mean.shape[0]):
        for c in range(num_channels):
            means[g, 0, c] = mean[g, c]
    centre = expand_ghosts(means, inner, ga, ka, kb, max(xa.shape[2], xb.shape[2]))
    pa = np.empty((ga, 3, nsa, ka * num_channels))
    pb = np.empty((xb.shape[0], 3, nsb, kb * num_channels))
    for t in prange(ga * nsa * nta + xb.shape[0] * nsb * ntb):
        task = np.int64(t)  # int64, as in the serial twin (see stats.partials_strided)
        g, local = ghost_task(task, ga, nsa * nta, nsb * ntb)
        k, ct, ntiles, nsplit = (ka, cta, nta, nsa) if g < ga else (kb, ctb, ntb, nsb)
        g2, x2 = ghost_of(goa, gob, g), ghost_of(xa, xb, g)
        grad_partial(
            rows_at, g2, x2, k * num_channels, inner, centre[g, 0], nsplit, ct, ntiles, local, ghost_of(pa, pb, g)
        )
    for g in range(sums.shape[0]):
        add_partials(ghost_of(pa, pb, g), ka if g < ga else kb, sums[g])


@exact
def add_ghost(grads, one, factors, g, total):
    """Add ghost ``g``'s ``grads`` (3, C) to ``total`` (3, C): ``grad_weight`` and
    ``grad_bias`` as its own call returns them (rounded to the input's dtype, the dtype of
    ``one``), with Batch Renormalization's ``factors`` (2, G, C) when given (non-empty)."""
    for c in range(total.shape[1]):
        one[0] = grads[0, c]
        gx = np.float64(one[0])
        one[0] = grads[1, c]
        gb = np.float64(one[0])
        if factors.shape[0] > 0:
            gx = factors[0, g, c] * gx + factors[1, g, c] * gb
        total[0, c] += gx
        total[1, c] += gb
        total[2, c] += grads[2, c]


@leaf
def ghost_coefs(sums, n_a, n_b, ga, weight, mean, invstd, factors, one, coef, total):
    """Each ghost's :func:`numbabn.cpu.backward.grad_coefs` (``n_a`` values per channel for
    the first ``ga`` ghosts, ``n_b`` for the rest, ``weight[g]`` its weight) into ``coef``
    (G, 3, C); ``total`` (3, C) receives the ghosts' ``(grad_weight, grad_bias, sum |g|)``
    added in order (:func:`add_ghost`)."""
    grads = np.empty((3, sums.shape[2]))
    total[:] = 0.0
    for g in range(sums.shape[0]):
        n = n_a if g < ga else n_b
        grad_coefs(sums[g], n, weight[g], mean[g], invstd[g], True, coef[g], grads)
        add_ghost(grads, one, factors, g, total)


@stage
def apply_ghosts(goa, gob, xa, xb, inner, coef, gia, gib):
    """``grad_input = g * A + x * B + D`` on every row with its ghost's coefficients
    ``coef[g]`` (3, C), as :func:`numbabn.cpu.backward.apply_minor` on that ghost's views."""
    num_ghosts, num_channels = coef.shape[0], coef.shape[2]
    ga = xa.shape[0]
    ka = super_rows(xa.shape[2], num_channels, inner)
    kb = super_rows(xb.shape[2], num_channels, inner)
    abd = expand_ghosts(coef, inner, ga, ka, kb, max(xa.shape[2], xb.shape[2]))
    depends_on_x = np.zeros(num_ghosts, np.bool_)  # per ghost, as apply_minor's
    for g in range(num_ghosts):
        for c in range(num_channels):
            if coef[g, 1, c] != 0.0 or coef[g, 2, c] != 0.0:
                depends_on_x[g] = True
    for t in prange(chunk_count(xa, xb)):
        g, r0, r1 = ghost_chunk(np.int64(t), xa, xb)
        g2, x2, gi2 = ghost_of(goa, gob, g), ghost_of(xa, xb, g), ghost_of(gia, gib, g)
        a = abd[g, 0]
        b = abd[g, 1]
        d = abd[g, 2]
        if depends_on_x[g]:
            for o in range(r0, r1):
                for j in range(x2.shape[1]):
                    gi2[o, j] = g2[o, j] * a[j] + x2[o, j] * b[j] + d[j]
        else:
            for o in range(r0, r1):
                for j in range(x2.shape[1]):
                    gi2[o, j] = g2[o, j] * a[j]


@twin
def backward_ghosts_minor(rows_at, goa, gob, xa, xb, inner, weight, mean, invstd, factors, gia, gib, total):
    """Driver, ghost batches' training backward on channel-minor views (see the module):
    ghost ``g``'s ``grad_output`` and input views in ``goa``/``gob`` and ``xa``/``xb``, its
    weight (times Batch Renormalization's ``r``, rounded to the input's dtype) ``weight[g]``,
    its saved ``mean[g]`` and ``invstd[g]``; ``gia``/``gib`` receive ``grad_input`` and
    ``total`` (3, C) ``(grad_weight, grad_bias, sum |g|)`` summed over the ghosts."""
    num_ghosts, num_channels = mean.shape
    sums = np.empty((num_ghosts, 3, num_channels))
    ghost_grad_sums(rows_at, goa, gob, xa, xb, inner, mean, sums)
    coef = np.empty((num_ghosts, 3, num_channels))
    n_a = float(xa.shape[1] * xa.shape[2] // num_channels)
    n_b = float(xb.shape[1] * xb.shape[2] // num_channels)
    one = np.empty(1, xa.dtype)
    ghost_coefs(sums, n_a, n_b, xa.shape[0], weight, mean, invstd, factors, one, coef, total)
    apply_ghosts(goa, gob, xa, xb, inner, coef, gia, gib)


#: The stages the host backend runs here; host-only (see the module).
DRIVERS = ("forward_train_ghosts", "backward_ghosts")


def forward_train_ghosts(parallel, xa, xb, inner, weight, bias, running_mean, running_var, momentum, eps, ya, yb, save):
    """Training forward of ghost batches whose channel-minor views are ``xa`` and ``xb`` (see
    the module) into ``ya`` and ``yb``; ``save`` (rows, G, C) float64."""
    at = minor_rows.address(xa[0])  # a ghost's view
    train_ghosts_minor(
        parallel, at, xa, xb, inner, weight, bias, running_mean, running_var, momentum, eps, ya, yb, save
    )


def backward_ghosts(parallel, goa, gob, xa, xb, inner, weight, mean, invstd, factors, gia, gib, total):
    """Training backward of ghost batches (views as :func:`forward_train_ghosts`'): ``gia``
    and ``gib`` receive ``grad_input``, ``total`` (3, C) the per-channel sums."""
    at = grad_columns.address(goa[0], xa[0])
    backward_ghosts_minor(parallel, at, goa, gob, xa, xb, inner, weight, mean, invstd, factors, gia, gib, total)
