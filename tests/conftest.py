import jax
import pytest


@pytest.fixture
def x64():
    """Run the test body in float64 (hypergradients compared to 1e-6 need it)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def highest_precision():
    """Full float32 matmuls and convolutions for the test body (on an NVIDIA GPU the backend's default is
    TF32, relative error ~3e-4): for comparisons with closed forms and PyTorch."""
    with jax.default_matmul_precision("highest"):
        yield
