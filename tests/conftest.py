import jax
import pytest


@pytest.fixture
def x64():
    """Run the test body in float64 (hypergradients compared to 1e-6 need it)."""
    with jax.enable_x64(True):
        yield
