"""
A NumPy MLP with and without batch norm
=======================================

A multilayer perceptron written in NumPy (``mlp_model.py`` beside this script: Linear,
:class:`numbabn.BatchNorm`, ReLU, softmax cross-entropy, plain SGD) learns the 8x8 digits that
ship with scikit-learn.  The same network, the same initialization and the same learning
rate train with and without batch norm; accuracies are measured in eval mode, where batch
norm uses its running statistics.
"""

import matplotlib.pyplot as plt
from mlp_model import MLP, QUICK, fit, integer_epochs, load_data

data = load_data()
epochs = 6 if QUICK else 40
runs = {}
for label, bn_kwargs in [("no batch norm", None), ("batch norm", {})]:
    for lr in (0.05, 0.5):
        runs[f"{label}, lr={lr}"] = fit(MLP(bn_kwargs=bn_kwargs), data, epochs, lr=lr)

# %%
# Loss and accuracy
# -----------------
# With batch norm the network trains faster at the same learning rate, and it tolerates a
# learning rate ten times larger, where the plain network learns more erratically.

fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
for name, h in runs.items():
    style = "-" if name.startswith("batch") else "--"
    (line,) = ax_loss.plot(range(1, epochs + 1), h["loss"], style, label=name)
    ax_acc.plot(range(1, epochs + 1), h["test_acc"], style, color=line.get_color(), label=f"{name} (test)")
ax_loss.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log", title="Training loss")
ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Test accuracy (eval mode)", ylim=(0.5, 1.0))
ax_loss.legend()
ax_acc.legend(loc="lower right")
integer_epochs(fig)
fig.tight_layout()

for name, h in runs.items():
    print(f"{name:28s} final test accuracy {h['test_acc'][-1]:.3f}")

plt.show()
