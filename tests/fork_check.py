"""A parallel-sized numbabn call in a child process after one in its parent (run by
``test_fork.py`` in a fresh interpreter, so the threading layer is chosen as a user's is).

    python tests/fork_check.py METHOD [--threads] [--dataloader]

METHOD is a ``multiprocessing`` start method (fork, forkserver, spawn).  ``--threads`` forks
while two threads of the parent run numbabn calls; ``--dataloader`` makes the child calls in a
PyTorch ``DataLoader``'s worker processes.  Prints the threading layer, then exits 0 when
every child's results are bitwise the parent's, and says whether the children ran the serial
twins.
"""

import argparse
import multiprocessing
import sys
import threading

import numpy as np

import numbabn
from numbabn import _jit

SHAPE = (1024, 256)  # past PARALLEL_MIN: the parallel twins run


def batch(seed):
    return np.random.default_rng(seed).normal(2.0, 3.0, SHAPE).astype(np.float32)


def normalize(seed):
    """A training call and the statistics of one batch, as bytes to compare."""
    x = batch(seed)
    rm, rv = np.zeros(SHAPE[1], np.float32), np.ones(SHAPE[1], np.float32)
    y = numbabn.batch_norm(x, rm, rv, training=True)
    return y.tobytes() + rm.tobytes() + rv.tobytes() + numbabn.welford(x).to_array().tobytes()


def child(seed, queue):
    queue.put((normalize(seed), _jit._SERIAL_ONLY))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("method")
    p.add_argument("--threads", action="store_true")
    p.add_argument("--dataloader", action="store_true")
    args = p.parse_args()
    expected = {seed: normalize(seed) for seed in range(3)}  # the parent's parallel regions
    print("threading layer:", _jit.threading_layer(), flush=True)
    stop = threading.Event()
    workers = [threading.Thread(target=_loop, args=(stop,)) for _ in range(2 if args.threads else 0)]
    for w in workers:
        w.start()
    try:
        got = _dataloader(args.method) if args.dataloader else _processes(args.method)
    finally:
        stop.set()
        for w in workers:
            w.join()
    bad = [seed for seed, (value, _) in got.items() if value != expected[seed]]
    if bad:
        sys.exit(f"children's results differ from the parent's for seeds {bad}")
    print("children agree:", sorted(got), flush=True)
    print("children serial:", sorted({serial for _, serial in got.values()}), flush=True)


def _loop(stop):
    while not stop.is_set():
        normalize(0)


def _processes(method):
    ctx = multiprocessing.get_context(method)
    got = {}
    for seed in range(3):
        queue = ctx.Queue()
        proc = ctx.Process(target=child, args=(seed, queue))
        proc.start()
        got[seed] = queue.get(timeout=120)
        proc.join(timeout=60)
        if proc.exitcode != 0:
            sys.exit(f"child {seed} exited with {proc.exitcode}")
    return got


class _Batches:
    def __len__(self):
        return 3

    def __getitem__(self, seed):
        return normalize(seed), _jit._SERIAL_ONLY


def _dataloader(method):
    from torch.utils.data import DataLoader

    loader = DataLoader(_Batches(), batch_size=None, num_workers=2, multiprocessing_context=method)
    return {seed: (value, bool(serial)) for seed, (value, serial) in enumerate(loader)}


if __name__ == "__main__":
    main()
