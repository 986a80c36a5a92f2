"""Kernel tests run the Triton kernels in Triton's CPU interpreter when there is no CUDA GPU.

TRITON_INTERPRET must be set before `@triton.jit` runs, i.e. before any `nmoe_serve.kernels` module is
imported; this conftest sets it first. Tests marked `gpu` are skipped without CUDA.
"""

import os
import sys
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    # A test elsewhere may have imported `nmoe_serve.kernels` before this folder was collected; drop those
    # modules so the imports below build interpreted kernels.
    for name in [m for m in sys.modules if m == "nmoe_serve.kernels" or m.startswith("nmoe_serve.kernels.")]:
        del sys.modules[name]

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and str(item.path).startswith(HERE):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """A fixed seed per test (and per parametrization), from its id: reproducible, and distinct."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
