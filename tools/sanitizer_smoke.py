"""Small, edge-heavy calls of every CUDA kernel, for compute-sanitizer (the kernels were written and
reviewed without a GPU). Each call is checked loosely against vita_ext.reference in float64 so that a
silent wrong answer also fails; the tight accuracy checks are the pytest files.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck  python tools/sanitizer_smoke.py
    compute-sanitizer --tool racecheck --racecheck-report all             python tools/sanitizer_smoke.py
    compute-sanitizer --tool synccheck                                    python tools/sanitizer_smoke.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck   python tools/sanitizer_smoke.py

(PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own cudaMalloc, so memcheck sees an
out-of-bounds access that would otherwise land inside a larger cached block.) `python
tools/sanitizer_smoke.py cpu` runs the same calls on the CPU kernels.
"""
import os
import sys

import torch

import vita_ext
from vita_ext import reference as R

DEV = sys.argv[1] if len(sys.argv) > 1 else "cuda"


def rnd(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(DEV, dtype)


def close(name, got, want, tol):
    got, want = got.double().cpu(), want.double().cpu()
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got)), f"{name}: non-finite pattern differs"
    err = (got[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= tol * max(1.0, want[fin].abs().max().item() if fin.any() else 1.0), f"{name}: error {err:.3e}"


def attention():
    # (B, Sq, Sk, Hq, Hkv, D, causal, cu): D padding (80 -> 128, 200 -> 256, 33 -> 64), partial tiles,
    # rows without keys (Sq > Sk causal), packed segments incl. an empty one, decode, no keys at all.
    cases = [(1, 37, 37, 4, 2, 80, True, [0, 5, 5, 17, 37]), (2, 40, 9, 2, 1, 16, True, None),
             (1, 1, 70, 2, 2, 256, True, None), (1, 19, 33, 2, 1, 200, False, None),
             (1, 35, 35, 2, 1, 33, False, [0, 20, 35]), (1, 3, 0, 2, 1, 8, True, None)]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        for b, sq, sk, hq, hkv, d, causal, cu in cases:
            q, k, v = rnd(b, sq, hq, d, dtype=dtype), rnd(b, sk, hkv, d, dtype=dtype), rnd(b, sk, hkv, d, dtype=dtype)
            cut = torch.tensor(cu, device=DEV) if cu else None
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out, lse = vita_ext.attention_lse(*leaves, causal=causal, cu_seqlens=cut)
            ref = [t.double().requires_grad_() for t in (q, k, v)]
            rout, rlse = R.attention_lse(*ref, causal, None, cut)
            close("attention out", out, rout, tol)
            close("attention lse", lse, rlse, tol)
            if sk == 0:
                continue
            go, gl = rnd(*out.shape), rnd(*lse.shape)
            gl = torch.where(torch.isfinite(lse), gl, torch.zeros_like(gl))
            got = torch.autograd.grad((out, lse), leaves, (go.to(out.dtype), gl))
            want = torch.autograd.grad((rout, rlse), ref, (go.double(), gl.double()))
            for name, g, w in zip(("dq", "dk", "dv"), got, want):
                close("attention " + name, g, w, 10 * tol)


def merge():
    for d in (7, 8, 128):  # scalar path, vector path
        for odt, bdt in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)):
            big_out, big_lse = rnd(2, 15, 3, d, dtype=odt), rnd(2, 3, 15) * 3
            out, lse = big_out[:, 3:13], big_lse[:, :, 3:13]  # strided in-place views
            bout = rnd(2, 10, 3, 2 * d, dtype=bdt)[..., ::2]
            blse = (rnd(2, 10, 3) * 3).transpose(1, 2)
            lse[0, 0, :2] = float("-inf")
            blse[0, 0, 1:3] = float("-inf")
            want = R.merge_attention(out.double(), lse.double(), bout.double(), blse.double())
            vita_ext.merge_attention_(out, lse, bout, blse)
            close("merge out", out, want[0], 2e-2)
            close("merge lse", lse, want[1], 1e-5)


def lm_head():
    for dtype in (torch.float32, torch.bfloat16):
        hidden = rnd(40, 2 * 24, dtype=dtype)[:, ::2]  # non-contiguous
        weight = rnd(101, 24, dtype=dtype, scale=0.5)
        pos = torch.tensor([0, 39, -1, 5, 5], device=DEV)
        close("lm_head", vita_ext.masked_lm_head(hidden, weight, pos),
              R.masked_lm_head(hidden.double(), weight.double(), pos), 2e-2)
        if DEV == "cuda":  # the on-device range check (the CPU raises instead)
            bad = vita_ext.masked_lm_head(hidden, weight, torch.tensor([40, 0], device=DEV))
            assert torch.isnan(bad[0]).all() and not torch.isnan(bad[1]).any(), "lm_head: bad position not NaN"


def cross_entropy():
    os.environ["VITA_EXT_CE_VOCAB_CHUNK"] = "64"  # ragged vocabulary and row chunks
    os.environ["VITA_EXT_CE_ROW_CHUNK"] = "8"
    try:
        for dtype in (torch.float32, torch.bfloat16):
            hidden = rnd(37, 24, dtype=dtype)
            weight = rnd(3 * 64 + 17, 24, dtype=dtype, scale=0.5)
            labels = torch.randint(0, weight.shape[0], (37,), device=DEV)
            labels[::3] = -100
            count = int((labels != -100).sum())
            # (reduction, num_supervised, grad_in_forward, weight trainable): the recomputing backward, the
            # host-sync-free selection, the gradient formed in the forward, a frozen head (no dW GEMM).
            for reduction, num, gif, w_grad in (("mean", None, False, True), ("none", None, False, True),
                                                ("sum", count, False, True), ("mean", count, True, True),
                                                ("sum", None, True, False), ("mean", count, False, False)):
                h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(w_grad)
                loss = vita_ext.masked_linear_cross_entropy(h, w, labels, reduction=reduction, num_supervised=num,
                                                            grad_in_forward=gif)
                h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
                ref = R.masked_linear_cross_entropy(h64, w64, labels, reduction=reduction)
                close("ce loss", loss, ref, 2e-2)
                cot = rnd(*loss.shape)
                got = torch.autograd.grad(loss, (h, w) if w_grad else (h,), cot)
                want = torch.autograd.grad(ref, (h64, w64), cot.double())
                close("ce dh", got[0], want[0], 2e-2)
                if w_grad:
                    close("ce dw", got[1], want[1], 2e-2)
    finally:
        del os.environ["VITA_EXT_CE_VOCAB_CHUNK"], os.environ["VITA_EXT_CE_ROW_CHUNK"]


def projector():
    # C = 8: the bf16 16-byte LayerNorm path (fp32 takes it at C % 4 == 0); C = 3: the scalar path;
    # D1 = 12 / 13: vectorised / scalar GELU; a CLS-dropping slice of x.
    for dtype in (torch.float32, torch.bfloat16):
        for n, g, c, d1, d2 in ((2, 4, 8, 12, 10), (1, 6, 3, 13, 5)):
            full = rnd(n, g * g + 1, c, dtype=dtype)
            params = [rnd(4 * c, dtype=dtype), rnd(4 * c, dtype=dtype), rnd(d1, 4 * c, dtype=dtype, scale=0.3),
                      rnd(d1, dtype=dtype), rnd(d2, d1, dtype=dtype, scale=0.3), rnd(d2, dtype=dtype)]
            leaves = [full.clone().requires_grad_()] + [p.clone().requires_grad_() for p in params]
            x = leaves[0][:, 1:, :]
            lnw, lnb, w1, b1, w2, b2 = leaves[1:]
            ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
            rx = ref_leaves[0][:, 1:, :]
            rl = ref_leaves[1:]
            ry = R.pixel_shuffle_projector(rx, rl[0], rl[1], rl[2], rl[4], b1=rl[3], b2=rl[5])
            gy = rnd(*ry.shape)
            want = torch.autograd.grad(ry, ref_leaves, gy.double())
            # recompute (the CUDA default) and saved activations, each with all gradients and with the
            # ViT frozen (x without grad: no dx, no LayerNorm-backward kernel).
            for recompute in (True, False):
                for with_x in (True, False):
                    use = leaves if with_x else leaves[1:]
                    y = vita_ext.pixel_shuffle_projector(x if with_x else x.detach(), lnw, lnb, w1, w2, b1=b1, b2=b2,
                                                         recompute=recompute)
                    close("projector y", y, ry, 5e-2)
                    got = torch.autograd.grad(y, use, gy.to(y.dtype))
                    for i, (a, b) in enumerate(zip(got, want if with_x else want[1:])):
                        close(f"projector grad {i} (recompute={recompute}, x grad={with_x})", a, b, 1e-1)


if __name__ == "__main__":
    torch.manual_seed(0)
    for fn in (attention, merge, lm_head, cross_entropy, projector):
        fn()
        if DEV == "cuda":
            torch.cuda.synchronize()
        print(fn.__name__, "ok", flush=True)
