"""DiagGGN against BackPACK's DiagGGNExact, the dense GGN diagonal and curvlinops' EF."""
import pytest
import torch

from curvlib.extensions.diag_ggn import DiagGGN
from tests.utils import dense_ef, dense_ggn, param_slices, run
from tests.zoo import LOSSES, NETS, problem


pytestmark = pytest.mark.usefixtures("float64")


# seq: T = 2 < K = 5 classes-1 (factored route); cnn, convT: T > K (per-sample route)
@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_type2_diag_equals_dense_ggn_diagonal(net, loss, reduction):
    model, loss_fn, x, y = problem(net, loss, reduction)
    run(model, loss_fn, x, y, DiagGGN(fisher_type="type-2"))
    diag = dense_ggn(model, loss_fn, x, y).diagonal()
    for sl, (name, p) in zip(param_slices(model), model.named_parameters()):
        assert p.diag_ggn.shape == p.shape
        torch.testing.assert_close(p.diag_ggn.flatten(), diag[sl], msg=f"{net}: {name}")


@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_type2_diag_equals_backpack_diag_ggn_exact(net, loss, reduction):
    from backpack import backpack, extend as bp_extend
    from backpack.extensions import DiagGGNExact

    model, loss_fn, x, y = problem(net, loss, reduction)
    run(model, loss_fn, x, y, DiagGGN(fisher_type="type-2"))
    bp_model = bp_extend(NETS[net][0]())
    bp_model.load_state_dict(model.state_dict())
    value = bp_extend(LOSSES[loss][0](reduction=reduction))(bp_model(x), y)
    with backpack(DiagGGNExact()):
        value.backward()
    for p, q in zip(model.parameters(), bp_model.parameters()):
        torch.testing.assert_close(p.diag_ggn, q.diag_ggn_exact)


@pytest.mark.parametrize("net", ["mlp", "seq", "cnn", "res"])
def test_empirical_diag_equals_curvlinops_ef_diagonal(net):
    model, loss_fn, x, y = problem(net, "ce", "mean")
    run(model, loss_fn, x, y, DiagGGN(fisher_type="empirical"))
    diag = dense_ef(model, loss_fn, x, y).diagonal()
    for sl, p in zip(param_slices(model), model.parameters()):
        torch.testing.assert_close(p.diag_ggn.flatten(), diag[sl])


def test_mc_diag_approaches_type2():
    model, loss_fn, x, y = problem("cnn", "ce", "sum")
    run(model, loss_fn, x, y, DiagGGN(fisher_type="mc", mc_samples=4000))
    diag = dense_ggn(model, loss_fn, x, y).diagonal()
    for sl, p in zip(param_slices(model), model.parameters()):
        err = torch.linalg.norm(p.diag_ggn.flatten() - diag[sl]) / torch.linalg.norm(diag[sl])
        assert err < 0.05, f"relative error {err:.3f}"
