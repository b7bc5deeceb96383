"""InternViT-300M (Long-VITA's vision encoder) and the pixel-shuffle projector.

Parameter names follow the release checkpoint (``model.vision_model.*``, ``model.vision_projection.*``).
Source: InternVL (Chen et al., 2024) InternViT; Long-VITA (arXiv 2502.05177) ResamplerProjector.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vita_ext.model.config import LongVITAConfig, VisionConfig
from vita_ext.ops import attention_lse, pixel_shuffle_projector


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, c))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.empty(1, cfg.num_patches + 1, c))

    def forward(self, pixel_values: Tensor) -> Tensor:
        # pixel_values [N, 3, s, s] -> patches [N, C, g, g] -> [N, 1 + g*g, C] (CLS first)
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1) + self.position_embedding.to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        n, length, c = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.num_heads, c // self.num_heads)  # [N, L, 3, h, d]
        out, _ = attention_lse(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=False)
        return self.proj(out.reshape(n, length, c))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(torch.empty(cfg.hidden_size))
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(torch.empty(cfg.hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class InternVisionModel(nn.Module):
    """pixel_values [N, 3, s, s] -> last layer's hidden states [N, 1 + g*g, C] (no final norm)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.gradient_checkpointing = False

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class VisionProjection(nn.Module):
    """Long-VITA's ResamplerProjector: [N, 1 + g*g, C] ViT states -> [N, g*g/4, H_llm] LLM embeddings.

    Drops the CLS token, then calls the fused ``pixel_shuffle_projector`` op (shuffle 0.5 +
    LayerNorm(4C) + Linear(4C -> C) + GELU + Linear(C -> H_llm)). The modules below exist for their
    parameter names (``pre_proj_layernorm``, ``mlp.0``, ``mlp.2``); their own forward is not used.
    """

    def __init__(self, cfg: LongVITAConfig):
        super().__init__()
        c = cfg.vision.hidden_size
        self.pre_proj_layernorm = nn.LayerNorm(4 * c, eps=cfg.projector_layernorm_eps)
        self.mlp = nn.Sequential(nn.Linear(4 * c, c, bias=False), nn.GELU(), nn.Linear(c, cfg.text.hidden_size, bias=False))

    def forward(self, vit_hidden_states: Tensor) -> Tensor:
        ln, fc1, fc2 = self.pre_proj_layernorm, self.mlp[0], self.mlp[2]
        return pixel_shuffle_projector(vit_hidden_states[:, 1:], ln.weight, ln.bias, fc1.weight, fc2.weight, ln.eps)
