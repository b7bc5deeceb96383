"""Training: Long-VITA's four stages on JSONL conversations (data, packing, stages, loop, checkpoints).

    vita-ext train --stage N --data FILE.jsonl --model DIR --out DIR [--seq-len N] [--max-steps N] ...

See ``loop.py`` for the loss and context parallelism, ``packing.py`` for the two packing modes,
``stages.py`` for the presets and ``checkpoint.py`` for atomic, exactly resumable checkpoints.
"""
from vita_ext.train.checkpoint import latest_checkpoint, save_checkpoint, validate
from vita_ext.train.config import TrainConfig, read_config_file, resolve_config
from vita_ext.train.data import BadRecordWarning, DataReport, JsonlDataset, Sample
from vita_ext.train.loop import Trainer, count_steps
from vita_ext.train.packing import PackedBatch, Packer, pack_samples, shift_targets
from vita_ext.train.stages import STAGES, apply_trainable, lr_factor, param_groups, stage_defaults

__all__ = ["BadRecordWarning", "DataReport", "JsonlDataset", "PackedBatch", "Packer", "STAGES", "Sample",
           "TrainConfig", "Trainer", "apply_trainable", "count_steps", "latest_checkpoint", "lr_factor",
           "pack_samples", "param_groups", "read_config_file", "resolve_config", "save_checkpoint",
           "shift_targets", "stage_defaults", "validate"]
