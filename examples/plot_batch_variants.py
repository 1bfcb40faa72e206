"""
Small batches: BatchNorm, Batch Renormalization and ghost batches
=================================================================

Batch norm normalizes a training batch with that batch's own statistics, and an eval batch
with the running statistics.  With a handful of samples per batch the two differ a lot: the
network learns on noisy, batch-dependent normalizations and is evaluated on another one.

The MLP of the first example (``mlp_model.py``) is trained on the digits with batches of
6 samples, three ways:

- :class:`numbabn.BatchNorm`;
- :class:`numbabn.BatchRenorm`, which corrects each training output towards the running
  statistics by per-channel factors ``r`` (clipped to ``[1/rmax, rmax]``) and ``d``
  (clipped to ``[-dmax, dmax]``), ramped up from plain batch norm (``rmax=1, dmax=0``) as in
  the paper;
- ghost batches: larger batches of 48 whose statistics come from ghost batches of 6
  (``virtual_batch_size=6``), one running-statistics update per step from the whole batch.
"""

import matplotlib.pyplot as plt
from mlp_model import MLP, QUICK, fit, integer_epochs, load_data

import numbabn

data = load_data()
epochs = 3 if QUICK else 25
steps_per_epoch = len(data[0]) // 6
ramp = max(1, 2 * steps_per_epoch)  # rmax and dmax reach their limits after two epochs


def renorm_ramp(model, loss, state={"step": 0}):  # noqa: B006 - the step count, kept across calls
    """After each step, raise rmax towards 3 and dmax towards 5 (Ioffe, 2017)."""
    state["step"] += 1
    t = min(state["step"] / ramp, 1.0)
    for bn in model.bns:
        bn.rmax, bn.dmax = 1.0 + 2.0 * t, 5.0 * t


runs = {
    "BatchNorm, batches of 6": fit(MLP(bn_kwargs={"momentum": 0.01}), data, epochs, lr=0.02, batch_size=6),
    "BatchRenorm, batches of 6": fit(
        MLP(bn_kwargs={"momentum": 0.01, "rmax": 1.0, "dmax": 0.0}, bn_class=numbabn.BatchRenorm),
        data,
        epochs,
        lr=0.02,
        batch_size=6,
        on_step=renorm_ramp,
    ),
    "ghost batches of 6 in batches of 48": fit(
        MLP(bn_kwargs={"momentum": 0.08, "virtual_batch_size": 6}), data, epochs, lr=0.16, batch_size=48
    ),
}

fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
for name, h in runs.items():
    ax_acc.plot(range(1, epochs + 1), h["test_acc"], label=name)
    ax_loss.plot(range(1, epochs + 1), h["loss"], label=name)
ax_acc.set(xlabel="epoch", ylabel="test accuracy (eval mode)", title="Eval accuracy")
ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="Training loss")
ax_acc.legend(loc="lower right")
integer_epochs(fig)
fig.tight_layout()

for name, h in runs.items():
    print(f"{name:38} final test accuracy {h['test_acc'][-1]:.3f}")

# %%
# The ghost-batch run takes 8 times fewer, 8 times larger steps (the learning rate scaled
# with the batch) and normalizes exactly as the 6-sample runs do, each ghost with its own
# statistics; its running statistics, updated once per 48 samples from all of them, are
# the least noisy of the three.  Batch Renormalization trains on outputs that already use
# (clipped) running statistics, so what it learns is what eval mode computes.
