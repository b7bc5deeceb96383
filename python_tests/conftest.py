"""Shared fixtures. Nothing here touches a GPU at import time: CUDA availability is asked only when a
test that wants the "cuda" device runs, and such tests skip cleanly without one."""
import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def cuda_ok() -> bool:
    import vita_ext

    return bool(vita_ext.build_info()["cuda"]) and torch.cuda.is_available()


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not cuda_ok():
        pytest.skip("needs a CUDA GPU and a build with CUDA kernels")
    return torch.device(request.param)


@pytest.fixture
def cuda_device():
    if not cuda_ok():
        pytest.skip("needs a CUDA GPU and a build with CUDA kernels")
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible seed per test: fresh random inputs, replayable failures.
    # crc32, not hash(): hash() is salted per process. VITA_EXT_TEST_SEED draws another set of inputs.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("VITA_EXT_TEST_SEED", "0")))
    yield
