"""Checkpoints in the Long-VITA HF release layout: config.json, sharded safetensors, the index json,
generation_config.json and tokenizer files.

Loading (``LongVITAForCausalLM.from_pretrained``) builds the model on the meta device and assigns each
tensor as it is read (to the target device and dtype), so a 30 GB checkpoint never exists twice in
memory. ``write_random_checkpoint`` streams seeded random tensors shard by shard from the parameter
shapes alone, so it can write the real 14B layout on a machine with less memory than the model.
"""
from __future__ import annotations

import json
import os

import torch

from vita_ext.model.config import LongVITAConfig
from vita_ext.model.long_vita import parameter_shapes
from vita_ext.model.shards import DEFAULT_SHARD_BYTES, INDEX_FILE, SINGLE_FILE, random_tensor, write_shards

__all__ = ["DEFAULT_SHARD_BYTES", "GENERATION_CONFIG", "INDEX_FILE", "SINGLE_FILE", "save_pretrained",
           "write_random_checkpoint"]

GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                     "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.7,
                     "top_p": 0.8, "top_k": 20}


# --------------------------------------------------------------------------------------- saving
def _write_side_files(path: str, config: LongVITAConfig, tokenizer_path: str | None,
                      generation_config: dict | None, processor_config: dict | None = None) -> None:
    config.save(path)
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation_config or GENERATION_CONFIG, f, indent=2)
        f.write("\n")
    if processor_config:  # a model's own processor settings (LongVITAProcessor.from_pretrained reads them)
        with open(os.path.join(path, "processor_config.json"), "w", encoding="utf-8") as f:
            json.dump(processor_config, f, indent=2)
            f.write("\n")
    from vita_ext.processing import LongVITATokenizer

    # the packaged tokenizer is parsed once per process (LongVITATokenizer.default), not once per save
    tokenizer = LongVITATokenizer.from_pretrained(tokenizer_path) if tokenizer_path else LongVITATokenizer.default()
    tokenizer.save_pretrained(path)


def save_pretrained(model, path: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    tokenizer_path: str | None = None, generation_config: dict | None = None,
                    processor_config: dict | None = None) -> None:
    """Save a ``LongVITAForCausalLM`` in the release layout (weights in the model's dtype), with
    ``processor_config.json`` when ``processor_config`` is given (settings of LongVITAProcessor)."""
    path = os.fspath(path)
    state = model.state_dict()
    if model.config.text.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    dtype = model.dtype
    write_shards(path, shapes, dtype, max_shard_bytes, lambda n: state[n].detach().cpu())
    _write_side_files(path, model.config, tokenizer_path, generation_config, processor_config)


def write_random_checkpoint(path: str | os.PathLike, config: LongVITAConfig, dtype: torch.dtype = torch.bfloat16,
                            seed: int = 0, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                            tokenizer_path: str | None = None, generation_config: dict | None = None,
                            processor_config: dict | None = None) -> str:
    """Write a seeded random-weight checkpoint in the exact release layout for any config (the real
    14B shapes included: ~29.5 GB in bf16, written shard by shard in bounded memory).

    Returns the directory. The weights equal ``LongVITAForCausalLM.random(config, seed)`` cast to dtype.
    """
    path = os.fspath(path)
    shapes = parameter_shapes(config)
    write_shards(path, shapes, dtype, max_shard_bytes, lambda n: random_tensor(n, shapes[n], seed))
    _write_side_files(path, config, tokenizer_path, generation_config, processor_config)
    return path

