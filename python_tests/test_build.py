"""The build facts and the plain error for a CUDA tensor reaching a build without CUDA kernels."""
import types

import pytest
import torch

import vita_ext
from vita_ext import _build


def test_build_info_reports_the_build():
    info = vita_ext.build_info()
    assert set(info) >= {"cuda", "arch_list", "cuda_version", "nvcc_version", "torch_version"}
    assert isinstance(info["cuda"], bool)
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    if info["cuda"]:
        assert info["arch_list"] and info["cuda_version"]
    for op in ("pixel_shuffle_projector", "masked_lm_head", "masked_linear_cross_entropy", "attention_lse",
               "merge_attention_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vita_ext::{op}", "CPU"), op
        if info["cuda"]:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vita_ext::{op}", "CUDA"), op


def test_cuda_tensor_in_a_cpu_only_build_gets_a_plain_error(monkeypatch):
    monkeypatch.setitem(_build._INFO, "cuda", False)
    fake_cuda = types.SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match=r"vita_ext\.attention_lse: got a CUDA tensor, but this vita_ext build has "
                                           r"no CUDA kernels.*CUDA_HOME"):
        _build.require_kernels("attention_lse", torch.ones(1), fake_cuda)
    _build.require_kernels("attention_lse", torch.ones(1), None)  # CPU tensors pass


def test_public_names_resolve():
    for name in vita_ext.__all__:
        assert getattr(vita_ext, name) is not None
    with pytest.raises(AttributeError):
        vita_ext.no_such_thing  # noqa: B018
