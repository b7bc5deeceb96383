"""The ``flash`` and ``flash_attn`` backends of attention_lse: calls into PyTorch's flash kernels and the
flash-attn package, in attention_lse's layout and semantics.

Layouts. attention_lse works in [B, S, H, D] with lse [B, H, S] fp32. PyTorch's CPU flash kernel takes
[B, H, S, D] (a transposed view: no copy) and writes out as [B, S, H, D] storage, so the transposed-back
output is contiguous; its lse comes as a strided view and is made contiguous (B*H*S floats). The CUDA
kernels (aten's and flash-attn's) take [B, S, H, D], or [total, H, D] with int32 cumulative offsets for
varlen, where the lse is [H, total] (PyTorch >= 2.5) or padded [n, H, max_seqlen] (older).

Masks. The CUDA kernels are bottom-right causal like attention_lse. PyTorch's CPU kernel is top-left
causal (query i sees keys j <= i) and has no varlen, so a call is split into blocks that are each a
plain top-left call: with Sk > Sq, keys [0, Sk - Sq) are seen by every row (a full block) and keys
[Sk - Sq, Sk) form a square causal block, merged by their lse (merge_attention_); with Sq > Sk the first
Sq - Sk rows see nothing (out 0, lse -inf) and the rest form a square causal block; each varlen segment is
its own block. The backward runs each block's backward with the whole call's out and lse (the
ring-flash-attention recipe), so no lse gradient is needed. Cost: the same FLOPs as one call.

Source: FlashAttention-2 (Dao, 2023); PyTorch's aten flash kernels; ring-flash-attention's use of them.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

from vita_ext.ops.attention_dispatch import flash_attn_module
from vita_ext.ops.merge_attention import merge_attention_

_cpu_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _inner(t: Tensor) -> Tensor:
    """Unit stride in the last dim (what the flash kernels read), copying only when it is not."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _empty_result(q: Tensor) -> tuple[Tensor, Tensor]:
    b, sq, hq, _ = q.shape
    return (torch.zeros_like(q, memory_format=torch.contiguous_format),
            torch.full((b, hq, sq), -math.inf, dtype=torch.float32, device=q.device))


# ------------------------------------------------------------------------------------------- CPU
def cpu_blocks(sq: int, sk: int, causal: bool, cu: list[int] | None) -> list[tuple[int, int, int, int, bool]]:
    """(row0, row1, key0, key1, top_left_causal) calls that make up one attention_lse call on the CPU
    flash kernel; rows in no block see no key."""
    if cu is not None:
        return [(a, b, a, b, causal) for a, b in zip(cu[:-1], cu[1:]) if b > a]
    if sq == 0 or sk == 0:
        return []
    if not causal or sq == 1:  # one query row sees every key when bottom-right aligned
        return [(0, sq, 0, sk, False)]
    off = sk - sq
    if off == 0:
        return [(0, sq, 0, sk, True)]
    if off > 0:
        return [(0, sq, 0, off, False), (0, sq, off, sk, True)]
    return [(-off, sq, 0, sk, True)]


def _bhsd(t: Tensor, r0: int, r1: int) -> Tensor:
    return _inner(t[:, r0:r1]).transpose(1, 2)


def flash_cpu_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                      cu: list[int] | None) -> tuple[Tensor, Tensor]:
    if cu is None and q.shape[1] == 1 and k.shape[1] > 0:
        return _decode_folded(q, k, v, scale)
    blocks = cpu_blocks(q.shape[1], k.shape[1], causal, cu)
    if len(blocks) == 1 and blocks[0][:2] == (0, q.shape[1]) and blocks[0][2:4] == (0, k.shape[1]):
        out, lse = _cpu_fwd(_bhsd(q, 0, q.shape[1]), _bhsd(k, 0, k.shape[1]), _bhsd(v, 0, k.shape[1]), 0.0,
                            blocks[0][4], scale=scale)
        return out.transpose(1, 2), lse.contiguous()
    out, lse = _empty_result(q)
    overlapping = len({b[:2] for b in blocks}) < len(blocks)  # the Sk > Sq split: two blocks per row
    acc = out.float() if overlapping and out.dtype != torch.float32 else out
    for r0, r1, c0, c1, top_left in blocks:
        o, l = _cpu_fwd(_bhsd(q, r0, r1), _bhsd(k, c0, c1), _bhsd(v, c0, c1), 0.0, top_left, scale=scale)
        if overlapping:
            merge_attention_(acc[:, r0:r1], lse[:, :, r0:r1], o.transpose(1, 2), l)
        else:
            out[:, r0:r1] = o.transpose(1, 2)
            lse[:, :, r0:r1] = l
    if acc is not out:
        out.copy_(acc)
    return out, lse


def _decode_folded(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """A decode step (Sq = 1, which sees every key, causal or not) with the G = Hq / Hkv query heads of each
    KV head folded into the query length: one [G, D] x [Sk, D] problem per KV head, so each K/V row is
    read once for its G heads (FlashAttention's decode does the same on CUDA). Measured on this CPU at 8K
    keys, 8/2 heads: 2-3x the unfolded call in fp32, 4-6x in bf16."""
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, hkv, hq // hkv, d)  # query head h = kv head h // G, member h % G
    out, lse = _cpu_fwd(qg, _bhsd(k, 0, k.shape[1]), _bhsd(v, 0, k.shape[1]), 0.0, False, scale=scale)
    return out.reshape(b, 1, hq, d).contiguous(), lse.reshape(b, hq, 1).contiguous()


# PyTorch's CPU flash backward in bf16/fp16 costs as much for a short block as for one of a few hundred
# keys (measured: 4 heads x 32 dims, 30 keys: 0.70 ms in bf16, 0.13 ms in fp32 with the casts); in fp32 it
# is faster up to about keys x head_dim = 16K on the AVX-512/AMX CPU measured (d 32: up to 512 keys; d
# 128: up to 128), slower beyond (benchmarks/RESULTS.md 3b). Below that size the block's backward runs in
# fp32 from the reduced-precision inputs: more accurate too (no bf16 rounding of P and dS).
UPCAST_BACKWARD_MAX = 16384


def _block_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, top_left: bool,
                    scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """One plain top-left call's backward on [B, H, S, D] views; fp32 grads when it ran upcast."""
    if q.dtype in (torch.bfloat16, torch.float16) and k.shape[2] * q.shape[3] <= UPCAST_BACKWARD_MAX:
        dout, q, k, v, out = (t.float() for t in (dout, q, k, v, out))
    return _cpu_bwd(dout, q, k, v, out, lse, 0.0, top_left, scale=scale)


def flash_cpu_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                       scale: float, cu: list[int] | None) -> tuple[Tensor, Tensor, Tensor]:
    blocks = cpu_blocks(q.shape[1], k.shape[1], causal, cu)
    out = out.to(q.dtype)  # a ring keeps out in fp32; the kernel wants q's dtype
    if len(blocks) == 1 and blocks[0][:2] == (0, q.shape[1]) and blocks[0][2:4] == (0, k.shape[1]):
        sq, sk = q.shape[1], k.shape[1]
        grads = _block_backward(_bhsd(dout, 0, sq), _bhsd(q, 0, sq), _bhsd(k, 0, sk), _bhsd(v, 0, sk),
                                _bhsd(out, 0, sq), lse, blocks[0][4], scale)
        return tuple(g.transpose(1, 2).to(t.dtype) for g, t in zip(grads, (q, k, v)))  # type: ignore[return-value]
    acc = torch.float32 if q.dtype != torch.float64 else torch.float64
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q, k, v))
    for r0, r1, c0, c1, top_left in blocks:
        gq, gk, gv = _block_backward(_bhsd(dout, r0, r1), _bhsd(q, r0, r1), _bhsd(k, c0, c1), _bhsd(v, c0, c1),
                                     _bhsd(out, r0, r1), lse[:, :, r0:r1].contiguous(), top_left, scale)
        dq[:, r0:r1] += gq.transpose(1, 2)
        dk[:, c0:c1] += gk.transpose(1, 2)
        dv[:, c0:c1] += gv.transpose(1, 2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------------------------------ CUDA
def _fix_lse(lse: Tensor, sq: int, sk: int, causal: bool) -> Tensor:
    """FlashAttention-2 writes +inf for a row whose softmax sum is 0 or NaN: the rows that see no key get
    -inf (attention_lse's convention), a NaN row gets NaN (as PyTorch's math attention)."""
    lse = torch.where(torch.isposinf(lse), torch.full_like(lse, math.nan), lse)
    if causal and sq > sk:
        lse[..., : sq - sk] = -math.inf
    return lse


def nan_rows(out: Tensor, lse: Tensor) -> Tensor:
    """out with NaN in every row whose lse is NaN or +inf (the kernels write out = 0 there: FlashAttention-2
    where its softmax sum is NaN, PyTorch's CPU kernel for a bf16 row facing an infinite key): the spec's NaN
    propagation, with no host sync. out [B, S, H, D], lse [B, H, S]."""
    return out.masked_fill((torch.isnan(lse) | torch.isposinf(lse)).transpose(1, 2).unsqueeze(-1), math.nan)


_EXPONENT_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def non_finite_on_host(q: Tensor) -> bool:
    """Whether a CPU tensor holds a NaN or an Inf. False for CUDA tensors (no host sync), fake tensors and
    while tracing. Runs in NumPy, single-threaded: an ATen reduction opens a 2-thread parallel region,
    which on a loaded 2-core machine waited up to ~30 ms for a descheduled thread (measured: 15% of a
    2K-token bf16 attention forward); this pass takes ~0.15 ms per million elements. A half-precision
    value is non-finite when its exponent bits are all ones."""
    if q.device.type != "cpu" or q.numel() == 0 or torch.compiler.is_compiling() or isinstance(q, FakeTensor):
        return False
    q = q.detach()
    if q.dtype in _EXPONENT_BITS:
        mask = _EXPONENT_BITS[q.dtype]
        return bool(((q.view(torch.int16).numpy() & mask) == mask).any())
    return not bool(np.isfinite(q.numpy()).all())


def nan_rows_cpu(out: Tensor, lse: Tensor) -> Tensor:
    """``nan_rows`` for a CPU result: one look at the small lse first (in NumPy, no parallel region; see
    non_finite_on_host), so out is touched only when a row is poisoned; traced or fake: unconditional."""
    if lse.numel() == 0:
        return out
    if not (torch.compiler.is_compiling() or isinstance(lse, FakeTensor)):
        a = lse.detach().numpy()
        if not (np.isnan(a).any() or np.isposinf(a).any()):
            return out
    return nan_rows(out, lse)


def _varlen_lse(lse: Tensor, cu32: Tensor, total: int) -> Tensor:
    """[H, total] (PyTorch >= 2.5) stays; an older padded [n, H, max_seqlen] is gathered on the device
    (no host sync) into [H, total]."""
    if lse.dim() == 2:
        return lse
    pos = torch.arange(total, device=lse.device, dtype=torch.int32)
    seg = torch.bucketize(pos, cu32[1:], right=True)
    return lse[seg, :, (pos - cu32[seg]).long()].transpose(0, 1)


def _padded_lse(lse: Tensor, cu32: Tensor, n: int, max_seqlen: int) -> Tensor:
    """Inverse of ``_varlen_lse`` for an older torch whose varlen backward reads padded [n, H, max_seqlen]."""
    h, total = lse.shape
    pos = torch.arange(total, device=lse.device, dtype=torch.int32)
    seg = torch.bucketize(pos, cu32[1:], right=True)
    padded = lse.new_zeros((n, h, max_seqlen))
    padded[seg, :, (pos - cu32[seg]).long()] = lse.transpose(0, 1)
    return padded


def _rng_placeholders(device: torch.device) -> tuple[Tensor, Tensor]:
    # dropout is 0, so the kernels never read the philox state; the schema still wants two tensors
    # (uint64 [2] and [] since PyTorch 2.7-ish, int64 scalars before: shaped as this torch's forward returns).
    shapes = aten_flash_layout()[1]
    return tuple(torch.empty(shape, dtype=dtype, device=device) for shape, dtype in shapes)  # type: ignore[return-value]


def flash_cuda_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, cu: Tensor | None,
                       max_seqlen: int | None) -> tuple[Tensor, Tensor]:
    q, k, v = _inner(q), _inner(k), _inner(v)
    sq, sk = q.shape[1], k.shape[1]
    if cu is None:
        out, lse, *_ = torch.ops.aten._flash_attention_forward(q, k, v, None, None, sq, sk, 0.0, causal, False,
                                                               scale=scale)
        return out, _fix_lse(lse, sq, sk, causal)
    cu32 = cu.to(torch.int32)
    out, lse, *_ = torch.ops.aten._flash_attention_forward(q[0], k[0], v[0], cu32, cu32, max_seqlen, max_seqlen,
                                                           0.0, causal, False, scale=scale)
    lse = _varlen_lse(lse, cu32, sq)
    return out.unsqueeze(0), _fix_lse(lse, 1, 1, False).unsqueeze(0)


def flash_cuda_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                        scale: float, cu: Tensor | None, max_seqlen: int | None) -> tuple[Tensor, Tensor, Tensor]:
    dout, q, k, v, out = (_inner(t) for t in (dout, q, k, v, out.to(q.dtype)))
    rng, unused = _rng_placeholders(q.device)
    sq, sk = q.shape[1], k.shape[1]
    if cu is None:
        return torch.ops.aten._flash_attention_backward(dout, q, k, v, out, lse.contiguous(), None, None, sq, sk, 0.0,
                                                        causal, rng, unused, scale=scale)
    cu32 = cu.to(torch.int32)
    lse2 = lse[0].contiguous()
    if aten_flash_layout()[0]:
        lse2 = _padded_lse(lse2, cu32, cu32.numel() - 1, max_seqlen)
    grads = torch.ops.aten._flash_attention_backward(dout[0], q[0], k[0], v[0], out[0], lse2, cu32, cu32,
                                                     max_seqlen, max_seqlen, 0.0, causal, rng, unused, scale=scale)
    return tuple(g.unsqueeze(0) for g in grads)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ flash-attn
def flash_attn_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, cu: Tensor | None,
                       max_seqlen: int | None) -> tuple[Tensor, Tensor]:
    """Forward through the flash-attn package (its public ``flash_attn_func`` / ``flash_attn_varlen_func``
    with ``return_attn_probs=True``, which also return the lse)."""
    mod, how = flash_attn_module()
    if mod is None:
        raise RuntimeError(f"attention_lse: backend 'flash_attn' is unavailable: {how}")
    q, k, v = _inner(q), _inner(k), _inner(v)
    sq, sk = q.shape[1], k.shape[1]
    if cu is None:
        res = mod.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, return_attn_probs=True)
        out, lse = res[0], res[1]
        return out, _fix_lse(lse.float(), sq, sk, causal)
    cu32 = cu.to(torch.int32)
    res = mod.flash_attn_varlen_func(q[0], k[0], v[0], cu32, cu32, max_seqlen, max_seqlen, softmax_scale=scale,
                                     causal=causal, return_attn_probs=True)
    out, lse = res[0], _varlen_lse(res[1].float(), cu32, sq)
    return out.unsqueeze(0), _fix_lse(lse, 1, 1, False).unsqueeze(0)


@functools.lru_cache(maxsize=None)
def aten_flash_layout() -> tuple[bool, tuple]:
    """(varlen lse is the old padded [n, H, max_seqlen], the (shape, dtype) of the two philox tensors) of
    this torch's aten flash kernels, asked of their fake kernels once (no GPU needed)."""
    with unset_fake_temporarily(), FakeTensorMode():
        q = torch.empty(6, 1, 8, dtype=torch.bfloat16, device="cuda")
        cu = torch.empty(3, dtype=torch.int32, device="cuda")
        res = torch.ops.aten._flash_attention_forward(q, q, q, cu, cu, 4, 4, 0.0, False, False)
        return res[1].dim() == 3, tuple((tuple(t.shape), t.dtype) for t in res[2:4])
