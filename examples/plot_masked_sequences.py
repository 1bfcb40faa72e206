"""
Masked statistics for padded sequences
======================================

Variable-length sequences are padded to a common length before they are batched.  Batch
norm over ``(N, C, L)`` then counts the padding in every channel's mean and variance: the
more padding, the more the statistics describe the zeros rather than the data.

``mask=`` keeps the padding out: the statistics and the running statistics count the real
time steps only, and every position (padding too) is normalized with them.  Here each
channel's values are drawn around a known mean and standard deviation, then padded with
zeros; the running statistics are compared with the truth as the share of padding grows.
"""

import matplotlib.pyplot as plt
import numpy as np

import numbabn

rng = np.random.default_rng(0)
N, C, L = 32, 16, 64
true_mean = rng.uniform(-3, 3, C).astype(np.float32)
true_std = rng.uniform(0.5, 2.0, C).astype(np.float32)


def batch(min_len):
    """A padded batch ``(N, C, L)`` with lengths from ``min_len`` to ``L``, and its mask."""
    lengths = rng.integers(min_len, L + 1, N)
    mask = np.arange(L)[None, None, :] < lengths[:, None, None]  # (N, 1, L)
    x = true_mean[None, :, None] + true_std[None, :, None] * rng.standard_normal((N, C, L)).astype(np.float32)
    return np.where(mask, x, 0.0).astype(np.float32), mask


min_lengths = [64, 48, 32, 16, 8, 2]
errors = {"padding counted": [], "mask=": []}
for min_len in min_lengths:
    plain, masked = numbabn.BatchNorm(C, momentum=None), numbabn.BatchNorm(C, momentum=None)
    for _ in range(20):  # momentum=None: the average over these batches
        x, mask = batch(min_len)
        plain(x)
        masked(x, mask=mask)
    errors["padding counted"].append(np.abs(plain.running_mean - true_mean).max())
    errors["mask="].append(np.abs(masked.running_mean - true_mean).max())

padding = [1 - (L + m) / 2 / L for m in min_lengths]  # the expected share of padding
fig, ax = plt.subplots(figsize=(7, 4))
for name, e in errors.items():
    ax.plot(padding, e, marker="o", label=name)
ax.set(xlabel="share of padding", ylabel="max |running_mean - true mean|", yscale="log")
ax.set_title("Running mean of padded sequences")
ax.legend()
fig.tight_layout()

# %%
# With the mask the running mean stays at the sampling error of the real values whatever
# the padding; counted in, the padding pulls every channel's mean towards zero in
# proportion to its share.  The backward pass (``bn.backward(g)``, the same mask) is the
# exact gradient: padded positions get gradient through the normalization only.
x, mask = batch(8)
bn = numbabn.BatchNorm(C)
y = bn(x, mask=mask)
kept = np.broadcast_to(mask, x.shape)
print(f"normalized real steps: mean {y[kept].mean():.2e}, std {y[kept].std():.4f}")
