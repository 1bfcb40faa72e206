"""Per-channel statistics ``(count, mean, M2)`` in one pass over memory: blocked Welford.

Each block (a row chunk of one channel, or a few rows of a channel tile) gets its exact mean
and centred ``M2`` while it is still in L1/L2 (channel-strided: a sweep for the mean, then
one for the centred squares; channel-minor: one sweep of sums shifted by a nearby mean, see
:func:`minor_rows`), then is Chan-merged into its task's partial.  DRAM sees ``x`` once; there
is no unshifted ``E[x^2] - E[x]^2``.  Sums run in float64, but the channel-minor blocks of
float32 and float16 data, which sum in float32 lanes and merge in float64
(:func:`shifted_sums32`, docs/math.rst).

A driver that reduces blocks takes ``rows_at`` first: the address of its per-block leaf's
code (``strided_rows`` or ``minor_rows``) for its input arrays, which it calls through
(:func:`numbabn._jit.by_address`).
"""

import numpy as np
from numba import prange, types
from numba.extending import overload

from .._config import BLOCK, HEAD_ROWS, LANE_ROWS, MINOR_ROWS, SHIFT_CANCEL, SHIFT_CANCEL_32, TINY_SQUARES
from .._jit import by_address, indirect, leaf, stage, twin
from .._math import chan_merge, chan_merge_channels
from ._half import value
from ._plan import minor_task, plan, repeat_inner, rows, scratch_behind, sum_inner, super_rows


@stage
def row_block(x3, c, r0, b):
    """Block ``b`` of channel ``c``'s rows from row ``r0`` on: rows are cut into blocks of
    ``BLOCK`` elements, the last block of a row shorter."""
    inner = x3.shape[2]
    nb = (inner + BLOCK - 1) // BLOCK
    kb = b % nb
    return x3[r0 + b // nb, c, kb * BLOCK : min(inner, (kb + 1) * BLOCK)]


#: The fixed argument types of the leaves called through their address (:func:`by_address`).
I64 = types.int64
VEC = types.float64[::1]


@by_address(1, I64, I64, I64)
def strided_rows(x3, c, r0, r1):
    """``(n, mean, M2)`` of channel ``c`` over outer rows ``[r0, r1)``: blocked Welford.

    Each block's mean comes from a first sweep, its centred ``M2`` from a second sweep over
    the block while it is in L1, then Chan's merge.  Each sweep is a loop of its own over the
    block slice from 0, which LLVM vectorizes (a loop fusing one block's second sweep with
    the next block's first stayed scalar, and ``range(k0, k1)`` loops ran several times
    slower).
    """
    nblocks = (r1 - r0) * ((x3.shape[2] + BLOCK - 1) // BLOCK)
    n, mean, m2 = 0.0, 0.0, 0.0
    for b in range(nblocks):
        block = row_block(x3, c, r0, b)
        s = 0.0
        for k in range(block.shape[0]):
            s += value(block, k)
        bn = float(block.shape[0])
        bm = s / bn
        q = 0.0
        for k in range(block.shape[0]):
            d = value(block, k) - bm
            q += d * d
        n, mean, m2 = chan_merge(n, mean, m2, bn, bm, q)
    return n, mean, m2


@stage
def partials_strided(rows_at, x3, nsplit, part):
    """Channel-strided partials: task ``(split, c)`` reduces rows ``o`` of channel ``c``."""
    outer, num_channels, inner = x3.shape
    for t in prange(nsplit * num_channels):
        # int64, as in the serial twin: a parallel loop's index is unsigned, and a leaf
        # called with it would compile a second time.
        task = np.int64(t)
        split = task // num_channels
        c = task % num_channels
        r0, r1 = rows(split, nsplit, outer)
        n, mean, m2 = indirect(strided_rows, rows_at, (x3, c, r0, r1))
        part[0, split, c] = n
        part[1, split, c] = mean
        part[2, split, c] = m2


@stage
def shifted4(v0, v1, v2, v3, m):
    """``(sum(v - m), sum((v - m) ** 2))`` over four rows' values of one column, in float64."""
    d0 = np.float64(v0) - m
    d1 = np.float64(v1) - m
    d2 = np.float64(v2) - m
    d3 = np.float64(v3) - m
    return (d0 + d1) + (d2 + d3), (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)


@leaf
def shifted_sums(x2, o0, o1, j0, shift, acc_s, acc_q):
    """``acc_s[j] += sum(d)`` and ``acc_q[j] += sum(d ** 2)``, ``d = x2[o0:o1, j0 + j] -
    shift[j]``: both sums in one sweep, four rows per sweep of the accumulators."""
    o = o0
    while o + 4 <= o1:
        x0, x1, x2_, x3 = x2[o, j0:], x2[o + 1, j0:], x2[o + 2, j0:], x2[o + 3, j0:]
        for j in range(acc_s.shape[0]):
            s, q = shifted4(value(x0, j), value(x1, j), value(x2_, j), value(x3, j), shift[j])
            acc_s[j] += s
            acc_q[j] += q
        o += 4
    for r in range(o, o1):
        xr = x2[r, j0:]
        for j in range(acc_s.shape[0]):
            d = np.float64(value(xr, j)) - shift[j]
            acc_s[j] += d
            acc_q[j] += d * d


@stage
def quad32(x2, o, j0, m, s32, q32):
    """``s32[j] += sum(d)`` and ``q32[j] += sum(d ** 2)`` over rows ``o`` to ``o + 3``,
    ``d = x2[o + r, j0 + j] - m[j]``, in float32 (four rows summed pairwise first)."""
    r0, r1, r2, r3 = x2[o, j0:], x2[o + 1, j0:], x2[o + 2, j0:], x2[o + 3, j0:]
    for j in range(s32.shape[0]):
        d0 = np.float32(value(r0, j)) - m[j]
        d1 = np.float32(value(r1, j)) - m[j]
        d2 = np.float32(value(r2, j)) - m[j]
        d3 = np.float32(value(r3, j)) - m[j]
        s32[j] += (d0 + d1) + (d2 + d3)
        q32[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)


@leaf
def shifted_sums32(x2, o0, o1, j0, shift, lanes, acc_s, acc_q):
    """:func:`shifted_sums` of float32 (or float16) values in float32 lanes: ``d = x - shift``
    and its sums over runs of up to ``LANE_ROWS`` rows are float32 (four rows pairwise, then
    row group by row group), and each run's sums are added to the float64 ``acc_s`` and
    ``acc_q``.  ``shift`` holds float32 values (:func:`lane_shift`), so ``d`` is exact for
    values near the shift; ``lanes`` (float32, at least three times the width) is scratch.
    docs/math.rst has the error bound."""
    width = acc_s.shape[0]
    m = lanes[:width]
    s32 = lanes[width : 2 * width]
    q32 = lanes[2 * width : 3 * width]
    for j in range(width):
        m[j] = np.float32(shift[j])
    o = o0
    while o < o1:
        e = min(o1, o + LANE_ROWS)
        for j in range(width):
            s32[j] = 0.0
            q32[j] = 0.0
        while o + 4 <= e:
            quad32(x2, o, j0, m, s32, q32)
            o += 4
        for r in range(o, e):
            xr = x2[r, j0:]
            for j in range(width):
                d = np.float32(value(xr, j)) - m[j]
                s32[j] += d
                q32[j] += d * d
        o = e
        for j in range(width):
            acc_s[j] += np.float64(s32[j])
            acc_q[j] += np.float64(q32[j])


@stage
def lane_shift(v, f32):
    """A block's shift ``v``, rounded to float32 (kept as float64) for float32 lanes
    (``f32``), so that they subtract exactly the value the block's mean is taken from."""
    return np.float64(np.float32(v)) if f32 else v


@leaf
def out_of_range32(acc_s, acc_q, tiny):
    """Whether a block's float32 sums left float32's range in some column: squares that
    overflowed (``inf``, where float64 squares may not), or a sum of squares below ``tiny``
    that is not an exact zero, where squares lost bits to underflow.  Such a block is summed
    again in float64, as float64 data is."""
    bad = False
    for j in range(acc_q.shape[0]):
        q = acc_q[j]
        bad |= (q == np.inf) | ((q < tiny) & ((q != 0.0) | (acc_s[j] != 0.0)))
    return bad


def lanes32(a):
    """Whether :func:`minor_rows` sums ``a``'s values in float32 lanes (float32 and float16
    data) rather than float64 (float64 data); a constant of the array type."""


#: The kernels' dtypes whose channel-minor blocks sum in float32 lanes (uint16: float16 bits).
LANE_TYPES = (types.float32, types.uint16)


@overload(lanes32)
def _lanes32(a):
    flag = a.dtype in LANE_TYPES
    return lambda a: flag


def block_sums(x2, o0, o1, j0, shift, lanes, acc_s, acc_q):
    """The first sweep of a :func:`minor_rows` block: :func:`shifted_sums32` for float32 and
    float16 data, :func:`shifted_sums` for float64 data (chosen by the array type)."""


@overload(block_sums)
def _block_sums(x2, o0, o1, j0, shift, lanes, acc_s, acc_q):
    if x2.dtype in LANE_TYPES:

        def lanes_f32(x2, o0, o1, j0, shift, lanes, acc_s, acc_q):
            shifted_sums32(x2, o0, o1, j0, shift, lanes, acc_s, acc_q)

        return lanes_f32

    def lanes_f64(x2, o0, o1, j0, shift, lanes, acc_s, acc_q):
        shifted_sums(x2, o0, o1, j0, shift, acc_s, acc_q)

    return lanes_f64


@leaf
def again(x2, b0, b1, j0, inner, inv, acc_s, acc_q, shift, bmean, bm2):
    """The second sweep of a block of :func:`minor_rows` whose first one cancelled: shifted
    sums around ``bmean``, the first sweep's means, into ``bmean`` and ``bm2`` (with
    ``inner == 1`` they are ``acc_s`` and ``acc_q``, and ``shift`` keeps the means)."""
    repeat_inner(bmean, inner, shift)
    acc_s[:] = 0.0
    acc_q[:] = 0.0
    shifted_sums(x2, b0, b1, j0, shift, acc_s, acc_q)
    if inner > 1:
        sum_inner(acc_s, inner, bmean)
        sum_inner(acc_q, inner, bm2)
    for c in range(bmean.shape[0]):
        sd = bmean[c]
        s = sd * inv
        q = bm2[c]
        # A constant block's rounding must not leave a negative M2; inf and NaN stay.
        m = q if q == np.inf else q - s * sd
        bm2[c] = 0.0 if m < 0.0 else m
        bmean[c] = shift[c * inner] + s


@leaf
def head_shift(x2, r0, r1, j0, inner, centre):
    """``centre[c]``: the mean of the first value of channel ``c``'s columns (``j0 + c *
    inner``) over rows ``[r0, r1)``, rounded as :func:`lane_shift` rounds a shift.  Row by
    row, so the loop over channels vectorizes (channel by channel it read one value per row),
    with unit stride where ``inner == 1``: a stride LLVM cannot know kept it scalar."""
    nc = centre.shape[0]
    for c in range(nc):
        centre[c] = 0.0
    for r in range(r0, r1):
        xr = x2[r, j0:]
        if inner == 1:
            for c in range(nc):
                centre[c] += value(xr, c)
        else:
            for c in range(nc):
                centre[c] += value(xr, c * inner)
    f32 = lanes32(x2)
    for c in range(nc):
        centre[c] = lane_shift(centre[c] / (r1 - r0), f32)


@by_address(1, I64, I64, I64, I64, I64, VEC, VEC)
def minor_rows(x2, r0, r1, j0, nc, inner, mean, m2):
    """``(count, mean, M2)`` of the ``nc`` channels whose columns start at ``j0`` over rows
    ``[r0, r1)`` of the ``(outer, C * inner)`` array ``x2``, in blocks of ``rb`` rows; ``mean``
    and ``m2`` (length ``nc``) receive the statistics and the count is returned.

    One sweep per block sums ``d = x - shift`` and ``d ** 2`` per column (:func:`block_sums`:
    float64, or float32 lanes for float32 and float16 data), the shift of each channel being
    the previous block's mean (in the first block, the mean of the channel's first values);
    then ``mean = shift + sum(d) / n`` and ``M2 = sum(d ** 2) - sum(d) ** 2 / n``, exact to
    the sums' rounding while the shift is within a few standard deviations of the block's
    mean.  A block where it is not (see ``SHIFT_CANCEL``: a trend or an outlier), or where
    ``sum(d ** 2)`` overflowed (deviations beyond about 1e154), is swept again around the mean
    the first sweep found, which is within float64 rounding of the block's: ``sum(d)`` is then
    about zero and nothing cancels; overflowed squares give a finite mean and ``M2 = inf``,
    as the channel-strided kernels do.  Every channel of the tile has the same count, so the
    Chan merge of a block runs as one vectorized loop over channels."""
    width = nc * inner
    rb = max(MINOR_ROWS, BLOCK // max(width, 1))
    # One allocation (small calls pay for each); with inner == 1 the per-channel arrays are the
    # per-column ones, so no pass copies between them.  The float32 lanes' scratch (three
    # float32 values per column) is its tail.
    f32 = lanes32(x2)
    per_channel = 3 * width + (3 * nc if inner > 1 else 0)
    size = per_channel + ((3 * width + 1) // 2 if f32 else 0)
    # The sweep stores its per-column sums (float32 lanes: s32, at byte per_channel * 8 +
    # 4 * width; float64: acc_s, at 0) while it loads rows of x from r0 on.
    hot = per_channel * 8 + 4 * width if f32 else 0
    work = scratch_behind(size, x2, r0 if r1 > r0 else x2.shape[0], j0, hot, False)
    lanes = work[per_channel:].view(np.float32)
    acc_s = work[:width]
    acc_q = work[width : 2 * width]
    shift = work[2 * width : 3 * width]
    bmean, bm2, centre = acc_s, acc_q, shift
    if inner > 1:
        bmean = work[3 * width : 3 * width + nc]
        bm2 = work[3 * width + nc : 3 * width + 2 * nc]
        centre = work[3 * width + 2 * nc : per_channel]
    mean[:] = 0.0
    m2[:] = 0.0
    n = 0.0
    if r1 <= r0 or width == 0:  # no values (rows of zero width when inner == 0)
        return n
    # The first block's shift: each channel's mean over its first (up to) HEAD_ROWS rows, so
    # a lone outlier there moves it by a fraction only.
    head_shift(x2, r0, min(r1, r0 + HEAD_ROWS), j0, inner, centre)
    # float32 sums have float32's rounding: they may cancel a smaller factor (docs/math.rst).
    keep = 1.0 - 1.0 / (SHIFT_CANCEL_32 if f32 else SHIFT_CANCEL)
    b0 = r0
    while b0 < r1:
        b1 = min(r1, b0 + rb)
        bn = float((b1 - b0) * inner)
        if inner > 1:
            repeat_inner(centre, inner, shift)
        acc_s[:] = 0.0
        acc_q[:] = 0.0
        block_sums(x2, b0, b1, j0, shift, lanes, acc_s, acc_q)
        if f32 and out_of_range32(acc_s, acc_q, TINY_SQUARES * (b1 - b0)):
            acc_s[:] = 0.0
            acc_q[:] = 0.0
            shifted_sums(x2, b0, b1, j0, shift, acc_s, acc_q)
        if inner > 1:
            sum_inner(acc_s, inner, bmean)
            sum_inner(acc_q, inner, bm2)
        far = False
        inv = 1.0 / bn  # a division per channel cost more than the merge
        for c in range(nc):
            s = bmean[c] * inv
            t = s * bmean[c]
            # Overflowed squares would give M2 = inf - inf = NaN; the second sweep gives inf.
            far |= (t > keep * bm2[c]) | (bm2[c] == np.inf)
            bmean[c] = centre[c] + s
            bm2[c] -= t
        if far:
            again(x2, b0, b1, j0, inner, inv, acc_s, acc_q, shift, bmean, bm2)
        n = chan_merge_channels(n, mean, m2, bn, bmean, bm2)
        for c in range(nc):
            centre[c] = lane_shift(bmean[c], f32)
        b0 = b1
    return n


@stage
def minor_partial(rows_at, x2, num_channels, inner, nsplit, ct, ntiles, task, part):
    """Task ``task``, ``(split, tile)``, of :func:`partials_minor`: ``ct`` whole channels of
    ``x2`` over a row range (:func:`minor_rows`) into ``part[:, split]``."""
    split, r0, r1, c0, nc = minor_task(task, nsplit, ntiles, ct, x2.shape[0], num_channels)
    n = indirect(
        minor_rows,
        rows_at,
        (x2, r0, r1, c0 * inner, nc, inner, part[1, split, c0 : c0 + nc], part[2, split, c0 : c0 + nc]),
    )
    part[0, split, c0 : c0 + nc] = n


@stage
def partials_minor(rows_at, x2, num_channels, inner, nsplit, ct, ntiles, part):
    """Channel-minor partials of the ``(outer, C * inner)`` view ``x2`` (``C`` counted in
    pseudo-channels of super-rows): task ``(split, tile)`` reduces ``ct`` whole channels over
    a row range (:func:`minor_rows`)."""
    for t in prange(nsplit * ntiles):
        task = np.int64(t)  # int64, as in the serial twin (see partials_strided)
        minor_partial(rows_at, x2, num_channels, inner, nsplit, ct, ntiles, task, part)


@leaf
def merge_partials(part, k, stats):
    """Chan-merge the partials ``part`` (3, nsplit, k * C) into ``stats`` (3, C): split by
    split, the ``k`` pseudo-channels of each channel in a super-row in turn (an order fixed by
    the shape).  Every partial of a split has the same count, so each merge is one vectorized
    loop over channels."""
    num_channels = stats.shape[1]
    mean = stats[1]
    m2 = stats[2]
    for c in range(num_channels):
        mean[c] = 0.0
        m2[c] = 0.0
    n = 0.0
    for split in range(part.shape[1] if num_channels > 0 else 0):
        for m in range(k):
            j0 = m * num_channels
            n = chan_merge_channels(
                n,
                mean,
                m2,
                part[0, split, j0],
                part[1, split, j0 : j0 + num_channels],
                part[2, split, j0 : j0 + num_channels],
            )
    for c in range(num_channels):
        stats[0, c] = n


@stage
def stats_strided(rows_at, x3, stats):
    """Write ``stats[:, c] = (count, mean, M2)`` of every channel of the channel-strided
    ``x3`` (outer, C, inner)."""
    outer, num_channels, inner = x3.shape
    nsplit = plan(outer, num_channels, inner)[2]
    part = np.empty((3, nsplit, num_channels))
    partials_strided(rows_at, x3, nsplit, part)
    merge_partials(part, np.int64(1), stats)  # not a literal: one compile for both callers


@stage
def stats_minor(rows_at, x2, num_channels, inner, stats):
    """Write ``stats[:, c] = (count, mean, M2)`` of every channel of the channel-minor view
    ``x2`` (outer // k, k * C * inner) of ``C = num_channels`` channels."""
    k = super_rows(x2.shape[1], num_channels, inner)
    ct, ntiles, nsplit = plan(x2.shape[0], k * num_channels, inner)
    part = np.empty((3, nsplit, k * num_channels))
    partials_minor(rows_at, x2, k * num_channels, inner, nsplit, ct, ntiles, part)
    merge_partials(part, k, stats)


@twin
def welford_strided(rows_at, x3, stats):
    """Driver: per-channel ``(count, mean, M2)`` of the channel-strided ``x3`` into ``stats``
    (3, C) float64."""
    stats_strided(rows_at, x3, stats)


@twin
def welford_minor(rows_at, x2, inner, stats):
    """Driver: per-channel ``(count, mean, M2)`` of the channel-minor view ``x2`` (see
    :class:`numbabn.cpu._plan.Layout`) into ``stats`` (3, C) float64."""
    stats_minor(rows_at, x2, stats.shape[1], inner, stats)


#: The stages the host backend runs; the GPU twin (``cuda/stats.py``) has the same name.
DRIVERS = ("welford",)


def welford(parallel, lay, x, stats):
    """Per-channel ``(count, mean, M2)`` of ``x``, the kernels' view of a :class:`Layout`
    ``lay``, into ``stats`` (3, C) float64: the layout's driver."""
    if lay.strided:
        welford_strided(parallel, strided_rows.address(x), x, stats)
    else:
        welford_minor(parallel, minor_rows.address(x), x, lay.inner, stats)
