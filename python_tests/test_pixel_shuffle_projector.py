"""Tests of pixel_shuffle_projector (+ its backward) against vita_ext.reference, on CPU and CUDA."""
from __future__ import annotations

import pytest
import torch

import vita_ext
from vita_ext import reference
from _utils import assert_2x_rule, host_syncs, profiled, rand

OP = torch.ops.vita_ext.pixel_shuffle_projector
OP_BWD = torch.ops.vita_ext.pixel_shuffle_projector_backward
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRAD_NAMES = ["x", "ln_weight", "ln_bias", "w1", "b1", "w2", "b2"]


def make_inputs(n, g, c, d1, d2, dtype=torch.float64, device="cpu", bias=True):
    """Fresh random projector inputs; weights scaled by 1/sqrt(fan_in) so activations stay O(1)."""
    k = 4 * c
    return dict(
        x=rand(n, g * g, c, dtype=dtype, device=device),
        ln_weight=1 + rand(k, dtype=dtype, device=device, scale=0.2),
        ln_bias=rand(k, dtype=dtype, device=device, scale=0.2),
        w1=rand(d1, k, dtype=dtype, device=device, scale=k ** -0.5),
        b1=rand(d1, dtype=dtype, device=device, scale=0.5) if bias else None,
        w2=rand(d2, d1, dtype=dtype, device=device, scale=d1 ** -0.5),
        b2=rand(d2, dtype=dtype, device=device, scale=0.5) if bias else None,
    )


def cast(inp, dtype):
    return {k: (v.to(dtype) if v is not None else None) for k, v in inp.items()}


def run_ref(inp, eps=1e-5):
    return reference.pixel_shuffle_projector(inp["x"], inp["ln_weight"], inp["ln_bias"], inp["w1"], inp["w2"], eps,
                                             b1=inp["b1"], b2=inp["b2"])


def run_op(inp, eps=1e-5, recompute=None):
    return vita_ext.pixel_shuffle_projector(inp["x"], inp["ln_weight"], inp["ln_bias"], inp["w1"], inp["w2"], eps,
                                            b1=inp["b1"], b2=inp["b2"], recompute=recompute)


def op_args(inp, eps=1e-5):
    return (inp["x"], inp["ln_weight"], inp["ln_bias"], inp["w1"], inp["b1"], inp["w2"], inp["b2"], eps)


def grads(fn, inp, grad_y):
    leaves = {k: v.detach().clone().requires_grad_(True) if v is not None else None for k, v in inp.items()}
    fn(leaves).backward(grad_y)
    return {k: v.grad for k, v in leaves.items() if v is not None}


# (N, g, C, D1, D2): tiny grids, odd N, Long-VITA's 32x32 grid with small C, and a wider C.
SHAPES = [(1, 2, 8, 12, 10), (3, 4, 16, 24, 20), (2, 6, 8, 16, 8), (2, 32, 16, 32, 24), (3, 4, 64, 48, 40)]


# ---------------------------------------------------------------------------------------------- order


@pytest.mark.parametrize("g", [2, 4, 6])
def test_pixel_shuffle_order(device, g):
    n, c = 2, 3
    x = torch.randperm(n * g * g * c, dtype=torch.float64).reshape(n, g * g, c)  # distinct values
    ps = reference.pixel_shuffle(x)
    assert ps.shape == (n, g * g // 4, 4 * c)
    # LONG_VITA.md: out[n, a*(g/2) + b, (2*dr + dc)*C + ch] = in[n, (2a+dr)*g + (2b+dc), ch]
    for i in range(n):
        for a in range(g // 2):
            for b in range(g // 2):
                for dr in range(2):
                    for dc in range(2):
                        for ch in range(c):
                            assert ps[i, a * (g // 2) + b, (2 * dr + dc) * c + ch] == x[i, (2 * a + dr) * g + 2 * b + dc, ch]
    inp = make_inputs(n, g, c, 5, 4, device=device)
    inp["x"] = x.to(device)
    torch.testing.assert_close(run_op(inp), run_ref(inp), rtol=1e-10, atol=1e-10)


# -------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_float64(device, shape, bias):
    inp = make_inputs(*shape, device=device, bias=bias)
    torch.testing.assert_close(run_op(inp), run_ref(inp), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_2x_rule(device, dtype, shape, bias):
    low = cast(make_inputs(*shape, device=device, bias=bias), dtype)
    ref64 = run_ref(cast(low, torch.float64))  # the reference starts from the same rounded inputs
    out = run_op(low)
    assert out.dtype == dtype and out.shape == (shape[0], shape[1] ** 2 // 4, shape[4])
    assert_2x_rule(out, run_ref(low), ref64)


def non_contiguous_like(x, layout):
    """A non-contiguous view with x's values: the CLS-dropping slice, a permuted layout, a channel stride."""
    n, l, c = x.shape
    if layout == "cls_slice":  # vit_out[:, 1:, :] after dropping CLS
        full = torch.cat([rand(n, 1, c, dtype=x.dtype, device=x.device), x], dim=1)
        v = full[:, 1:, :]
    elif layout == "transposed":
        v = x.transpose(0, 1).contiguous().transpose(0, 1)
    else:
        v = torch.stack([x, rand(n, l, c, dtype=x.dtype, device=x.device)], dim=-1).flatten(-2)[:, :, ::2]
    assert not v.is_contiguous() and torch.equal(v, x)
    return v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["cls_slice", "transposed", "channel_strided"])
def test_forward_non_contiguous(device, dtype, layout):
    inp = make_inputs(3, 4, 16, 24, 20, device=device)
    low = cast(inp, dtype)
    low["x"] = non_contiguous_like(low["x"], layout)
    inp["x"] = low["x"].double()
    ref64 = run_ref(inp)
    if dtype == torch.float64:
        torch.testing.assert_close(run_op(low), ref64, rtol=1e-10, atol=1e-10)
    else:
        assert_2x_rule(run_op(low), run_ref(low), ref64)


def test_forward_empty(device):
    inp = make_inputs(0, 4, 8, 12, 10, dtype=torch.float32, device=device)
    out = run_op(inp)
    assert out.shape == (0, 4, 10) and out.dtype == torch.float32
    leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}
    run_op(leaves).sum().backward()
    assert leaves["x"].grad.shape == (0, 16, 8)
    for k in ("ln_weight", "ln_bias", "w1", "b1", "w2", "b2"):
        assert torch.count_nonzero(leaves[k].grad) == 0


# ------------------------------------------------------------------------------------------- backward


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64] + DTYPES)
@pytest.mark.parametrize("shape", [(3, 4, 16, 24, 20), (2, 6, 8, 16, 8), (1, 32, 16, 32, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_backward(device, dtype, shape, bias, recompute):
    inp = make_inputs(*shape, device=device, bias=bias)
    gy = rand(shape[0], shape[1] ** 2 // 4, shape[4], dtype=torch.float64, device=device).to(dtype).double()
    inp = cast(cast(inp, dtype), torch.float64)  # the reference starts from the same rounded inputs
    ref64 = grads(run_ref, inp, gy)
    ours = grads(lambda d: run_op(d, recompute=recompute), cast(inp, dtype), gy.to(dtype))
    assert set(ours) == set(ref64)
    if dtype == torch.float64:
        for k in ref64:
            torch.testing.assert_close(ours[k], ref64[k], rtol=1e-9, atol=1e-9, msg=lambda m, k=k: f"d{k}: {m}")
        return
    plain = grads(run_ref, cast(inp, dtype), gy.to(dtype))
    for k in ref64:
        assert ours[k].dtype == dtype
        assert_2x_rule(ours[k], plain[k], ref64[k], name=f"d{k}")


@pytest.mark.parametrize("layout", ["cls_slice", "transposed", "channel_strided"])
def test_backward_non_contiguous(device, layout):
    n, g, c, d1, d2 = 2, 4, 8, 12, 10
    inp = make_inputs(n, g, c, d1, d2, device=device)
    gy = rand(n, g * g // 4, d2, dtype=torch.float64, device=device)
    ref = grads(run_ref, inp, gy)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
    if layout == "cls_slice":  # the model's call: grads flow back into the ViT output, CLS row untouched
        full = torch.cat([rand(n, 1, c, dtype=torch.float64, device=device), inp["x"]], dim=1).requires_grad_(True)
        leaves["x"] = full[:, 1:, :]
    else:
        leaves["x"] = non_contiguous_like(inp["x"], layout).detach().requires_grad_(True)
    assert not leaves["x"].is_contiguous()
    run_op(leaves).backward(gy)
    if layout == "cls_slice":
        dx = full.grad[:, 1:, :]
        assert torch.count_nonzero(full.grad[:, 0, :]) == 0
    else:
        dx = leaves["x"].grad
    torch.testing.assert_close(dx, ref["x"], rtol=1e-9, atol=1e-9)
    for k in ("ln_weight", "w1", "b2"):
        torch.testing.assert_close(leaves[k].grad, ref[k], rtol=1e-9, atol=1e-9)


def test_backward_op_returns_seven(device):
    inp = make_inputs(2, 4, 8, 12, 10, device=device, bias=False)
    gy = rand(2, 4, 10, dtype=torch.float64, device=device)
    out = OP_BWD(gy, *op_args(inp))
    assert len(out) == 7
    assert out[4].shape == (12,) and out[6].shape == (10,)
    torch.testing.assert_close(out[6], gy.sum((0, 1)))  # db2 is the row sum of grad_y even without b2
    ref = grads(run_ref, inp, gy)
    for name, got in zip(GRAD_NAMES, out):
        if name in ref:
            torch.testing.assert_close(got, ref[name], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(bias):
    inp = make_inputs(2, 4, 3, 5, 4, bias=bias)
    names = [k for k in GRAD_NAMES if inp[k] is not None]

    def fn(*tensors):
        d = dict(zip(names, tensors))
        d.setdefault("b1", None)
        d.setdefault("b2", None)
        return run_op(d)

    tensors = [inp[k].clone().requires_grad_(True) for k in names]
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6)


# -------------------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "cls_slice"])
def test_opcheck_forward(device, requires_grad, bias, layout):
    inp = make_inputs(3, 4, 8, 12, 10, dtype=torch.float32, device=device, bias=bias)
    if layout == "cls_slice":
        inp["x"] = non_contiguous_like(inp["x"], layout)
    if requires_grad:
        inp = {k: v.requires_grad_(True) if v is not None else None for k, v in inp.items()}
    torch.library.opcheck(OP.default, op_args(inp))


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_backward(device, bias):
    inp = make_inputs(3, 4, 8, 12, 10, dtype=torch.float32, device=device, bias=bias)
    gy = rand(3, 4, 10, device=device)
    torch.library.opcheck(OP_BWD.default, (gy,) + op_args(inp))


# ----------------------------------------------------------------------------------------- bad inputs


def _bad(**changes):
    inp = make_inputs(2, 4, 8, 12, 10, dtype=torch.float32)
    inp.update(changes)
    return inp


BAD = [
    (dict(x=rand(2, 1025, 8)), r"argument 'x'.*L must be g\*g with g even.*got L = 1025"),
    (dict(x=rand(2, 9, 8)), r"argument 'x'.*L must be g\*g with g even.*got L = 9"),
    (dict(x=rand(2, 12, 8)), r"argument 'x'.*L must be g\*g with g even.*got L = 12"),
    (dict(x=rand(16, 8)), r"argument 'x' must be 3-D \[N, L, C\], got shape \[16, 8\]"),
    (dict(x=torch.ones(2, 16, 8, dtype=torch.int64)), r"argument 'x' must have dtype .*got torch.int64"),
    (dict(ln_weight=rand(31)), r"argument 'ln_weight' must have size 32 in dim 0.*got shape \[31\]"),
    (dict(ln_bias=rand(33)), r"argument 'ln_bias' must have size 32 in dim 0.*got shape \[33\]"),
    (dict(w1=rand(12, 16)), r"argument 'w1' must have size 32 in dim 1.*got shape \[12, 16\]"),
    (dict(w2=rand(10, 11)), r"argument 'w2' must have size 12 in dim 1 \(D1 = w1.size\(0\)\).*got shape \[10, 11\]"),
    (dict(b1=rand(13)), r"argument 'b1' must have size 12 in dim 0.*got shape \[13\]"),
    (dict(b2=rand(9)), r"argument 'b2' must have size 10 in dim 0.*got shape \[9\]"),
    (dict(w1=rand(12, 32, dtype=torch.float64)), r"argument 'w1' must have dtype torch.float32.*got torch.float64"),
    (dict(ln_weight=rand(32, dtype=torch.bfloat16)),
     r"argument 'ln_weight' must have dtype torch.float32.*got torch.bfloat16"),
    (dict(b2=rand(10, dtype=torch.float16)), r"argument 'b2' must have dtype torch.float32.*got torch.float16"),
    (dict(w2=rand(10, 12, 1)), r"argument 'w2' must be 2-D \[D2, D1\], got shape \[10, 12, 1\]"),
]


@pytest.mark.parametrize("changes,match", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_inputs(changes, match):
    inp = _bad(**changes)
    with pytest.raises(RuntimeError, match=match):
        run_op(inp)
    n, l = (inp["x"].shape[0], inp["x"].shape[1]) if inp["x"].dim() == 3 else (2, 16)
    gy = rand(n, l // 4, 10)
    with pytest.raises(RuntimeError, match=match):
        OP_BWD(gy, *op_args(inp))


def test_bad_grad_y():
    inp = _bad()
    with pytest.raises(RuntimeError, match=r"argument 'grad_y' must have shape \[2, 4, 10\].*got \[2, 4, 11\]"):
        OP_BWD(rand(2, 4, 11), *op_args(inp))
    with pytest.raises(RuntimeError, match=r"argument 'grad_y' must have dtype torch.float32.*got torch.float64"):
        OP_BWD(rand(2, 4, 10, dtype=torch.float64), *op_args(inp))


def test_bad_device(cuda_device):
    inp = _bad()
    inp["x"] = inp["x"].to(cuda_device)
    with pytest.raises(RuntimeError, match=r"argument 'ln_weight' must be on device cuda:0.*got cpu"):
        run_op(inp)
    inp = _bad()
    inp["w2"] = inp["w2"].to(cuda_device)
    with pytest.raises(RuntimeError, match=r"argument '\w+' must be on device"):
        OP(*op_args(inp))


# ------------------------------------------------------------------ issue 12: no wasted work, no syncs
@pytest.mark.parametrize("half_gemm", ["native", "fp32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_gemm_paths(dtype, half_gemm, monkeypatch):
    # Both CPU GEMM paths for half types (native bf16/fp16 GEMMs, or fp32 as on CPUs without native
    # dot products), forward and backward, saved activations and recompute, under the 2x rule.
    monkeypatch.setenv("VITA_EXT_CPU_HALF_GEMM", half_gemm)
    shape = (3, 4, 16, 24, 20)
    inp = cast(cast(make_inputs(*shape), dtype), torch.float64)
    gy = rand(3, 4, 20, dtype=torch.float64).to(dtype).double()
    ref64, plain = grads(run_ref, inp, gy), grads(run_ref, cast(inp, dtype), gy.to(dtype))
    assert_2x_rule(run_op(cast(inp, dtype)), run_ref(cast(inp, dtype)), run_ref(inp), "y")
    for recompute in (False, True):
        ours = grads(lambda d: run_op(d, recompute=recompute), cast(inp, dtype), gy.to(dtype))
        for k in ref64:
            assert_2x_rule(ours[k], plain[k], ref64[k], name=f"d{k} (recompute={recompute})")


def _backward_profile(inp, trainable, recompute):
    leaves = {k: (v.detach().clone().requires_grad_(k in trainable) if v is not None else None)
              for k, v in inp.items()}
    y = run_op(leaves, recompute=recompute)
    gy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)
    counts, allocs = profiled(lambda: y.backward(gy))
    return {k: v.grad for k, v in leaves.items() if v is not None and v.grad is not None}, counts, allocs


def _gemms(counts):
    return sum(counts.get(n, 0) for n in ("aten::mm", "aten::addmm"))


@pytest.mark.parametrize("recompute", [False, True])
def test_frozen_vit_gets_no_dx_work(recompute):
    # Stage 1 (projector trains, ViT frozen): no dx buffer, the parameter gradients unchanged; with the
    # LayerNorm frozen too, not even the dxn GEMM.
    inp = make_inputs(4, 8, 32, 24, 20, dtype=torch.float32)
    dx_bytes = inp["x"].numel() * 4
    params = {"ln_weight", "ln_bias", "w1", "b1", "w2", "b2"}
    full, full_counts, full_allocs = _backward_profile(inp, params | {"x"}, recompute)
    frozen, counts, allocs = _backward_profile(inp, params, recompute)
    assert set(frozen) == params
    for k in params:
        torch.testing.assert_close(frozen[k], full[k], rtol=0, atol=0)
    # One x-sized buffer fewer than with x trainable: dx (xn and dxn have x's size too).
    x_sized = [a for a in allocs if a[1] >= dx_bytes]
    assert len(x_sized) == len([a for a in full_allocs if a[1] >= dx_bytes]) - 1, (x_sized, full_allocs)
    assert _gemms(counts) == _gemms(full_counts)  # dxn is still needed for the LayerNorm parameters
    only_linear, counts, _ = _backward_profile(inp, {"w1", "w2"}, recompute)
    assert set(only_linear) == {"w1", "w2"}
    assert _gemms(counts) == _gemms(full_counts) - 1  # no dxn = dh @ w1
    torch.testing.assert_close(only_linear["w1"], full["w1"], rtol=0, atol=0)
    only_w2, counts, _ = _backward_profile(inp, {"w2"}, recompute)
    assert _gemms(counts) == (1 if not recompute else 2)  # dW2 (+ the recomputed h)
    torch.testing.assert_close(only_w2["w2"], full["w2"], rtol=0, atol=0)


def test_backward_op_output_mask():
    inp = make_inputs(2, 4, 8, 12, 10, dtype=torch.float32)
    gy = rand(2, 4, 10)
    full = OP_BWD(gy, *op_args(inp))
    mask = [False, True, False, True, False, False, True]
    part = OP_BWD(gy, *op_args(inp), None, None, None, None, mask)
    for want, f, p in zip(mask, full, part):
        if want:
            torch.testing.assert_close(p, f, rtol=0, atol=0)
        else:
            assert p.shape == (0,)
    y, xn, h, g, stats = OP(*op_args(inp), True)
    assert xn.shape == (8, 32) and h.shape == (8, 12) and g.shape == (8, 12) and stats.shape == (2, 8)
    saved = OP_BWD(gy, *op_args(inp), xn, h, g, stats, [True] * 7)
    for a, b in zip(saved, full):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match=r"'xn', 'h', 'g' and 'stats'.*all four or none, got 2"):
        OP_BWD(gy, *op_args(inp), xn, h, None, None, [True] * 7)
    with pytest.raises(RuntimeError, match=r"argument 'h' must have shape \[8, 12\].*got \[8, 11\]"):
        OP_BWD(gy, *op_args(inp), xn, h[:, :11], g, stats, [True] * 7)
    with pytest.raises(RuntimeError, match=r"argument 'stats' must have dtype torch.float32, got torch.float64"):
        OP_BWD(gy, *op_args(inp), xn, h, g, stats.double(), [True] * 7)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_saved_and_masks(device, bias):
    inp = make_inputs(3, 4, 8, 12, 10, dtype=torch.float32, device=device, bias=bias)
    torch.library.opcheck(OP.default, op_args(inp) + (True,))
    _, xn, h, g, stats = OP(*op_args(inp), True)
    gy = rand(3, 4, 10, device=device)
    torch.library.opcheck(OP_BWD.default, (gy,) + op_args(inp) + (xn, h, g, stats, [True] * 7))
    torch.library.opcheck(OP_BWD.default, (gy,) + op_args(inp) + (None, None, None, None,
                                                                   [False, True, True, True, False, True, False]))
    grad_inp = {k: v.requires_grad_(True) if v is not None else None for k, v in inp.items()}
    torch.library.opcheck(OP.default, op_args(grad_inp) + (True,))


def test_no_host_sync():
    inp = make_inputs(2, 4, 8, 12, 10, dtype=torch.bfloat16)
    leaves = {k: v.requires_grad_(True) for k, v in inp.items()}
    box = {}
    counts, _ = profiled(lambda: box.setdefault("y", run_op(leaves)))
    assert host_syncs(counts) == {}
    counts, _ = profiled(lambda: box["y"].sum().backward())
    assert host_syncs(counts) == {}


@pytest.mark.skipif(not vita_ext.build_info()["cuda"], reason="the wrapper rejects CUDA tensors in a CPU-only build")
def test_fake_cuda_tensors_no_data_dependence():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        inp = {k: torch.empty(v.shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for k, v in make_inputs(2, 4, 8, 12, 10).items()}
        for recompute in (None, False):
            y = run_op(inp, recompute=recompute)
            # The backward node called directly (the autograd engine wants a real CUDA device).
            g = y.grad_fn.apply(torch.ones_like(y), None, None, None, None)
            got = dict(zip(("x", "ln_weight", "ln_bias", "w1", "b1", "w2", "b2"), g))
            assert all(got[k].shape == v.shape and got[k].device.type == "cuda" for k, v in inp.items())


@pytest.mark.cuda
def test_no_sync_under_cuda_sync_debug_mode(cuda_device):
    inp = {k: v.requires_grad_(True) for k, v in make_inputs(2, 4, 8, 12, 10, dtype=torch.bfloat16,
                                                             device=cuda_device).items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for recompute in (True, False):
            run_op(inp, recompute=recompute).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------- NaN / Inf (issue 11 item 3)
@pytest.mark.parametrize("where", ["x_nan", "x_inf", "w1_nan", "ln_weight_inf", "b2_nan", "w2_neginf"])
@pytest.mark.parametrize("recompute", [False, True])
def test_nan_inf_propagate_as_pytorch(device, where, recompute):
    inp = make_inputs(2, 4, 8, 12, 10, device=device)
    name, kind = where.split("_")[0] + ("_weight" if where.startswith("ln") else ""), where.rsplit("_", 1)[1]
    value = {"nan": float("nan"), "inf": float("inf"), "neginf": float("-inf")}[kind]
    inp[name].view(-1)[3] = value
    gy = rand(2, 4, 10, dtype=torch.float64, device=device)
    ref = grads(run_ref, inp, gy)
    ours = grads(lambda d: run_op(d, recompute=recompute), cast(inp, torch.float32), gy.float())
    y_ref, y = run_ref(inp), run_op(cast(inp, torch.float32))
    for k, a, b in [("y", y, y_ref)] + [(f"d{k}", ours[k], ref[k]) for k in ref]:
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{k}: NaN at different places ({where})"
        assert torch.equal(torch.isinf(a), torch.isinf(b)), f"{k}: Inf at different places ({where})"
        fin = torch.isfinite(b)
        torch.testing.assert_close(a[fin].double(), b[fin], rtol=1e-4, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
