"""TrainConfig: every setting of a training run, from three layers (later wins):
the stage preset (``--stage N``) < a YAML or JSON file (``--config FILE``) < command-line flags.

Only flags the user actually gives override the file; a file key that is not a field is an error
(listing the fields), so a typo never silently trains with a default.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from vita_ext.processing.image import MAX_TILES
from vita_ext.processing.video import MAX_FRAMES
from vita_ext.train.stages import POLICIES, stage_defaults

DTYPES = ("bf16", "fp32")
MAX_EPOCHS = 10000  # counting the steps replays every epoch's packing
SAVE_DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Fields (CLI flag = ``--`` + the name with ``-`` for ``_``)."""
    stage: int = 1
    data: str | None = None               # JSONL file (release format)
    model: str | None = None              # checkpoint directory to start from (release layout)
    out: str | None = None                # output directory (checkpoints, metrics, final model)
    seq_len: int = 32768                  # packed sequence length
    max_steps: int | None = None          # optimizer steps (default: from epochs)
    epochs: float = 1.0                   # used when max_steps is not given (needs one pass over the data)
    grad_accum: int = 1                   # packed sequences per optimizer step
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0                # max global grad norm (0 = off)
    trainable: str = "projector"          # projector | all | llm+projector
    vit_lr_scale: float = 0.1
    vit_layer_decay: float = 0.9
    packing: str = "reset"                # reset | no-reset
    dtype: str = "bf16"                   # bf16 (autocast, fp32 master weights) | fp32
    recompute: bool = False               # activation checkpointing per decoder (and trainable ViT) layer
    context_parallel: bool = False        # shard each packed sequence zig-zag over torchrun's ranks (no-reset only)
    save_every: int = 0                   # checkpoint every N steps (0: only at the end)
    keep_last: int = 2                    # checkpoints kept (0: all)
    save_dtype: str = "fp32"              # dtype of the release-layout copy written to OUT/final
    resume: str | None = None             # "auto" (latest in OUT) or a checkpoint directory
    seed: int = 0                         # data order
    shuffle: bool = True
    max_frames: int | None = None         # video frames per video (processor default 128)
    max_tiles: int | None = None          # image tiles per image (processor default 12)
    strict_labels: bool = True            # skip records whose piecewise tokenization differs
    device: str | None = None             # cpu | cuda | cuda:N (default: cuda when available)
    vision_chunk_size: int = 32           # frozen-ViT tiles encoded at once
    progress: bool = True                 # tqdm bar
    extra: dict = field(default_factory=dict)  # free-form notes copied into trainer_state.json

    def validate(self) -> TrainConfig:
        for name in ("data", "model", "out"):
            if not getattr(self, name):
                raise ValueError(f"train: --{name} is required")
        checks = [
            ("seq_len", self.seq_len >= 2, ">= 2"), ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, ">= 1"),
            ("epochs", self.epochs > 0, "> 0"), ("lr", self.lr > 0, "> 0"),
            ("min_lr", 0 <= self.min_lr <= self.lr, f"in [0, lr={self.lr}]"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)"),
            ("trainable", self.trainable in POLICIES, f"one of {POLICIES}"),
            ("packing", self.packing in ("reset", "no-reset"), "'reset' or 'no-reset'"),
            ("dtype", self.dtype in DTYPES, f"one of {DTYPES}"),
            ("save_dtype", self.save_dtype in SAVE_DTYPES, f"one of {SAVE_DTYPES}"),
            ("save_every", self.save_every >= 0, ">= 0"), ("keep_last", self.keep_last >= 0, ">= 0"),
            ("grad_clip", self.grad_clip >= 0, ">= 0"),
            ("epochs", self.epochs <= MAX_EPOCHS, f"<= {MAX_EPOCHS}"),
            ("max_frames", self.max_frames is None or 1 <= self.max_frames <= MAX_FRAMES, f"in [1, {MAX_FRAMES}]"),
            ("max_tiles", self.max_tiles is None or 1 <= self.max_tiles <= MAX_TILES, f"in [1, {MAX_TILES}]"),
            ("vision_chunk_size", self.vision_chunk_size >= 1, ">= 1"),
            ("seed", -2**40 <= self.seed <= 2**40, "in [-2**40, 2**40] (it seeds torch.Generator per epoch)"),
            ("context_parallel", not (self.context_parallel and self.packing == "reset"),
             "off with --packing reset (ring attention has no block-diagonal mask; use no-reset)"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"train: '{name}' must be {want}, got {getattr(self, name)!r}")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"train: --out {self.out} exists and is not a directory")
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise ValueError(f"train: 'device' must be cpu, cuda or cuda:N, got {self.device!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON file of TrainConfig fields ('-' in keys is read as '_')."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"--config {path}: not valid YAML ({exc})") from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config {path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"--config {path}: unknown setting(s) {unknown}; known: {sorted(FIELDS)}")
    return data


def resolve_config(cli: dict[str, Any] | None = None, config_file: str | None = None) -> TrainConfig:
    """Merge stage preset < config file < CLI values (only the keys present in ``cli`` count: the CLI
    passes the flags the user gave, nothing else)."""
    cli = dict(cli or {})
    file = read_config_file(config_file) if config_file else {}
    stage = cli.get("stage", file.get("stage", 1))
    merged = stage_defaults(int(stage))
    merged.update(file)
    merged.update(cli)
    merged["stage"] = int(stage)
    return TrainConfig(**merged).validate()


# Flag types of the fields whose default is None (the others use their default's type).
_OPTIONAL_TYPES = {"data": str, "model": str, "out": str, "max_steps": int, "resume": str, "max_frames": int,
                   "max_tiles": int, "device": str}
HELP = {
    "stage": "stage preset 1-4 (LONG_VITA.md section 5); other settings override it",
    "data": "training data: JSONL in the release format (messages, images, videos)",
    "model": "checkpoint directory to start from (release layout)",
    "out": "output directory: checkpoint-N/, final/, metrics.jsonl, metrics.csv",
    "seq_len": "tokens per packed sequence",
    "max_steps": "optimizer steps (default: --epochs over the data)",
    "epochs": "epochs when --max-steps is not given",
    "grad_accum": "packed sequences per optimizer step",
    "lr": "peak learning rate", "min_lr": "final learning rate of the cosine",
    "warmup_ratio": "fraction of steps of linear warmup", "weight_decay": "AdamW weight decay",
    "adam_beta1": "AdamW beta1", "adam_beta2": "AdamW beta2", "adam_eps": "AdamW epsilon",
    "grad_clip": "max global gradient norm (0 = off)",
    "trainable": "projector | all | llm+projector",
    "vit_lr_scale": "ViT lr multiplier when the ViT trains", "vit_layer_decay": "ViT layer-wise lr decay",
    "packing": "reset (per-sample positions, block-diagonal) | no-reset (global positions, causal)",
    "dtype": "bf16 (autocast, fp32 master weights) | fp32",
    "recompute": "activation checkpointing per decoder layer (and per ViT layer when it trains)",
    "context_parallel": "shard each sequence zig-zag over torchrun's ranks (ring attention; no-reset only)",
    "save_every": "checkpoint every N steps (0 = only at the end)", "keep_last": "checkpoints kept (0 = all)",
    "save_dtype": "dtype of OUT/final (fp32 | bf16 | fp16)",
    "resume": "'auto' (the newest complete checkpoint in --out) or a checkpoint directory",
    "seed": "data-order seed", "shuffle": "shuffle the records every epoch",
    "max_frames": "frames sampled per video", "max_tiles": "tiles per image",
    "strict_labels": "skip records whose piecewise tokenization differs from the whole text",
    "device": "cpu | cuda | cuda:N", "vision_chunk_size": "frozen-ViT tiles per forward",
    "progress": "tqdm progress bar",
}


def add_arguments(parser) -> None:
    """One flag per TrainConfig field (default: absent, so the file and the preset keep their values)."""
    import argparse

    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML or JSON file of settings (flags override it; it overrides the stage preset)")
    for name, f in FIELDS.items():
        if name == "extra":
            continue
        flag = "--" + name.replace("_", "-")
        kind = _OPTIONAL_TYPES.get(name, type(f.default))
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=HELP.get(name))
        else:
            parser.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS, help=HELP.get(name))
