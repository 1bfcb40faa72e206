"""
Data-parallel training with SyncBatchNorm
=========================================

The digits MLP of ``mlp_model.py`` (Linear, batch norm, ReLU, softmax cross-entropy, plain
SGD) trained data-parallel: each global batch of 32 images is split between ``R`` ranks,
each rank runs the network on its part, the Linear layers' gradients are summed across the
ranks, and every rank takes the same SGD step.  With :class:`numbabn.SyncBatchNorm` the
batch norm layers normalize with the statistics of the whole global batch, so the
data-parallel run follows single-process training step for step, whatever ``R``.  With
plain batch norm on each rank's part ("local statistics"), it does not: each rank
normalizes its 8 images with their own mean and variance.

The ranks here are threads of this one process (the documentation build runs a single
process), meeting in a small in-process communicator.  Across processes, the same
training function takes mpi4py's communicator and runs with ``mpiexec``::

    # train.py
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    history = train_rank(comm.rank, comm.size, comm, data, epochs)

    $ mpiexec -n 4 python train.py
"""

import pickle
import threading

import matplotlib.pyplot as plt
import numpy as np
from mlp_model import MLP, QUICK, accuracy, batches, cross_entropy, fit, integer_epochs, load_data

import numbabn


class ThreadComm:
    """``size`` ranks in one process: rank ``r``'s ``allgather(obj)`` returns every rank's
    object (a copy, as MPI delivers one) in rank order."""

    def __init__(self, size):
        self.size = size
        self._barrier = threading.Barrier(size, timeout=120)
        self._slots = [None] * size

    def rank(self, r):
        comm = self

        class Rank:
            rank, size = r, comm.size

            def allgather(self, obj):
                comm._slots[r] = pickle.dumps(obj)
                comm._barrier.wait()
                out = [pickle.loads(s) for s in comm._slots]
                comm._barrier.wait()
                return out

        return Rank()


def train_rank(rank, size, comm, data, epochs, sync=True, lr=0.1, batch_size=32):
    """Data-parallel SGD on rank ``rank`` of ``size``: the same model, batches and steps as
    ``mlp_model.fit`` (seed 0), each global batch split into ``size`` parts.  Returns the
    global batch's loss at each step and the test accuracy after each epoch."""
    x_train, x_test, y_train, y_test = data
    model = MLP(bn_kwargs={}, seed=0)
    model.bns = [numbabn.SyncBatchNorm.from_batchnorm(bn, comm if sync else None) for bn in model.bns]
    linears = [*model.linears, model.head]
    rng = np.random.default_rng(0)
    losses, test_acc = [], []
    for _ in range(epochs):
        for xb, yb in batches(x_train, y_train, batch_size, rng):
            part = np.array_split(np.arange(len(xb)), size)[rank]
            loss, grad = cross_entropy(model(xb[part]), yb[part])
            share = len(part) / len(xb)  # the local mean's weight in the global batch's mean
            model.backward(grad * np.float32(share))
            # Sum the gradients across ranks (in rank order: the same bits everywhere).
            # SyncBatchNorm's grad_weight and grad_bias already are the global batch's.
            grads = [(lin.grad_w, lin.grad_b) for lin in linears]
            if not sync:
                grads += [(bn.grad_weight, bn.grad_bias) for bn in model.bns]
            everyone = comm.allgather((loss * share, grads))
            for k, lin in enumerate(linears):
                lin.grad_w = sum(g[k][0] for _, g in everyone)
                lin.grad_b = None if lin.b is None else sum(g[k][1] for _, g in everyone)
            if not sync:
                for k, bn in enumerate(model.bns, start=len(linears)):
                    bn.grad_weight = sum(g[k][0] for _, g in everyone)
                    bn.grad_bias = sum(g[k][1] for _, g in everyone)
            model.sgd_step(lr)
            losses.append(sum(loss for loss, _ in everyone))
        test_acc.append(accuracy(model, x_test, y_test))
    return {"loss": losses, "test_acc": test_acc}


def data_parallel(size, data, epochs, sync=True):
    """Rank 0's history of a data-parallel run on ``size`` threads."""
    comm = ThreadComm(size)
    results = [None] * size

    def run(r):
        results[r] = train_rank(r, size, comm.rank(r), data, epochs, sync)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(res is not None for res in results), "a rank failed"
    return results[0]


data = load_data()
epochs = 3 if QUICK else 20
steps = []
single = fit(MLP(bn_kwargs={}, seed=0), data, epochs, lr=0.1, on_step=lambda model, loss: steps.append(loss))
single["step_loss"] = steps
runs = {
    "2 ranks, SyncBatchNorm": data_parallel(2, data, epochs),
    "4 ranks, SyncBatchNorm": data_parallel(4, data, epochs),
    "4 ranks, local statistics": data_parallel(4, data, epochs, sync=False),
}

# %%
# Step by step
# ------------
# The global batch's loss at each step.  The synchronized runs lie on the single-process
# curve; their distance to it (right) starts at float32 rounding, since the only differences
# are the order of the sums, and grows slowly as training amplifies those roundings (to about
# 1e-3 of a loss near zero after 20 epochs).  Local statistics follow a different trajectory
# from the first epoch.

fig, (ax_loss, ax_diff) = plt.subplots(1, 2, figsize=(11, 4))
step = np.arange(1, len(steps) + 1)
ax_loss.plot(step, steps, color="black", lw=3, alpha=0.3, label="1 process, BatchNorm")
for name, h in runs.items():
    ax_loss.plot(step, h["loss"], "--" if "local" in name else "-", lw=1, label=name)
    diff = np.abs(np.array(h["loss"]) - np.array(steps)) / np.array(steps)
    ax_diff.plot(step, np.maximum(diff, 1e-9), "--" if "local" in name else "-", lw=1, label=name)
ax_loss.set(xlabel="step", ylabel="training loss (global batch)", yscale="log", title="Training loss")
ax_diff.set(xlabel="step", ylabel="relative difference", yscale="log", title="Distance to 1-process training")
ax_loss.legend()
ax_diff.legend(loc="lower right")
fig.tight_layout()

print(f"{'1 process, BatchNorm':28s} final test accuracy {single['test_acc'][-1]:.3f}")
for name, h in runs.items():
    diff = np.max(np.abs(np.array(h["loss"]) - np.array(steps)) / np.array(steps))
    print(f"{name:28s} final test accuracy {h['test_acc'][-1]:.3f}, max relative loss difference {diff:.1e}")

# %%
# Test accuracy
# -------------
# Measured in eval mode after each epoch (batch norm with its running statistics, which the
# synchronized ranks share bit for bit).

fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(range(1, epochs + 1), single["test_acc"], color="black", lw=3, alpha=0.3, label="1 process, BatchNorm")
for name, h in runs.items():
    ax.plot(range(1, epochs + 1), h["test_acc"], "--" if "local" in name else "-", label=name)
ax.set(xlabel="epoch", ylabel="accuracy", title="Test accuracy (eval mode)")
ax.legend(loc="lower right")
integer_epochs(fig)
fig.tight_layout()

first_epoch = len(steps) // epochs
for name in ("2 ranks, SyncBatchNorm", "4 ranks, SyncBatchNorm"):
    assert np.allclose(runs[name]["loss"][:first_epoch], steps[:first_epoch], rtol=1e-5), name
    assert np.allclose(runs[name]["loss"], steps, rtol=1e-2), name
assert not np.allclose(runs["4 ranks, local statistics"]["loss"][:first_epoch], steps[:first_epoch], rtol=1e-2)

plt.show()
