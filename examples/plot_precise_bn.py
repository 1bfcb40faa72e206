"""
Precise batch norm: exact population statistics for inference
==============================================================

In eval mode batch norm normalizes with ``running_mean`` and ``running_var``, an EMA of the
batch statistics seen during training.  Those mix statistics of networks whose weights have
since changed, and the noise of single batches.  "Precise BN" (Wu and Johnson, *Rethinking
"Batch" in BatchNorm*, 2021) replaces them after training by the statistics of the final
network over the whole training set.

:func:`numbabn.welford` gives each batch's exact ``Stats(count, mean, m2)`` in one pass and
:func:`numbabn.merge_stats` merges them exactly (Chan et al.), so a stream of batches gives
the population statistics without holding the data set or the activations in memory.
Layers are done in order: block ``k``'s inputs depend on the statistics block ``k - 1``
normalizes with at inference.
"""

import functools

import matplotlib.pyplot as plt
import numpy as np
from mlp_model import MLP, QUICK, accuracy, batches, fit, integer_epochs, load_data

import numbabn

data = load_data()
x_train, x_test, y_train, y_test = data
epochs = 5 if QUICK else 30


def precise_stats(model, x, batch_size=64):
    """Set every BatchNorm's running statistics to the exact statistics of its inputs over
    ``x``, streamed in batches, with the earlier blocks already using theirs."""
    model.eval()
    for depth, bn in enumerate(model.bns):
        parts = (
            numbabn.welford(model.features(xb, depth)) for xb, _ in batches(x, x, batch_size, np.random.default_rng(0))
        )
        stats = numbabn.merge_stats(*parts)
        bn.running_mean[...] = stats.mean
        bn.running_var[...] = stats.var(ddof=1)  # running_var holds the unbiased variance
    model.train()


# %%
# Streamed statistics are exact
# -----------------------------
# Merging the statistics of shuffled batches gives those of the whole array (to rounding).

model = MLP(bn_kwargs={})
fit(model, data, 1)
model.eval()
h = model.features(x_train, 0)
whole = numbabn.welford(h)
streamed = numbabn.merge_stats(*(numbabn.welford(part) for part in np.array_split(h, 17)))
print("count", whole.count, streamed.count)
print("max |mean difference| ", np.abs(whole.mean - streamed.mean).max())
print("max relative m2 difference", (np.abs(whole.m2 - streamed.m2) / whole.m2).max())

# %%
# EMA against precise statistics during training
# ----------------------------------------------
# After each epoch the same network is evaluated twice: with its EMA running statistics,
# and with precise statistics computed from the training set (then the EMA ones are put
# back, so training is not affected).  A small ``momentum`` (a long EMA window) lags most
# behind the changing weights; precise statistics do not depend on it.


def evaluate_precise(model, log):
    """Append to ``log`` the test accuracy with precise statistics and how far the EMA mean
    of the last block is from the precise one; then put the EMA statistics back."""
    saved = [(bn.running_mean.copy(), bn.running_var.copy()) for bn in model.bns]
    precise_stats(model, x_train)
    bn = model.bns[-1]
    gap = np.abs(saved[-1][0] - bn.running_mean).mean() / np.sqrt(bn.running_var).mean()
    log.append((accuracy(model, x_test, y_test), gap))
    for bn, (mean, var) in zip(model.bns, saved, strict=True):
        bn.running_mean[...] = mean
        bn.running_var[...] = var


momenta = (0.003, 0.1) if QUICK else (0.003, 0.01, 0.1)
results = {}
for momentum in momenta:
    log = []
    hist = fit(
        MLP(bn_kwargs={"momentum": momentum}), data, epochs, on_epoch=functools.partial(evaluate_precise, log=log)
    )
    precise_acc, gaps = zip(*log, strict=True)
    results[momentum] = (hist["test_acc"], precise_acc, gaps)

fig, (ax_acc, ax_gap) = plt.subplots(1, 2, figsize=(11, 4))
for momentum, (ema_acc, precise_acc, gaps) in results.items():
    (line,) = ax_acc.plot(range(1, epochs + 1), ema_acc, "--", label=f"EMA, momentum={momentum}")
    ax_acc.plot(
        range(1, epochs + 1), precise_acc, "-", color=line.get_color(), label=f"precise (trained with {momentum})"
    )
    ax_gap.plot(range(1, epochs + 1), gaps, color=line.get_color(), label=f"momentum={momentum}")
ax_acc.set(xlabel="epoch", ylabel="test accuracy (eval mode)", title="EMA (dashed) against precise (solid)")
ax_acc.legend(loc="lower right")
ax_gap.set(
    xlabel="epoch",
    ylabel="mean |EMA mean - precise mean| / mean std",
    yscale="log",
    title="How far the EMA mean is (last block)",
)
ax_gap.legend()
integer_epochs(fig)
fig.tight_layout()

for momentum, (ema_acc, precise_acc, _) in results.items():
    print(f"momentum={momentum}: final test accuracy EMA {ema_acc[-1]:.3f}, precise {precise_acc[-1]:.3f}")

plt.show()
