"""Shared test setup.

Without a GPU the Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set
before triton is imported anywhere, so it is set here, first.
"""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# a compile cache of its own per run: inductor's cache key does not see a custom op's fake implementation, so a
# cache warmed by another version of prefkern on this machine can replay graphs with stale output shapes
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="prefkern-inductor-"))

import pytest  # noqa: E402

try:  # property tests draw the same examples on every run: CI never flakes on a rare draw
    from hypothesis import settings

    settings.register_profile("prefkern", derandomize=True, deadline=None)
    settings.load_profile("prefkern")
except ImportError:
    pass

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh on a GPU host)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
