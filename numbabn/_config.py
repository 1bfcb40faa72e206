"""Tunables of the CPU kernels, in one place.

Every constant here changes speed only, never results' correctness; blocking constants do
change the rounding of statistics, which is why they depend on the shape alone (never on the
thread count): results are bitwise identical for any ``NUMBA_NUM_THREADS``.
"""

#: Elements per Welford block.  A block is summed, then re-read for its centred sum of
#: squares while it sits in L1/L2 (16 KB of float32), then Chan-merged into its task's partial.
BLOCK = 4096

#: Target elements per parallel task of a reduction.  Tasks are (row range, channel or
#: channel tile); fewer, larger tasks mean fewer partials to merge.
TASK_ELEMS = 1 << 16

#: Elements per parallel task of a channel-minor elementwise pass (whole rows, at least one):
#: each task calls the pass's leaf through its address once.
ROW_CHUNK = 1 << 14

#: Target elements per parallel task of a channel-minor reduction, whose tasks have a fixed
#: cost (a (3, C) float64 partial that a serial loop merges, the first block's shift): but an
#: array keeps up to ``MINOR_MIN_TASKS`` tasks of ``TASK_ELEMS``, so its cores stay busy.
MINOR_TASK_ELEMS = 1 << 17
MINOR_MIN_TASKS = 4

#: Most row ranges a channel's reduction is split into.  Bounds the partials, (3, splits, C)
#: float64, to a few KB per channel however large the array.
MAX_SPLITS = 64

#: Rows of at least this many contiguous elements per (outer, channel) use the
#: channel-strided kernels (NCHW); shorter rows use the channel-minor kernels, which sweep
#: whole (channel, inner) rows and vectorize across channels (NHWC, (N, C)).
MIN_INNER = 64

#: Channel-minor kernels reduce tiles of at most this many contiguous elements of a row,
#: so their per-task accumulators stay in L1 however many channels there are.
TILE = 2048

#: Channel-minor kernels treat ``k`` consecutive rows as one row of at most this many
#: elements (see ``cpu._plan.widen``), so short rows (few channels) still give long loops.
WIDEN_TO = 1024

#: Channel-minor blocks span at least this many rows, so the per-block work that is O(width)
#: (zeroing accumulators, folding, the Chan merge) stays small beside the two sweeps (few-row
#: blocks ran far below memory speed; docs/performance_notes.rst).
MINOR_ROWS = 64
#: A channel-minor task's scratch has this many float64 elements of slack, to place its hot
#: stores (the sweep's per-column sums) TRAIL bytes behind the rows it loads, modulo 4 KiB:
#: a store whose low 12 address bits a later load matches stalls that load (4K aliasing),
#: which the allocator's placement of the scratch decided otherwise.
SKEW_SLACK = 512
TRAIL = 256

#: Channel-minor blocks are summed in one sweep of ``d = x - shift`` (``shift`` a nearby mean)
#: and kept when ``M2 = sum(d ** 2) - sum(d) ** 2 / n`` cancels at most this factor of
#: ``sum(d ** 2)`` (4 bits); a block that cancels more is swept again around the mean the
#: first sweep found.  Changes which blocks take the second sweep, never the precision bound.
SHIFT_CANCEL = 16.0

#: The same for float32 and float16 data, whose blocks are summed in float32 lanes: a block
#: may cancel at most 2 bits of its float32 sums before its second sweep (docs/math.rst).
SHIFT_CANCEL_32 = 4.0

#: float32 lanes sum at most this many rows of a block before adding their sums to float64
#: ones, so a sum's rounding error stays at a few units of float32 roundoff (docs/math.rst).
LANE_ROWS = 64

#: A channel-minor reduction's first shift is each channel's mean over its first HEAD_ROWS
#: rows (later blocks shift by the previous block's mean).
HEAD_ROWS = 8

#: A float32 block whose sum of squares is below this (per row of the block) and not an
#: exact zero is summed again in float64: its squares may have lost bits to underflow.
TINY_SQUARES = 2.0**-100

#: Channel-strided passes take one whole channel per task, and revisit its slice while it is
#: in L2 (the cached case of docs/design.rst's byte model), when a channel's slice is at most
#: this many bytes and there are at least FUSE_CHANNELS channels to share among the cores.
#: The slice is ``x`` for the forward pass and ``g`` plus ``x`` for the backward pass.  Half
#: of a 2 MB L2: at the full 2 MB the slice and the output stream no longer fit together.
FUSE_BYTES = 1 << 20
FUSE_CHANNELS = 16

#: Channel-minor arrays with fewer elements run the serial twin of each kernel: below this a
#: parallel launch costs more than it saves.
PARALLEL_MIN = 1 << 17

#: The same for the channel-strided kernels (NCHW), whose tasks are whole channels or row
#: ranges of one, with no per-task buffers: they gain from two threads from half the size.
PARALLEL_MIN_STRIDED = 1 << 16

# -- CUDA kernels (numbabn.cuda) ---------------------------------------------------------------
# Read at launch time, so tests under the CUDA simulator can patch them small (tiny arrays
# then span many blocks).  They set the launch geometry, which fixes the reduction order:
# results depend on the shape and these values, never on the device or the run.

#: Threads per block (a power of two, at most ``cuda._plan.MAX_THREADS``).
CUDA_THREADS = 256

#: Elements of one channel (one column of a channel-minor array) a reduction block covers
#: before the reduction is split over another block: 64 per thread.  Small enough that a
#: channel of (32, 256, 56, 56) still spreads over 6 blocks (1,536 blocks in all on a 132-SM
#: H100), large enough that the per-block tree merge and partials stay a small cost.
CUDA_BLOCK_ELEMS = 1 << 14

#: Rows of at least this many contiguous elements per (outer, channel) use the
#: channel-strided kernels (threads along the row); shorter rows use the channel-minor ones
#: (threads along the channels, so a warp reads 32 consecutive values).
CUDA_MIN_INNER = 32

#: Threads of the block that merges one channel's partials (a power of two): the partials of
#: ``nsplit`` splits are taken ``CUDA_MERGE_THREADS`` at a time, then merged along a tree.
CUDA_MERGE_THREADS = 32

#: Training forwards and backwards of at most this many elements, each channel of which one
#: reduction block covers, run in one launch (the reduction, the per-channel step and the
#: elementwise pass in that block) instead of three: on such arrays the launches cost more host
#: and device time than the work.
CUDA_FUSE_ELEMS = 1 << 18
