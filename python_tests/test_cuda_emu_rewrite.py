"""tools/cuda_emu/rewrite.py: the CUDA-to-host rewrite of the emulation tier keeps every line in place,
handles what csrc/cuda uses, and refuses loudly what it cannot emulate. Pure Python, no build needed;
the emulated kernels themselves run in `python tools/cuda_emu/run.py` (CI runs it)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools" / "cuda_emu"))
import rewrite  # noqa: E402


def _rw(src: str):
    return rewrite.rewrite_text(src, "/x/k.cu")


def test_csrc_cuda_rewrites_line_for_line(tmp_path):
    results = rewrite.rewrite_tree(ROOT / "csrc" / "cuda", tmp_path, [ROOT / "csrc"])
    assert sum(len(r.kernels) for r in results) >= 15 and sum(r.launches for r in results) >= 20
    for src in (ROOT / "csrc" / "cuda").iterdir():
        out = (tmp_path / src.name).read_text().split("\n")
        assert out[0].startswith('#line 1 "') and out[0].endswith(f'{src.name}"')
        assert len(out) - 1 == len(src.read_text().split("\n")), src.name


def test_launch_forms():
    src = ("template <typename T, int N>\n__global__ void k(T* x) {}\n__global__ void __launch_bounds__(64, 2) j(int) {}\n"
           "void host(float* p, cudaStream_t s) {\n  k<float, 4><<<dim3(2, 3), 32, 0, s>>>(p);\n"
           "  j<<<1,\n     64>>>(3);\n  auto kernel = k<float, 1>;\n  kernel<<<g, b, smem, s>>>(p);\n}\n")
    res = _rw(src)
    body = res.text.split("\n", 1)[1]
    assert body.count("\n") == src.count("\n")
    assert '::cuda_emu::launch(k<float, 4>, "k<float, 4>", __FILE__, __LINE__, dim3(2, 3), 32, 0, s)(p);' in body
    assert '::cuda_emu::launch(j, "j", __FILE__, __LINE__, 1,\n     64)(3);' in body
    assert "::cuda_emu::launch(kernel," in body and res.launches == 3
    assert res.kernels == ["k", "j"]
    assert "j(int) { ::cuda_emu::kernel_entry(__PRETTY_FUNCTION__, 64);" in body
    assert "k(T* x) { ::cuda_emu::kernel_entry(__PRETTY_FUNCTION__, 0);" in body


def test_shared_and_registration():
    src = ("__global__ void k() {\n  __shared__ float a[4][8];\n  extern __shared__ __align__(16) unsigned char s[];\n"
           "  __shared__ double x;  // one value\n}\nTORCH_LIBRARY_IMPL(vita_ext, CUDA, m) { m.impl(\"f\", &f); }\n")
    body = _rw(src).text
    assert "auto& a = ::cuda_emu::static_shared<float[4][8], __COUNTER__, 0>();" in body
    assert "unsigned char* s = static_cast<unsigned char*>(::cuda_emu::dynamic_shared(16));" in body
    assert "auto& x = ::cuda_emu::static_shared<double, __COUNTER__, 0>();  // one value" in body
    assert "CUDA_EMU_LIBRARY_IMPL(vita_ext, CUDA, m)" in body


def test_comments_and_strings_are_not_rewritten():
    src = '// k<<<1, 2>>>(x) and __shared__ and asm\nconst char* s = "asm __shared__ <<<";\n'
    assert _rw(src).text.split("\n", 1)[1] == src


@pytest.mark.parametrize("snippet, why", [
    ('__device__ void f() { asm volatile("bar.sync 0;"); }', "inline assembly"),
    ("#ifdef __CUDA_ARCH__\n#endif", "device compiler"),
    ("__constant__ float c[4];", "__constant__"),
    ("namespace cg = cooperative_groups;", "cooperative groups"),
    ("__device__ void f(__half h) {}", "cuda_fp16"),
    ("__device__ void f() { __nanosleep(10); }", "`__nanosleep` has no stand-in"),
    ("void f() { cudaMallocManaged(0, 0); }", "`cudaMallocManaged` has no stand-in"),
    ("__global__ void k() { __shared__ float a[2] = {1, 2}; }", "initializer"),
    ("__global__ void k() { __shared__ float a[2],\n b[2]; }", "own line"),
    ("__global__ void k() { extern __shared__ float a[4]; }", "declared `name[]`"),
    ("template <class T> __global__ void k(T) {}\nvoid h() { k<<<1, 1>>>(2); }", "without explicit template"),
    ("void h() { (*fp)<<<1, 1>>>(2); }", "not a (qualified) name"),
    ("TORCH_LIBRARY_IMPL(vita_ext, CPU, m) {}", "dispatch key CPU"),
    ("TORCH_LIBRARY(vita_ext, m) {}", "schemas belong"),
])
def test_refusals(snippet, why):
    with pytest.raises(rewrite.Refused) as exc:
        _rw(snippet)
    assert why in str(exc.value) and "/x/k.cu:" in str(exc.value)


def test_headers_without_stand_in_are_refused(tmp_path):
    (tmp_path / "k.cu").write_text("#include <cuda_fp16.h>\n#include <cooperative_groups.h>\n#include <ATen/cuda/CUDAContext.h>\n")
    with pytest.raises(rewrite.Refused) as exc:
        rewrite.rewrite_tree(tmp_path, tmp_path / "out", [])
    msg = str(exc.value)
    assert "k.cu:1:" in msg and "k.cu:2:" in msg and "k.cu:3:" not in msg


def test_cuda_code_outside_the_rewritten_tree_is_refused(tmp_path):
    (tmp_path / "cuda").mkdir()
    (tmp_path / "helper.h").write_text("__global__ void k() {}\n")
    (tmp_path / "cuda" / "k.cu").write_text('#include "helper.h"\n')
    with pytest.raises(rewrite.Refused, match="holds CUDA code but lies outside"):
        rewrite.rewrite_tree(tmp_path / "cuda", tmp_path / "out", [tmp_path])


def test_cli_reports_and_fails(tmp_path, capsys):
    (tmp_path / "k.cu").write_text("__constant__ int c;\n")
    assert rewrite.main([os.fspath(tmp_path), os.fspath(tmp_path / "out")]) == 1
    assert "k.cu:1: cuda_emu rewrite refused" in capsys.readouterr().err
