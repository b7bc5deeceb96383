"""The emulator itself: rendezvous semantics, the rules it enforces, launch validation as on an H100,
NaN-filled memory, thread/block order, and cublasGemmEx's checks and results (selftest.cu kernels)."""
import math

import pytest
import torch

ORDERS = ["forward", "reverse", "random"]


def run(emu, case, x=None, order="forward", seed=0, nan_fill=True):
    x = torch.zeros(1) if x is None else x
    emu.enable(order=order, seed=seed, nan_fill=nan_fill)
    try:
        return torch.ops.cuda_emu_selftest.run(case, x)
    finally:
        emu.disable()


@pytest.mark.parametrize("order", ORDERS)
def test_block_sum(emu, order):
    x = torch.rand(1000) * 4  # 4 blocks, the last one partial
    out = run(emu, "block_sum", x, order=order, seed=3)
    ref = torch.stack([c.double().sum() for c in x.split(256)])
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-5)


def test_shuffle_flavours_and_votes(emu):
    out = run(emu, "shuffles").view(32, 12)
    for lane in range(32):
        seg = lane & ~7
        want = [3, lane ^ 5, lane - 2 if lane >= 2 else lane, lane + 2 if lane + 2 < 32 else lane,
                seg + 1, lane ^ 4, lane - 3 if lane - 3 >= seg else lane, lane + 3 if lane + 3 < seg + 8 else lane,
                sum(1 << i for i in range(0, 16, 3)), 1, 0]
        assert out[lane, :11].tolist() == [float(w) for w in want], lane
        assert 1 <= out[lane, 11].item() <= 32  # __activemask: the lanes not exited yet, schedule-dependent


def test_disjoint_masks_and_block_votes(emu):
    out = run(emu, "half_warps")
    count = sum(1 for t in range(64) if t % 3 == 0)
    for t in range(64):
        assert out[t].item() == (t ^ 1) + 1000 * count + 100000 + 200000


@pytest.mark.parametrize("order", ORDERS)
def test_atomics(emu, order):
    x = torch.randint(0, 50, (777,)).float()
    out = run(emu, "histogram", x, order=order)
    assert out[:16].tolist() == torch.bincount(x.long() % 16, minlength=16).double().tolist()
    assert out[16].item() == x.double().sum().item()


def test_shared_memory_starts_as_nan(emu):
    assert torch.isnan(run(emu, "uninit_shared")).all()  # static and dynamic


def test_a_missing_barrier_depends_on_the_order(emu):
    x = torch.arange(64.0) + 1
    want = torch.roll(x, -1)
    fwd, rev = run(emu, "race", x, order="forward"), run(emu, "race", x, order="reverse")
    assert torch.isnan(fwd[:63]).all()  # each thread ran ahead of the one whose value it reads
    assert torch.equal(rev[:63], want[:63])


@pytest.mark.parametrize("case, message", [
    ("divergent_sync", "__syncthreads reached at different lines"),
    ("exited_lane", "exited"),
    ("absent_lane", "that do not exist (the block has 48 threads)"),
    ("different_shuffles", "lanes of one warp at different collectives"),
    ("shuffle_vs_sync", "wait"),
    ("read_outside_mask", "which is not in the mask"),
    ("launch_bounds", "exceed the kernel's __launch_bounds__(64)"),
    ("static_smem", "exceeds 48 KB"),
    ("host_thread_idx", "threadIdx used outside a kernel"),
])
@pytest.mark.parametrize("order", ORDERS)
def test_broken_rules_raise(emu, case, message, order):
    with pytest.raises(RuntimeError, match="CUDA emulation|cuda_emu") as exc:
        run(emu, case, order=order, seed=1)
    assert message in str(exc.value)
    if case not in ("host_thread_idx",):
        assert "selftest.cu:" in str(exc.value) and "block (" in str(exc.value)


@pytest.mark.parametrize("case, error, detail", [
    ("empty_grid", "invalid configuration argument", "empty grid (0, 1, 1)"),
    ("too_many_threads", "invalid configuration argument", "2048 threads, more than 1024"),
    ("grid_y", "invalid configuration argument", "exceeds (2^31 - 1, 65535, 65535)"),
    ("block_z", "invalid configuration argument", "exceeds (1024, 1024, 64)"),
    ("smem_no_optin", "invalid argument", "48 KB without cudaFuncSetAttribute"),
    ("smem_over_max", "invalid argument", "exceed 227 KB"),
])
def test_launch_validation(emu, case, error, detail):
    with pytest.raises(RuntimeError) as exc:
        run(emu, case)
    assert f"CUDA error: {error}" in str(exc.value) and detail in str(exc.value)
    assert "C10_CUDA_KERNEL_LAUNCH_CHECK" in str(exc.value) or "cudaGetLastError" in str(exc.value)


def test_unchecked_launch_error_is_raised_at_the_end_of_the_op(emu):
    with pytest.raises(RuntimeError, match="nothing checked it.*block .4096, 1, 1. exceeds"):
        run(emu, "unchecked")


def test_dynamic_shared_memory_after_opt_in(emu):
    out = run(emu, "smem_optin")
    assert out[0].item() == sum(i % 7 for i in range(25 * 1024))


def test_stats_and_kernel_names(emu):
    emu.reset_stats()
    run(emu, "block_sum", torch.rand(300))
    st = emu.stats()
    assert st["launches"] == 1 and st["blocks"] == 2 and st["threads"] == 512
    assert st["switches"] > 512 and st["ops"] == {"run": 1}
    assert any("block_sum_kernel" in k for k in st["kernels"])


# ------------------------------------------------------------------------------------------- cuBLAS

@pytest.mark.parametrize("dtype, out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                              (torch.float64, torch.float64)])
@pytest.mark.parametrize("ta, tb", [(False, False), (False, True), (True, False), (True, True)])
def test_gemm_matches_torch(emu, dtype, out_dtype, ta, tb):
    m, n, k = 7, 5, 9
    a = torch.randn(k if ta else m, m if ta else k, dtype=torch.float64).to(dtype)
    b = torch.randn(n if tb else k, k if tb else n, dtype=torch.float64).to(dtype)
    c = torch.randn(m, n, dtype=torch.float64).to(out_dtype)
    emu.enable()
    try:
        got = torch.ops.cuda_emu_selftest.gemm(a, b, ta, tb, c, True)
        fresh = torch.ops.cuda_emu_selftest.gemm(a, b, ta, tb, torch.full_like(c, math.nan), False)
    finally:
        emu.disable()
    ref = (a.T if ta else a).double() @ (b.T if tb else b).double()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[out_dtype]
    torch.testing.assert_close(got.double(), ref + c.double(), rtol=tol, atol=tol * 4)
    torch.testing.assert_close(fresh.double(), ref, rtol=tol, atol=tol * 4)  # beta = 0 never reads C


@pytest.mark.parametrize("case, status", [("ok", 0), ("lda", 7), ("ldb_trans", 7), ("ldc", 7), ("negative", 7),
                                          ("null_alpha", 7), ("bad_op", 7), ("mixed_ab", 15),
                                          ("fp32_in_fp16_out", 15), ("fp64_compute_fp32", 15)])
def test_gemm_argument_checks(emu, case, status):
    assert torch.ops.cuda_emu_selftest.gemm_status(case) == status
