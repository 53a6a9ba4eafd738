"""Curvature extensions: pure functions of the captures, stored as ``param.<savefield>``.

| extension | savefield | quantity |
|---|---|---|
| :class:`KFAC` | ``kfac`` | ``[G, A]`` Kronecker factors (``[G]`` for a bias) |
| :class:`EKFAC` | ``ekfac`` | ``[[Q0, Q1], S]``: KFAC's eigenbasis, eigenvalues from per-sample gradients |
| :class:`KPSVD` | ``kpsvd`` | best rank-r Kronecker approximation of the exact block |
| :class:`KFACCorrected` | ``kfac_corrected`` | KFAC term + best Kronecker fit of the residual |
| :class:`GGNMP` | ``ggnmp`` | block curvature products; ``ext.operator()`` for the whole network |
| :class:`HMP` | ``hmp`` | exact Hessian block products; ``ext.operator()`` for the whole network |
| :class:`PCHMP` | ``pchmp`` | positive-curvature Hessian block products (BDA-PCH) |
| :class:`ExactBlockFisher` | ``block_fisher`` | dense curvature block |
| :class:`GradFactors` | ``grad_factors`` | per-sample (per-class) gradient factors, ``F = U^T U`` |
| :class:`BatchGrad` | ``grad_batch`` | per-sample gradients (BackPACK scaling) |
| :class:`DiagGGN` | ``diag_ggn`` | diagonal of the curvature |
| :class:`CrossKFAC` | (``ext.cross_factors``) | cross-layer factors ``G_ij``, ``A_ij`` |
| :class:`SubBatch` | (the wrapped one's) | any of the above on a random fraction of the batch |
"""
from curvlib.extensions.base import Extension
from curvlib.extensions.batch_grad import BatchGrad
from curvlib.extensions.block_fisher import ExactBlockFisher, GradFactors, grad_factor_blocks, stack_grad_factors
from curvlib.extensions.cross_kfac import CrossKFAC
from curvlib.extensions.diag_ggn import DiagGGN
from curvlib.extensions.ekfac import EKFAC, kfac_eigenbasis
from curvlib.extensions.ggnmp import GGNMP
from curvlib.extensions.hmp import HMP
from curvlib.extensions.kfac import KFAC
from curvlib.extensions.kfac_corrected import KFACCorrected
from curvlib.extensions.kpsvd import KPSVD
from curvlib.extensions.pchmp import PCHMP
from curvlib.extensions.operator import GGNOperator, ParameterOperator
from curvlib.extensions.sub_batch import SubBatch

__all__ = [
    "Extension",
    "KFAC",
    "EKFAC",
    "kfac_eigenbasis",
    "KPSVD",
    "KFACCorrected",
    "GGNMP",
    "HMP",
    "PCHMP",
    "ExactBlockFisher",
    "GradFactors",
    "grad_factor_blocks",
    "stack_grad_factors",
    "BatchGrad",
    "DiagGGN",
    "CrossKFAC",
    "ParameterOperator",
    "GGNOperator",
    "SubBatch",
]
