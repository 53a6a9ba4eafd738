"""Experiment 2: two-level KFAC against KFAC, on the MLP autoencoder and on the demo CNN
=====================================================================================

Two-level KFAC (Tselepidis, Kohler & Orvieto 2020; Koroko et al. 2023) adds to the KFAC direction
a coarse correction ``R0^T (R0 (F + λI) R0^T)^-1 R0 (g - (F + λI) d_KFAC)`` computed with the
exact whole-network curvature products of the minibatch (``GGNMP``), with one vector per layer
(``nicolaides``, ``residual``, ``spectral``, ``tpselepedis`` coarse spaces) or two
(``-krylov``: a second, Krylov vector ``P_l z_l`` per layer). Methods: ``kfac`` and ``2l-SPACE`` /
``2l-SPACE-krylov`` for each space, with the paper's additive correction
``d_KFAC + R0^T (R0 (F + λI) R0^T)^-1 R0 g``; ``2l-SPACE[-krylov]-mult`` (not run by default)
use the multiplicative form ``... R0 (g - (F + λI) d_KFAC)``. Koroko et al. 2023 found the gains
~nil at 1.2-2.7x the cost. ``--lr`` replaces the learning rate of every method (for a grid; for
the autoencoder it is the paper's lr, converted like the paper's defaults).

``--model autoencoder``: the network, data and (converted paper) hyper-parameters of
``exp_autoencoder.py``; ``--model cnn``: those of ``exp_cnn.py``. Both with T_cov = 1 (the coarse
correction needs the current minibatch's operator, so it is applied on curvature-update steps
only: T_cov = 1 applies it at every step) and T_inv = 10, KFAC included.

Run from the repository root::

    python -m examples.exp_two_level --model cnn --out examples/results
    python -m examples.exp_two_level --model autoencoder --out examples/results
    python -m examples.exp_two_level --model cnn --methods kfac 2l-nicolaides --epochs 1 --out /tmp/2l

Writes ``two_level_MODEL.csv``, ``.png`` and ``.md`` into ``--out`` (``--name`` to change).
"""
# sphinx_gallery_thumbnail_path = "../examples/results/two_level_cnn.png"
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from curvlib import extend
from examples import _experiment as E
from examples import exp_autoencoder as AE
from examples import exp_cnn as CNN
from examples.data import load_mnist

SPACES = ("nicolaides", "residual", "spectral", "tpselepedis")
# with the settings of the README's table (before curvlib's defaults changed): no curvature warm-up,
# no KL clip unless the experiment gives one
INTERVALS = dict(T_cov=1, T_inv=10, curvature_warmup=0)


def method_names(mult: bool = True) -> List[str]:
    """``kfac``, the additive variants and (``mult``) the multiplicative ones."""
    add = [f"2l-{s}{k}" for s in SPACES for k in ("", "-krylov")]
    return ["kfac"] + add + ([f"{m}-mult" for m in add] if mult else [])


def base_hyper(model: str, lr: Optional[float] = None) -> Dict[str, object]:
    """The model's curvature settings; ``lr`` replaces the learning rate (for the autoencoder:
    the paper's lr, converted with the paper's damping and clip as ``exp_autoencoder.py`` does)."""
    if model == "autoencoder":
        h = dict(AE.CURV, **AE.paper_hyper(0.01 if lr is None else lr, 1e-4, 0.01))
    else:
        h = dict(CNN.CURV)
        if lr is not None:
            h["lr"] = lr
    h.update(INTERVALS)
    return h


def methods(model: str, lr: Optional[float] = None) -> Dict[str, E.Method]:
    hyper = base_hyper(model, lr)
    out = {}
    for name in method_names():
        if name == "kfac":
            extra = dict(curvature="kfac")
        else:
            space = name[3:].replace("-mult", "").replace("-krylov", "")
            extra = dict(curvature="two-level", coarse_space=space, krylov="-krylov" in name,
                         coarse_form="multiplicative" if name.endswith("-mult") else "additive")
        h = dict(hyper, **extra)
        clip = f", kl_clip {h['kl_clip']:.3g}" if h.get("kl_clip") else ""
        out[name] = E.natural_gradient(h, f"lr {h['lr']:.3g}, damping {h['damping']:.3g}{clip}, T_cov 1, T_inv 10")
    return out


def parse_args(argv: Optional[List[str]] = None):
    p = E.parser(__doc__.splitlines()[0], method_names(), epochs=1, batch_size=0)
    p.set_defaults(methods=method_names(mult=False))
    p.add_argument("--model", choices=["autoencoder", "cnn"], default="cnn")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of every method (autoencoder: the paper's lr, converted)")
    p.add_argument("--name", default=None, help="output name (default two_level_MODEL)")
    args = p.parse_args(argv)
    if args.batch_size == 0:  # each model's own default
        args.batch_size = AE.BATCH if args.model == "autoencoder" else 128
    return args


def run(args) -> Dict[str, E.Run]:
    if args.model == "autoencoder":
        Xtr, _, Xte, _ = load_mnist(args.subset)
        loss_fn = extend(nn.BCEWithLogitsLoss())
        make = lambda: extend(AE.make_autoencoder())
        step_loss = lambda model, idx: loss_fn(model(Xtr[idx]), Xtr[idx].flatten(1))

        def evaluate(model):
            f = lambda X: float(nn.functional.binary_cross_entropy_with_logits(model(X), X.flatten(1)))
            return {"train_loss": f(Xtr), "test_metric": f(Xte)}

        metric, title = "test BCE", "Two-level KFAC vs KFAC, MLP autoencoder (exp_autoencoder.py's settings)"
    else:
        Xtr, ytr, Xte, yte = load_mnist(args.subset, normalize=True)
        make = lambda: extend(CNN.make_cnn())
        step_loss, evaluate = E.classification(Xtr, ytr, Xte, yte)

        metric, title = "test accuracy", "Two-level KFAC vs KFAC, demo CNN (exp_cnn.py's settings)"
    name = args.name or f"two_level_{args.model}"
    return E.run_experiment(name, title, args, methods(args.model, args.lr), make, step_loss,
                            evaluate, len(Xtr), metric_name=metric)


def main(argv: Optional[List[str]] = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
