"""
Deploying a trained network: folding and the fused ReLU
=======================================================

The digits MLP of :doc:`plot_digits_mlp` (Linear -> BatchNorm -> ReLU blocks) is trained,
then run for inference three ways:

- **eval network**: the trained layers as they are, ``np.maximum(bn.eval()(x @ W), 0)``;
- **fused ReLU**: the same batch norm built with ``activation="relu"``, which writes
  ``relu(bn(h))`` in its one pass over ``h`` (no second pass for the ReLU);
- **folded**: :func:`numbabn.fold` merges each batch norm into the Linear layer before it,
  so inference is ``np.maximum(x @ W_fold + b_fold, 0)`` and the batch-norm layers are gone
  (NumPy still makes two passes after the product: the bias and the ReLU).

All three give the eval network's predictions; the logits agree to float32 rounding.  The
bar chart times one batch of inference each.
"""

import time

import matplotlib.pyplot as plt
import numpy as np
from mlp_model import MLP, QUICK, accuracy, fit, load_data

import numbabn

data = load_data()
x_train, x_test, y_train, y_test = data
model = MLP(hidden=(128, 128), bn_kwargs={})
fit(model, data, epochs=2 if QUICK else 15)
print(f"test accuracy of the trained network: {accuracy(model, x_test, y_test):.3f}")
model.eval()  # inference: batch norm with its running statistics

# %%
# Three inference functions
# -------------------------
# The fused layers take the trained batch norms' state (weights and running statistics).

fused_bns = []
for bn in model.bns:
    relu_bn = numbabn.BatchNorm(bn.num_features, activation="relu")
    relu_bn.load_state_dict(bn.state_dict())
    fused_bns.append(relu_bn.eval())

# The MLP's Linear layers compute x @ W with W of shape (in, out): output channels on axis 1.
folded = [numbabn.fold(bn, lin.w, lin.b, axis=1) for lin, bn in zip(model.linears, model.bns, strict=True)]


def eval_network(x):
    return model(x)


def fused_relu(x):
    for lin, bn in zip(model.linears, fused_bns, strict=True):
        x = bn(x @ lin.w)
    return model.head(x)


def folded_network(x):
    for w, b in folded:
        x = x @ w
        x += b  # in place: the bias and the ReLU each one pass over x
        np.maximum(x, 0, out=x)
    return model.head(x)


reference = eval_network(x_test)
for name, fn in (("fused ReLU", fused_relu), ("folded", folded_network)):
    logits = fn(x_test)
    same = np.array_equal(logits.argmax(axis=1), reference.argmax(axis=1))
    error = np.abs(logits - reference).max()
    print(f"{name:10}: max |logits - eval network's| = {error:.2e}, same predictions: {same}")
    assert same and error < 1e-4

# %%
# Time saved
# ----------
# One batch of 8192 images (the test set, tiled), the median of repeated calls.

batch = np.tile(x_test, (-(-8192 // len(x_test)), 1))[:8192]
fns = {"eval network": eval_network, "fused ReLU": fused_relu, "folded": folded_network}
times = {}
for name, fn in fns.items():
    fn(batch)  # compiled and warm
    runs = []
    for _ in range(5 if QUICK else 30):
        t = time.perf_counter()
        fn(batch)
        runs.append(time.perf_counter() - t)
    times[name] = 1e3 * float(np.median(runs))
    print(f"{name:12}: {times[name]:.2f} ms per batch")

fig, ax = plt.subplots(figsize=(6, 3))
ax.barh(list(times), list(times.values()), color=["tab:gray", "tab:blue", "tab:green"])
ax.invert_yaxis()
ax.set_xlabel("ms per batch of 8192 digits (median)")
ax.set_title("Inference of the trained digits MLP")
fig.tight_layout()
plt.show()
