import os
import shutil
import tempfile

import jax
import pytest

from dyngap_jax.compilation import enable_persistent_cache

_CACHE: str | None = None


def pytest_configure(config):
    """One persistent compilation cache for the session, in-process and for the entry points the tests start
    (they read $DYNGAP_COMPILATION_CACHE): the many tiny runs compile the same programs, and a hit is the
    executable a compilation would give. Fresh each session and removed after it; never the user's cache."""
    global _CACHE
    if os.environ.get("PYTEST_XDIST_WORKER") is None or "DYNGAP_COMPILATION_CACHE" not in os.environ:
        _CACHE = tempfile.mkdtemp(prefix="dyngap-test-xla-")
        os.environ["DYNGAP_COMPILATION_CACHE"] = _CACHE
    enable_persistent_cache(os.environ["DYNGAP_COMPILATION_CACHE"])


def pytest_unconfigure(config):
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)


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
