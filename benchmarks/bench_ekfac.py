"""EKFAC capture: curvlib EKFAC vs curvlib KFAC vs curvlinops' EKFACLinearOperator.

The MLP (784-512-256-10, batch 256) and CNN (conv16-conv32-linear on 28x28, batch 64) of
``bench_kfac.py``, CrossEntropy, float32. Per fisher_type:

- ``curvlib KFAC``: forward + backward with the factors (``KFAC``);
- ``curvlib KFAC + eigh``: the same, then the eigenvectors of every factor (``kfac_eigenbasis``):
  what EKFAC adds beyond that is ``S``;
- ``curvlib EKFAC``: forward + backward with ``p.ekfac`` (factors, eigenvectors, ``S``: one backward);
- ``curvlinops EKFAC``: ``EKFACLinearOperator`` on the batch up to its corrected eigenvalues
  (two passes over the batch: factors, then the correction).

Interleaved repetitions, medians; peak RSS per method in a fresh process.

    python benchmarks/bench_ekfac.py [--reps 15] [--threads 2] [--fisher-types empirical mc type-2]
"""
from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

from bench_kfac import cnn, mlp
from common import backward_fn, model_copies, timing_report

warnings.filterwarnings("ignore")


def setup(make_model, x, y, fisher_types):
    import curvlib
    from curvlib.extensions import EKFAC, KFAC, kfac_eigenbasis

    copies = model_copies(make_model)
    (ours, ours_loss), (plain, plain_loss) = copies["curvlib"], copies["plain"]
    cl_model = make_model()
    cl_model.load_state_dict(ours.state_dict())
    params = list(cl_model.parameters())

    def kfac(ft):
        return backward_fn(ours, ours_loss, x, y, lambda: curvlib.curvature(KFAC(fisher_type=ft)))

    def kfac_eigh(ft):
        run = kfac(ft)

        def fn():
            run()
            for p in ours.parameters():
                kfac_eigenbasis(p.kfac)
        return fn

    def ekfac(ft):
        return backward_fn(ours, ours_loss, x, y, lambda: curvlib.curvature(EKFAC(fisher_type=ft)))

    def curvlinops_ekfac(ft):
        from curvlinops import EKFACLinearOperator

        def fn():
            E = EKFACLinearOperator(cl_model, nn.CrossEntropyLoss(), params, [(x, y)], fisher_type=ft,
                                    check_deterministic=False)
            E._maybe_compute_ekfac()
        return fn

    fns = {"plain fwd+bwd": backward_fn(plain, plain_loss, x, y)}
    for ft in fisher_types:
        fns[f"curvlib KFAC {ft}"] = kfac(ft)
        fns[f"curvlib KFAC + eigh {ft}"] = kfac_eigh(ft)
        fns[f"curvlib EKFAC {ft}"] = ekfac(ft)
        fns[f"curvlinops EKFAC {ft}"] = curvlinops_ekfac(ft)
    return fns


def report(name, fns, reps, fisher_types):
    med = timing_report(name, fns, reps)
    print()
    for ft in fisher_types:
        ek = med[f"curvlib EKFAC {ft}"]
        print(
            f"{ft:9s}: EKFAC / KFAC = {ek / med[f'curvlib KFAC {ft}']:.2f}, "
            f"EKFAC / (KFAC + eigh) = {ek / med[f'curvlib KFAC + eigh {ft}']:.2f}, "
            f"EKFAC / curvlinops EKFAC = {ek / med[f'curvlinops EKFAC {ft}']:.2f}"
        )
    return med


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fisher-types", nargs="+", default=["empirical", "mc", "type-2"])
    ap.add_argument("--no-cnn", dest="cnn", action="store_false")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    report("MLP 784-512-256-10, batch 256, float32", setup(mlp, x, y, args.fisher_types), args.reps, args.fisher_types)
    if args.cnn:
        x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
        report("CNN conv16-conv32-linear on 28x28, batch 64, float32", setup(cnn, x, y, args.fisher_types), args.reps, args.fisher_types)


if __name__ == "__main__":
    main()
