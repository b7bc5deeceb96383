"""Typed wrappers of the compiled ops: argument defaults, docstrings, fake kernels and autograd."""
from vita_ext.ops.attention_dispatch import attention_backends
from vita_ext.ops.attention_lse import attention_lse, attention_lse_backward
from vita_ext.ops.masked_linear_cross_entropy import masked_linear_cross_entropy
from vita_ext.ops.masked_lm_head import masked_lm_head
from vita_ext.ops.merge_attention import merge_attention_
from vita_ext.ops.pixel_shuffle_projector import pixel_shuffle_projector

__all__ = [
    "attention_backends",
    "attention_lse",
    "attention_lse_backward",
    "masked_linear_cross_entropy",
    "masked_lm_head",
    "merge_attention_",
    "pixel_shuffle_projector",
]
