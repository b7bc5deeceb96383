"""Which kernel serves an ``attention_lse`` call: the rules, the override, and ``attention_backends()``.

Three backends compute the same thing (out [B, Sq, Hq, D], lse [B, Hq, Sq] fp32, bottom-right causal,
GQA, ``cu_seqlens`` varlen, out = 0 / lse = -inf for rows that see no key):

- ``flash_attn``: the flash-attn package (FlashAttention-3's ``flash_attn_interface`` on Hopper, else
  FlashAttention-2) for the forward, PyTorch's bundled FlashAttention-2 backward. CUDA, fp16/bf16,
  head_dim a multiple of 8 up to 256, sm80+. Optional: ``pip install -e .[flash]``.
- ``flash``: PyTorch's own flash kernels, no extra dependency. CUDA: ``aten._flash_attention_forward``
  / ``_backward`` (FlashAttention-2; varlen; a split-KV kernel for Sq = 1), same limits as above. CPU:
  ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward (bf16/fp16, and fp32 without
  gradients unless forced: its fp32 backward measured ~2x plain PyTorch's error, past the project's accuracy rule;
  bottom-right causal and varlen made of top-left-causal calls, see ``flash_attention.py``).
- ``vita``: vita_ext's own kernels (``csrc/``): fp64, any head_dim up to 256, every layout; the only
  backward that takes a gradient w.r.t. lse.

Automatic choice (per call): the first of flash_attn, flash, vita that takes the call, except that
fp64 always runs ``vita`` (the float64 kernels are the specification's twin; gradcheck runs them).
``backend=`` on the call, else the environment variable ``VITA_EXT_ATTENTION_BACKEND``
(``auto`` | ``flash_attn`` | ``flash`` | ``vita``), forces one; a forced backend that cannot take a
call raises a ValueError saying why -- a backend is never used for a call it does not support.

The backward of a call whose lse receives a gradient (e.g. a loss on a merged lse) runs the ``vita``
backward kernel with the forward's out and lse, whichever backend ran the forward: the flash kernels
take no lse gradient.
"""
from __future__ import annotations

import functools
import importlib
import os
from collections import Counter
from dataclasses import dataclass

import torch

BACKENDS = ("flash_attn", "flash", "vita")
ENV_VAR = "VITA_EXT_ATTENTION_BACKEND"
_FLASH_DTYPES_CUDA = (torch.float16, torch.bfloat16)
_FLASH_DTYPES_CPU = (torch.float32, torch.bfloat16, torch.float16)
# Forward calls served per backend since start-up (``vita-ext generate`` prints which ran).
BACKEND_CALLS: Counter = Counter()


@dataclass(frozen=True)
class AttentionCall:
    """The facts of one call that decide which backends may serve it."""

    device_type: str  # "cpu", "cuda", ...
    dtype: torch.dtype
    head_dim: int
    varlen: bool
    needs_grad: bool = False  # autograd will ask for dq/dk/dv (or it is a backward call)
    device_index: int | None = None


def call_of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None,
            backward: bool = False) -> AttentionCall:
    needs_grad = backward or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    return AttentionCall(q.device.type, q.dtype, int(q.shape[-1]), cu_seqlens is not None, needs_grad,
                         q.device.index)


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int | None) -> tuple[int, int] | None:
    """(major, minor) of the GPU, or None when no GPU can be asked (e.g. fake CUDA tensors on a CPU host)."""
    try:
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_capability(index if index is not None else torch.cuda.current_device())
    except (RuntimeError, AssertionError):
        return None


def _flash_cuda_limits(call: AttentionCall) -> str | None:
    if call.dtype not in _FLASH_DTYPES_CUDA:
        return f"FlashAttention on CUDA takes fp16/bf16, got {str(call.dtype).replace('torch.', '')}"
    if call.head_dim % 8 or call.head_dim > 256:
        return f"FlashAttention takes a head_dim that is a multiple of 8 up to 256, got {call.head_dim}"
    cap = _cuda_capability(call.device_index)
    if cap is not None and cap < (8, 0):
        return f"FlashAttention needs an sm80+ GPU (Ampere or newer), this GPU is sm{cap[0]}{cap[1]}"
    return None


@functools.lru_cache(maxsize=None)
def flash_attn_module() -> tuple[object | None, str]:
    """(module, how) of the flash-attn package: FlashAttention-3's ``flash_attn_interface`` when it
    imports and the GPU is a Hopper, else FlashAttention-2's ``flash_attn``; (None, why) without one."""
    errors = []
    cap = _cuda_capability(None)
    if cap is not None and cap[0] == 9:
        try:
            return importlib.import_module("flash_attn_interface"), "FlashAttention-3 (flash_attn_interface)"
        except ImportError as exc:
            errors.append(f"flash_attn_interface: {exc}")
    try:
        mod = importlib.import_module("flash_attn")
        return mod, f"FlashAttention-2 (flash_attn {getattr(mod, '__version__', '?')})"
    except ImportError as exc:
        errors.append(f"flash_attn: {exc}")
    return None, "the flash-attn package is not installed (pip install -e .[flash]); " + "; ".join(errors)


def _aten_flash_cuda_built() -> bool:
    fn = getattr(torch.backends.cuda, "is_flash_attention_available", None)
    return bool(fn()) if fn is not None else torch.version.cuda is not None


FP32_CPU_GRAD_NOTE = ("at fp32, PyTorch's CPU flash backward has ~2x the error of plain PyTorch attention (the "
                      "project's accuracy rule allows at most 2x), so automatic selection runs fp32 CPU training on "
                      "the vita kernels; forcing backend 'flash' gives SDPA's own speed and error")


def why_not(backend: str, call: AttentionCall, auto: bool = False) -> str | None:
    """None when ``backend`` can serve ``call``, else the reason it cannot (one line). ``auto``: whether the
    automatic choice may pick it (stricter: it also keeps the project's accuracy rule)."""
    if backend == "vita":
        return None if call.device_type in ("cpu", "cuda") else f"vita kernels run on CPU and CUDA, not {call.device_type}"
    if call.dtype == torch.float64 and backend in ("flash", "flash_attn"):
        return "fp64 runs on the vita kernels"
    if backend == "flash":
        if call.device_type == "cpu":
            if call.dtype not in _FLASH_DTYPES_CPU:
                return f"PyTorch's CPU flash attention takes fp32/bf16/fp16, got {call.dtype}"
            if auto and call.dtype == torch.float32 and call.needs_grad:
                return FP32_CPU_GRAD_NOTE
            return None
        if call.device_type == "cuda":
            if not _aten_flash_cuda_built():
                return "this torch build has no CUDA flash attention (torch.backends.cuda.is_flash_attention_available())"
            return _flash_cuda_limits(call)
        return f"no PyTorch flash kernel for device {call.device_type}"
    if backend == "flash_attn":
        if call.device_type != "cuda":
            return "the flash-attn package runs on CUDA only"
        mod, how = flash_attn_module()
        if mod is None:
            return how
        return _flash_cuda_limits(call)
    raise ValueError(f"attention_lse: argument 'backend' must be one of {('auto',) + BACKENDS}, got {backend!r}")


def requested_backend(backend: str | None) -> str:
    """The backend asked for: ``backend`` if given, else $VITA_EXT_ATTENTION_BACKEND, else "auto"."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto") or "auto"
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        source = "argument 'backend'" if backend is not None else f"environment variable {ENV_VAR}"
        raise ValueError(f"attention_lse: {source} must be one of {('auto',) + BACKENDS}, got {name!r}")
    return name


def select_backend(call: AttentionCall, backend: str | None = None) -> str:
    """The backend that serves ``call``: the forced one (ValueError if it cannot), else the first that can."""
    return _select(call, requested_backend(backend))


@functools.lru_cache(maxsize=256)
def _select(call: AttentionCall, name: str) -> str:  # cached: decode asks once per layer and token
    if name != "auto":
        reason = why_not(name, call)
        if reason is not None:
            raise ValueError(f"attention_lse: backend {name!r} cannot serve this call ({call.device_type}, "
                             f"{str(call.dtype).replace('torch.', '')}, head_dim {call.head_dim}"
                             f"{', varlen' if call.varlen else ''}): {reason}")
        return name
    if call.dtype == torch.float64:
        return "vita"
    for name in BACKENDS:
        if why_not(name, call, auto=True) is None:
            return name
    return "vita"


def backends_between(before: Counter, after: Counter) -> str:
    """The backends that served attention calls between two snapshots of BACKEND_CALLS, e.g. "flash" or
    "flash+vita" ("none" when no call ran)."""
    used = [name for name in BACKENDS if after.get(name, 0) > before.get(name, 0)]
    return "+".join(used) if used else "none"


def attention_backends(device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                       head_dim: int = 128, needs_grad: bool = False) -> dict[str, dict]:
    """Which attention backends can serve calls on ``device`` at ``dtype`` and ``head_dim`` (forward only,
    or with gradients when ``needs_grad``), and why not.

    Returns:
        {"flash_attn" | "flash" | "vita": {"available": bool, "reason": str}, "selected": name}: the
        reason says why a backend is unavailable ("" when it is available); "selected" is what the
        automatic choice (or $VITA_EXT_ATTENTION_BACKEND) picks for such a call.
    """
    dev = torch.device(device)
    call = AttentionCall(dev.type, dtype, head_dim, False, needs_grad, dev.index)
    table: dict[str, dict] = {}
    for name in BACKENDS:
        reason = why_not(name, call)
        if name == "flash_attn" and reason is None:
            reason = ""
            table[name] = {"available": True, "reason": flash_attn_module()[1]}
            continue
        if reason is None and why_not(name, call, auto=True) is not None:
            table[name] = {"available": True, "reason": "only when forced: " + why_not(name, call, auto=True)}
            continue
        table[name] = {"available": reason is None, "reason": reason or ""}
    try:
        table["selected"] = select_backend(call)
    except ValueError as exc:
        table["selected"] = f"none: {exc}"
    return table
