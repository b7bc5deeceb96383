"""The emulated CUDA kernels next to the CPU twins, in one process: same fresh random inputs, every
dtype the CUDA op accepts, all three thread/block orders. Forward outputs and gradients must agree
with the CPU twin at the dtype's tolerance and pass the project's 2x rule against float64."""
import pytest
import torch

import vita_ext
from vita_ext import reference as R
from _utils import assert_2x_rule, rand
from conftest import COMPARISONS

ORDERS = ["forward", "reverse", "random"]
HALF = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def both(emu, order, fn):
    """(CPU twin result, emulated CUDA result) of fn()."""
    cpu = fn()
    emu.enable(order=order, seed=11)
    try:
        cuda = fn()
    finally:
        emu.disable()
    return cpu, cuda


def close(a, b, dtype, name):
    COMPARISONS["side_by_side"] += 1
    assert a.shape == b.shape and a.dtype == b.dtype, name
    assert not torch.isnan(b).any(), f"{name}: NaN from the emulated kernel"
    scale = max(1.0, a.double().abs().max().item()) if a.numel() else 1.0
    torch.testing.assert_close(b.double(), a.double(), rtol=TOL[dtype], atol=TOL[dtype] * scale, msg=name)


def grads(fn, inputs, cot):
    xs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    gs = torch.autograd.grad(outs, xs, [c.to(o.dtype) for c, o in zip(cot, outs)])
    return [o.detach() for o in outs] + list(gs)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("causal, packed, d", [(False, False, 40), (True, False, 40), (True, True, 40),
                                               (True, False, 160)])  # D = 160 runs the DMAX = 256 tiles
def test_attention_lse(emu, order, dtype, causal, packed, d):
    b, s, hq, hkv = (1, 45, 4, 2) if packed else (2, 37, 4, 2)
    cu = torch.tensor([0, 9, 9, 30, 45]) if packed else None
    q, k, v = (rand(b, s, h, d, dtype=dtype) for h in (hq, hkv, hkv))
    cot = [rand(b, s, hq, d), rand(b, hq, s)]
    fn = lambda *a: vita_ext.attention_lse(*a, causal=causal, cu_seqlens=cu)  # noqa: E731
    cpu, cuda = both(emu, order, lambda: grads(fn, (q, k, v), cot))
    ref = grads(lambda *a: R.attention_lse(*a, causal, None, cu), [t.double() for t in (q, k, v)], cot)
    plain = grads(lambda *a: R.attention_lse(*a, causal, None, cu), (q, k, v), cot)
    for name, a, c, r, p in zip(("out", "lse", "dq", "dk", "dv"), cpu, cuda, ref, plain):
        close(a, c, dtype if name != "lse" else torch.float32, name)
        assert_2x_rule(c, p, r, name)
        COMPARISONS["side_by_side"] += 1


@pytest.mark.parametrize("shape", [(1, 5, 0, 2, 1, 16), (0, 5, 5, 2, 1, 16)], ids=["no-keys", "no-batch"])
def test_attention_lse_empty_backward(emu, shape):
    b, sq, sk, hq, hkv, d = shape
    q, k, v = rand(b, sq, hq, d), rand(b, sk, hkv, d), rand(b, sk, hkv, d)
    cot = [rand(b, sq, hq, d), rand(b, hq, sq)]
    cpu, cuda = both(emu, "forward", lambda: grads(lambda *a: vita_ext.attention_lse(*a, causal=True), (q, k, v), cot))
    for name, a, c in zip(("out", "lse", "dq", "dk", "dv"), cpu, cuda):
        assert torch.equal(a, c), name
        COMPARISONS["side_by_side"] += 1


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", HALF)
def test_merge_attention(emu, order, dtype):
    out0, bo = rand(2, 9, 3, 36, dtype=dtype), rand(2, 9, 3, 36, dtype=dtype)
    lse0, bl = rand(2, 3, 9), rand(2, 3, 9)
    lse0[0, 0, :3] = float("-inf")

    def run():
        o, l = out0.clone(), lse0.clone()
        vita_ext.merge_attention_(o, l, bo, bl)
        return o, l

    (co, cl), (eo, el) = both(emu, order, run)
    close(co, eo, dtype, "out")
    close(cl, el, torch.float32, "lse")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", HALF + [torch.float64])
def test_masked_lm_head(emu, order, dtype):
    h, w = rand(19, 24, dtype=dtype), rand(50, 24, dtype=dtype)
    pos, cot = torch.tensor([3, -1, 0, 3, 7]), [rand(5, 50)]
    cpu, cuda = both(emu, order, lambda: grads(lambda a, b: vita_ext.masked_lm_head(a, b, pos), (h, w), cot))
    for name, a, c in zip(("logits", "dh", "dw"), cpu, cuda):
        close(a, c, dtype, name)


@pytest.mark.parametrize("dtype", HALF + [torch.float64])
def test_masked_lm_head_zero_width(emu, dtype):
    # H = 0: the GEMM has K = 0 and the output is zero-filled (cudaMemset2DAsync in gemm.cuh)
    h, w, pos = rand(6, 0, dtype=dtype), rand(9, 0, dtype=dtype), torch.tensor([1, 4])
    cpu, cuda = both(emu, "forward", lambda: [vita_ext.masked_lm_head(h, w, pos)])
    close(cpu[0], cuda[0], dtype, "logits")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", HALF + [torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_masked_linear_cross_entropy(emu, order, dtype, reduction, monkeypatch):
    monkeypatch.setenv("VITA_EXT_CE_VOCAB_CHUNK", "32")  # several vocabulary chunks
    h, w = rand(23, 16, dtype=dtype), rand(70, 16, dtype=dtype)
    labels = torch.randint(0, 70, (23,))
    labels[::3] = -100
    cot = [rand(23) if reduction == "none" else rand(())]
    fn = lambda a, b: vita_ext.masked_linear_cross_entropy(a, b, labels, reduction=reduction)  # noqa: E731
    cpu, cuda = both(emu, order, lambda: grads(fn, (h, w), cot))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, a, c in zip(("loss", "dh", "dw"), cpu, cuda):
        close(a, c, acc if name == "loss" else dtype, name)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", HALF + [torch.float64])
@pytest.mark.parametrize("d1", [12, 7])  # 7: the element-wise kernels' scalar path
def test_pixel_shuffle_projector(emu, order, dtype, d1):
    n, g, c, d2 = 2, 6, 8, 10
    args = [rand(n, g * g, c, dtype=dtype), 1 + 0.1 * rand(4 * c, dtype=dtype), 0.1 * rand(4 * c, dtype=dtype),
            rand(d1, 4 * c, dtype=dtype) / 6, rand(d2, d1, dtype=dtype) / 4]
    b1, b2 = rand(d1, dtype=dtype), rand(d2, dtype=dtype)
    fn = lambda x, lw, lb, w1, w2: vita_ext.pixel_shuffle_projector(x, lw, lb, w1, w2, b1=b1, b2=b2)  # noqa: E731
    cot = [rand(n, g * g // 4, d2)]
    cpu, cuda = both(emu, order, lambda: grads(fn, args, cot))
    for name, a, cc in zip(("y", "dx", "dln_w", "dln_b", "dw1", "dw2"), cpu, cuda):
        close(a, cc, dtype, name)
