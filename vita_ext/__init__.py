"""vita_ext: C++/CUDA kernels and a thin PyTorch implementation of Long-VITA for million-token inputs."""
from vita_ext._build import build_info
from vita_ext import reference
from vita_ext.ops import (
    attention_lse,
    masked_linear_cross_entropy,
    masked_lm_head,
    merge_attention_,
    pixel_shuffle_projector,
)

__version__ = "0.1.0"

__all__ = [
    "attention_lse",
    "build_info",
    "masked_linear_cross_entropy",
    "masked_lm_head",
    "merge_attention_",
    "pixel_shuffle_projector",
    "reference",
]
