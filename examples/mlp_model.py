"""A small NumPy multilayer perceptron with :class:`numbabn.BatchNorm` layers, shared by the
examples: the digits data, the layers, softmax cross-entropy, plain SGD and a training loop.

Not an example itself (sphinx-gallery runs ``plot_*.py`` only); ``NUMBABN_DOCS_QUICK=1``
(set in CI) shrinks every example to a few seconds.
"""

import os

import numpy as np
from matplotlib.ticker import MaxNLocator
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import numbabn

#: Small settings for CI: fewer epochs and runs.
QUICK = os.environ.get("NUMBABN_DOCS_QUICK") == "1"


def load_data(seed=0):
    """scikit-learn's bundled 8x8 digits (1797 images, no download), scaled to [0, 1] and
    split 75/25: ``(x_train, x_test, y_train, y_test)``, float32 inputs."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


class Linear:
    """``y = x @ w + b`` with He initialization; ``b`` is None when a batch norm follows
    (its ``bias`` takes that role)."""

    def __init__(self, fan_in, fan_out, rng, bias=True):
        self.w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        self.b = np.zeros(fan_out, np.float32) if bias else None

    def __call__(self, x):
        self.x = x
        y = x @ self.w
        return y if self.b is None else y + self.b

    def backward(self, g):
        self.grad_w = self.x.T @ g
        self.grad_b = None if self.b is None else g.sum(axis=0)
        return g @ self.w.T


class MLP:
    """``hidden`` blocks of Linear -> BatchNorm -> ReLU (no BatchNorm when ``bn_kwargs`` is
    None), then a Linear layer to the 10 classes.  ``bn_kwargs`` go to every
    :class:`numbabn.BatchNorm` (``momentum``, ``eps``, ...), or to ``bn_class`` instead
    (:class:`numbabn.BatchRenorm`)."""

    def __init__(self, hidden=(128, 128), bn_kwargs=None, seed=0, bn_class=numbabn.BatchNorm):
        rng = np.random.default_rng(seed)
        sizes = (64, *hidden)
        self.linears = [Linear(a, b, rng, bias=bn_kwargs is None) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        self.bns = [None if bn_kwargs is None else bn_class(b, **bn_kwargs) for b in hidden]
        self.head = Linear(sizes[-1], 10, rng)

    def train(self, mode=True):
        for bn in self.bns:
            if bn is not None:
                bn.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def features(self, x, depth):
        """The input of hidden block ``depth``'s batch norm (the pre-activations)."""
        for k in range(depth):
            x = self._block(k, x)
        return self.linears[depth](x)

    def _block(self, k, x):
        h = self.linears[k](x)
        if self.bns[k] is not None:
            h = self.bns[k](h)
        self._masks[k] = h > 0
        return np.maximum(h, 0)

    def __call__(self, x):
        self._masks = [None] * len(self.linears)
        for k in range(len(self.linears)):
            x = self._block(k, x)
        return self.head(x)

    def backward(self, grad_logits):
        g = self.head.backward(grad_logits)
        for k in reversed(range(len(self.linears))):
            g = g * self._masks[k]
            if self.bns[k] is not None:
                g = self.bns[k].backward(g)
            g = self.linears[k].backward(g)

    def sgd_step(self, lr, gate=None):
        """One SGD step.  ``gate(bn, n)``, when given, returns a per-channel boolean mask
        (``n``: the values per channel, here the batch size): only those channels of the
        block (the BatchNorm's ``weight`` and ``bias`` and the Linear columns feeding it) are
        updated.  Returns the fraction of channels updated."""
        updated = total = 0
        for linear, bn in zip(self.linears, self.bns, strict=True):
            mask = np.ones(linear.w.shape[1], bool) if gate is None or bn is None else gate(bn, len(linear.x))
            linear.w -= lr * linear.grad_w * mask
            if linear.b is not None:
                linear.b -= lr * linear.grad_b * mask
            if bn is not None:
                bn.weight -= lr * bn.grad_weight * mask
                bn.bias -= lr * bn.grad_bias * mask
            updated += int(mask.sum())
            total += mask.size
        self.head.w -= lr * self.head.grad_w
        self.head.b -= lr * self.head.grad_b
        return updated / total


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy and its gradient with respect to ``logits``."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = labels.shape[0]
    loss = -np.log(p[np.arange(n), labels] + 1e-12).mean()
    p[np.arange(n), labels] -= 1.0
    return float(loss), (p / n).astype(np.float32)


def accuracy(model, x, y, batch_size=256):
    """Eval-mode accuracy (batch norm with its running statistics), in batches as inference
    runs (small arrays take numbabn's serial kernels, which are not slowed down by other
    processes competing for the cores)."""
    model.eval()
    hits = sum(
        int((model(x[i : i + batch_size]).argmax(axis=1) == y[i : i + batch_size]).sum())
        for i in range(0, len(x), batch_size)
    )
    model.train()
    return hits / len(x)


def batches(x, y, batch_size, rng):
    """One epoch of shuffled mini-batches (the last, short one dropped)."""
    order = rng.permutation(len(x))
    for i in range(0, len(x) - batch_size + 1, batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]


def fit(model, data, epochs, lr=0.1, batch_size=32, seed=0, gate=None, on_step=None, on_epoch=None):
    """Train with SGD; returns per-epoch lists ``loss`` (training, mean over the epoch's
    steps), ``train_acc`` and ``test_acc`` (eval mode), and per-step ``updated`` (fraction of
    channels the ``gate`` let through).  ``on_step(model, loss)`` runs after each backward
    pass, ``on_epoch(model)`` after each epoch."""
    x_train, x_test, y_train, y_test = data
    rng = np.random.default_rng(seed)
    history = {"loss": [], "train_acc": [], "test_acc": [], "updated": []}
    for _ in range(epochs):
        model.train()
        losses = []
        for xb, yb in batches(x_train, y_train, batch_size, rng):
            loss, grad = cross_entropy(model(xb), yb)
            model.backward(grad)
            if on_step is not None:
                on_step(model, loss)
            history["updated"].append(model.sgd_step(lr, gate))
            losses.append(loss)
        history["loss"].append(float(np.mean(losses)))
        history["train_acc"].append(accuracy(model, x_train, y_train))
        history["test_acc"].append(accuracy(model, x_test, y_test))
        if on_epoch is not None:
            on_epoch(model)
    return history


def integer_epochs(fig):
    """Whole-number ticks on every x axis of ``fig`` (epochs)."""
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
