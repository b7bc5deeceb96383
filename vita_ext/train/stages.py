"""Long-VITA's four training stages as presets, the trainable-parameter policies, the optimizer's
parameter groups and the learning-rate schedule (LONG_VITA.md section 5).

| stage | seq len | trainable                                   | lr (min)     | packing  | CP |
|-------|---------|---------------------------------------------|--------------|----------|----|
| 1     | 32K     | projector                                   | 1e-3 (1e-5)  | reset    | 1  |
| 2     | 16K     | all; ViT lr x0.1, layer-wise decay 0.9       | 1e-5 (1e-7)  | reset    | 1  |
| 3     | 128K    | LLM + projector (ViT frozen)                | 5e-6 (1e-7)  | no-reset | 2  |
| 4     | 1024K   | LLM + projector, full recompute             | 5e-6 (1e-7)  | no-reset | 8  |

All: AdamW (0.9, 0.999), weight decay 0, grad clip 1.0, cosine decay to the min lr after a linear
3% warmup, bf16, micro-batch 1, packing on.

Stage 2's ViT learning rates (the BEiT / InternVL layer-wise decay convention): with L ViT layers,
base lr ``lr`` and ``vit_lr_scale`` s = 0.1, ``vit_layer_decay`` d = 0.9, a ViT parameter with layer
id k gets ``lr * s * d ** (L + 1 - k)``, where k = 0 for the embeddings (patch embedding, class and
position embeddings) and k = i + 1 for encoder layer i (0-based). So the top layer gets
``lr * 0.1 * 0.9`` and the embeddings ``lr * 0.1 * 0.9 ** (L + 1)``. The projector and the LLM get
``lr``. Each distinct factor is its own parameter group (``lr_scale`` in the group), and the
schedule multiplies every group's base lr by the same factor, so min lr scales the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

POLICIES = ("projector", "all", "llm+projector")


@dataclass(frozen=True)
class StagePreset:
    seq_len: int
    trainable: str
    lr: float
    min_lr: float
    packing: str
    cp_size: int
    recompute: bool = False


STAGES = {
    1: StagePreset(seq_len=32 * 1024, trainable="projector", lr=1e-3, min_lr=1e-5, packing="reset", cp_size=1),
    2: StagePreset(seq_len=16 * 1024, trainable="all", lr=1e-5, min_lr=1e-7, packing="reset", cp_size=1),
    3: StagePreset(seq_len=128 * 1024, trainable="llm+projector", lr=5e-6, min_lr=1e-7, packing="no-reset",
                   cp_size=2),
    4: StagePreset(seq_len=1024 * 1024, trainable="llm+projector", lr=5e-6, min_lr=1e-7, packing="no-reset",
                   cp_size=8, recompute=True),
}
# Shared by every stage.
COMMON = dict(adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0, grad_clip=1.0, warmup_ratio=0.03,
              vit_lr_scale=0.1, vit_layer_decay=0.9, dtype="bf16")


def stage_defaults(stage: int) -> dict:
    """The preset of ``stage`` as a dict of TrainConfig fields."""
    if stage not in STAGES:
        raise ValueError(f"--stage must be one of {sorted(STAGES)}, got {stage!r}")
    p = STAGES[stage]
    return dict(COMMON, stage=stage, seq_len=p.seq_len, trainable=p.trainable, lr=p.lr, min_lr=p.min_lr,
                packing=p.packing, recompute=p.recompute)


def _parts(model) -> dict[str, nn.Module]:
    m = model.model
    return {"vit": m.vision_model, "projector": m.vision_projection,
            "llm": nn.ModuleList([m.embed_tokens, m.layers, m.norm, model.lm_head])}


def apply_trainable(model, policy: str) -> dict[str, int]:
    """Set requires_grad by policy ('projector' | 'all' | 'llm+projector'); returns the trainable
    parameter count of each part ({"vit": n, "projector": n, "llm": n}, tied weights counted once)."""
    if policy not in POLICIES:
        raise ValueError(f"trainable policy must be one of {POLICIES}, got {policy!r}")
    on = {"projector": {"projector"}, "all": {"vit", "projector", "llm"}, "llm+projector": {"llm", "projector"}}[policy]
    model.requires_grad_(False)
    for name, module in _parts(model).items():
        module.requires_grad_(name in on)
    return trainable_counts(model)


def trainable_counts(model) -> dict[str, int]:
    counts = {}
    for name, module in _parts(model).items():
        seen = {id(p): p for p in module.parameters() if p.requires_grad}
        counts[name] = sum(p.numel() for p in seen.values())
    return counts


def vit_layer_id(name: str, num_layers: int) -> int:
    """Layer id of a ViT parameter name (relative to the vision model): 0 for embeddings, i + 1 for
    encoder layer i, num_layers + 1 for anything else (none in InternViT)."""
    if name.startswith("embeddings."):
        return 0
    if name.startswith("encoder.layers."):
        return int(name.split(".")[2]) + 1
    return num_layers + 1


def param_groups(model, vit_lr_scale: float = 0.1, vit_layer_decay: float = 0.9) -> list[dict]:
    """Trainable parameters grouped by lr factor: one group for the LLM + projector (``lr_scale`` 1)
    and, when the ViT trains, one group per ViT layer id (``lr_scale = vit_lr_scale *
    vit_layer_decay ** (L + 1 - k)``). Each group has ``name``, ``params`` and ``lr_scale``; the order
    is deterministic (needed to restore optimizer state)."""
    groups: list[dict] = []
    main = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen and not name.startswith("model.vision_model."):
            main.append(p)
            seen.add(id(p))
    if main:
        groups.append({"name": "llm+projector", "params": main, "lr_scale": 1.0})
    vit = model.model.vision_model
    num_layers = len(vit.encoder.layers)
    by_layer: dict[int, list] = {}
    for name, p in vit.named_parameters():
        if p.requires_grad and id(p) not in seen:
            by_layer.setdefault(vit_layer_id(name, num_layers), []).append(p)
            seen.add(id(p))
    for k in sorted(by_layer):
        scale = vit_lr_scale * vit_layer_decay ** (num_layers + 1 - k)
        groups.append({"name": f"vit.layer{k}", "params": by_layer[k], "lr_scale": scale})
    return groups


def lr_factor(step: int, total_steps: int, warmup_ratio: float = 0.03, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup over ``w = ceil(warmup_ratio * total_steps)`` steps: (step + 1) / w; then cosine from
    1 down to ``min_ratio`` (= min_lr / lr) at the last step:
    min_ratio + (1 - min_ratio) * 0.5 * (1 + cos(pi * t)), t = (step - w) / max(1, total_steps - 1 - w).
    """
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
