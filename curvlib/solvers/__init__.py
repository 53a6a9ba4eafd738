"""Operator-agnostic solvers: tensors, lists of tensors and callables in, tensors out.

Nothing here imports the engine, the extensions or ``torch.nn``.
"""
from .cg import CGBlockError, CGInfo, cg, cg_blocks
from .kronecker import kron_matvec
from .kronecker_inverse import KroneckerInverse
from .kronecker_svd import kronecker_svd, kronecker_svd_gram
from .lanczos import golub_kahan, lanczos
from .power import power_iteration_deflation
from .scipy_bridge import from_scipy, to_scipy
from .structure import flatten_list, unflatten
from .two_level import CoarseBasis, coarse_basis, coarse_operator, kronecker_fisher_mvp, two_level_direction
from .woodbury import heuristic_block_damping, woodbury_solve, woodbury_solve_blocks

__all__ = [
    "KroneckerInverse",
    "kron_matvec",
    "kronecker_svd",
    "kronecker_svd_gram",
    "cg",
    "cg_blocks",
    "CGInfo",
    "CGBlockError",
    "lanczos",
    "golub_kahan",
    "power_iteration_deflation",
    "woodbury_solve",
    "woodbury_solve_blocks",
    "heuristic_block_damping",
    "two_level_direction",
    "coarse_basis",
    "coarse_operator",
    "CoarseBasis",
    "kronecker_fisher_mvp",
    "to_scipy",
    "from_scipy",
    "flatten_list",
    "unflatten",
]
