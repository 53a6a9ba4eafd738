"""GGNMP block products and the whole-network GGN operator against dense torch.func GGNs,
BackPACK's GGNMP, curvlinops' GGNLinearOperator / EFLinearOperator and scipy."""
import numpy as np
import pytest
import torch
from torch import nn

from curvlib.engine.capture import LayerCapture
from curvlib.extensions.base import Extension
from curvlib.extensions.ggnmp import GGNMP
from tests.utils import dense_ggn, param_slices, run
from tests.zoo import MODEL_LOSSES as LOSSES, MODELS, setup


pytestmark = pytest.mark.usefixtures("float64")


class KeepGrads(Extension):
    """Per-sample gradients ``[K, N, *p.shape]`` of the source of another extension."""

    savefield = "psg"

    def __init__(self, fisher_type, mc_samples=1):
        super().__init__(fisher_type, mc_samples)

    def compute(self, capture: LayerCapture):
        return {n: capture.per_sample_grads(n, self.source) for n in capture.params}


@pytest.mark.parametrize("mode", ["auto", "factored", "materialized"])
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_block_products_equal_dense_ggn_blocks(model_name, loss_name, mode):
    model, loss_fn, x, y = setup(model_name, loss_name)
    ext = GGNMP(mode=mode)
    run(model, loss_fn, x, y, ext)
    G = dense_ggn(model, loss_fn, x, y)
    for sl, p in zip(param_slices(model), model.parameters()):
        for _ in range(3):  # repeated products cross the "auto" materialisation point
            V = torch.randn(4, *p.shape)
            ref = (V.reshape(4, -1) @ G[sl, sl]).reshape(V.shape)
            torch.testing.assert_close(p.ggnmp(V), ref)
    if model_name == "cnn" and mode == "auto":  # K = 2 < T = 25: the conv block switched
        assert ext._blocks[model[0]].X is not None and ext._blocks[model[4]].X is None


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_block_products_equal_backpack_ggnmp(model_name, loss_name, reduction):
    from backpack import backpack, extend as bp_extend
    from backpack.extensions import GGNMP as BPGGNMP

    model, loss_fn, x, y = setup(model_name, loss_name, reduction)
    run(model, loss_fn, x, y, GGNMP())
    bp_model = bp_extend(MODELS[model_name][0]())
    bp_model.load_state_dict(model.state_dict())
    bp_loss = bp_extend(LOSSES[loss_name][0](reduction=reduction))(bp_model(x), y)
    with backpack(BPGGNMP()):
        bp_loss.backward()
    for p, q in zip(model.parameters(), bp_model.parameters()):
        V = torch.randn(3, *p.shape)
        torch.testing.assert_close(p.ggnmp(V), q.ggnmp(V))


@pytest.mark.parametrize("mode", ["auto", "factored", "materialized"])
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_operator_equals_dense_ggn(model_name, loss_name, mode):
    model, loss_fn, x, y = setup(model_name, loss_name, "sum" if loss_name == "mse" else "mean")
    ext = GGNMP(mode=mode)
    run(model, loss_fn, x, y, ext)
    F = ext.operator()
    assert [id(p) for p in F.params] == [id(p) for p in model.parameters()]
    G = dense_ggn(model, loss_fn, x, y)
    v = torch.randn(G.shape[0])
    Gv = G @ v
    # list of parameter-shaped tensors
    vs = [v[sl].reshape(p.shape) for sl, p in zip(param_slices(model), model.parameters())]
    out = torch.cat([o.flatten() for o in F(vs)])
    torch.testing.assert_close(out, Gv)
    # flat vector, flat matrix of columns, batched lists
    torch.testing.assert_close(F @ v, Gv)
    M = torch.randn(G.shape[0], 5)
    torch.testing.assert_close(F.matvec_flat(M), G @ M)
    batched = F([torch.stack([t, 2 * t]) for t in vs])
    torch.testing.assert_close(torch.cat([o[1].flatten() for o in batched]), 2 * Gv)
    torch.testing.assert_close(F.to_dense(chunk=7), G)
    # scipy export on numpy vectors
    A = F.to_scipy()
    assert A.shape == G.shape
    np.testing.assert_allclose(A @ v.numpy(), Gv.numpy(), rtol=1e-10, atol=1e-12)


def test_operator_equals_curvlinops_ggn():
    from curvlinops import GGNLinearOperator

    model, loss_fn, x, y = setup("cnn", "ce")
    ext = GGNMP()
    run(model, loss_fn, x, y, ext)
    params = list(model.parameters())
    ref = GGNLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    vs = [torch.randn_like(p) for p in params]
    for a, b in zip(ext.operator()(vs), ref @ vs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("fisher_type,mc_samples", [("mc", 1), ("mc", 3), ("empirical", 1)])
@pytest.mark.parametrize("model_name", ["mlp", "cnn", "res"])
def test_mc_and_empirical_equal_dense_UtU(model_name, fisher_type, mc_samples):
    """Same draws for both extensions (one source per context): F = U^T U from the
    per-sample gradients of that source, blocks and the whole network."""
    model, loss_fn, x, y = setup(model_name, "ce")
    ext = GGNMP(fisher_type, mc_samples)
    run(model, loss_fn, x, y, ext, KeepGrads(fisher_type, mc_samples))
    U = torch.cat([p.psg.flatten(2) for p in model.parameters()], dim=2)  # [K, N, P]
    assert U.shape[0] == (mc_samples if fisher_type == "mc" else 1)
    U = U.flatten(0, 1)
    C = U.T @ U
    F = ext.operator()
    torch.testing.assert_close(F.to_dense(), C)
    for sl, p in zip(param_slices(model), model.parameters()):
        V = torch.randn(2, *p.shape)
        torch.testing.assert_close(p.ggnmp(V), (V.reshape(2, -1) @ C[sl, sl]).reshape(V.shape))


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_empirical_operator_equals_curvlinops_ef(model_name):
    from curvlinops import EFLinearOperator

    model, loss_fn, x, y = setup(model_name, "ce")
    ext = GGNMP("empirical")
    run(model, loss_fn, x, y, ext)
    params = list(model.parameters())
    ref = EFLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    vs = [torch.randn_like(p) for p in params]
    for a, b in zip(ext.operator()(vs), ref @ vs):
        torch.testing.assert_close(a, b)


def test_mc_operator_is_unbiased_for_the_ggn():
    model, loss_fn, x, y = setup("mlp", "ce")
    ext = GGNMP("mc", mc_samples=4000)
    run(model, loss_fn, x, y, ext)
    G = dense_ggn(model, loss_fn, x, y)
    err = (ext.operator().to_dense() - G).norm() / G.norm()
    assert err < 0.1, err


def test_errors():
    model, loss_fn, x, y = setup("mlp", "ce")
    ext = GGNMP()
    with pytest.raises(RuntimeError, match="backward"):
        ext.operator()
    with pytest.raises(ValueError, match="mode"):
        GGNMP(mode="dense")
    run(model, loss_fn, x, y, ext)
    w = model[0].weight
    with pytest.raises(ValueError, match=r"\[V, \*\(5, 4\)\]"):
        w.ggnmp(torch.randn(5, 4))
    F = ext.operator()
    with pytest.raises(ValueError, match="matvec_flat"):
        F.matvec_flat(torch.randn(3))
    with pytest.raises(ValueError, match="shaped like its parameters"):
        F([torch.randn(2) for _ in F.params])


def test_second_backward_replaces_the_operator():
    model, loss_fn, x, y = setup("mlp", "ce")
    ext = GGNMP()
    run(model, loss_fn, x, y, ext)
    x2 = torch.randn(9, 4)
    y2 = torch.randint(0, 3, (9,))
    run(model, loss_fn, x2, y2, ext)
    F = ext.operator()
    assert F.batch_size == 9
    torch.testing.assert_close(F.to_dense(), dense_ggn(model, loss_fn, x2, y2))


def test_frozen_parameters_are_left_out():
    model, loss_fn, x, y = setup("mlp", "mse")
    model[0].weight.requires_grad_(False)
    model[2].requires_grad_(False)
    ext = GGNMP()
    run(model, loss_fn, x, y, ext)
    F = ext.operator()
    assert [id(p) for p in F.params] == [id(p) for p in model.parameters() if p.requires_grad]
    keep = torch.cat(
        [torch.arange(sl.start, sl.stop) for sl, p in zip(param_slices(model), model.parameters()) if p.requires_grad]
    )
    G = dense_ggn(model, loss_fn, x, y)
    torch.testing.assert_close(F.to_dense(), G[keep][:, keep])
