"""Context parallelism: zig-zag sharding, ring attention, generation over a sharded KV cache, and
failing together (``failure``: every rank stops with the same reason when one fails)."""
from vita_ext.parallel.attention import RingPrefillAttention, ShardedDecodeAttention, ShardedKVCache
from vita_ext.parallel.failure import FailureWatch, RankFailure, agree, exit_on_failure, verdict
from vita_ext.parallel.generate import cp_generate, init_distributed, shutdown_distributed
from vita_ext.parallel.ring import ring_attention, simulated_ring_attention
from vita_ext.parallel.sharding import ZigZagPlan

__all__ = ["FailureWatch", "RankFailure", "RingPrefillAttention", "ShardedDecodeAttention", "ShardedKVCache",
           "ZigZagPlan", "agree", "cp_generate", "exit_on_failure", "init_distributed", "ring_attention",
           "shutdown_distributed", "simulated_ring_attention", "verdict"]
