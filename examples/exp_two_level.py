"""Experiment 2: two-level KFAC against KFAC, on the MLP autoencoder and on the demo CNN.

Two-level KFAC (Tselepidis, Kohler & Orvieto 2020; Koroko et al. 2023) adds to the KFAC direction
a coarse correction ``R0^T (R0 (F + λI) R0^T)^-1 R0 (g - (F + λI) d_KFAC)`` computed with the
exact whole-network curvature products of the minibatch (``GGNMP``), with one vector per layer
(``nicolaides``, ``residual``, ``spectral``, ``tpselepedis`` coarse spaces) or two
(``--krylov``: a Krylov vector per layer). Methods: ``kfac`` and ``2l-SPACE`` /
``2l-SPACE-krylov`` for each space. Koroko et al. 2023 found the gains ~nil at 1.2-2.7x the cost.

``--model autoencoder``: the network, data and (converted paper) hyper-parameters of
``exp_autoencoder.py``; ``--model cnn``: those of ``exp_cnn.py``. Both with T_cov = 1 (the coarse
correction needs the current minibatch's operator, so it is applied on curvature-update steps
only: T_cov = 1 applies it at every step) and T_inv = 10, KFAC included.

    python examples/exp_two_level.py --model cnn --out examples/results
    python examples/exp_two_level.py --model autoencoder --out examples/results
    python examples/exp_two_level.py --model cnn --methods kfac 2l-nicolaides --epochs 1 --out /tmp/2l

Writes ``two_level_MODEL.csv``, ``.png`` and ``.md`` into ``--out``.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _experiment as E  # noqa: E402
import exp_autoencoder as AE  # noqa: E402
import exp_cnn as CNN  # noqa: E402

from curvlib import extend  # noqa: E402
from curvlib.optim import NaturalGradient  # noqa: E402

SPACES = ("nicolaides", "residual", "spectral", "tpselepedis")
INTERVALS = dict(T_cov=1, T_inv=10)


def method_names() -> List[str]:
    return ["kfac"] + [f"2l-{s}{k}" for s in SPACES for k in ("", "-krylov")]


def base_hyper(model: str) -> Dict[str, object]:
    if model == "autoencoder":
        h = dict(AE.CURV, **AE.paper_hyper(0.01, 1e-4, 0.01))
    else:
        h = dict(CNN.CURV)
    h.update(INTERVALS)
    return h


def methods(model: str) -> Dict[str, E.Method]:
    hyper = base_hyper(model)
    out = {}
    for name in method_names():
        if name == "kfac":
            extra = dict(curvature="kfac")
        else:
            space = name[3:].replace("-krylov", "")
            extra = dict(curvature="two-level", coarse_space=space, krylov=name.endswith("-krylov"))
        h = dict(hyper, **extra)
        out[name] = E.Method(lambda m, h=h: NaturalGradient(m.parameters(), seed=0, **h),
                             hyper=f"lr {h['lr']:.3g}, damping {h['damping']:.3g}, T_cov 1, T_inv 10")
    return out


def parse_args(argv: Optional[List[str]] = None):
    p = E.parser(__doc__.splitlines()[0], method_names(), epochs=1, batch_size=0)
    p.add_argument("--model", choices=["autoencoder", "cnn"], default="cnn")
    args = p.parse_args(argv)
    if args.batch_size == 0:  # each model's own default
        args.batch_size = AE.BATCH if args.model == "autoencoder" else 128
    return args


def run(args) -> Dict[str, E.Run]:
    if args.model == "autoencoder":
        Xtr, _, Xte, _ = E.load_mnist(args.subset)
        loss_fn = extend(nn.BCEWithLogitsLoss())
        make = lambda: extend(AE.make_autoencoder())
        step_loss = lambda model, idx: loss_fn(model(Xtr[idx]), Xtr[idx].flatten(1))

        def evaluate(model):
            f = lambda X: float(nn.functional.binary_cross_entropy_with_logits(model(X), X.flatten(1)))
            return {"train_loss": f(Xtr), "test_metric": f(Xte)}

        metric, title = "test BCE", "Two-level KFAC vs KFAC, MLP autoencoder (exp_autoencoder.py's settings)"
    else:
        Xtr, ytr, Xte, yte = E.load_mnist(args.subset, normalize=True)
        make = lambda: extend(CNN.make_cnn())
        step_loss, evaluate = E.classification(Xtr, ytr, Xte, yte)

        metric, title = "test accuracy", "Two-level KFAC vs KFAC, demo CNN (exp_cnn.py's settings)"
    return E.run_experiment(f"two_level_{args.model}", title, args, methods(args.model), make, step_loss,
                            evaluate, len(Xtr), metric_name=metric)


def main(argv: Optional[List[str]] = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
