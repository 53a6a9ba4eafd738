"""Bad input gets a clear exception (or warning) naming the module and the fix."""
import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC


def test_parameter_through_an_uncovered_operation_warns_with_its_name_and_the_operation():
    """PReLU's slope enters through torch.prelu, which no rule covers: named at the curvature
    backward (once), not at extend (a module without adapter may use covered operations)."""
    import warnings

    model = extend(nn.Sequential(nn.Linear(3, 3), nn.PReLU(3)))
    loss_fn = extend(nn.MSELoss())
    loss = loss_fn(model(torch.randn(4, 3)), torch.randn(4, 3))
    with pytest.warns(UserWarning, match="parameter '1.weight' reaches the loss through torch.prelu") as rec:
        with curvature(KFAC(fisher_type="type-2")):
            loss.backward()
    assert sum("torch.prelu" in str(w.message) for w in rec) == 1
    assert not hasattr(model[1].weight, "kfac") and hasattr(model[0].weight, "kfac")
    loss = loss_fn(model(torch.randn(4, 3)), torch.randn(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per parameter and operation
        with curvature(KFAC(fisher_type="type-2")):
            loss.backward()


def test_no_warning_for_a_forward_without_curvature():
    import warnings

    model = extend(nn.Sequential(nn.Linear(3, 3), nn.PReLU(3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(4, 3)).sum().backward()


def test_unsupported_loss_is_refused():
    with pytest.raises(NotImplementedError, match="L1Loss"):
        extend(nn.L1Loss())


@pytest.mark.parametrize("fisher_type", ["mc", "type-2"])
def test_mc_and_type2_need_an_extended_loss(fisher_type):
    model = extend(nn.Sequential(nn.Linear(3, 2)))
    loss = nn.CrossEntropyLoss()(model(torch.randn(4, 3)), torch.randint(0, 2, (4,)))
    with pytest.raises(RuntimeError, match=r"extend\(torch.nn.CrossEntropyLoss"):
        with curvature(KFAC(fisher_type=fisher_type)):
            loss.backward()


def test_empirical_works_without_extended_loss():
    model = extend(nn.Sequential(nn.Linear(3, 2)))
    loss = nn.CrossEntropyLoss()(model(torch.randn(4, 3)), torch.randint(0, 2, (4,)))
    with curvature(KFAC(fisher_type="empirical")):
        loss.backward()
    assert model[0].weight.kfac[0].shape == (2, 2)


def test_reduction_none_is_refused():
    model = extend(nn.Sequential(nn.Linear(3, 2)))
    loss_fn = extend(nn.MSELoss(reduction="none"))
    loss = loss_fn(model(torch.randn(4, 3)), torch.randn(4, 2)).sum()
    with pytest.raises(ValueError, match="reduction='none'"):
        with curvature(KFAC(fisher_type="type-2")):
            loss.backward()


def test_model_not_extended_or_backward_outside_context():
    model = nn.Sequential(nn.Linear(3, 2))
    loss = model(torch.randn(4, 3)).square().sum()
    with pytest.raises(RuntimeError, match=r"extend\(model\).*inside the `with curvature"):
        with curvature(KFAC(fisher_type="empirical")):
            loss.backward()
    ext = extend(nn.Sequential(nn.Linear(3, 2)))
    loss = ext(torch.randn(4, 3)).square().sum()
    with pytest.raises(RuntimeError, match="no extended layer"):
        with curvature(KFAC(fisher_type="empirical")):
            pass
    loss.backward()  # outside the context: a plain backward, nothing stored
    assert not hasattr(ext[0].weight, "kfac")


def test_nan_in_captured_quantities_is_reported():
    model = extend(nn.Sequential(nn.Linear(3, 2)))
    x = torch.randn(4, 3)
    x[1, 1] = float("nan")
    loss = model(x).square().sum()
    with pytest.raises(FloatingPointError, match="Linear.*NaN or Inf"):
        with curvature(KFAC(fisher_type="empirical")):
            loss.backward()


def test_bad_arguments():
    with pytest.raises(ValueError, match="fisher_type='exact'"):
        KFAC(fisher_type="exact")
    with pytest.raises(ValueError, match="kfac_approx"):
        KFAC(kfac_approx="mean")
    with pytest.raises(ValueError, match="mc_samples=0"):
        KFAC(mc_samples=0)
    with pytest.raises(TypeError, match="extension instances"):
        curvature(KFAC)


def test_nested_contexts():
    with pytest.raises(RuntimeError, match="nested"):
        with curvature(KFAC()):
            with curvature(KFAC()):
                pass


def test_second_backward_through_one_graph_is_reported():
    model = extend(nn.Sequential(nn.Linear(3, 2)))
    loss = model(torch.randn(4, 3)).square().sum()
    with curvature(KFAC(fisher_type="empirical")):
        loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already back-propagated"):
        with curvature(KFAC(fisher_type="empirical")):
            loss.backward()
