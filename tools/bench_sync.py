"""SyncBatchNorm's cost over MPI: a training step (forward + backward) of SyncBatchNorm
against BatchNorm on the same local batch, and the latency of the two exchanges a step
makes (the forward's ``2 C + 1`` statistics, the backward's ``3 C`` sums; each a header
and a payload ``Allgather`` of float64 buffers, as SyncBatchNorm makes them over an mpi4py
communicator), beside the same payloads as pickled objects (``allgather``, what other
communicators send); "1 rank" is SyncBatchNorm with a communicator of one rank, its own
work without any waiting; "BatchNorm, exchanging" is BatchNorm's step with the same two
exchanges made inside it, what any collective step costs on the machine (each exchange
waits for the slower rank), without SyncBatchNorm's own work; "two-pass, exchanging" is
that step as any synchronized batch norm must make it, each exchange between a reduction
pass and an elementwise pass (statistics, exchange, normalize; gradient sums, exchange,
apply: ``numbabn.welford`` and the host stages of ``numbabn.cpu.api``, the kernels picked by
size and layout), so that no pass can revisit a channel's slice while it is cached, as
BatchNorm's fused passes do.

    NUMBA_NUM_THREADS=1 mpiexec -n 2 python tools/bench_sync.py

Every rank runs the same calls in lockstep (a SyncBatchNorm step is collective); timings
are medians over interleaved rounds (in shuffled order), each round a batch of back-to-back
calls between barriers, and rank 0 prints the slowest rank's median and, in parentheses,
best round.  A step's exchange should cost no more than the two exchanges:
``sync <= 1.2 x (batchnorm + exchanges)``.
"""

import argparse
import pickle
import random
import statistics
import time

import numpy as np
from mpi4py import MPI

import numbabn
from numbabn.cpu import api as host

COMM = MPI.COMM_WORLD

#: (name, local batch shape, feature axis)
SHAPES = [
    ("NC 256x256", (256, 256), 1),
    ("NCHW 16x64x16x16", (16, 64, 16, 16), 1),
    ("NHWC 16x16x16x64", (16, 16, 16, 64), -1),
    ("NCHW 32x64x32x32", (32, 64, 32, 32), 1),
]


class OneRank:
    """A communicator of this rank alone: SyncBatchNorm's own work, without waiting."""

    def allgather(self, obj):
        return [obj]


def timed(fn, calls):
    COMM.Barrier()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def bench(shape, axis, rounds, budget):
    channels = shape[axis]
    rng = np.random.default_rng(COMM.rank)
    x = rng.normal(3.0, 2.0, shape).astype(np.float32)
    g = rng.normal(size=shape).astype(np.float32)
    bn = numbabn.BatchNorm(channels, axis=axis)
    sync = numbabn.SyncBatchNorm(channels, axis=axis, comm=COMM)
    alone = numbabn.SyncBatchNorm(channels, axis=axis, comm=OneRank())
    stats = numbabn.welford(x, axis=axis).to_array()
    sums = np.zeros((3, channels))
    header, headers = np.zeros(4), np.zeros((COMM.size, 4))
    stats_parts, sums_parts = np.zeros((COMM.size, *stats.shape)), np.zeros((COMM.size, *sums.shape))

    def exchange(payload, parts):
        # what SyncBatchNorm's exchange over an mpi4py communicator makes: a 4-number header
        # from every rank, then the payloads, both as float64 buffers
        COMM.Allgather(header, headers)
        COMM.Allgather(payload, parts)

    def step(layer):
        layer(x)
        layer.backward(g)

    w, b = bn.weight, bn.bias
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    n = x.size // channels
    ax = axis % x.ndim  # the stages take a non-negative axis

    def two_pass():
        # the four passes of a synchronized step, the exchanges between them (the count and
        # the sums are this rank's: the data-independent cost is the same)
        s = numbabn.welford(x, axis=axis)
        exchange(stats, stats_parts)
        coef, save = host.finish(s.count, s.mean, s.m2, w, b, rm, rv, 0.1, 1e-5, x.dtype)
        host.apply(x, ax, coef)
        sums = host.grad_reduce(g, x, ax, save[0])
        exchange(sums, sums_parts)
        coef, _ = host.grad_coefs(sums, n, w, save[0], save[1], True, x.dtype)
        host.grad_apply(g, x, ax, coef)

    fns = {
        "batchnorm": lambda: step(bn),
        "sync": lambda: step(sync),
        "sync, 1 rank": lambda: step(alone),
        # BatchNorm's step with the two exchanges made in it: the cost of any collective step
        # here (the slower rank sets each exchange's pace), without SyncBatchNorm's own work
        "batchnorm, exchanging": lambda: (
            bn(x),
            exchange(stats, stats_parts),
            bn.backward(g),
            exchange(sums, sums_parts),
        ),
        "two-pass, exchanging": two_pass,
        "allgather fwd": lambda: exchange(stats, stats_parts),
        "allgather bwd": lambda: exchange(sums, sums_parts),
        # the same payloads as pickled objects (mpi4py's allgather), as other communicators send them
        "pickled fwd": lambda: COMM.allgather(("forward", channels, "<f4", stats)),
        "pickled bwd": lambda: COMM.allgather(("backward", channels, "<f4", sums)),
    }
    for fn in fns.values():  # compile, warm caches
        fn()
    calls = {}
    for name, fn in fns.items():  # calls per batch: about budget / rounds seconds, same on every rank
        one = timed(fn, 3)
        calls[name] = max(1, int(COMM.allreduce(budget / rounds / one, op=MPI.MIN)))
    times = {name: [] for name in fns}
    # In an order shuffled each round, the same on every rank (the steps are collective), so
    # what one batch leaves behind does not always fall on the same contender.
    order, shuffle = list(fns), random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            times[name].append(timed(fns[name], calls[name]))
    # The slowest rank's median and best round: on a busy machine a descheduled rank makes
    # the others wait inside each collective step, which the best round mostly escapes.
    return {
        name: (COMM.allreduce(statistics.median(t), op=MPI.MAX), COMM.allreduce(min(t), op=MPI.MAX))
        for name, t in times.items()
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--budget", type=float, default=1.5, help="seconds per contender and shape")
    parser.add_argument("--out", help="also write the results (a pickled dict) here (rank 0)")
    args = parser.parse_args()
    results = {}
    if COMM.rank == 0:
        print(f"{COMM.size} ranks, {MPI.Get_library_version().splitlines()[0]}, numbabn {numbabn.__version__}")
        header = (
            "local batch",
            "BatchNorm",
            "SyncBatchNorm, 1 rank",
            "SyncBatchNorm",
            "exchanges (fwd + bwd)",
            "pickled allgathers (fwd + bwd)",
            "sync / (bn + exchanges)",
            "BatchNorm, exchanging",
            "sync / bn exchanging",
            "two-pass, exchanging",
            "sync / two-pass exchanging",
        )
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
    for name, shape, axis in SHAPES:
        t = bench(shape, axis, args.rounds, args.budget)
        results[name] = t
        if COMM.rank == 0:
            cells = []
            for k in (0, 1):  # median, best
                exchange = t["allgather fwd"][k] + t["allgather bwd"][k]
                cells.append(
                    (
                        t["batchnorm"][k] * 1e6,
                        t["sync, 1 rank"][k] * 1e6,
                        t["sync"][k] * 1e6,
                        t["allgather fwd"][k] * 1e6,
                        t["allgather bwd"][k] * 1e6,
                        t["pickled fwd"][k] * 1e6,
                        t["pickled bwd"][k] * 1e6,
                        t["sync"][k] / (t["batchnorm"][k] + exchange),
                        t["batchnorm, exchanging"][k] * 1e6,
                        t["sync"][k] / t["batchnorm, exchanging"][k],
                        t["two-pass, exchanging"][k] * 1e6,
                        t["sync"][k] / t["two-pass, exchanging"][k],
                    )
                )
            (bm, om, sm, fm, gm, pf, pg, rm, em, qm, tm, um), (bb, ob, sb, fb, gb, pfb, pgb, rb, eb, qb, tb, ub) = cells
            print(
                f"| {name} | {bm:.0f} ({bb:.0f}) us | {om:.0f} ({ob:.0f}) us | {sm:.0f} ({sb:.0f}) us | "
                f"{fm:.0f} + {gm:.0f} ({fb:.0f} + {gb:.0f}) us | {pf:.0f} + {pg:.0f} ({pfb:.0f} + {pgb:.0f}) us | "
                f"{rm:.2f} ({rb:.2f}) | {em:.0f} ({eb:.0f}) us | {qm:.2f} ({qb:.2f}) | "
                f"{tm:.0f} ({tb:.0f}) us | {um:.2f} ({ub:.2f}) |",
                flush=True,
            )
    if COMM.rank == 0 and args.out:
        with open(args.out, "wb") as f:
            pickle.dump(results, f)


if __name__ == "__main__":
    main()
