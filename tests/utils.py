"""Independent references for the tests: dense quantities from ``torch.func`` and curvlinops;
and the one-backward helper :func:`run`. The models are in :mod:`tests.zoo`."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from curvlib import curvature, extend
from curvlib.extensions import BatchGrad, DiagGGN


def per_sample_grads(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Dict[str, Tensor]:
    """``[N, *p.shape]`` gradients of ``loss_fn(model(x_n), y_n)`` (unscaled, one sample)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xn, yn):
        out = functional_call(model, p, (xn.unsqueeze(0),))
        return loss_fn(out, yn.unsqueeze(0))

    return vmap(grad(f), in_dims=(None, 0, 0))(params, x, y)


def dense_ggn(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The exact GGN ``J^T H J`` of ``loss_fn(model(x), y)`` over all parameters (flattened
    in ``model.parameters()`` order), from ``torch.func`` Jacobians and Hessians."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = functional_call(model, params, (x,))
    J = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    J = torch.cat([j.reshape(out.numel(), -1) for j in J.values()], dim=1)
    H = hessian(lambda o: loss_fn(o, y))(out.detach()).reshape(out.numel(), out.numel())
    return J.T @ H @ J


def assert_exact_quantities(p: nn.Parameter, grad_batch: Tensor, block: Tensor) -> None:
    """``p.grad_batch``, ``p.block_fisher``, ``p.diag_ggn`` and ``p.ggnmp`` (as written by ``BatchGrad``,
    ``ExactBlockFisher``, ``DiagGGN``, ``GGNMP``) against the reference per-sample gradients and
    the dense curvature block ``[p.numel(), p.numel()]`` of ``p.flatten()``."""
    torch.testing.assert_close(p.grad_batch, grad_batch)
    torch.testing.assert_close(p.block_fisher, block)
    torch.testing.assert_close(p.diag_ggn, block.diagonal().reshape(p.shape))
    V = torch.randn(2, *p.shape, dtype=block.dtype)
    torch.testing.assert_close(p.ggnmp(V), (V.reshape(2, -1) @ block).reshape(V.shape))


def assert_batch_grad_and_diag_ggn(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> None:
    """Extend ``model``, run ``BatchGrad`` and the type-2 ``DiagGGN`` in one backward of the mean
    ``loss_fn``, and check every parameter's ``grad_batch`` (shape ``[N, *p.shape]``) and
    ``diag_ggn`` against ``torch.func`` on a copy of ``model`` without hooks."""
    plain = copy.deepcopy(model)
    extend(model)
    with curvature(BatchGrad(), DiagGGN(fisher_type="type-2")):
        extend(copy.deepcopy(loss_fn))(model(x), y).backward()
    N = x.shape[0]
    psg = per_sample_grads(plain, loss_fn, x, y)
    ggn = dense_ggn(plain, loss_fn, x, y)
    for (name, p), sl in zip(model.named_parameters(), param_slices(model)):
        assert p.grad_batch.shape == (N, *p.shape), name
        torch.testing.assert_close(p.grad_batch, psg[name] / N, msg=name)
        torch.testing.assert_close(p.diag_ggn.flatten(), ggn[sl, sl].diagonal(), msg=name)


def mark_rank_done(tmp: str, rank: int) -> None:
    """In a worker of :func:`spawn_ranks`: every check of ``rank`` passed."""
    with open(os.path.join(tmp, f"rank{rank}.ok"), "w") as f:
        f.write("ok")


def spawn_ranks(worker: Callable, args: tuple, nprocs: int, tmp_path: Path,
                report: Callable[[BaseException], str]) -> None:
    """``torch.multiprocessing.spawn(worker, args, nprocs)``, passing when every rank called
    :func:`mark_rank_done`, also when gloo then aborted a process in its teardown (SIGABRT,
    "terminate called without an active exception": torch's teardown, not what the tests check);
    otherwise ``AssertionError(report(e))``."""
    def done() -> bool:
        return all((tmp_path / f"rank{r}.ok").exists() for r in range(nprocs))

    try:
        mp.spawn(worker, args=args, nprocs=nprocs, join=True)
    except mp.ProcessExitedException as e:
        if not done():
            raise AssertionError(report(e)) from e
    except Exception as e:
        raise AssertionError(report(e)) from e
    assert done()


def param_slices(model: nn.Module) -> List[slice]:
    out, i = [], 0
    for p in model.parameters():
        out.append(slice(i, i + p.numel()))
        i += p.numel()
    return out


def run(model, loss_fn, x, y, *exts):
    loss = loss_fn(model(x), y)
    with curvature(*exts):
        loss.backward()


def close(a, b, scale, rtol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(scale))


def dense_ef(model, loss_fn, x, y):
    from curvlinops import EFLinearOperator

    params = list(model.parameters())
    E = EFLinearOperator(model, loss_fn, params, [(x, y)], check_deterministic=False)
    return E @ torch.eye(E.shape[1])


def curvlinops_blocks(model, loss_fn, x, y, **kw):
    from curvlinops import KFACLinearOperator

    params = list(model.parameters())
    K = KFACLinearOperator(model, loss_fn, params, [(x, y)], check_deterministic=False, **kw)
    D = sum(p.numel() for p in params)
    dense = K @ torch.eye(D)
    return [dense[s, s] for s in param_slices(model)]


def exact_blocks(model, loss_fn, x, y, fisher_type):
    """Dense curvature blocks, one per parameter (p.flatten() order)."""
    if fisher_type == "type-2":
        F = dense_ggn(model, loss_fn, x, y)
        return [F[sl, sl] for sl in param_slices(model)]
    psg = per_sample_grads(model, loss_fn, x, y)
    scale = 1 / x.shape[0] if loss_fn.reduction == "mean" else 1.0
    return [scale * g.flatten(1).T @ g.flatten(1) for g in psg.values()]


def rearrange_dense(F, d0, d1):
    """Van Loan rearrangement: R[(i,k),(a,b)] = F[(i,a),(k,b)], so kron(U, V) <-> vec(U) vec(V)^T."""
    return F.reshape(d0, d1, d0, d1).permute(0, 2, 1, 3).reshape(d0 * d0, d1 * d1)


def dense_factor(F: Tensor) -> Tensor:
    """The dense matrix of a Kronecker factor: 1-D diagonal ``[m]``, block ``[B, m, m]`` or ``[m, m]``."""
    if F.dim() == 1:
        return torch.diag(F)
    return torch.block_diag(*F) if F.dim() == 3 else F


def dense_kron_terms(terms) -> Tensor:
    """The dense matrix of Kronecker terms in any factor form (``[G, A]``, ``[G]`` or a list of
    terms; block-form terms: ``blockdiag_b kron(G[b], A[b])``)."""
    terms = [terms] if isinstance(terms[0], Tensor) else terms
    total = 0
    for t in terms:
        if len(t) == 1:
            total = total + dense_factor(t[0])
        elif t[0].dim() == 3:
            total = total + torch.block_diag(*[torch.kron(g, a) for g, a in zip(t[0], t[1])])
        else:
            total = total + torch.kron(dense_factor(t[0]), dense_factor(t[1]))
    return total
