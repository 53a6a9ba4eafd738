"""ExactBlockFisher / GradFactors against dense torch.func GGN blocks and curvlinops' EF.

The nets and losses (shared with the BatchGrad, DiagGGN and CrossKFAC tests) are in
:mod:`tests.zoo`.
"""
import pytest
import torch
from torch import nn

from curvlib.extensions.block_fisher import (
    ExactBlockFisher,
    GradFactors,
    grad_factor_blocks,
    stack_grad_factors,
)
from tests.utils import dense_ef, dense_ggn, param_slices, run
from tests.zoo import LOSSES, N, NETS, problem

pytestmark = pytest.mark.usefixtures("float64")




@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_type2_block_equals_dense_ggn_block(net, loss, reduction):
    model, loss_fn, x, y = problem(net, loss, reduction)
    run(model, loss_fn, x, y, ExactBlockFisher(fisher_type="type-2"))
    G = dense_ggn(model, loss_fn, x, y)
    for sl, (name, p) in zip(param_slices(model), model.named_parameters()):
        assert p.block_fisher.shape == (p.numel(), p.numel())
        torch.testing.assert_close(p.block_fisher, G[sl, sl], msg=f"{net}: {name}")


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empirical_block_equals_curvlinops_ef_block(net, loss, reduction):
    model, loss_fn, x, y = problem(net, loss, reduction)
    run(model, loss_fn, x, y, ExactBlockFisher(fisher_type="empirical"))
    E = dense_ef(model, loss_fn, x, y)
    for sl, (name, p) in zip(param_slices(model), model.named_parameters()):
        torch.testing.assert_close(p.block_fisher, E[sl, sl], msg=f"{net}: {name}")


@pytest.mark.parametrize("net", ["mlp", "seq"])
def test_mc_block_approaches_type2(net):
    model, loss_fn, x, y = problem(net, "ce", "mean")
    run(model, loss_fn, x, y, ExactBlockFisher(fisher_type="mc", mc_samples=4000))
    G = dense_ggn(model, loss_fn, x, y)
    for sl, p in zip(param_slices(model), model.parameters()):
        err = torch.linalg.norm(p.block_fisher - G[sl, sl]) / torch.linalg.norm(G[sl, sl])
        assert err < 0.1, f"{net}: relative error {err:.3f}"


@pytest.mark.parametrize("net", ["mlp", "res", "seq", "cnn", "convT"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_stacked_grad_factors_give_whole_network_curvature(net, fisher_type):
    model, loss_fn, x, y = problem(net, "ce", "mean")
    run(model, loss_fn, x, y, GradFactors(fisher_type=fisher_type))
    U = stack_grad_factors(model.parameters())
    ref = dense_ggn(model, loss_fn, x, y) if fisher_type == "type-2" else dense_ef(model, loss_fn, x, y)
    torch.testing.assert_close(U.T @ U, ref)


def test_grad_factors_woodbury_convention_gives_damped_natural_gradient():
    from curvlib.solvers import woodbury_solve, woodbury_solve_blocks

    model, loss_fn, x, y = problem("res", "mse", "sum")
    run(model, loss_fn, x, y, GradFactors(fisher_type="type-2"))
    params = list(model.parameters())
    g = torch.cat([p.grad.flatten() for p in params])
    F, lam = dense_ggn(model, loss_fn, x, y), 0.1
    ref = torch.linalg.solve(F + lam * torch.eye(len(g)), g)
    U = stack_grad_factors(params, for_woodbury=True)
    assert U.shape[0] == 3 * N  # K * N rows: 3 output dims x N samples
    torch.testing.assert_close(woodbury_solve(U, g, lam), ref)
    blocks = woodbury_solve_blocks(grad_factor_blocks(params, for_woodbury=True), [p.grad for p in params], lam)
    for sl, d in zip(param_slices(model), blocks):
        torch.testing.assert_close(d.flatten(), torch.linalg.solve(F[sl, sl] + lam * torch.eye(sl.stop - sl.start), g[sl]))


def test_grad_factors_reuse_buffers_never_overwrite_kept_results():
    model, loss_fn, x, y = problem("mlp", "ce", "sum")
    run(model, loss_fn, x, y, GradFactors(fisher_type="empirical"))
    p = model[0].weight
    kept = p.grad_factors
    kept_copy = kept.clone()
    run(model, loss_fn, torch.randn_like(x), y, GradFactors(fisher_type="empirical"))
    assert p.grad_factors is not kept
    torch.testing.assert_close(kept, kept_copy)


def test_grad_factors_of_unextended_parameter_raise():
    model, loss_fn, x, y = problem("mlp", "ce", "mean")
    run(model, loss_fn, x, y, GradFactors(fisher_type="type-2"))
    with pytest.raises(RuntimeError, match="no .grad_factors"):
        stack_grad_factors(list(model.parameters()) + [nn.Parameter(torch.zeros(2))])
