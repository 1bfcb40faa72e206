"""SyncBatchNorm across real processes: run with ``mpiexec -n P python mpi_sync_check.py``
(tests/test_sync_mpi.py does, for P = 2 and 3).

Every rank draws the same global batches from a shared seed, trains a SyncBatchNorm (and a
SyncBatchRenorm, with and without masks) on its own part (uneven parts, one rank's part empty) and a plain BatchNorm
(BatchRenorm) on the whole batch,
and compares its part of the outputs and gradients, the global gradients and the running
statistics; the ranks then compare their running statistics and global gradients bit for
bit.  The errors (a global batch of one value, ranks disagreeing on channels, dtype, axis or,
with ``momentum=None``, ``num_batches_tracked``, a bad input or grad_output on one rank)
must be the same on every rank.  ``MPI.COMM_WORLD``
has mpi4py's buffer methods, so this runs SyncBatchNorm's buffer exchange.
Exits 1 (every rank) on any mismatch, printing what differed.
"""

import sys

import numpy as np
from mpi4py import MPI

from numbabn import BatchNorm, BatchRenorm, SyncBatchNorm, SyncBatchRenorm

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
TOL = {np.dtype(np.float32): 4e-5, np.dtype(np.float64): 4e-12}

# (shape of the global batch with a placeholder batch size, feature axis, batch axis)
LAYOUTS = [((None, 5), 1, 0), ((None, 3, 4, 5), 1, 0), ((None, 4, 3, 6), -1, 0)]

#: What every rank must hold bit for bit: the global gradients and the running statistics.
SHARED = ("grad_weight", "grad_bias", "update_threshold", "running_mean", "running_var")

failures = []


def check(ok, what):
    if not ok:
        failures.append(f"rank {RANK}: {what}")


def close(actual, desired, dtype, what):
    desired = np.asarray(desired, dtype=np.float64)
    scale = max(1.0, float(np.abs(desired).max())) if desired.size else 1.0
    tol = TOL[np.dtype(dtype)]
    err = np.abs(np.asarray(actual, dtype=np.float64) - desired)
    check(actual.shape == desired.shape and bool(np.all(err <= tol * (scale + np.abs(desired)))), what)


def part_sizes(step):
    """Uneven parts of each step's global batch: rank 0's part empty in step 1, a part of
    one row in step 2."""
    if step == 0:
        return [r + 2 for r in range(SIZE)]
    if step == 1:
        return [0] + [3 * r + 1 for r in range(1, SIZE)]
    return [1] + [2] * (SIZE - 1)


def run_case(shape, axis, batch_axis, dtype, momentum, seed, renorm=False, masked=False):
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    if renorm:  # r and d from the global batch's statistics: the same on every rank
        kw = dict(axis=axis, dtype=dtype, momentum=momentum, rmax=1.2, dmax=0.3)
        sync, ref = SyncBatchRenorm(channels, comm=COMM, **kw), BatchRenorm(channels, **kw)
    else:
        sync = SyncBatchNorm(channels, axis=axis, dtype=dtype, momentum=momentum, comm=COMM)
        ref = BatchNorm(channels, axis=axis, dtype=dtype, momentum=momentum)
    w = rng.uniform(0.5, 1.5, channels).astype(dtype)
    b = rng.normal(size=channels).astype(dtype)
    for layer in (sync, ref):
        layer.weight[...], layer.bias[...] = w, b
        layer.running_mean[...] = 2.0  # away from the batches' means: r and d != 1 and 0
    name = f"shape {shape} axis {axis} {np.dtype(dtype).name} momentum {momentum}" + (" renorm" * renorm)
    name += " masked" * masked
    for step in range(3):
        sizes = part_sizes(step)
        full = list(shape)
        full[batch_axis] = sum(sizes)
        x = rng.normal(3.0, 2.0, full).astype(dtype)
        g = rng.normal(size=full).astype(dtype)
        lo, hi = sum(sizes[:RANK]), sum(sizes[: RANK + 1])
        mine = [slice(None)] * len(full)
        mine[batch_axis] = slice(lo, hi)
        mine = tuple(mine)
        if masked:  # the global batch's statistics count the values every rank's mask keeps
            mshape = list(full)
            mshape[axis] = 1
            mask = rng.random(mshape) < 0.6
            y, y_ref = sync(x[mine], mask=mask[mine]), ref(x, mask=mask)
        else:
            y, y_ref = sync(x[mine]), ref(x)
        gi = sync.backward(g[mine])
        gi_ref = ref.backward(g)
        what = f"{name} step {step}"
        close(y, y_ref[mine], dtype, f"{what}: output")
        close(gi, gi_ref[mine], dtype, f"{what}: grad_input")
        for attr in SHARED:
            close(getattr(sync, attr), getattr(ref, attr), dtype, f"{what}: {attr}")
        check(sync.num_batches_tracked == ref.num_batches_tracked, f"{what}: num_batches_tracked")
        if renorm:
            close(sync.r, ref.r, np.float64, f"{what}: r")
            close(sync.d, ref.d, np.float64, f"{what}: d")
            check(bool(np.any(ref.d != 0)), f"{what}: d is 0, the case checks nothing")
        mine_bits = b"".join(getattr(sync, a).tobytes() for a in SHARED + (("r", "d") if renorm else ()))
        everyone = COMM.allgather(mine_bits)
        check(all(bits == everyone[0] for bits in everyone), f"{what}: state differs between ranks")


def same_error_everywhere(make_call, kind, fragment, what):
    try:
        make_call()
        message = None
    except Exception as e:  # noqa: BLE001 - compared below
        message = f"{type(e).__name__}: {e}"
    messages = COMM.allgather(message)
    check(message is not None and message.startswith(kind) and fragment in message, f"{what}: got {message!r}")
    check(all(m == messages[0] for m in messages), f"{what}: ranks raised different errors {messages}")


def run_errors():
    layer = SyncBatchNorm(4, comm=COMM)
    before = layer.state_dict()
    one = np.ones((1 if RANK == 0 else 0, 4), np.float32)
    same_error_everywhere(lambda: layer(one), "ValueError", "more than 1 value per channel", "global batch of one")
    after = layer.state_dict()
    check(all(np.array_equal(before[k], after[k]) for k in before), "global batch of one: state changed")
    odd = SyncBatchNorm(3 + (RANK == SIZE - 1), comm=COMM)
    x = np.ones((2, odd.num_features), np.float32)
    same_error_everywhere(lambda: odd(x), "ValueError", "num_features", "disagreeing channels")
    check(odd.num_batches_tracked == 0, "disagreeing channels: state changed")
    odd_dtype = SyncBatchNorm(4, dtype=np.float64 if RANK == SIZE - 1 else np.float32, comm=COMM)
    x = np.ones((2, 4), odd_dtype.dtype)
    same_error_everywhere(lambda: odd_dtype(x), "TypeError", "dtypes", "disagreeing dtypes")
    # The last rank's layer normalizes along another axis of inputs with as many channels.
    odd_axis = SyncBatchNorm(3, axis=-1 if RANK == SIZE - 1 else 1, comm=COMM)
    x = np.arange(2 * 3 * 4 * 3, dtype=np.float32).reshape(2, 3, 4, 3)
    same_error_everywhere(lambda: odd_axis(x), "ValueError", "axis", "disagreeing axes")
    check(odd_axis.num_batches_tracked == 0 and not odd_axis.running_mean.any(), "disagreeing axes: state changed")
    # With momentum=None the running statistics weigh each batch by its count: counts must agree.
    cumulative = SyncBatchNorm(4, momentum=None, comm=COMM)
    x = np.arange(8, dtype=np.float32).reshape(2, 4) + RANK
    cumulative(x)
    cumulative.num_batches_tracked += RANK == SIZE - 1
    before = cumulative.state_dict()
    same_error_everywhere(lambda: cumulative(x), "ValueError", "num_batches_tracked", "disagreeing counts")
    after = cumulative.state_dict()
    check(all(np.array_equal(before[k], after[k]) for k in before), "disagreeing counts: state changed")
    cumulative.num_batches_tracked = 1
    cumulative(x)
    everyone = COMM.allgather(cumulative.running_var.tobytes())
    check(all(bits == everyone[0] for bits in everyone), "cumulative counts agreeing again: state differs")
    bad = np.ones((2, 5 if RANK == 0 else 4), np.float32)
    same_error_everywhere(lambda: layer(bad), "ValueError", "forward failed on rank 0", "a bad input on rank 0")
    layer(np.arange(8, dtype=np.float32).reshape(2, 4) + RANK)
    grad = np.ones((1 if RANK == SIZE - 1 else 2, 4), np.float32)
    same_error_everywhere(lambda: layer.backward(grad), "ValueError", "backward failed on rank", "a bad grad_output")
    check(layer.grad_weight is None, "a bad grad_output: grad_weight set")
    # Still in step afterwards.
    y = layer(np.arange(8, dtype=np.float32).reshape(2, 4) + RANK)
    check(y.shape == (2, 4) and layer.num_batches_tracked == 2, "a step after the errors")


def main():
    seed = 0
    for shape, axis, batch_axis in LAYOUTS:
        for dtype in (np.float32, np.float64):
            for momentum in (0.1, None):
                run_case(shape, axis, batch_axis, dtype, momentum, seed)
                seed += 1
    for shape, axis, batch_axis in LAYOUTS:
        run_case(shape, axis, batch_axis, np.float64, 0.1, seed, renorm=True)
        run_case(shape, axis, batch_axis, np.float64, None, seed + 1, masked=True)
        run_case(shape, axis, batch_axis, np.float32, 0.1, seed + 2, renorm=True, masked=True)
        seed += 3
    run_errors()
    everyone = COMM.allgather(failures)
    if RANK == 0:
        for lines in everyone:
            for line in lines:
                print(line, file=sys.stderr)
        print(f"{SIZE} ranks: {sum(map(len, everyone))} mismatches", file=sys.stderr)
    return 1 if any(everyone) else 0


if __name__ == "__main__":
    sys.exit(main())
