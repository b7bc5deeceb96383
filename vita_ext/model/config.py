"""Configuration dataclasses read from a Long-VITA ``config.json``.

The release layout puts the Qwen2 LLM fields at the top level and the InternViT fields under
``visual`` (see ``shared/reference/long_vita_14b_config.json``). Unknown fields are an error, so
that a checkpoint of another architecture is not silently run with the wrong maths; fields the
model does not use (dropouts, initialiser ranges, HF bookkeeping) are listed and ignored.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from vita_ext._json import read_json

# Fields of the release config that carry no information for inference/training here.
_IGNORED_TEXT = {"architectures", "auto_map", "attention_dropout", "initializer_range", "model_type",
                 "torch_dtype", "transformers_version", "use_cache", "max_window_layers", "sliding_window",
                 "use_sliding_window", "pad_token_id", "rope_scaling", "dtype", "layer_types"}
_IGNORED_VISION = {"architectures", "auto_map", "attention_dropout", "drop_path_rate", "dropout",
                   "initializer_factor", "initializer_range", "model_type", "torch_dtype", "transformers_version",
                   "use_flash_attn", "dtype"}


MAX_LAYERS = 1024  # a sanity bound (the largest released LLMs have ~128): each layer is a Python module
_ARCHITECTURES = {"": ("LongVITAForCausalLM",), ".visual": ("InternVisionModel",)}


def _check_type(name: str, value: Any, annotation: str) -> None:
    """JSON values must have the field's type: int (not bool), float (int accepted), bool, str; positive
    for sizes and counts, so that no later arithmetic fails on them (or divides by zero)."""
    kind = annotation.split("|")[0].strip()
    if value is None and "None" in annotation:
        return
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool), "str": isinstance(value, str)}.get(kind, True)
    if not ok:
        want = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[kind]
        _check(False, name, want, value)
    if kind in ("int", "float") and not (value > 0 and value < float("inf")):
        if not (kind == "int" and name.endswith("token_id")):
            _check(False, name, "positive", value)


def _from_fields(cls, data: dict[str, Any], ignored: set[str], where: str, required: tuple[str, ...]):
    if not isinstance(data, dict):
        raise ValueError(f"config.json{where}: expected a JSON object, got {type(data).__name__}")
    names = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names) - ignored)
    if unknown:
        raise ValueError(f"config.json{where}: unknown field(s) {unknown}; expected a Long-VITA config "
                         f"(known: {sorted(names)})")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"config.json{where}: missing required field(s) {missing}")
    known = _ARCHITECTURES[where]
    arch = data.get("architectures", list(known))
    if not isinstance(arch, list) or not arch or any(a not in known for a in arch):
        _check(False, where.lstrip(".") + ("." if where else "") + "architectures", f"{list(known)}", arch)
    for k, v in data.items():
        if k in names:
            _check_type(where.lstrip(".") + ("." if where else "") + k, v, str(names[k]))
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class VisionConfig:
    """InternViT-300M (``visual`` in the release config). Defaults are Long-VITA-14B's."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    norm_type: str = "layer_norm"
    qk_normalization: bool = False

    REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size")

    def __post_init__(self):
        _check(1 <= self.num_hidden_layers <= MAX_LAYERS, "visual.num_hidden_layers", f"in [1, {MAX_LAYERS}]",
               self.num_hidden_layers)
        _check(self.hidden_act == "gelu", "visual.hidden_act", "'gelu'", self.hidden_act)
        _check(self.norm_type == "layer_norm", "visual.norm_type", "'layer_norm'", self.norm_type)
        _check(not self.qk_normalization, "visual.qk_normalization", "false", self.qk_normalization)
        _check(self.hidden_size % self.num_attention_heads == 0, "visual.hidden_size",
               f"a multiple of num_attention_heads={self.num_attention_heads}", self.hidden_size)
        _check(self.image_size % self.patch_size == 0, "visual.image_size",
               f"a multiple of patch_size={self.patch_size}", self.image_size)
        _check((self.image_size // self.patch_size) % 2 == 0, "visual.image_size",
               "an even number of patches per side (pixel shuffle 0.5)", self.image_size)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2


@dataclass
class TextConfig:
    """Qwen2 decoder (top-level fields of the release config). Defaults are Long-VITA-14B's."""
    vocab_size: int = 152064
    hidden_size: int = 5120
    intermediate_size: int = 13824
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 1310720
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    head_dim: int | None = None

    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "rope_theta")

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check(1 <= self.num_hidden_layers <= MAX_LAYERS, "num_hidden_layers", f"in [1, {MAX_LAYERS}]",
               self.num_hidden_layers)
        _check(self.head_dim >= 1, "head_dim", ">= 1 (hidden_size / num_attention_heads)", self.head_dim)
        _check(self.hidden_act == "silu", "hidden_act", "'silu'", self.hidden_act)
        _check(self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
               f"a multiple of num_key_value_heads={self.num_key_value_heads}", self.num_attention_heads)
        _check(self.head_dim % 2 == 0, "head_dim", "even (rotary embedding)", self.head_dim)


@dataclass
class LongVITAConfig:
    """The whole model: InternViT -> pixel-shuffle projector -> Qwen2.

    The projector is fixed by the architecture: LayerNorm(4 * vision.hidden_size, eps 1e-5),
    Linear(4 * vision.hidden_size -> vision.hidden_size), GELU, Linear(vision.hidden_size -> text.hidden_size).
    """
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector_layernorm_eps: float = 1e-5

    @property
    def num_image_tokens(self) -> int:
        """LLM tokens per tile after the 0.5 pixel shuffle (256 for 448-px tiles of 14-px patches)."""
        return self.vision.num_patches // 4

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LongVITAConfig:
        """Build from a release-layout dict; raises ValueError on unknown/missing/unsupported fields,
        a value of the wrong type or sign, or an architecture other than Long-VITA's."""
        if not isinstance(data, dict):
            raise ValueError(f"config.json: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        if "visual" not in data:
            raise ValueError("config.json: missing required field 'visual' (the InternViT sub-config)")
        visual = data.pop("visual")
        model_type = data.get("model_type", "long_vita")
        _check(model_type in ("long_vita", "qwen2"), "model_type", "'long_vita'", model_type)
        _check(not data.get("use_sliding_window", False), "use_sliding_window", "false", data.get("use_sliding_window"))
        _check(data.get("rope_scaling") is None, "rope_scaling", "null (no RoPE scaling)", data.get("rope_scaling"))
        if isinstance(data.get("eos_token_id"), list) and data["eos_token_id"]:  # the model needs one of them
            data["eos_token_id"] = data["eos_token_id"][0]
        text = _from_fields(TextConfig, data, _IGNORED_TEXT, "", TextConfig.REQUIRED)
        vision = _from_fields(VisionConfig, visual, _IGNORED_VISION, ".visual", VisionConfig.REQUIRED)
        return cls(text=text, vision=vision)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> LongVITAConfig:
        """Read ``config.json`` from a checkpoint directory (or the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"no config.json in {path!r}")
        data = read_json(file)
        try:
            return cls.from_dict(data)
        except ValueError as exc:  # name the file: "config.json: ..." -> "<path>: ..."
            message = str(exc)
            raise ValueError(file + message[len("config.json"):] if message.startswith("config.json") else
                             f"{file}: {message}") from None

    def to_dict(self) -> dict[str, Any]:
        """The release layout: LLM fields at top level, vision under ``visual``."""
        text = dataclasses.asdict(self.text)
        if text["head_dim"] == self.text.hidden_size // self.text.num_attention_heads:
            del text["head_dim"]
        return {"architectures": ["LongVITAForCausalLM"], "model_type": "long_vita", **text,
                "use_sliding_window": False, "torch_dtype": "bfloat16",
                "visual": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                           **dataclasses.asdict(self.vision)}}

    def save(self, path: str | os.PathLike) -> None:
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


def _check(ok: bool, name: str, expected: str, got: Any) -> None:
    if not ok:
        raise ValueError(f"config.json: field '{name}' must be {expected}, got {got!r}")
