"""Attention backends for context parallelism: ring prefill, and decode over a sharded KV cache.

Prefill: every decoder layer runs ``ring_attention`` on the rank's zig-zag shard and (for generation)
keeps the K/V of its real positions in its own ``ShardedKVCache``. Decode: all ranks compute the new
token's q/k/v (the weights are replicated); one rank appends k/v to its cache (the one with the
fewest tokens, so caches stay balanced); every rank attends the query to its local cache, returning
(out, lse); the P partial results are all-gathered and merged in rank order with ``merge_attention_``,
which gives every rank exactly the single-device result. The official release re-runs the whole
prefill for every new token in CP mode; this keeps the cache instead.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from vita_ext.ops import attention_lse, merge_attention_
from vita_ext.parallel.ring import group_info, ring_attention
from vita_ext.parallel.sharding import ZigZagPlan


class ShardedKVCache:
    """This rank's K/V rows [B, capacity, Hkv, D] per layer, plus every rank's row count (known to all)."""

    def __init__(self, num_layers: int, batch: int, capacity: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, lengths: list[int], rank: int):
        shape = (batch, capacity, num_kv_heads, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths, self.rank, self.capacity = list(lengths), rank, capacity

    @property
    def length(self) -> int:
        return self.lengths[self.rank]

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def write(self, layer_idx: int, start: int, k: Tensor, v: Tensor) -> None:
        end = start + k.shape[1]
        if end > self.capacity:
            raise RuntimeError(f"ShardedKVCache: {end} rows exceed this rank's capacity {self.capacity}")
        self.k[layer_idx][:, start:end] = k
        self.v[layer_idx][:, start:end] = v

    def append_rank(self) -> int:
        """Where the next token's K/V go: the rank holding the fewest rows (lowest rank on ties)."""
        return min(range(len(self.lengths)), key=lambda r: (self.lengths[r], r))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class RingPrefillAttention:
    """Backend for a zig-zag-sharded prefill (or training step): ring attention per layer; with a
    cache, each rank also keeps the K/V of its real (non-padding) positions."""

    def __init__(self, plan: ZigZagPlan, group=None, cache: ShardedKVCache | None = None):
        self.plan, self.group, self.cache = plan, group, cache
        self.rank, _ = group_info(group)
        local = plan.positions(self.rank)
        self.real_rows = (local < plan.seq_len).nonzero().flatten()
        self.calls = 0

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.cache is not None:
            rows = self.real_rows.to(k.device)
            self.cache.write(layer_idx, 0, k.index_select(1, rows), v.index_select(1, rows))
        self.calls += 1
        out, _ = ring_attention(q, k, v, self.group)
        return out

    def advance(self, n: int) -> None:
        pass  # the cache's lengths were set when it was made


class ShardedDecodeAttention:
    """Backend for one new token per step against a ``ShardedKVCache``; returns the exact global result."""

    def __init__(self, cache: ShardedKVCache, group=None):
        self.cache, self.group = cache, group
        self.rank, self.world = group_info(group)

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache, target = self.cache, self.cache.append_rank()
        n = cache.length
        if self.rank == target:
            cache.write(layer_idx, n, k, v)
            n += k.shape[1]
        b, s, hq, d = q.shape
        if n > 0:
            out, lse = attention_lse(q, cache.k[layer_idx][:, :n], cache.v[layer_idx][:, :n], causal=False)
        else:  # an empty shard contributes nothing
            out, lse = q.new_zeros(q.shape), q.new_full((b, hq, s), float("-inf"), dtype=torch.float32)
        return self._combine(out.float(), lse).to(q.dtype)

    def _combine(self, out: Tensor, lse: Tensor) -> Tensor:
        if self.world == 1:
            return out
        outs = [torch.empty_like(out) for _ in range(self.world)]
        lses = [torch.empty_like(lse) for _ in range(self.world)]
        dist.all_gather(outs, out.contiguous(), group=self.group)
        dist.all_gather(lses, lse.contiguous(), group=self.group)
        acc, acc_lse = outs[0], lses[0]
        for o, l in zip(outs[1:], lses[1:]):  # same order on every rank -> bitwise identical results
            merge_attention_(acc, acc_lse, o, l)
        return acc

    def advance(self, n: int) -> None:
        self.cache.lengths[self.cache.append_rank()] += n
