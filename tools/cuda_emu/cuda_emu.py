"""Python side of the CUDA emulation tier: load the emulated library and switch it on and off.

    import cuda_emu                      # tools/cuda_emu on sys.path
    cuda_emu.load()                      # build/cuda_emu/plain/libvita_ext_cuda_emu.so, or $VITA_EXT_CUDA_EMU
    with cuda_emu.serving(order="reverse"):
        out, lse = vita_ext.attention_lse(q, k, v)   # CPU tensors, run by csrc/cuda/attention_lse.cu

While serving, the real CUDA launchers and kernels (csrc/cuda, rewritten and compiled for the host) are
the CPU kernels of the ``vita_ext`` ops; on exit the CPU twins are back. ``order`` is the order in which
threads of a block and blocks of a grid run (forward, reverse, random): a result that changes with it
is a race. Errors (a broken CUDA rule, an invalid launch, a cuBLAS misuse) raise RuntimeError naming
the kernel, the source line, the block and the thread.
"""
from __future__ import annotations

import contextlib
import json
import os
import zlib
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ORDERS = ("forward", "reverse", "random")
_loaded: Path | None = None


def library_path(variant: str = "plain") -> Path:
    env = os.environ.get("VITA_EXT_CUDA_EMU")
    return Path(env) if env else ROOT / "build" / "cuda_emu" / variant / "libvita_ext_cuda_emu.so"


def load(path: str | os.PathLike | None = None) -> Path:
    """Loads the emulation library once (after vita_ext, whose op schemas it serves)."""
    global _loaded
    import vita_ext  # noqa: F401  (defines the vita_ext schemas the emulated kernels register against)

    lib = Path(path) if path else library_path()
    if _loaded is not None:
        if lib.resolve() != _loaded.resolve():
            raise RuntimeError(f"cuda_emu: {_loaded} is already loaded; cannot load {lib} as well")
        return _loaded
    if not lib.exists():
        raise FileNotFoundError(f"cuda_emu: {lib} does not exist; build it with `python tools/cuda_emu/build.py`")
    torch.ops.load_library(str(lib))
    _loaded = lib
    return lib


_ATTENTION_ENV = "VITA_EXT_ATTENTION_BACKEND"
_saved_backend: list = []


def enable(order: str = "forward", seed: int = 0, nan_fill: bool = True, namespace: str = "",
           stack_kb: int = 256) -> None:
    """Serve the ops' CPU dispatch key with the emulated CUDA kernels (of `namespace`, default their own).

    While serving, attention_lse calls without an explicit backend run the vita kernels (the ones emulated
    here): left to choose, it would serve CPU tensors with PyTorch's flash kernels instead."""
    torch.ops.cuda_emu.enable(namespace, order, seed, nan_fill, stack_kb)
    if not _saved_backend:
        _saved_backend.append(os.environ.get(_ATTENTION_ENV))
    os.environ[_ATTENTION_ENV] = "vita"


def disable() -> None:
    torch.ops.cuda_emu.disable()
    if _saved_backend:
        prev = _saved_backend.pop()
        if prev is None:
            os.environ.pop(_ATTENTION_ENV, None)
        else:
            os.environ[_ATTENTION_ENV] = prev


@contextlib.contextmanager
def serving(order: str = "forward", seed: int = 0, nan_fill: bool = True):
    enable(order, seed, nan_fill)
    try:
        yield
    finally:
        disable()


def order_for(nodeid: str) -> tuple[str, int]:
    """A test's (order, seed): $VITA_EXT_CUDA_EMU_ORDER if set (forward/reverse/random), otherwise the three
    orders in turn by a hash of the test id, so a run covers all three and each test is reproducible."""
    h = zlib.crc32(nodeid.encode())
    order = os.environ.get("VITA_EXT_CUDA_EMU_ORDER") or ORDERS[h % 3]
    if order not in ORDERS:
        raise ValueError(f"VITA_EXT_CUDA_EMU_ORDER must be one of {ORDERS}, got {order!r}")
    return order, h


def stats() -> dict:
    """Counters since load (or reset_stats): launches, blocks, threads, context switches, GEMMs, per-kernel
    launches/blocks/threads (by the kernel's C++ signature) and emulated op calls."""
    return json.loads(torch.ops.cuda_emu.stats())


def reset_stats() -> None:
    torch.ops.cuda_emu.reset_stats()
