r"""The kinds of curvature the ``curvature=`` hyper-parameter names: one small strategy class each.

A :class:`CurvatureKind` is everything that depends on which curvature a param group uses, so
that the optimizer core (:mod:`curvlib.optim.core`, :mod:`curvlib.optim.running`) branches on no
curvature name. (The class is called a *kind* so that "curvature" names one thing in
:mod:`curvlib.optim`: the hyper-parameter whose values are the kinds' names; the capture
context is ``curvlib.curvature``, the per-parameter state the ``running`` curvature.) Each kind
says

- which options it reads beyond the core's hyper-parameters (:attr:`CurvatureKind.options`,
  rows of the optimizer's table) and how it checks a group (:meth:`CurvatureKind.validate`);
- which extension(s) it needs (:meth:`CurvatureKind.extensions`), what it prepares on the
  extensions before a capture (:meth:`CurvatureKind.before_capture`: KPSVD warm starts) and
  what it keeps from them after (:meth:`CurvatureKind.after_read`);
- how a parameter's new curvature is read from its savefield (:meth:`CurvatureKind.read`), how
  the running curvature mixes with it (:meth:`CurvatureKind.mix`, an exponential moving
  average), how the damped inverse is built from it (:meth:`CurvatureKind.inverse`, a
  :class:`Solve` over the group's parameters), which per-step quantities the solve takes
  (:meth:`CurvatureKind.extras`: two-level's whole-network operator) and how the curvature
  multiplies a vector (:meth:`CurvatureKind.mvp`, for Levenberg–Marquardt damping);
- whether it can run data-parallel and which savefields are averaged across processes.

The kinds of :class:`~curvlib.optim.CGNewton` (exact products, no running curvature) are in
:mod:`curvlib.optim.products`.

A curvature value (``C`` below) is what the optimizer stores per parameter: a tensor or a
(nested) list of tensors, so that ``state_dict()`` stays loadable with ``weights_only=True``.

| name | C per parameter | inverse (``curvlib.solvers``) | paper |
|---|---|---|---|
| ``kfac`` | ``[G, A]`` / ``[G]`` | :class:`KroneckerInverse` | Martens & Grosse 2015 |
| ``kpsvd`` | ``[[G1, A1], ...]`` rank 1 | :class:`KroneckerInverse` | Koroko et al. 2022 |
| ``kfac-corrected`` | ``[[G, A], [S, R]]`` | :class:`KroneckerInverse` (2 terms) | Koroko et al. 2022 |
| ``deflation`` | rank-2 KPSVD, power + deflation | :class:`KroneckerInverse` (2 terms) | Koroko et al. 2022 |
| ``lanczos`` | rank-2 KPSVD, Golub–Kahan | :class:`KroneckerInverse` (2 terms) | Koroko et al. 2022 |
| ``two-level`` | ``[G, A]`` + coarse correction | :func:`two_level_direction` | Tselepidis et al. 2020; Koroko et al. 2023 |
| ``exact-ng`` | per-sample factors ``U_p`` | :func:`woodbury_solve` (whole group) | Ren & Goldfarb 2019 |
| ``exact-ng-blocks`` | per-sample factors ``U_p`` | :func:`woodbury_solve_blocks` | Ren & Goldfarb 2019 |
| ``diag`` | ``diag(C_p)`` | ``1 / (d + λ)`` | (diagonal GGN, e.g. BackPACK) |
| ``ekfac`` | ``[G, A]``, eigenbasis ``Q``, ``S`` | ``Q (Q^T g Q / (S + λ)) Q^T`` | George et al. 2018 |
| ``eigen-adam`` | ``[G, A]``, eigenbasis ``Q``, Adam moments | Adam on ``Q^T g Q``, rotated back | Vyas et al. 2024 (SOAP) |

Kronecker curvatures mix factor by factor (``G <- β G + (1-β) G_new``, the same for ``A``), as
Martens & Grosse §5 do; ``diag`` mixes the diagonal. ``exact-ng`` / ``exact-ng-blocks`` keep the
factors of the latest curvature batch (a moving average of ``U^T U`` has no fixed-size factor):
``ema_decay`` does not apply to them (the optimizer says so once). ``ekfac`` and ``eigen-adam``
(:mod:`curvlib.optim.eigenbasis`) keep KFAC's factors as the running curvature and step in their
eigenbasis with per-parameter state instead of a cached inverse.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from curvlib.extensions import GGNMP, DiagGGN, GradFactors, KFAC, KFACCorrected, KPSVD, SubBatch
from curvlib.extensions.base import Extension
from curvlib.optim.hyperparams import HyperParameter, Rule, number, one_of
from curvlib.optim.tensors import Value, tree_leaves, tree_map, working_dtype
from curvlib.solvers import KroneckerInverse, kron_matvec, two_level_direction, woodbury_solve, woodbury_solve_blocks
from curvlib.solvers.two_level import COARSE_FORMS, COARSE_SPACES


def _as_matrix(p: Tensor, v: Tensor) -> Tensor:
    """``v`` (shaped like ``p``) as ``[p.shape[0], -1]`` for a weight, unchanged for a vector."""
    return v.reshape(p.shape[0], -1) if p.ndim > 1 else v


class Solve:
    """The damped inverse of a group's curvature: ``solve(grads) -> directions``.

    ``grads``: parameter-shaped tensors (the group's parameters with curvature, in order);
    ``extras``: per-step quantities (``"operator"`` for two-level on capture steps).
    """

    def __init__(self, fn: Callable[[List[Tensor], Dict[str, Any]], List[Tensor]], parts: Optional[List[Any]] = None):
        self.fn = fn
        #: one inverse per parameter for curvatures whose inverse is block-diagonal (``kfac``:
        #: a :class:`KroneckerInverse`, ``diag``: ``1 / (d + λ)``), ``None`` otherwise; the
        #: distributed optimizer builds each on one process and broadcasts it
        self.parts = parts

    def __call__(self, grads: List[Tensor], extras: Optional[Dict[str, Any]] = None) -> List[Tensor]:
        return self.fn(grads, extras or {})


def unwrap(ext: Any) -> Any:
    """The extension a :class:`~curvlib.extensions.SubBatch` wraps (or ``ext`` itself)."""
    return ext.inner if isinstance(ext, SubBatch) else ext


class CurvatureKind:
    """Base class (see the module docstring); the defaults are those of a curvature without
    options, warm starts or per-step quantities."""

    name: ClassVar[str] = ""
    #: the damping is shared between two Kronecker factors (``damping_mode="pi"`` applies)
    kronecker: ClassVar[bool] = False
    #: the running curvature is a moving average (``ema_decay`` applies)
    ema: ClassVar[bool] = True
    #: the attribute the curvature's main extension writes on each parameter
    savefield: ClassVar[str] = ""
    #: the curvature of a concatenated batch is a known combination of the per-process ones
    #: (:mod:`curvlib.optim.distributed`), so the optimizer can run data-parallel
    distributed: ClassVar[bool] = False
    #: why not (when not :attr:`distributed`), for the error message
    not_distributed: ClassVar[str] = (
        "the curvature of the concatenated batch is not a combination of the per-process ones (a best "
        "Kronecker approximation, a whole-network operator or per-sample factors)"
    )
    #: square leaves of the captured values are symmetric (data-parallel: sent as triangles)
    symmetric: ClassVar[bool] = True
    #: the hyper-parameters this kind reads beyond the optimizer's own (rows of its table)
    options: ClassVar[Tuple[HyperParameter, ...]] = ()
    #: the direction is the kind's ``direction(...)`` per parameter, with its own state
    #: (:mod:`curvlib.optim.eigenbasis`), instead of a cached :class:`Solve`
    stateful: ClassVar[bool] = False
    #: the damped inverse is one independent inverse per parameter (:attr:`Solve.parts`, or a
    #: per-parameter eigenbasis for :attr:`stateful` kinds), so the parameters' inverses can be
    #: rebuilt at different steps (``inverse_stagger``)
    separable: ClassVar[bool] = False

    def validate(self, group: Mapping[str, Any], where: str) -> None:
        """Raise ``ValueError(f"{where}: ...")`` if ``group`` cannot use this kind (checks that
        involve the kind; the table's rules have passed)."""

    def extensions(self, group: Mapping[str, Any]) -> List[Extension]:
        raise NotImplementedError

    def averaged_fields(self, group: Mapping[str, Any]) -> Tuple[str, ...]:
        """Data-parallel: the savefields averaged across processes after a capture."""
        return (self.savefield,)

    def before_capture(self, p: nn.Parameter, state: Mapping[str, Any], extensions: List[Extension]) -> None:
        """Prepare the capture's ``extensions`` for ``p`` (``state``: ``opt.state[p]``)."""

    def read(self, p: nn.Parameter, group: Mapping[str, Any]) -> Optional[Value]:
        """``p``'s new curvature from its savefield (``None``: the layer has no adapter)."""
        value = p.__dict__.get(self.savefield)
        return None if value is None else self.convert(p, value)

    def convert(self, p: nn.Parameter, value: Value) -> Value:
        return value

    def after_read(self, p: nn.Parameter, extensions: List[Extension]) -> Dict[str, Any]:
        """Entries of ``opt.state[p]`` to keep from the capture's ``extensions``."""
        return {}

    def extras(self, group: Mapping[str, Any], extensions: List[Extension]) -> Dict[str, Any]:
        """Per-step quantities of a capture step for :class:`Solve` (``extras``)."""
        return {}

    def mix(self, old: Value, new: Value, decay: float) -> Value:
        """``decay * old + (1 - decay) * new``, out of place."""
        return tree_map(lambda a, b: a.mul(decay).add_(b, alpha=1.0 - decay), old, new)

    def inverse(
        self, params: List[nn.Parameter], curvs: List[Value], damping: float, damping_mode: str, group: Mapping[str, Any]
    ) -> Solve:
        raise NotImplementedError

    def mvp(self, params: List[nn.Parameter], curvs: List[Value], vs: List[Tensor]) -> List[Tensor]:
        """``C v`` (undamped) for parameter-shaped ``vs``."""
        raise NotImplementedError

    def fits(self, p: nn.Parameter, value: Value) -> bool:
        """Whether ``value`` can be ``p``'s curvature of this kind (``load_state_dict`` checks a
        checkpoint with it; the default accepts every value)."""
        return True

    def solve_from_parts(self, params: List[nn.Parameter], parts: List[Any]) -> Solve:
        """The :class:`Solve` of per-parameter inverses ``parts`` (``Solve.parts``)."""
        raise NotImplementedError(f"curvlib.optim: curvature={self.name!r} has no per-parameter inverses.")

    def inverse_cost(self, value: Value, damping_mode: str) -> float:
        """Estimated cost of one parameter's inverse, for sharding: ``m^3`` per ``m x m``
        factor (``B m^3`` for ``[B, m, m]``, ``m`` for a diagonal), times 5 where the inverse
        needs an eigendecomposition instead of a Cholesky factorization (measured on CPU:
        ``eigh`` takes 2-6x ``cholesky`` + ``cholesky_inverse`` for m = 256..784)."""
        eig = isinstance(value, list) and (damping_mode == "exact" or len(_terms(value)[0]) == 1)
        return (5.0 if eig else 1.0) * float(sum(
            t.shape[:-2].numel() * t.shape[-1] ** 3 if t.dim() >= 2 else t.numel() for t in tree_leaves(value)
        ))


# ---------------------------------------------------------------- Kronecker family


def _terms(value: Value) -> List[List[Tensor]]:
    """``[G, A]`` / ``[G]`` / ``[[G1, A1], ...]`` -> list of terms."""
    return [value] if isinstance(value[0], Tensor) else value


class KroneckerKind(CurvatureKind):
    """Curvatures given as sums of Kronecker products, inverted by :class:`KroneckerInverse`."""

    kronecker = True
    separable = True

    def inverse(self, params, curvs, damping, damping_mode, group):
        invs = [KroneckerInverse(_terms(c), damping, damping_mode) for c in curvs]
        return self.solve_from_parts(params, invs)

    def solve_from_parts(self, params, parts):
        # the optimizer has checked the gradients (all at once) and checks the directions: no
        # per-layer check of each input (measured: 20-46 % of the loop over 64 .. 256 wide
        # layers, benchmarks/bench_step.py --batched)
        def fn(grads, extras):
            return [P(_as_matrix(p, g), check=False).reshape(p.shape) for P, p, g in zip(parts, params, grads)]

        return Solve(fn, parts)

    def fits(self, p, value):
        """Each term is a list of square factors (dense ``[m, m]``, diagonal ``[m]``, blocks
        ``[B, m, m]``) whose sizes multiply to ``p.numel()``."""
        if not isinstance(value, list) or not value:
            return False
        for term in _terms(value):
            if not isinstance(term, list) or not term or not all(isinstance(t, Tensor) for t in term):
                return False
            size = 1
            for t in term:
                if t.dim() == 1:
                    size *= t.shape[0]
                elif t.dim() in (2, 3) and t.shape[-1] == t.shape[-2]:
                    size *= t.shape[:-1].numel()
                else:
                    return False
            if size != p.numel():
                return False
        return True

    def mvp(self, params, curvs, vs):
        # every factor form (dense, 1-D diagonal, [B, m, m] block): a plain ``G @ V @ A`` here
        # broadcast a diagonal factor into a wrong product (Embedding) and failed on block forms
        return [kron_matvec(_terms(c), _as_matrix(p, v)).reshape(p.shape) for p, c, v in zip(params, curvs, vs)]


class KFACKind(KroneckerKind):
    """``kfac``: ``C_p = kron(G, A)`` (Martens & Grosse 2015)."""

    name = "kfac"
    savefield = "kfac"
    distributed = True

    def extensions(self, group):
        return [KFAC(group["fisher_type"], group["mc_samples"], group["kfac_approx"])]


RANK = HyperParameter(
    "rank", "int or None", None, "Kronecker terms of `kpsvd` (default 1), `deflation` and `lanczos` (default 2)",
    Rule(lambda v, g: v is None or (isinstance(v, int) and not isinstance(v, bool) and _reads_rank(g.get("curvature"))),
         "None, or 1 or 2 for the KPSVD curvatures",
         "{name}={value!r}: rank applies to the KPSVD curvatures only (kpsvd, deflation, lanczos), as an int; "
         "leave it None for the group's curvature."),
)


def _reads_rank(name: Optional[str]) -> bool:
    """Whether curvature ``name`` reads ``rank`` (a kind of :data:`CURVATURES` with the option)."""
    kind = CURVATURES.get(name) if isinstance(name, str) else None
    return kind is not None and RANK in kind.options


class KPSVDKind(KroneckerKind):
    """``kpsvd`` / ``deflation`` / ``lanczos``: ``C_p = sum_i kron(G_i, A_i)``, the best
    rank-``rank`` Kronecker approximation of the exact block (Koroko et al. 2022); each capture
    starts from the previous left factors (warm start, kept in ``state[p]["kpsvd_warm"]``)."""

    savefield = "kpsvd"
    options = (RANK,)

    def __init__(self, name: str, method: str, rank: int):
        self.name, self.method, self.default_rank = name, method, rank

    def rank(self, group) -> int:
        r = group.get("rank")
        return self.default_rank if r is None else int(r)

    def validate(self, group, where):
        r = self.rank(group)
        if not 1 <= r <= 2:
            raise ValueError(
                f"{where}: curvature={self.name!r} with rank={r}: the Kronecker inverse handles one or two "
                "terms; use rank=1 or rank=2."
            )

    def extensions(self, group):
        return [KPSVD(group["fisher_type"], group["mc_samples"], rank=self.rank(group), method=self.method)]

    def before_capture(self, p, state, extensions):
        for ext in map(unwrap, extensions):
            if isinstance(ext, KPSVD):
                ext.set_warm_factors(p, state.get("kpsvd_warm"))

    def after_read(self, p, extensions):
        out = {}
        for ext in map(unwrap, extensions):
            if isinstance(ext, KPSVD) and ext.warm_factors(p) is not None:
                out["kpsvd_warm"] = ext.warm_factors(p)
        return out


class KFACCorrectedKind(KroneckerKind):
    """``kfac-corrected``: ``C_p = kron(G, A) + kron(S, R)`` (Koroko et al. 2022)."""

    name = "kfac-corrected"
    savefield = "kfac_corrected"

    def extensions(self, group):
        return [KFACCorrected(group["fisher_type"], group["mc_samples"], group["kfac_approx"])]


TWO_LEVEL_OPTIONS = (
    HyperParameter("coarse_space", "str", "nicolaides", "two-level: the coarse space", one_of(*COARSE_SPACES)),
    HyperParameter("krylov", "bool", False,
                   "two-level: add a Krylov vector per layer (`P_l z_l`, the one-level inverse applied to the first)"),
    HyperParameter("coarse_damping", "float", 0.0, "two-level: added to the coarse matrix", number(0, finite=True)),
    HyperParameter(
        "coarse_form", "str", "additive",
        "two-level: `\"additive\"` (`d1 + R0^T A0^-1 R0 g`, the paper's) or `\"multiplicative\"` "
        "(`d1 + R0^T A0^-1 R0 (g - (F + λI) d1)`)",
        one_of(*COARSE_FORMS),
    ),
)


class TwoLevelKind(KFACKind):
    """``two-level``: KFAC plus a coarse correction with the exact whole-network curvature
    products of the capture step (Tselepidis, Kohler & Orvieto 2020; Koroko et al. 2023):
    ``coarse_space``, ``krylov``, ``coarse_damping`` and ``coarse_form`` (``"additive"``, the
    paper's, or ``"multiplicative"``) as in :func:`~curvlib.solvers.two_level_direction`, with
    the group's damping ``λ`` in the coarse matrix ``R0 (F + λ I) R0^T`` and ``F`` the GGNMP
    operator of the same ``fisher_type`` (and MC samples) as the KFAC factors.

    The coarse correction needs the operator of the current batch, which exists only on
    curvature-update steps; steps in between take the one-level KFAC direction.
    """

    name = "two-level"
    separable = False  # the coarse correction couples the layers
    distributed = False  # the coarse operator is the whole network's on the local batch
    options = TWO_LEVEL_OPTIONS

    def extensions(self, group):
        tps = group["coarse_space"] == "tpselepedis"
        kfac = KFAC(group["fisher_type"], group["mc_samples"], group["kfac_approx"], cross_layer=tps)
        return [kfac, GGNMP(group["fisher_type"], group["mc_samples"])]

    def extras(self, group, extensions):
        exts = [unwrap(e) for e in extensions]
        ggn = [e for e in exts if isinstance(e, GGNMP)]
        if not ggn:
            raise RuntimeError(
                "curvlib.optim: two-level needs the whole-network GGN operator of the capture step; "
                "run the backward inside `with opt.capture():`."
            )
        extras: Dict[str, Any] = {"operator": ggn[0].operator()}
        if group["coarse_space"] == "tpselepedis":
            kf = [e for e in exts if isinstance(e, KFAC) and e.cross is not None]
            if not kf:
                raise RuntimeError("curvlib.optim: two-level 'tpselepedis' needs KFAC(cross_layer=True) in the capture.")
            extras["cross"] = kf[0].cross
        return extras

    def inverse(self, params, curvs, damping, damping_mode, group):
        one_level = super().inverse(params, curvs, damping, damping_mode, group)
        space, krylov = group["coarse_space"], bool(group["krylov"])
        # the optimizer may rebuild a failed inverse from float64 copies of the curvature and call
        # this solve with float64 gradients: the coarse problem stays in the parameters' dtype
        # (that of the captured operator), the one-level inverse in its factors' dtype
        dtypes = [tree_leaves(c)[0].dtype for c in curvs]

        def precond(gs):
            return [d.to(g.dtype) for d, g in zip(one_level([g.to(t) for g, t in zip(gs, dtypes)]), gs)]

        def fn(grads, extras):
            op = extras.get("operator")
            if op is None:
                return one_level(grads)
            index = {id(q): i for i, q in enumerate(op.params)}
            missing = [tuple(p.shape) for p in params if id(p) not in index]
            if missing:
                raise RuntimeError(
                    f"curvlib.optim: two-level: parameters of shapes {missing} are not in the whole-network "
                    "operator; put only parameters of extended layers in a two-level group."
                )
            pos = [index[id(p)] for p in params]

            def fisher_mvp(xs):  # the group's block of the whole-network operator, batched
                B = xs[0].shape[0]
                full = [torch.zeros(B, *q.shape, dtype=q.dtype, device=xs[0].device) for q in op.params]
                for i, x in zip(pos, xs):
                    full[i] = x.to(full[i].dtype)
                out = op.matmat(full)
                return [out[i].to(x.dtype) for i, x in zip(pos, xs)]  # float16 operator: back to float32

            cross = None
            if space == "tpselepedis":
                ck = extras["cross"]
                cindex = {id(q): i for i, q in enumerate(ck.params)}
                nested = ck.nested()
                cpos = [cindex[id(p)] for p in params]
                cross = [[nested[i][j] for j in cpos] for i in cpos]
            d, _ = two_level_direction(
                [g.to(working_dtype(p.dtype)) for g, p in zip(grads, params)], precond, fisher_mvp, damping,
                coarse_space=space, krylov=krylov, factors=list(curvs), cross_factors=cross,
                coarse_damping=group["coarse_damping"], batched=True, form=group.get("coarse_form", "additive"),
            )
            return d

        return Solve(fn)


# ---------------------------------------------------------------- diagonal and exact


class DiagKind(CurvatureKind):
    """``diag``: ``C_p = diag(F_p)`` of the chosen fisher_type; ``(d + λ)^-1 g``."""

    name = "diag"
    savefield = "diag_ggn"
    separable = True
    distributed = True
    symmetric = False  # a diagonal shaped like its parameter: no factor to send as a triangle

    def extensions(self, group):
        return [DiagGGN(group["fisher_type"], group["mc_samples"])]

    def inverse(self, params, curvs, damping, damping_mode, group):
        bad = [tuple(p.shape) for p, d in zip(params, curvs) if bool((d + damping <= 0).any())]
        if bad:
            raise ValueError(f"non-SPD curvature: diagonal + damping has a non-positive entry (shapes {bad}).")
        return self.solve_from_parts(params, [1.0 / (d + damping) for d in curvs])

    def solve_from_parts(self, params, parts):
        return Solve(lambda grads, extras: [g * w for g, w in zip(grads, parts)], parts)

    def mvp(self, params, curvs, vs):
        return [d * v for d, v in zip(curvs, vs)]

    def fits(self, p, value):
        return isinstance(value, Tensor) and value.shape == p.shape


class ExactNGKind(CurvatureKind):
    """``exact-ng`` (whole group) / ``exact-ng-blocks`` (per parameter): the exact damped
    natural gradient ``(F + λ I)^-1 g`` by Woodbury on the per-sample gradient factors
    (``F = U^T U``, Ren & Goldfarb 2019)."""

    ema = False
    savefield = "grad_factors"

    def __init__(self, name: str, blocks: bool):
        self.name, self.blocks = name, blocks

    def validate(self, group, where):
        if group["damping"] <= 0:
            raise ValueError(f"{where}: curvature={self.name!r} needs damping > 0 (Woodbury identity).")

    def extensions(self, group):
        return [GradFactors(group["fisher_type"], group["mc_samples"], reuse_buffers=False)]

    def mix(self, old, new, decay):
        return new

    def inverse(self, params, curvs, damping, damping_mode, group):
        if damping <= 0:
            raise ValueError(f"curvlib.optim: curvature={self.name!r} needs damping > 0 (Woodbury), got {damping}.")
        Us = [U.reshape(U.shape[0], -1) for U in curvs]
        m = Us[0].shape[0]
        # woodbury convention F = U^T U / m
        Us = [U * math.sqrt(m) for U in Us]
        if self.blocks:
            return Solve(lambda grads, extras: woodbury_solve_blocks(Us, list(grads), damping))
        U = torch.cat(Us, dim=1)
        sizes = [p.numel() for p in params]

        def fn(grads, extras):
            g = torch.cat([t.reshape(-1) for t in grads])
            d = woodbury_solve(U, g, damping)
            return [t.reshape(p.shape) for t, p in zip(d.split(sizes), params)]

        return Solve(fn)

    def fits(self, p, value):
        """Per-sample factors ``[N, *p.shape]``."""
        return isinstance(value, Tensor) and value.shape[1:] == p.shape

    def mvp(self, params, curvs, vs):
        Us = [U.reshape(U.shape[0], -1) for U in curvs]
        if self.blocks:
            return [(U.T @ (U @ v.reshape(-1))).reshape(v.shape) for U, v in zip(Us, vs)]
        c = sum(U @ v.reshape(-1) for U, v in zip(Us, vs))
        return [(U.T @ c).reshape(v.shape) for U, v in zip(Us, vs)]


# the kinds stepping in KFAC's eigenbasis subclass KFACKind (imported here, after it is defined)
from curvlib.optim.eigenbasis import EigenAdamKind, EKFACKind  # noqa: E402

#: the kinds of :class:`~curvlib.optim.NaturalGradient` (and Preconditioner, NoisyNaturalGradient)
CURVATURES: Dict[str, CurvatureKind] = {k.name: k for k in (
    KFACKind(),
    KPSVDKind("kpsvd", "power", 1),
    KPSVDKind("deflation", "deflation", 2),
    KPSVDKind("lanczos", "lanczos", 2),
    KFACCorrectedKind(),
    TwoLevelKind(),
    DiagKind(),
    ExactNGKind("exact-ng", blocks=False),
    ExactNGKind("exact-ng-blocks", blocks=True),
    EKFACKind(),
    EigenAdamKind(),
)}


def kind_for(name: Optional[str], kinds: Mapping[str, CurvatureKind] = CURVATURES) -> Optional[CurvatureKind]:
    """The :class:`CurvatureKind` called ``name`` in ``kinds`` (``None``: no curvature, the
    plain momentum-SGD step)."""
    if name is None:
        return None
    if name not in kinds:
        raise ValueError(f"curvlib.optim: unknown curvature {name!r}; use one of {sorted(kinds)}.")
    return kinds[name]


def options_of(kinds: Mapping[str, CurvatureKind]) -> Tuple[HyperParameter, ...]:
    """The options the ``kinds`` declare (each once, in order): rows of the optimizer's table."""
    out: Dict[str, HyperParameter] = {}
    for kind in kinds.values():
        for hp in kind.options:
            out.setdefault(hp.name, hp)
    return tuple(out.values())


__all__ = [
    "CurvatureKind", "CURVATURES", "kind_for", "options_of", "unwrap", "Solve", "tree_map", "tree_leaves",
]
