"""masked_lm_head: the LM head applied to selected rows only (the paper's logits-masked head)."""
from __future__ import annotations

import torch
from torch import Tensor

from vita_ext._build import require_kernels


def masked_lm_head(hidden_states: Tensor, weight: Tensor, positions: Tensor) -> Tensor:
    """Logits for the rows at ``positions`` only: ``hidden_states[positions] @ weight.T``.

    A 1M-token prompt needs the logits of its last position only; the full [T, V] product would
    be ~608 GB in fp32 for Long-VITA's vocabulary. Differentiable w.r.t. hidden_states and weight
    (rows not selected get a zero gradient; repeated positions accumulate). No value is read back from
    the device (no host sync: a decode step stays asynchronous and CUDA-graph capturable). On the CPU
    a few rows (K <= 4, decode) are dot products that stream the weight once; more rows one GEMM.
    NaN/Inf in the selected rows or the weight propagate as in ``F.linear``.

    Args:
        hidden_states: [T, H] final hidden states (after the final norm), fp32/bf16/fp16.
        weight: [V, H] the ``lm_head.weight``, hidden_states' dtype. Long-VITA: [152064, 5120].
        positions: [K] int64 row indices in [-T, T) (negative indices count from the end).

    Returns:
        [K, V] logits in hidden_states' dtype, accumulated in fp32. K = 0 gives an empty [0, V].

    Raises:
        RuntimeError naming the argument on a wrong dtype, device or shape, a position out of range
        (CPU; on CUDA the range is checked on the device and such a position gives a row of NaN
        logits), or a CUDA tensor in a CPU-only build.

    Source: Long-VITA (arXiv 2502.05177) section "logits-masked LM head"; HF ``logits_to_keep``.
    """
    require_kernels("masked_lm_head", hidden_states, weight, positions)
    return torch.ops.vita_ext.masked_lm_head(hidden_states, weight, positions)


@torch.library.register_fake("vita_ext::masked_lm_head")
def _fake(hidden_states, weight, positions):
    return hidden_states.new_empty((positions.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    hidden_states, weight, positions = inputs
    ctx.save_for_backward(hidden_states, weight, positions)


def _backward(ctx, grad_logits):
    hidden_states, weight, positions = ctx.saved_tensors
    positions = torch.where(positions < 0, positions + hidden_states.shape[0], positions)
    grad_hidden = grad_weight = None
    if ctx.needs_input_grad[0]:
        rows = grad_logits.to(weight.dtype) @ weight
        # index_put_ with accumulate (as eager indexing's backward): CPU index_add_ goes through a
        # scatter_add_ that ran ~1000x slower with two threads here.
        grad_hidden = torch.zeros_like(hidden_states).index_put_((positions,), rows.to(hidden_states.dtype),
                                                                 accumulate=True)
    if ctx.needs_input_grad[1]:
        grad_weight = grad_logits.to(hidden_states.dtype).t() @ hidden_states.index_select(0, positions)
    return grad_hidden, grad_weight, None


torch.library.register_autograd("vita_ext::masked_lm_head", _backward, setup_context=_setup_context)
