"""masked_linear_cross_entropy: LM-head GEMM + cross-entropy that never materialises [T, V] logits."""
from __future__ import annotations

import torch
from torch import Tensor

from vita_ext._build import require_kernels

_REDUCTIONS = ("mean", "sum", "none")


def masked_linear_cross_entropy(hidden_states: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100,
                                reduction: str = "mean", *, num_supervised: int | None = None,
                                grad_in_forward: bool = False) -> Tensor:
    """Cross-entropy of ``hidden_states @ weight.T`` against ``labels``, computed without the logits.

    Only rows whose label is not ``ignore_index`` reach the vocabulary GEMM. The kernel works in
    chunks of rows and vocabulary with an online log-sum-exp; its backward recomputes each logits
    chunk, forms softmax - onehot in place and computes only the gradients autograd asks for (a
    frozen ``weight`` costs no dW GEMM and no [V, H] buffer). Extra memory is O(chunk x V) beyond the
    inputs and gradients. Differentiable w.r.t. hidden_states and weight; ignored rows get a zero
    gradient. NaN/Inf in the supervised rows of hidden_states or anywhere in weight propagate to the
    loss and the gradients as in ``F.cross_entropy(F.linear(h[supervised], W).float(), ...)``.

    Args:
        hidden_states: [T, H] (or [..., H], flattened) final hidden states, fp32/bf16/fp16.
        weight: [V, H] ``lm_head.weight`` in hidden_states' dtype.
        labels: [T] (or hidden_states' leading shape) int64 targets in [0, V), or ignore_index.
            Already shifted: row t is scored against labels[t].
        ignore_index: label value of unsupervised rows (default -100).
        reduction: 'mean' (over supervised rows; NaN if there are none, as F.cross_entropy),
            'sum', or 'none' (per-row loss, 0 at ignored rows).
        num_supervised: the number of labels != ignore_index, when the caller knows it on the host
            (the training packer does). The op then reads nothing back from the device: no host sync,
            so a step stays asynchronous and CUDA-graph capturable. Nothing is checked on the host
            then: a wrong count gives a NaN loss and NaN gradients, a label outside [0, V) a NaN loss
            for its row, instead of an error. Without it (default) one sync selects the rows and a bad
            label raises.
        grad_in_forward: form the gradients of the inputs that require grad in the forward pass (the
            Liger-Kernel scheme: 6*M*H*V FLOPs per step with both gradients instead of 8*M*H*V, no
            logits recomputation); the backward then only scales them by the upstream gradient. For a
            loss that is backpropagated once (as in the training loop), 'mean' or 'sum'. The
            gradients are held from the forward to the backward (dW: V*H elements of weight's dtype).

    Returns:
        fp32 loss (fp64 for fp64 inputs): a scalar, or [T] (labels' shape) for reduction='none'. Matches
        ``F.cross_entropy(F.linear(h, W).float(), labels, ignore_index=..., reduction=...)``.

    Raises:
        ValueError for an unknown reduction or grad_in_forward with reduction='none'; RuntimeError
        naming the argument for a wrong dtype, device or shape, a label outside [0, V) (other than
        ignore_index; without num_supervised), a num_supervised outside [0, T], or a CUDA tensor in a
        CPU-only build.

    Source: Long-VITA (arXiv 2502.05177) logits-masked head for training; the chunked/online
    log-sum-exp follows Cut Cross-Entropy (Wijmans et al., 2024) and Liger-Kernel's fused linear CE
    (gradient in the forward pass).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"masked_linear_cross_entropy: argument 'reduction' must be one of {_REDUCTIONS}, "
                         f"got {reduction!r}")
    if grad_in_forward and reduction == "none":
        raise ValueError("masked_linear_cross_entropy: argument 'grad_in_forward' needs reduction 'mean' or 'sum' "
                         "(a scalar loss), got 'none'")
    require_kernels("masked_linear_cross_entropy", hidden_states, weight, labels)
    lead = labels.shape
    if hidden_states.dim() != 2:
        if hidden_states.dim() < 2 or hidden_states.shape[:-1] != labels.shape:
            raise RuntimeError("masked_linear_cross_entropy: argument 'hidden_states' must be [T, H] or "
                               f"[..., H] matching labels {tuple(labels.shape)}, got {tuple(hidden_states.shape)}")
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        labels = labels.reshape(-1)
    flags = [False, False]
    if grad_in_forward and torch.is_grad_enabled():
        flags = [hidden_states.requires_grad, weight.requires_grad]
    count = None if num_supervised is None else int(num_supervised)
    loss = torch.ops.vita_ext.masked_linear_cross_entropy(hidden_states, weight, labels, int(ignore_index),
                                                          reduction, count, flags)[0]
    return loss.reshape(lead) if reduction == "none" else loss


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # The kernels accumulate, and return the loss, in fp32 -- in fp64 for fp64 inputs (gradcheck).
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("vita_ext::masked_linear_cross_entropy")
def _fake(hidden_states, weight, labels, ignore_index, reduction, num_supervised=None,
          grad_in_forward=(False, False)):
    t = hidden_states.shape[0]
    loss_shape = (t,) if reduction == "none" else ()
    acc = _acc_dtype(hidden_states.dtype)
    # lse is fp64 whatever the input dtype: the backward's exp(logit - lse) needs it exact to ~1e-7
    # absolute, which an fp32 lse of magnitude ~16 is not.
    return (hidden_states.new_empty(loss_shape, dtype=acc), hidden_states.new_empty((t,), dtype=torch.float64),
            hidden_states.new_empty(hidden_states.shape if grad_in_forward[0] else (0,)),
            weight.new_empty(weight.shape if grad_in_forward[1] else (0,)))


@torch.library.register_fake("vita_ext::masked_linear_cross_entropy_backward")
def _fake_backward(grad_loss, hidden_states, weight, labels, lse, ignore_index, reduction, num_supervised=None,
                   output_mask=(True, True)):
    # The kernels return contiguous gradients whatever the inputs' strides; [0] for those not asked for.
    return (hidden_states.new_empty(hidden_states.shape if output_mask[0] else (0,)),
            weight.new_empty(weight.shape if output_mask[1] else (0,)))


def _setup_context(ctx, inputs, output):
    hidden_states, weight, labels, ignore_index, reduction, num_supervised, grad_in_forward = inputs
    _, lse, grad_hidden, grad_weight = output
    ctx.mark_non_differentiable(lse, grad_hidden, grad_weight)
    ctx.set_materialize_grads(False)  # no zero tensors for the grads of the extra outputs
    ctx.save_for_backward(hidden_states, weight, labels, lse, grad_hidden, grad_weight)
    ctx.ignore_index, ctx.reduction, ctx.num_supervised = ignore_index, reduction, num_supervised
    ctx.formed = tuple(bool(f) for f in grad_in_forward)


def _backward(ctx, grad_loss, grad_lse, grad_grad_hidden, grad_grad_weight):
    if grad_loss is None:  # the loss got no gradient (grads are not materialized as zeros)
        return (None,) * 7
    hidden_states, weight, labels, lse, formed_hidden, formed_weight = ctx.saved_tensors
    want = ctx.needs_input_grad[:2]
    # Gradients formed in the forward pass, scaled by the upstream gradient (out of place: mutating a
    # saved output would break torch.compile's graph partitioning).
    out = [formed_hidden * grad_loss if want[0] and ctx.formed[0] else None,
           formed_weight * grad_loss if want[1] and ctx.formed[1] else None]
    missing = [w and not f for w, f in zip(want, ctx.formed)]
    if any(missing):
        grads = torch.ops.vita_ext.masked_linear_cross_entropy_backward(
            grad_loss, hidden_states, weight, labels, lse, ctx.ignore_index, ctx.reduction, ctx.num_supervised,
            missing)
        out = [g if m else o for g, m, o in zip(grads, missing, out)]
    return out[0], out[1], None, None, None, None, None


torch.library.register_autograd("vita_ext::masked_linear_cross_entropy", _backward, setup_context=_setup_context)
