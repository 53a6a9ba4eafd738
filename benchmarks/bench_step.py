"""KFAC's step, broken down: what a step without a curvature update costs beyond SGD's (issue 22 item 5).

MLP 784-512-256-10 (ReLU), batch 256, float32, 1 thread, CrossEntropy (``bench_optim.py``'s
problem). One process, interleaved repetitions, medians of process CPU time by default (the
machine may be shared; ``--wall`` for wall time). Rows:

- ``sgd step``: zero_grad, forward, backward, ``torch.optim.SGD(momentum=0.9).step()``;
- ``apply``: the preconditioner alone, ``G^-1 V A^-1`` (``V^T G^-1`` for a bias) for every
  parameter with the same damped factor inverses, as plain matmuls: the FLOPs a Kronecker
  preconditioner cannot avoid;
- ``kfac plain step``: ``NaturalGradient(curvature="kfac", momentum=0.9)``, a step without a
  curvature or inverse update (zero_grad, forward, backward in ``opt.capture()``, ``opt.step()``),
  and its parts: ``fwd+bwd`` (the extended model, no capture) and ``opt.step()`` alone;
- ``kfac capture step``: a step with a capture but no inverse; ``inverse``: rebuilding the
  damped inverses from the running curvature; the mean step of 20 at the default schedule
  (``T_cov=5, T_inv=20``, after the curvature warm-up).

The target: ``kfac plain step / (sgd step + apply) <= 1.1``.

    python benchmarks/bench_step.py [--reps 15] [--wall]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.common import interleaved_medians  # noqa: E402
from curvlib import extend  # noqa: E402
from curvlib.optim import NaturalGradient  # noqa: E402

B = 256
NEVER = 10**9


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


def stepper(model, loss_fn, opt, X, Y):
    """One training step of ``opt`` on ``(X, Y)``: zero_grad, forward, backward in ``opt.capture()``, step."""

    def step():
        opt.zero_grad()
        loss = loss_fn(model(X), Y)
        with opt.capture():
            loss.backward()
        opt.step()

    return step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--wall", action="store_true", help="wall time instead of process CPU time")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    X, Y = torch.randn(B, 784), torch.randint(0, 10, (B,))

    sgd_model = make_model()
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=1e-3, momentum=0.9)

    def sgd_step():
        sgd.zero_grad()
        F.cross_entropy(sgd_model(X), Y).backward()
        sgd.step()

    model, loss_fn = extend(make_model()), extend(nn.CrossEntropyLoss())
    # T_cov = T_inv = never after one capture: every timed step is a plain one
    opt = NaturalGradient(model.parameters(), lr=1e-3, momentum=0.9, T_cov=NEVER, T_inv=NEVER, curvature_warmup=0,
                          seed=0)

    kfac_step = stepper(model, loss_fn, opt, X, Y)

    kfac_step()  # the capture and the inverse
    parts = opt.core.solves[0][1].parts
    params = list(model.parameters())
    grads = [p.grad.detach().clone() for p in params]

    def apply():
        for P, g in zip(parts, grads):
            if getattr(P, "_Ainv", None) is not None:
                P._Ginv @ g @ P._Ainv
            else:
                P(g)

    def fwd_bwd():
        model.zero_grad()
        loss_fn(model(X), Y).backward()

    def step_only():
        opt.step()

    cap_model = extend(make_model())
    cap_opt = NaturalGradient(cap_model.parameters(), lr=1e-3, momentum=0.9, T_cov=1, T_inv=NEVER, curvature_warmup=0,
                              seed=0)

    capture_step = stepper(cap_model, loss_fn, cap_opt, X, Y)

    capture_step()

    def inverse():
        opt.core.solves.clear()  # rebuilt from state["inverse_of"] at the next step
        opt.step()

    def_model = extend(make_model())
    def_opt = NaturalGradient(def_model.parameters(), lr=1e-3, momentum=0.9, seed=0)  # T_cov 5, T_inv 20

    def_step = stepper(def_model, loss_fn, def_opt, X, Y)

    def default_steps():  # one T_inv period of the default schedule, per step
        for _ in range(20):
            def_step()

    for _ in range(10):  # past the curvature warm-up
        def_step()

    fwd_bwd()
    clock = time.perf_counter if args.wall else time.process_time
    t = interleaved_medians(dict(sgd=sgd_step, apply=apply, kfac=kfac_step, fwd_bwd=fwd_bwd, step_only=step_only,
                                 capture=capture_step, inverse=inverse, default=default_steps), reps=args.reps,
                            clock=clock)
    t["inverse"] -= t["step_only"]
    t["default"] /= 20
    ms = {k: 1e3 * v for k, v in t.items()}
    base = ms["sgd"] + ms["apply"]
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, 1 thread, {'wall' if args.wall else 'process CPU'} time, medians of "
          f"{args.reps} interleaved repetitions, load average {load:.1f}\n")
    print("| part | ms | / (sgd step + apply) |\n|---|---|---|")
    for name, label in [("sgd", "sgd step (fwd + bwd + SGD momentum)"), ("apply", "apply: G^-1 V A^-1 per parameter"),
                        ("kfac", "kfac plain step"), ("fwd_bwd", "  its fwd + bwd (extended model)"),
                        ("step_only", "  its opt.step()"), ("capture", "kfac capture step (no inverse)"),
                        ("inverse", "inverse rebuild (all layers)"),
                        ("default", "kfac at the default schedule (T_cov 5, T_inv 20), mean step")]:
        print(f"| {label} | {ms[name]:.2f} | {ms[name] / base:.2f} |")


if __name__ == "__main__":
    main()
