"""
BN hyperparameters: momentum, averaging period, eps, update threshold
=====================================================================

The MLP of the previous example (``mlp_model.py``), trained again while one hyperparameter
of its :class:`numbabn.BatchNorm` layers changes at a time:

- ``momentum``, the EMA rate of the running statistics (PyTorch's convention: the weight
  of the *new* batch; Keras and Flax call ``1 - momentum`` the momentum, numbabn's
  ``decay``),
- the averaging period: ``momentum=None`` (the cumulative average over every batch seen)
  against EMAs of a given window,
- ``eps``, added to the variance before the square root,
- and the dynamic update threshold ``mean(|gradients|)``, which
  :meth:`numbabn.BatchNorm.backward` records as ``update_threshold``.

Training itself does not depend on ``momentum`` (training mode normalizes with the batch's
statistics), so its effect shows in eval mode, where the running statistics normalize.
"""

import matplotlib.pyplot as plt
import numpy as np
from mlp_model import MLP, QUICK, fit, integer_epochs, load_data

data = load_data()
epochs = 4 if QUICK else 30
steps_per_epoch = len(data[0]) // 32


def curves(ax, runs, title, key="test_acc"):
    for name, h in runs.items():
        ax.plot(range(1, epochs + 1), h[key], label=name)
    ax.set(xlabel="epoch", ylabel="test accuracy (eval mode)", title=title)
    ax.legend(loc="lower right")


# %%
# The EMA rate and the averaging period
# -------------------------------------
# An EMA of rate ``m`` averages over about ``2 / m - 1`` batches (the window whose simple
# average has the same mean age).  A small ``m`` lags behind the weights as they change, so
# early in training the eval-mode network uses statistics of an older network; a large one
# follows the last few, noisy batches.  ``momentum=None`` weighs every batch since the start
# equally, so the statistics of the first networks never fade.  On this small model the
# statistics settle within the first epoch: the cumulative average does about as well as a
# short EMA, while the longest window lags behind for several epochs.

windows = (3, 40) if QUICK else (3, 40, 400)
ema_runs = {f"EMA, window {w} batches (momentum={2 / (w + 1):.3g})": {"momentum": 2 / (w + 1)} for w in windows}
ema_runs["cumulative average (momentum=None)"] = {"momentum": None}
ema_hist = {name: fit(MLP(bn_kwargs=kw), data, epochs) for name, kw in ema_runs.items()}

fig, ax = plt.subplots(figsize=(7, 4))
curves(ax, ema_hist, "Running statistics: EMA windows and the cumulative average")
integer_epochs(fig)
fig.tight_layout()

# %%
# ``eps``
# -------
# ``eps`` bounds ``1 / sqrt(var + eps)``.  For activations of variance around one, values
# up to about ``1e-3`` change nothing; once ``eps`` is comparable to the variance it stops
# normalizing low-variance channels, which shrinks their outputs.

eps_values = (1e-5, 1e-1, 1.0) if QUICK else (1e-5, 1e-3, 1e-1, 1.0, 10.0)
eps_hist = {f"eps={eps:g}": fit(MLP(bn_kwargs={"eps": eps}), data, epochs) for eps in eps_values}

fig, ax = plt.subplots(figsize=(7, 4))
curves(ax, eps_hist, "eps")
integer_epochs(fig)
fig.tight_layout()

# %%
# The dynamic update threshold
# ----------------------------
# After each :meth:`~numbabn.BatchNorm.backward`, ``bn.update_threshold`` holds the
# per-channel mean of ``|grad_output|`` over the batch, computed by the backward pass's
# own reduction (no extra pass over memory).  It tracks training: gradients shrink as the
# loss falls.

thresholds, losses = [], []


def record(model, loss):
    thresholds.append([bn.update_threshold.mean() for bn in model.bns])
    losses.append(loss)


fit(MLP(bn_kwargs={}), data, epochs, on_step=record)
thresholds = np.array(thresholds)
steps = np.arange(1, len(losses) + 1) / steps_per_epoch

fig, ax_loss = plt.subplots(figsize=(7, 4))
ax_loss.plot(steps, losses, color="0.6", lw=0.8, label="training loss (left)")
ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log")
ax_t = ax_loss.twinx()
for k in range(thresholds.shape[1]):
    ax_t.plot(steps, thresholds[:, k], label=f"update_threshold, block {k + 1} (right)")
ax_t.set(ylabel="mean |grad_output|, averaged over channels", yscale="log")
handles = ax_loss.get_legend_handles_labels()[0] + ax_t.get_legend_handles_labels()[0]
ax_t.legend(handles=handles, loc="upper right")
ax_loss.set_title("update_threshold over training")
integer_epochs(fig)
fig.tight_layout()

# %%
# Gating updates on the threshold
# -------------------------------
# ``|grad_bias| / n``, the magnitude of the *mean* gradient of a channel, never exceeds
# ``update_threshold``, the mean of its magnitudes; their ratio is near one when the batch
# agrees on the direction and near zero when its gradients cancel.  Here a channel (its
# ``weight``, ``bias`` and the Linear column feeding it) is updated only when
# ``|grad_bias| / n >= tau * update_threshold``: the larger ``tau``, the fewer updates.
# Gradients grow more coherent as training proceeds, so more updates pass later on;
# moderate thresholds skip a good share of the updates for about the same final accuracy,
# large ones slow the first epochs.


def gate(tau):
    def mask(bn, n):
        return np.abs(bn.grad_bias) / n >= tau * bn.update_threshold

    return mask


taus = (0.0, 0.1, 0.3) if QUICK else (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
gate_hist = {f"tau={tau:g}": fit(MLP(bn_kwargs={}), data, epochs, gate=gate(tau)) for tau in taus}

fig, (ax_acc, ax_up) = plt.subplots(1, 2, figsize=(11, 4))
curves(ax_acc, gate_hist, "Test accuracy with gated updates")
for name, h in gate_hist.items():
    per_epoch = np.reshape(h["updated"], (epochs, -1)).mean(axis=1)
    ax_up.plot(range(1, epochs + 1), per_epoch, label=name)
ax_up.set(
    xlabel="epoch", ylabel="fraction of channel updates let through", title="Updates (epoch means)", ylim=(0, 1.05)
)
ax_up.legend(loc="lower right")
integer_epochs(fig)
fig.tight_layout()

plt.show()
