"""Checkpoints in the Long-VITA HF release layout: config.json, sharded safetensors, the index json,
generation_config.json and tokenizer files.

Loading builds the model on the meta device and assigns each tensor as it is read (to the target
device and dtype), so a 30 GB checkpoint never exists twice in memory. ``write_random_checkpoint``
streams seeded random tensors shard by shard from the parameter shapes alone, so it can write the
real 14B layout on a machine with less memory than the model.
"""
from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vita_ext._json import read_json
from vita_ext.model.config import LongVITAConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 4 * 1024**3
GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                     "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.7,
                     "top_p": 0.8, "top_k": 20}


# --------------------------------------------------------------------------------------- shapes
def parameter_shapes(config: LongVITAConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the release layout with its shape, from the config alone (meta device)."""
    from vita_ext.model.long_vita import LongVITAForCausalLM

    with torch.device("meta"):
        model = LongVITAForCausalLM(config)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if config.text.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A deterministic fp32 random tensor for parameter ``name``: norm weights ~1, layer scales ~0.1,
    biases and weights ~N(0, 0.02). The same (name, seed) always gives the same values."""
    gen = torch.Generator().manual_seed((zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF)
    x = torch.randn(shape, generator=gen)
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if leaf == "weight" and ("norm" in parent or "layernorm" in parent):
        return 1.0 + 0.1 * x
    if leaf in ("ls1", "ls2"):
        return 0.1 + 0.02 * x
    return 0.02 * x


# --------------------------------------------------------------------------------------- saving
def _shards(named: Iterable[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list[str]]:
    shards, cur, size = [], [], 0
    for name, shape, dtype in named:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    if cur:
        shards.append(cur)
    return shards


def _write_shards(path: str, names_shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, max_bytes: int,
                  produce) -> None:
    """Write tensors produced one shard at a time (``produce(name) -> tensor``) plus the index json."""
    os.makedirs(path, exist_ok=True)
    groups = _shards(((n, s, dtype) for n, s in names_shapes.items()), max_bytes)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        file = SINGLE_FILE if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: produce(n).to(dtype).contiguous() for n in names}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        tmp = os.path.join(path, file + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, file))
        weight_map.update({n: file for n in names})
        del tensors
    with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")


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
    _write_shards(path, shapes, dtype, max_shard_bytes, lambda n: state[n].detach().cpu())
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
    _write_shards(path, shapes, dtype, max_shard_bytes, lambda n: random_tensor(n, shapes[n], seed))
    _write_side_files(path, config, tokenizer_path, generation_config, processor_config)
    return path


# -------------------------------------------------------------------------------------- loading
def _shard_error(file: str, exc: BaseException) -> ValueError:
    text = str(exc).strip().splitlines()
    return ValueError(f"checkpoint shard {file}: cannot read it as safetensors "
                      f"({text[0] if text else type(exc).__name__}); the file is truncated or corrupt")


def _read_index(index: str) -> dict[str, str]:
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise ValueError(f"{index}: expected an object with a 'weight_map' of tensor name -> shard file name")
    for file in set(weight_map.values()):
        if os.path.isabs(file) or os.path.normpath(file).startswith(os.pardir) or os.sep in os.path.normpath(file):
            raise ValueError(f"{index}: shard {file!r} is not a file name inside the checkpoint directory")
    return weight_map


def checkpoint_files(path: str) -> dict[str, str]:
    """Map tensor name -> shard file path; raises FileNotFoundError naming what is missing and
    ValueError for an unreadable index or single-file checkpoint (naming the file)."""
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(index):
        weight_map = _read_index(index)
    elif os.path.exists(single):
        try:
            with safe_open(single, framework="pt") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors' errors name no file
            raise _shard_error(single, exc) from exc
    else:
        raise FileNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {path!r}")
    missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(path, f))})
    if missing:
        lost = sum(1 for f in weight_map.values() if f in missing)
        raise FileNotFoundError(f"checkpoint {path!r}: missing shard file(s) {missing} listed in {INDEX_FILE} "
                                f"({lost} tensors)")
    return {k: os.path.join(path, f) for k, f in weight_map.items()}


def _read(files: dict[str, str], names: list[str], device: str, dtype: torch.dtype | None) -> Iterator:
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    for file, group in by_file.items():
        try:
            with safe_open(file, framework="pt", device=device) as f:
                stored = set(f.keys())
                for n in group:
                    if n not in stored:
                        raise ValueError(f"checkpoint shard {file}: has no tensor {n!r} (the index says it does)")
                    t = f.get_tensor(n)
                    yield n, (t if dtype is None else t.to(dtype))
        except (ValueError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors' errors (truncated file, bad header) name no file
            raise _shard_error(file, exc) from exc


def _describe(names: list[str], limit: int = 12) -> str:
    head = ", ".join(names[:limit])
    return head + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu"):
    """Build a ``LongVITAForCausalLM`` from a release-layout directory; see ``from_pretrained``."""
    from vita_ext.model.long_vita import LongVITAForCausalLM

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    config = LongVITAConfig.from_pretrained(path)
    files = checkpoint_files(path)
    expected = parameter_shapes(config)
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected))
    if missing or unexpected:
        parts = ([f"missing keys: {_describe(missing)}"] if missing else []) + \
                ([f"unexpected keys: {_describe(unexpected)}"] if unexpected else [])
        raise ValueError(f"checkpoint {path!r} does not match its config.json: " + "; ".join(parts))
    with torch.device("meta"):
        model = LongVITAForCausalLM(config)
    device = torch.device(device)
    bad = []
    for name, tensor in _read(files, list(expected), str(device), dtype):
        if tuple(tensor.shape) != expected[name]:
            bad.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {expected[name]}")
            continue
        _assign(model, name, tensor)
    if bad:
        raise ValueError(f"checkpoint {path!r}: shape mismatch for {len(bad)} tensor(s): " + "; ".join(bad[:12]))
    model.reset_buffers(device)
    return model.eval()


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, leaf)
    setattr(module, leaf, torch.nn.Parameter(tensor, requires_grad=old.requires_grad))
