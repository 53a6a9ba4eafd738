import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_threads_and_dtype():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
    # a test that sets another default dtype (test_step_faults' OOM test sets float64 and does
    # not restore it) does not leak it into the tests after it
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def float64():
    """Exactness checks run in float64 (``pytestmark = pytest.mark.usefixtures("float64")``)."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _test_device() -> str:
    """``CURVLIB_TEST_DEVICE`` if set, else ``"cuda"`` when a GPU is available, else ``"cpu"``."""
    import os

    return os.environ.get("CURVLIB_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    """The device the device-aware tests run on: CUDA when available (CPU CI stays the gate and runs
    them on the CPU); ``CURVLIB_TEST_DEVICE=cpu`` forces the CPU. Tests taking it build the model and
    data there and compare against a float64 CPU reference."""
    return torch.device(_test_device())
