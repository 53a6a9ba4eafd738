"""BatchGrad against torch.func per-sample gradients and BackPACK's BatchGrad."""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.engine.state import ENGINE
from curvlib.extensions.batch_grad import BatchGrad
from tests.utils import per_sample_grads, run
from tests.zoo import LOSSES, NETS, problem


pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_batch_equals_torch_func_per_sample_gradients(net, loss, reduction):
    model, loss_fn, x, y = problem(net, loss, reduction)
    run(model, loss_fn, x, y, BatchGrad())
    ref = per_sample_grads(model, loss_fn, x, y)
    scale = 1.0 / x.shape[0] if reduction == "mean" else 1.0  # BackPACK: sum_n = p.grad
    for name, p in model.named_parameters():
        assert p.grad_batch.shape == (x.shape[0], *p.shape)
        torch.testing.assert_close(p.grad_batch, scale * ref[name], msg=f"{net}: {name}")
        torch.testing.assert_close(p.grad_batch.sum(0), p.grad)


@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_batch_equals_backpack(net, loss, reduction):
    from backpack import backpack, extend as bp_extend
    from backpack.extensions import BatchGrad as BPBatchGrad

    model, loss_fn, x, y = problem(net, loss, reduction)
    run(model, loss_fn, x, y, BatchGrad())
    bp_model = bp_extend(NETS[net][0]())
    bp_model.load_state_dict(model.state_dict())
    value = bp_extend(LOSSES[loss][0](reduction=reduction))(bp_model(x), y)
    with backpack(BPBatchGrad()):
        value.backward()
    for p, q in zip(model.parameters(), bp_model.parameters()):
        torch.testing.assert_close(p.grad_batch, q.grad_batch)


def test_grad_batch_needs_no_extended_loss_and_no_extra_backprop():
    model = extend(NETS["mlp"][0]())
    x, y = torch.randn(5, 5), torch.randint(0, 3, (5,))
    ext = BatchGrad()
    assert ext.sources() == {"grad"}
    loss = nn.CrossEntropyLoss()(model(x), y)  # plain loss: no extra cotangents possible
    with curvature(ext) as ctx:
        loss.backward()
    assert ctx.sources == {"grad"}
    for p in model.parameters():
        torch.testing.assert_close(p.grad_batch.sum(0), p.grad)


def test_reused_buffer_is_overwritten_only_when_nobody_else_holds_it():
    model, loss_fn, x, y = problem("mlp", "ce", "mean")
    p = model[0].weight
    run(model, loss_fn, x, y, BatchGrad())
    first_id = id(p.grad_batch)
    x2 = torch.randn_like(x)
    run(model, loss_fn, x2, y, BatchGrad())
    assert id(p.grad_batch) == first_id  # reused in place
    ref = per_sample_grads(model, loss_fn, x2, y)["0.weight"] / x.shape[0]
    torch.testing.assert_close(p.grad_batch, ref)

    kept = p.grad_batch  # a user reference: must survive the next backward
    kept_copy = kept.clone()
    run(model, loss_fn, x, y, BatchGrad())
    assert p.grad_batch is not kept
    torch.testing.assert_close(kept, kept_copy)

    view = p.grad_batch[0]  # a view shares the storage: must survive as well
    view_copy = view.clone()
    run(model, loss_fn, x2, y, BatchGrad())
    torch.testing.assert_close(view, view_copy)

    arr = p.grad_batch.numpy()  # so does a NumPy array
    arr_copy = arr.copy()
    run(model, loss_fn, x, y, BatchGrad())
    assert (arr == arr_copy).all()


def test_no_reuse_allocates_every_time():
    model, loss_fn, x, y = problem("mlp", "ce", "mean")
    p = model[0].weight
    run(model, loss_fn, x, y, BatchGrad(reuse_buffers=False))
    old = p.grad_batch.data_ptr()
    keep = p.grad_batch  # noqa: F841  (prevents the allocator from handing back the same block)
    run(model, loss_fn, x, y, BatchGrad(reuse_buffers=False))
    assert p.grad_batch.data_ptr() != old


def test_nan_in_captured_gradient_is_reported():
    model, loss_fn, x, y = problem("mlp", "ce", "mean")
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        run(model, loss_fn, x, y, BatchGrad())
    with torch.no_grad():
        model(x)  # a new forward drops the calls the failed backward left on the engine's tape
    assert not any(c.root is model for c in ENGINE.tape.values())
