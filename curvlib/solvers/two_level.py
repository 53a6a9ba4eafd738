r"""Two-level (coarse-corrected) KFAC directions.

Target system ``Â d = g`` with ``Â = F + λ I`` (``F`` the whole-network Fisher/GGN, cross-layer
blocks included). Given the one-level direction ``d1 = P g`` (``P``: per-layer, block-diagonal,
e.g. the KFAC inverses) and a coarse basis ``Z = R0^T`` (``c`` columns, each supported on one
layer), with the coarse matrix ``A0 = R0 Â R0^T + μ I`` (``μ = coarse_damping``, default 0):

* ``form="additive"`` (default; Tselepidis, Kohler & Orvieto 2020, eq. of the two-level
  preconditioner, and the ``TwolevelKFAC`` optimizer released with Koroko et al. 2023):

      d = d1 + R0^T A0^-1 R0 g,      i.e.  P_2L = P + R0^T (R0 Â R0^T)^-1 R0.

  The correction is the exact solution of ``Â`` restricted to the coarse space, added to the
  one-level step; its size is bounded by the gradient (``||A0^-1|| <= 1/λ`` on an orthonormal
  basis).
* ``form="multiplicative"`` (fine-then-coarse; the "balanced"/deflated-residual variant):

      r = g - Â d1,      d = d1 + R0^T A0^-1 R0 r.

  With the exact ``A0`` (μ = 0) the coarse step is the ``Â``-orthogonal projection of the
  one-level error onto ``span(Z)``, so ``||Â^-1 g - d||_Â <= ||Â^-1 g - d1||_Â`` for every coarse
  space: the best direction *for this batch's quadratic model*. In training it is fragile:
  when the one-level inverse is stale or its curvature too small (``Â d1 >> g``, e.g. with
  ``T_inv > 1`` early in training), ``r`` is large and the correction makes large moves along
  the coarse directions. On the demo CNN at KFAC's step size (lr 0.1, momentum 0.9) it diverged
  within one epoch (nicolaides, residual), while the additive form trains like KFAC
  (``examples/README.md``, two-level section).

Coarse spaces (Koroko et al. 2023, "Analysis and comparison of two-level KFAC methods for
training deep neural networks"; one vector per layer, normalized; a basis is invariant to the
scaling of its vectors, so the paper's max-norm scaling and the unit 2-norm used here give the
same direction):

* ``"nicolaides"``: the constant vector ``1 / sqrt(n_l)`` on each layer.
* ``"residual"``: the layer blocks of the preconditioned one-level residual ``P r``,
  ``r = g - Â d1`` (``P r`` approximates the one-level error ``Â^-1 g - d1 = Â^-1 r``; layers
  with ``(P r)_l = 0`` get no column). Costs one more Fisher product (for ``r``).
* ``"spectral"``: ``q_G ⊗ q_A`` per layer (factors ``[G, A]``; ``q_G`` for ``[G]``), eigenvectors
  of the *smallest* eigenvalues by default: the direction the one-level preconditioner
  ``(G ⊗ A + λ I)^-1`` amplifies most. ``spectral_end="largest"`` is available.
* ``"tpselepedis"``: Nicolaides vectors, but ``R0 F R0^T`` is built from cross-layer Kronecker
  factors ``F_ij ≈ G_ij ⊗ A_ij`` (``G_ij = E[g_i g_j^T]``, ``A_ij = E[a_i a_j^T]``) instead of
  Fisher products: ``(R0 F R0^T)_ab = <Z_a, G_ij Z_b A_ij^T>`` (Tselepidis et al. 2020). That
  matrix can be indefinite; an indefinite ``A0`` raises (use ``coarse_damping``).

``krylov=True`` adds a second vector per layer, ``P_l z_l`` (the one-level preconditioner
applied to the first one: the 2-dimensional Krylov space ``span{z_l, P_l z_l}``, as in the
paper's code), Gram–Schmidt-orthonormalized against ``z_l``. For ``"spectral"``, ``z_l`` is an
eigenvector of ``P_l`` (KFAC's inverse of the same factors), so no vector is added (the paper
refuses the combination).

Layers: every parameter tensor (weight, bias) is its own block here (the paper's code joins a
layer's weight and bias into one block), so a Linear layer with a bias has two coarse vectors.

Cross factors are given as a nested list ``cross_factors[i][j] = [G_ij, A_ij]`` (``G_ij``
[out_i, out_j], ``A_ij`` [in_i, in_j]; ``[G_ij]`` when both layers are biases, with in = 1;
entries below the diagonal may be ``None`` and are taken as ``[G_ji^T, A_ji^T]``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._linalg import check_damping, check_finite, safe_eigh
from .structure import Structure, TensorOrList

__all__ = ["COARSE_FORMS", "COARSE_SPACES", "CoarseBasis", "coarse_basis", "coarse_operator", "two_level_direction", "kronecker_fisher_mvp"]

COARSE_SPACES = ("nicolaides", "residual", "spectral", "tpselepedis")
COARSE_FORMS = ("additive", "multiplicative")
FisherMVP = Callable[[List[Tensor]], List[Tensor]]


@dataclass
class CoarseBasis:
    """Coarse basis ``Z = R0^T``: column ``c`` is ``vectors[c]`` (shaped like layer ``layers[c]``)
    on layer ``layers[c]`` and zero elsewhere. ``fisher_products[c]`` caches ``F z_c`` (full list)."""

    shapes: List[torch.Size]
    layers: List[int]
    vectors: List[Tensor]
    fisher_products: List[Optional[List[Tensor]]] = field(default_factory=list)

    def __post_init__(self):
        if len(self.fisher_products) != len(self.vectors):
            self.fisher_products = [None] * len(self.vectors)

    def __len__(self) -> int:
        return len(self.vectors)

    def column(self, c: int) -> List[Tensor]:
        """Column ``c`` as a full parameter-shaped list."""
        z = self.vectors[c]
        return [z if l == self.layers[c] else torch.zeros(s, dtype=z.dtype, device=z.device) for l, s in enumerate(self.shapes)]

    def restrict(self, xs: Sequence[Tensor]) -> Tensor:
        """``R0 x`` [c] for a parameter-shaped list ``x``."""
        return torch.stack([(z * xs[l]).sum() for l, z in zip(self.layers, self.vectors)])

    def prolong(self, y: Tensor) -> List[Tensor]:
        """``R0^T y`` as a parameter-shaped list, ``y`` [c]."""
        ref = self.vectors[0]
        out = [torch.zeros(s, dtype=ref.dtype, device=ref.device) for s in self.shapes]
        for c, (l, z) in enumerate(zip(self.layers, self.vectors)):
            out[l] = out[l] + y[c] * z
        return out

    def gram(self) -> Tensor:
        """``R0 R0^T`` [c, c] (identity for the orthonormal bases built here)."""
        Z = self.dense()
        return Z @ Z.T

    def dense(self) -> Tensor:
        """``R0`` [c, n] in the flatten order of the parameter list (tests / small problems)."""
        return torch.stack([torch.cat([t.reshape(-1) for t in self.column(c)]) for c in range(len(self))])


# ---------------------------------------------------------------------- helpers
def _normalize(v: Tensor) -> Optional[Tensor]:
    nrm = float(torch.linalg.vector_norm(v))
    return None if nrm == 0.0 else v / nrm


def _cross(cross_factors, i: int, j: int) -> Tuple[Tensor, Optional[Tensor]]:
    entry = cross_factors[i][j]
    transpose = False
    if entry is None:
        entry, transpose = cross_factors[j][i], True
    if entry is None:
        raise ValueError(f"cross_factors[{i}][{j}] and [{j}][{i}] are both missing; pass [G_ij, A_ij] for every layer pair.")
    G = entry[0].T if transpose else entry[0]
    A = None
    if len(entry) > 1 and entry[1] is not None:
        A = entry[1].T if transpose else entry[1]
    return G, A


def _factor_block_apply(cross_factors, i: int, j: int, Zj: Tensor, shape_i: torch.Size) -> Tensor:
    """``(G_ij ⊗ A_ij) vec(Z_j)`` reshaped like layer ``i``: ``G_ij Z_j A_ij^T``."""
    G, A = _cross(cross_factors, i, j)
    Zm = Zj.reshape(G.shape[1], -1)
    Y = G @ Zm
    if A is not None:
        Y = Y @ A.T
    return Y.reshape(shape_i)


def kronecker_fisher_mvp(cross_factors, shapes: Sequence[torch.Size]) -> FisherMVP:
    """The whole-network product with the cross-Kronecker approximation ``F_ij ≈ G_ij ⊗ A_ij``."""
    shapes = [torch.Size(s) for s in shapes]

    def mvp(xs: List[Tensor]) -> List[Tensor]:
        return [
            sum(_factor_block_apply(cross_factors, i, j, xs[j], shapes[i]) for j in range(len(shapes)))
            for i in range(len(shapes))
        ]

    return mvp


def _fisher_columns(basis: CoarseBasis, cols: Sequence[int], fisher_mvp: FisherMVP, batched: bool) -> None:
    """Fill ``basis.fisher_products[c]`` for ``c`` in ``cols`` (one batched call if ``batched``)."""
    cols = [c for c in cols if basis.fisher_products[c] is None]
    if not cols:
        return
    if batched:
        ref = basis.vectors[0]
        xs = []
        for l, s in enumerate(basis.shapes):
            X = torch.zeros((len(cols),) + tuple(s), dtype=ref.dtype, device=ref.device)
            for k, c in enumerate(cols):
                if basis.layers[c] == l:
                    X[k] = basis.vectors[c]
            xs.append(X)
        out = fisher_mvp(xs)
        for k, c in enumerate(cols):
            basis.fisher_products[c] = [o[k] for o in out]
    else:
        for c in cols:
            basis.fisher_products[c] = list(fisher_mvp(basis.column(c)))
    for c in cols:
        for l, t in enumerate(basis.fisher_products[c]):
            check_finite(t, f"two-level: Fisher product of coarse vector {c} (layer {l})", "fisher_mvp returned NaN/Inf")


def _first_vector(space: str, l: int, like: Tensor, pre_residual, factors, spectral_end: str) -> Optional[Tensor]:
    if space in ("nicolaides", "tpselepedis"):
        return torch.ones_like(like) / math.sqrt(like.numel())
    if space == "residual":
        return _normalize(pre_residual[l].to(like.dtype))
    # spectral
    f = factors[l]
    if f is None:
        raise ValueError(f"spectral coarse space: factors[{l}] is None; pass [G, A] (or [G]) for every layer.")
    f = [f] if isinstance(f, Tensor) else list(f)
    if not all(isinstance(F, Tensor) for F in f):
        raise ValueError(
            f"spectral coarse space: factors[{l}] is a sum of {len(f)} Kronecker terms (e.g. the KFAC of a "
            "parameter used by several layers), whose eigenvectors have no Kronecker form; use coarse_space="
            "'nicolaides' or 'residual' for it."
        )
    idx = 0 if spectral_end == "smallest" else -1
    qs = [_extreme_eigenvector(F, idx, f"factor {name} of layer {l}") for F, name in zip(f, "GA")]
    q = qs[0] if len(qs) == 1 else torch.outer(qs[0], qs[1]).reshape(-1)
    if q.numel() != like.numel():
        raise ValueError(
            f"spectral coarse space: layer {l} has {like.numel()} entries but its factors give {q.numel()}."
        )
    return q.reshape(like.shape).to(like.dtype)


def _extreme_eigenvector(F: Tensor, idx: int, name: str) -> Tensor:
    """The eigenvector of the smallest (``idx = 0``) or largest (``-1``) eigenvalue of a factor
    (a 1-D diagonal factor: the unit vector of its smallest / largest entry)."""
    if F.dim() == 1:
        return torch.nn.functional.one_hot(F.argmin() if idx == 0 else F.argmax(), F.numel()).to(F.dtype)
    return safe_eigh(F, name)[1][:, idx]


def _as_list_precond(precond, n: int) -> Callable[[List[Tensor]], List[Tensor]]:
    """A per-layer list ``[P_l]`` or one callable on lists -> one callable on lists."""
    if callable(precond) and not isinstance(precond, (list, tuple)):
        return lambda xs: list(precond(list(xs)))
    if len(precond) != n:
        raise ValueError(f"two-level: got {len(precond)} per-layer preconditioners for {n} layers.")
    return lambda xs: [P(t) for P, t in zip(precond, xs)]


# ---------------------------------------------------------------------- public building blocks
def coarse_basis(
    like: Sequence[Tensor],
    coarse_space: str = "nicolaides",
    *,
    residual: Optional[Sequence[Tensor]] = None,
    factors: Optional[Sequence] = None,
    krylov: bool = False,
    precond=None,
    spectral_end: str = "smallest",
) -> CoarseBasis:
    """Build the coarse basis ``Z = R0^T`` (see the module docstring for the spaces).

    Args:
        like: parameter-shaped list (shapes, dtype, device), e.g. the gradient.
        residual: the one-level residual ``r = g - (F + λI) d1`` (``"residual"``: the columns are
            the layer blocks of ``P r``).
        factors: per-layer ``[G, A]`` / ``[G]`` (``"spectral"``).
        krylov: add the second vector ``P_l z_l`` per layer.
        precond: the one-level preconditioner ``P`` (per-layer list ``[P_l]`` or one callable on
            lists); needed by ``"residual"`` and ``krylov``.
    """
    if coarse_space not in COARSE_SPACES:
        raise ValueError(f"coarse_space must be one of {COARSE_SPACES}, got {coarse_space!r}.")
    if spectral_end not in ("smallest", "largest"):
        raise ValueError(f"spectral_end must be 'smallest' or 'largest', got {spectral_end!r}.")
    like = list(like)
    shapes = [t.shape for t in like]
    if coarse_space == "residual" and residual is None:
        raise ValueError("coarse_space='residual' needs residual= (the one-level residual g - (F + λI) d1).")
    if coarse_space == "spectral" and (factors is None or len(factors) != len(like)):
        raise ValueError("coarse_space='spectral' needs factors= with one [G, A] (or [G]) per layer.")
    if (coarse_space == "residual" or krylov) and precond is None:
        raise ValueError(
            f"coarse_space={coarse_space!r} with krylov={krylov} needs precond= (the one-level preconditioner P)."
        )
    P = None if precond is None else _as_list_precond(precond, len(like))
    pre_residual = None
    if coarse_space == "residual":
        pre_residual = P([t.to(l.dtype) for t, l in zip(residual, like)])
        for l, t in enumerate(pre_residual):
            check_finite(t, f"two-level: preconditioned residual of layer {l}", "check the one-level preconditioner")
    layers, vectors = [], []
    for l, t in enumerate(like):
        z = _first_vector(coarse_space, l, t, pre_residual, factors, spectral_end)
        if z is not None:
            layers.append(l)
            vectors.append(z)
    if not vectors:
        raise ValueError(f"coarse space {coarse_space!r} is empty (all residual blocks are zero?).")
    if not krylov:
        return CoarseBasis(shapes, layers, vectors)
    first = [torch.zeros_like(t) for t in like]
    for l, z in zip(layers, vectors):
        first[l] = z
    second = P(first)  # block-diagonal: layer l of P(first) is P_l z_l
    # a vector parallel to z_l (spectral: z_l is an eigenvector of P_l) adds nothing; relative
    # to its own norm, with a tolerance above the round-off of P in the working precision
    tol = 10 * math.sqrt(torch.finfo(vectors[0].dtype).eps)
    new_layers, new_vectors = [], []
    for l, z1 in zip(layers, vectors):
        new_layers.append(l), new_vectors.append(z1)
        w0 = second[l].to(z1.dtype)
        check_finite(w0, f"two-level: Krylov vector of layer {l}", "check the one-level preconditioner")
        w = w0 - (w0 * z1).sum() * z1
        w = w - (w * z1).sum() * z1
        nrm = float(torch.linalg.vector_norm(w))
        if nrm > tol * float(torch.linalg.vector_norm(w0)):
            new_layers.append(l), new_vectors.append(w / nrm)
    return CoarseBasis(shapes, new_layers, new_vectors)


def coarse_operator(
    basis: CoarseBasis,
    damping: float,
    fisher_mvp: Optional[FisherMVP] = None,
    *,
    cross_factors=None,
    coarse_damping: float = 0.0,
    batched: bool = False,
) -> Tensor:
    """``A0 = R0 (F + λ I) R0^T + μ I`` [c, c].

    With ``fisher_mvp``: exact, from one Fisher product per coarse column (cached in ``basis``;
    one batched call if ``batched``). Without it and with ``cross_factors``: the Tselepidis
    approximation ``(R0 F R0^T)_ab = <Z_a, G_ij Z_b A_ij^T>`` (``i, j`` the layers of ``a, b``).
    """
    lam = check_damping(damping)
    mu = check_damping(coarse_damping, "coarse_damping")
    c = len(basis)
    ref = basis.vectors[0]
    if fisher_mvp is not None:
        _fisher_columns(basis, range(c), fisher_mvp, batched)
        FZd = torch.stack([torch.cat([t.reshape(-1) for t in fz]) for fz in basis.fisher_products])  # [c, n]
        FZ = basis.dense() @ FZd.T
    elif cross_factors is not None:
        FZ = torch.zeros(c, c, dtype=ref.dtype, device=ref.device)
        for a in range(c):
            for b in range(c):
                i, j = basis.layers[a], basis.layers[b]
                FZ[a, b] = (basis.vectors[a] * _factor_block_apply(cross_factors, i, j, basis.vectors[b], basis.shapes[i])).sum()
    else:
        raise ValueError("coarse_operator needs fisher_mvp (exact) or cross_factors (Tselepidis approximation).")
    A0 = 0.5 * (FZ + FZ.T) + lam * basis.gram() + mu * torch.eye(c, dtype=ref.dtype, device=ref.device)
    check_finite(A0, "two-level coarse matrix R0 (F + λI) R0^T")
    return A0


def two_level_direction(
    grad: TensorOrList,
    precond: Union[Callable, Sequence[Callable]],
    fisher_mvp: FisherMVP,
    damping: float,
    coarse_space: str = "nicolaides",
    krylov: bool = False,
    factors: Optional[Sequence] = None,
    cross_factors=None,
    coarse_damping: Optional[float] = None,
    spectral_end: str = "smallest",
    batched: bool = False,
    form: str = "additive",
) -> Tuple[TensorOrList, Dict]:
    r"""Two-level direction (module docstring):

    ``form="additive"``: ``d = d1 + R0^T A0^-1 R0 g``; ``form="multiplicative"``:
    ``d = d1 + R0^T A0^-1 R0 (g - (F + λI) d1)``; ``A0 = R0 (F + λI) R0^T + μ I``, ``d1 = P g``.

    Args:
        grad: gradient, parameter-shaped list (or one tensor).
        precond: per-layer one-level preconditioners ``[P_l(g_l) -> d_l]`` or one callable on
            lists (block-diagonal: layer ``l`` of its output depends on layer ``l`` only).
        fisher_mvp: whole-network product ``F(list) -> list`` without damping (cross-layer terms
            included), the same curvature (fisher_type, scaling) as the one-level factors.
        damping: ``λ`` of the target ``F + λ I`` (the one-level damping).
        coarse_space: ``"nicolaides" | "residual" | "spectral" | "tpselepedis"``.
        krylov: add the Krylov vector ``P_l z_l`` per layer.
        factors: per-layer ``[G, A]`` (``"spectral"``).
        cross_factors: ``[i][j] -> [G_ij, A_ij]`` (``"tpselepedis"``).
        coarse_damping: ``μ`` added to the coarse matrix (default 0).
        batched: ``fisher_mvp`` accepts ``[V, *shape]`` lists (coarse products in one call).
        form: ``"additive"`` (the paper's) or ``"multiplicative"``.

    Returns:
        ``(d, info)``; ``info`` has ``one_level`` (d1), ``residual`` (r, ``None`` when the
        additive form with a space other than ``"residual"`` does not need it), ``coarse_matrix``
        (A0), ``coarse_rhs`` (``R0 g`` or ``R0 r``), ``coarse_solution`` (y), ``coarse_dim``,
        ``basis`` (:class:`CoarseBasis`), ``fisher_products`` (calls of ``fisher_mvp``).
    """
    if form not in COARSE_FORMS:
        raise ValueError(f"two-level: form must be one of {COARSE_FORMS}, got {form!r}.")
    if coarse_space == "tpselepedis" and cross_factors is None:
        raise ValueError("coarse_space='tpselepedis' needs cross_factors[i][j] = [G_ij, A_ij].")
    lam = check_damping(damping)
    s = Structure.of(grad, "grad")
    g = [grad] if s.is_tensor else list(grad)
    for l, t in enumerate(g):
        check_finite(t, f"two-level: gradient of layer {l}")
    count = [0]

    def F(xs: List[Tensor]) -> List[Tensor]:
        count[0] += 1
        return list(fisher_mvp(xs))

    if s.is_tensor and callable(precond) and not isinstance(precond, (list, tuple)):
        P = lambda xs: [precond(xs[0])]  # noqa: E731  (a single tensor: the callable takes it bare)
    else:
        P = _as_list_precond(precond, len(g))
    # in the gradient's dtype (a preconditioner built in float64 after a float32 failure returns
    # float64 directions, which the Fisher product of float32 captures would refuse)
    P0 = P
    P = lambda xs: [t.to(x.dtype) for t, x in zip(P0(xs), xs)]  # noqa: E731
    d1 = P(g)
    for l, t in enumerate(d1):
        if t.shape != g[l].shape:
            raise ValueError(f"two-level: one-level direction of layer {l} has shape {tuple(t.shape)}, expected {tuple(g[l].shape)}.")
        check_finite(t, f"two-level: one-level direction of layer {l}", "check the one-level preconditioner")
    r = None
    if form == "multiplicative" or coarse_space == "residual":
        Fd1 = [t[0] for t in F([t[None] for t in d1])] if batched else F(d1)
        r = [gl - fl - lam * dl for gl, fl, dl in zip(g, Fd1, d1)]
        for l, t in enumerate(r):
            check_finite(t, f"two-level: residual of layer {l}", "fisher_mvp returned NaN/Inf")

    basis = coarse_basis(g, coarse_space, residual=r, factors=factors, krylov=krylov, precond=P,
                         spectral_end=spectral_end)
    mu = 0.0 if coarse_damping is None else coarse_damping
    if coarse_space == "tpselepedis":
        A0 = coarse_operator(basis, lam, None, cross_factors=cross_factors, coarse_damping=mu)
    else:
        A0 = coarse_operator(basis, lam, F, coarse_damping=mu, batched=batched)
    L, info = torch.linalg.cholesky_ex(A0)
    if int(info) != 0:
        raise ValueError(
            "two-level: the coarse matrix R0 (F + λI) R0^T + coarse_damping*I is not positive definite; "
            "increase damping or coarse_damping (with 'tpselepedis' the factor approximation can be indefinite)."
        )
    rc = basis.restrict(g if form == "additive" else r)
    y = torch.cholesky_solve(rc[:, None], L)[:, 0]
    corr = basis.prolong(y)
    d = [a + b for a, b in zip(d1, corr)]
    out = d[0] if s.is_tensor else d
    return out, {
        "one_level": d1[0] if s.is_tensor else d1,
        "residual": r,
        "coarse_matrix": A0,
        "coarse_rhs": rc,
        "coarse_solution": y,
        "coarse_dim": len(basis),
        "basis": basis,
        "fisher_products": count[0],
    }
