r"""The curvature kinds of :class:`~curvlib.optim.CGNewton`: exact curvature blocks applied
matrix-free by their extension's product, and the CG systems built from them.

| name | product (savefield) | data-parallel | paper |
|---|---|---|---|
| ``ggn`` | :class:`~curvlib.extensions.GGNMP` (``p.ggnmp``) of ``fisher_type`` | yes | Schraudolph 2002, Martens 2010 |
| ``hessian`` | :class:`~curvlib.extensions.HMP` (``p.hmp``) | yes | |
| ``pch-abs`` / ``pch-clip`` | :class:`~curvlib.extensions.PCHMP` (``p.pchmp``), blocks only | no | Chen et al. 2019 |
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import Tensor

from curvlib.extensions import GGNMP, HMP, KFAC
from curvlib.extensions.base import Extension
from curvlib.extensions.pchmp import PCHMP
from curvlib.optim.curvatures import CurvatureKind
from curvlib.optim.tensors import upcast, working_dtype
from curvlib.solvers import KroneckerInverse


class ProductKind(CurvatureKind):
    """The exact curvature blocks of :class:`~curvlib.optim.CGNewton`, applied matrix-free by
    their extension's product (``p.<savefield>``, or ``ext.operator()`` for the whole network),
    with ``precondition="kfac"``: the KFAC factors of the same batch."""

    ema = False

    def product(self, group) -> Extension:
        raise NotImplementedError

    def kfac_fisher_type(self, group) -> str:
        """The fisher_type of the KFAC factors of ``precondition="kfac"``."""
        return "type-2"

    def extensions(self, group):
        exts = [self.product(group)]
        if group["precondition"] == "kfac":
            exts.append(KFAC(fisher_type=self.kfac_fisher_type(group)))
        return exts

    def averaged_fields(self, group):
        # the products are averaged in each CG iteration (one all-reduce per product)
        return ("kfac",) if group["precondition"] == "kfac" else ()

    def validate(self, group, where):
        if group["fisher_type"] != "type-2":
            raise ValueError(f"{where}: fisher_type applies to curvature='ggn' only; leave it at 'type-2'.")


class GGNKind(ProductKind):
    """``ggn``: the GGN / Fisher of ``fisher_type`` (Schraudolph 2002, Martens 2010)."""

    name = "ggn"
    savefield = "ggnmp"
    distributed = True

    def product(self, group):
        return GGNMP(fisher_type=group["fisher_type"])

    def kfac_fisher_type(self, group):
        return group["fisher_type"]

    def validate(self, group, where):
        pass  # every fisher_type


class HessianKind(ProductKind):
    """``hessian``: the exact Hessian blocks."""

    name = "hessian"
    savefield = "hmp"
    distributed = True

    def product(self, group):
        return HMP()


class PCHKind(ProductKind):
    """``pch-abs`` / ``pch-clip``: the positive-curvature Hessian (Chen et al. 2019, "BDA-PCH")."""

    savefield = "pchmp"
    not_distributed = "the positive-curvature Hessian modifies each batch's blocks (not linear in the batch)"

    def __init__(self, modify: str):
        self.name, self.modify = f"pch-{modify}", modify

    def product(self, group):
        return PCHMP(modify=self.modify, convention=group["pch_convention"])

    def validate(self, group, where):
        super().validate(group, where)
        if not group["block_diagonal"]:
            raise ValueError(
                f"{where}: the positive-curvature Hessian is defined block by block (Chen et al.; BackPACK's "
                "PCHMP); use block_diagonal=True, or curvature='ggn' for a whole-network system."
            )


#: the kinds of :class:`~curvlib.optim.CGNewton`
CG_CURVATURES: Dict[str, CurvatureKind] = {k.name: k for k in (GGNKind(), HessianKind(), PCHKind("abs"), PCHKind("clip"))}


def restricted(op, params: List[Tensor]) -> Callable:
    """The whole-network operator's block over ``params`` (a subset of ``op.params``, zero elsewhere)."""
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


def kfac_inverse(p: Tensor, lam: float) -> Callable:
    """``(kron(G, A) + λ I)^-1`` of ``p.kfac`` (exact damping; the identity without KFAC factors):
    the preconditioner of ``precondition="kfac"``."""
    factors = p.__dict__.get("kfac")
    if factors is None:
        return lambda v: v
    # float16 / bfloat16 parameters: factors inverted in float32, the direction cast back
    P = KroneckerInverse(upcast(list(factors)), lam if lam > 0 else 1e-8, damping_mode="exact")
    wd = working_dtype(p.dtype)
    if p.ndim > 1:
        return lambda v: P(v.reshape(p.shape[0], -1).to(wd)).reshape(p.shape).to(v.dtype)
    return lambda v: P(v.to(wd)).to(v.dtype)


__all__ = ["ProductKind", "GGNKind", "HessianKind", "PCHKind", "CG_CURVATURES", "restricted", "kfac_inverse"]
