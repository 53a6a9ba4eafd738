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

``--breakdown [mlp deep gpt]``: instead, the parts of every step (:class:`Breakdown`) over T_inv
windows of the default schedule, on the MLP, a deep MLP of equal widths and the character GPT of
``time_to_loss.py``; ``--stagger 1 4`` compares ``inverse_stagger`` values (windows interleaved).
``--batched``: same-shaped layers' Kronecker inverses applied in a loop against one batched
product (:func:`batched_apply`).

    python benchmarks/bench_step.py [--reps 15] [--wall]
    python benchmarks/bench_step.py --breakdown --windows 3 --stagger 1 4 10
    python benchmarks/bench_step.py --batched --reps 31
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


# ---------------------------------------------------------------------------- per-step breakdown
class Breakdown:
    """Times the parts of every step of a :class:`NaturalGradient` with ``clock`` (seconds,
    accumulated per part for the current step): ``forward``, ``backward`` (inside
    ``opt.capture()``: the capture's hooks and extension run in it), and inside ``opt.step()``
    ``running`` (reading the captured curvature and mixing it into the running average),
    ``inverse`` (building the damped inverses, or fetching the cached ones), ``solve`` (applying
    them to the gradients), ``precondition rest`` (casts, extras), ``kl_clip`` (the rest of
    the group's plan: ``<d, g>`` and the scaling), ``update`` (momentum and the parameter update),
    ``checks`` (gathering the gradients, finiteness checks of gradients and directions), and
    ``step rest`` (the validation of the groups and the commit's bookkeeping). It wraps the
    optimizer's methods on the instance: the timed code is the library's own."""

    PARTS = ("forward", "backward", "running", "inverse", "solve", "precondition rest", "kl_clip", "update",
             "checks", "step rest")

    def __init__(self, model, loss_fn, opt, X, Y, clock):
        self.model, self.loss_fn, self.opt, self.X, self.Y, self.clock = model, loss_fn, opt, X, Y, clock
        self.t: Dict[str, float] = {}
        for name, part in [("_running", "running"), ("_inverse", "inverse"), ("_precondition", "_precondition"),
                           ("_plan_group", "_plan_group"), ("_apply", "update"), ("_gather", "checks"),
                           ("_check", "checks")]:
            self._wrap(name, part)

    def _add(self, part: str, seconds: float) -> None:
        self.t[part] = self.t.get(part, 0.0) + seconds

    def _wrap(self, name: str, part: str) -> None:
        orig = getattr(self.opt, name)

        def timed(*a, **k):
            t0 = self.clock()
            out = orig(*a, **k)
            self._add(part, self.clock() - t0)
            if name == "_inverse":  # the solve it returns is applied in _precondition: time it too
                return self._timed_solve(out)
            return out

        setattr(self.opt, name, timed)

    def _timed_solve(self, solve):
        def call(grads, extras=None):
            t0 = self.clock()
            out = solve(grads, extras)
            self._add("solve", self.clock() - t0)
            return out

        return call

    def step(self) -> Dict[str, float]:
        """One training step; its parts in seconds (``total``: the whole step); ``self.kind``
        says what it did: ``"plain"``, ``"capture"`` or ``"inverse"`` (an inverse rebuilt)."""
        opt, clock = self.opt, self.clock
        self.t = {}
        inv_before = sum(g.inv_updates for g in opt.core.groups)
        t0 = clock()
        opt.zero_grad()
        loss = self.loss_fn(self.model(self.X), self.Y)
        t1 = clock()
        with opt.capture():
            loss.backward()
        t2 = clock()
        captured = opt._captured() is not None
        opt.step()
        t3 = clock()
        t = self.t
        out = {"forward": t1 - t0, "backward": t2 - t1, "running": t.get("running", 0.0),
               "inverse": t.get("inverse", 0.0), "solve": t.get("solve", 0.0)}
        out["precondition rest"] = t.get("_precondition", 0.0) - out["running"] - out["inverse"] - out["solve"]
        out["kl_clip"] = t.get("_plan_group", 0.0) - t.get("_precondition", 0.0)
        out["update"], out["checks"] = t.get("update", 0.0), t.get("checks", 0.0)
        out["step rest"] = (t3 - t2) - sum(out[k] for k in self.PARTS[2:-1])
        out["total"] = t3 - t0
        inverted = sum(g.inv_updates for g in opt.core.groups) > inv_before
        self.kind = "inverse" if inverted else "capture" if captured else "plain"
        return out


def deep_mlp(seed: int = 0, width: int = 256, depth: int = 8) -> nn.Module:
    """``depth`` hidden Linear(width, width) + ReLU layers between a 784-input layer and a 10-class head."""
    torch.manual_seed(seed)
    layers: List[nn.Module] = [nn.Linear(784, width), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def breakdown_problems() -> Dict[str, Tuple[str, Callable[[], nn.Module], Tensor, Tensor]]:
    """``name -> (description, make_model, X, Y)`` of the breakdown."""
    from benchmarks.time_to_loss import VOCAB, CharGPT

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, len(VOCAB) + 1, (32, 65), generator=g)

    def gpt():
        torch.manual_seed(0)
        return CharGPT(len(VOCAB) + 1, 64)

    return {
        "mlp": ("MLP 784-512-256-10, batch 256", make_model, torch.randn(B, 784, generator=g),
                torch.randint(0, 10, (B,), generator=g)),
        "deep": ("deep MLP 784-256-(8 x 256-256)-10, batch 256", deep_mlp, torch.randn(B, 784, generator=g),
                 torch.randint(0, 10, (B,), generator=g)),
        "gpt": ("character GPT (2 blocks, d 128, context 64), batch 32", gpt, tokens[:, :-1],
                tokens[:, 1:].flatten()),
    }


def breakdown(
    problem: str, windows: int, clock, variants: Dict[str, Dict[str, object]],
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Parts of the steps of ``windows`` T_inv windows of 20 steps at the default schedule
    (``T_cov=5, T_inv=20``) of each variant (``name -> hyper-parameters`` overriding it; their
    windows interleaved), after the curvature warm-up: per variant and part the median over the
    windows of its mean per step (``mean``), of its time on the window's slowest step
    (``worst``), and its median over the steps of each kind (``plain``, ``capture``,
    ``inverse``: :meth:`Breakdown.step`) in all windows."""
    _, make, X, Y = breakdown_problems()[problem]
    runs = {}
    for name, hyper in variants.items():
        model, loss_fn = extend(make()), extend(nn.CrossEntropyLoss())
        opt = NaturalGradient(model.parameters(), lr=1e-3, momentum=0.9, seed=0, **hyper)
        runs[name] = Breakdown(model, loss_fn, opt, X, Y, clock)
        for _ in range(10 + 20):  # the warm-up and one window
            runs[name].step()
    means = {n: [] for n in runs}
    worsts = {n: [] for n in runs}
    kinds: Dict[str, Dict[str, list]] = {n: {} for n in runs}
    for _ in range(windows):
        for name, bd in runs.items():
            gc.collect()
            steps = []
            for _ in range(20):
                steps.append(bd.step())
                kinds[name].setdefault(bd.kind, []).append(steps[-1])
            means[name].append({k: statistics.mean(s[k] for s in steps) for k in steps[0]})
            worsts[name].append(max(steps, key=lambda s: s["total"]))
    return {name: {col: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                   for col, rows in [("mean", means[name]), ("worst", worsts[name])] + sorted(kinds[name].items())}
            for name in runs}


def print_breakdown(problems: List[str], windows: int, clock, variants: Dict[str, Dict[str, object]]) -> None:
    """The breakdown table of each problem and variant (ms per step)."""
    cols = ["plain", "capture", "inverse", "mean", "worst"]
    for problem in problems:
        desc = breakdown_problems()[problem][0]
        out = breakdown(problem, windows, clock, variants)
        for name, r in out.items():
            print(f"\n### {desc}{', ' + name if name else ''}\n")
            have = [c for c in cols if c in r]
            print("| part | " + " | ".join(f"{c} ms" for c in have) + " |\n|---|" + "---|" * len(have))
            for part in Breakdown.PARTS + ("total",):
                print(f"| {part} | " + " | ".join(f"{r[c][part] * 1e3:.2f}" for c in have) + " |")


def batched_apply(reps: int, clock) -> None:
    """Item 4: ``L`` same-shaped ``"pi"`` Kronecker inverses applied to ``L`` gradients as the
    optimizer does (a loop of ``P(g)``, each checking ``g``), the loop without the check
    (``P(g, check=False)``), the loop's matmuls alone, and one batched product of the stacked
    inverses (``torch.stack`` of the gradients, two ``bmm``, ``unbind``)."""
    from curvlib.solvers import KroneckerInverse

    print("\n| layers | loop P(g) ms | loop, unchecked ms | matmuls ms | batched (stack + bmm) ms "
          "| batched / unchecked |\n|---|---|---|---|---|---|")
    for n, count in [(256, 8), (128, 16), (64, 32)]:
        torch.manual_seed(0)

        def spd(m):
            X = torch.randn(4 * m, m)
            return X.T @ X / (4 * m)

        invs = [KroneckerInverse([[spd(n), spd(n)]], 1e-3, "pi") for _ in range(count)]
        grads = [torch.randn(n, n) for _ in range(count)]
        Gs, As = torch.stack([P._Ginv for P in invs]), torch.stack([P._Ainv for P in invs])
        fns = dict(
            loop=lambda: [P(g) for P, g in zip(invs, grads)],
            unchecked=lambda: [P(g, check=False) for P, g in zip(invs, grads)],
            matmuls=lambda: [P._Ginv @ g @ P._Ainv for P, g in zip(invs, grads)],
            batched=lambda: (Gs @ torch.stack(grads) @ As).unbind(0),
        )
        t = {k: 1e3 * v for k, v in interleaved_medians(fns, reps=reps, clock=clock).items()}
        print(f"| {count} x {n}x{n} | {t['loop']:.3f} | {t['unchecked']:.3f} | {t['matmuls']:.3f} | "
              f"{t['batched']:.3f} | {t['batched'] / t['unchecked']:.2f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--wall", action="store_true", help="wall time instead of process CPU time")
    ap.add_argument("--breakdown", nargs="*", choices=["mlp", "deep", "gpt"], default=None,
                    help="instead of the table against SGD: the per-step breakdown of these problems (all by default)")
    ap.add_argument("--windows", type=int, default=5, help="--breakdown: T_inv windows of 20 steps timed")
    ap.add_argument("--batched", action="store_true",
                    help="instead: same-shaped layers' inverses applied in a loop against one batched product")
    ap.add_argument("--stagger", type=int, nargs="*", default=[1],
                    help="--breakdown: inverse_stagger values to compare (windows interleaved)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.batched:
        batched_apply(args.reps, time.perf_counter if args.wall else time.process_time)
        return
    if args.breakdown is not None:
        variants = {(f"inverse_stagger={n}" if args.stagger != [1] else ""): {"inverse_stagger": n}
                    for n in args.stagger}
        print_breakdown(args.breakdown or ["mlp", "deep", "gpt"], args.windows,
                        time.perf_counter if args.wall else time.process_time, variants)
        return
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
