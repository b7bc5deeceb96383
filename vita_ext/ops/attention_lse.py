"""attention_lse: flash-style attention that also returns the log-sum-exp (for ring attention)."""
from __future__ import annotations

import torch
from torch import Tensor

from vita_ext._build import require_kernels


def attention_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, softmax_scale: float | None = None,
                  cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention, tiled with an online softmax, returning the output and its log-sum-exp.

    The [Sq, Sk] score matrix is never written to memory. The lse lets partial results over
    disjoint key blocks be merged exactly (``merge_attention_``), which is what ring attention and
    the sharded-KV decode do. Differentiable w.r.t. q, k, v (and through lse).

    Args:
        q: [B, Sq, Hq, D] queries, fp32/bf16/fp16, D <= 256 (Long-VITA LLM: D = 128, ViT: 64).
        k, v: [B, Sk, Hkv, D] keys and values in q's dtype; Hq must be a multiple of Hkv (GQA:
            query head h reads kv head h // (Hq // Hkv)). The last dim must be contiguous.
        causal: mask future keys. Bottom-right aligned as in flash-attention >= 2.1: query i sees
            keys j <= i + Sk - Sq, so Sq = 1 against a KV cache sees every key.
        softmax_scale: multiplier of q.k (default 1/sqrt(D)).
        cu_seqlens: optional [n+1] int32/int64 cumulative sequence lengths of n packed sequences
            (B must be 1 and Sq == Sk == cu_seqlens[-1]); attention stays inside each sequence
            (block-diagonal, causal within a block when causal=True). No [S, S] mask is built.

    Returns:
        (out [B, Sq, Hq, D] in q's dtype, lse [B, Hq, Sq] fp32 (fp64 for fp64 inputs, CPU only: that is
        what gradcheck needs), natural log). A query row that sees no key gets out = 0 and lse = -inf.

    Raises:
        RuntimeError naming the argument on a wrong dtype, device, shape, head ratio, cu_seqlens
        layout, or a CUDA tensor in a CPU-only build.

    Source: FlashAttention-2 (Dao, 2023) online softmax; ring attention (Liu et al., 2023).
    """
    require_kernels("attention_lse", q, k, v)
    d = q.shape[-1] if q.dim() else 0
    # D = 0 (or a wrong rank) is refused by the kernel's argument check, which names 'q' and its shape
    scale = (d ** -0.5 if d > 0 else 1.0) if softmax_scale is None else float(softmax_scale)
    return torch.ops.vita_ext.attention_lse(q, k, v, bool(causal), scale, cu_seqlens)


@torch.library.register_fake("vita_ext::attention_lse")
def _fake(q, k, v, causal, softmax_scale, cu_seqlens):
    b, sq, hq, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, hq, sq), dtype=lse_dtype)


@torch.library.register_fake("vita_ext::attention_lse_backward")
def _fake_backward(grad_out, grad_lse, q, k, v, out, lse, causal, softmax_scale, cu_seqlens):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale, cu_seqlens = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.causal, ctx.softmax_scale = causal, softmax_scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = torch.ops.vita_ext.attention_lse_backward(grad_out, grad_lse, q, k, v, out, lse, ctx.causal,
                                                           ctx.softmax_scale, cu_seqlens)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("vita_ext::attention_lse", _backward, setup_context=_setup_context)
