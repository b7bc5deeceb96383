"""Pure-PyTorch specifications of every vita_ext op.

Each function here computes, with plain PyTorch in the dtype of its inputs, exactly what the op of
the same name computes. The tests compare the kernels with these functions evaluated in float64, and
measure the error of these same functions at the kernel's dtype as the yardstick (a kernel may err by
at most twice as much). They materialise everything, so they are for checking, not for long inputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the dtype itself for fp32/fp64."""
    return torch.promote_types(dtype, torch.float32)


def pixel_shuffle(x: Tensor) -> Tensor:
    """Pixel shuffle with scale 0.5 in InternVL's "v2" order (a 2x2 space-to-depth).

    Args:
        x: [N, L, C], L = g*g patches of a g x g grid in row-major order, g even.
    Returns:
        [N, L/4, 4C] with ``out[n, a*(g/2) + b, (2*dr + dc)*C + ch] = x[n, (2a+dr)*g + 2b+dc, ch]``.
    """
    n, length, c = x.shape
    g = math.isqrt(length)
    return x.reshape(n, g // 2, 2, g // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, length // 4, 4 * c)


def pixel_shuffle_projector(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, w1: Tensor, w2: Tensor,
                            eps: float = 1e-5, b1: Tensor | None = None, b2: Tensor | None = None) -> Tensor:
    """Long-VITA's projector: pixel_shuffle -> LayerNorm(4C) -> Linear(w1, b1) -> GELU(erf) -> Linear(w2, b2).

    Shapes: x [N, L, C], ln_weight/ln_bias [4C], w1 [D1, 4C], b1 [D1], w2 [D2, D1], b2 [D2] -> [N, L/4, D2].
    """
    h = pixel_shuffle(x)
    h = F.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, eps)
    h = F.gelu(F.linear(h, w1, b1))
    return F.linear(h, w2, b2)


def masked_lm_head(hidden_states: Tensor, weight: Tensor, positions: Tensor) -> Tensor:
    """Logits of the selected rows: hidden_states [T, H], weight [V, H], positions [K] -> [K, V]."""
    return F.linear(hidden_states[positions], weight)


def masked_linear_cross_entropy(hidden_states: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100,
                                reduction: str = "mean") -> Tensor:
    """Cross-entropy of the logits hidden_states @ weight^T against labels, as Hugging Face computes it
    (logits at the input dtype, upcast to fp32 for the softmax). Ignored rows count neither in the sum
    nor in the mean; 'none' gives 0 at them. Shapes: [T, H], [V, H], [T] -> [] or [T] (fp32 or fp64).
    NaN/Inf: the op propagates those of the rows it reads (supervised rows of hidden_states, all of
    weight) exactly as this function does. It never reads an ignored row, like the composition on the
    supervised rows ``F.cross_entropy(F.linear(h[keep], W).float(), labels[keep])``; this function's
    own backward would turn a non-finite value in an ignored row into NaN gradients (log_softmax's
    backward multiplies it by the row's zero gradient).
    """
    logits = F.linear(hidden_states, weight)
    return F.cross_entropy(logits.to(_acc_dtype(logits.dtype)), labels, ignore_index=ignore_index,
                           reduction=reduction)


def attention_mask(sq: int, sk: int, causal: bool, cu_seqlens: Tensor | None = None,
                   device: torch.device | None = None) -> Tensor:
    """Boolean [Sq, Sk] mask of allowed (query, key) pairs: causal is bottom-right aligned (query i
    sees keys j <= i + Sk - Sq); with cu_seqlens (Sq == Sk) pairs must also share a segment."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    mask = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        mask &= j <= i + (sk - sq)
    if cu_seqlens is not None:
        seg = torch.bucketize(torch.arange(sq, device=device), cu_seqlens[1:].to(device), right=True)
        mask &= seg[:, None] == seg[None, :]
    return mask


def attention_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, softmax_scale: float | None = None,
                  cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention that also returns the log-sum-exp of the scaled scores.

    Args:
        q: [B, Sq, Hq, D]; k, v: [B, Sk, Hkv, D] with Hq a multiple of Hkv (query head h uses kv head
           h // (Hq // Hkv)).
        causal: bottom-right aligned causal mask.
        softmax_scale: defaults to 1/sqrt(D).
        cu_seqlens: optional [n+1] segment boundaries of a packed sequence (B == 1, Sq == Sk).
    Returns:
        out [B, Sq, Hq, D] in q's dtype, lse [B, Hq, Sq] (fp32, fp64 for fp64 inputs). Rows that see no key
        get out = 0 and lse = -inf.
    """
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    mask = attention_mask(sq, sk, causal, cu_seqlens, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores.to(_acc_dtype(scores.dtype)), dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out, lse


def merge_attention(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """The functional form of merge_attention_: combine two partial softmax-attention results over
    disjoint key sets. out/block_out [B, S, H, D], lse/block_lse [B, H, S]. Computed in fp32 (or fp64)
    and returned in out's and lse's dtypes. -inf in either lse means "no keys" and is handled.
    """
    acc = _acc_dtype(out.dtype) if out.dtype != torch.float64 else torch.float64
    a, b = lse.to(acc), block_lse.to(acc)
    new_lse = torch.logaddexp(a, b)
    safe = torch.where(torch.isinf(new_lse) & (new_lse < 0), torch.zeros_like(new_lse), new_lse)
    wa = torch.exp(a - safe).transpose(1, 2).unsqueeze(-1)
    wb = torch.exp(b - safe).transpose(1, 2).unsqueeze(-1)
    new_out = out.to(acc) * wa + block_out.to(acc) * wb
    return new_out.to(out.dtype), new_lse.to(lse.dtype)
