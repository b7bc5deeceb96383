"""The Qwen2 decoder (Long-VITA's LLM): RMSNorm, RoPE, GQA attention with q/k/v bias, SwiGLU, and a KV cache.

The decoder never decides *how* attention is computed: each layer hands its rotated q, k, v to an
attention backend (``LocalAttention`` here: a KV cache + ``attention_lse``; ring attention in
``vita_ext.parallel``), so the same layers serve single-GPU decode, packed training and context
parallelism. Numerics follow HF transformers' Qwen2 (fp32 RMSNorm and RoPE angles).
Source: Qwen2 technical report (arXiv 2407.10671); HF ``modeling_qwen2``.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vita_ext.model.config import TextConfig
from vita_ext.ops import attention_lse


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin [B, S, 1, D] for integer positions; angles in fp32 (as HF) before the cast."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def _inv_freq(self, device) -> Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
        return 1.0 / (self.theta ** (exponents / self.head_dim))

    def reset_parameters(self, device=None) -> None:
        self.inv_freq = self._inv_freq(device)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = position_ids[:, :, None].float() * self.inv_freq.float()[None, None, :]  # [B, S, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # [B, S, 1, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, S, h, D] rotated by angles cos/sin [B, S, 1, D] (rotate-half convention)."""
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Preallocated per-layer K/V buffers [B, max_len, Hkv, D]; layers write at ``length`` and the
    model advances ``length`` once per forward. Preallocation keeps decode O(1) per token (no cat)."""

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, max_len, num_kv_heads, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, S, Hkv, D] after the cached tokens; return all keys/values [B, length + S, Hkv, D]."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise RuntimeError(f"KVCache: {end} tokens exceed the preallocated max_len={self.max_len}")
        self.k[layer_idx][:, self.length:end] = k
        self.v[layer_idx][:, self.length:end] = v
        return self.k[layer_idx][:, :end], self.v[layer_idx][:, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class AttentionBackend(Protocol):
    """Computes causal attention for one layer: q [B, S, Hq, D], k/v [B, S, Hkv, D] -> [B, S, Hq, D]."""

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...

    def advance(self, n: int) -> None: ...


class LocalAttention:
    """Single-device attention: optional KV cache, optional packing (cu_seqlens -> block-diagonal).

    With cu_seqlens, give max_seqlen (the longest segment) too: the offsets are then validated once here
    and stay on the device, so no layer copies them back to the host (FlashAttention's varlen contract)."""

    def __init__(self, cache: KVCache | None = None, cu_seqlens: Tensor | None = None, max_seqlen: int | None = None):
        if cache is not None and cu_seqlens is not None:
            raise ValueError("LocalAttention: 'cu_seqlens' (packed training) cannot be combined with a KV cache")
        self.cache, self.cu_seqlens, self.max_seqlen = cache, cu_seqlens, max_seqlen

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.cache is not None:
            k, v = self.cache.update(layer_idx, k, v)
        out, _ = attention_lse(q, k, v, causal=True, cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen)
        return out

    def advance(self, n: int) -> None:
        if self.cache is not None:
            self.cache.advance(n)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionBackend) -> Tensor:
        b, s, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(b, s, self.num_heads, self.head_dim), cos, sin)  # [B, S, Hq, D]
        k = apply_rotary(self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim), cos, sin)  # [B, S, Hkv, D]
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        out = attention(self.layer_idx, q, k, v)  # [B, S, Hq, D]
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionBackend) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
        return x + self.mlp(self.post_attention_layernorm(x))
