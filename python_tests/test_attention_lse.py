"""attention_lse / attention_lse_backward against vita_ext.reference.attention_lse (float64 yardstick),
through every backend that can serve the device (vita_ext's kernels, PyTorch's flash kernels, flash-attn)."""
import pytest
import torch

import vita_ext
from vita_ext import reference as R
from vita_ext.ops.attention_dispatch import AttentionCall, why_not
from _utils import assert_2x_rule, max_err, rand


@pytest.fixture(params=["vita", "flash", "flash_attn"])
def backend(request, device):
    from conftest import emulating

    if emulating() and request.param != "vita":
        pytest.skip("CUDA emulation runs vita_ext's own CUDA kernels (the vita backend) only")
    reason = why_not(request.param, AttentionCall(device.type, torch.bfloat16, 16, False))
    if reason is not None:
        pytest.skip(f"backend {request.param} on {device.type}: {reason}")
    return request.param

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (B, Sq, Sk, Hq, Hkv, D): MHA and GQA, Sq == Sk, KV-cache prefix (Sq < Sk), decode, Sq > Sk (rows that
# see no key when causal), odd sizes and the head dims of the models (64, 128) and others.
SHAPES = [
    (2, 33, 33, 6, 2, 64),
    (2, 7, 130, 4, 1, 32),
    (2, 1, 257, 4, 4, 80),
    (1, 130, 33, 4, 2, 16),
    (2, 1, 1, 2, 1, 128),
    (1, 257, 257, 2, 2, 32),
]
CU = [0, 5, 5, 17, 40]  # three packed sequences and an empty one


def _r64(*shape, device="cpu"):
    return rand(*shape, dtype=torch.float64, device=device)


def _qkv(shape, device, dtype=torch.float64):
    b, sq, sk, hq, hkv, d = shape
    return (rand(b, sq, hq, d, dtype=dtype, device=device), rand(b, sk, hkv, d, dtype=dtype, device=device),
            rand(b, sk, hkv, d, dtype=dtype, device=device))


def _check_forward(q, k, v, dtype, causal, scale=None, cu=None, backend="vita"):
    """q, k, v in float64 (any layout); the op runs on their dtype-cast copies, keeping the layout. The
    float64 reference starts from those same rounded inputs (as flash-attention's tests do), so both
    errors measure the computation, not the rounding of the inputs they share."""
    cast = [t.to(dtype) for t in (q, k, v)]
    out, lse = vita_ext.attention_lse(*cast, causal=causal, softmax_scale=scale, cu_seqlens=cu, backend=backend)
    plain = R.attention_lse(*cast, causal, scale, cu)
    ref = R.attention_lse(*(t.double() for t in cast), causal, scale, cu)
    assert out.dtype == dtype and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == ref[1].shape
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref[1])), "rows without keys must have lse = -inf"
    assert_2x_rule(out, plain[0], ref[0], "out")
    assert_2x_rule(lse, plain[1], ref[1], "lse")
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward(device, backend, shape, causal, dtype):
    q, k, v = _qkv(shape, device)
    out, lse = _check_forward(q, k, v, dtype, causal, backend=backend)
    if causal and shape[1] > shape[2]:
        dead = shape[1] - shape[2]  # bottom-right aligned: the first Sq - Sk rows see nothing
        assert (out[:, :dead] == 0).all() and torch.isneginf(lse[:, :, :dead]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_non_contiguous_and_scale(device, backend, dtype):
    b, sq, sk, hq, hkv, d = 2, 19, 37, 6, 3, 32
    q = _r64(b, sq + 4, hq + 1, d + 8, device=device)[:, 2:2 + sq, 1:, 3:3 + d]  # slices of a larger buffer
    k = _r64(b, hkv, sk, d, device=device).transpose(1, 2)                       # [B, H, S, D] storage
    v = _r64(b, sk, hkv, 2 * d, device=device)[..., ::2]                        # last dim stride 2
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    for causal in (False, True):
        _check_forward(q, k, v, dtype, causal, scale=0.3, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_forward_cu_seqlens(device, backend, causal, dtype, cu_dtype):
    cu = torch.tensor(CU, dtype=cu_dtype, device=device)
    q, k, v = _qkv((1, CU[-1], CU[-1], 4, 2, 16), device)
    _check_forward(q, k, v, dtype, causal, cu=cu, backend=backend)


def test_forward_cu_seqlens_long_segments(device, backend):
    # Segments longer than a tile, boundaries inside tiles: tile skipping and per-element masking.
    cu = torch.tensor([0, 70, 71, 200, 333], device=device)
    q, k, v = _qkv((1, 333, 333, 2, 1, 32), device)
    for causal in (False, True):
        _check_forward(q, k, v, torch.float32, causal, cu=cu, backend=backend)


@pytest.mark.parametrize("shape", [(0, 5, 5, 2, 1, 16), (2, 0, 5, 2, 1, 16), (2, 5, 0, 2, 1, 16)])
def test_forward_empty(device, backend, shape):
    q, k, v = _qkv(shape, device, torch.float32)
    out, lse = vita_ext.attention_lse(q, k, v, causal=True, backend=backend)
    assert out.shape == q.shape and lse.shape == (shape[0], shape[3], shape[1])
    if out.numel():
        assert (out == 0).all() and torch.isneginf(lse).all()


def test_fp64_lse_dtype():
    q, k, v = _qkv((1, 3, 4, 2, 1, 8), "cpu")
    _, lse = vita_ext.attention_lse(q, k, v)
    assert lse.dtype == torch.float64
    torch.library.opcheck(torch.ops.vita_ext.attention_lse.default, (q, k, v, False, 0.5, None))  # fake agrees


# ---------------------------------------------------------------------------------------------------
# Backward


def _grads(fn, q, k, v, go, gl):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    return torch.autograd.grad((out, lse), (q, k, v), (go.to(out.dtype), gl.to(lse.dtype)))


def _grads_out(fn, q, k, v, go):
    """Gradients of a loss on out only (lse unused, as in a model): the flash backends' own backward."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, _ = fn(q, k, v)
    return torch.autograd.grad(out, (q, k, v), go.to(out.dtype))


def _check_backward(q, k, v, dtype, causal, scale=None, cu=None, backend="vita", lse_grad=True):
    """lse_grad: whether the loss also reaches lse (then every backend's backward runs the vita kernel).
    A backend that cannot serve a call needing gradients must refuse it with its reason."""
    b, sq, hq, d = q.shape
    reason = why_not(backend, AttentionCall(q.device.type, dtype, d, cu is not None, True))
    if reason is not None:
        x = q.to(dtype).requires_grad_()
        with pytest.raises(ValueError, match=f"backend '{backend}' cannot serve"):
            vita_ext.attention_lse(x, k.to(dtype), v.to(dtype), causal=causal, cu_seqlens=cu, backend=backend)
        return
    go = rand(b, sq, hq, d, device=q.device)
    gl = rand(b, hq, sq, device=q.device) * (1.0 if lse_grad else 0.0)
    cast = [t.to(dtype) for t in (q, k, v)]
    if lse_grad:
        ours = _grads(lambda *a: vita_ext.attention_lse(*a, causal=causal, softmax_scale=scale, cu_seqlens=cu,
                                                        backend=backend), *cast, go, gl)
    else:
        ours = _grads_out(lambda *a: vita_ext.attention_lse(*a, causal=causal, softmax_scale=scale, cu_seqlens=cu,
                                                            backend=backend), *cast, go)
    plain = _grads(lambda *a: R.attention_lse(*a, causal, scale, cu), *cast, go, gl)
    ref = _grads(lambda *a: R.attention_lse(*a, causal, scale, cu), *(t.double() for t in cast), go, gl)
    # Forced-only (auto never picks it): PyTorch's fp32 CPU flash backward, SDPA's own error (measured up to
    # ~5x plain PyTorch's), so it is held to a looser bound.
    forced_only = why_not(backend, AttentionCall(q.device.type, dtype, d, cu is not None, True), auto=True)
    for name, o, p, r, x in zip(("dq", "dk", "dv"), ours, plain, ref, cast):
        assert o.dtype == dtype and o.shape == x.shape
        assert_2x_rule(o, p, r, name, factor=8.0 if forced_only and not lse_grad else 2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_backward(device, backend, shape, causal, dtype):
    _check_backward(*_qkv(shape, device), dtype, causal, backend=backend, lse_grad=backend == "vita")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=lambda s: "x".join(map(str, s)))
def test_backward_lse_gradient(device, backend, shape, dtype):
    # A loss on lse too: the flash kernels take no lse gradient, so the vita backward runs with the flash
    # forward's out and lse.
    _check_backward(*_qkv(shape, device), dtype, True, backend=backend, lse_grad=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_backward_cu_seqlens_non_contiguous(device, backend, causal, dtype):
    cu = torch.tensor(CU, device=device)
    s = CU[-1]
    q = _r64(1, s, 4, 40, device=device)[..., 4:36]
    k = _r64(1, 2, s, 32, device=device).transpose(1, 2)
    v = _r64(1, s, 2, 32, device=device)
    _check_backward(q, k, v, dtype, causal, scale=0.2, cu=cu, backend=backend, lse_grad=backend == "vita")


@pytest.mark.parametrize("threads", [1, 4])
def test_backward_schedules(threads):
    # The CPU backward has two schedules (one task per (b, kv head), or a dQ pass + a dK/dV pass),
    # picked by B * Hkv against the thread count: run one problem through both.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_backward(*_qkv((1, 150, 150, 4, 1, 32), "cpu"), torch.float32, True)
        _check_backward(*_qkv((2, 100, 70, 2, 2, 16), "cpu"), torch.float32, False)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("limit", [0, 1 << 30], ids=["native", "upcast"])
def test_flash_cpu_backward_precisions(monkeypatch, dtype, limit):
    # The CPU flash backward runs a reduced-precision block in fp32 when keys x head_dim <= the limit
    # (speed, flash_attention.UPCAST_BACKWARD_MAX), natively otherwise: both held to the 2x rule, on
    # varlen blocks of odd sizes, a Sk > Sq block pair and GQA.
    from vita_ext.ops import flash_attention as fa

    monkeypatch.setattr(fa, "UPCAST_BACKWARD_MAX", limit)
    cu = torch.tensor([0, 30, 31, 150])
    _check_backward(*_qkv((1, 150, 150, 4, 2, 32), "cpu"), dtype, True, cu=cu, backend="flash", lse_grad=False)
    _check_backward(*_qkv((2, 40, 97, 4, 1, 32), "cpu"), dtype, True, backend="flash", lse_grad=False)
    _check_backward(*_qkv((1, 65, 65, 2, 2, 64), "cpu"), dtype, False, backend="flash", lse_grad=False)


def test_backward_rows_without_keys_are_zero(device, backend):
    q, k, v = _qkv((1, 9, 4, 2, 1, 16), device, torch.bfloat16 if backend == "flash" else torch.float32)
    q.requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    out, lse = vita_ext.attention_lse(q, k, v, causal=True, backend=backend)
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert (q.grad[:, :5] == 0).all()


@pytest.mark.parametrize("case", ["causal_gqa", "cu_seqlens", "decode"])
def test_gradcheck(case):
    if case == "causal_gqa":
        q, k, v = _qkv((1, 5, 7, 4, 2, 8), "cpu")
        kwargs = dict(causal=True, softmax_scale=0.4)
    elif case == "cu_seqlens":
        q, k, v = _qkv((1, 7, 7, 2, 1, 8), "cpu")
        kwargs = dict(causal=True, cu_seqlens=torch.tensor([0, 3, 3, 7]))
    else:
        q, k, v = _qkv((2, 1, 6, 2, 2, 8), "cpu")
        kwargs = dict(causal=True)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *a: vita_ext.attention_lse(*a, **kwargs), inputs)


def test_ring_backward_with_global_out_lse(device, backend):
    # Ring attention: queries and keys split in two chunks under a global causal mask. Blocks are
    # (q0, k0) causal, (q1, k0) full, (q1, k1) causal; each block's backward gets the GLOBAL out/lse of its
    # queries. The summed block gradients must equal the gradient of the whole attention.
    b, s, h, hkv, d = 2, 40, 4, 2, 16
    dtype = torch.float32 if backend == "vita" else torch.bfloat16
    q, k, v = _qkv((b, s, s, h, hkv, d), device, dtype)
    go, gl = rand(b, s, h, d, device=device), rand(b, h, s, device=device)
    m = 17
    q0, q1, k0, k1, v0, v1 = q[:, :m], q[:, m:], k[:, :m], k[:, m:], v[:, :m], v[:, m:]
    out0, lse0 = vita_ext.attention_lse(q0, k0, v0, causal=True, backend=backend)
    out1, lse1 = vita_ext.attention_lse(q1, k0, v0, causal=False, backend=backend)
    blk_out, blk_lse = vita_ext.attention_lse(q1, k1, v1, causal=True, backend=backend)
    out1 = out1.float()  # a ring merges in fp32 and casts once at the end
    vita_ext.merge_attention_(out1, lse1, blk_out, blk_lse)
    out, lse = torch.cat([out0, out1.to(dtype)], 1), torch.cat([lse0, lse1], 2)
    ref = R.attention_lse(q.double(), k.double(), v.double(), True)
    if backend == "vita":
        assert max_err(out, ref[0]) < 1e-5 and max_err(lse, ref[1]) < 1e-5
    else:
        plain = R.attention_lse(q, k, v, True)
        assert_2x_rule(out, plain[0], ref[0], "out")
        assert_2x_rule(lse, plain[1], ref[1], "lse")

    if backend != "vita":
        gl = torch.zeros_like(gl)  # the flash backward takes no lse gradient (a ring never needs one)

    def bwd(g, glse, q_, k_, v_, o, lse_, causal):
        return vita_ext.ops.attention_lse_backward(g, q_, k_, v_, o, lse_, causal, d ** -0.5,
                                                   grad_lse=glse if backend == "vita" else None, backend=backend)

    g0, g1, gl0, gl1 = go[:, :m].to(dtype), go[:, m:].to(dtype), gl[:, :, :m], gl[:, :, m:]
    dq0, dk0a, dv0a = bwd(g0, gl0, q0, k0, v0, out0, lse0, True)
    dq1a, dk0b, dv0b = bwd(g1, gl1, q1, k0, v0, out1, lse1, False)
    dq1b, dk1, dv1 = bwd(g1, gl1, q1, k1, v1, out1, lse1, True)
    f32 = [t.float() for t in (dq0, dq1a, dq1b, dk0a, dk0b, dk1, dv0a, dv0b, dv1)]
    ours = (torch.cat([f32[0], f32[1] + f32[2]], 1), torch.cat([f32[3] + f32[4], f32[5]], 1),
            torch.cat([f32[6] + f32[7], f32[8]], 1))
    want = _grads(lambda *a: R.attention_lse(*a, True), q.double(), k.double(), v.double(), go.double(), gl.double())
    if backend == "vita":
        for name, o, w in zip(("dq", "dk", "dv"), ours, want):
            assert max_err(o, w) < 2e-5 * max(1.0, w.abs().max().item()), name
    else:
        plain = _grads(lambda *a: R.attention_lse(*a, True), q, k, v, go.to(dtype), gl)
        for name, o, p, w in zip(("dq", "dk", "dv"), ours, plain, want):
            assert_2x_rule(o.to(dtype), p, w, name)


def test_backward_fp32_out_with_half_inputs(device, backend):
    # A ring may keep the merged out in fp32 while q/k/v are bf16: the backward accepts it.
    q, k, v = _qkv((1, 12, 12, 2, 1, 16), device, torch.bfloat16)
    out, lse = vita_ext.attention_lse(q, k, v, causal=True, backend=backend)
    go = rand(1, 12, 2, 16, dtype=torch.bfloat16, device=device)
    bwd = vita_ext.ops.attention_lse_backward
    a = bwd(go, q, k, v, out, lse, True, 0.25, backend=backend)
    b = bwd(go, q, k, v, out.float(), lse, True, 0.25, backend=backend)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------------
# opcheck


@pytest.mark.parametrize("cu", [False, True])
def test_opcheck(device, cu):
    s = 12
    q, k, v = (t.float().requires_grad_() for t in _qkv((1, s, s, 4, 2, 16), device))
    cus = torch.tensor([0, 5, 12], device=device) if cu else None
    torch.library.opcheck(torch.ops.vita_ext.attention_lse.default, (q, k, v, True, 0.25, cus))
    with torch.no_grad():
        out, lse = vita_ext.attention_lse(q, k, v, True, 0.25, cus)
    go, gl = rand(1, s, 4, 16, device=device), rand(1, 4, s, device=device)
    args = (go, gl, q.detach(), k.detach(), v.detach(), out, lse, True, 0.25, cus)
    torch.library.opcheck(torch.ops.vita_ext.attention_lse_backward.default, args)
    torch.library.opcheck(torch.ops.vita_ext.attention_lse_backward.default, (go, None) + args[2:])


# ---------------------------------------------------------------------------------------------------
# Bad inputs


def _bad_cases(device):
    q, k, v = _qkv((1, 6, 6, 4, 2, 16), device, torch.float32)
    return [
        ((q.long(), k, v, None), "argument 'q' must have dtype"),
        ((q, k.half(), v, None), "argument 'k' must have dtype torch.float32"),
        ((q, k, v.double(), None), "argument 'v' must have dtype torch.float32"),
        ((q[0], k, v, None), r"argument 'q' must be 4-D"),
        ((q, k[..., :8], v, None), "argument 'k' must have size 16 in dim 3"),
        ((q, k, v[:, :5], None), "argument 'v' must have shape"),
        ((q, k[:, :, :1].expand(1, 6, 3, 16), v[:, :, :1].expand(1, 6, 3, 16), None), "argument 'k' must have a number of heads"),
        ((q, k, v, torch.tensor([0, 6.0], device=device)), "argument 'cu_seqlens' must have dtype"),
        ((q, k, v, torch.tensor([0, 3, 5], device=device)), "argument 'cu_seqlens' must end at the sequence length 6"),
        ((q, k, v, torch.tensor([0, 4, 2, 6], device=device)), "argument 'cu_seqlens' must be non-decreasing"),
        ((q, k, v, torch.tensor([1, 6], device=device)), "argument 'cu_seqlens' must start at 0"),
        ((q, k, v, torch.tensor([[0, 6]], device=device)), "argument 'cu_seqlens' must be 1-D"),
        ((q.expand(2, 6, 4, 16), k.expand(2, 6, 2, 16), v.expand(2, 6, 2, 16), torch.tensor([0, 6], device=device)),
         "argument 'cu_seqlens' requires batch size 1"),
        ((q, k[:, :5], v[:, :5], torch.tensor([0, 6], device=device)), "argument 'cu_seqlens' requires Sq == Sk"),
        ((rand(1, 2, 2, 300, device=device), rand(1, 2, 2, 300, device=device), rand(1, 2, 2, 300, device=device), None),
         r"argument 'q' must have a head dim \(dim 3\) in \[1, 256\]"),
    ]


def test_bad_inputs(device):
    for (q, k, v, cu), match in _bad_cases(device):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.vita_ext.attention_lse(q, k, v, False, 0.25, cu)


def test_bad_backward_inputs(device):
    q, k, v = _qkv((1, 6, 6, 4, 2, 16), device, torch.float32)
    out, lse = vita_ext.attention_lse(q, k, v)
    go = torch.randn_like(out)
    bwd = torch.ops.vita_ext.attention_lse_backward
    cases = [
        ((go.half(), None, q, k, v, out, lse), "argument 'grad_out' must have dtype torch.float32"),
        ((go[:, :5], None, q, k, v, out, lse), "argument 'grad_out' must have shape"),
        ((go, None, q, k, v, out.half(), lse), "argument 'out' must have dtype torch.float32"),
        ((go, None, q, k, v, out, lse.double()), "argument 'lse' must have dtype torch.float32"),
        ((go, None, q, k, v, out, lse[:, :2]), "argument 'lse' must have shape"),
        ((go, lse[..., :3], q, k, v, out, lse), "argument 'grad_lse' must have shape"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            bwd(*args, False, 0.25, None)


def test_wrong_device():
    if not torch.cuda.is_available() or not vita_ext.build_info()["cuda"]:
        pytest.skip("needs a CUDA GPU and a build with CUDA kernels")
    q, k, v = _qkv((1, 6, 6, 4, 2, 16), "cuda", torch.float32)
    with pytest.raises(RuntimeError, match="argument 'k' must be on device cuda"):
        torch.ops.vita_ext.attention_lse(q, k.cpu(), v, False, 0.25, None)
    with pytest.raises(RuntimeError, match="argument 'q' must have dtype .* on CUDA"):
        torch.ops.vita_ext.attention_lse(q.double(), k.double(), v.double(), False, 0.25, None)


def test_bad_max_seqlen(device, backend):
    q, k, v = _qkv((1, 6, 6, 4, 2, 16), device, torch.bfloat16)
    cu = torch.tensor([0, 2, 6], device=device)
    with pytest.raises(RuntimeError, match=r"argument 'max_seqlen' must be in \[0, 6\] .*got 7"):
        vita_ext.attention_lse(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=7, backend=backend)
    if backend == "vita":
        with pytest.raises(RuntimeError, match=r"argument 'max_seqlen' must be in \[0, 6\] .*got -1"):
            torch.ops.vita_ext.attention_lse(q, k, v, True, 0.25, cu, -1)
    # on the CPU the offsets are still checked on the host even with max_seqlen
    if device.type == "cpu":
        with pytest.raises(RuntimeError, match="argument 'cu_seqlens' must end at the sequence length 6"):
            vita_ext.attention_lse(q, k, v, causal=True, cu_seqlens=cu[:2], max_seqlen=2, backend=backend)


# ------------------------------------------------------------------ NaN / Inf (issue 11, item 3)
NAN, INF = float("nan"), float("inf")
# (what is poisoned, where): rows/keys chosen to fall inside partly visible tiles of both kernels
POISON = {
    "q_nan": lambda q, k, v: q[0, 70, 1].__setitem__(0, NAN),
    "k_nan": lambda q, k, v: k[0, 100, 1].__setitem__(3, NAN),
    "v_nan": lambda q, k, v: v[0, 100, 1].__setitem__(3, NAN),
    "v_inf": lambda q, k, v: v[0, 30, 0].__setitem__(2, INF),
    "k_inf": lambda q, k, v: k[0, 100, 1].__setitem__(3, INF),
    "q_neg_inf": lambda q, k, v: (q[0, 70, 0].fill_(-INF), k[0, :, 0].abs_().add_(0.1)),
}


def _same_non_finite(ours, ref, name):
    for what, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        a, b = test(ours.cpu()), test(ref.cpu())
        assert torch.equal(a, b), f"{name}: {what} at {int(a.sum())} places, the reference has {int(b.sum())}"


def _poisoned(case, dtype, device):
    q, k, v = _qkv((1, 150, 150, 4, 2, 16), "cpu")
    POISON[case](q, k, v)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", ["full", "causal", "cu_seqlens"])
@pytest.mark.parametrize("case", sorted(POISON))
def test_non_finite_inputs_propagate(device, backend, case, mask, dtype):
    """vita: NaN/Inf reach exactly the outputs the float64 spec says (visible pairs only); the rest is exact.
    flash (PyTorch's own kernel): never hides one -- every NaN of the spec is NaN here -- but a NaN value
    may also reach rows that a partly masked tile hides, and a row whose scores are all -inf gets lse 0."""
    q, k, v = _poisoned(case, dtype, device)
    cu = torch.tensor([0, 60, 150], device=device) if mask == "cu_seqlens" else None
    out, lse = vita_ext.attention_lse(q, k, v, causal=mask != "full", cu_seqlens=cu, backend=backend)
    ref_out, ref_lse = R.attention_lse(q.double(), k.double(), v.double(), mask != "full", None, cu)
    if backend != "vita":
        for name, ours, ref in (("out", out, ref_out), ("lse", lse, ref_lse)):
            hidden = (~torch.isnan(ours.cpu()) & torch.isnan(ref.cpu())).sum()
            assert hidden == 0, f"{name}: {int(hidden)} NaN of the spec hidden"
        both = torch.isfinite(ref_out) & torch.isfinite(out)
        tol = 1e-6 if dtype == torch.float32 else 2e-2
        assert max_err(out[both], ref_out[both]) < tol
        return
    _same_non_finite(out, ref_out, "out")
    _same_non_finite(lse, ref_lse, "lse")
    finite = torch.isfinite(ref_out)
    assert finite.any() and not (finite.all() and torch.isfinite(ref_lse).all())  # some, not all, poisoned
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert max_err(out[finite], ref_out[finite]) < tol
    fin_lse = torch.isfinite(ref_lse)
    assert max_err(lse[fin_lse], ref_lse[fin_lse]) < 1e-5


@pytest.mark.parametrize("case", ["q_nan", "k_nan", "v_nan", "k_inf"])
def test_non_finite_like_pytorch_sdpa(case):
    """Without a mask the contract is exactly PyTorch's own attention (SDPA, math backend)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _poisoned(case, torch.float64, "cpu")
    out, lse = vita_ext.attention_lse(q, k, v)
    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              enable_gqa=True).transpose(1, 2)
    _same_non_finite(out, want, "out vs SDPA")
    ok = torch.isfinite(want)
    assert max_err(out[ok], want[ok]) < 1e-10


def test_nan_is_not_hidden():
    """The reports of issue 11: a NaN in q gave out = 0, lse = -inf; one NaN key zeroed every row."""
    q, k, v = _qkv((1, 9, 9, 2, 1, 8), "cpu", torch.float32)
    q[0, 4, 0, 0] = NAN
    out, lse = vita_ext.attention_lse(q, k, v, causal=True)
    assert torch.isnan(out[0, 4, 0]).all() and torch.isnan(lse[0, 0, 4])
    assert torch.isfinite(out[0, :, 1]).all() and torch.isfinite(out[0, :4]).all()
    q, k, v = _qkv((1, 9, 9, 2, 1, 8), "cpu", torch.float32)
    k[0, 6, 0, 0] = NAN
    out, lse = vita_ext.attention_lse(q, k, v, causal=True)
    assert torch.isnan(out[0, 6:]).all() and torch.isnan(lse[0, :, 6:]).all()  # the rows that see key 6
    assert torch.isfinite(out[0, :6]).all() and torch.isfinite(lse[0, :, :6]).all()  # the rows that do not


@pytest.mark.parametrize("mask", ["causal", "cu_seqlens"])
@pytest.mark.parametrize("case", ["q_nan", "k_nan", "v_nan", "k_inf", "grad_nan"])
def test_non_finite_gradients(device, case, mask):
    """dq, dk, dv are non-finite exactly where autograd of the (pairwise) float64 spec makes them so."""
    q, k, v = _poisoned(case if case != "grad_nan" else "q_nan", torch.float32, device)
    if case == "grad_nan":
        q = _poisoned("k_nan", torch.float32, device)[0]  # finite q (k_nan leaves q alone)
    go = rand(*q.shape, device=device)
    if case == "grad_nan":
        go[0, 70, 1, 2] = NAN
    cu = torch.tensor([0, 60, 150], device=device) if mask == "cu_seqlens" else None
    grads = []
    for fn, dt in ((vita_ext.attention_lse, torch.float32),
                   (lambda *a, **kw: R.attention_lse(*a, pairwise=True, **kw), torch.float64)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out, _ = fn(*leaves, causal=True, cu_seqlens=cu)
        (out * go.to(dt)).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, ours, ref in zip(("dq", "dk", "dv"), *grads):
        _same_non_finite(ours, ref, name)
        ok = torch.isfinite(ref)
        assert max_err(ours[ok], ref[ok]) < 1e-4, name
    assert not all(torch.isfinite(g).all() for g in grads[0])


def test_head_dim_zero_is_a_clear_error():
    q = torch.randn(1, 3, 2, 0)
    with pytest.raises(RuntimeError, match=r"argument 'q' must have a head dim \(dim 3\) in \[1, 256\]"):
        vita_ext.attention_lse(q, q, q)
    with pytest.raises(ValueError, match="head dim"):
        R.attention_lse(q, q, q)
