"""SyncBatchNorm over torch.distributed (gloo, two processes on the loopback interface)
against PyTorch's batch norm of the global batch.

Each rank wraps ``torch.distributed.all_gather_object`` as numbabn's ``comm`` (or, with
mpi4py's buffer methods, ``all_gather_single``), trains a
SyncBatchNorm on its part of each global batch and compares its part of the outputs and
gradients, and the global ``grad_weight``, ``grad_bias`` and running statistics, with
``torch.nn.BatchNorm2d`` (autograd) on the whole batch.  ``torch.nn.SyncBatchNorm`` itself
computes the same thing but runs on GPU tensors only (CPU tensors raise "SyncBatchNorm
expected input tensor to be on GPU"), so the CPU reference is the global batch's batch norm.

This file is also the ranks' script: ``python test_sync_torch.py RANK WORLD PORT KIND``.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORLD = 2
STEPS = [(3, 5), (0, 4), (1, 2)]  # per-rank batch sizes: uneven, one part empty, one row


class TorchComm:
    """numbabn's ``comm`` over ``torch.distributed``: ``allgather`` is
    ``all_gather_object`` (pickled objects, every rank's in rank order)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.calls = 0

    def allgather(self, obj):
        self.calls += 1
        out = [None] * self.dist.get_world_size(self.group)
        self.dist.all_gather_object(out, obj, group=self.group)
        return out


class TorchBufferComm(TorchComm):
    """:class:`TorchComm` with mpi4py's buffer methods, as the data-parallel page shows it:
    SyncBatchNorm then exchanges float64 tensors, no pickled objects."""

    def __init__(self, group=None):
        super().__init__(group)
        self.buffer_calls = 0

    def Get_size(self):  # noqa: N802 - mpi4py's name
        return self.dist.get_world_size(self.group)

    def Allgather(self, sendbuf, recvbuf):  # noqa: N802 - mpi4py's name
        import torch

        self.buffer_calls += 1
        gather = getattr(self.dist, "all_gather_single", None) or self.dist.all_gather_into_tensor
        gather(torch.from_numpy(recvbuf).view(-1), torch.from_numpy(sendbuf).view(-1), group=self.group)


COMMS = {"objects": TorchComm, "buffers": TorchBufferComm}


def rank_main(rank, world, port, kind):
    import torch
    import torch.distributed as dist

    import numbabn

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rng = np.random.default_rng(0)  # the same global batches on every rank
    channels = 3
    comm = COMMS[kind]()
    ours = numbabn.SyncBatchNorm(channels, comm=comm)
    ref = torch.nn.BatchNorm2d(channels)
    w = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    b = rng.normal(size=channels).astype(np.float32)
    ours.weight[...], ours.bias[...] = w, b
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w))
        ref.bias.copy_(torch.from_numpy(b))
    bad = []
    for step, sizes in enumerate(STEPS):
        x = rng.normal(3.0, 2.0, (sum(sizes), channels, 4, 5)).astype(np.float32)
        g = rng.normal(size=x.shape).astype(np.float32)
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        y = ours(x[lo:hi])
        gi = ours.backward(g[lo:hi])
        xt = torch.from_numpy(x).requires_grad_()
        yt = ref(xt)
        yt.backward(torch.from_numpy(g))
        pairs = {
            "output": (y, yt.detach().numpy()[lo:hi]),
            "grad_input": (gi, xt.grad.numpy()[lo:hi]),
            "grad_weight": (ours.grad_weight, ref.weight.grad.numpy()),
            "grad_bias": (ours.grad_bias, ref.bias.grad.numpy()),
            "running_mean": (ours.running_mean, ref.running_mean.numpy()),
            "running_var": (ours.running_var, ref.running_var.numpy()),
        }
        for name, (a, e) in pairs.items():
            scale = max(1.0, float(np.abs(e).max())) if e.size else 1.0
            if a.shape != e.shape or not np.allclose(a, e, rtol=1e-5, atol=1e-5 * scale):
                bad.append(f"rank {rank} step {step}: {name} differs (max {np.abs(a - e).max() if a.size else 0})")
        ref.weight.grad = ref.bias.grad = None
    if ours.num_batches_tracked != int(ref.num_batches_tracked):
        bad.append(f"rank {rank}: num_batches_tracked {ours.num_batches_tracked} != {int(ref.num_batches_tracked)}")
    exchanges = 2 * len(STEPS)  # one per forward and per backward
    expected = (0, 2 * exchanges) if kind == "buffers" else (exchanges, None)  # buffers: header and payload
    if (comm.calls, getattr(comm, "buffer_calls", None)) != expected:
        bad.append(f"rank {rank}: {comm.calls} object and {getattr(comm, 'buffer_calls', None)} buffer exchanges")
    everyone = TorchComm().allgather(ours.running_var.tobytes())
    if any(v != everyone[0] for v in everyone):
        bad.append(f"rank {rank}: running_var differs between ranks")
    dist.destroy_process_group()
    print("\n".join(bad) or f"rank {rank}: ok", file=sys.stderr)
    return 1 if bad else 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", list(COMMS))
def test_sync_batchnorm_over_torch_distributed_gloo(kind):
    torch = pytest.importorskip("torch")
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("this PyTorch build has no torch.distributed with the gloo backend")
    import numbabn

    here = str(Path(numbabn.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=path)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only, whatever the host name resolves to
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), str(WORLD), port, kind], env=env, stderr=subprocess.PIPE, text=True
        )
        for r in range(WORLD)
    ]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errs)
    assert all(f"rank {r}: ok" in e for r, e in enumerate(errs))


if __name__ == "__main__":
    sys.exit(rank_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
