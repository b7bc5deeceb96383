"""attention_lse: softmax attention that also returns the log-sum-exp (for ring attention), served by
the fastest backend the machine has (see ``attention_backends``)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from vita_ext._build import require_kernels
from vita_ext.ops import flash_attention as fa
from vita_ext.ops.attention_dispatch import BACKEND_CALLS, call_of, select_backend


def attention_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, softmax_scale: float | None = None,
                  cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
                  backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention, tiled with an online softmax, returning the output and its log-sum-exp.

    The [Sq, Sk] score matrix is never written to memory. The lse lets partial results over
    disjoint key blocks be merged exactly (``merge_attention_``), which is what ring attention and
    the sharded-KV decode do. Differentiable w.r.t. q, k, v (and through lse).

    Args:
        q: [B, Sq, Hq, D] queries, fp32/bf16/fp16 (fp64 on CPU), D <= 256 (Long-VITA LLM: D = 128, ViT: 64).
        k, v: [B, Sk, Hkv, D] keys and values in q's dtype; Hq must be a multiple of Hkv (GQA:
            query head h reads kv head h // (Hq // Hkv)).
        causal: mask future keys. Bottom-right aligned as in flash-attention >= 2.1: query i sees
            keys j <= i + Sk - Sq, so Sq = 1 against a KV cache sees every key.
        softmax_scale: multiplier of q.k (default 1/sqrt(D)).
        cu_seqlens: optional [n+1] int32/int64 cumulative sequence lengths of n packed sequences
            (B must be 1 and Sq == Sk == cu_seqlens[-1]); attention stays inside each sequence
            (block-diagonal, causal within a block when causal=True). No [S, S] mask is built.
        max_seqlen: the longest packed sequence (int), as FlashAttention's varlen API takes it. With a
            CUDA ``cu_seqlens`` pass it (the packer knows it): the offsets then stay on the device and are
            trusted as validated by the caller (``vita_ext.train.packing`` validates once per batch).
            Without it they are copied to the host and checked on every call (one sync).
        backend: "auto" (default), "flash_attn", "flash" or "vita"; default from the environment
            variable VITA_EXT_ATTENTION_BACKEND. See ``vita_ext.attention_backends()``.

    Returns:
        (out [B, Sq, Hq, D] in q's dtype, contiguous; lse [B, Hq, Sq] fp32 (fp64 for fp64 inputs), natural
        log). A query row that sees no key gets out = 0 and lse = -inf. NaN/Inf in the inputs propagate
        as in PyTorch's attention.

    Raises:
        RuntimeError naming the argument on a wrong dtype, device, shape, head ratio, cu_seqlens
        layout, or a CUDA tensor in a CPU-only build; ValueError when a forced backend cannot serve
        the call (with the reason).

    Source: FlashAttention-2 (Dao, 2023) online softmax; ring attention (Liu et al., 2023).
    """
    require_kernels("attention_lse", q, k, v)
    check_qkv("attention_lse", q, k, v)
    scale = _scale(q, softmax_scale)
    name = select_backend(call_of(q, k, v, cu_seqlens), backend)
    BACKEND_CALLS[name] += 1
    if name == "vita":
        return torch.ops.vita_ext.attention_lse(q, k, v, bool(causal), scale, cu_seqlens, _opt_int(max_seqlen))
    cu, max_seqlen = _varlen_args(q, k, cu_seqlens, max_seqlen)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return _flash_forward(name, q, k, v, bool(causal), scale, cu, max_seqlen)  # inference: no autograd node
    return _FlashAttentionLSE.apply(q, k, v, bool(causal), scale, cu, max_seqlen, name)


def attention_lse_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           causal: bool = False, softmax_scale: float | None = None,
                           cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
                           grad_lse: Tensor | None = None, backend: str | None = None
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention w.r.t. (q, k, v) given the forward's out and lse -- which may be those of a
    larger, merged attention (ring attention passes the global out and lse of its rows, so each block's
    backward is exact without any lse gradient).

    Args:
        grad_out: [B, Sq, Hq, D] in q's dtype; q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen,
            backend: as ``attention_lse``.
        out: [B, Sq, Hq, D] in q's dtype or fp32; lse: [B, Hq, Sq] fp32 (fp64 for fp64 q).
        grad_lse: optional [B, Hq, Sq] gradient w.r.t. lse; only the vita kernels take it, so a call with
            one always runs them.
    Returns:
        (dq, dk, dv) shaped and typed like q, k, v.
    Raises:
        as ``attention_lse``.
    """
    require_kernels("attention_lse_backward", q, k, v)
    check_backward_args("attention_lse_backward", grad_out, grad_lse, q, k, v, out, lse)
    scale = _scale(q, softmax_scale)
    name = select_backend(call_of(q, k, v, cu_seqlens, backward=True), backend)
    if name == "vita" or grad_lse is not None:
        return torch.ops.vita_ext.attention_lse_backward(grad_out, grad_lse, q, k, v, out, lse, bool(causal), scale,
                                                         cu_seqlens, _opt_int(max_seqlen))
    cu, max_seqlen = _varlen_args(q, k, cu_seqlens, max_seqlen)
    return _flash_backward(name, grad_out, q, k, v, out, lse, bool(causal), scale, cu, max_seqlen)


# ------------------------------------------------------------------------------------ argument checks
def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _dt(dtype: torch.dtype) -> str:
    return str(dtype)


def check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor) -> None:
    """The checks every backend shares, with the vita kernels' messages (csrc/attention_lse.h)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: argument '{name}' must be a Tensor, got {type(t).__name__}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise RuntimeError(f"{op}: argument 'q' must have dtype torch.float32, torch.bfloat16 or torch.float16 (or "
                           f"torch.float64 on the CPU), got {_dt(q.dtype)}")
    if q.is_cuda and q.dtype == torch.float64:
        raise RuntimeError(f"{op}: argument 'q' must have dtype torch.float32, torch.bfloat16 or torch.float16 on "
                           "CUDA (torch.float64 is CPU-only), got torch.float64")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise RuntimeError(f"{op}: argument '{name}' must have dtype {_dt(q.dtype)} (the dtype of 'q'), got "
                               f"{_dt(t.dtype)}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise RuntimeError(f"{op}: argument '{name}' must be on device {q.device} (the device of 'q'), got "
                               f"{t.device}")
    for name, t, layout in (("q", q, "[B, Sq, Hq, D]"), ("k", k, "[B, Sk, Hkv, D]"), ("v", v, "[B, Sk, Hkv, D]")):
        if t.dim() != 4:
            raise RuntimeError(f"{op}: argument '{name}' must be 4-D {layout}, got shape {_shape(t)}")
    d = q.shape[3]
    if not 1 <= d <= 256:
        raise RuntimeError(f"{op}: argument 'q' must have a head dim (dim 3) in [1, 256], got shape {_shape(q)}")
    if k.shape[0] != q.shape[0]:
        raise RuntimeError(f"{op}: argument 'k' must have size {q.shape[0]} in dim 0 (the batch size of 'q'), got "
                           f"shape {_shape(k)}")
    if k.shape[3] != d:
        raise RuntimeError(f"{op}: argument 'k' must have size {d} in dim 3 (the head dim of 'q'), got shape "
                           f"{_shape(k)}")
    if v.shape != k.shape:
        raise RuntimeError(f"{op}: argument 'v' must have shape {_shape(k)} (the shape of 'k'), got {_shape(v)}")
    if k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        raise RuntimeError(f"{op}: argument 'k' must have a number of heads (dim 2) that divides the {q.shape[2]} "
                           f"heads of 'q', got shape {_shape(k)}")


def _check_like(op: str, t: Tensor, name: str, dtypes: tuple, want_dtype: str, device: torch.device,
                shape: tuple, why: str) -> None:
    if t.dtype not in dtypes:
        raise RuntimeError(f"{op}: argument '{name}' must have dtype {want_dtype}, got {_dt(t.dtype)}")
    if t.device != device:
        raise RuntimeError(f"{op}: argument '{name}' must be on device {device} (the device of 'q'), got {t.device}")
    if tuple(t.shape) != tuple(shape):
        raise RuntimeError(f"{op}: argument '{name}' must have shape [{', '.join(map(str, shape))}] ({why}), got "
                           f"{_shape(t)}")


def check_backward_args(op: str, grad_out: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
                        out: Tensor, lse: Tensor) -> None:
    """attention_lse_backward's checks, with the vita kernels' messages."""
    check_qkv(op, q, k, v)
    ld = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    qd = _dt(q.dtype)
    _check_like(op, grad_out, "grad_out", (q.dtype,), f"{qd} (the dtype of 'q')", q.device, q.shape, "the shape of 'q'")
    _check_like(op, out, "out", (q.dtype, torch.float32), f"{qd} (the dtype of 'q') or torch.float32", q.device,
                q.shape, "the shape of 'q'")
    _check_like(op, lse, "lse", (ld,), _dt(ld), q.device, lse_shape, "[B, Hq, Sq] of 'q'")
    if grad_lse is not None:
        _check_like(op, grad_lse, "grad_lse", (ld,), _dt(ld), q.device, lse_shape, "[B, Hq, Sq] of 'q'")


def _opt_int(x: int | None) -> int | None:
    return None if x is None else int(x)


def _scale(q: Tensor, softmax_scale: float | None) -> float:
    if softmax_scale is not None:
        return float(softmax_scale)
    return 1.0 / math.sqrt(q.shape[-1])


def _varlen_args(q: Tensor, k: Tensor, cu_seqlens: Tensor | None, max_seqlen: int | None
                 ) -> tuple[Tensor | list[int] | None, int | None]:
    """cu_seqlens as the flash kernels want it: host offsets on CPU (the CPU kernel loops over
    segments), the device tensor on CUDA; validated here unless the caller vouches with max_seqlen."""
    if cu_seqlens is None:
        return None, None
    check_cu_seqlens_layout("attention_lse", cu_seqlens, q, k)
    if max_seqlen is not None and not 0 <= int(max_seqlen) <= q.shape[1]:
        raise RuntimeError(f"attention_lse: argument 'max_seqlen' must be in [0, {q.shape[1]}] (the sequence length "
                           f"of 'q'), got {max_seqlen}")
    if q.device.type == "cpu" or max_seqlen is None or cu_seqlens.device.type == "cpu":
        host = validate_cu_seqlens(cu_seqlens, q.shape[1], "attention_lse")
        longest = max(b - a for a, b in zip(host[:-1], host[1:]))
        return (host if q.device.type == "cpu" else cu_seqlens.to(q.device)), longest
    return cu_seqlens, int(max_seqlen)


def check_cu_seqlens_layout(op: str, cu: Tensor, q: Tensor, k: Tensor) -> None:
    """The checks of cu_seqlens that need no values (so none needs a host copy)."""
    if cu.dtype not in (torch.int32, torch.int64):
        raise RuntimeError(f"{op}: argument 'cu_seqlens' must have dtype torch.int32 or torch.int64, got "
                           f"{_dt(cu.dtype)}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise RuntimeError(f"{op}: argument 'cu_seqlens' must be 1-D [n + 1] with n >= 1, got shape {_shape(cu)}")
    if q.shape[0] != 1:
        raise RuntimeError(f"{op}: argument 'cu_seqlens' requires batch size 1 (packed sequences), got 'q' of "
                           f"shape {_shape(q)}")
    if q.shape[1] != k.shape[1]:
        raise RuntimeError(f"{op}: argument 'cu_seqlens' requires Sq == Sk, got 'q' of shape {_shape(q)} and 'k' "
                           f"of shape {_shape(k)}")


def validate_cu_seqlens(cu: Tensor, seq_len: int, op: str = "attention_lse") -> list[int]:
    """Host copy of cu_seqlens, checked: starts at 0, ends at ``seq_len``, non-decreasing. One
    device-to-host copy for a CUDA tensor: call it once per packed batch, not per layer."""
    host = [int(x) for x in cu.tolist()]
    if host[0] != 0:
        raise RuntimeError(f"{op}: argument 'cu_seqlens' must start at 0, got {host[0]}")
    if host[-1] != seq_len:
        raise RuntimeError(f"{op}: argument 'cu_seqlens' must end at the sequence length {seq_len}, got {host[-1]}")
    for i in range(1, len(host)):
        if host[i] < host[i - 1]:
            raise RuntimeError(f"{op}: argument 'cu_seqlens' must be non-decreasing, got {host[i - 1]} then "
                               f"{host[i]} at index {i}")
    return host


# --------------------------------------------------------------------------- flash backends' autograd
def _flash_forward(name, q, k, v, causal, scale, cu, max_seqlen):
    if q.numel() == 0 or k.shape[1] == 0:
        return fa._empty_result(q)
    if q.device.type == "cpu":
        return fa.flash_cpu_forward(q, k, v, causal, scale, cu)
    if name == "flash_attn":
        return fa.flash_attn_forward(q, k, v, causal, scale, cu, max_seqlen)
    return fa.flash_cuda_forward(q, k, v, causal, scale, cu, max_seqlen)


def _flash_backward(name, dout, q, k, v, out, lse, causal, scale, cu, max_seqlen):
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if q.device.type == "cpu":
        return fa.flash_cpu_backward(dout, q, k, v, out, lse, causal, scale, cu)
    return fa.flash_cuda_backward(dout, q, k, v, out, lse, causal, scale, cu, max_seqlen)


class _FlashAttentionLSE(torch.autograd.Function):
    """out, lse from a flash backend; the backward runs that backend's backward, or the vita backward
    when lse itself receives a gradient (the flash kernels take none)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, cu, max_seqlen, name):
        out, lse = _flash_forward(name, q, k, v, causal, scale, cu, max_seqlen)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, cu, max_seqlen, name)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, cu, max_seqlen, name = ctx.args
        if dout is None and dlse is None:
            return (None,) * 8
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None:
            cu_t = torch.tensor(cu, dtype=torch.int64) if isinstance(cu, list) else cu
            dq, dk, dv = torch.ops.vita_ext.attention_lse_backward(dout, dlse, q, k, v, out, lse, causal, scale, cu_t,
                                                                   max_seqlen)
        else:
            dq, dk, dv = _flash_backward(name, dout, q, k, v, out, lse, causal, scale, cu, max_seqlen)
        return dq, dk, dv, None, None, None, None, None


# ------------------------------------------------------------------------ the vita op's registrations
@torch.library.register_fake("vita_ext::attention_lse")
def _fake(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen=None):
    b, sq, hq, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, hq, sq), dtype=lse_dtype)


@torch.library.register_fake("vita_ext::attention_lse_backward")
def _fake_backward(grad_out, grad_lse, q, k, v, out, lse, causal, softmax_scale, cu_seqlens, max_seqlen=None):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale, cu_seqlens, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.causal, ctx.softmax_scale, ctx.max_seqlen = causal, softmax_scale, (rest[0] if rest else None)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = torch.ops.vita_ext.attention_lse_backward(grad_out, grad_lse, q, k, v, out, lse, ctx.causal,
                                                           ctx.softmax_scale, cu_seqlens, ctx.max_seqlen)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("vita_ext::attention_lse", _backward, setup_context=_setup_context)
