"""merge_attention_: in-place log-sum-exp merge of a partial attention result (ring attention step)."""
from __future__ import annotations

import torch
from torch import Tensor

from vita_ext._build import require_kernels


def merge_attention_(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """Merge the attention of the same queries over another, disjoint key block into (out, lse).

    In fp32, in the overflow-free form ``lse' = max + log(exp(lse - max) + exp(block_lse - max))``,
    ``out' = out * exp(lse - lse') + block_out * exp(block_lse - lse')``. A -inf lse (no keys seen)
    contributes nothing; both -inf leaves out = 0 and lse = -inf. Not differentiable (ring attention
    has its own backward).

    Args:
        out: [B, S, H, D] running output, updated in place. fp32 recommended (a ring keeps it fp32
            and casts once at the end); bf16/fp16 are accepted and rounded once per merge. May be
            a strided view (e.g. one chunk of a zig-zag shard); the last dim must be contiguous.
        lse: [B, H, S] fp32 running log-sum-exp, updated in place; may be a strided view.
        block_out: [B, S, H, D] partial output of the new block, any float dtype.
        block_lse: [B, H, S] fp32 log-sum-exp of the new block.

    Raises:
        RuntimeError naming the argument on a wrong dtype, device or shape, or a CUDA tensor in a
        CPU-only build.

    Source: ring-flash-attention / FlashAttention-2 lse rescaling (Dao, 2023; Liu et al., 2023).
    """
    require_kernels("merge_attention_", out, block_out)
    torch.ops.vita_ext.merge_attention_(out, lse, block_out, block_lse)


@torch.library.register_fake("vita_ext::merge_attention_")
def _fake(out, lse, block_out, block_lse):
    return None
