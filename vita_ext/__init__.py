"""vita_ext: C++/CUDA kernels and a thin PyTorch implementation of Long-VITA for million-token inputs.

Ops (``vita_ext.pixel_shuffle_projector``, ``masked_lm_head``, ``masked_linear_cross_entropy``,
``attention_lse``, ``merge_attention_``) load with the package; the model, processor and generation
classes load on first use.
"""
from vita_ext import reference
from vita_ext._build import build_info
from vita_ext.ops import (
    attention_backends,
    attention_lse,
    attention_lse_backward,
    masked_linear_cross_entropy,
    masked_lm_head,
    merge_attention_,
    pixel_shuffle_projector,
)

__version__ = "0.1.0"

_LAZY = {
    "LongVITAConfig": "vita_ext.model.config",
    "LongVITAForCausalLM": "vita_ext.model.long_vita",
    "LongVITAProcessor": "vita_ext.processing",
    "LongVITATokenizer": "vita_ext.processing",
    "GenerationConfig": "vita_ext.generation",
    "generate": "vita_ext.generation",
    "write_random_checkpoint": "vita_ext.model.checkpoint",
    "patch": "vita_ext.integrations.transformers",
    "patch_qwen2": "vita_ext.integrations.transformers",
    "patch_internvl": "vita_ext.integrations.transformers",
    "unpatch": "vita_ext.integrations.transformers",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vita_ext' has no attribute {name!r}")


__all__ = [
    "attention_backends",
    "attention_lse",
    "attention_lse_backward",
    "build_info",
    "masked_linear_cross_entropy",
    "masked_lm_head",
    "merge_attention_",
    "pixel_shuffle_projector",
    "reference",
    *_LAZY,
]
