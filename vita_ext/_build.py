"""Loading of the compiled extension and the facts of its build."""
from __future__ import annotations

import warnings

import torch

try:
    from vita_ext import _C  # noqa: F401  (loading it registers torch.ops.vita_ext.*)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "vita_ext: the compiled extension vita_ext._C could not be loaded "
        f"({exc}). Build it with `pip install --no-build-isolation -e .` against the torch you run "
        f"(torch {torch.__version__} is running)."
    ) from exc


def build_info() -> dict:
    """Facts of the compiled extension.

    Returns:
        dict with ``cuda`` (bool: CUDA kernels compiled in), ``arch_list`` (str, e.g. "8.0;9.0";
        empty for a CPU-only build), ``cuda_version`` and ``nvcc_version`` (str or None),
        ``torch_version`` (the torch it was built against) and ``compiler``.
    """
    return dict(_C.build_info())


_INFO = build_info()
if _INFO["torch_version"].split("+")[0] != torch.__version__.split("+")[0]:
    warnings.warn(
        f"vita_ext was built against torch {_INFO['torch_version']} but torch {torch.__version__} is "
        "running; rebuild with `pip install --no-build-isolation -e .` if ops fail to load or crash.",
        RuntimeWarning,
        stacklevel=2,
    )


def require_kernels(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise a plain error when a CUDA tensor reaches a build without CUDA kernels."""
    if _INFO["cuda"]:
        return
    for t in tensors:
        if t is not None and t.device.type == "cuda":
            raise RuntimeError(
                f"vita_ext.{op}: got a CUDA tensor, but this vita_ext build has no CUDA kernels "
                "(it was built CPU-only: torch without CUDA, no nvcc, or VITA_EXT_CPU_ONLY=1). "
                "Rebuild with CUDA_HOME pointing at the CUDA toolkit: "
                "`CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .`"
            )
