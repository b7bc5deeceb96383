"""Context parallelism: zig-zag sharding, ring attention, and generation over a sharded KV cache."""
from vita_ext.parallel.attention import RingPrefillAttention, ShardedDecodeAttention, ShardedKVCache
from vita_ext.parallel.generate import agree, cp_generate, init_distributed, shutdown_distributed
from vita_ext.parallel.ring import ring_attention, simulated_ring_attention
from vita_ext.parallel.sharding import ZigZagPlan

__all__ = ["RingPrefillAttention", "ShardedDecodeAttention", "ShardedKVCache", "ZigZagPlan", "agree", "cp_generate",
           "init_distributed", "ring_attention", "shutdown_distributed", "simulated_ring_attention"]
