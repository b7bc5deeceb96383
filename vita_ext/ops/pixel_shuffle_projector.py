"""pixel_shuffle_projector: Long-VITA's vision-to-LLM projector as one fused op."""
from __future__ import annotations

import torch
from torch import Tensor

from vita_ext._build import require_kernels


def pixel_shuffle_projector(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, w1: Tensor, w2: Tensor,
                            eps: float = 1e-5, *, b1: Tensor | None = None, b2: Tensor | None = None) -> Tensor:
    """Pixel shuffle (scale 0.5) + LayerNorm + Linear + exact GELU + Linear, fused.

    Computes ``gelu(layer_norm(pixel_shuffle(x)) @ w1.T + b1) @ w2.T + b2`` where pixel_shuffle is
    InternVL's "v2" 2x2 space-to-depth (see ``vita_ext.reference.pixel_shuffle``). The CUDA kernel
    reads the shuffled rows straight from x inside the LayerNorm (no shuffled copy is made) and
    fuses GELU into the GEMM pipeline. Differentiable w.r.t. every tensor argument.

    Args:
        x: [N, L, C] vision features, L = g*g patches of a g x g grid (g even), row-major.
           Long-VITA: [tiles, 1024, 1024]. fp32, bf16 or fp16.
        ln_weight, ln_bias: [4C] LayerNorm affine parameters (``pre_proj_layernorm``), x's dtype.
        w1: [D1, 4C] first Linear weight (``mlp.0``); Long-VITA D1 = 1024.
        w2: [D2, D1] second Linear weight (``mlp.2``); Long-VITA D2 = 5120 (the LLM width).
        eps: LayerNorm epsilon (Long-VITA: 1e-5, the PyTorch default).
        b1, b2: optional biases [D1], [D2] (HF InternVL's projector has them; Long-VITA's does not).

    Returns:
        [N, L/4, D2] in x's dtype. Long-VITA: [tiles, 256, 5120]. LayerNorm statistics and GEMM
        accumulation are fp32.

    Raises:
        RuntimeError naming the argument on a wrong dtype, device, or shape (L not an even square,
        ln_* not [4C], w1/w2 not chained), or a CUDA tensor in a CPU-only build.

    Source: Long-VITA (arXiv 2502.05177) ResamplerProjector; InternVL pixel_shuffle (ps_version v2).
    """
    require_kernels("pixel_shuffle_projector", x, w1, w2)
    return torch.ops.vita_ext.pixel_shuffle_projector(x, ln_weight, ln_bias, w1, b1, w2, b2, float(eps))


@torch.library.register_fake("vita_ext::pixel_shuffle_projector")
def _fake(x, ln_weight, ln_bias, w1, b1, w2, b2, eps):
    torch._check(x.dim() == 3, lambda: "pixel_shuffle_projector: x must be [N, L, C]")
    return x.new_empty((x.shape[0], x.shape[1] // 4, w2.shape[0]))


@torch.library.register_fake("vita_ext::pixel_shuffle_projector_backward")
def _fake_backward(grad_y, x, ln_weight, ln_bias, w1, b1, w2, b2, eps):
    return (torch.empty_like(x), torch.empty_like(ln_weight), torch.empty_like(ln_bias), torch.empty_like(w1),
            w1.new_empty((w1.shape[0],)), torch.empty_like(w2), w2.new_empty((w2.shape[0],)))


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, w1, b1, w2, b2, eps = inputs
    ctx.save_for_backward(x, ln_weight, ln_bias, w1, b1, w2, b2)
    ctx.eps = eps


def _backward(ctx, grad_y):
    x, ln_weight, ln_bias, w1, b1, w2, b2 = ctx.saved_tensors
    dx, dlnw, dlnb, dw1, db1, dw2, db2 = torch.ops.vita_ext.pixel_shuffle_projector_backward(
        grad_y, x, ln_weight, ln_bias, w1, b1, w2, b2, ctx.eps)
    return dx, dlnw, dlnb, dw1, (db1 if b1 is not None else None), dw2, (db2 if b2 is not None else None), None


torch.library.register_autograd("vita_ext::pixel_shuffle_projector", _backward, setup_context=_setup_context)
