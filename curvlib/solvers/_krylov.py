r"""Set-up, breakdown handling and thick restarts shared by :func:`~curvlib.solvers.lanczos`
and :func:`~curvlib.solvers.golub_kahan`.

Both build orthonormal Krylov bases with full reorthogonalization. A new basis vector whose
norm after orthogonalization is below ``100 eps ||A||`` (``||A||`` estimated by the largest
``||A v_j||`` seen) is a *breakdown*: the basis spans an invariant subspace and the Ritz values
found so far are exact. The process then continues with a random vector orthogonal to the
basis (the rest of the spectrum may hold wanted values that the start vector missed). If that
random vector breaks down at once, the operator is a multiple of the identity on the whole
complement of the basis (a random vector is an eigenvector only then), so the spectrum is
known: the iteration is *exhausted* and the current Ritz values are final. Without that rule
``c I + low rank`` operators (a damped GGN of a small batch) break down at every step and run
their whole product budget.

Thick restart (Wu & Simon 2000; Baglama & Reichel 2005): keep the ``p`` best Ritz vectors and
the last basis vector, ``p = min(max(k + (ncv - k) // 2, k), ncv - 1)``.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._linalg import check_finite, default_tol, make_generator, orthogonalize, random_orthogonal_vector
from .structure import Structure, TensorOrList

__all__ = ["KrylovProcess"]


class KrylovProcess:
    """State shared by one Lanczos / Golub–Kahan run.

    Attributes:
        structure: layout of ``v0``; ``v`` the unit start vector ``[n]`` (float dtype of ``v0``).
        n, dtype, device, eps, generator (for random continuation vectors).
        ncv, maxiter, tol: set by :meth:`sizes`.
        anorm: largest operator output norm seen (the scale of breakdowns).
        products: operator products counted with :meth:`record`.
    """

    def __init__(self, name: str, v0: TensorOrList, seed: int):
        self.name = name
        self.structure = Structure.of(v0, "v0")
        v = self.structure.flatten(v0, "v0")
        if not v.is_floating_point():
            v = v.to(torch.get_default_dtype())
        check_finite(v, f"{name}: starting vector v0")
        norm = float(torch.linalg.vector_norm(v))
        if norm == 0:
            raise ValueError(f"{name}: the starting vector v0 is zero; pass a nonzero (e.g. random) v0.")
        self.v = v / norm
        self.n = v.numel()
        self.dtype, self.device = v.dtype, v.device
        self.eps = torch.finfo(v.dtype).eps
        self.generator = make_generator(v, seed)
        self.anorm = 0.0
        self.products = 0
        self.after_random = False  # the newest basis vector is a random continuation

    def sizes(
        self, k: int, dim: int, dim_text: str, ncv: Optional[int], maxiter: Optional[int], tol: Optional[float]
    ) -> None:
        """Validate ``1 <= k <= dim`` and set the defaults ``ncv = min(dim, max(2k + 1, 20))``,
        ``maxiter = max(10 dim, 100)``, ``tol`` 1e-10 (float64) / 1e-4 (float32)."""
        if not 1 <= k <= dim:
            raise ValueError(f"{self.name}: k must satisfy 1 <= k <= {dim_text} = {dim}, got k={k}.")
        self.ncv = min(dim, max(2 * k + 1, 20)) if ncv is None else min(int(ncv), dim)
        if self.ncv < min(dim, k + 1):
            raise ValueError(f"{self.name}: ncv={self.ncv} must be > k={k} (or equal {dim_text}).")
        self.maxiter = max(10 * dim, 100) if maxiter is None else int(maxiter)
        self.tol = default_tol(self.dtype, 1e-10, 1e-4) if tol is None else float(tol)
        self.k = k

    def record(self, w: Tensor, what: str, fix: str, count: bool = True) -> None:
        """Check an operator output for NaN/Inf, update ``anorm`` and (``count``) the product count."""
        check_finite(w, f"{self.name}: {what}", fix)
        self.anorm = max(self.anorm, float(torch.linalg.vector_norm(w)))
        self.products += int(count)

    def broke(self, beta: float) -> bool:
        """Is ``beta`` (a new vector's norm after orthogonalization) zero at the operator's scale?"""
        return beta <= 100 * self.eps * max(self.anorm, 1e-300)

    def extend(self, w: Tensor, Q: Tensor, track: bool = True) -> Tuple[Tensor, float, Optional[Tensor], bool, bool]:
        """Orthogonalize ``w`` against the orthonormal columns ``Q [dim, j]`` and make the next
        basis vector.

        Returns ``(h, beta, q, broke, exhausted)``: coefficients ``Q^T w`` [j], ``beta`` (0 on a
        breakdown), the next unit vector ``q`` (``w / beta``; on a breakdown a random unit vector
        orthogonal to ``Q``, or None when ``Q`` already spans the whole space), ``broke`` and
        ``exhausted`` (a breakdown right after a random continuation; see the module docstring).
        ``track=False`` (Golub–Kahan's left vectors) neither sets nor reads the continuation flag.
        """
        w, h, beta = orthogonalize(w, Q)
        broke = self.broke(beta)
        exhausted = broke and self.after_random and track
        if track:
            self.after_random = False
        if not broke:
            return h, beta, w / beta, False, False
        dim = Q.shape[0]
        q = None
        if Q.shape[1] < dim:
            q = random_orthogonal_vector(Q, dim, self.generator, self.v)
            if track:
                self.after_random = True
        return h, 0.0, q, True, exhausted

    def restart_size(self) -> int:
        """Number ``p`` of Ritz vectors a thick restart keeps."""
        return min(max(self.k + (self.ncv - self.k) // 2, self.k), self.ncv - 1)

    @staticmethod
    def restart_basis(V: Tensor, m: int, C: Tensor) -> int:
        """Thick restart in place: ``V[:, :p] = V[:, :m] C`` (``C [m, p]`` orthonormal Ritz
        coefficients), ``V[:, p] = V[:, m]`` (the residual / continuation vector). Returns ``p``."""
        p = C.shape[1]
        V[:, :p] = V[:, :m] @ C
        V[:, p] = V[:, m]
        return p

    def out_of_budget(self) -> bool:
        return self.products >= self.maxiter

    def warn_budget(self, what: str) -> None:
        warnings.warn(
            f"{self.name}: {self.k} {what} did not converge to tol={self.tol:g} within maxiter={self.maxiter} "
            "operator products; returning the current approximations (increase maxiter or ncv).",
            RuntimeWarning,
            stacklevel=3,
        )
