"""masked_linear_cross_entropy: LM-head GEMM + cross-entropy that never materialises [T, V] logits."""
from __future__ import annotations

import torch
from torch import Tensor

from vita_ext._build import require_kernels

_REDUCTIONS = ("mean", "sum", "none")


def masked_linear_cross_entropy(hidden_states: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100,
                                reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``hidden_states @ weight.T`` against ``labels``, computed without the logits.

    Only rows whose label is not ``ignore_index`` reach the vocabulary GEMM. The kernel works in
    chunks of rows and vocabulary with an online log-sum-exp; its backward recomputes each logits
    chunk, forms softmax - onehot in place and accumulates dW in fp32. Extra memory is
    O(chunk x V) beyond the inputs and gradients. Differentiable w.r.t. hidden_states and weight;
    ignored rows get a zero gradient.

    Args:
        hidden_states: [T, H] (or [..., H], flattened) final hidden states, fp32/bf16/fp16.
        weight: [V, H] ``lm_head.weight`` in hidden_states' dtype.
        labels: [T] (or hidden_states' leading shape) int64 targets in [0, V), or ignore_index.
            Already shifted: row t is scored against labels[t].
        ignore_index: label value of unsupervised rows (default -100).
        reduction: 'mean' (over supervised rows; NaN if there are none, as F.cross_entropy),
            'sum', or 'none' (per-row loss, 0 at ignored rows).

    Returns:
        fp32 loss (fp64 for fp64 inputs): a scalar, or [T] (labels' shape) for reduction='none'. Matches
        ``F.cross_entropy(F.linear(h, W).float(), labels, ignore_index=..., reduction=...)``.

    Raises:
        ValueError for an unknown reduction; RuntimeError naming the argument for a wrong dtype,
        device or shape, a label outside [0, V) (other than ignore_index), or a CUDA tensor in a
        CPU-only build.

    Source: Long-VITA (arXiv 2502.05177) logits-masked head for training; the chunked/online
    log-sum-exp follows Cut Cross-Entropy (Wijmans et al., 2024) and Liger-Kernel's fused linear CE.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"masked_linear_cross_entropy: argument 'reduction' must be one of {_REDUCTIONS}, "
                         f"got {reduction!r}")
    require_kernels("masked_linear_cross_entropy", hidden_states, weight, labels)
    lead = labels.shape
    if hidden_states.dim() != 2:
        if hidden_states.dim() < 2 or hidden_states.shape[:-1] != labels.shape:
            raise RuntimeError("masked_linear_cross_entropy: argument 'hidden_states' must be [T, H] or "
                               f"[..., H] matching labels {tuple(labels.shape)}, got {tuple(hidden_states.shape)}")
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        labels = labels.reshape(-1)
    loss, _ = torch.ops.vita_ext.masked_linear_cross_entropy(hidden_states, weight, labels, int(ignore_index),
                                                             reduction)
    return loss.reshape(lead) if reduction == "none" else loss


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # The kernels accumulate, and return the loss, in fp32 -- in fp64 for fp64 inputs (gradcheck).
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("vita_ext::masked_linear_cross_entropy")
def _fake(hidden_states, weight, labels, ignore_index, reduction):
    t = hidden_states.shape[0]
    loss_shape = (t,) if reduction == "none" else ()
    acc = _acc_dtype(hidden_states.dtype)
    # lse is fp64 whatever the input dtype: the backward's exp(logit - lse) needs it exact to ~1e-7
    # absolute, which an fp32 lse of magnitude ~16 is not.
    return hidden_states.new_empty(loss_shape, dtype=acc), hidden_states.new_empty((t,), dtype=torch.float64)


@torch.library.register_fake("vita_ext::masked_linear_cross_entropy_backward")
def _fake_backward(grad_loss, hidden_states, weight, labels, lse, ignore_index, reduction):
    # The kernels return contiguous gradients whatever the inputs' strides.
    return hidden_states.new_empty(hidden_states.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    hidden_states, weight, labels, ignore_index, reduction = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(hidden_states, weight, labels, lse)
    ctx.ignore_index, ctx.reduction = ignore_index, reduction


def _backward(ctx, grad_loss, grad_lse):
    hidden_states, weight, labels, lse = ctx.saved_tensors
    grad_hidden, grad_weight = torch.ops.vita_ext.masked_linear_cross_entropy_backward(
        grad_loss, hidden_states, weight, labels, lse, ctx.ignore_index, ctx.reduction)
    return (grad_hidden if ctx.needs_input_grad[0] else None,
            grad_weight if ctx.needs_input_grad[1] else None, None, None, None)


torch.library.register_autograd("vita_ext::masked_linear_cross_entropy", _backward, setup_context=_setup_context)
