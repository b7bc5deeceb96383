"""pixel_shuffle_projector: Long-VITA's vision-to-LLM projector as one fused op."""
from __future__ import annotations

import torch
from torch import Tensor

from vita_ext._build import require_kernels


def pixel_shuffle_projector(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, w1: Tensor, w2: Tensor,
                            eps: float = 1e-5, *, b1: Tensor | None = None, b2: Tensor | None = None,
                            recompute: bool | None = None) -> Tensor:
    """Pixel shuffle (scale 0.5) + LayerNorm + Linear + exact GELU + Linear, fused.

    Computes ``gelu(layer_norm(pixel_shuffle(x)) @ w1.T + b1) @ w2.T + b2`` where pixel_shuffle is
    InternVL's "v2" 2x2 space-to-depth (see ``vita_ext.reference.pixel_shuffle``). The kernels read the
    shuffled rows straight from x inside the LayerNorm (no shuffled copy is made); the CUDA kernel
    fuses GELU into the GEMM pipeline. Differentiable w.r.t. every tensor argument; the backward
    computes only the gradients autograd asks for (a frozen ViT, i.e. x not requiring grad, costs no dx
    and no LayerNorm backward). NaN/Inf in any input propagate as in the eager PyTorch composition.

    Args:
        x: [N, L, C] vision features, L = g*g patches of a g x g grid (g even), row-major.
           Long-VITA: [tiles, 1024, 1024]. fp32, bf16 or fp16.
        ln_weight, ln_bias: [4C] LayerNorm affine parameters (``pre_proj_layernorm``), x's dtype.
        w1: [D1, 4C] first Linear weight (``mlp.0``); Long-VITA D1 = 1024.
        w2: [D2, D1] second Linear weight (``mlp.2``); Long-VITA D2 = 5120 (the LLM width).
        eps: LayerNorm epsilon (Long-VITA: 1e-5, the PyTorch default).
        b1, b2: optional biases [D1], [D2] (HF InternVL's projector has them; Long-VITA's does not).
        recompute: when gradients are needed, recompute the LayerNorm, first GEMM and GELU in the
            backward (True) instead of keeping them from the forward (False: M*(4C + 2*D1) elements of
            x's dtype, as eager autograd keeps; the backward then does 2*M*4C*D1 fewer FLOPs). Default
            None: keep them on the CPU, recompute on CUDA (where 1024 tiles would keep ~13 GB).

    Returns:
        [N, L/4, D2] in x's dtype. Long-VITA: [tiles, 256, 5120]. LayerNorm statistics and GEMM
        accumulation are fp32.

    Raises:
        RuntimeError naming the argument on a wrong dtype, device, or shape (L not an even square,
        ln_* not [4C], w1/w2 not chained), or a CUDA tensor in a CPU-only build.

    Source: Long-VITA (arXiv 2502.05177) ResamplerProjector; InternVL pixel_shuffle (ps_version v2).
    """
    require_kernels("pixel_shuffle_projector", x, w1, w2)
    if recompute is None:
        recompute = x.device.type != "cpu"
    tensors = (x, ln_weight, ln_bias, w1, b1, w2, b2)
    save = (not recompute and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in tensors))
    return torch.ops.vita_ext.pixel_shuffle_projector(x, ln_weight, ln_bias, w1, b1, w2, b2, float(eps), save)[0]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("vita_ext::pixel_shuffle_projector")
def _fake(x, ln_weight, ln_bias, w1, b1, w2, b2, eps, save_activations=False):
    torch._check(x.dim() == 3, lambda: "pixel_shuffle_projector: x must be [N, L, C]")
    n, rows = x.shape[0], x.shape[1] // 4
    y = x.new_empty((n, rows, w2.shape[0]))
    if not save_activations:
        return y, x.new_empty((0,)), x.new_empty((0,)), x.new_empty((0,)), x.new_empty((0,))
    m, d1 = n * rows, w1.shape[0]
    return (y, x.new_empty((m, 4 * x.shape[2])), x.new_empty((m, d1)), x.new_empty((m, d1)),
            x.new_empty((2, m), dtype=_acc_dtype(x.dtype)))


@torch.library.register_fake("vita_ext::pixel_shuffle_projector_backward")
def _fake_backward(grad_y, x, ln_weight, ln_bias, w1, b1, w2, b2, eps, xn=None, h=None, g=None, stats=None,
                   output_mask=(True,) * 7):
    full = (torch.empty_like(x), torch.empty_like(ln_weight), torch.empty_like(ln_bias), torch.empty_like(w1),
            w1.new_empty((w1.shape[0],)), torch.empty_like(w2), w2.new_empty((w2.shape[0],)))
    return tuple(t if want else t.new_empty((0,)) for t, want in zip(full, output_mask))


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, w1, b1, w2, b2, eps, save = inputs
    _, xn, h, g, stats = output
    ctx.mark_non_differentiable(xn, h, g, stats)
    ctx.set_materialize_grads(False)  # no zero tensors for the grads of the extra outputs
    ctx.save_for_backward(x, ln_weight, ln_bias, w1, b1, w2, b2, xn, h, g, stats)
    ctx.eps, ctx.saved_activations = eps, save


def _backward(ctx, grad_y, *_):
    if grad_y is None:  # y got no gradient (grads are not materialized as zeros)
        return (None,) * 9
    x, ln_weight, ln_bias, w1, b1, w2, b2, xn, h, g, stats = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2], need[3], need[4] and b1 is not None, need[5], need[6] and b2 is not None]
    acts = (xn, h, g, stats) if ctx.saved_activations else (None, None, None, None)
    grads = torch.ops.vita_ext.pixel_shuffle_projector_backward(grad_y, x, ln_weight, ln_bias, w1, b1, w2, b2,
                                                                ctx.eps, *acts, mask)
    return tuple(grad if want else None for grad, want in zip(grads, mask)) + (None, None)


torch.library.register_autograd("vita_ext::pixel_shuffle_projector", _backward, setup_context=_setup_context)
