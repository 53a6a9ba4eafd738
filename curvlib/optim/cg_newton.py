r"""``CGNewton``: matrix-free Newton steps ``(C + λ I) d = g`` solved by conjugate gradients.

Per step and param group (docs/design.md §2), with ``g = p.grad``:

- ``block_diagonal=True``: one CG per parameter ``p`` on ``(C_pp + λ I) d_p = g_p``, ``C_pp`` the
  exact block of the chosen curvature, applied through its savefield (``p.ggnmp``, ``p.hmp``,
  ``p.pchmp``); each block has its own CG scalars, stopping rule and iteration count, and all
  blocks advance together in one loop (:func:`curvlib.solvers.cg_blocks`);
- ``block_diagonal=False``: one CG on the whole-network system ``(C + λ I) d = g`` over the
  group's parameters (all blocks and cross-parameter terms, ``ext.operator()``);
- ``p <- p - lr d_p``; a parameter without curvature (its layer has no adapter) moves by
  ``-lr g_p``.

Curvatures: ``"ggn"`` (GGN / Fisher of ``fisher_type``, :class:`~curvlib.extensions.GGNMP`;
Schraudolph 2002, Martens 2010), ``"hessian"`` (:class:`~curvlib.extensions.HMP`),
``"pch-abs"`` / ``"pch-clip"`` (positive-curvature Hessian, :class:`~curvlib.extensions.PCHMP`;
Chen et al. 2019, "BDA-PCH"). This is BackPACK's CG-Newton example (Dangel et al. 2020) as an
optimizer.

On an indefinite system (Hessian), CG stops at the first direction of non-positive curvature
(:func:`curvlib.solvers.cg` with ``negative_curvature="stop"``): the direction is the CG iterate
reached so far, or ``g`` itself when it happens at the first iteration (truncated Newton,
Nocedal & Wright Alg. 7.1); ``state[p]["cg_negative_curvature"]`` says so.

Logging: after each step, ``opt.state[p]`` holds ``cg_iterations`` (iterations run),
``cg_residual`` (final ``||(C + λI) d - g||``, recursive), ``cg_converged`` and
``cg_negative_curvature`` of the system ``p`` took part in, and ``direction`` (``d_p``, the warm
start of the next step with ``warm_start=True``). ``opt.last_cg`` lists one dict per solve of
the last step.

Options: ``warm_start=True`` starts CG from the previous direction (Martens 2010, §4.5);
``precondition="kfac"`` preconditions CG with the damped KFAC inverse
``(kron(G, A) + λ I)^-1`` of the same batch (type-2 factors, :class:`~curvlib.solvers.KroneckerInverse`
with ``damping_mode="exact"``), block by block; it changes the CG path, not the solution.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from curvlib.extensions import GGNMP, HMP, KFAC
from curvlib.extensions.base import FISHER_TYPES
from curvlib.extensions.pchmp import PCHMP
from curvlib.optim import state as st
from curvlib.optim.preconditioner import CurvatureOptimizer, _Capture, _finite
from curvlib.solvers import CGBlockError, KroneckerInverse, cg, cg_blocks

CG_CURVATURES = ("ggn", "hessian", "pch-abs", "pch-clip")

#: hyper-parameters of CGNewton and their defaults (BackPACK's CGNOptimizer's defaults)
CG_DEFAULTS: Dict[str, Any] = dict(
    curvature="ggn",
    fisher_type="type-2",
    damping=1e-2,
    maxiter=100,
    tol=1e-1,
    atol=1e-8,
    block_diagonal=True,
    warm_start=False,
    precondition=None,
    pch_convention="paper",
)


class _CGCapture(_Capture):
    """``opt.capture()`` of :class:`CGNewton`: clears stale savefields, saves the generator."""

    def __enter__(self):
        opt = self.opt
        self._begin()
        for group in opt.param_groups:
            for p in group["params"]:
                for ext in self.extensions:
                    p.__dict__.pop(ext.savefield, None)
        self.ctx.__enter__()
        return self.ctx


class CGNewton(CurvatureOptimizer):
    r"""Newton-CG with GGN, Hessian or positive-curvature-Hessian products (module docstring).

    Example::

        model, loss_fn = extend(model), extend(torch.nn.CrossEntropyLoss())
        opt = CGNewton(model.parameters(), lr=0.1, curvature="ggn", damping=1e-2, maxiter=20,
                       tol=0.1, atol=1e-6)
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            with opt.capture():
                loss.backward()
            opt.step()

    Args:
        params: parameters or param groups (dicts may override every keyword below).
        lr: learning rate.
        curvature: ``"ggn"``, ``"hessian"``, ``"pch-abs"`` or ``"pch-clip"``.
        fisher_type: for ``"ggn"``: ``"type-2"`` (exact GGN), ``"mc"`` or ``"empirical"``.
        damping: ``λ >= 0`` added to the curvature.
        maxiter, tol, atol: CG stopping rule ``||r|| <= max(tol ||g||, atol)`` (per system).
        block_diagonal: one CG per parameter (True) or one on the whole network (False).
        warm_start: start CG from the previous step's direction.
        precondition: ``None`` or ``"kfac"``.
        pch_convention: ``"paper"`` (Chen et al.) or ``"backpack"`` (BackPACK 1.7.1's PCHMP), see
            :class:`~curvlib.extensions.PCHMP`.
        seed: seed of the generator for MC targets (``fisher_type="mc"``), saved in the state.
    """

    def __init__(
        self, params, lr: float, seed: Optional[int] = None, *, process_group: Any = "auto",
        check_sync: bool = False, **hyper: Any,
    ):
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"curvlib.optim.CGNewton: lr={lr!r} must be a number >= 0.")
        unknown = set(hyper) - set(CG_DEFAULTS)
        if unknown:
            raise TypeError(
                f"curvlib.optim.CGNewton: unknown arguments {sorted(unknown)}; the hyper-parameters are "
                f"{sorted(CG_DEFAULTS)}."
            )
        defaults = dict(CG_DEFAULTS, lr=lr)
        defaults.update(hyper)
        self.last_cg: List[Dict[str, Any]] = []
        super().__init__(params, defaults, seed, process_group=process_group, check_sync=check_sync)

    # ------------------------------------------------------------------ validation
    def _validate(self, g: Dict[str, Any], gi: int) -> None:
        where = f"curvlib.optim.CGNewton: param group {gi}"
        if g["curvature"] not in CG_CURVATURES:
            raise ValueError(f"{where}: curvature={g['curvature']!r}; use one of {CG_CURVATURES}.")
        if g["fisher_type"] not in FISHER_TYPES:
            raise ValueError(f"{where}: fisher_type={g['fisher_type']!r} is not one of {FISHER_TYPES}.")
        if g["fisher_type"] != "type-2" and g["curvature"] != "ggn":
            raise ValueError(f"{where}: fisher_type applies to curvature='ggn' only; leave it at 'type-2'.")
        if not (isinstance(g["damping"], (int, float)) and g["damping"] >= 0 and math.isfinite(g["damping"])):
            raise ValueError(f"{where}: damping={g['damping']!r} must be a finite number >= 0.")
        if not (isinstance(g["maxiter"], int) and g["maxiter"] >= 1):
            raise ValueError(f"{where}: maxiter={g['maxiter']!r} must be an int >= 1.")
        for name in ("tol", "atol"):
            if not (isinstance(g[name], (int, float)) and g[name] >= 0):
                raise ValueError(f"{where}: {name}={g[name]!r} must be a number >= 0.")
        if g["precondition"] not in (None, "kfac"):
            raise ValueError(f"{where}: precondition={g['precondition']!r}; use None or 'kfac'.")
        if g["pch_convention"] not in ("paper", "backpack"):
            raise ValueError(f"{where}: pch_convention={g['pch_convention']!r}; use 'paper' or 'backpack'.")
        if g["curvature"].startswith("pch") and not g["block_diagonal"]:
            raise ValueError(
                f"{where}: the positive-curvature Hessian is defined block by block (Chen et al.; "
                "BackPACK's PCHMP); use block_diagonal=True, or curvature='ggn' for a whole-network system."
            )

    def _check_distributed(self, g: Dict[str, Any], gi: int) -> None:
        if g["curvature"].startswith("pch"):
            raise NotImplementedError(
                f"curvlib.optim.CGNewton: param group {gi}: curvature={g['curvature']!r} cannot run "
                "data-parallel: the positive-curvature Hessian modifies each batch's blocks (not linear in "
                "the batch). Use 'ggn' or 'hessian' with torch.distributed, or process_group=None."
            )

    def _curvature_entries(self, k: int):
        """Data-parallel: the KFAC factors of ``precondition="kfac"`` (averaged like
        NaturalGradient's); the curvature products themselves are all-reduced in each CG iteration."""
        kf = next((e for e in self._captured[1] if isinstance(e, KFAC)), None)
        if kf is None:
            return []
        counts = self._capture_ctx.counts(kf)
        out = []
        for g in self.param_groups:
            if g["precondition"] != "kfac":
                continue
            for p in g["params"]:
                value = p.__dict__.get("kfac") if p.grad is not None else None
                if value is not None:
                    out.append((p, "kfac", value, self._roles("kfac", p, value, kf), counts.get(id(p), 1), True))
        return out

    def _averaged(self, A: Callable) -> Callable:
        """Data-parallel: ``v -> 1/W sum_r C_r v``, the product of the loss whose gradient the
        optimizer averages (one all-reduce per product; every rank runs the same CG iterations)."""
        dp = self._dp
        if dp is None:
            return A

        def apply(v):
            out = A(v)
            return dp.mean(list(out)) if isinstance(out, (list, tuple)) else dp.mean([out])[0]

        return apply

    # ------------------------------------------------------------------ capture
    def _extensions(self, group: Dict[str, Any]) -> List[Any]:
        c = group["curvature"]
        if c == "ggn":
            exts = [GGNMP(fisher_type=group["fisher_type"])]
        elif c == "hessian":
            exts = [HMP()]
        else:
            exts = [PCHMP(modify=c.split("-")[1], convention=group["pch_convention"])]
        if group["precondition"] == "kfac":
            ft = group["fisher_type"] if c == "ggn" else "type-2"
            exts.append(KFAC(fisher_type=ft))
        return exts

    def _extensions_due(self, k: int) -> List[Any]:
        exts: Dict[Any, Any] = {}
        for g in self.param_groups:
            for ext in self._extensions(g):
                key = (ext.savefield, repr(ext))
                if key in exts:
                    continue
                if any(e.savefield == ext.savefield for e in exts.values()):
                    raise ValueError(
                        f"curvlib.optim.CGNewton: two param groups need different {ext.savefield!r} "
                        "extensions; give all groups with that curvature the same fisher_type / modify."
                    )
                exts[key] = ext
        return list(exts.values())

    def capture(self):
        """The ``curvlib.curvature`` context for this step's backward (every step needs one)."""
        return _CGCapture(self, self._extensions_due(self._step), self._step)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One Newton-CG step on the gradients and curvature of the last ``capture()``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            if self._captured is None or self._captured[0] != self._step:
                raise RuntimeError(
                    "curvlib.optim.CGNewton: no curvature was captured for this step. Run the backward "
                    "inside `with opt.capture(): loss.backward()` (and call opt.step() once per capture)."
                )
            new_params, new_state, log = self._plan()
        except BaseException:
            self._fail()
            raise
        for p, v in new_params.items():
            p.copy_(v)
        for p, s in new_state.items():
            self.state[p].update(s)
        self.last_cg = log
        self._groups[:] = [dict(g, last_cg=l) for g, l in zip(self._groups, self._group_logs(log))]
        self._gen_before = None
        self._captured = None
        self._step += 1
        return loss

    def _group_logs(self, log: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        out = []
        for gi in range(len(self.param_groups)):
            mine = [e for e in log if e["group"] == gi]
            out.append({
                "iterations": sum(e["iterations"] for e in mine),
                "residual": max((e["residual"] for e in mine), default=0.0),
                "negative_curvature": any(e["negative_curvature"] for e in mine),
            })
        return out

    def _plan(self):
        """New parameter values, state entries and CG log, computed without side effects."""
        exts = self._captured[1]
        if self._dp is not None:
            self._sync(self._curvature_entries(self._step))
        new_params: Dict[Tensor, Tensor] = {}
        new_state: Dict[Tensor, Dict[str, Any]] = {}
        log: List[Dict[str, Any]] = []
        for gi, group in enumerate(self.param_groups):
            idx = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            params = [group["params"][i] for i in idx]
            grads = [p.grad for p in params]
            bad = _first_nonfinite(grads)
            if bad is not None:
                raise FloatingPointError(
                    f"curvlib.optim.CGNewton: the gradient of {self._name(gi, idx[bad], params[bad])} contains NaN "
                    "or Inf; the step was not taken and parameters and optimizer state are unchanged. Skip this "
                    "batch (opt.zero_grad()) or lower the learning rate."
                )
            names = [self._name(gi, i, p) for i, p in zip(idx, params)]
            if not params:
                continue
            curv_ext = next(e for e in exts if e.savefield == self._extensions(group)[0].savefield)
            field = curv_ext.savefield
            kfac = group["precondition"] == "kfac"
            lam = float(group["damping"])
            dirs: Dict[Tensor, Tensor] = {}
            if group["block_diagonal"]:
                systems = []  # one CG system per parameter with curvature, solved in one loop
                for p, g, n in zip(params, grads, names):
                    prod = p.__dict__.get(field)
                    if prod is None:
                        self._warn_plain(n, group["curvature"])
                        continue
                    A = self._averaged(lambda v, prod=prod: prod(v.unsqueeze(0)).squeeze(0))  # damped by cg_blocks
                    systems.append((p, g, n, A, _kfac_inverse(p, lam) if kfac else None))
                for (p, g, n, _, _), (d, info) in zip(systems, self._solve_blocks(systems, group)):
                    dirs[p] = d
                    log.append(_entry(gi, [n], info))
                    new_state[p] = _cg_state(info, d)
            else:
                op = curv_ext.operator()
                inside = [p for p in params if any(p is q for q in op.params)]
                for p, n in zip(params, names):
                    if not any(p is q for q in inside):
                        self._warn_plain(n, group["curvature"])
                if inside:
                    A = _damped(self._averaged(_restricted(op, inside)), lam)
                    gs = [p.grad for p in inside]
                    Ms = [_kfac_inverse(p, lam) for p in inside] if kfac else None
                    M = (lambda vs: [m(v) for m, v in zip(Ms, vs)]) if kfac else None
                    ds, info = self._solve(A, gs, inside, M, group, f"param group {gi}")
                    log.append(_entry(gi, [n for p, n in zip(params, names) if any(p is q for q in inside)], info))
                    for p, d in zip(inside, ds):
                        dirs[p] = d
                        new_state[p] = _cg_state(info, d)
            lr = float(group["lr"])
            ds = [dirs.get(p, g).to(p.dtype) for p, g in zip(params, grads)]
            bad = _first_nonfinite(ds)
            if bad is not None:
                raise FloatingPointError(
                    f"curvlib.optim.CGNewton: the Newton direction of {names[bad]} contains NaN or Inf; the step "
                    "was not taken and state is unchanged. Increase damping or skip this batch."
                )
            news = torch._foreach_add([p.detach() for p in params], ds, alpha=-lr)
            bad = _first_nonfinite(news)
            if bad is not None:
                raise FloatingPointError(
                    f"curvlib.optim.CGNewton: the update of {names[bad]} is NaN or Inf; the step was not taken and "
                    "state is unchanged. Lower the learning rate or increase damping."
                )
            new_params.update(zip(params, news))
        return new_params, new_state, log

    def _solve_blocks(self, systems, group) -> List[Tuple[Tensor, Any]]:
        """One CG per parameter block (:func:`~curvlib.solvers.cg_blocks`: every block keeps its own
        CG scalars and stopping rule, all blocks of one dtype and device advance in one loop).
        ``systems``: ``(p, g, name, A, M)``; returns ``(d, info)`` in that order."""
        out: List[Any] = [None] * len(systems)
        kinds: Dict[Any, List[int]] = {}
        for i, (_, g, _, _, _) in enumerate(systems):
            kinds.setdefault((g.dtype, g.device), []).append(i)
        for idx in kinds.values():
            ps = [systems[i][0] for i in idx]
            x0 = None
            if group["warm_start"]:
                prev = [self.state.get(p, {}).get("direction") for p in ps]
                x0 = [d if d is not None and d.shape == p.shape else None for d, p in zip(prev, ps)]
            Ms = [systems[i][4] for i in idx]
            try:
                ds, infos = cg_blocks(
                    [systems[i][3] for i in idx], [systems[i][1] for i in idx], x0=x0, tol=float(group["tol"]),
                    atol=float(group["atol"]), maxiter=int(group["maxiter"]),
                    M=Ms if any(m is not None for m in Ms) else None, negative_curvature="stop",
                    shift=float(group["damping"]),
                )
            except CGBlockError as e:
                _raise_if_nonfinite(e, group, systems[idx[e.block]][2])
                raise
            for i, d, info in zip(idx, ds, infos):
                out[i] = (d, info)
        return out

    def _solve(self, A, b, params, M, group, where):
        x0 = None
        if group["warm_start"]:
            prev = [self.state.get(p, {}).get("direction") for p in params]
            if all(d is not None and d.shape == p.shape for d, p in zip(prev, params)):
                x0 = prev if isinstance(b, list) else prev[0]
        try:
            return cg(
                A, b, x0=x0, tol=float(group["tol"]), atol=float(group["atol"]), maxiter=int(group["maxiter"]),
                M=M, negative_curvature="stop",
            )
        except ValueError as e:
            _raise_if_nonfinite(e, group, where)
            raise


def _raise_if_nonfinite(e: Exception, group: dict, where: str) -> None:
    """A CG error caused by non-finite products (the solvers name NaN / Inf) as the optimizer's
    ``FloatingPointError``; other errors are left to the caller to re-raise."""
    if "NaN" in str(e) or "Inf" in str(e):
        raise FloatingPointError(
            f"curvlib.optim.CGNewton: the {group['curvature']!r} products of {where} are not finite "
            f"({e}); the step was not taken and state is unchanged. Skip this batch."
        ) from e


def _first_nonfinite(ts: List[Tensor]) -> Optional[int]:
    """Index of the first tensor with a NaN or Inf entry (``None``: all finite): one stacked check
    of the tensors' 1-norms (a non-finite norm, or tensors of mixed dtypes, are then checked one
    by one, as an overflowing norm of finite entries is possible)."""
    if not ts:
        return None
    try:
        if bool(torch.isfinite(torch.stack(torch._foreach_norm(ts, 1))).all()):
            return None
    except RuntimeError:  # mixed dtypes or devices
        pass
    return next((i for i, t in enumerate(ts) if not _finite(t)), None)


def _damped(A: Callable, lam: float) -> Callable:
    """``v -> A v + λ v`` on a tensor or a list of tensors."""

    def apply(v):
        out = A(v)
        if isinstance(v, list):
            return [o + lam * t for o, t in zip(out, v)]
        return out + lam * v

    return apply


def _restricted(op, params: List[Tensor]) -> Callable:
    """The operator's block over ``params`` (a subset of ``op.params``, zero elsewhere)."""
    if len(params) == len(op.params):
        return lambda vs: op(list(vs))
    idx = [next(i for i, q in enumerate(op.params) if q is p) for p in params]

    def apply(vs):
        full = [torch.zeros_like(q) for q in op.params]
        for i, v in zip(idx, vs):
            full[i] = v
        out = op(full)
        return [out[i] for i in idx]

    return apply


def _kfac_inverse(p: Tensor, lam: float) -> Optional[Callable]:
    """``(kron(G, A) + λ I)^-1`` of ``p.kfac`` (exact damping; None without KFAC factors)."""
    factors = p.__dict__.get("kfac")
    if factors is None:
        return lambda v: v
    lam = lam if lam > 0 else 1e-8
    P = KroneckerInverse(list(factors), lam, damping_mode="exact")
    if p.ndim > 1:
        return lambda v: P(v.reshape(p.shape[0], -1)).reshape(p.shape)
    return P


def _entry(gi: int, names: List[str], info) -> Dict[str, Any]:
    return {
        "group": gi,
        "params": names,
        "iterations": int(info.iterations),
        "residual": float(info.residual_norm),
        "converged": bool(info.converged),
        "negative_curvature": bool(getattr(info, "negative_curvature", False)),
    }


def _cg_state(info, d) -> Dict[str, Any]:
    return {
        "cg_iterations": int(info.iterations),
        "cg_residual": float(info.residual_norm),
        "cg_converged": bool(info.converged),
        "cg_negative_curvature": bool(getattr(info, "negative_curvature", False)),
        "direction": d.detach().clone() if isinstance(d, Tensor) else d,
    }


__all__ = ["CGNewton", "CG_DEFAULTS", "CG_CURVATURES"]
